"""Evaluate an exported reranker (SPEC 8) on candidate lists or on a BEIR folder plus a first-stage run:
`python -m rerank_lightning.eval.evaluate EXPORT_DIR CANDIDATES.jsonl [--k 10] [--relevance-threshold 1]`
`python -m rerank_lightning.eval.evaluate EXPORT_DIR BEIR_DIR --run RUN.trec [--split test] [--top-k 100]`."""

from __future__ import annotations

import argparse
import json
from typing import Sequence

import torch

from ..data.candidates import CandidateList, load_beir_rerank, load_candidate_lists
from .metrics import docid_tie_order, per_query_metrics_from_rows


def metrics_for_scores(lists: Sequence[CandidateList], scores: Sequence[float], k: int = 10,
                       relevance_threshold: float = 1) -> dict[str, float]:
    """Mean MRR@k, nDCG@k and MAP of one score per candidate (the lists flattened in order)."""
    per_query = per_query_metrics_for_scores(lists, scores, k, relevance_threshold)
    return {name: float(v.mean()) for name, v in per_query.items()}


def default_device(name: str | None = None) -> torch.device:
    """The device named, else the first GPU when there is one, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def per_query_metrics_for_scores(lists: Sequence[CandidateList], scores: Sequence[float], k: int = 10,
                                 relevance_threshold: float = 1) -> dict[str, torch.Tensor]:
    """{metric: [Q] float32} per query, in the order of `lists` (`ranking_metrics`' values)."""
    if len(scores) != sum(len(cl.labels) for cl in lists):
        raise ValueError(f"{len(scores)} scores for {sum(len(cl.labels) for cl in lists)} candidates")
    ties = docid_tie_order([list(cl.docids) for cl in lists])
    keys = [(qi, ci, label, int(ties[qi, ci])) for qi, cl in enumerate(lists) for ci, label in enumerate(cl.labels)]
    rows = torch.tensor([(*key, score) for key, score in zip(keys, scores)], dtype=torch.float64)
    return per_query_metrics_from_rows(rows, k, relevance_threshold)


def evaluate(reranker, lists: Sequence[CandidateList], k: int = 10, relevance_threshold: float = 1,
             progress: bool | None = None) -> dict[str, float]:
    """Mean MRR@k, nDCG@k and MAP of `reranker.score` over the candidate lists."""
    pairs = [(cl.query, text) for cl in lists for text in cl.texts]
    return metrics_for_scores(lists, reranker.score(pairs, progress=progress), k, relevance_threshold)


def main(argv: Sequence[str] | None = None) -> None:
    from ..inference import Reranker

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("candidates", help="candidate-list JSONL, or a BEIR folder with --run")
    parser.add_argument("--run", help="TREC run file to rerank (with a BEIR folder)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--relevance-threshold", type=float, default=1)
    parser.add_argument("--max-queries", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    args = parser.parse_args(argv)
    reranker = Reranker.from_pretrained(args.model_dir, device=default_device(args.device), batch_size=args.batch_size)
    if args.run:
        lists = load_beir_rerank(args.candidates, args.run, args.split, args.top_k)[: args.max_queries]
    else:
        lists = load_candidate_lists(args.candidates, args.max_queries)
    print(json.dumps(evaluate(reranker, lists, args.k, args.relevance_threshold, progress=True), indent=2))


if __name__ == "__main__":
    main()
