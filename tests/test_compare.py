"""Per-query metrics (`evaluate --per-query`, `--first-stage`) and the paired comparison (`compare`):
the per-query values equal pytrec_eval's on the real TREC DL20 BM25 run, and the bootstrap interval
agrees with an independent resampling."""

import csv
import random

import pytest
from cli_run import error_line, run_module
from test_trec_eval import RUN, dl20, trec_eval_per_query  # noqa: F401 (dl20: the fixture)

from rerank_lightning.cli import main as cli_main
from rerank_lightning.data.beir import trec_order
from rerank_lightning.eval.compare import compare_files, paired_change


def read_csv(path):
    with open(path, newline="") as fh:
        return {row["qid"]: row for row in csv.DictReader(fh)}


@pytest.mark.parametrize("top_k", [100, 30])
def test_first_stage_per_query_equals_trec_eval_of_the_run(dl20, tmp_path, capsys, top_k):
    root, run, qrels = dl20
    out = tmp_path / "bm25.csv"
    assert cli_main(["evaluate", "--first-stage", "--beir", str(root), "--run", str(root / RUN), "--split", "test",
                     "--relevance-threshold", "2", "--top-k", str(top_k), "--per-query", str(out)]) == 0
    capsys.readouterr()
    cut = {qid: dict((d, s) for s, d in trec_order([(s, d) for d, s in docs.items()])[:top_k])
           for qid, docs in run.items() if qid in qrels}
    reference = trec_eval_per_query(qrels, cut, threshold=2)
    rows = read_csv(out)
    assert sorted(rows) == sorted(reference["MAP"])
    for metric, by_qid in reference.items():
        for qid, expected in by_qid.items():
            assert float(rows[qid][metric]) == pytest.approx(expected, abs=1e-6), (metric, qid)


def test_evaluate_requires_either_an_export_or_first_stage(dl20, tmp_path):
    root, _, _ = dl20
    both = run_module("rerank_lightning.cli", ["evaluate", "some_export", "--first-stage", "--beir", root,
                                               "--run", root / RUN], tmp_path)
    assert both.returncode == 2 and "--first-stage evaluates a run" in both.stderr
    neither = run_module("rerank_lightning.cli", ["evaluate", "--beir", root, "--run", root / RUN], tmp_path)
    assert neither.returncode == 2 and "give the EXPORT to evaluate" in neither.stderr


def test_paired_change_counts_and_matches_an_independent_bootstrap():
    rng = random.Random(7)
    qids = [f"q{i}" for i in range(40)]
    base = {q: rng.random() for q in qids}
    other = {q: min(1.0, base[q] + rng.gauss(0.05, 0.1)) for q in qids}
    other["q0"] = base["q0"]  # one unchanged query
    got = paired_change(base, other, samples=4000, seed=1)
    diffs = [other[q] - base[q] for q in qids]
    assert got["queries"] == 40
    assert got["change"] == pytest.approx(sum(diffs) / 40, abs=1e-12)
    assert got["base"] == pytest.approx(sum(base.values()) / 40) and got["other"] == pytest.approx(
        sum(other.values()) / 40)
    assert (got["better"], got["worse"], got["same"]) == (sum(d > 0 for d in diffs), sum(d < 0 for d in diffs), 1)
    # an independent percentile bootstrap with Python's random module agrees within resampling noise
    boot = sorted(sum(rng.choice(diffs) for _ in diffs) / len(diffs) for _ in range(4000))
    assert got["ci95_low"] == pytest.approx(boot[100], abs=0.006)
    assert got["ci95_high"] == pytest.approx(boot[3899], abs=0.006)
    assert got["ci95_low"] < got["change"] < got["ci95_high"]
    assert paired_change(base, other, samples=4000, seed=1) == got  # seeded


def test_paired_change_of_a_constant_shift_has_a_point_interval():
    base = {"a": 0.2, "b": 0.5, "c": 0.9}
    got = paired_change(base, {q: v - 0.25 for q, v in base.items()}, samples=500)
    assert got["change"] == pytest.approx(-0.25)
    assert got["ci95_low"] == pytest.approx(-0.25) and got["ci95_high"] == pytest.approx(-0.25)
    assert (got["better"], got["worse"], got["same"]) == (0, 3, 0)


def write_per_query(path, values, metric="nDCG@10"):
    path.write_text("qid," + metric + "\n" + "".join(f"{q},{v}\n" for q, v in values.items()))
    return path


def test_compare_command_prints_one_row_per_system(tmp_path, capsys):
    base = write_per_query(tmp_path / "bm25.csv", {"1": 0.5, "2": 0.25, "3": 1.0})
    better = write_per_query(tmp_path / "better.csv", {"1": 0.75, "2": 0.5, "3": 1.0})
    worse = write_per_query(tmp_path / "worse.csv", {"1": 0.25, "2": 0.25, "3": 0.5})
    assert cli_main(["compare", str(base), str(better), str(worse), "--out", str(tmp_path / "cmp.md")]) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "cmp.md").read_text()
    rows = compare_files(base, [better, worse])
    assert [r["change"] for r in rows] == pytest.approx([1 / 6, -0.25])
    assert [(r["better"], r["worse"], r["same"]) for r in rows] == [(2, 0, 1), (0, 2, 1)]
    assert "| " + str(better) + " | 0.7500 | 0.5833 | 3 | 0.1667 |" in printed


@pytest.mark.parametrize("content, fragments", [
    ("qid,nDCG@10\n1,0.5\n9,0.5\n", ["different queries", "2 in one only"]),
    ("qid,MAP\n1,0.5\n2,0.5\n", ["other.csv:1", "'nDCG@10'"]),
    ("qid,nDCG@10\n1,0.5\n2,high\n", ["other.csv:3", "expected a number", "'high'"]),
    ("qid,nDCG@10\n1,0.5\n1,0.5\n", ["other.csv:3", "'1' appears twice"]),
    ("qid,nDCG@10\n1,0.5\n2,nan\n", ["other.csv:3", "finite"]),
])
def test_compare_refuses_bad_files_with_one_line(tmp_path, content, fragments):
    write_per_query(tmp_path / "base.csv", {"1": 0.5, "2": 0.25})
    (tmp_path / "other.csv").write_text(content)
    proc = run_module("rerank_lightning.cli", ["compare", "base.csv", "other.csv"], tmp_path)
    error_line(proc, *fragments)


@pytest.mark.parametrize("command", ["compare", "matryoshka-compare"])
def test_both_comparisons_refuse_zero_resamples_as_a_usage_error(tmp_path, command):
    write_per_query(tmp_path / "base.csv", {"1": 0.5})
    proc = run_module("rerank_lightning.cli", [command, "base.csv", "base.csv", "--samples", "0"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--samples: expected at least 1 resample, got 0" in proc.stderr
