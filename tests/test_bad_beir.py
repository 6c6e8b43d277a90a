"""Malformed BEIR folders and TREC runs given to `evaluate` (as a user runs it, a subprocess): each ends in
one `error:` line naming the file, line and field (exit 2), or with --on-error skip in a counted skip."""

import json

import pytest

from cli_run import describe, error_line, run_module
from tiny_export import write_tiny_export

EVALUATE = "rerank_lightning.eval.evaluate"
CORPUS = [{"_id": f"d{i}", "title": "", "text": f"passage {i}"} for i in range(6)]
QUERIES = [{"_id": "1", "text": "first query"}, {"_id": "2", "text": "second query"}]
QRELS = "query-id\tcorpus-id\tscore\n1\td0\t2\n1\td3\t1\n2\td1\t1\n"
RUN = "".join(f"1 Q0 d{i} {i + 1} {10 - i} bm25\n" for i in range(5)) + \
    "".join(f"2 Q0 d{i} {i} {10 - i} bm25\n" for i in range(1, 4))


@pytest.fixture(scope="module")
def export(tmp_path_factory, mistral_tokenizer):
    return write_tiny_export(tmp_path_factory.mktemp("export"), mistral_tokenizer)


def write_beir(root, corpus=None, queries=None, qrels=QRELS, run=RUN):
    (root / "beir" / "qrels").mkdir(parents=True)
    lines = lambda objs: "".join(o if isinstance(o, str) else json.dumps(o) + "\n" for o in objs)  # noqa: E731
    # surrogateescape: a test can put a byte that is not UTF-8 in the corpus ("\udce9" -> b"\xe9")
    (root / "beir" / "corpus.jsonl").write_bytes(lines(CORPUS if corpus is None else corpus).encode(
        "utf-8", "surrogateescape"))
    (root / "beir" / "queries.jsonl").write_text(lines(QUERIES if queries is None else queries))
    (root / "beir" / "qrels" / "test.tsv").write_text(qrels)
    (root / "run.trec").write_text(run)
    return root / "beir", root / "run.trec"


def evaluate(export, tmp_path, *extra, **files):
    beir, run = write_beir(tmp_path, **files)
    return run_module(EVALUATE, [export, "--beir", beir, "--run", run, *extra], tmp_path)


CASES = {
    "corpus invalid JSON": (dict(corpus=[CORPUS[0], '{"_id": "d1", "text": \n', *CORPUS[2:]]),
                            ["corpus.jsonl:2:", "invalid JSON"]),
    "queries invalid JSON": (dict(queries=["{'_id': '1'}\n", QUERIES[1]]), ["queries.jsonl:1:", "invalid JSON"]),
    "corpus line without _id": (dict(corpus=[*CORPUS[:2], {"text": "no id"}, *CORPUS[2:]]),
                                ["corpus.jsonl:3:", "field '_id'", "expected a non-empty string"]),
    "corpus text not a string": (dict(corpus=[*CORPUS[:3], {"_id": "d3", "text": None}, *CORPUS[4:]]),
                                 ["corpus.jsonl:4:", "field 'text'", "expected a string"]),
    "query without text": (dict(queries=[QUERIES[0], {"_id": "2"}]), ["queries.jsonl:2:", "field 'text'"]),
    "corpus not UTF-8": (dict(corpus=[CORPUS[0], '{"_id": "d1", "text": "caf\udce9"}\n']),
                         ["corpus.jsonl:2:", "UTF-8"]),
    "non-numeric run score": (dict(run=RUN.replace("1 Q0 d1 2 9 bm25", "1 Q0 d1 2 high bm25")),
                              ["run.trec:2:", "field 'score'", "expected a number", "'high'"]),
    "infinite run score": (dict(run=RUN.replace("1 Q0 d1 2 9 bm25", "1 Q0 d1 2 inf bm25")),
                           ["run.trec:2:", "field 'score'"]),
    "run line with 4 columns": (dict(run=RUN + "2 d5 4 1.0\n"), ["run.trec:9:", "expected 6 columns", "got 4"]),
    "duplicated run line": (dict(run=RUN + "1 Q0 d2 6 1.0 bm25\n"),
                            ["run.trec:9:", "'d2' appears twice for query '1'", "first on line 3"]),
    "run docid absent from corpus": (dict(run=RUN + "2 Q0 d77 4 0.5 bm25\n"),
                                     ["run.trec:9:", "document 'd77' is not in", "corpus.jsonl"]),
    "run query absent from queries": (dict(run=RUN + "9 Q0 d0 1 1.0 bm25\n", qrels=QRELS + "9\td0\t1\n"),
                                      ["run.trec:9:", "query '9' is not in", "queries.jsonl"]),
    "qrels bad grade": (dict(qrels=QRELS + "2\td2\thigh\n"),
                        ["test.tsv:5:", "field 'score'", "expected an integer grade", "'high'"]),
    "qrels wrong columns": (dict(qrels=QRELS + "2 0 d2 1\n"), ["test.tsv:5:", "query-id<TAB>corpus-id<TAB>score"]),
    "qrels judged twice": (dict(qrels=QRELS + "1\td0\t0\n"), ["test.tsv:5:", "'d0' is judged twice"]),
    "no run query has qrels": (dict(qrels="query-id\tcorpus-id\tscore\n7\td0\t1\n"),
                               ["run.trec", "no query left", "run queries without qrels"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_beir_input_is_one_error_line(export, tmp_path, case):
    files, fragments = CASES[case]
    error_line(evaluate(export, tmp_path, **files), *fragments)


def test_missing_split_folder_run_and_export(export, tmp_path):
    beir, run = write_beir(tmp_path)
    error_line(run_module(EVALUATE, [export, "--beir", beir, "--run", run, "--split", "dev"], tmp_path),
               "qrels/dev.tsv", "no qrels for split 'dev'", "splits found: ['test']")
    error_line(run_module(EVALUATE, [export, "--beir", tmp_path / "nope", "--run", run], tmp_path),
               "nope", "no such BEIR folder")
    error_line(run_module(EVALUATE, [export, "--beir", beir, "--run", tmp_path / "nope.trec"], tmp_path),
               "nope.trec", "no such run file")
    error_line(run_module(EVALUATE, [tmp_path, "--beir", beir, "--run", run], tmp_path),
               "is not an exported reranker")


def test_skip_counts_every_dropped_line_and_query(export, tmp_path):
    """--on-error skip: nothing dropped silently; the counts come in the JSON output and on stderr."""
    run = (RUN + "1 Q0 d2 6 1.0 bm25\n"   # duplicate (first kept)
           + "2 Q0 d77 4 0.5 bm25\n"      # not in the corpus
           + "9 Q0 d0 1 1.0 bm25\n"       # query not in queries.jsonl (it has qrels)
           + "8 Q0 d0 1 1.0 bm25\n"       # query without qrels: not evaluated, as trec_eval
           + "2 Q0 d5 x 1.0\n")           # malformed
    proc = evaluate(export, tmp_path, "--on-error", "skip", "--json", tmp_path / "m.json",
                    run=run, qrels=QRELS + "9\td0\t1\n")
    assert proc.returncode == 0, describe(proc)
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["queries"] == 2
    assert result["skipped"] == {"duplicate run lines": 1, "malformed run lines": 1,
                                 "run queries without qrels (not evaluated)": 1,
                                 "run queries not in queries.jsonl": 1,
                                 "run lines with a document not in the corpus": 1}
    assert proc.stderr.count("1 duplicate run lines") == 1, describe(proc)  # said once, with the files
    assert {"nDCG@10", "RR@10", "MRR@10", "MAP", "Recall@100", "Judged@10"} <= set(result)


@pytest.mark.parametrize("recipe, fragments", [
    ('{"format_version": 99, "recipe": "instruction"}', ["unsupported recipe 'instruction' version 99"]),
    ('{"format_version": 1, "recipe": "listwise-t5"', ["reranker_config.json:1", "not valid JSON"]),
    ('["instruction"]', ["expected a JSON object"]),
])
def test_a_broken_export_config_is_one_error_line(export, tmp_path, recipe, fragments):
    beir, run = write_beir(tmp_path)
    broken = tmp_path / "broken_export"
    broken.mkdir()
    (broken / "reranker_config.json").write_text(recipe)
    error_line(run_module(EVALUATE, [broken, "--beir", beir, "--run", run], tmp_path), *fragments)
