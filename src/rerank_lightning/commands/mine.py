"""rerank-lightning mine: hard negatives from BM25 (or any TREC run) into FlagEmbedding JSONL.

  rerank-lightning mine --beir DIR [--split train] --out train.jsonl [--run RUN.trec]
      [--range 10-100] [--negatives 15] [--min-grade 1] [--max-negative-grade G] [--seed 42]
      [--judged-only] [--grades] [--teacher EXPORT_OR_HF_DIR [--teacher-margin 0]]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from ..data.beir import read_beir, read_run
from ..data.mining import MiningReport, MiningSettings, bm25_run, mine
from ..data.records import DataFormatError


def rank_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO-HI (e.g. 10-100), got {text!r}") from None
    return lo, hi


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rerank-lightning mine", description=__doc__.splitlines()[0])
    p.add_argument("--beir", required=True, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    p.add_argument("--split", default="test", help="qrels split whose queries are mined (default: test)")
    p.add_argument("--out", required=True, help="output JSONL (FlagEmbedding records plus qid, pos_ids, neg_ids)")
    p.add_argument("--run", help="TREC run to take candidates from (default: BM25 over the corpus with bm25s)")
    p.add_argument("--range", type=rank_range, default=(10, 100), dest="rank_range",
                   help="1-based ranks LO-HI (both included) to sample negatives from (default: 10-100)")
    p.add_argument("--negatives", type=int, default=15, help="negatives per query (default: 15)")
    p.add_argument("--min-grade", type=int, default=1, help="a positive is judged >= this (default: 1; TREC DL: 2)")
    p.add_argument("--max-negative-grade", type=int, default=None,
                   help="also never a negative: a judged doc above this grade (e.g. 0: only unjudged or judged 0)")
    p.add_argument("--judged-only", action="store_true", help="negatives only among judged documents")
    p.add_argument("--grades", action="store_true", help="write pos_grades / neg_grades (judged grades)")
    p.add_argument("--seed", type=int, default=42,
                   help="negatives are sampled per query from this seed and the qid (default: 42)")
    p.add_argument("--teacher", help="false-negative filter: a reranker export or HF directory (see score-teacher)")
    p.add_argument("--teacher-margin", type=float, default=0.0,
                   help="drop a negative the teacher scores above (lowest positive - margin) (default: 0)")
    p.add_argument("--teacher-prompt", default=None, help="prompt for a plain HF yes/no causal LM teacher")
    p.add_argument("--batch-size", type=int, default=16, help="teacher batch size")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in logs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = MiningSettings(negatives=args.negatives, rank_range=args.rank_range, min_grade=args.min_grade,
                                  max_negative_grade=args.max_negative_grade, judged_only=args.judged_only, seed=args.seed,
                                  write_grades=args.grades, teacher_margin=args.teacher_margin)
        collection = read_beir(args.beir, args.split)
        qids = sorted(collection.qrels)
        if args.run:
            run = read_run(args.run, collection.corpus)
        else:
            run = bm25_run(collection, qids, settings.rank_range[1], progress=not args.no_progress)
        teacher = None
        if args.teacher:
            from ..inference.teacher import load_teacher

            scorer = load_teacher(args.teacher, prompt=args.teacher_prompt, batch_size=args.batch_size)
            teacher = lambda query, passages: scorer.score([(query, p) for p in passages])  # noqa: E731
        report = MiningReport()
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".part")
        with tmp.open("w", encoding="utf-8") as fh:
            for record in mine(collection, run, settings, teacher, progress=not args.no_progress, report=report):
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        tmp.replace(out)
    except (DataFormatError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{report.line(settings)} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
