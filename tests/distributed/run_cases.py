"""`torchrun --nproc_per_node 2 tests/distributed/run_cases.py OUT CASE...` (see cases.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
