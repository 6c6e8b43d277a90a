"""The `rerank-lightning` console entry point: commands, --help, user errors, and the everyday IR workflow
(rerank a TREC run, evaluate it) end to end with a tiny exported model, checked against pytrec_eval."""

import json
import re
import shutil
import statistics

import lightning as L
import pytest
import pytrec_eval

from cli_run import describe, error_line, run_module
from conftest import ROOT, TINY_MODEL
from rerank_lightning import cli
from rerank_lightning.data import RerankDataModule
from rerank_lightning.data.beir import read_qrels
from rerank_lightning.inference import export_reranker
from rerank_lightning.model import RerankerModule

OWN_COMMANDS = ["rerank", "evaluate", "matryoshka-grid", "matryoshka-compare"]


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, help_) in cli.COMMANDS.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(help_)}$", out, re.M), name
    assert cli.main([]) == 2  # no command: the usage, and a non-zero exit


@pytest.mark.parametrize("name", OWN_COMMANDS)
def test_command_help_explains_every_option(name, capsys):
    assert cli.main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rerank-lightning {name} ")
    assert "SPEC" not in out  # --help must not send a user to documents outside the repo
    options = out[out.index("options:"):].splitlines()[1:]
    for i, line in enumerate(options):  # every option line carries its explanation, or the next line does
        if re.match(r"^  -", line):
            inline = re.match(r"^  (-\S+( \S+)?)(, -\S+( \S+)?)*  +\S", line)
            assert inline or (i + 1 < len(options) and re.match(r"^ {10,}\S", options[i + 1])), line


def test_user_errors_are_one_line(tmp_path):
    error_line(run_module("rerank_lightning", ["no-such-command"], tmp_path), "unknown command 'no-such-command'")
    error_line(run_module("rerank_lightning", ["export", tmp_path / "missing.ckpt", tmp_path / "out"], tmp_path),
               "missing.ckpt")


def test_train_without_a_checkout_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    assert cli.main(["train", "model=tiny"]) == 2
    assert capsys.readouterr().err.startswith("error: `rerank-lightning train` needs the project's checkout")


def test_train_command_runs_train_py(tmp_path):
    proc = run_module("rerank_lightning", ["train", "model=tiny", "~logger", "export.enabled=false",
                                           "data.val_data=null", "trainer.max_steps=1",
                                           f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, PROJECT_ROOT=str(ROOT))
    assert proc.returncode == 0, describe(proc)
    assert "finished 1 optimizer steps" in proc.stdout
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()


def small_dl20(shared_data, root, num_queries=4, depth=12):
    """A BEIR folder with the first queries of TREC DL20, the texts of their top run documents and the
    full qrels; and that run cut to `depth` per query."""
    src = shared_data / "trec_dl20"
    run_lines, seen = [], {}
    for line in (src / "run.dl20.bm25.top100.trec").read_text().splitlines():
        qid = line.split()[0]
        seen.setdefault(qid, 0)
        if len(seen) <= num_queries and seen[qid] < depth:
            seen[qid] += 1
            run_lines.append(line)
    docids = {line.split()[2] for line in run_lines}
    (root / "qrels").mkdir(parents=True)
    shutil.copy(src / "qrels" / "test.tsv", root / "qrels" / "test.tsv")
    corpus = [line for line in (src / "corpus.jsonl").read_text().splitlines() if json.loads(line)["_id"] in docids]
    (root / "corpus.jsonl").write_text("\n".join(corpus) + "\n")
    queries = [line for line in (src / "queries.jsonl").read_text().splitlines() if json.loads(line)["_id"] in seen]
    (root / "queries.jsonl").write_text("\n".join(queries) + "\n")
    (root / "run.trec").write_text("\n".join(run_lines) + "\n")
    return root, root / "run.trec"


def trec_eval_means(qrels, run_path, threshold):
    run = {}
    for line in run_path.read_text().splitlines():
        qid, _, docid, _, score, _ = line.split()
        run.setdefault(qid, {})[docid] = float(score)
    res = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "map", "recall.100"},
                                         relevance_level=threshold).evaluate(run)
    return {name: statistics.mean(r[key] for r in res.values())
            for name, key in (("nDCG@10", "ndcg_cut_10"), ("MAP", "map"), ("Recall@100", "recall_100"))}, len(res)


def test_rerank_and_evaluate_equal_trec_eval_and_validation(shared_data, tmp_path, mistral_tokenizer, capsys):
    """`rerank` writes a TREC run whose trec_eval metrics (full qrels) are what `evaluate` prints and what
    validation on the same BEIR folder + run logs (val/nDCG@10 is trec_eval's)."""
    beir, run = small_dl20(shared_data, tmp_path / "beir")
    L.seed_everything(0)
    dm = RerankDataModule(mistral_tokenizer, train_data=str(ROOT / "data" / "sample" / "train.jsonl"),
                          train_group_size=2, val_beir={"dir": str(beir), "run": str(run), "split": "test"})
    module = RerankerModule(TINY_MODEL, dm.formatter.yes_id, dm.formatter.no_id, len(mistral_tokenizer),
                            metrics={"k": 10, "relevance_threshold": 2})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    validated = trainer.validate(module, datamodule=dm, verbose=False)[0]
    export = export_reranker(module.lm, dm.formatter, tmp_path / "export")

    proc = run_module("rerank_lightning", ["rerank", export, "--beir", beir, "--run", run,
                                           "--out", tmp_path / "reranked.trec", "--batch-size", "8"], tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "scoring" in proc.stderr  # the progress bar
    lines = (tmp_path / "reranked.trec").read_text().splitlines()
    assert len(lines) == len(run.read_text().splitlines())
    first = lines[0].split()
    assert first[1] == "Q0" and first[3] == "1" and first[5] == "rerank-lightning"

    assert cli.main(["evaluate", str(export), "--beir", str(beir), "--run", str(run), "--relevance-threshold", "2",
                     "--batch-size", "8", "--json", str(tmp_path / "m.json"),
                     "--run-out", str(tmp_path / "evaluated.trec")]) == 0
    capsys.readouterr()
    printed = json.loads((tmp_path / "m.json").read_text())
    expected, num_queries = trec_eval_means(read_qrels(beir / "qrels" / "test.tsv"), tmp_path / "reranked.trec", 2)
    assert printed["queries"] == num_queries == 4
    for name, value in expected.items():
        assert printed[name] == pytest.approx(value, abs=1e-6), name
        assert validated[f"val/{name}"] == pytest.approx(value, abs=1e-5), name
    assert printed["MRR@10"] == printed["RR@10"]
    # the run `evaluate` writes is the one `rerank` wrote (same model and batches, same scores)
    assert (tmp_path / "evaluated.trec").read_text() == (tmp_path / "reranked.trec").read_text()
