"""Tests for rerank_lightning.eval.metrics against pytrec_eval / ir_measures (trec_eval semantics)."""
import math
import random
import string
import sys
from pathlib import Path

import ir_measures
import pytest
import pytrec_eval
import torch

try:
    from rerank_lightning.eval.metrics import docid_tie_order, ranking_metrics
except ImportError:  # package not installed: use the src layout directly
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from rerank_lightning.eval.metrics import docid_tie_order, ranking_metrics

TOL = 1e-6


def random_case(seed, num_queries=150, max_cands=30):
    """Padded random batch with frequent score ties, labels 0..3 and random (non-numeric-order) docids."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    sizes = [rng.randint(1, max_cands) for _ in range(num_queries)]
    sizes[0] = max_cands
    scores = torch.tensor([0.0, 0.5, 1.0, 1.5, -2.0])[torch.randint(0, 5, (num_queries, max_cands), generator=gen)]
    # per-query label distribution, so some queries have no (highly) relevant doc at all
    probs = torch.rand(num_queries, 4, generator=gen) ** 3 + torch.tensor([1.0, 0.0, 0.0, 0.0])
    labels = torch.multinomial(probs, max_cands, replacement=True, generator=gen)
    mask = torch.arange(max_cands) < torch.tensor(sizes)[:, None]
    docids = []
    for n in sizes:
        ids = set()
        while len(ids) < n:
            ids.add("".join(rng.choices(string.ascii_letters + string.digits + "_-", k=rng.randint(1, 6))))
        docids.append(rng.sample(sorted(ids), n))
    # garbage in the padding must be ignored
    scores = scores.masked_fill(~mask, 99.0)
    labels = labels.masked_fill(~mask, 3)
    return scores, labels, mask, docids


def to_trec(scores, labels, mask, docids):
    """qrels from all real candidates (including label 0) and run from scores, as pytrec_eval dicts."""
    qrels, run = {}, {}
    for q, ids in enumerate(docids):
        qid = f"q{q}"
        qrels[qid] = {d: int(labels[q, j]) for j, d in enumerate(ids) if mask[q, j]}
        run[qid] = {d: float(scores[q, j]) for j, d in enumerate(ids) if mask[q, j]}
    return qrels, run


def pytrec_reference(qrels, run, k, threshold):
    """Per-query (MRR@k, nDCG@k, MAP) lists computed by pytrec_eval."""
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank", f"ndcg_cut.{k}", "map"},
                                        relevance_level=int(threshold))
    res = ev.evaluate(run)
    qids = list(run)
    assert set(res) == set(qids)
    # recip_rank has no cut in trec_eval: MRR@k is 1/rank if that rank is <= k, else 0
    mrr = [res[q]["recip_rank"] if res[q]["recip_rank"] >= 1.0 / k - 1e-12 else 0.0 for q in qids]
    ndcg = [res[q][f"ndcg_cut_{k}"] for q in qids]
    ap = [res[q]["map"] for q in qids]
    return torch.tensor(mrr, dtype=torch.float64), torch.tensor(ndcg, dtype=torch.float64), torch.tensor(ap, dtype=torch.float64)


def assert_close(actual, expected):
    torch.testing.assert_close(actual.double(), torch.as_tensor(expected, dtype=torch.float64), atol=TOL, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("threshold", [1, 2])
@pytest.mark.parametrize("k", [10, 5, 100])
def test_random_against_pytrec_eval(seed, threshold, k):
    scores, labels, mask, docids = random_case(seed)
    out = ranking_metrics(scores, labels, mask, k=k, relevance_threshold=threshold,
                          tie_order=docid_tie_order(docids, width=scores.shape[1]))
    mrr, ndcg, ap = pytrec_reference(*to_trec(scores, labels, mask, docids), k=k, threshold=threshold)
    assert set(out) == {f"MRR@{k}", f"nDCG@{k}", "MAP"}
    assert all(v.dtype == torch.float32 and v.shape == (scores.shape[0],) for v in out.values())
    assert_close(out[f"MRR@{k}"], mrr)
    assert_close(out[f"nDCG@{k}"], ndcg)
    assert_close(out["MAP"], ap)
    # the random cases really exercise ties and empty queries
    assert (out["MAP"] == 0).any() and (out["MAP"] > 0).any()


@pytest.mark.parametrize("threshold", [1, 2])
def test_random_against_ir_measures(threshold):
    scores, labels, mask, docids = random_case(seed=7, num_queries=60)
    tie_order = docid_tie_order(docids)
    qrels, run = to_trec(scores, labels, mask, docids)
    measures = {"MRR@10": ir_measures.RR(rel=threshold) @ 10, "nDCG@10": ir_measures.nDCG @ 10,
                "MAP": ir_measures.AP(rel=threshold)}
    ref = {name: {} for name in measures}
    by_measure = {m: name for name, m in measures.items()}
    for metric in ir_measures.iter_calc(list(measures.values()), qrels, run):
        ref[by_measure[metric.measure]][metric.query_id] = metric.value
    expected = {name: [ref[name].get(f"q{q}", 0.0) for q in range(len(docids))] for name in measures}

    # nDCG@10 and AP go through pytrec_eval (trec_eval ties: docno descending)
    out = ranking_metrics(scores, labels, mask, k=10, relevance_threshold=threshold, tie_order=tie_order)
    assert_close(out["nDCG@10"], expected["nDCG@10"])
    assert_close(out["MAP"], expected["MAP"])
    # RR@10 goes through ir_measures' msmarco provider, which breaks ties by docid ASCENDING (unlike
    # trec_eval); reversing the tie order reproduces it, and the ties make the two conventions differ here.
    out_ms = ranking_metrics(scores, labels, mask, k=10, relevance_threshold=threshold, tie_order=-tie_order)
    assert_close(out_ms["MRR@10"], expected["MRR@10"])
    assert not torch.allclose(out["MRR@10"].double(), torch.tensor(expected["MRR@10"], dtype=torch.float64))


def test_trec_eval_tie_rule():
    """trec_eval orders tied scores by docno descending (strcmp order), independent of run order."""
    docids = ["a", "ab", "b", "B", "aa", "a0", "zz", "Z", "10", "9", "_"]
    for rel_doc in docids:
        shuffled = random.Random(rel_doc).sample(docids, len(docids))
        res = pytrec_eval.RelevanceEvaluator({"q": {d: int(d == rel_doc) for d in docids}}, {"recip_rank"}).evaluate(
            {"q": {d: 1.0 for d in shuffled}})
        expected_rank = sorted(docids, key=str.encode, reverse=True).index(rel_doc) + 1
        assert res["q"]["recip_rank"] == pytest.approx(1.0 / expected_rank)
        out = ranking_metrics(torch.ones(1, len(shuffled)), torch.tensor([[int(d == rel_doc) for d in shuffled]]),
                              k=len(docids), tie_order=docid_tie_order([shuffled]))
        assert out[f"MRR@{len(docids)}"].item() == pytest.approx(1.0 / expected_rank)


def test_hand_computed_cases():
    # q0: only relevant doc at rank 3. q1: no relevant doc. q2: only relevant doc at rank 4 > k=3.
    # q3: graded labels in rank order [1, 2, 3, 0, -1]; q4: relevant at ranks 1 and 3 of 4, padded.
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0],
                           [5.0, 4.0, 3.0, 2.0, 1.0],
                           [5.0, 4.0, 3.0, 2.0, 1.0],
                           [5.0, 4.0, 3.0, 2.0, 1.0],
                           [1.0, 3.0, 4.0, 2.0, 9.0]])
    labels = torch.tensor([[0, 0, 1, 0, 0],
                           [0, 0, 0, 0, 0],
                           [0, 0, 0, 2, 0],
                           [1, 2, 3, 0, -1],
                           [0, 0, 1, 1, 5]])
    mask = torch.tensor([[True] * 5] * 4 + [[True, True, True, True, False]])
    out = ranking_metrics(scores, labels, mask, k=3)
    log2 = math.log2
    assert_close(out["MRR@3"], [1 / 3, 0.0, 0.0, 1.0, 1.0])
    ndcg_q3 = (1 + 2 / log2(3) + 3 / log2(4)) / (3 + 2 / log2(3) + 1 / log2(4))
    # q4 ranks columns [2 (rel), 1, 3 (rel), 0]; the padded label 5 counts neither for DCG nor ideal DCG
    ndcg_q4 = (1 + 1 / log2(4)) / (1 + 1 / log2(3))
    assert_close(out["nDCG@3"], [1 / log2(4), 0.0, 0.0, ndcg_q3, ndcg_q4])
    assert_close(out["MAP"], [1 / 3, 0.0, 1 / 4, 1.0, (1 + 2 / 3) / 2])

    # threshold 2 changes MRR/MAP but not nDCG (as in trec_eval)
    out2 = ranking_metrics(scores, labels, mask, k=3, relevance_threshold=2)
    assert_close(out2["MRR@3"], [0.0, 0.0, 0.0, 1 / 2, 0.0])
    assert_close(out2["MAP"], [0.0, 0.0, 1 / 4, (1 / 2 + 2 / 3) / 2, 0.0])
    assert_close(out2["nDCG@3"], out["nDCG@3"])


def test_defaults_dtypes_and_query_mean():
    scores = torch.tensor([[0.5, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    labels = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    out = ranking_metrics(scores, labels)  # no mask, no tie_order: ties keep column order
    assert_close(out["MRR@10"], [0.5, 0.0])
    assert_close(out["MAP"], [(1 / 2 + 2 / 3) / 2, 0.0])
    assert out["MAP"].mean().item() == pytest.approx((1 / 2 + 2 / 3) / 4)  # empty query counted in the mean
    # tie_order reverses the tie between columns 1 and 2
    out_tie = ranking_metrics(scores, labels, tie_order=torch.tensor([[0, 0, 1, 0], [0, 0, 0, 0]]))
    assert_close(out_tie["MRR@10"], [1.0, 0.0])
    # bf16 / float64 scores give the same result as float32 (values exactly representable)
    for dtype in (torch.bfloat16, torch.float64):
        for key, val in ranking_metrics(scores.to(dtype), labels).items():
            assert_close(val, out[key])


def test_large_batch_vectorised():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(1000, 100, generator=gen)
    labels = torch.randint(0, 4, (1000, 100), generator=gen)
    mask = torch.arange(100) < torch.randint(1, 101, (1000, 1), generator=gen)
    out = ranking_metrics(scores, labels, mask, k=10, relevance_threshold=2)
    for val in out.values():
        assert val.shape == (1000,) and torch.isfinite(val).all() and (val >= 0).all() and (val <= 1 + 1e-6).all()
    # batched result equals evaluating a few rows on their own
    for q in (0, 500, 999):
        single = ranking_metrics(scores[q:q + 1], labels[q:q + 1], mask[q:q + 1], k=10, relevance_threshold=2)
        for key in out:
            assert_close(out[key][q:q + 1], single[key])


def test_mean_metrics_from_rows_ignores_order_and_duplicates():
    """Validation gathers (query, candidate, label, tie, score) rows from all ranks: shuffled, and with
    the duplicates a padded DistributedSampler adds. The means equal ranking_metrics on the grid."""
    from rerank_lightning.eval.metrics import mean_metrics_from_rows

    gen = torch.Generator().manual_seed(0)
    sizes = [5, 3, 7, 1]
    rows = []
    for qi, n in enumerate(sizes):
        labels = torch.randint(0, 3, (n,), generator=gen)
        scores = torch.randint(0, 3, (n,), generator=gen).float()  # frequent ties
        ties = torch.randperm(n, generator=gen)
        rows += [(qi, ci, float(labels[ci]), float(ties[ci]), float(scores[ci])) for ci in range(n)]
    table = torch.tensor(rows)
    width = max(sizes)
    grid = {name: torch.zeros(len(sizes), width) for name in ("label", "tie", "score")}
    mask = torch.zeros(len(sizes), width, dtype=torch.bool)
    for qi, ci, label, tie, score in rows:
        grid["label"][qi, ci], grid["tie"][qi, ci], grid["score"][qi, ci] = label, tie, score
        mask[qi, ci] = True
    expected = ranking_metrics(grid["score"], grid["label"], mask, k=3, tie_order=grid["tie"].long())

    shuffled = table[torch.randperm(len(table), generator=gen)]
    padded = torch.cat([shuffled, shuffled[:4]])
    got = mean_metrics_from_rows(padded, k=3)
    for name, values in expected.items():
        assert got[name].item() == pytest.approx(values.mean().item(), abs=1e-6), name
