"""Checkpoints a user relies on: resuming continues exactly, a save killed midway leaves no broken file,
and a missing, truncated, foreign or crafted checkpoint ends in one error line without running its code.

The runs go through `train.py` and `python -m rerank_lightning.inference.export` as a user types them.
"""

from __future__ import annotations

import enum
import os
import pickle
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch

from cli_run import ROOT, describe, error_line, run_module, run_train, user_env
from rerank_lightning.checkpoints import AtomicCheckpointIO, CheckpointError, read_checkpoint

EXPORT = "rerank_lightning.inference.export"
# Dropout on, so that an exact resume also needs the random generators back; 12 records x 2 a batch = 6 steps an epoch.
RUN = ["model=tiny", "+model.random_init.attention_dropout=0.1", "data.val_data=null", "export.enabled=false",
       "~logger", "trainer.enable_progress_bar=false", "~callbacks.progress_bar", "+trainer.enable_model_summary=false",
       "data.max_example_num_per_dataset=12", "data.batch_size=2", "seed=0"]


class StepLog(L.Callback):
    """Per global step (0-based, the step about to run): loss, learning rate and a fingerprint of the batch."""

    last: "StepLog"

    def __init__(self):
        self.losses, self.lrs, self.batches = {}, {}, {}
        StepLog.last = self

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step
        self.lrs[self._step] = trainer.optimizers[0].param_groups[0]["lr"]
        self.batches[self._step] = batch["pair"]["input_ids"].tolist()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[self._step] = float(outputs["loss"])


def fit(run_dir: Path, *args: str) -> StepLog:
    """train.py's `train(cfg)` in this process, with a StepLog; returns it."""
    from distributed.cases import compose
    from rerank_lightning.train import train

    train(compose([*RUN, *args, f"+callbacks.step_log._target_={__name__}.StepLog",
                   f"hydra.runtime.output_dir={run_dir}"]))
    return StepLog.last


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def same_weights(a: Path, b: Path) -> None:
    got, want = weights(a), weights(b)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """The run folder of `train.py trainer.max_steps=2`: stopped by max_steps in the middle of its first epoch."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    fit(run, "trainer.max_steps=2")
    return run


def test_resume_from_last_ckpt_of_a_max_steps_run_continues_the_epoch(stopped, tmp_path):
    """The default checkpoint of a max_steps run (last.ckpt, written at the epoch end that max_steps cut short)
    resumes inside the epoch: to max_steps=4 it trains steps 3 and 4 on the batches, and at the learning
    rates, of a straight 4-step run (the weights differ: the 2-step run decayed its rate to 0 by step 2)."""
    last = stopped / "checkpoints" / "last.ckpt"
    assert last.resolve().name == "step2.ckpt"
    straight = fit(tmp_path / "straight", "trainer.max_steps=4")
    resumed = fit(tmp_path / "resumed", "trainer.max_steps=4", f"ckpt_path={last}")
    assert sorted(resumed.losses) == [2, 3]
    assert resumed.batches == {s: straight.batches[s] for s in (2, 3)}
    assert resumed.lrs == {s: straight.lrs[s] for s in (2, 3)}
    assert (tmp_path / "resumed" / "checkpoints" / "step4.ckpt").is_file()


def test_resume_of_an_interrupted_run_is_exact(tmp_path):
    """A run checkpointing every 2 steps, resumed from step 2 to the same max_steps, ends with the losses and
    weights of the uninterrupted run, dropout included."""
    every = ["callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.model_checkpoint.save_top_k=-1"]
    straight = fit(tmp_path / "straight", "trainer.max_steps=4", *every)
    resumed = fit(tmp_path / "resumed", "trainer.max_steps=4", *every,
                  f"ckpt_path={tmp_path / 'straight' / 'checkpoints' / 'step2.ckpt'}")
    assert resumed.losses == {s: straight.losses[s] for s in (2, 3)}
    same_weights(tmp_path / "resumed" / "checkpoints" / "step4.ckpt", tmp_path / "straight" / "checkpoints" / "step4.ckpt")


def test_resume_from_an_epoch_end_continues_with_the_next_epoch(tmp_path):
    """The epoch-end checkpoint of a whole epoch (6 steps) resumes into epoch 2 with trainer.max_epochs=2,
    exactly as a straight 2-epoch run goes on."""
    fit(tmp_path / "first")
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert read_checkpoint(ckpt)["global_step"] == 6
    straight = fit(tmp_path / "straight", "trainer.max_epochs=2")
    resumed = fit(tmp_path / "resumed", "trainer.max_epochs=2", f"ckpt_path={ckpt}")
    assert sorted(resumed.losses) == list(range(6, 12))
    assert resumed.batches == {s: straight.batches[s] for s in range(6, 12)}


def test_resume_with_other_batches_says_so(stopped, tmp_path, caplog):
    """Changed batch size, group size and data: the run goes on, and says it will not see the same batches."""
    last = stopped / "checkpoints" / "last.ckpt"
    fit(tmp_path / "changed", "trainer.max_steps=3", f"ckpt_path={last}", "data.batch_size=3",
        "data.train_group_size=3", "data.max_example_num_per_dataset=13")
    warned = [r.getMessage() for r in caplog.records if "checkpoint of different training" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    for fact in ("batch_size 2 -> 3", "train_group_size 4 -> 3", "num_records 12 -> 13", "train_data"):
        assert fact in warned[0], fact
    caplog.clear()
    fit(tmp_path / "same", "trainer.max_steps=3", f"ckpt_path={last}")
    assert not [r for r in caplog.records if "different training" in r.getMessage()]


@pytest.mark.parametrize("limit, message", [
    ("trainer.max_steps=2", "is at step 2 and trainer.max_steps=2: nothing left to train"),
    ("trainer.max_steps=1", "is at step 2 and trainer.max_steps=1: nothing left to train"),
])
def test_a_resume_that_trains_nothing_is_an_error(stopped, tmp_path, limit, message):
    proc = run_train([*RUN, limit, f"ckpt_path={stopped / 'checkpoints' / 'last.ckpt'}"], tmp_path)
    error_line(proc, "last.ckpt", message)


def test_a_resume_past_max_epochs_is_an_error(tmp_path):
    fit(tmp_path / "first", "data.max_example_num_per_dataset=4")  # 2 steps: one whole epoch
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    proc = run_train([*RUN, "data.max_example_num_per_dataset=4", f"ckpt_path={ckpt}"], tmp_path)
    error_line(proc, "has finished 1 epoch(s) and trainer.max_epochs=1: nothing left to train")


# ---------------------------------------------------------------- files that must not load


class RunsCode:
    """What a crafted checkpoint holds: unpickling it calls os.system."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def crafted(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "global_step": 0, "loops": {}, "hyper_parameters": RunsCode(f"touch {marker}")},
               path)
    return path


def truncated(path: Path, source: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def bad_checkpoints(tmp: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """name: (path, the fragment its error line must hold)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "empty_dir").mkdir(exist_ok=True)
    (tmp / "random.ckpt").write_bytes(os.urandom(4096))
    (tmp / "empty.ckpt").write_bytes(b"")
    (tmp / "text.ckpt").write_text("model weights go here\n")
    torch.save({"weight": torch.zeros(2)}, tmp / "plain_dict.ckpt")
    torch.save(torch.zeros(3), tmp / "tensor.ckpt")
    with zipfile.ZipFile(tmp / "other.zip", "w") as z:
        z.writestr("a.txt", "not a checkpoint")
    return {
        "missing": (tmp / "nope.ckpt", "does not exist"),
        "truncated": (truncated(tmp / "truncated.ckpt", good), "is truncated or not a checkpoint"),
        "random_bytes": (tmp / "random.ckpt", "is truncated or not a checkpoint"),
        "empty_file": (tmp / "empty.ckpt", "is truncated or not a checkpoint"),
        "text_file": (tmp / "text.ckpt", "is truncated or not a checkpoint"),
        "other_zip": (tmp / "other.zip", "is truncated or not a checkpoint"),
        "plain_torch_dict": (tmp / "plain_dict.ckpt", "is not a Lightning checkpoint written by train.py (no state_dict"),
        "a_tensor": (tmp / "tensor.ckpt", "is not a Lightning checkpoint (it holds a Tensor)"),
        "directory_without_checkpoint": (tmp / "empty_dir", "is a directory but not a checkpoint"),
    }


BAD = ["missing", "truncated", "random_bytes", "empty_file", "text_file", "other_zip", "plain_torch_dict", "a_tensor",
       "directory_without_checkpoint"]


@pytest.mark.parametrize("case", BAD)
def test_bad_ckpt_path_is_one_error_line(case, stopped, tmp_path):
    path, fragment = bad_checkpoints(tmp_path / "bad", stopped / "checkpoints" / "step2.ckpt")[case]
    proc = run_train([*RUN, "trainer.max_steps=4", f"ckpt_path={path}"], tmp_path)
    error_line(proc, str(path), fragment)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoint_to_export_is_one_error_line(case, stopped, tmp_path):
    path, fragment = bad_checkpoints(tmp_path / "bad", stopped / "checkpoints" / "step2.ckpt")[case]
    proc = run_module(EXPORT, [path, tmp_path / "out"], tmp_path)
    error_line(proc, str(path), fragment)
    assert not (tmp_path / "out").exists()


def test_a_lightning_checkpoint_of_another_project_does_not_export(stopped, tmp_path):
    ckpt = torch.load(stopped / "checkpoints" / "step2.ckpt", map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"] = {"hidden": 32}
    torch.save(ckpt, tmp_path / "other.ckpt")
    proc = run_module(EXPORT, [tmp_path / "other.ckpt", tmp_path / "out"], tmp_path)
    error_line(proc, "other.ckpt is not a rerank-lightning checkpoint")


def test_crafted_checkpoint_is_refused_and_its_code_does_not_run(tmp_path):
    """A pickle that runs a command when loaded: refused by train.py and by export, the command never runs."""
    marker = tmp_path / "pwned"
    ckpt = crafted(tmp_path / "evil.ckpt", marker)
    sharded = tmp_path / "evil_sharded.ckpt"  # the directory form: meta.pt is a pickle too
    sharded.mkdir()
    crafted(sharded / "meta.pt", marker)
    (sharded / ".metadata").write_bytes(b"")
    for proc in (run_train([*RUN, "trainer.max_steps=4", f"ckpt_path={ckpt}"], tmp_path),
                 run_module(EXPORT, [ckpt, tmp_path / "out"], tmp_path),
                 run_module(EXPORT, [sharded, tmp_path / "out"], tmp_path)):
        error_line(proc, "holds pickled Python objects (posix.system)", "refused")
        assert not marker.exists(), "the crafted checkpoint ran its code"
    with pytest.raises(CheckpointError, match="refused"):
        AtomicCheckpointIO().load_checkpoint(ckpt)
    assert not marker.exists()


def test_a_good_checkpoint_still_exports(stopped, tmp_path):
    proc = run_module(EXPORT, [stopped / "checkpoints" / "last.ckpt", tmp_path / "out"], tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert (tmp_path / "out" / "reranker_config.json").is_file()


# ---------------------------------------------------------------- atomic saves

KILLED_SAVE = """
import sys, time, torch
from rerank_lightning import checkpoints
from rerank_lightning.checkpoints import AtomicCheckpointIO

real_save = torch.save
def slow_save(obj, f):  # the real bytes, but the process is killed half way through writing them
    import io
    buffer = io.BytesIO()
    real_save(obj, buffer)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    print("half written", flush=True)
    time.sleep(600)
checkpoints.torch.save = slow_save
AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1 << 20)}, "global_step": 9, "loops": {}},
                                     sys.argv[1])
"""


@pytest.mark.parametrize("had_previous", [False, True], ids=["first_save", "overwrite"])
def test_a_save_killed_midway_leaves_no_broken_checkpoint(tmp_path, had_previous):
    """kill -9 during a save, with $TMPDIR on another filesystem: the final name holds nothing or the
    previous complete checkpoint; the partial file is removed by the next save."""
    target = tmp_path / "checkpoints" / "last.ckpt"
    if had_previous:
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "global_step": 1, "loops": {}}, target)
    other_fs = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    env = user_env(tmp_path, TMPDIR=str(other_fs), PYTHONPATH=str(ROOT / "src"))
    child = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(target)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "half written", child.stderr.read()
        partial = list(target.parent.glob(".*partial"))
        assert len(partial) == 1 and partial[0].stat().st_size > 0
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    if had_previous:
        assert read_checkpoint(target)["global_step"] == 1  # the old checkpoint, whole
    else:
        assert not target.exists()
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "global_step": 2, "loops": {}}, target)
    assert read_checkpoint(target)["global_step"] == 2
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # the orphan is gone


class EnumsByName(pickle.Pickler):
    """Pickles an enum member as Python 3.11.0 to 3.11.4 do (Debian 12's python3 is 3.11.2): getattr(its
    class, its name)."""

    def reducer_override(self, obj):
        return (getattr, (type(obj), obj.name)) if isinstance(obj, enum.Enum) else NotImplemented


class GetsAttribute:
    """A pickle that asks builtins.getattr for something other than a checkpoint enum's member."""

    def __init__(self, owner, name: str):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def sharded_checkpoint(path: Path) -> Path:
    """A sharded checkpoint's layout, as train.py writes it under FSDP: torch.distributed.checkpoint's
    shards and `.metadata` index, and Lightning's metadata file beside them."""
    import torch.distributed.checkpoint as dcp

    from rerank_lightning.strategies import CHECKPOINT_METADATA

    dcp.save({"weight": torch.arange(6.0).view(2, 3)}, checkpoint_id=path, no_dist=True)
    torch.save({"global_step": 2, "loops": {}}, path / CHECKPOINT_METADATA)
    return path


def test_a_sharded_index_pickled_by_python_3_11_2_is_read_and_only_its_enums_pass(tmp_path):
    """The index of a sharded checkpoint saved under Python 3.11.0-3.11.4 holds builtins.getattr (how those
    releases pickle the enum in torch's tensor metadata): resume and export read it, while a getattr for
    anything but a member of the checkpoint metadata's enums is refused by name."""
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    ckpt = sharded_checkpoint(tmp_path / "step2.ckpt")
    index_path = ckpt / ".metadata"
    index = pickle.loads(index_path.read_bytes())  # written by torch.distributed.checkpoint just above
    with index_path.open("wb") as f:
        EnumsByName(f).dump(index)
    assert b"getattr" in index_path.read_bytes()
    assert read_checkpoint(ckpt)["global_step"] == 2
    for owner, name in ((Path, "home"), (_MEM_FORMAT_ENCODING, "__class__"), (torch.Size, "__new__")):
        index_path.write_bytes(pickle.dumps(GetsAttribute(owner, name)))
        with pytest.raises(CheckpointError, match=r"holds pickled Python objects \(builtins\.getattr\), not only "
                                                  r"checkpoint metadata: refused"):
            read_checkpoint(ckpt)
