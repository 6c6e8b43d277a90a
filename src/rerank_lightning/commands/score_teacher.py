"""rerank-lightning score-teacher: add pos_scores / neg_scores from a teacher reranker to training JSONL.

  rerank-lightning score-teacher EXPORT_OR_HF_DIR IN.jsonl OUT.jsonl [--kind auto] [--prompt P]
      [--batch-size 16] [--device cpu]

Resumable: run it again with the same OUT and it continues after the records already written.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..data.records import DataFormatError
from ..inference.teacher import TEACHER_KINDS, check_records, load_teacher, score_records


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rerank-lightning score-teacher", description=__doc__.splitlines()[0])
    p.add_argument("teacher", help="a reranker export, a HF causal LM (yes/no) or a HF sequence-classification model")
    p.add_argument("input", help="training JSONL in FlagEmbedding's layout (query, pos, neg per line)")
    p.add_argument("output", help="the same records with pos_scores / neg_scores")
    p.add_argument("--kind", choices=TEACHER_KINDS, default="auto",
                   help="auto: export if it has reranker_config.json, cross-encoder if its architecture is "
                        "*ForSequenceClassification, else causal-lm")
    p.add_argument("--prompt", default=None, help="causal-lm: the prompt after the pair "
                   "(default: the instruction recipe's yes/no prompt)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per forward pass (default: 16)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in logs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from ..inference.reranker import default_device

    device = default_device(args.device)
    try:
        check_records(args.input)  # a bad record fails before the model loads
        scorer = load_teacher(args.teacher, args.kind, args.prompt, args.batch_size, device=device)
        scored, kept = score_records(scorer, args.input, args.output, progress=not args.no_progress)
    except (DataFormatError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"score-teacher: {scored} records scored, {kept} already in {args.output} kept -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
