"""Hard-negative mining (`rerank-lightning mine`) on a small BEIR folder written here."""

import json

import pytest

from cli_run import error_line, run_module
from rerank_lightning.commands.mine import main as mine_main
from rerank_lightning.data.beir import read_beir, read_run
from rerank_lightning.data.mining import MiningReport, MiningSettings, bm25_run, mine

N_DOCS = 60


def write_beir(root, qrels_rows, corpus=None, queries=None):
    root.mkdir(parents=True, exist_ok=True)
    corpus = corpus if corpus is not None else [{"_id": f"d{i}", "title": "", "text": f"passage number {i} about topic {i % 7}"}
                                                for i in range(N_DOCS)]
    queries = queries if queries is not None else [{"_id": f"q{i}", "text": f"what about topic {i}"} for i in range(4)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels").mkdir(exist_ok=True)
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in qrels_rows))
    return root


def write_run(path, ranking):
    """ranking: qid -> docids best first."""
    lines = [f"{q} Q0 {d} {r + 1} {100.0 - r} bm25\n" for q, docs in ranking.items() for r, d in enumerate(docs)]
    path.write_text("".join(lines))
    return path


# q0: graded judgments spread over the ranking; q1: no positive at all (only grade 0);
# q2: positives, but only 2 unjudged docs inside ranks 5-10; q3: judged but absent from the run.
QRELS = [("q0", "d3", 3), ("q0", "d12", 2), ("q0", "d15", 1), ("q0", "d20", 0), ("q0", "d40", 2),
         ("q1", "d1", 0), ("q1", "d2", 0),
         ("q2", "d5", 2), ("q2", "d7", 1), ("q2", "d8", 1), ("q2", "d9", 1), ("q3", "d0", 1)]
RUN = {"q0": [f"d{i}" for i in range(50)], "q1": [f"d{i}" for i in range(50)], "q2": [f"d{i}" for i in range(10)]}


@pytest.fixture()
def beir(tmp_path):
    root = write_beir(tmp_path / "beir", QRELS)
    return root, write_run(tmp_path / "run.trec", RUN)


def mined(beir, **settings):
    root, run_path = beir
    collection = read_beir(root)
    report = MiningReport()
    records = {r["qid"]: r for r in mine(collection, read_run(run_path, collection.corpus),
                                         MiningSettings(**settings), progress=False, report=report)}
    return records, report, collection


def test_never_a_judged_positive_as_negative_and_ranks_in_range(beir):
    records, _, collection = mined(beir, negatives=20, rank_range=(2, 45), min_grade=2)
    q0 = records["q0"]
    assert q0["pos_ids"] == ["d3", "d12", "d40"]  # grade >= 2, best grade first
    assert [collection.corpus[d] for d in q0["pos_ids"]] == q0["pos"]
    assert [collection.corpus[d] for d in q0["neg_ids"]] == q0["neg"]
    judged = dict((d, g) for q, d, g in QRELS if q == "q0")
    assert all(judged.get(d, 0) < 2 for d in q0["neg_ids"])
    ranks = {d: r + 1 for r, d in enumerate(RUN["q0"])}
    assert all(2 <= ranks[d] <= 45 for d in q0["neg_ids"]) and len(q0["neg_ids"]) == 20
    assert len(set(q0["neg_ids"])) == 20


def test_max_negative_grade_keeps_partly_relevant_docs_out(beir):
    records, _, _ = mined(beir, negatives=40, rank_range=(1, 50), min_grade=2, max_negative_grade=0)
    assert "d15" not in records["q0"]["neg_ids"]  # judged 1
    assert "d20" in records["q0"]["neg_ids"]      # judged 0: a judged negative is fine
    records, _, _ = mined(beir, negatives=40, rank_range=(1, 50), min_grade=2)
    assert "d15" in records["q0"]["neg_ids"]


def test_judged_only_takes_the_judged_negatives(beir):
    records, _, _ = mined(beir, negatives=40, rank_range=(1, 50), min_grade=2, judged_only=True)
    assert records["q0"]["neg_ids"] == ["d15", "d20"]  # the judged docs below grade 2, in rank order


def test_seed_decides_the_sample_and_a_query_does_not_depend_on_the_others(beir, tmp_path):
    a, _, _ = mined(beir, negatives=5, seed=1)
    b, _, _ = mined(beir, negatives=5, seed=1)
    c, _, _ = mined(beir, negatives=5, seed=2)
    assert a == b and a["q0"]["neg_ids"] != c["q0"]["neg_ids"]
    alone = write_beir(tmp_path / "alone", [row for row in QRELS if row[0] == "q0"])
    only_q0, _, _ = mined((alone, beir[1]), negatives=5, seed=1)
    assert only_q0["q0"] == a["q0"]


def test_skipped_and_short_queries_are_counted(beir):
    records, report, _ = mined(beir, negatives=4, rank_range=(5, 10), min_grade=1)
    assert set(records) == {"q0", "q2"}
    assert records["q2"]["neg_ids"] == ["d4", "d6"]  # ranks 5-10 are d4..d9; d5, d7, d8, d9 are judged >= 1
    assert report.written == 2 and report.negatives == {4: 1, 2: 1}
    assert report.skipped == {"no positive with grade >= 1 in the corpus": 1, "not in the run": 1}
    line = report.line(MiningSettings(negatives=4, rank_range=(5, 10)))
    assert line.startswith("mined: 2 queries written, 2 skipped (")


def test_grades_written_on_request_and_records_load(beir, tmp_path):
    from rerank_lightning.data import load_records

    records, _, _ = mined(beir, negatives=30, rank_range=(1, 50), min_grade=2, write_grades=True)
    q0 = records["q0"]
    assert q0["pos_grades"] == [3, 2, 2] and set(q0["neg_grades"]) <= {0, 1}
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records.values()))
    loaded, _ = load_records(path)
    assert loaded[0].pos_grades == (3.0, 2.0, 2.0)


def test_teacher_drops_negatives_it_scores_above_a_positive(beir):
    root, run_path = beir
    collection = read_beir(root)
    text_to_id = {t: d for d, t in collection.corpus.items()}
    suspicious = {"d30", "d31", "d32"}

    def teacher(query, passages):  # positives 5, suspicious 9, the rest 1
        ids = [text_to_id[p] for p in passages]
        return [5.0 if d in {"d3", "d12", "d40"} else 9.0 if d in suspicious else 1.0 for d in ids]

    report = MiningReport()
    records = list(mine(collection, read_run(run_path, collection.corpus),
                        MiningSettings(negatives=40, rank_range=(1, 50), min_grade=2), teacher, False, report))
    q0 = next(r for r in records if r["qid"] == "q0")
    assert not suspicious & set(q0["neg_ids"]) and len(q0["neg_ids"]) > 30
    assert report.dropped_by_teacher >= 3


def test_bm25_ranks_the_matching_passage_first(tmp_path):
    corpus = [{"_id": "a", "text": "the giraffe has a long neck"}, {"_id": "b", "text": "volcanoes erupt lava"},
              {"_id": "c", "text": "penguins live in antarctica"}]
    root = write_beir(tmp_path / "b", [("q0", "b", 1)], corpus=corpus, queries=[{"_id": "q0", "text": "volcano lava"}])
    collection = read_beir(root)
    assert bm25_run(collection, ["q0"], 10, progress=False)["q0"][0] == "b"


def test_cli_writes_records_and_reports(beir, tmp_path, capsys):
    root, run_path = beir
    out = tmp_path / "out" / "train.jsonl"
    assert mine_main(["--beir", str(root), "--run", str(run_path), "--out", str(out), "--negatives", "3",
                      "--range", "1-50", "--min-grade", "2", "--no-progress"]) == 0
    assert "mined: 2 queries written" in capsys.readouterr().out
    assert [json.loads(line)["qid"] for line in out.read_text().splitlines()] == ["q0", "q2"]


@pytest.mark.parametrize("case, fragment", [
    ("unknown_docid", "run.trec:2: docid 'nope' is not in the corpus"),
    ("unknown_query", "qrels/test.tsv:2: query-id 'q9' is not in queries.jsonl"),
    ("empty_corpus", "corpus.jsonl: empty"),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, case, fragment):
    root = write_beir(tmp_path / "beir", [("q9", "d1", 1)] if case == "unknown_query" else QRELS,
                      corpus=[] if case == "empty_corpus" else None)
    run = write_run(tmp_path / "run.trec", {"q0": ["d1", "nope"]} if case == "unknown_docid" else RUN)
    assert mine_main(["--beir", str(root), "--run", str(run), "--out", str(tmp_path / "o.jsonl"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0]
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_input_from_the_shell(tmp_path):
    root = write_beir(tmp_path / "beir", QRELS)
    run = write_run(tmp_path / "run.trec", {"q0": ["d1", "nope"]})
    proc = run_module("rerank_lightning.commands.mine",
                      ["--beir", root, "--run", run, "--out", tmp_path / "o.jsonl"], tmp_path)
    error_line(proc, "docid 'nope' is not in the corpus")
