"""Per-query ranking metrics (MRR@k, nDCG@k, MAP) on padded tensors, matching trec_eval."""
from __future__ import annotations

from collections.abc import Iterable

import torch

METRICS = ("MRR", "nDCG", "MAP")
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
                    metrics: Iterable[str] = METRICS) -> dict[str, torch.Tensor]:
    """Per-query metrics for Q queries x C candidates (padded), trec_eval semantics.

    scores [Q, C] float; labels [Q, C] graded relevance (int or float); mask [Q, C] bool, True for a real
    candidate (padding ignored entirely, also for the ideal DCG and the count of relevant docs);
    tie_order [Q, C] int: among equal scores, higher tie_order ranks first (use docid_tie_order to
    reproduce trec_eval); without it (or among equal tie_order) the earlier column ranks first.
    metrics: which of "MRR", "nDCG", "MAP" to compute (default all). Returns the requested ones of
    {f"MRR@{k}": [Q], f"nDCG@{k}": [Q], "MAP": [Q]} as float32 tensors.

    - MRR@k: trec_eval recip_rank cut at k; relevant means label >= relevance_threshold. (ir_measures RR@k
      uses its msmarco provider, which breaks ties by docid ascending: pass -docid_tie_order(...) for that.)
    - nDCG@k: trec_eval ndcg_cut_k: gain = label (not 2^label - 1), labels <= 0 give no gain, ideal DCG
      from all real candidates cut at k. Like trec_eval, relevance_threshold does NOT affect nDCG.
    - MAP: trec_eval map (no cut), relevant means label >= relevance_threshold.
    A query without relevant candidates scores 0 everywhere.

    The rank order is one exact int64 key per candidate (`_rank_key`); MAP sorts it, the cut metrics
    alone need only its top k (nDCG: `topk`; MRR alone: the rank of the best relevant candidate, by
    counting). Where the key cannot be exact (e.g. float64 scores that float32 cannot hold), the same
    order comes from successive stable sorts. Every path gives the same values.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
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
    zeros = torch.zeros(num_queries, device=device, dtype=work)
    if num_cands == 0:
        return _named({"MRR": zeros, "nDCG": zeros, "MAP": zeros}, wanted, k)

    key = _rank_key(scores, mask, tie_order)
    out: dict[str, torch.Tensor] = {}
    if key is not None and wanted == {"MRR"}:
        out["MRR"] = _reciprocal_rank_by_counting(key, labels, mask, k, relevance_threshold, work)
        return _named(out, wanted, k)

    cut = min(k, num_cands)
    if key is None:  # MAP needs the full rank order; MRR and nDCG only its top k
        order = _ranking_order(scores, torch.ones_like(scores, dtype=torch.bool) if mask is None else mask,
                               tie_order)
        if "MAP" not in wanted:
            order = order[:, :cut]
    elif "MAP" in wanted:
        order = key.argsort(dim=1, descending=True)  # keys of real candidates are distinct
    else:
        order = key.topk(cut, dim=1).indices  # sorted, descending
    ranked_labels = labels.gather(1, order).to(work)
    rel = ranked_labels >= relevance_threshold
    if mask is not None:
        real = mask.gather(1, order)
        rel &= real
    rel = rel.to(work)
    ranks = torch.arange(1, order.shape[1] + 1, device=device, dtype=work)
    # discounts over all C ranks, then cut (as elementwise kernels may round a vector's tail differently)
    discounts = (1.0 / torch.log2(torch.arange(2, num_cands + 2, device=device, dtype=work)))[:cut]

    if "MRR" in wanted:
        # max over the top k of rel/rank is 1/rank of the first relevant (0 if none).
        out["MRR"] = (rel[:, :cut] / ranks[:cut]).amax(dim=1)
    if "nDCG" in wanted:
        gains = ranked_labels[:, :cut].clamp(min=0)
        if mask is not None:
            gains = gains * real[:, :cut]
        dcg = (gains * discounts).sum(dim=1)
        idcg = (_ideal_gains(labels, mask, cut, work) * discounts).sum(dim=1)
        out["nDCG"] = torch.where(idcg > 0, dcg / idcg.clamp(min=torch.finfo(work).tiny), zeros)
    if "MAP" in wanted:
        num_rel = rel.sum(dim=1)
        precision_at_hits = rel.cumsum(dim=1) / ranks * rel
        out["MAP"] = torch.where(num_rel > 0, precision_at_hits.sum(dim=1) / num_rel.clamp(min=1), zeros)
    return _named(out, wanted, k)


def _named(values: dict[str, torch.Tensor], wanted: set[str], k: int) -> dict[str, torch.Tensor]:
    names = {"MRR": f"MRR@{k}", "nDCG": f"nDCG@{k}", "MAP": "MAP"}
    return {names[m]: values[m].float() for m in METRICS if m in wanted}


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


def docid_tie_order(docids: list[list[str]], width: int | None = None) -> torch.Tensor:
    """[Q, width] long tensor such that ranking_metrics breaks score ties like trec_eval (padding gets -1).

    trec_eval sorts a query's run by score descending, then by docno descending in strcmp (byte) order,
    ignoring the order of the run file: e.g. tied docs rank "zz" > "b" > "ab" > "a" > "Z" > "B" > "9" > "10".
    So the tie order of a doc is its position in ascending byte order of the query's docids.
    """
    width = max((len(ids) for ids in docids), default=0) if width is None else width
    out = torch.full((len(docids), width), -1, dtype=torch.long)
    for i, ids in enumerate(docids):  # string sorting is inherently per query; this is preprocessing
        if len(ids) > width:
            raise ValueError(f"query {i} has {len(ids)} docids > width {width}")
        ascending = sorted(range(len(ids)), key=lambda j: ids[j].encode("utf-8"))
        out[i, ascending] = torch.arange(len(ids))
    return out


def mean_metrics_from_rows(rows: torch.Tensor, k: int = 10, relevance_threshold: float = 1.0,
                           metrics: Iterable[str] = METRICS) -> dict[str, torch.Tensor]:
    """Mean metrics from [N, 5] rows (query index, candidate index, label, tie order, score).

    Rows may come in any order and may repeat (a distributed sampler pads with duplicates).
    """
    per_query = per_query_metrics_from_rows(rows, k, relevance_threshold, metrics)
    return {name: values.mean() for name, values in per_query.items()}


def per_query_metrics_from_rows(rows: torch.Tensor, k: int = 10, relevance_threshold: float = 1.0,
                                metrics: Iterable[str] = METRICS) -> dict[str, torch.Tensor]:
    """Per-query metrics ([Q] each, indexed by query index) from rows as in `mean_metrics_from_rows`."""
    qi, ci = rows[:, 0].long(), rows[:, 1].long()
    shape = (int(qi.max()) + 1, int(ci.max()) + 1)
    label, tie, score = (torch.zeros(shape, dtype=rows.dtype, device=rows.device) for _ in range(3))
    mask = torch.zeros(shape, dtype=torch.bool, device=rows.device)
    label[qi, ci], tie[qi, ci], score[qi, ci] = rows[:, 2], rows[:, 3], rows[:, 4]
    mask[qi, ci] = True
    return ranking_metrics(score, label, mask, k=k, relevance_threshold=relevance_threshold,
                           tie_order=tie.long(), metrics=metrics)
