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
    from rerank_lightning.data.candidates import docid_tie_order
    from rerank_lightning.eval.metrics import ranking_metrics
except ImportError:  # package not installed: use the src layout directly
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from rerank_lightning.data.candidates import docid_tie_order
    from rerank_lightning.eval.metrics import ranking_metrics

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
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank", f"ndcg_cut.{k}", "map", "recall.100"},
                                        relevance_level=int(threshold))
    res = ev.evaluate(run)
    qids = list(run)
    assert set(res) == set(qids)
    # recip_rank has no cut in trec_eval: MRR@k is 1/rank if that rank is <= k, else 0
    mrr = [res[q]["recip_rank"] if res[q]["recip_rank"] >= 1.0 / k - 1e-12 else 0.0 for q in qids]
    ndcg = [res[q][f"ndcg_cut_{k}"] for q in qids]
    ap = [res[q]["map"] for q in qids]
    recall = [res[q]["recall_100"] for q in qids]
    return tuple(torch.tensor(v, dtype=torch.float64) for v in (mrr, ndcg, ap, recall))


def assert_close(actual, expected):
    torch.testing.assert_close(actual.double(), torch.as_tensor(expected, dtype=torch.float64), atol=TOL, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("threshold", [1, 2])
@pytest.mark.parametrize("k", [10, 5, 100])
def test_random_against_pytrec_eval(seed, threshold, k):
    scores, labels, mask, docids = random_case(seed)
    out = ranking_metrics(scores, labels, mask, k=k, relevance_threshold=threshold,
                          tie_order=docid_tie_order(docids, width=scores.shape[1]))
    mrr, ndcg, ap, recall = pytrec_reference(*to_trec(scores, labels, mask, docids), k=k, threshold=threshold)
    assert set(out) == {f"RR@{k}", f"MRR@{k}", f"nDCG@{k}", "MAP", "Recall@100", f"Judged@{k}"}
    assert all(v.dtype == torch.float32 and v.shape == (scores.shape[0],) for v in out.values())
    assert_close(out[f"MRR@{k}"], mrr)
    assert torch.equal(out[f"RR@{k}"], out[f"MRR@{k}"])
    assert_close(out["Recall@100"], recall)
    assert torch.equal(out[f"Judged@{k}"], torch.ones(scores.shape[0]))  # every candidate carries a label
    assert_close(out[f"nDCG@{k}"], ndcg)
    assert_close(out["MAP"], ap)
    # the random cases really exercise ties and empty queries
    assert (out["MAP"] == 0).any() and (out["MAP"] > 0).any()
    # each metric alone (the top-k and counting paths) agrees with trec_eval as well
    for name, expected in (("MRR", mrr), ("nDCG", ndcg), ("MAP", ap)):
        alone = ranking_metrics(scores, labels, mask, k=k, relevance_threshold=threshold,
                                tie_order=docid_tie_order(docids, width=scores.shape[1]), metrics=(name,))
        assert len(alone) == 1
        assert_close(next(iter(alone.values())), expected)


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


# --- the exact int64 rank key and the paths that use it ------------------------------------------------

SPECIAL = [0.0, -0.0, 0.5, 1.0, -1.0, 1e-40, -1e-40, float("inf"), float("-inf"), float("nan"), -float("nan")]


def tied_case(seed, num_queries=40, num_cands=50, dtype=torch.float32, padded=True, ties=True, special=False):
    """Scores drawn from a few levels (or with signed zeros, denormals, infinities and NaNs of both
    signs), labels -1..3, optional padding with garbage and a tie order with repeated values."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.tensor(SPECIAL if special else [-2.0, 0.0, 0.25, 0.5, 1.0, 3.0])
    scores = levels[torch.randint(0, len(levels), (num_queries, num_cands), generator=gen)]
    scores = scores.to(dtype)
    if not ties:
        scores = torch.randn(num_queries, num_cands, generator=gen).to(dtype)
    labels = torch.randint(-1, 4, (num_queries, num_cands), generator=gen)
    mask = None
    if padded:
        mask = torch.arange(num_cands) < torch.randint(0, num_cands + 1, (num_queries, 1), generator=gen)
        scores = scores.masked_fill(~mask, 7.0)
        labels = labels.masked_fill(~mask, 3)
    tie_order = torch.randint(-3, 4, (num_queries, num_cands), generator=gen)  # many repeats
    return scores, labels, mask, tie_order


def sort_path(monkeypatch, *args, **kwargs):
    """ranking_metrics through the successive stable sorts only (the reference order)."""
    import rerank_lightning.eval.metrics as metrics_module

    with monkeypatch.context() as patch:
        patch.setattr(metrics_module, "_rank_key", lambda *a: None)
        return ranking_metrics(*args, **kwargs)


SUBSETS = [("MRR",), ("nDCG",), ("MAP",), ("MRR", "nDCG"), ("MRR", "MAP"), ("nDCG", "MAP"), ("MRR", "nDCG", "MAP")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("with_tie_order", [False, True])
@pytest.mark.parametrize("special", [False, True])
def test_fast_paths_equal_sort_path(monkeypatch, dtype, padded, with_tie_order, special):
    """Top-k (MRR + nDCG), counting (MRR alone) and single-sort (MAP) paths give bit-identical values
    to the three stable sorts, ties, padding, NaN / signed zeros / infinities included."""
    import rerank_lightning.eval.metrics as metrics_module

    for seed in range(3):
        scores, labels, mask, tie_order = tied_case(seed, dtype=dtype, padded=padded, special=special)
        tie_order = tie_order if with_tie_order else None
        assert metrics_module._rank_key(scores.to(torch.promote_types(dtype, torch.float32)), mask,
                                        tie_order) is not None  # the fast path really runs
        for k in (1, 3, 10, 50, 80):
            for threshold in (1, 2.5):
                args = (scores, labels, mask)
                kwargs = dict(k=k, relevance_threshold=threshold, tie_order=tie_order)
                reference = sort_path(monkeypatch, *args, **kwargs)
                for subset in SUBSETS:
                    got = ranking_metrics(*args, metrics=subset, **kwargs)
                    assert list(got) == [name for name in reference if name.split("@")[0] in subset]
                    for name, values in got.items():
                        assert torch.equal(values, reference[name]), (seed, k, threshold, subset, name)


def test_fast_paths_float_labels_and_no_relevant(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 3, (30, 20), generator=gen).float()
    labels = torch.rand(30, 20, generator=gen) * 3 - 0.5  # float grades, some <= 0
    labels[:5] = 0.0  # queries without any relevant candidate
    mask = torch.rand(30, 20, generator=gen) < 0.7
    reference = sort_path(monkeypatch, scores, labels, mask, k=5, relevance_threshold=1.5)
    assert (reference["MRR@5"][:5] == 0).all() and (reference["MRR@5"][5:] > 0).any()
    for subset in SUBSETS:
        for name, values in ranking_metrics(scores, labels, mask, k=5, relevance_threshold=1.5,
                                            metrics=subset).items():
            assert torch.equal(values, reference[name]), (subset, name)


def test_rank_key_orders_like_the_stable_sorts():
    from rerank_lightning.eval.metrics import _rank_key, _ranking_order

    for seed, special in ((0, False), (1, True)):
        scores, _, mask, tie_order = tied_case(seed, special=special)
        for tie in (None, tie_order, -tie_order):
            key = _rank_key(scores, mask, tie)
            order = _ranking_order(scores, mask, tie)
            real = mask.gather(1, order)
            by_key = key.argsort(dim=1, descending=True)
            # same order over the real candidates (padding comes last in both, in any order)
            assert torch.equal(torch.where(real, by_key, -1), torch.where(real, order, -1))
            # real candidates of a row never share a key
            ranked = key.gather(1, by_key)
            assert ((ranked[:, :-1] > ranked[:, 1:]) | ~real[:, 1:]).all()


def test_rank_key_falls_back_where_it_cannot_be_exact():
    """float64 scores that float32 would merge, a huge tie_order range, float tie orders: no int64 key,
    and the sort path still ranks them correctly."""
    from rerank_lightning.eval.metrics import _rank_key

    base = torch.tensor([[1.0, 1.0 + 1e-12, 1.0 - 1e-12, 0.5]], dtype=torch.float64)  # distinct in float64 only
    assert base.float().unique().numel() == 2
    assert _rank_key(base, None, None) is None
    labels = torch.tensor([[0, 1, 0, 0]])
    out = ranking_metrics(base, labels, k=10)
    assert out["MRR@10"].item() == 1.0  # 1 + 1e-12 ranks first, not tied with 1.0
    assert ranking_metrics(base, labels, k=10, metrics=("MRR",))["MRR@10"].item() == 1.0
    # the non-representable value is padding: it does not matter, the key is exact
    assert _rank_key(base, torch.tensor([[True, False, False, True]]), None) is not None

    scores = torch.ones(1, 3)
    labels = torch.tensor([[0, 0, 1]])
    huge = torch.tensor([[0, -(2**40), 2**40]])
    assert _rank_key(scores, None, huge) is None
    assert ranking_metrics(scores, labels, tie_order=huge, metrics=("MRR",))["MRR@10"].item() == 1.0
    assert _rank_key(scores, None, huge.double()) is None
    assert _rank_key(scores, None, torch.tensor([[0, 1, 2]])) is not None


def test_metrics_selection():
    scores, labels, mask, tie_order = tied_case(0, num_queries=4, num_cands=6)
    assert list(ranking_metrics(scores, labels, mask, k=3)) == ["RR@3", "MRR@3", "nDCG@3", "MAP", "Recall@100",
                                                                "Judged@3"]
    assert list(ranking_metrics(scores, labels, mask, k=3, metrics="Recall", recall_k=5)) == ["Recall@5"]
    assert list(ranking_metrics(scores, labels, mask, k=3, metrics=("MAP", "MRR"))) == ["MRR@3", "MAP"]
    assert list(ranking_metrics(scores, labels, mask, k=3, metrics="nDCG")) == ["nDCG@3"]
    for bad in ((), ("MRR@10",), ("ndcg",)):
        with pytest.raises(ValueError, match="metrics must be"):
            ranking_metrics(scores, labels, mask, metrics=bad)
    # no candidates at all: zeros, whatever is asked
    empty = ranking_metrics(torch.zeros(2, 0), torch.zeros(2, 0), metrics=("MRR", "nDCG"))
    assert list(empty) == ["MRR@10", "nDCG@10"]
    assert all(torch.equal(v, torch.zeros(2)) for v in empty.values()) and len(empty) == 2


def test_per_query_metrics_for_candidate_lists_and_their_mean():
    """eval.evaluate: per-query metrics in the lists' order; the mean is metrics_for_scores; a score
    count that does not match the candidates is refused instead of silently misaligned."""
    from rerank_lightning.data.candidates import CandidateList
    from rerank_lightning.eval.evaluate import metrics_for_scores, per_query_metrics_for_scores
    from rerank_lightning.inference.reranker import default_device

    lists = [CandidateList("a", "q1", ("d1", "d2"), ("t1", "t2"), (0, 1)),
             CandidateList("b", "q2", ("d3", "d4", "d5"), ("t3", "t4", "t5"), (1, 0, 0))]
    scores = [0.9, 0.1, 0.8, 0.2, 0.3]  # q1: the relevant one ranked 2nd; q2: ranked 1st
    per_query = per_query_metrics_for_scores(lists, scores)
    assert per_query["MRR@10"].tolist() == [0.5, 1.0]
    assert metrics_for_scores(lists, scores)["MRR@10"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="4 scores for 5 candidates"):
        per_query_metrics_for_scores(lists, scores[:4])
    assert default_device("cpu") == torch.device("cpu")
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
