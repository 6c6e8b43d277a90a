"""Per-query ranking metrics (RR@k, nDCG@k, MAP, Recall@k, Judged@k) on padded tensors, matching trec_eval."""
from __future__ import annotations

from collections.abc import Iterable

import torch

# RR and MRR are one metric under two names (ir_measures' RR@k; MRR@k as the project logged it first).
METRICS = ("RR", "MRR", "nDCG", "MAP", "Recall", "Judged")
DEFAULT_METRICS = METRICS
_INT64_MIN = torch.iinfo(torch.int64).min


def _ranking_order(scores: torch.Tensor, mask: torch.Tensor, tie_order: torch.Tensor | None) -> torch.Tensor:
    """Column indices [Q, C] in rank order: real before padding, score desc, then tie_order desc.

    The general path (any dtype, any tie_order): successive stable sorts, least significant key first.
    Without tie_order, tied candidates keep their column order (earlier column ranks first).
    """
    order = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    keys = ([] if tie_order is None else [tie_order]) + [scores, mask.to(torch.uint8)]
    for key in keys:
        idx = key.gather(1, order).sort(dim=1, descending=True, stable=True).indices
        order = order.gather(1, idx)
    return order


def _rank_key(scores: torch.Tensor, mask: torch.Tensor | None, tie_order: torch.Tensor | None) -> torch.Tensor | None:
    """One int64 key [Q, C] whose descending order is `_ranking_order`'s, or None where it cannot be exact.

    key = (order-preserving int32 of the float32 score) * 2^32 + (tie_order - min) * C + (C - 1 - column),
    padding = int64 min. Real candidates of a row get distinct keys (the column is part of them), so
    `topk` / an unstable sort give exactly the rank order of the stable sorts. Exact when the scores
    are float32 or round-trip through float32 (on the real candidates), tie_order is integer with
    (max - min + 1) * C <= 2^32, and the device is CPU or CUDA; otherwise None (the caller sorts).
    Like torch.sort, all NaNs tie with each other above +inf; -0.0 ties with +0.0.
    """
    num_cands = scores.shape[1]
    if scores.device.type not in ("cpu", "cuda") or num_cands == 0:
        return None
    if scores.dtype == torch.float64:
        single = scores.float()
        exact = (single.double() == scores) | scores.isnan()
        if mask is not None:
            exact |= ~mask
        if not bool(exact.all()):
            return None
        scores = single
    elif scores.dtype != torch.float32:
        return None
    cols = torch.arange(num_cands - 1, -1, -1, device=scores.device)  # earlier column ranks first
    if tie_order is None:
        low = cols
    else:
        if tie_order.dtype.is_floating_point or tie_order.dtype.is_complex:
            return None
        tie = tie_order.to(torch.int64)
        tie_min, tie_max = int(tie.min()), int(tie.max())
        if (tie_max - tie_min + 1) * num_cands > 2**32:
            return None
        low = (tie - tie_min).mul_(num_cands).add_(cols)  # in [0, 2^32)
    single = scores + 0.0  # a copy, with -0.0 -> +0.0 (IEEE: -0 + +0 = +0)
    if bool(single.sum().isnan()):  # any NaN (or +inf and -inf): give all NaNs one bit pattern
        single.masked_fill_(single.isnan(), float("nan"))  # (x86's default NaN is negative)
    bits = single.view(torch.int32)
    # Order-preserving map of IEEE floats to signed ints: negative floats' bits count down, flip them.
    bits ^= (bits >> 31) & 0x7FFFFFFF
    key = bits.to(torch.int64).mul_(2**32).add_(low)
    if mask is not None:
        key.masked_fill_(~mask, _INT64_MIN)  # below every real key: real scores never map to int32 min
    return key


def _requested(metrics: Iterable[str] | str) -> set[str]:
    names = {metrics} if isinstance(metrics, str) else set(metrics)
    unknown = names - set(METRICS)
    if unknown or not names:
        raise ValueError(f"metrics must be a non-empty subset of {METRICS}, got {sorted(names)}")
    return names


def ranking_metrics(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
                    k: int = 10, relevance_threshold: float = 1.0,
                    tie_order: torch.Tensor | None = None,
                    metrics: Iterable[str] = DEFAULT_METRICS,
                    judged: torch.Tensor | None = None, judged_grades: torch.Tensor | None = None,
                    recall_k: int = 100) -> dict[str, torch.Tensor]:
    """Per-query metrics for Q queries x C candidates (padded), trec_eval semantics.

    scores [Q, C] float; labels [Q, C] graded relevance (int or float; 0 for an unjudged candidate);
    mask [Q, C] bool, True for a real candidate (padding is ignored entirely); tie_order [Q, C] int:
    among equal scores, higher tie_order ranks first (`data.candidates.docid_tie_order` reproduces
    trec_eval); without it (or among equal tie_order) the earlier column ranks first.
    The query's full judgements, when the candidates are a run cut from a larger collection:
    judged_grades [Q, J] float, every grade the qrels give the query (NaN pads), so the ideal DCG and
    the number of relevant documents (MAP, Recall) count relevant documents the candidates miss, as
    trec_eval does with the full qrels; judged [Q, C] bool, whether the qrels judge each candidate
    (Judged@k). Without them the candidates' labels are the only judgements (all candidates judged).
    metrics: which of METRICS to compute (default DEFAULT_METRICS). Returns the requested ones of
    {f"RR@{k}", f"MRR@{k}" (the same values, the older name), f"nDCG@{k}", "MAP", f"Recall@{recall_k}",
    f"Judged@{k}"}, each [Q] float32.

    - RR@k: trec_eval recip_rank cut at k; relevant means label >= relevance_threshold. (ir_measures RR@k
      uses its msmarco provider, which breaks ties by docid ascending: pass -docid_tie_order(...) for that.)
    - nDCG@k: trec_eval ndcg_cut_k: gain = label (not 2^label - 1), labels <= 0 give no gain, ideal DCG
      from the k largest judged grades. Like trec_eval, relevance_threshold does NOT affect nDCG.
    - MAP: trec_eval map (no cut); Recall@k: trec_eval recall_k; both relative to every relevant judgement.
    - Judged@k: the share of the top min(k, candidates) that is judged (ir_measures' Judged@k).
    A query without relevant judgements scores 0 (Judged@k aside).

    The rank order is one exact int64 key per candidate (`_rank_key`); MAP sorts it, the cut metrics
    alone need only its top k (`topk`; RR alone: the rank of the best relevant candidate, by counting).
    Where the key cannot be exact (e.g. float64 scores that float32 cannot hold), the same order comes
    from successive stable sorts. Every path gives the same values.
    """
    if k < 1 or recall_k < 1:
        raise ValueError(f"k and recall_k must be >= 1, got {k}, {recall_k}")
    if scores.dim() != 2 or labels.shape != scores.shape:
        raise ValueError(f"expected scores and labels of equal shape [Q, C], got {scores.shape}, {labels.shape}")
    wanted = _requested(metrics)
    device, (num_queries, num_cands) = scores.device, scores.shape
    # Rank on scores at >= float32 precision (bf16/fp16 upcast exactly; float64 kept so no new ties appear),
    # accumulate in float64 (float32 on MPS, which has no float64).
    work = torch.float32 if device.type == "mps" else torch.float64
    scores = scores.detach().to(torch.promote_types(scores.dtype, torch.float32))
    labels = labels.detach().to(device)
    if mask is not None:
        mask = mask.to(device=device, dtype=torch.bool)
    if tie_order is not None:
        tie_order = tie_order.to(device)
    if judged_grades is not None:
        judged_grades = judged_grades.detach().to(device=device, dtype=work)
    zeros = torch.zeros(num_queries, device=device, dtype=work)
    if num_cands == 0:
        return _named(dict.fromkeys(("RR", "nDCG", "MAP", "Recall", "Judged"), zeros), wanted, k, recall_k)

    key = _rank_key(scores, mask, tie_order)
    out: dict[str, torch.Tensor] = {}
    if key is not None and wanted <= {"RR", "MRR"}:
        out["RR"] = _reciprocal_rank_by_counting(key, labels, mask, k, relevance_threshold, work)
        return _named(out, wanted, k, recall_k)

    cut = min(k, num_cands)
    depth = num_cands if "MAP" in wanted else min(max(k, recall_k if "Recall" in wanted else 1), num_cands)
    if key is None:  # MAP needs the full rank order; the cut metrics only its top
        order = _ranking_order(scores, torch.ones_like(scores, dtype=torch.bool) if mask is None else mask,
                               tie_order)[:, :depth]
    elif depth == num_cands:
        order = key.argsort(dim=1, descending=True)  # keys of real candidates are distinct
    else:
        order = key.topk(depth, dim=1).indices  # sorted, descending
    ranked_labels = labels.gather(1, order).to(work)
    real = torch.ones_like(order, dtype=torch.bool) if mask is None else mask.gather(1, order)
    rel = ((ranked_labels >= relevance_threshold) & real).to(work)
    ranks = torch.arange(1, order.shape[1] + 1, device=device, dtype=work)
    if judged_grades is None:  # the candidates hold every judgement
        num_rel = ((labels.to(work) >= relevance_threshold) & (True if mask is None else mask)).sum(dim=1)
    else:
        num_rel = (judged_grades >= relevance_threshold).sum(dim=1)  # NaN padding compares False
    num_rel = num_rel.to(work)

    if wanted & {"RR", "MRR"}:
        # max over the top k of rel/rank is 1/rank of the first relevant (0 if none).
        out["RR"] = (rel[:, :cut] / ranks[:cut]).amax(dim=1)
    if "nDCG" in wanted:
        ideal = _ideal_gains(labels, mask, cut, work) if judged_grades is None else \
            judged_grades.nan_to_num(0.0).clamp(min=0).topk(min(k, judged_grades.shape[1]), dim=1).values
        # discounts over all ranks, then cut (as elementwise kernels may round a vector's tail differently)
        length = max(num_cands, ideal.shape[1])
        discounts = 1.0 / torch.log2(torch.arange(2, length + 2, device=device, dtype=work))
        dcg = (ranked_labels[:, :cut].clamp(min=0) * real[:, :cut] * discounts[:cut]).sum(dim=1)
        idcg = (ideal * discounts[: ideal.shape[1]]).sum(dim=1)
        out["nDCG"] = torch.where(idcg > 0, dcg / idcg.clamp(min=torch.finfo(work).tiny), zeros)
    if "MAP" in wanted:
        precision_at_hits = rel.cumsum(dim=1) / ranks * rel
        out["MAP"] = torch.where(num_rel > 0, precision_at_hits.sum(dim=1) / num_rel.clamp(min=1), zeros)
    if "Recall" in wanted:
        found = rel[:, :recall_k].sum(dim=1)
        out["Recall"] = torch.where(num_rel > 0, found / num_rel.clamp(min=1), zeros)
    if "Judged" in wanted:
        top_real = real[:, :cut]
        top_judged = top_real if judged is None else judged.to(device).gather(1, order[:, :cut]) & top_real
        shown = top_real.sum(dim=1).to(work)
        out["Judged"] = torch.where(shown > 0, top_judged.sum(dim=1).to(work) / shown.clamp(min=1), zeros)
    return _named(out, wanted, k, recall_k)


def _named(values: dict[str, torch.Tensor], wanted: set[str], k: int, recall_k: int) -> dict[str, torch.Tensor]:
    names = {"RR": f"RR@{k}", "MRR": f"MRR@{k}", "nDCG": f"nDCG@{k}", "MAP": "MAP",
             "Recall": f"Recall@{recall_k}", "Judged": f"Judged@{k}"}
    return {names[m]: values["RR" if m == "MRR" else m].float() for m in METRICS if m in wanted}


def _ideal_gains(labels: torch.Tensor, mask: torch.Tensor | None, cut: int, work: torch.dtype) -> torch.Tensor:
    """[Q, cut] the largest gains of the real candidates, descending (padding and labels <= 0 give 0)."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.device.type == "mps":
        gains = labels.to(work).clamp(min=0)
        if mask is not None:
            gains = gains * mask
        return gains.topk(cut, dim=1).values
    # Integer labels: select in their own dtype (int -> float is monotone), convert only the top k.
    gains = labels.clamp(min=0)
    if mask is not None:
        gains = gains.masked_fill(~mask, 0)
    return gains.topk(cut, dim=1).values.to(work)


def _reciprocal_rank_by_counting(key: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None, k: int,
                                 relevance_threshold: float, work: torch.dtype) -> torch.Tensor:
    """MRR@k without ordering: the first relevant candidate has the largest key among the relevant ones,
    and its rank is 1 + the number of candidates with a larger key (padding has the smallest key)."""
    rel = labels.to(work) >= relevance_threshold
    if mask is not None:
        rel &= mask
    best = torch.where(rel, key, _INT64_MIN).amax(dim=1, keepdim=True)
    rank = (key > best).sum(dim=1) + 1
    found = (best[:, 0] > _INT64_MIN) & (rank <= k)  # real keys are > int64 min
    return torch.where(found, 1.0 / rank.to(work), torch.zeros((), device=key.device, dtype=work))


def mean_metrics_from_rows(rows: torch.Tensor, k: int = 10, relevance_threshold: float = 1.0,
                           metrics: Iterable[str] = DEFAULT_METRICS, **judgements: torch.Tensor | int | None,
                           ) -> dict[str, torch.Tensor]:
    """Mean metrics from [N, 5] rows (query index, candidate index, label, tie order, score).

    Rows may come in any order and may repeat (a distributed sampler pads with duplicates).
    `judgements`: `judged` [Q, C] / `judged_grades` [Q, J] indexed by query and candidate index
    (`data.candidates.query_judgements`), and `recall_k`, as in `ranking_metrics`.
    """
    per_query = per_query_metrics_from_rows(rows, k, relevance_threshold, metrics, **judgements)
    return {name: values.mean() for name, values in per_query.items()}


def per_query_metrics_from_rows(rows: torch.Tensor, k: int = 10, relevance_threshold: float = 1.0,
                                metrics: Iterable[str] = DEFAULT_METRICS, judged: torch.Tensor | None = None,
                                judged_grades: torch.Tensor | None = None,
                                recall_k: int = 100) -> dict[str, torch.Tensor]:
    """Per-query metrics ([Q] each, indexed by query index) from rows as in `mean_metrics_from_rows`."""
    qi, ci = rows[:, 0].long(), rows[:, 1].long()
    shape = (int(qi.max()) + 1, int(ci.max()) + 1)
    label, tie, score = (torch.zeros(shape, dtype=rows.dtype, device=rows.device) for _ in range(3))
    mask = torch.zeros(shape, dtype=torch.bool, device=rows.device)
    label[qi, ci], tie[qi, ci], score[qi, ci] = rows[:, 2], rows[:, 3], rows[:, 4]
    mask[qi, ci] = True
    if judged is not None:
        judged = judged.to(rows.device)[qi, ci]
        judged = torch.zeros(shape, dtype=torch.bool, device=rows.device).index_put_((qi, ci), judged)
    if judged_grades is not None:
        judged_grades = judged_grades[: shape[0]]
    return ranking_metrics(score, label, mask, k=k, relevance_threshold=relevance_threshold,
                           tie_order=tie.long(), metrics=metrics, judged=judged, judged_grades=judged_grades,
                           recall_k=recall_k)
