"""Run the project's commands as a user does (a subprocess) and check how they fail.

Shared by the bad-input tests: every malformed input must end in exactly one `error: ...` line on
stderr, exit code 2, and no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train.py"
# `~logger` drops the logger group; no export and no validation keep a failing run short.
TRAIN_FAST = ["model=tiny", "~logger", "export.enabled=false", "data.val_data=null", "trainer.max_steps=1"]


def user_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a user's shell: offline, no W&B service inherited from this process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HYDRA_FULL_ERROR": "0",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    env.pop("WANDB_SERVICE", None)
    env.update(extra)
    return env


def run_module(module: str, args: list[str], tmp_path: Path, timeout: float = 240,
               **env: str) -> subprocess.CompletedProcess:
    """`python -m module args...` in `tmp_path`."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=user_env(tmp_path, **env),
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def run_train(args: list[str], tmp_path: Path, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """`python train.py args...` with its run folder under `tmp_path`."""
    args = [*map(str, args), f"hydra.run.dir={tmp_path / 'run'}"]
    return subprocess.run([sys.executable, str(TRAIN), *args], env=user_env(tmp_path, **env),
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\n--- stdout (tail)\n{proc.stdout[-2000:]}\n--- stderr (tail)\n{proc.stderr[-3000:]}"


def error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Assert a clean user error (exit 2, no traceback, exactly one `error:` line holding every fragment)
    and return that line."""
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, describe(proc)
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]
