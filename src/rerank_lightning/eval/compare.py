"""Paired comparison of rankers query by query: the mean change of a metric with a paired bootstrap 95%
interval, and how many queries got better or worse.

`rerank-lightning compare BASE.csv OTHER.csv [OTHER.csv ...]` reads the per-query files
`rerank-lightning evaluate --per-query` writes (a `qid` column and one column per metric); the
Matryoshka grid comparison (`matryoshka-compare`) uses the same `paired_change`.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..data.records import DataFormatError


def paired_change(base: Mapping[str, float], other: Mapping[str, float], samples: int = 2000,
                  seed: int = 0) -> dict[str, Any]:
    """`other` minus `base` over the same queries ({qid: value} each).

    change: the mean of the per-query differences; ci95_low/ci95_high: the 2.5% and 97.5% quantiles of
    that mean over `samples` resamples of the queries with replacement (seeded); better/worse/same: the
    queries whose value went up, down or stayed.
    """
    if set(base) != set(other):
        only = sorted(set(base) ^ set(other))
        raise DataFormatError(f"the two sides hold different queries ({len(only)} in one only, e.g. {only[0]!r})")
    if not base:
        raise DataFormatError("no query to compare")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    qids = sorted(base)
    diff = torch.tensor([other[q] - base[q] for q in qids], dtype=torch.float64)
    picks = torch.randint(len(qids), (samples, len(qids)), generator=torch.Generator().manual_seed(seed))
    boot = diff[picks].mean(dim=1)
    return {"queries": len(qids), "base": sum(base[q] for q in qids) / len(qids),
            "other": sum(other[q] for q in qids) / len(qids), "change": float(diff.mean()),
            "ci95_low": float(boot.quantile(0.025)), "ci95_high": float(boot.quantile(0.975)),
            "better": int((diff > 0).sum()), "worse": int((diff < 0).sum()), "same": int((diff == 0).sum())}


def write_per_query(path: str | Path, qids: Sequence[str], metrics: Mapping[str, torch.Tensor]) -> Path:
    """One row per query: qid, then each metric (as `evaluate --json` names them), exact floats."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(metrics)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["qid", *names])
        for i, qid in enumerate(qids):
            writer.writerow([qid, *(repr(float(metrics[name][i])) for name in names)])
    return path


def read_per_query(path: str | Path, metric: str) -> dict[str, float]:
    """{qid: value of `metric`} from a per-query CSV; a malformed file is a one-line error."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        if "qid" not in fields or metric not in fields:
            raise DataFormatError(f"{path}:1: expected columns 'qid' and {metric!r}, got {fields}")
        values: dict[str, float] = {}
        for lineno, row in enumerate(reader, start=2):
            qid = row["qid"]
            if qid in values:
                raise DataFormatError(f"{path}:{lineno}: qid {qid!r} appears twice")
            try:
                value = float(row[metric])
            except (TypeError, ValueError):
                raise DataFormatError(f"{path}:{lineno}: field {metric!r}: expected a number, "
                                      f"got {row[metric]!r}") from None
            if not math.isfinite(value):
                raise DataFormatError(f"{path}:{lineno}: field {metric!r}: expected a finite number, got {value}")
            values[qid] = value
    if not values:
        raise DataFormatError(f"{path}: no query rows")
    return values


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    fields = list(rows[0])
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in fields) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _resamples(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 resample, got {value}")
    return value


def add_bootstrap_options(parser: argparse.ArgumentParser) -> None:
    """--metric, --samples and --seed: what `paired_change` compares and how it resamples."""
    parser.add_argument("--metric", default="nDCG@10", help="the per-query metric column to compare (default: nDCG@10)")
    parser.add_argument("--samples", type=_resamples, default=2000, help="bootstrap resamples (default: 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling (default: 0)")


def compare_files(base: str | Path, others: Sequence[str | Path], metric: str = "nDCG@10", samples: int = 2000,
                  seed: int = 0) -> list[dict[str, Any]]:
    """One row per file of `others`: its paired change against `base` on `metric`."""
    base_values = read_per_query(base, metric)
    rows = []
    for other in others:
        change = paired_change(base_values, read_per_query(other, metric), samples, seed)
        rows.append({"system": str(other), metric: change.pop("other"), f"{metric} base": change.pop("base"),
                     **change})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rerank-lightning compare",
        description="Compare rankers query by query against a baseline, from the per-query CSV files "
                    "`rerank-lightning evaluate --per-query` writes: per file, the mean of a metric, its mean "
                    "change against BASE with a paired bootstrap 95%% interval (queries resampled), and how "
                    "many queries got better, worse or stayed the same. The files must hold the same queries.",
        epilog="example:\n  rerank-lightning evaluate --first-stage --beir DIR --run bm25.trec --split dev "
               "--per-query bm25.csv\n  rerank-lightning evaluate EXPORT --beir DIR --run bm25.trec --split dev "
               "--per-query model.csv\n  rerank-lightning compare bm25.csv model.csv",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", metavar="BASE.csv", help="per-query metrics of the baseline")
    parser.add_argument("others", nargs="+", metavar="OTHER.csv", help="per-query metrics of each ranker compared")
    add_bootstrap_options(parser)
    parser.add_argument("--out", metavar="OUT.md", help="also write the table to this file")
    args = parser.parse_args(argv)
    text = markdown_table(compare_files(args.base, args.others, args.metric, args.samples, args.seed))
    if args.out:
        Path(args.out).write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    from ..cli import main as cli_main

    sys.exit(cli_main(["compare", *sys.argv[1:]]))
