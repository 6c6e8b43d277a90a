"""Train a reranker: `python train.py [data=...] [model=...] [key=value ...]` (see README)."""

import ctypes
import os
import re
import sys
from pathlib import Path
from typing import NoReturn


def _return_freed_memory_to_the_os() -> None:
    """glibc keeps the training step's freed activation and gradient blocks in its heaps, so RSS climbs
    step after step (the default run: 5.2 GiB for 2.2 GiB of weights, gradients and AdamW state).
    Blocks of 64 KiB and more are then mapped on their own and unmapped when freed. Set before torch
    allocates anything; `MALLOC_MMAP_THRESHOLD_` in the environment wins; no-op without glibc."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 64 * 1024)


_return_freed_memory_to_the_os()

import hydra  # noqa: E402
import lightning  # noqa: F401, E402  before Hydra's logging setup, which replaces its console handler (conf/hydra)
from hydra.errors import InstantiationException  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from omegaconf.errors import MissingMandatoryValue  # noqa: E402

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


def _fail(message: str, code: int = 2) -> NoReturn:
    """One `error:` line on stderr (newlines folded), then exit: 2 for bad input or config."""
    print("error: " + " ".join(message.split()), file=sys.stderr)
    sys.exit(code)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from rerank_lightning.checkpoints import CheckpointError
    from rerank_lightning.config_checks import ConfigError
    from rerank_lightning.data import DataFormatError, FormatConfigError
    from rerank_lightning.model import WeightsUnavailableError
    from rerank_lightning.model.module import NonFiniteTrainingError
    from rerank_lightning.train import train

    try:
        return train(cfg)
    except MissingMandatoryValue as err:
        _fail(f"{err.full_key} is not set: give it on the command line, e.g. "
              f"{err.full_key}=/path/to/train.jsonl (see README, Configuration)")
    except (CheckpointError, ConfigError, DataFormatError, FormatConfigError, WeightsUnavailableError) as err:
        _fail(str(err))
    except InstantiationException as err:  # a constructor refused a config value: name the group and the reason
        key = re.search(r"full_key: (\S+)", str(err))
        _fail(f"{key.group(1) + ': ' if key else ''}{err.__cause__ or err}")
    except NonFiniteTrainingError as err:  # a failed run, not a usage error
        _fail(str(err), code=1)


if __name__ == "__main__":
    main()
