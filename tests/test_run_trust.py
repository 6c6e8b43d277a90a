"""A run a user can trust: pretrained weights train in train mode (with real gradient checkpointing) and
validate in eval mode; a NaN stops the run; each sweep job is its own logger run; the console stays quiet."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from cli_run import describe, run_train
from conftest import ROOT, TINY_MODEL
from rerank_lightning.data import RerankDataModule
from rerank_lightning.model import RerankerModule, load_causal_lm
from rerank_lightning.model.matryoshka_module import MatryoshkaModule
from rerank_lightning.model.scoring import causal_lm

SAMPLE = ROOT / "data" / "sample"
LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
MATRYOSHKA = {"start_layer": 1, "compress_layers": [1, 2], "compress_ratios": [1, 2], "method": "cascade"}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, mistral_tokenizer) -> Path:
    """The tiny Llama written with `save_pretrained`: reloading it gives an eval-mode model, as real weights do."""
    out = tmp_path_factory.mktemp("saved_tiny")
    cfg = dict(TINY_MODEL, random_init={**TINY_MODEL["random_init"], "attention_dropout": 0.1})
    load_causal_lm(cfg, len(mistral_tokenizer)).save_pretrained(out)
    return out


def pretrained_cfg(saved: Path, lora: bool) -> dict:
    cfg = copy.deepcopy(TINY_MODEL)
    cfg.update(random_init=None, pretrained=str(saved), gradient_checkpointing=True,
               lora=LORA if lora else {"enabled": False})
    return cfg


class ModeProbe(L.Callback):
    """Counts calls of the first decoder layer's MLP per training step: with gradient checkpointing the
    layer runs twice (forward, and its recompute in backward), without it once."""

    def __init__(self):
        self.train_calls: list[int] = []      # layer calls per training step
        self.train_modes: set[bool] = set()   # every module's `training` during training steps
        self.val_modes: set[bool] = set()     # ... during validation batches
        self._calls = 0
        self._hooked = False

    def _hook(self, module):
        if not self._hooked:
            causal_lm(module.lm).get_decoder().layers[0].mlp.register_forward_pre_hook(self._count)
            self._hooked = True

    def _count(self, layer, args):
        self._calls += 1

    def setup(self, trainer, module, stage):
        module.configure_model()
        self._hook(module)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._calls = 0
        self.train_modes |= {m.training for m in module.lm.modules()}

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.train_calls.append(self._calls)

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self.val_modes |= {m.training for m in module.lm.modules()}


def fit_with_probe(module, dm, validate_first: bool) -> ModeProbe:
    probe = ModeProbe()
    trainer = L.Trainer(accelerator="cpu", max_steps=3, val_check_interval=1, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[probe])
    if validate_first:
        trainer.validate(module, datamodule=dm, verbose=False)
    trainer.fit(module, datamodule=dm)
    return probe


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("validate_first", [False, True], ids=["fit", "validate-then-fit"])
def test_pretrained_model_trains_in_train_mode_with_checkpointing(saved_model, mistral_tokenizer, lora,
                                                                  validate_first):
    dm = RerankDataModule(mistral_tokenizer, train_data=str(SAMPLE / "train.jsonl"),
                          val_data=str(SAMPLE / "val_candidates.jsonl"), train_group_size=2, passage_max_len=32,
                          max_example_num_per_dataset=8, max_val_queries=2, batch_size=2, val_batch_size=8,
                          cache_dir=None)
    module = RerankerModule(model=pretrained_cfg(saved_model, lora), yes_token_id=dm.formatter.yes_id,
                            no_token_id=dm.formatter.no_id, vocab_size=len(mistral_tokenizer))
    assert not load_causal_lm(pretrained_cfg(saved_model, lora), len(mistral_tokenizer)).training  # the case
    module.configure_model()
    assert all(m.training for m in module.lm.modules()), "configure_model left the LM in from_pretrained's eval mode"
    module.lm.eval()  # whatever mode the LM is in when fit starts, training runs in train mode
    probe = fit_with_probe(module, dm, validate_first)
    assert probe.train_modes == {True}, "a backbone module was in eval mode during training"
    assert probe.train_calls == [2, 2, 2], "gradient checkpointing did not recompute the layer in backward"
    assert probe.val_modes == {False}, "validation ran with a module in train mode"


@pytest.mark.parametrize("stage", ["self_distill", "compensation"])
def test_matryoshka_stages_train_in_train_mode(saved_model, mistral_tokenizer, shared_data, tmp_path, stage):
    from rerank_lightning.inference.matryoshka_export import export_matryoshka

    dm = RerankDataModule(mistral_tokenizer, recipe="matryoshka", val_data=None, train_group_size=2,
                          train_data=str(shared_data / "flagembedding" / "reranker_normal_examples.jsonl"),
                          query_max_len=16, passage_max_len=32, batch_size=2, cache_dir=None)
    common = dict(yes_token_id=dm.formatter.yes_id, no_token_id=dm.formatter.no_id,
                  vocab_size=len(mistral_tokenizer), recipe=dm.formatter.recipe())
    cfg = pretrained_cfg(saved_model, lora=stage == "compensation")
    if stage == "compensation":  # from a stage-1 export, itself loaded with from_pretrained
        stage1 = MatryoshkaModule(model=pretrained_cfg(saved_model, lora=False), **common,
                                  matryoshka={**MATRYOSHKA, "stage": "self_distill"})
        stage1.configure_model()
        cfg["pretrained"] = str(export_matryoshka(stage1.lm, stage1.heads, dm.formatter, tmp_path / "stage1",
                                                  stage1.mcfg))
    module = MatryoshkaModule(model=cfg, **common, matryoshka={
        **MATRYOSHKA, "stage": stage, "factor": "depth", "compress_ratios": [1]})
    probe = fit_with_probe(module, dm, validate_first=False)
    assert probe.train_modes == {True}
    # The checkpointed pass runs the layer twice; compensation adds its teacher pass without gradients.
    assert probe.train_calls == [3 if stage == "compensation" else 2] * 3


# ---------------------------------------------------------------- train.py as a user runs it

TEACHER_DATA = ROOT.parent / "shared" / "data" / "flagembedding" / "reranker_normal_examples.jsonl"


def test_nan_loss_stops_the_run_with_one_line_and_writes_nothing(tmp_path):
    """Teacher scores near 100 over temperature 1e-37 overflow float32: the KD loss is NaN at the first step."""
    proc = run_train(["model=tiny", "~logger", "data.val_data=null", "trainer.max_steps=3", "loss.temperature=1e-37",
                      f"data.train_data={TEACHER_DATA}"], tmp_path)
    assert proc.returncode == 1, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, describe(proc)
    assert "step 1" in errors[0] and "loss.temperature=1e-37" in errors[0], errors[0]
    run = tmp_path / "run"
    assert not (run / "export").exists(), "a NaN run exported a model"
    assert not list(run.rglob("*.ckpt")), "a NaN run wrote a checkpoint"
    assert not (run / "summary.json").exists()


def test_huge_learning_rate_stops_before_the_weights_turn_nan(saved_model, mistral_tokenizer):
    """lr=1e30: the first step is finite, the second overflows; the guard raises before that update."""
    from rerank_lightning.model.module import NonFiniteTrainingError

    dm = RerankDataModule(mistral_tokenizer, train_data=str(SAMPLE / "train.jsonl"), train_group_size=2,
                          passage_max_len=32, max_example_num_per_dataset=8, batch_size=2, cache_dir=None)
    module = RerankerModule(model=pretrained_cfg(saved_model, lora=False), yes_token_id=dm.formatter.yes_id,
                            no_token_id=dm.formatter.no_id, vocab_size=len(mistral_tokenizer),
                            optim={"lr": 1e30, "warmup": 0})
    trainer = L.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0)
    with pytest.raises(NonFiniteTrainingError, match=r"step 2: .*optim.lr=1e\+30"):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_console_prints_each_message_once_and_files_config_and_summary(tmp_path):
    proc = run_train(["model=tiny", "logger=csv", "trainer.max_steps=1", "export.enabled=false",
                      "data.max_val_queries=2", "data.batch_size=2"], tmp_path)
    assert proc.returncode == 0, describe(proc)
    console = proc.stdout + proc.stderr
    assert "Tip:" not in console, console[-3000:]
    for message in ("GPU available", "Seed set to", "`Trainer.fit` stopped"):
        assert console.count(message) == 1, f"{message!r} printed {console.count(message)} times"
    assert "optimized_metric" not in console  # the config goes to a file ...
    run = tmp_path / "run"
    resolved = (run / "resolved_config.yaml").read_text()
    assert "optimized_metric: val/nDCG@10" in resolved and "${" not in resolved
    summary = json.loads((run / "summary.json").read_text())  # ... and so does the summary
    assert summary["steps"] == 1 and set(summary["metrics_after"]) >= {"val/nDCG@10", "val/MAP"}
    assert summary["metrics_before"]["val/nDCG@10"] == pytest.approx(
        float(re.search(r"val/nDCG@10: ([0-9.]+) at step 0", proc.stdout).group(1)), abs=1e-4)
    assert Path(summary["checkpoint"]).is_file() and f"summary: {run / 'summary.json'}" in proc.stdout


def test_each_sweep_job_is_its_own_wandb_run(tmp_path):
    from test_configs import read_wandb_history

    sweep = tmp_path / "sweep"
    proc = run_train(["-m", "model=tiny", "optim.lr=1e-4,3e-4", "logger=wandb", "trainer.max_steps=2",
                      "export.enabled=false", "data.val_data=null", "data.batch_size=2",
                      f"hydra.sweep.dir={sweep}"], tmp_path, timeout=300)
    assert proc.returncode == 0, describe(proc)
    runs = {job: list((sweep / job / "wandb").glob("offline-run-*/run-*.wandb")) for job in ("0", "1")}
    assert all(len(files) == 1 for files in runs.values()), runs
    for job, (run_file,) in runs.items():
        history = read_wandb_history(run_file)
        assert len(history.get("train/loss", [])) == 2, f"job {job}: {sorted(history)}"
    assert runs["0"][0].name != runs["1"][0].name
