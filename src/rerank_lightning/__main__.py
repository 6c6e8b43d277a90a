"""`python -m rerank_lightning COMMAND ...`: the same as the `rerank-lightning` console script."""

import sys

from .cli import main

sys.exit(main())
