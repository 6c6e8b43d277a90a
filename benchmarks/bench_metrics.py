"""MRR@10 and nDCG@10: the project's vectorised metrics against torchmetrics' retrieval metrics.

Data (seeded): Q queries x C candidates, all real (no padding); scores uniform in (0.01, 0.99);
every 10th query has its scores rounded to 5 levels, so it is full of ties; graded labels 0..3
drawn from a per-query distribution (some queries have no relevant candidate).

- project: `rerank_lightning.eval.metrics.ranking_metrics(scores, labels, k=10, metrics=...)` on the
  [Q, C] tensors, asking only for what the row measures: `metrics=("MRR",)` for the MRR@10 row (the
  rank of each query's best relevant candidate, by counting over one int64 rank key: no sort, no
  topk), `("nDCG",)` for nDCG@10 and `("MRR", "nDCG")` for the combined row (one `topk(10)` of the
  key, and one of the gains for the ideal DCG). `project ms, all 3 metrics` is the default call
  (MRR@10, nDCG@10 and MAP: MAP needs the full rank order, one sort of the key) for reference; its
  speedup charges that whole call to the row's metric(s). Every call's values are checked equal to
  the all-metrics call's (`equal to all-metrics call`).
- baseline: torchmetrics `RetrievalMRR(top_k=10)` and `RetrievalNormalizedDCG(top_k=10)`, fresh
  objects, `update(preds, target, indexes)` on the flattened inputs + `compute()` (a Python loop
  over queries inside torchmetrics). MRR gets binarised labels (label >= 1, torchmetrics accepts only
  binary targets for it); nDCG gets the graded labels.
- time: interleaved rounds (each round times the project's four calls, best of 10 calls each, then
  torchmetrics' MRR once and its nDCG once), best over 7 rounds, in this process; once with 1 torch
  intra-op thread and once with torch's default (on a small shared machine, a multi-threaded kernel
  waits for a busy core; torchmetrics' per-query ops are too small to thread). `speedup x` is the
  ratio of best wall-clock times (the target's measure); `speedup x (CPU time)` the ratio of best
  CPU times of the process (all threads), which other processes' load disturbs less.

Where the definitions coincide and where they do not:
- nDCG gain: both use the label itself as the gain (trec_eval `ndcg_cut`, not 2^label - 1), the
  discount 1/log2(rank + 1), the ideal DCG from all candidates cut at k, and 0 for a query
  without a relevant candidate. Same definition.
- Ties: trec_eval (the project) ranks tied candidates in a fixed order (here column order; docid
  order with `tie_order`), torchmetrics' nDCG averages the gain over each tied group (sklearn) and
  its MRR takes `topk`'s unspecified order. Values differ on queries with ties, so the value check
  is on the tie-free queries; the difference over all queries is reported for information.
- torchmetrics' reciprocal rank treats a candidate with a score <= 0 as not relevant
  (`torch.where(preds > 0, target, 0)`); all scores here are positive, so it does not matter.
- torchmetrics works in float32, the project accumulates in float64 (returned as float32).
"""
from __future__ import annotations

import time

import torch

TITLE = "Ranking metrics: rerank_lightning.eval.metrics vs torchmetrics"
TARGET_SPEEDUP = 50.0


def make_case(num_queries: int, num_cands: int, seed: int = 0, tie_every: int = 10):
    """(scores [Q, C] float32 > 0, labels [Q, C] long 0..3, has_ties [Q] bool)."""
    gen = torch.Generator().manual_seed(seed)
    scores = 0.01 + 0.98 * torch.rand(num_queries, num_cands, generator=gen)
    tied_rows = torch.arange(num_queries) % tie_every == 0
    scores[tied_rows] = (scores[tied_rows] * 5).ceil() / 5  # 5 levels: 0.2 .. 1.0
    probs = torch.rand(num_queries, 4, generator=gen) ** 3 + torch.tensor([1.0, 0.0, 0.0, 0.0])
    labels = torch.multinomial(probs, num_cands, replacement=True, generator=gen)
    sorted_scores = scores.sort(dim=1).values
    has_ties = (sorted_scores.diff(dim=1) == 0).any(dim=1)
    return scores, labels, has_ties


ALL_METRICS = ("MRR", "nDCG", "MAP")
# table row -> the project's call for it (only the metrics the row measures)
PROJECT_CALLS = {"MRR@10": ("MRR",), "nDCG@10": ("nDCG",), "MRR@10 + nDCG@10": ("MRR", "nDCG")}


def project_metrics(scores: torch.Tensor, labels: torch.Tensor, k: int = 10,
                    metrics: tuple[str, ...] = ALL_METRICS) -> dict[str, torch.Tensor]:
    from rerank_lightning.eval.metrics import ranking_metrics

    return ranking_metrics(scores, labels, k=k, relevance_threshold=1, metrics=metrics)


def torchmetrics_per_query(name: str, scores: torch.Tensor, labels: torch.Tensor, k: int = 10,
                           per_query: bool = False) -> torch.Tensor:
    """Mean (or per-query values, in query order) of torchmetrics' MRR@k or nDCG@k."""
    from torchmetrics.retrieval import RetrievalMRR, RetrievalNormalizedDCG

    aggregation = (lambda values, dim=None: values) if per_query else "mean"
    if name == "MRR":
        metric = RetrievalMRR(top_k=k, aggregation=aggregation)
        target = labels >= 1
    else:
        metric = RetrievalNormalizedDCG(top_k=k, aggregation=aggregation)
        target = labels
    num_queries, num_cands = scores.shape
    indexes = torch.arange(num_queries).repeat_interleave(num_cands)
    metric.update(scores.reshape(-1), target.reshape(-1), indexes=indexes)
    return metric.compute()


def best_time(fn, repeats: int) -> tuple[float, float]:
    """(best wall-clock seconds, best CPU seconds of this process, all threads) over `repeats` calls."""
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    return best_wall, best_cpu


def run(quick: bool = False) -> list[dict]:
    num_queries, num_cands, k = (100, 20, 10) if quick else (1000, 100, 10)
    rounds, project_calls = (1, 2) if quick else (7, 10)
    torch.manual_seed(0)
    scores, labels, has_ties = make_case(num_queries, num_cands)
    tie_free = ~has_ties

    # Values: per-query, project (all metrics in one call, and each row's own call) vs torchmetrics
    ours = project_metrics(scores, labels, k)
    ours_alone = {row: project_metrics(scores, labels, k, metrics) for row, metrics in PROJECT_CALLS.items()}
    theirs = {
        "MRR": torchmetrics_per_query("MRR", scores, labels, k, per_query=True),
        "nDCG": torchmetrics_per_query("nDCG", scores, labels, k, per_query=True),
    }

    rows = []
    default_threads = torch.get_num_threads()
    thread_settings = [default_threads] if quick else sorted({1, default_threads})
    for threads in thread_settings:
        torch.set_num_threads(threads)
        try:
            rows += timed_rows(scores, labels, k, rounds, project_calls, ours, ours_alone, theirs, tie_free, threads)
        finally:
            torch.set_num_threads(default_threads)
    return rows


def _best(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return min(a[0], b[0]), min(a[1], b[1])


def timed_rows(scores, labels, k, rounds, project_calls, ours, ours_alone, theirs, tie_free, threads) -> list[dict]:
    # Timings: best of several runs each, interleaved (each round times the project's calls, then
    # torchmetrics' MRR, then its nDCG), so that load from other processes hits all alike.
    inf = (float("inf"), float("inf"))
    t_calls = {name: inf for name in [*PROJECT_CALLS, "all"]}
    t_tm = {"MRR": inf, "nDCG": inf}
    for _ in range(rounds):
        for name in t_calls:
            metrics = PROJECT_CALLS.get(name, ALL_METRICS)
            t = best_time(lambda metrics=metrics: project_metrics(scores, labels, k, metrics), project_calls)
            t_calls[name] = _best(t_calls[name], t)
        for name in t_tm:
            t = best_time(lambda name=name: torchmetrics_per_query(name, scores, labels, k), 1)
            t_tm[name] = _best(t_tm[name], t)
    t_tm[f"MRR@{k} + nDCG@{k}"] = tuple(t_tm["MRR"][i] + t_tm["nDCG"][i] for i in (0, 1))

    rows = []
    num_queries, num_cands = scores.shape
    common = {"queries x candidates": f"{num_queries} x {num_cands}",
              "tie-free queries": int(tie_free.sum())}
    for row_name, metrics in PROJECT_CALLS.items():
        tm = t_tm[row_name if len(metrics) > 1 else metrics[0]]
        mine = t_calls[row_name]
        alone = ours_alone[row_name]
        row = {
            "metric": row_name,
            "project call": f"metrics={metrics!r}",
            "torch threads": threads,
            "torchmetrics ms": 1e3 * tm[0],
            "project ms": 1e3 * mine[0],
            "speedup x": tm[0] / mine[0],
            "speedup x (CPU time)": tm[1] / mine[1],
            "project ms, all 3 metrics": 1e3 * t_calls["all"][0],
            "speedup x, all 3 metrics": tm[0] / t_calls["all"][0],
            "target": f">= {TARGET_SPEEDUP:g}x, same values",
            "met": None,  # filled below
            "equal to all-metrics call": all(torch.equal(v, ours[name]) for name, v in alone.items()),
        }
        if len(metrics) == 1:
            name = metrics[0]
            mine_values, ref = alone[f"{name}@{k}"].double(), theirs[name].double()
            row.update({
                "abs mean diff tie-free": abs(mine_values[tie_free].mean() - ref[tie_free].mean()).item(),
                "max per-query diff tie-free": (mine_values[tie_free] - ref[tie_free]).abs().max().item(),
                "abs mean diff all (ties differ)": abs(mine_values.mean() - ref.mean()).item(),
                "project mean": mine_values.mean().item(),
                "torchmetrics mean": ref.mean().item(),
            })
        rows.append({**row, **common})
    by_metric = {row["metric"]: row for row in rows}
    for row in rows:
        # same values: the combined row's call returns the single rows' checked values (equal to all-metrics)
        diffs = [by_metric[f"{m}@{k}"]["max per-query diff tie-free"] for m in PROJECT_CALLS[row["metric"]]]
        same = max(diffs) <= 1e-6 and row["equal to all-metrics call"]
        row["met"] = bool(row["speedup x"] >= TARGET_SPEEDUP and same)
    return rows


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for row in run(quick=args.quick):
        print(json.dumps(row))
