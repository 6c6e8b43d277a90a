"""Evaluation inputs (SPEC 8): candidate-list files and BEIR folders with a TREC run."""

import json

import pytest

from rerank_lightning.data import DataFormatError, load_beir_rerank, load_candidate_lists


def test_wikiqa_candidate_lists_load(shared_data):
    lists = load_candidate_lists(shared_data / "wikiqa" / "dev_rerank_candidates.jsonl")
    assert len(lists) == 122  # every WikiQA dev question (README of ../shared/data)
    first = lists[0]
    assert first.qid and first.query and len(first.docids) == len(first.texts) == len(first.labels)
    assert all(any(label >= 1 for label in cl.labels) for cl in lists)
    assert len(load_candidate_lists(shared_data / "wikiqa" / "dev_rerank_candidates.jsonl", max_queries=5)) == 5


@pytest.mark.parametrize("candidate, field", [
    ({"docid": "d1", "text": "", "label": 1}, "candidates[0].text"),
    ({"docid": "d1", "text": "x", "label": "1"}, "candidates[0].label"),
    ({"docid": "d1", "text": "x", "label": True}, "candidates[0].label"),
    ("just text", "candidates[0]"),
])
def test_bad_candidate_names_file_line_and_field(tmp_path, candidate, field):
    path = tmp_path / "cands.jsonl"
    good = {"qid": "q0", "query": "q", "candidates": [{"docid": "a", "text": "t", "label": 0}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"qid": "q1", "query": "q", "candidates": [candidate]}) + "\n")
    with pytest.raises(DataFormatError) as err:
        load_candidate_lists(path)
    assert f"{path}:2:" in str(err.value) and field in str(err.value)


def test_duplicate_docids_are_an_error(tmp_path):
    path = tmp_path / "cands.jsonl"
    cands = [{"docid": "a", "text": "t", "label": 0}, {"docid": "a", "text": "u", "label": 1}]
    path.write_text(json.dumps({"qid": "q", "query": "q", "candidates": cands}) + "\n")
    with pytest.raises(DataFormatError, match="unique"):
        load_candidate_lists(path)


def test_beir_folder_and_trec_run_become_candidate_lists(tmp_path):
    """Top-k of the run per query, ordered by run score; labels from qrels, 0 where unjudged;
    queries without qrels are dropped; titles are prefixed to the text."""
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": f"T{i}", "text": f"text {i}"} for i in range(5)]
    (beir / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "1", "text": "first"}) + "\n"
                                        + json.dumps({"_id": "2", "text": "second"}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\td3\t2\n1\td0\t1\n")
    run = tmp_path / "run.trec"
    run.write_text("".join(f"1 Q0 d{i} {r} {s} bm25\n" for r, (i, s) in enumerate([(0, 1.5), (3, 9.0), (4, 3.0), (1, 0.5)]))
                   + "2 Q0 d1 1 5.0 bm25\n")
    lists = load_beir_rerank(beir, run, split="test", top_k=3)
    assert [cl.qid for cl in lists] == ["1"]  # query 2 has no qrels
    (cl,) = lists
    assert cl.query == "first"
    assert cl.docids == ("d3", "d4", "d0")  # by run score, cut at top_k
    assert cl.labels == (2, 0, 1)
    assert cl.texts[0] == "T3 text 3"


def test_malformed_run_line_names_the_line(tmp_path):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text(json.dumps({"_id": "d0", "text": "x"}) + "\n")
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "1", "text": "q"}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\td0\t1\n")
    run = tmp_path / "run.trec"
    run.write_text("1 Q0 d0 1 2.0 bm25\n1 d0 1 2.0\n")
    with pytest.raises(DataFormatError, match=r"run\.trec:2:"):
        load_beir_rerank(beir, run)
