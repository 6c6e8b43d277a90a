"""Malformed training files (SPEC 1) as a user writes them, driven through `train.py`.

Each one ends in exactly one `error: FILE[:LINE]: ...` line naming the field and what was expected,
exit code 2 and no traceback, before any training; with `data.on_error=skip` the bad records are
counted and reported and the rest trains.
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
from pathlib import Path

import pytest

from cli_run import TRAIN_FAST, describe, error_line, run_train
from rerank_lightning.data import DataFormatError, load_records


def record(k: int, **extra) -> dict:
    return {"query": f"query {k}", "pos": [f"positive {k}"], "neg": [f"negative {k}a", f"negative {k}b"], **extra}


def jsonl(*lines: dict | str) -> bytes:
    """Objects dumped as JSON, strings written verbatim (broken lines)."""
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode("utf-8")


GOOD = jsonl(record(1), record(2))
SCORED = '{"query": "q", "pos": ["p"], "neg": ["n"], '

# name: (file name, file bytes, fragments the error line must hold besides the file path); the table's
# other record errors (wrong types, empty lists, lengths) are covered one by one in test_records.py
CASES = {
    "gzip_compressed": ("train.jsonl", gzip.compress(GOOD), ["gzip-compressed", "decompress"]),
    "bzip2_compressed": ("train.jsonl", bz2.compress(GOOD), ["bzip2-compressed"]),
    "utf16_text": ("train.jsonl", GOOD.decode().encode("utf-16"), ["UTF-16", "UTF-8"]),
    "latin1_line": ("train.jsonl", jsonl(record(1)) + b'{"query": "caf\xe9", "pos": ["p"], "neg": ["n"]}\n',
                    [":2:", "not UTF-8", "byte 0xe9", "byte offset"]),
    "duplicate_key": ("train.jsonl", jsonl(record(1), '{"query": "a", "pos": ["p"], "neg": ["n"], "query": "b"}'),
                      [":2:", "field 'query'", "twice"]),
    "duplicate_key_in_json_list": ("train.json", b'[\n {"query": "a", "pos": ["p"], "neg": ["n"]},\n'
                                   b' {"query": "b", "pos": ["p"], "pos": ["q"], "neg": ["n"]}\n]\n',
                                   [":3:", "field 'pos'", "twice"]),
    "score_overflows_float32": ("train.jsonl", jsonl(record(1), SCORED + '"pos_scores": [1e39], "neg_scores": [0]}'),
                                [":2:", "field 'pos_scores[0]'", "float32"]),
    "negative_score_overflows_float32": ("train.jsonl", jsonl(SCORED + '"pos_scores": [1], "neg_scores": [-1e39]}'),
                                         [":1:", "field 'neg_scores[0]'", "float32"]),
    "nan_literal": ("train.jsonl", jsonl(record(1), SCORED + '"pos_scores": [NaN], "neg_scores": [0]}'),
                    [":2:", "field 'pos_scores[0]'", "finite", "NaN"]),
    "infinity_literal": ("train.jsonl", jsonl(SCORED + '"pos_scores": [1], "neg_scores": [-Infinity]}'),
                         [":1:", "field 'neg_scores[0]'", "finite", "Infinity"]),
    "empty_file": ("train.jsonl", b"", ["file is empty", "JSON Lines"]),
    "only_blank_lines": ("train.jsonl", b"\n  \n\n", ["file is empty"]),
    "pos_is_a_string": ("train.jsonl", jsonl(record(1), "", record(3, pos="one passage")),
                        [":3:", "field 'pos'", "list of strings"]),
    "truncated_json": ("train.jsonl", jsonl(record(1), '{"query": "q", "pos": ["p"]'), [":2:", "invalid JSON"]),
    "two_records_on_one_line": ("train.jsonl", jsonl(json.dumps(record(1)) + " " + json.dumps(record(2))),
                                [":1:", "extra data", "one record per line"]),
}


def write_case(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_training_file_is_one_error_line(tmp_path, case):
    name, data, fragments = CASES[case]
    path = write_case(tmp_path, name, data)
    proc = run_train([*TRAIN_FAST, f"data.train_data={path}"], tmp_path)
    error_line(proc, f"error: {path}", *fragments)
    assert not (tmp_path / "run" / "checkpoints").exists(), "nothing may train on bad data"


def test_directory_without_data_files_names_what_it_holds(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl.gz").write_bytes(gzip.compress(GOOD))
    proc = run_train([*TRAIN_FAST, f"data.train_data={folder}"], tmp_path)
    error_line(proc, f"error: {folder}", "no *.json or *.jsonl", "train.jsonl.gz")


def test_skip_mode_counts_reports_and_trains_on_the_rest(tmp_path):
    lines = jsonl(record(1), record(2)) + b'{"query": "caf\xe9", "pos": ["p"], "neg": ["n"]}\n' + jsonl(
        '{"query": "a", "pos": ["p"], "neg": ["n"], "query": "b"}',
        SCORED + '"pos_scores": [1e39], "neg_scores": [0]}',
        SCORED + '"pos_scores": [NaN], "neg_scores": [0]}',
        "",
        record(3), record(4))
    path = write_case(tmp_path, "train.jsonl", lines)
    proc = run_train([*TRAIN_FAST, f"data.train_data={path}", "data.on_error=skip"], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, describe(proc)
    assert "skipped 4 bad training records (on_error=skip)" in out, describe(proc)
    assert f"{path}:3: not UTF-8" in out, describe(proc)
    assert "finished 1 optimizer steps" in proc.stdout, describe(proc)
    assert "Traceback" not in proc.stderr


def test_misspelt_optional_keys_are_warned_once_each_with_the_field_meant(tmp_path):
    """`pos_score` would silently switch distillation off, `Prompt` the record's prompt: each is named
    once, however many records carry it, with the close field; a BOM at the start is not data."""
    lines = [record(k, pos_score=[1.0], neg_score=[0.0, 0.0], Prompt="Is it relevant?", negs=["x"], source="web")
             for k in range(1, 5)]
    path = write_case(tmp_path, "train.jsonl", b"\xef\xbb\xbf" + jsonl(*lines))
    proc = run_train([*TRAIN_FAST, f"data.train_data={path}"], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "finished 1 optimizer steps" in proc.stdout, describe(proc)
    for key, meant in [("pos_score", "pos_scores"), ("neg_score", "neg_scores"), ("Prompt", "prompt"),
                       ("negs", "neg")]:
        warnings = [line for line in out.splitlines() if f"field '{key}'" in line]
        assert len(warnings) == 1, describe(proc)
        assert f"{path}:1:" in warnings[0] and "in 4 record(s)" in warnings[0], warnings[0]
        assert f"did you mean '{meant}'?" in warnings[0], warnings[0]
    assert "field 'source'" in out and "training records have only query, pos, neg" in out, describe(proc)


# The loader itself, without a process: the cases above at the library level where the CLI adds nothing.

def test_a_bom_and_crlf_line_ends_load_as_plain_utf8(tmp_path):
    path = write_case(tmp_path, "train.jsonl", b"\xef\xbb\xbf" + GOOD.replace(b"\n", b"\r\n"))
    records, report = load_records(path)
    assert [r.query for r in records] == ["query 1", "query 2"] and report.skipped == []


def test_blank_lines_are_not_records_but_count_in_line_numbers(tmp_path):
    path = write_case(tmp_path, "train.jsonl", jsonl(record(1), "", "   ", record(4, pos=[])))
    with pytest.raises(DataFormatError, match=r"train\.jsonl:4: field 'pos'"):
        load_records(path)


def test_a_unicode_line_separator_inside_a_string_stays_in_its_record(tmp_path):
    """JSONL lines end at \\n only: U+2028 inside a passage is text (str.splitlines would cut there)."""
    path = write_case(tmp_path, "train.jsonl", jsonl(record(1, pos=["first\u2028second"])).replace(b"\\u2028",
                                                                                                "\u2028".encode()))
    records, _ = load_records(path)
    assert records[0].pos == ("first\u2028second",)


def test_largest_float32_score_is_kept(tmp_path):
    path = write_case(tmp_path, "train.jsonl", jsonl(record(1, pos_scores=[3.4e38], neg_scores=[-3.4e38, 0])))
    records, _ = load_records(path)
    assert records[0].pos_scores == (3.4e38,)


def test_skip_mode_counts_a_file_of_only_bad_records_in_its_error(tmp_path):
    path = write_case(tmp_path, "train.jsonl", jsonl(record(1, pos="x"), record(2, neg=[])))
    with pytest.raises(DataFormatError, match=r"no valid record \(2 skipped, on_error=skip\)"):
        load_records(path, on_error="skip")


def test_unknown_key_is_warned_once(tmp_path, caplog):
    path = write_case(tmp_path, "train.jsonl", jsonl(*(record(k, pos_score=[1.0]) for k in range(3))))
    with caplog.at_level(logging.WARNING, logger="rerank_lightning.data.records"):
        _, report = load_records(path)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}:1: field 'pos_score' (in 3 record(s)) is not a training field and is ignored; "
        f"did you mean 'pos_scores'?"]
    assert report.unknown_fields == {"pos_score": (3, f"{path}:1")}


def test_graded_labels_and_mined_docids_are_known_fields(tmp_path, caplog):
    """`mine` writes qid/pos_ids/neg_ids beside the texts and grades: no unknown-field warning for them."""
    mined = record(1, qid="q1", pos_ids=["d1"], neg_ids=["d2", "d3"], pos_grades=[2],
                   neg_grades=[0, 1])
    path = write_case(tmp_path, "train.jsonl", jsonl(mined))
    with caplog.at_level(logging.WARNING, logger="rerank_lightning.data.records"):
        records, report = load_records(path)
    assert caplog.records == [] and report.unknown_fields == {}
    assert records[0].pos_grades == (2,)
