"""`rerank-lightning evaluate`: metrics of an exported reranker on candidate lists or on a BEIR folder
plus a first-stage run, with trec_eval's semantics (SPEC 8)."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from ..data.candidates import CandidateList, docid_tie_order, load_beir_rerank, load_candidate_lists, query_judgements
from .compare import write_per_query
from .metrics import DEFAULT_METRICS, per_query_metrics_from_rows
from .rerank import add_reranker_options, load_reranker, ranked_run, write_trec_run


def metrics_for_scores(lists: Sequence[CandidateList], scores: Sequence[float], k: int = 10,
                       relevance_threshold: float = 1, recall_k: int = 100) -> dict[str, float]:
    """Mean metrics (`ranking_metrics`' names) of one score per candidate (the lists flattened in order)."""
    per_query = per_query_metrics_for_scores(lists, scores, k, relevance_threshold, recall_k)
    return {name: float(v.mean()) for name, v in per_query.items()}


def per_query_metrics_for_scores(lists: Sequence[CandidateList], scores: Sequence[float], k: int = 10,
                                 relevance_threshold: float = 1, recall_k: int = 100) -> dict[str, torch.Tensor]:
    """{metric: [Q] float32} per query, in the order of `lists`; with the lists' full qrels where they have
    them (BEIR + run), so the values are trec_eval's on the run these scores make."""
    if len(scores) != sum(len(cl.labels) for cl in lists):
        raise ValueError(f"{len(scores)} scores for {sum(len(cl.labels) for cl in lists)} candidates")
    ties = docid_tie_order([list(cl.docids) for cl in lists])
    keys = [(qi, ci, label, int(ties[qi, ci])) for qi, cl in enumerate(lists) for ci, label in enumerate(cl.labels)]
    rows = torch.tensor([(*key, score) for key, score in zip(keys, scores)], dtype=torch.float64)
    return per_query_metrics_from_rows(rows, k, relevance_threshold, DEFAULT_METRICS, recall_k=recall_k,
                                       **query_judgements(list(lists)))


def evaluate(reranker, lists: Sequence[CandidateList], k: int = 10, relevance_threshold: float = 1,
             progress: bool | None = None, recall_k: int = 100) -> dict[str, float]:
    """Mean metrics of `reranker.score` over the candidate lists."""
    pairs = [(cl.query, text) for cl in lists for text in cl.texts]
    return metrics_for_scores(lists, reranker.score(pairs, progress=progress), k, relevance_threshold, recall_k)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rerank-lightning evaluate",
        description=textwrap.fill(width=90, text="Rerank candidates with an exported reranker and print its metrics as JSON: nDCG@k, "
                    "RR@k (also printed as MRR@k), MAP, Recall@N (--recall-k) and Judged@k, computed as trec_eval does. "
                    "With --beir/--run the full qrels of each query count (relevant documents the run missed "
                    "lower nDCG, MAP and Recall), so the numbers equal trec_eval's on the reranked run "
                    "(--run-out). With a candidate-list file the candidates' labels are the only judgements. "
                    "--first-stage evaluates the run itself (no EXPORT), the baseline the reranker is compared "
                    "with; --per-query writes each query's metrics for `rerank-lightning compare`."),
        epilog="examples:\n  rerank-lightning evaluate EXPORT data/sample/val_candidates.jsonl\n"
               "  rerank-lightning evaluate EXPORT --beir trec_dl20 --run bm25.trec --relevance-threshold 2 "
               "--json metrics.json --run-out reranked.trec\n"
               "  rerank-lightning evaluate --first-stage --beir trec_dl20 --run bm25.trec --relevance-threshold 2 "
               "--per-query bm25.csv",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?", metavar="EXPORT",
                        help="exported reranker: the directory train.py or `rerank-lightning export` writes "
                             "(none with --first-stage)")
    parser.add_argument("candidates", nargs="?", metavar="CANDIDATES.jsonl",
                        help="candidate lists, one query per line: {qid, query, candidates: [{docid, text, label}]}")
    parser.add_argument("--beir", metavar="DIR", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv); "
                        "give it with --run instead of CANDIDATES.jsonl")
    parser.add_argument("--run", metavar="RUN.trec", help="first-stage TREC run to rerank "
                        "('qid Q0 docid rank score tag' per line; the rank column is ignored, as in trec_eval)")
    parser.add_argument("--split", default="test", help="qrels split: reads DIR/qrels/SPLIT.tsv (default: test)")
    parser.add_argument("--top-k", type=int, default=100, metavar="K", help="rerank each query's first K run documents "
                        "(by run score, ties by docid as trec_eval; default: 100); the rest are left out")
    parser.add_argument("--first-stage", action="store_true",
                        help="evaluate the run as it is, by its own scores (no reranker, no EXPORT): the "
                             "baseline at the same --top-k, same metrics")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                        help="run lines naming a query or document missing from the BEIR folder, duplicate or "
                             "malformed run lines: stop with an error (raise, default) or skip them, counted in "
                             "the output's 'skipped'")
    parser.add_argument("--k", type=int, default=10, help="cut-off of nDCG, RR and Judged (default: 10)")
    parser.add_argument("--recall-k", type=int, default=100, help="cut-off of Recall (default: 100)")
    parser.add_argument("--relevance-threshold", type=float, default=1,
                        help="grade from which a document counts as relevant for RR, MAP and Recall "
                             "(trec_eval -l; TREC DL uses 2; default: 1). nDCG uses the grades themselves")
    parser.add_argument("--max-queries", type=int, default=None, help="evaluate only the first N queries")
    add_reranker_options(parser)
    parser.add_argument("--json", metavar="OUT.json", help="also write the metrics to this file")
    parser.add_argument("--per-query", metavar="OUT.csv",
                        help="also write each query's metrics (qid, then one column per metric) to this file, "
                             "for `rerank-lightning compare`")
    parser.add_argument("--run-out", metavar="OUT.trec",
                        help="also write the reranked run (the evaluated queries) as a TREC run, e.g. for trec_eval")
    return parser


def load_lists(args: argparse.Namespace, parser: argparse.ArgumentParser,
               skipped: Counter) -> list[CandidateList]:
    """The candidate lists the arguments name (a candidate-list file, or a BEIR folder and a run)."""
    beir = args.beir
    if args.first_stage:
        if args.model_dir or args.candidates or not (args.beir and args.run):
            parser.error("--first-stage evaluates a run: give --beir DIR and --run RUN.trec, and no EXPORT")
    elif not args.model_dir:
        parser.error("give the EXPORT to evaluate (or --first-stage to evaluate the run itself)")
    if args.run and not beir and args.candidates:  # the older form: EXPORT BEIR_DIR --run RUN
        beir, args.candidates = args.candidates, None
    if bool(args.run) != bool(beir) or bool(args.candidates) == bool(args.run):
        parser.error("give either CANDIDATES.jsonl or both --beir DIR and --run RUN.trec")
    if args.run:
        lists = load_beir_rerank(beir, args.run, args.split, args.top_k, args.on_error, skipped)
        return lists[: args.max_queries]
    return load_candidate_lists(args.candidates, args.max_queries)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    skipped: Counter = Counter()
    lists = load_lists(args, parser, skipped)
    if args.first_stage:
        scores = [score for cl in lists for score in cl.run_scores]
    else:
        pairs = [(cl.query, text) for cl in lists for text in cl.texts]
        scores = load_reranker(args.model_dir, args).score(pairs, progress=True)
    per_query = per_query_metrics_for_scores(lists, scores, args.k, args.relevance_threshold, args.recall_k)
    result: dict = {name: float(values.mean()) for name, values in per_query.items()}
    result["queries"] = len(lists)
    if skipped:  # load_beir_rerank has said so on stderr (a log warning)
        result["skipped"] = dict(skipped)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.per_query:
        write_per_query(args.per_query, [cl.qid for cl in lists], per_query)
    if args.run_out:
        write_trec_run(args.run_out, ranked_run(lists, scores))
    print(text)
    return 0


if __name__ == "__main__":
    from ..cli import main as cli_main

    sys.exit(cli_main(["evaluate", *sys.argv[1:]]))
