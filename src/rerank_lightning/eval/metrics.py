"""Per-query ranking metrics (MRR@k, nDCG@k, MAP) on padded tensors, matching trec_eval."""
from __future__ import annotations

import torch


def _ranking_order(scores: torch.Tensor, mask: torch.Tensor, tie_order: torch.Tensor | None) -> torch.Tensor:
    """Column indices [Q, C] in rank order: real before padding, score desc, then tie_order desc."""
    order = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    # Lexicographic sort via successive stable sorts, least significant key first.
    # Without tie_order, tied candidates keep their column order (earlier column ranks first).
    keys = ([] if tie_order is None else [tie_order]) + [scores, mask.to(torch.uint8)]
    for key in keys:
        idx = key.gather(1, order).sort(dim=1, descending=True, stable=True).indices
        order = order.gather(1, idx)
    return order


def ranking_metrics(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
                    k: int = 10, relevance_threshold: float = 1.0,
                    tie_order: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-query metrics for Q queries x C candidates (padded), trec_eval semantics.

    scores [Q, C] float; labels [Q, C] graded relevance (int or float); mask [Q, C] bool, True for a real
    candidate (padding ignored entirely, also for the ideal DCG and the count of relevant docs);
    tie_order [Q, C] int: among equal scores, higher tie_order ranks first (use docid_tie_order to
    reproduce trec_eval). Returns {f"MRR@{k}": [Q], f"nDCG@{k}": [Q], "MAP": [Q]} as float32 tensors.

    - MRR@k: trec_eval recip_rank cut at k; relevant means label >= relevance_threshold. (ir_measures RR@k
      uses its msmarco provider, which breaks ties by docid ascending: pass -docid_tie_order(...) for that.)
    - nDCG@k: trec_eval ndcg_cut_k: gain = label (not 2^label - 1), labels <= 0 give no gain, ideal DCG
      from all real candidates cut at k. Like trec_eval, relevance_threshold does NOT affect nDCG.
    - MAP: trec_eval map (no cut), relevant means label >= relevance_threshold.
    A query without relevant candidates scores 0 everywhere.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if scores.dim() != 2 or labels.shape != scores.shape:
        raise ValueError(f"expected scores and labels of equal shape [Q, C], got {scores.shape}, {labels.shape}")
    device, num_cands = scores.device, scores.shape[1]
    # Rank on scores at >= float32 precision (bf16/fp16 upcast exactly; float64 kept so no new ties appear),
    # accumulate in float64 (float32 on MPS, which has no float64).
    work = torch.float32 if device.type == "mps" else torch.float64
    scores = scores.detach().to(torch.promote_types(scores.dtype, torch.float32))
    mask = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.to(device=device, dtype=torch.bool)
    if tie_order is not None:
        tie_order = tie_order.to(device)

    order = _ranking_order(scores, mask, tie_order)
    real = mask.gather(1, order)
    ranked_labels = labels.detach().to(device=device, dtype=work).gather(1, order)
    gains = ranked_labels.clamp(min=0) * real
    rel = ((ranked_labels >= relevance_threshold) & real).to(work)
    ranks = torch.arange(1, num_cands + 1, device=device, dtype=work)
    discounts = 1.0 / torch.log2(ranks + 1.0)
    zeros = torch.zeros(scores.shape[0], device=device, dtype=work)

    # MRR@k: max over the top k of rel/rank is 1/rank of the first relevant (0 if none).
    rr = (rel[:, :k] / ranks[:k]).amax(dim=1) if num_cands else zeros

    dcg = (gains[:, :k] * discounts[:k]).sum(dim=1)
    ideal = gains.sort(dim=1, descending=True).values  # padding has gain 0
    idcg = (ideal[:, :k] * discounts[:k]).sum(dim=1)
    ndcg = torch.where(idcg > 0, dcg / idcg.clamp(min=torch.finfo(work).tiny), zeros)

    num_rel = rel.sum(dim=1)
    precision_at_hits = rel.cumsum(dim=1) / ranks * rel
    ap = torch.where(num_rel > 0, precision_at_hits.sum(dim=1) / num_rel.clamp(min=1), zeros)

    return {f"MRR@{k}": rr.float(), f"nDCG@{k}": ndcg.float(), "MAP": ap.float()}


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


def mean_metrics_from_rows(rows: torch.Tensor, k: int = 10, relevance_threshold: float = 1.0) -> dict[str, torch.Tensor]:
    """Mean metrics from [N, 5] rows (query index, candidate index, label, tie order, score).

    Rows may come in any order and may repeat (a distributed sampler pads with duplicates).
    """
    qi, ci = rows[:, 0].long(), rows[:, 1].long()
    shape = (int(qi.max()) + 1, int(ci.max()) + 1)
    label, tie, score = (torch.zeros(shape, dtype=rows.dtype, device=rows.device) for _ in range(3))
    mask = torch.zeros(shape, dtype=torch.bool, device=rows.device)
    label[qi, ci], tie[qi, ci], score[qi, ci] = rows[:, 2], rows[:, 3], rows[:, 4]
    mask[qi, ci] = True
    per_query = ranking_metrics(score, label, mask, k=k, relevance_threshold=relevance_threshold,
                                tie_order=tie.long())
    return {name: values.mean() for name, values in per_query.items()}
