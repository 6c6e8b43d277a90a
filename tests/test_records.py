"""Training records (SPEC 1): where they come from, subsampling, and errors that name file, line and field."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rerank_lightning.data import DataFormatError, TrainRecord, load_records

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"query": "what is the capital of france", "pos": ["Paris is the capital of France."],
        "neg": ["Lyon is a city in France.", "Berlin is the capital of Germany."]}


def write_jsonl(path: Path, lines: list) -> Path:
    """Objects are dumped as JSON; strings are written verbatim (for broken lines)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def good(k: int, **extra) -> dict:
    return {"query": f"query number {k}", "pos": [f"positive {k}"], "neg": [f"negative {k}a", f"negative {k}b"],
            **extra}


def test_a_real_file_loads_into_validated_records(shared_data):
    """SPEC 1: FlagEmbedding's example file loads as-is, with scores and prompt kept."""
    path = shared_data / "flagembedding" / "reranker_prompt_based_examples.jsonl"
    records, report = load_records(path)
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) == len(raw) == 10
    for rec, obj in zip(records, raw):
        assert isinstance(rec, TrainRecord)
        assert rec.query == obj["query"]
        assert rec.pos == tuple(obj["pos"]) and rec.neg == tuple(obj["neg"])
        assert rec.pos_scores == tuple(obj["pos_scores"]) and rec.neg_scores == tuple(obj["neg_scores"])
        assert rec.prompt == obj["prompt"] and rec.has_teacher_scores
    assert report.kept == {str(path): 10} and report.skipped == []


def test_a_directory_loads_every_json_and_jsonl_file(tmp_path):
    """SPEC 1: a directory means every *.json / *.jsonl file in it (other files ignored)."""
    write_jsonl(tmp_path / "a.jsonl", [good(1), good(2)])
    write_jsonl(tmp_path / "b.json", [good(3)])  # JSON Lines content under a .json name
    (tmp_path / "c.json").write_text(json.dumps([good(4), good(5)]), encoding="utf-8")  # a JSON list
    (tmp_path / "notes.txt").write_text("not data", encoding="utf-8")
    records, report = load_records(tmp_path)
    assert sorted(r.query for r in records) == [f"query number {k}" for k in range(1, 6)]
    assert set(report.kept) == {str(tmp_path / n) for n in ("a.jsonl", "b.json", "c.json")}


def test_a_list_of_files_and_directories_loads_them_all(tmp_path, shared_data):
    """SPEC 1: `train_data` may be a list of files and directories."""
    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "x.jsonl", [good(1)])
    toy = shared_data / "flagembedding" / "llm_reranker_toy_finetune_data.jsonl"
    records, report = load_records([str(toy), d])
    assert len(records) == 11
    assert report.kept == {str(toy): 10, str(d / "x.jsonl"): 1}


def test_a_missing_path_is_an_error_naming_it(tmp_path):
    """SPEC 1: a path that is neither file nor directory is named in the error."""
    with pytest.raises(DataFormatError, match="nowhere.jsonl"):
        load_records(tmp_path / "nowhere.jsonl")


def test_max_example_num_subsamples_each_file_seeded(tmp_path):
    """SPEC 1: each file is subsampled to at most `max_example_num_per_dataset` records, seeded:
    the same seed gives the same subset, another seed another one."""
    a = write_jsonl(tmp_path / "a.jsonl", [good(k) for k in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [good(k) for k in range(100, 103)])
    records, report = load_records([a, b], max_example_num_per_dataset=5, seed=1)
    assert report.kept == {str(a): 5, str(b): 3}
    from_a = [r.query for r in records if r.query in {f"query number {k}" for k in range(20)}]
    assert len(from_a) == 5 and len(set(from_a)) == 5
    assert {r.query for r in records} >= {f"query number {k}" for k in range(100, 103)}
    again, _ = load_records([a, b], max_example_num_per_dataset=5, seed=1)
    assert again == records
    other, _ = load_records([a, b], max_example_num_per_dataset=5, seed=2)
    assert {r.query for r in other[:5]} != {r.query for r in records[:5]}
    everything, _ = load_records([a, b])
    assert len(everything) == 23


BAD_CASES = {
    # name: (bad line, field the message must name)
    "pos_is_a_string": (dict(GOOD, pos="Paris is the capital of France."), "pos"),
    "neg_is_a_string": (dict(GOOD, neg="Lyon is a city."), "neg"),
    "empty_neg": (dict(GOOD, neg=[]), "neg"),
    "empty_pos": (dict(GOOD, pos=[]), "pos"),
    "pos_item_not_a_string": (dict(GOOD, pos=[3]), "pos"),
    "pos_scores_wrong_length": (dict(GOOD, pos_scores=[1.0, 2.0], neg_scores=[0.1, 0.2]), "pos_scores"),
    "neg_scores_wrong_length": (dict(GOOD, pos_scores=[1.0], neg_scores=[0.1]), "neg_scores"),
    "score_is_a_string": (dict(GOOD, pos_scores=["0.9"], neg_scores=[0.1, 0.2]), "pos_scores"),
    "score_is_true": (dict(GOOD, pos_scores=[0.9], neg_scores=[0.1, True]), "neg_scores"),
    "score_is_nan": (dict(GOOD, pos_scores=[0.9], neg_scores=[0.1, float("nan")]), "neg_scores"),
    "only_one_score_list": (dict(GOOD, pos_scores=[0.9]), "neg_scores"),
    "empty_query": (dict(GOOD, query=""), "query"),
    "blank_query": (dict(GOOD, query="   "), "query"),
    "missing_query": ({k: v for k, v in GOOD.items() if k != "query"}, "query"),
    "missing_pos": ({k: v for k, v in GOOD.items() if k != "pos"}, "pos"),
    "missing_neg": ({k: v for k, v in GOOD.items() if k != "neg"}, "neg"),
    "prompt_not_a_string": (dict(GOOD, prompt=["Yes or No?"]), "prompt"),
    "bad_json": ('{"query": "q", "pos": ["p"], "neg": ["n"]', "JSON"),
    "not_an_object": ('["q", ["p"], ["n"]]', "object"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_error_names_file_line_and_field(tmp_path, case):
    """SPEC 1: a record that breaks the table is an error naming the file, the line number and
    the field (line numbers count blank lines, as an editor does)."""
    bad, field = BAD_CASES[case]
    path = write_jsonl(tmp_path / "train.jsonl", [good(1), "", bad, good(2)])
    with pytest.raises(DataFormatError) as err:
        load_records(path)
    msg = str(err.value)
    assert f"{path}:3:" in msg, msg
    assert field in msg, msg
    assert "\n" not in msg


def test_bad_record_in_a_json_list_names_its_real_line(tmp_path):
    """SPEC 1: `.json` files are accepted too; the error must still name the line of the record."""
    path = tmp_path / "train.json"
    path.write_text("[\n" + json.dumps(good(1)) + ",\n" + json.dumps(dict(GOOD, pos="oops")) + "\n]\n",
                    encoding="utf-8")
    with pytest.raises(DataFormatError) as err:
        load_records(path)
    assert f"{path}:3:" in str(err.value) and "'pos'" in str(err.value)


def test_pos_as_a_string_is_not_split_into_characters(tmp_path):
    """SPEC 1: the classic mistake `"pos": "text"` must not silently become one passage per character."""
    path = write_jsonl(tmp_path / "train.jsonl", [dict(GOOD, pos="Paris")])
    with pytest.raises(DataFormatError, match=r"field 'pos'.*list"):
        load_records(path)


def test_negatives_are_optional_only_for_group_size_one(tmp_path):
    """SPEC 1: `neg` is required when G > 1; with need_negatives=False a record without it loads."""
    path = write_jsonl(tmp_path / "train.jsonl", [{"query": "q", "pos": ["p"]}])
    with pytest.raises(DataFormatError, match="neg"):
        load_records(path)
    records, _ = load_records(path, need_negatives=False)
    assert records[0].neg == ()


def test_integer_scores_are_numbers(tmp_path):
    """SPEC 1: scores are numbers: ints are accepted (and stored as floats), unlike bools."""
    path = write_jsonl(tmp_path / "train.jsonl", [dict(GOOD, pos_scores=[3], neg_scores=[1, 2.5])])
    (rec,), _ = load_records(path)
    assert rec.pos_scores == (3.0,) and rec.neg_scores == (1.0, 2.5)


def test_skip_mode_keeps_good_records_and_reports_every_bad_one(tmp_path, caplog):
    """SPEC 1: the lenient mode skips bad records, keeps the good ones, and reports each skipped
    record (file, line, field) — never silently."""
    bad_cases = [BAD_CASES[c] for c in ("pos_is_a_string", "empty_neg", "score_is_true", "bad_json",
                                        "empty_query", "pos_scores_wrong_length")]
    lines = [good(0)]
    for k, (bad, _) in enumerate(bad_cases, start=1):
        lines += [bad, good(k)]
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    with caplog.at_level(logging.WARNING):
        records, report = load_records(path, on_error="skip")
    assert [r.query for r in records] == [f"query number {k}" for k in range(len(bad_cases) + 1)]
    assert report.kept == {str(path): len(bad_cases) + 1}
    assert len(report.skipped) == len(bad_cases)
    for k, ((_, field), message) in enumerate(zip(bad_cases, report.skipped)):
        assert message.startswith(f"{path}:{2 * k + 2}:"), message
        assert field in message
    assert f"skipped {len(bad_cases)}" in caplog.text
    with pytest.raises(DataFormatError, match=":2:"):
        load_records(path)  # the default mode raises on the first


def test_skip_mode_with_no_good_record_left_is_an_error(tmp_path):
    """SPEC 1: skipping never turns a wholly broken file into an empty data set."""
    path = write_jsonl(tmp_path / "train.jsonl", [dict(GOOD, pos="x"), dict(GOOD, neg=[])])
    with pytest.raises(DataFormatError, match="no valid record"):
        load_records(path, on_error="skip")


def test_unknown_on_error_mode_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [good(1)])
    with pytest.raises(ValueError, match="on_error"):
        load_records(path, on_error="ignore")


def test_train_cli_reports_a_bad_record_in_one_line_with_exit_code_2(tmp_path):
    """SPEC 1: through `train.py`, a bad record is a one-line `error: file:line: field ...` and
    exit code 2, not a traceback."""
    bad = write_jsonl(tmp_path / "bad.jsonl", [good(1), "", dict(GOOD, pos="a single string")])
    # `~logger` removes the logger group (Hydra rejects `logger=null` for a config group).
    cmd = [sys.executable, str(ROOT / "train.py"), "model=tiny", f"data.train_data={bad}", "data.val_data=null",
           "~logger", "export.enabled=false", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert f"{bad}:3:" in errors[0] and "'pos'" in errors[0]
