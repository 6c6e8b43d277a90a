"""Checkpoint files: written atomically, read without running pickled code, resumed where they stopped.

- `AtomicCheckpointIO` (a trainer plugin, conf/trainer/default.yaml) writes each checkpoint next to its final
  name, fsyncs it and renames it into place, so a kill mid-save never leaves a half-written `.ckpt`;
  it reads checkpoints with `torch.load(weights_only=True)` only.
- `read_checkpoint` checks a user-given checkpoint (missing, truncated, foreign, crafted) with one-line errors.
- `check_resume` refuses a resume that would train nothing, before any model is loaded.
- `ExactResume` (a callback, conf/callbacks/default.yaml) records an epoch that `max_steps` cut short as
  unfinished, so that resuming continues it instead of treating it as done, and carries the random generators.
"""

from __future__ import annotations

import copyreg
import enum
import logging
import os
import pickle
import random
import re
import socket
import time
import zipfile
from pathlib import Path
from typing import Any, Iterable

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .strategies import CHECKPOINT_METADATA as SHARDED_METADATA

log = logging.getLogger(__name__)

# A sharded (FSDP) checkpoint is a directory: Lightning's metadata file plus torch.distributed.checkpoint's.
SHARDED_INDEX = ".metadata"
PARTIAL_SUFFIX = ".partial"  # `.<name>@<host>@<pid>.partial`: a checkpoint being written
LIGHTNING_KEYS = ("state_dict", "global_step", "loops")


class CheckpointError(ValueError):
    """A checkpoint given by the user cannot be used; the message is one line naming the file."""


# ---------------------------------------------------------------- reading


def _refused(path: Path, err: pickle.UnpicklingError, allowed: str, how: str = "") -> CheckpointError:
    """The one-line error for a pickle that needs more than `allowed`, naming the global it asked for."""
    found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(err))
    what = f" ({found.group(1)})" if found else ""
    return CheckpointError(f"{path} holds pickled Python objects{what}, not only {allowed}: refused "
                           f"({how}train.py never writes such objects)")


def _load(path: Path, mmap: bool) -> Any:
    """`torch.load` that runs no pickled code, with one-line errors for files that are not checkpoints."""
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its index is at the end of the file
        raise CheckpointError(f"{path} is truncated or not a checkpoint (not a complete torch.save archive)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise _refused(path, err, "tensors and plain containers", "checkpoints are read with weights_only=True; ") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is truncated or not a checkpoint ({reason})") from None


def read_checkpoint(path: str | os.PathLike, need: Iterable[str] = LIGHTNING_KEYS, mmap: bool = True) -> dict[str, Any]:
    """The checkpoint at `path` (a file, or the metadata of a sharded directory) as a dict, on CPU.

    Raises `CheckpointError` for a missing path, a directory that holds no checkpoint, a truncated or
    foreign file, a file whose pickle needs more than tensors and plain containers, or a dict without
    the keys `need`.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        if not (path / SHARDED_METADATA).is_file():
            raise CheckpointError(f"{path} is a directory but not a checkpoint (no {SHARDED_METADATA} of a "
                                  f"sharded checkpoint)")
        if not (path / SHARDED_INDEX).is_file():
            raise CheckpointError(f"{path} is truncated or not a checkpoint (a sharded checkpoint without "
                                  f"{SHARDED_INDEX})")
        checkpoint = _load(path / SHARDED_METADATA, mmap=False)
        _check_shards(path)
    else:
        checkpoint = _load(path, mmap=mmap)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it holds a {type(checkpoint).__name__})")
    if missing := [key for key in need if key not in checkpoint and not (key == "state_dict" and path.is_dir())]:
        raise CheckpointError(f"{path} is not a Lightning checkpoint written by train.py (no {', '.join(missing)})")
    return checkpoint


class _ShardedIndexUnpickler(pickle.Unpickler):
    """Unpickles a sharded checkpoint's index (torch.distributed.checkpoint's `Metadata`, a plain pickle)
    allowing only what such an index holds: the classes of torch's checkpoint metadata, `torch.Size`,
    dtypes, layouts and paths. Anything else is refused before it is imported or called.

    Python 3.11.0 to 3.11.4 (Debian 12's python3 is 3.11.2) pickle an enum member as `getattr(its class,
    its name)`, so an index written there asks for `builtins.getattr`: it gets `_enum_member`, which
    returns members of the checkpoint metadata's enums and nothing else."""

    CHECKPOINT_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "getattr"):
            return self._enum_member
        if module in self.CHECKPOINT_MODULES or module in ("torch", "pathlib", "torch.serialization"):
            found = super().find_class(module, name)
            if self._allowed(module, found):
                return found
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")

    def _allowed(self, module: str, found: Any) -> bool:
        if module in self.CHECKPOINT_MODULES:
            return isinstance(found, type) and found.__module__ == module
        if module == "torch":
            return found is torch.Size or isinstance(found, torch.dtype)
        if module == "pathlib":
            return isinstance(found, type) and issubclass(found, os.PathLike)
        return found is copyreg.dispatch_table[torch.layout](torch.strided)[0]  # how torch pickles a layout

    def _enum_member(self, cls: Any, name: Any) -> enum.Enum:
        if (isinstance(cls, enum.EnumMeta) and cls.__module__ in self.CHECKPOINT_MODULES and isinstance(name, str)
                and name in cls.__members__):
            return cls[name]
        raise pickle.UnpicklingError("Unsupported global: GLOBAL builtins.getattr")


def _check_shards(directory: Path) -> None:
    """The index of a sharded checkpoint holds only checkpoint metadata (read as `_ShardedIndexUnpickler`
    allows, before torch's own reader unpickles it as it is), and every shard file it names is there and
    long enough for the bytes it places in it (a directory copied in part, a disk that filled up)."""
    try:
        with (directory / SHARDED_INDEX).open("rb") as f:
            index = _ShardedIndexUnpickler(f).load()
        storage = index.storage_data.values()
    except pickle.UnpicklingError as err:
        raise _refused(directory / SHARDED_INDEX, err, "checkpoint metadata") from None
    except Exception as err:  # noqa: BLE001 - whatever else fails, the index is unusable
        raise CheckpointError(f"{directory} is truncated or not a checkpoint ({SHARDED_INDEX} unreadable: "
                              f"{type(err).__name__})") from None
    needed: dict[str, int] = {}
    for item in storage:
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(needed.items()):
        shard = directory / name
        if not shard.is_file():
            raise CheckpointError(f"{directory} is incomplete: its shard file {name} is missing")
        if shard.stat().st_size < size:
            raise CheckpointError(f"{directory} is truncated: its shard file {name} holds {shard.stat().st_size} "
                                  f"bytes, its index needs {size}")


# ---------------------------------------------------------------- writing


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - filesystems that cannot sync a directory
        pass
    finally:
        os.close(fd)


STALE_AFTER_S = 3600  # a partial file of another host untouched this long belongs to a killed save


def _partial_name(path: Path) -> Path:
    return path.parent / f".{path.name}@{socket.gethostname()}@{os.getpid()}{PARTIAL_SUFFIX}"


def _writer_gone(partial: Path) -> bool:
    """Whether the process that wrote `partial` (named by `_partial_name`) has stopped writing it."""
    _, host, pid = (["", "", ""] + partial.name[: -len(PARTIAL_SUFFIX)].rsplit("@", 2))[-3:]
    if host != socket.gethostname() or not pid.isdigit():
        return time.time() - partial.stat().st_mtime > STALE_AFTER_S
    if int(pid) == os.getpid():
        return True  # this process writes one checkpoint at a time: an earlier one of its own failed
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_orphans(directory: str | os.PathLike) -> list[Path]:
    """Delete the partial checkpoints in `directory` left by saves that were killed; return them."""
    removed = []
    for partial in Path(directory).glob(f".*{PARTIAL_SUFFIX}"):
        try:
            if _writer_gone(partial):
                partial.unlink(missing_ok=True)
                removed.append(partial)
        except FileNotFoundError:  # its writer renamed it meanwhile
            continue
    if removed:
        log.info("removed %d partial checkpoint(s) of an interrupted save in %s", len(removed), directory)
    return removed


def atomic_save(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """`torch.save` to `path` that is all or nothing: written under a temporary name in the same directory
    (so the rename cannot cross filesystems), flushed to disk, renamed into place, the directory synced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path.parent)
    tmp = _partial_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer and reader for local paths: atomic saves, `weights_only=True` loads
    with one-line errors. Remote (`scheme://`) paths go to Lightning's own implementation."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return read_checkpoint(path, need=(), mmap=False)


# ---------------------------------------------------------------- resuming


def epoch_cut_short(checkpoint: dict[str, Any]) -> bool:
    """Whether `checkpoint` was written at an epoch end that did not consume the epoch's batches.

    Lightning ends the epoch early when `max_steps` (or a stop request) is reached mid-epoch, then counts
    the epoch as processed before `on_train_epoch_end`, where ModelCheckpoint saves by default: resuming
    from that file would skip the rest of the epoch (and with max_epochs=1 train nothing at all).
    """
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
    if not epochs or not batches:
        return False
    current = epochs["current"]
    return current["processed"] == current["started"] and current["ready"] == current["started"] \
        and batches["current"]["ready"] > 0 and not batches["is_last_batch"]


def mark_epoch_unfinished(checkpoint: dict[str, Any]) -> bool:
    """Rewrite an epoch that was cut short (see `epoch_cut_short`) as one still running, the state a
    checkpoint written after that batch has; return whether anything changed."""
    if not epoch_cut_short(checkpoint):
        return False
    progress = checkpoint["loops"]["fit_loop"]["epoch_progress"]
    for counts in (progress["current"], progress["total"]):
        counts["processed"] = counts["completed"] = counts["started"] - 1
    return True


def finished_epochs(checkpoint: dict[str, Any]) -> int:
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress")
    if not progress:
        return int(checkpoint.get("epoch", 0))
    return int(progress["current"]["processed"]) - int(epoch_cut_short(checkpoint))


def rng_states() -> dict[str, Any]:
    """The process's random generators (dropout draws from torch's), as tensors and plain containers."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ExactResume(L.Callback):
    """A resumed run continues as the uninterrupted run would have.

    - A checkpoint written when `max_steps` stopped mid-epoch is marked as mid-epoch (on save, and on load
      for files written without this callback), so fit continues that epoch; the datamodule skips the
      records already seen (`RerankDataModule.state_dict`).
    - The random generators (dropout, LoRA dropout) are saved with the checkpoint and restored when
      training starts, after the dataloader has drawn its own seed as it did in the uninterrupted run.
    - The learning rate of the first resumed step follows the resumed run's schedule: a `LambdaLR` rebuilt
      for a new `max_steps` restores its step count, but the optimizer would keep the old run's last rate.
    """

    def __init__(self) -> None:
        self._restored_rng: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_rng = state_dict.get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._restored_rng is None:
            return
        set_rng_states(self._restored_rng)
        self._restored_rng = None
        for config in trainer.lr_scheduler_configs:
            schedule = config.scheduler
            if isinstance(schedule, torch.optim.lr_scheduler.LambdaLR):
                for group, base, factor in zip(schedule.optimizer.param_groups, schedule.base_lrs,
                                               schedule.lr_lambdas):
                    group["lr"] = base * factor(schedule.last_epoch)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        mark_epoch_unfinished(checkpoint)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if mark_epoch_unfinished(checkpoint):
            log.info("epoch %d of the checkpoint was cut short by max_steps: resuming inside it",
                     checkpoint.get("epoch", 0))


def check_resume(ckpt_path: str | os.PathLike, max_steps: int | None, max_epochs: int | None) -> dict[str, Any]:
    """Validate `ckpt_path` for `trainer.fit` before any model is loaded; return the checkpoint (memory-mapped).

    A resume that would train nothing (the checkpoint is at or past `max_steps`, or has finished
    `max_epochs`) is an error, as is any file `read_checkpoint` refuses.
    """
    path = Path(ckpt_path)
    if path.parent.is_dir():
        remove_orphans(path.parent)
    checkpoint = read_checkpoint(path)
    step, epochs = int(checkpoint["global_step"]), finished_epochs(checkpoint)
    if max_steps is not None and 0 <= max_steps <= step:
        raise CheckpointError(f"ckpt_path {path} is at step {step} and trainer.max_steps={max_steps}: nothing left "
                              f"to train; raise trainer.max_steps to continue")
    if max_epochs is not None and 0 <= max_epochs <= epochs:
        raise CheckpointError(f"ckpt_path {path} has finished {epochs} epoch(s) and trainer.max_epochs={max_epochs}: "
                              f"nothing left to train; raise trainer.max_epochs to continue")
    return checkpoint
