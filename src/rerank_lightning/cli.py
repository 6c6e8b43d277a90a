"""`rerank-lightning COMMAND ...`: one console entry point over thin command modules.

Each command is a module function `main(argv) -> int` with its own argparse parser; this module only
dispatches and turns a user's mistake (bad data, a missing file, unavailable weights) into one
`error: ...` line and exit code 2, in one place.
"""

from __future__ import annotations

import importlib
import os
import runpy
import sys
from pathlib import Path
from typing import Sequence

# name -> ("module:function", one-line help). A new command is one row here.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("rerank_lightning.cli:train_main", "train a reranker: Hydra overrides as for `python train.py`"),
    "export": ("rerank_lightning.inference.export:main",
               "write a Hugging Face directory from a training checkpoint"),
    "rerank": ("rerank_lightning.eval.rerank:main", "rerank a TREC run (BEIR folder texts) and write a TREC run"),
    "evaluate": ("rerank_lightning.eval.evaluate:main",
                 "metrics of an export on candidate lists or a BEIR folder + run (trec_eval semantics)"),
    "mine": ("rerank_lightning.commands.mine:main",
             "hard negatives from BM25 or a TREC run into FlagEmbedding training JSONL"),
    "score-teacher": ("rerank_lightning.commands.score_teacher:main",
                      "add teacher scores (pos_scores/neg_scores) to training JSONL with any loadable reranker"),
    "compare": ("rerank_lightning.eval.compare:main",
                "compare rankers query by query against a baseline (paired bootstrap interval)"),
    "matryoshka-grid": ("rerank_lightning.eval.matryoshka_grid:main",
                        "Matryoshka export: quality against cost over exit layers x compression ratios"),
    "matryoshka-compare": ("rerank_lightning.eval.matryoshka_grid:compare_main",
                           "pair two Matryoshka grids query by query (change with a bootstrap interval)"),
}


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user's input is wrong, not the program (imported only when one is raised)."""
    from .checkpoints import CheckpointError
    from .data.formatting import FormatConfigError
    from .data.records import DataFormatError
    from .model.backbone import WeightsUnavailableError

    return (CheckpointError, DataFormatError, FormatConfigError, WeightsUnavailableError, FileNotFoundError, IsADirectoryError,
            NotADirectoryError, PermissionError)


def _message(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}"
    return str(err)


def run_command(name: str, argv: Sequence[str]) -> int:
    """Run one command of COMMANDS; a user error becomes `error: ...` on stderr and exit code 2."""
    module, function = COMMANDS[name][0].split(":")
    try:
        code = getattr(importlib.import_module(module), function)(list(argv))
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2, its message already printed)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except Exception as err:
        if not isinstance(err, user_errors()):
            raise
        print(f"error: {_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: rerank-lightning {name} interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


def project_root() -> Path:
    """The checkout the package runs from (train.py, conf/ and src/ side by side)."""
    return Path(os.environ.get("PROJECT_ROOT") or Path(__file__).resolve().parents[2])


def train_main(argv: Sequence[str] | None = None) -> int:
    """`python train.py ARGS` exactly (Hydra reads sys.argv; its config_path is relative to train.py).

    Needs the source checkout: an editable install (`pip install -e .`) has it; a wheel does not ship
    train.py and conf/, so there the command says so.
    """
    train_py = project_root() / "train.py"
    if not train_py.is_file() or not (train_py.parent / "conf").is_dir():
        print(f"error: `rerank-lightning train` needs the project's checkout (train.py and conf/), not found at "
              f"{train_py.parent}: install with `pip install -e .` from the checkout, or set PROJECT_ROOT",
              file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = [str(train_py), *(sys.argv[2:] if argv is None else argv)]
    try:
        runpy.run_path(str(train_py), run_name="__main__")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
    return (f"usage: rerank-lightning COMMAND [ARGS...]\n\nFine-tune, export, rerank with and evaluate LLM "
            f"rerankers.\n\ncommands:\n{rows}\n\n`rerank-lightning COMMAND --help` explains a command's options.")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run_command(name, rest)


if __name__ == "__main__":
    sys.exit(main())
