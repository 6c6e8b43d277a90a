"""BEIR folder + TREC run: the project's metrics equal trec_eval's (pytrec_eval) with the full qrels, on the
real TREC DL20 BM25 top-100 run (unjudged documents, relevant documents the run misses), with random
scores full of ties, and with documents missing from the corpus."""

import random
import shutil
from collections import Counter

import pytest
import pytrec_eval
import torch

from rerank_lightning.data.beir import read_qrels, trec_order
from rerank_lightning.data.candidates import load_beir_rerank
from rerank_lightning.eval.evaluate import metrics_for_scores, per_query_metrics_for_scores

RUN = "run.dl20.bm25.top100.trec"


@pytest.fixture(scope="module")
def dl20(shared_data):
    root = shared_data / "trec_dl20"
    run: dict[str, dict[str, float]] = {}
    for line in (root / RUN).read_text().splitlines():
        qid, _, docid, _, score, _ = line.split()
        run.setdefault(qid, {})[docid] = float(score)
    return root, run, read_qrels(root / "qrels" / "test.tsv")


def trec_eval_per_query(qrels, run, threshold, k=10):
    """{metric: {qid: value}} from pytrec_eval (trec_eval's code), in the project's metric names."""
    measures = {"recip_rank", f"ndcg_cut.{k}", "map", "recall.100"}
    res = pytrec_eval.RelevanceEvaluator(qrels, measures, relevance_level=threshold).evaluate(run)
    out = {f"nDCG@{k}": {}, f"RR@{k}": {}, "MAP": {}, "Recall@100": {}, f"Judged@{k}": {}}
    for qid, r in res.items():
        out[f"nDCG@{k}"][qid] = r[f"ndcg_cut_{k}"]
        out[f"RR@{k}"][qid] = r["recip_rank"] if r["recip_rank"] >= 1 / k - 1e-12 else 0.0  # RR cut at k
        out["MAP"][qid] = r["map"]
        out["Recall@100"][qid] = r["recall_100"]
        # Judged@k by its definition, on trec_eval's order (score desc, docid desc)
        top = trec_order([(s, d) for d, s in run[qid].items()])[:k]
        out[f"Judged@{k}"][qid] = sum(d in qrels[qid] for _, d in top) / len(top)
    return out


def assert_equal_to_trec_eval(lists, scores, qrels, run, threshold):
    ours = per_query_metrics_for_scores(lists, scores, relevance_threshold=threshold)
    ref = trec_eval_per_query(qrels, run, threshold)
    assert sorted(ref["MAP"]) == sorted(cl.qid for cl in lists)  # the same queries are evaluated
    for name, by_qid in ref.items():
        expected = torch.tensor([by_qid[cl.qid] for cl in lists], dtype=torch.float64)
        torch.testing.assert_close(ours[name].double(), expected, atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(ours["MRR@10"], ours["RR@10"])
    return ours


@pytest.mark.parametrize("threshold", [2, 1])
def test_bm25_run_itself_equals_trec_eval(dl20, threshold):
    root, run, qrels = dl20
    lists = load_beir_rerank(root, root / RUN, "test", top_k=100)
    scores = [run[cl.qid][d] for cl in lists for d in cl.docids]
    ours = assert_equal_to_trec_eval(lists, scores, qrels, run, threshold)
    # the run really has unjudged candidates and relevant documents it did not retrieve
    assert (ours["Judged@10"] < 1).any() and (ours["Recall@100"] < 1).any()
    # judged among the candidates only (the old meaning) would overrate the run: the full qrels matter
    local = [cl.__class__(cl.qid, cl.query, cl.docids, cl.texts, cl.labels) for cl in lists]
    assert metrics_for_scores(local, scores, relevance_threshold=threshold)["MAP"] > \
        metrics_for_scores(lists, scores, relevance_threshold=threshold)["MAP"] + 0.05


@pytest.mark.parametrize("seed", [0, 1])
def test_random_scores_with_ties_equal_trec_eval(dl20, seed):
    """Three score values for 100 documents per query: most ranks are decided by trec_eval's docid rule."""
    root, run, qrels = dl20
    lists = load_beir_rerank(root, root / RUN, "test", top_k=100)
    rng = random.Random(seed)
    scores = [rng.choice([0.0, 1.0, 2.5]) for cl in lists for _ in cl.docids]
    tied_run, start = {}, 0
    for cl in lists:
        tied_run[cl.qid] = dict(zip(cl.docids, scores[start : start + len(cl.docids)]))
        start += len(cl.docids)
    assert_equal_to_trec_eval(lists, scores, qrels, tied_run, threshold=2)


def test_top_k_cut_and_missing_corpus_documents_equal_trec_eval_of_what_is_reranked(dl20, tmp_path):
    """Documents missing from the corpus are skipped (counted) with on_error=skip; the metrics are
    trec_eval's on the run that remains, still with the full qrels."""
    root, run, qrels = dl20
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    shutil.copy(root / "queries.jsonl", beir / "queries.jsonl")
    shutil.copy(root / "qrels" / "test.tsv", beir / "qrels" / "test.tsv")
    relevant_retrieved = sorted({d for q in run for d in run[q] if qrels[q].get(d, 0) >= 2})
    gone = set(random.Random(0).sample(relevant_retrieved, 15))
    lines = (root / "corpus.jsonl").read_text().splitlines(keepends=True)
    (beir / "corpus.jsonl").write_text("".join(line for line in lines if line[9:].split('"')[0] not in gone))
    skipped = Counter()
    lists = load_beir_rerank(beir, root / RUN, "test", top_k=50, on_error="skip", skipped=skipped)
    kept = {cl.qid: {d: run[cl.qid][d] for d in cl.docids} for cl in lists}
    in_top50 = sum(d in gone for q in run for _, d in trec_order([(s, d) for d, s in run[q].items()])[:50])
    assert skipped == Counter({"run lines with a document not in the corpus": in_top50}) and in_top50 > 0
    assert all(len(cl.docids) <= 50 for cl in lists)
    assert_equal_to_trec_eval(lists, [kept[cl.qid][d] for cl in lists for d in cl.docids], qrels, kept, 2)
