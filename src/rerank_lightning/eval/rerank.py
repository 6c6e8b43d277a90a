"""`rerank-lightning rerank`: rerank a first-stage TREC run with an exported reranker; write a TREC run."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from ..data.beir import trec_order
from ..data.candidates import CandidateList, load_beir_rerank

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_reranker_options(parser: argparse.ArgumentParser) -> None:
    """--batch-size, --device and --dtype: how a command runs an exported reranker (`load_reranker`)."""
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per forward pass (default: 16)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                        help="weights' dtype (default: auto, as saved in the export)")


def load_reranker(model_dir: str | Path, args: argparse.Namespace):
    """The export at `model_dir`, run as `add_reranker_options`' arguments say."""
    from ..inference import Reranker

    return Reranker.from_pretrained(model_dir, device=args.device, dtype=DTYPES[args.dtype],
                                    batch_size=args.batch_size)


def ranked_run(lists: Sequence[CandidateList], scores: Sequence[float]) -> dict[str, list[tuple[float, str]]]:
    """{qid: [(score, docid), ...]} in trec_eval's rank order, one score per candidate (lists flattened)."""
    if len(scores) != sum(len(cl.docids) for cl in lists):
        raise ValueError(f"{len(scores)} scores for {sum(len(cl.docids) for cl in lists)} candidates")
    run, start = {}, 0
    for cl in lists:
        run[cl.qid] = trec_order(list(zip(map(float, scores[start : start + len(cl.docids)]), cl.docids)))
        start += len(cl.docids)
    return run


def write_trec_run(path: str | Path, run: dict[str, list[tuple[float, str]]], tag: str = "rerank-lightning") -> Path:
    """`qid Q0 docid rank score tag` lines, ranks from 1; scores written exactly (repr), so trec_eval
    reading them ranks as the metrics did."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for qid, ranked in run.items():
            for rank, (score, docid) in enumerate(ranked, start=1):
                fh.write(f"{qid} Q0 {docid} {rank} {score!r} {tag}\n")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rerank-lightning rerank",
        description=textwrap.fill(width=90, text="Rerank a first-stage TREC run with an exported reranker and write the reranked run "
                    "('qid Q0 docid rank score tag' per line, best first). Queries and passage texts come from "
                    "a BEIR folder (corpus.jsonl: {_id, title, text}; queries.jsonl: {_id, text}); qrels are "
                    "not needed. A passage is 'title text' when it has a title."),
        epilog="example:\n  rerank-lightning rerank EXPORT --beir trec_dl20 --run bm25.trec --out reranked.trec",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", metavar="EXPORT",
                        help="exported reranker: the directory train.py or `rerank-lightning export` writes")
    parser.add_argument("--beir", required=True, metavar="DIR", help="BEIR folder with corpus.jsonl and queries.jsonl")
    parser.add_argument("--run", required=True, metavar="RUN.trec",
                        help="first-stage run ('qid Q0 docid rank score tag'; the rank column is ignored)")
    parser.add_argument("--out", required=True, metavar="OUT.trec", help="where to write the reranked run")
    parser.add_argument("--top-k", type=int, default=100, metavar="K", help="rerank each query's first K run documents "
                        "(by run score, ties by docid as trec_eval); the rest are left out (default: 100)")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                        help="run lines naming a query or document missing from the BEIR folder, duplicate or "
                             "malformed run lines: stop with an error (raise, default) or skip them and print "
                             "how many")
    add_reranker_options(parser)
    parser.add_argument("--tag", default="rerank-lightning",
                        help="the run's name, written in the last column (default: rerank-lightning)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    skipped: Counter = Counter()
    lists = load_beir_rerank(args.beir, args.run, split=None, top_k=args.top_k, on_error=args.on_error,
                             skipped=skipped)
    pairs = [(cl.query, text) for cl in lists for text in cl.texts]
    scores = load_reranker(args.model_dir, args).score(pairs, progress=True)
    out = write_trec_run(args.out, ranked_run(lists, scores), args.tag)
    if skipped:
        print(f"skipped: {', '.join(f'{n} {what}' for what, n in skipped.items())}", file=sys.stderr)
    print(f"reranked {len(lists)} queries, {len(scores)} passages: {out}")
    return 0


if __name__ == "__main__":
    from ..cli import main as cli_main

    sys.exit(cli_main(["rerank", *sys.argv[1:]]))
