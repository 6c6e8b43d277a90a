"""Train a reranker: `python train.py [data=...] [model=...] [key=value ...]` (see README)."""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from rerank_lightning.checkpoints import CheckpointError
    from rerank_lightning.data import DataFormatError, FormatConfigError
    from rerank_lightning.model import WeightsUnavailableError
    from rerank_lightning.train import train

    try:
        return train(cfg)
    except MissingMandatoryValue as err:
        print(f"error: {err.full_key} is not set: give it on the command line, e.g. "
              f"{err.full_key}=/path/to/train.jsonl (see README, Configuration)", file=sys.stderr)
        sys.exit(2)
    except (CheckpointError, DataFormatError, FormatConfigError, WeightsUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
