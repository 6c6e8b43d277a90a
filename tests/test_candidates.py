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


def write_beir_from_candidates(lists, root):
    """A BEIR folder and a run holding exactly the given candidate lists (run order = list order)."""
    (root / "qrels").mkdir(parents=True)
    corpus, queries, qrels, run = [], [], ["query-id\tcorpus-id\tscore"], []
    for cl in lists:
        queries.append(json.dumps({"_id": cl.qid, "text": cl.query}))
        for rank, (docid, text, label) in enumerate(zip(cl.docids, cl.texts, cl.labels)):
            corpus.append(json.dumps({"_id": docid, "text": text}))
            qrels.append(f"{cl.qid}\t{docid}\t{label}")
            run.append(f"{cl.qid} Q0 {docid} {rank + 1} {100 - rank} test")
    (root / "corpus.jsonl").write_text("\n".join(corpus) + "\n")
    (root / "queries.jsonl").write_text("\n".join(queries) + "\n")
    (root / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n")
    (root / "run.trec").write_text("\n".join(run) + "\n")


def test_validation_on_beir_and_run_equals_candidate_lists(tmp_path, mistral_tokenizer, tiny_model_cfg, capsys):
    """SPEC 8: `data.val_beir` (and `evaluate --run`) rerank a run the way candidate lists are reranked."""
    import lightning as L

    from conftest import ROOT
    from rerank_lightning.data import RerankDataModule
    from rerank_lightning.eval.evaluate import main as evaluate_main
    from rerank_lightning.inference import export_reranker
    from rerank_lightning.model import RerankerModule

    cands = ROOT / "data" / "sample" / "val_candidates.jsonl"
    lists = load_candidate_lists(cands, max_queries=6)
    write_beir_from_candidates(lists, tmp_path / "beir")
    beir = {"dir": str(tmp_path / "beir"), "run": str(tmp_path / "beir" / "run.trec"), "split": "test"}
    common = dict(train_data=str(ROOT / "data" / "sample" / "train.jsonl"), train_group_size=2, max_val_queries=6)
    results = []
    module = None
    for val in ({"val_data": str(cands)}, {"val_beir": beir}):
        dm = RerankDataModule(mistral_tokenizer, **common, **val)
        if module is None:
            module = RerankerModule(tiny_model_cfg, dm.formatter.yes_id, dm.formatter.no_id, len(mistral_tokenizer))
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        results.append(trainer.validate(module, datamodule=dm, verbose=False)[0])
    assert results[0] == pytest.approx(results[1], abs=1e-6)
    with pytest.raises(ValueError, match="not both"):
        RerankDataModule(mistral_tokenizer, **common, val_data=str(cands), val_beir=beir)

    export_reranker(module.lm, dm.formatter, tmp_path / "export")
    evaluate_main([str(tmp_path / "export"), beir["dir"], "--run", beir["run"]])
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{"):])
    for name in ("MRR@10", "nDCG@10", "MAP"):
        assert printed[name] == pytest.approx(results[0][f"val/{name}"], abs=1e-5), name
