"""Smoke test of benchmarks/ at quick sizes: the rows exist and the compared values agree (no timing asserts)."""
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_metrics_quick_rows_agree():
    pytest.importorskip("torchmetrics")
    rows = load("bench_metrics").run(quick=True)
    by_metric = {row["metric"]: row for row in rows}
    assert set(by_metric) == {"MRR@10", "nDCG@10", "MRR@10 + nDCG@10"}
    for name in ("MRR@10", "nDCG@10"):
        row = by_metric[name]
        assert row["max per-query diff tie-free"] <= 1e-6
        assert row["abs mean diff tie-free"] <= 1e-6
        assert 0 < row["tie-free queries"] < 100  # the data holds tied queries, excluded from the check
        assert row["project ms"] > 0 and row["torchmetrics ms"] > 0 and row["speedup x"] > 0


def test_train_step_quick_rows_agree():
    pytest.importorskip("psutil")
    rows = load("bench_train_step").run(quick=True)
    projects = [row for row in rows if row["variant"] == "project"]
    baselines = [row for row in rows if row["variant"] == "baseline"]
    assert len(baselines) == 1 and len(projects) == 2  # whole batch per forward, and micro-batched
    assert {row["seqs per forward"].split(",")[0].startswith("all") for row in projects} == {True, False}
    for row in rows:
        assert row["step s (best)"] > 0 and row["peak RSS MiB"] > 0
    for project in projects:  # values only: at quick sizes the memory rows differ by allocator noise
        assert project["|loss diff|"] <= 1e-4
        assert project["grad norm rel diff"] <= 1e-4


def test_gpu_throughput_skips_without_cuda():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the GPU benchmark would really run")
    rows = load("gpu_throughput").run(quick=True)
    assert len(rows) == 1 and rows[0]["status"].startswith("skipped: no CUDA")


def test_gpu_throughput_dry_run_runs_every_case_and_layout():
    """The GPU script gets one short run on a lent machine: its code must work before then. On CPU with
    tiny shapes, every case (LoRA on one device; full fine-tuning through trainer=fsdp) runs padded and
    packed, and both layouts count the same real tokens."""
    gpu = load("gpu_throughput")
    rows = gpu.measure(dry_run=True, warmup=1, steps=1, timeout=300)
    assert [(row["case"], row["layout"]) for row in rows] == [(c, l) for c in gpu.CASES for l in gpu.LAYOUTS]
    assert not [row for row in rows if "status" in row], rows
    for name in gpu.CASES:
        padded, packed = (row for row in rows if row["case"] == name)
        assert padded["mean row length"] == packed["mean row length"]  # the same pairs, counted alike
        assert packed["padding %"] < padded["padding %"]


def test_harness_writes_tables(tmp_path, monkeypatch):
    run = load("run")
    fake = tmp_path / "bench_fake.py"
    fake.write_text('TITLE = "Fake"\ndef run(quick=False):\n    return [{"case": "a", "ratio x": 2.5, "met": True}]\n')
    monkeypatch.setattr(run, "HERE", tmp_path)
    monkeypatch.setattr(run, "EXTRA", ())
    md = tmp_path / "BENCH.md"
    md.write_text("intro\n<!-- bench:fake:begin -->\nold\n<!-- bench:fake:end -->\noutro\n")
    assert run.main(["--quick", "--out", str(tmp_path / "results"), "--update-md", str(md)]) == 0
    result = json.loads((tmp_path / "results" / "fake.json").read_text())
    assert result["rows"] == [{"case": "a", "ratio x": 2.5, "met": True}]
    text = md.read_text()
    assert "old" not in text and "| a | 2.5 | yes |" in text and text.startswith("intro") and "outro" in text
    assert (tmp_path / "results" / "BENCHMARKS.generated.md").exists()


def test_matryoshka_run_script_splits_wikiqa_without_overlap(tmp_path, shared_data):
    """benchmarks/matryoshka_smollm2_gpu.sh `data`: every 4th training query held out as candidate
    lists (never trained on), appended to the dev lists; the rest is the training file."""
    import os
    import subprocess
    import sys

    from rerank_lightning.data.candidates import load_candidate_lists

    env = {**os.environ, "DATA": str(shared_data / "wikiqa"), "WORK": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(BENCH / "matryoshka_smollm2_gpu.sh"), "data"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    source = [json.loads(line) for line in open(shared_data / "wikiqa" / "train_flag.jsonl")]
    train = [json.loads(line) for line in open(tmp_path / "train_split.jsonl")]
    lists = load_candidate_lists(tmp_path / "eval_candidates.jsonl")
    dev = load_candidate_lists(shared_data / "wikiqa" / "dev_rerank_candidates.jsonl")
    held = lists[len(dev):]
    assert [cl.qid for cl in lists[:len(dev)]] == [cl.qid for cl in dev]
    assert len(train) + len(held) == len(source) and len(held) == len(source) // 4
    assert train == [r for i, r in enumerate(source) if i % 4 != 3]
    trained = {r["query"] for r in train}
    assert not any(cl.query in trained for cl in lists)  # neither held-out nor dev queries were trained on
    for cl, record in zip(held, [r for i, r in enumerate(source) if i % 4 == 3]):
        assert cl.query == record["query"]
        assert list(cl.texts) == record["pos"] + record["neg"]
        assert list(cl.labels) == [1] * len(record["pos"]) + [0] * len(record["neg"])
    assert len({cl.qid for cl in lists}) == len(lists)
    assert "train queries 643, held out 214" in done.stdout


def test_packing_quick_rows_agree():
    """bench_packing at quick sizes (2 layers, 1 step, P=512): packed and padded steps give the same losses,
    packed rows hold fewer tokens per pair token, and the P=512 check tells WikiQA's batches (no passage
    past 128 tokens in them) from MS MARCO's."""
    pytest.importorskip("psutil")
    rows = load("bench_packing").run(quick=True)
    assert [(row["data"], row["variant"]) for row in rows] == [
        (data, variant) for data in ("WikiQA", "MS MARCO") for variant in ("padded", "packed")]
    for padded, packed in zip(rows[::2], rows[1::2]):
        assert float(packed["max |loss diff|"]) < 1e-4
        assert packed["row tokens / pair tokens"] < 1 < padded["row tokens / pair tokens"]
        assert packed["pair tokens/s"] > 0 and padded["pair tokens/s"] > 0
    assert [row["timed batches as at P=128"] for row in rows] == [True, True, False, False]
