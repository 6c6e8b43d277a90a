"""End to end on CPU with the tiny random Llama: training, validation metrics, export (SPEC 6, 8, 9)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import ROOT, TINY_MODEL
from rerank_lightning.data import DEFAULT_PROMPT, RerankDataModule, load_candidate_lists
from rerank_lightning.data.candidates import docid_tie_order
from rerank_lightning.eval.metrics import ranking_metrics
from rerank_lightning.inference import RECIPE_FILE, Reranker, export_reranker
from rerank_lightning.model import RerankerModule

SAMPLE = ROOT / "data" / "sample"
LORA = {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
PAIRS = [
    ("What is the atomic number of iron?", "The atomic number of iron is 26."),
    ("What is the atomic number of iron?", "The atomic number of copper is 29."),
    ("Who discovered penicillin?", "Penicillin was discovered by Alexander Fleming."),
    ("Who discovered penicillin?", "Wilhelm Röntgen discovered X-rays."),
    ("What type of planet is Venus?", "Astronomers classify Venus as a rocky planet."),
    ("Which planet is the largest?", "Jupiter is the largest planet of the Solar System, more than twice as "
                                     "massive as all the other planets combined."),
]


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses: list[float] = []
        self.start_step: int | None = None
        self.start_params: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step
        self.start_params = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def make_datamodule(tokenizer, batch_size=4, max_records=100, max_val_queries=8):
    return RerankDataModule(
        tokenizer, train_data=str(SAMPLE / "train.jsonl"), val_data=str(SAMPLE / "val_candidates.jsonl"),
        train_group_size=4, query_max_len=32, passage_max_len=64, max_example_num_per_dataset=max_records,
        max_val_queries=max_val_queries, batch_size=batch_size, val_batch_size=32, seed=0,
    )


def make_module(dm, tokenizer, lora=None, lr=1e-3):
    cfg = dict(TINY_MODEL, lora=lora or {"enabled": False})
    return RerankerModule(model=cfg, yes_token_id=dm.formatter.yes_id, no_token_id=dm.formatter.no_id,
                          vocab_size=len(tokenizer), optim={"lr": lr, "warmup": 0.1})


def make_trainer(max_steps, callbacks=(), **kwargs):
    opts = dict(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                log_every_n_steps=1)
    opts.update(kwargs)
    return L.Trainer(callbacks=list(callbacks), **opts)


@torch.no_grad()
def module_scores(module, dm, pairs):
    """Scores through the training code path: formatter -> collator -> module.score_logits."""
    module.eval()
    fmt = dm.formatter
    items = [[{"input_ids": (ids := fmt.encode_pair(q, p)), "attention_mask": [1] * len(ids)}] for q, p in pairs]
    batch = dm.collator(items)
    return module.score_logits(batch["pair"])[:, fmt.yes_id].float().tolist()


@pytest.fixture(scope="module")
def trained(mistral_tokenizer):
    """30 steps of full fine-tuning (B=4, G=4) on 8 sample queries (15 epochs, fresh negatives each epoch)."""
    L.seed_everything(0, workers=True)
    dm = make_datamodule(mistral_tokenizer, max_records=8)
    module = make_module(dm, mistral_tokenizer, lr=1e-3)
    rec = LossRecorder()
    trainer = make_trainer(30, [rec], check_val_every_n_epoch=1000)  # validated explicitly below
    trainer.fit(module, datamodule=dm)
    return dm, module, trainer, rec


@pytest.fixture(scope="module")
def lora_trained(mistral_tokenizer, tmp_path_factory):
    """A few LoRA steps with a checkpoint saved at step 3."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0, workers=True)
    ckpt_dir = tmp_path_factory.mktemp("lora_ckpt")
    dm = make_datamodule(mistral_tokenizer, batch_size=2, max_records=12, max_val_queries=2)
    module = make_module(dm, mistral_tokenizer, lora=LORA, lr=2e-2)
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", every_n_train_steps=3, save_top_k=-1)
    trainer = make_trainer(3, [ckpt], enable_checkpointing=True, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    # Recorded now: exporting merges the adapter into the base in place.
    module.trainable_at_fit = {n for n, p in module.named_parameters() if p.requires_grad}
    module.params_at_fit = sum(p.numel() for p in module.parameters())
    return dm, module, trainer, Path(ckpt.last_model_path or ckpt.best_model_path)


# ---------------------------------------------------------------- (a) training lowers the loss


def test_training_lowers_the_loss(trained):
    _, _, trainer, rec = trained
    assert trainer.global_step == 30
    assert len(rec.losses) == 30
    assert all(torch.isfinite(torch.tensor(rec.losses)))
    first, last = sum(rec.losses[:3]) / 3, sum(rec.losses[-3:]) / 3
    assert first == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=0.2)  # untrained: about log G
    assert last < first - 0.3, f"loss did not drop: first 3 {rec.losses[:3]}, last 3 {rec.losses[-3:]}"


def test_full_precision_training_steps_with_fused_adamw(trained):
    """One kernel per step, no parameter-sized temporaries: the default run's optimizer step otherwise
    peaks at two copies of the largest matrix above its weights, gradients and state (BENCHMARKS 3c)."""
    _, _, trainer, _ = trained
    assert trainer.optimizers[0].defaults["fused"]


def test_training_logs_loss_and_lr(trained):
    _, _, trainer, _ = trained
    metrics = trainer.callback_metrics
    assert "train/loss" in metrics and "train/listwise_loss" in metrics and "train/lr" in metrics
    assert float(metrics["train/lr"]) >= 0.0


# ---------------------------------------------------------------- (b) validation metrics


def test_validation_metrics_equal_ranking_metrics_of_module_scores(trained):
    dm, module, trainer, _ = trained
    results = trainer.validate(module, datamodule=dm, verbose=False)[0]
    for name in ("val/MRR@10", "val/nDCG@10", "val/MAP"):
        assert name in results

    # Independently: score every candidate with a naive unpadded forward, then rank.
    lists = load_candidate_lists(SAMPLE / "val_candidates.jsonl", max_queries=8)
    assert len(lists) == 8
    fmt = dm.formatter
    width = max(len(cl.docids) for cl in lists)
    scores = torch.full((len(lists), width), float("-inf"))
    labels = torch.zeros(len(lists), width)
    mask = torch.zeros(len(lists), width, dtype=torch.bool)
    module.eval()
    with torch.no_grad():
        for qi, cl in enumerate(lists):
            for ci, text in enumerate(cl.texts):
                ids = fmt.encode_pair(cl.query, text)
                scores[qi, ci] = module.lm(torch.tensor([ids])).logits[0, -1, fmt.yes_id]
                labels[qi, ci] = cl.labels[ci]
                mask[qi, ci] = True
    tie = docid_tie_order([list(cl.docids) for cl in lists], width)
    expected = ranking_metrics(scores.masked_fill(~mask, 0.0), labels, mask, k=10, tie_order=tie)
    for name, values in expected.items():
        assert results[f"val/{name}"] == pytest.approx(values.mean().item(), abs=1e-5), name
    # And the metrics move with the model: they are not constants.
    assert 0.0 <= results["val/MRR@10"] <= 1.0


def test_validation_before_training_logs_all_metrics(mistral_tokenizer):
    dm = make_datamodule(mistral_tokenizer, max_val_queries=3)
    module = make_module(dm, mistral_tokenizer)
    trainer = make_trainer(1)
    out = trainer.validate(module, datamodule=dm, verbose=False)[0]
    assert set(out) >= {"val/MRR@10", "val/nDCG@10", "val/MAP"}


# ---------------------------------------------------------------- (c) export round trip


@pytest.fixture(scope="module")
def full_export(trained, tmp_path_factory):
    dm, module, _, _ = trained
    before = module_scores(module, dm, PAIRS)
    out = export_reranker(module.lm, dm.formatter, tmp_path_factory.mktemp("export_full"))
    return out, before, dm


@pytest.fixture(scope="module")
def lora_export(lora_trained, tmp_path_factory):
    dm, module, _, _ = lora_trained
    before = module_scores(module, dm, PAIRS)
    with module.lm.disable_adapter():
        base = module_scores(module, dm, PAIRS)
    out = export_reranker(module.lm, dm.formatter, tmp_path_factory.mktemp("export_lora"))
    return out, before, base, dm


def test_export_directory_contents(full_export):
    out, _, dm = full_export
    names = {p.name for p in out.iterdir()}
    assert "config.json" in names
    assert names & {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"}
    assert "tokenizer_config.json" in names and names & {"tokenizer.json", "tokenizer.model"}
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["recipe"] == "instruction"
    assert recipe["query_instruction"] == "A: " and recipe["passage_instruction"] == "B: "
    assert recipe["prompt"] == DEFAULT_PROMPT
    assert recipe["separator"] == "\n"
    assert recipe["query_max_len"] == 32 and recipe["passage_max_len"] == 64
    assert recipe["yes_token_id"] == dm.formatter.yes_id and recipe["no_token_id"] == dm.formatter.no_id


def test_exported_tokenizer_has_pad_token_and_left_padding(full_export):
    from transformers import AutoTokenizer

    out, _, _ = full_export
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token_id is not None
    assert tok.padding_side == "left"


def test_exported_tokenizer_encodes_like_the_training_tokenizer(full_export, mistral_tokenizer):
    """The train/inference contract starts at the tokenizer: the saved one must give the same ids."""
    from transformers import AutoTokenizer

    out, _, _ = full_export
    exported = AutoTokenizer.from_pretrained(out)
    texts = [DEFAULT_PROMPT, "\n", "Yes", "No", "A: ", "B: "]
    for line in (SAMPLE / "train.jsonl").read_text(encoding="utf-8").splitlines()[:40]:
        rec = json.loads(line)
        texts += ["A: " + rec["query"]] + ["B: " + p for p in rec["pos"] + rec["neg"]]
    for text in texts:
        want = mistral_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert exported(text, add_special_tokens=False)["input_ids"] == want, text
    assert exported.bos_token_id == mistral_tokenizer.bos_token_id


def test_export_round_trip_scores(full_export):
    out, before, _ = full_export
    after = Reranker.from_pretrained(out).score(PAIRS)
    torch.testing.assert_close(torch.tensor(after), torch.tensor(before), atol=1e-4, rtol=0)
    single = Reranker.from_pretrained(out).score(PAIRS[0])
    assert single == pytest.approx([before[0]], abs=1e-4)


def test_export_round_trip_scores_with_lora_merged(lora_export):
    out, before, base, _ = lora_export
    assert max(abs(a - b) for a, b in zip(before, base)) > 1e-3, "the adapter must matter for this test"
    assert not (out / "adapter_config.json").exists()  # merged: a plain causal LM
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    after = Reranker.from_pretrained(out).score(PAIRS)
    torch.testing.assert_close(torch.tensor(after), torch.tensor(before), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- (d) FlagLLMReranker parity


def flag_llm_reranker_scores(model_dir: Path, pairs, prompt: str | None = None) -> list[float]:
    """An independent re-implementation of FlagEmbedding's FlagLLMReranker.compute_score for short pairs.

    [bos] + tok("A: " + q) + sep + tok("B: " + p) + sep + tok(prompt); left padded to a multiple of 8;
    a plain AutoModelForCausalLM forward WITHOUT position_ids; logits[:, -1, yes].
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rerank_lightning.model.backbone import MODEL_LOAD_KWARGS  # no Hub kernels (transformers >= 5.25)

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **MODEL_LOAD_KWARGS).eval()
    prompt = prompt or ("Given a query A and a passage B, determine whether the passage contains an answer to "
                        "the query by providing a prediction of either 'Yes' or 'No'.")
    prompt_inputs = tok(prompt, add_special_tokens=False)["input_ids"]
    sep_inputs = tok("\n", add_special_tokens=False)["input_ids"]
    yes_loc = tok("Yes", add_special_tokens=False)["input_ids"][0]
    seqs = []
    for q, p in pairs:
        q_ids = tok(f"A: {q}", add_special_tokens=False)["input_ids"]
        p_ids = tok(f"B: {p}", add_special_tokens=False)["input_ids"]
        seqs.append([tok.bos_token_id] + q_ids + sep_inputs + p_ids + sep_inputs + prompt_inputs)
    length = -(-max(map(len, seqs)) // 8) * 8
    pad = tok.pad_token_id
    input_ids = torch.tensor([[pad] * (length - len(s)) + s for s in seqs])
    attention_mask = torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in seqs])
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[:, -1, yes_loc].float().tolist()


@pytest.mark.parametrize("which", ["full", "lora"])
def test_flag_llm_reranker_parity(which, request):
    out = request.getfixturevalue(f"{which}_export")[0]
    ours = Reranker.from_pretrained(out).score(PAIRS)
    theirs = flag_llm_reranker_scores(out, PAIRS)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), atol=1e-4, rtol=0)


def test_flag_llm_reranker_parity_with_custom_prompt(full_export):
    out = full_export[0]
    prompt = "Does passage B answer query A? Reply Yes or No."
    ours = Reranker.from_pretrained(out).score(PAIRS, prompt=prompt)
    theirs = flag_llm_reranker_scores(out, PAIRS, prompt=prompt)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- (e) LoRA checkpoints and resume


def test_lora_checkpoint_keeps_only_trainable_weights(lora_trained):
    _, module, _, ckpt_path = lora_trained
    assert ckpt_path.is_file(), ckpt_path
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    trainable = module.trainable_at_fit
    assert trainable and set(state) == trainable
    assert all("lora_" in k for k in state)
    assert sum(v.numel() for v in state.values()) < module.params_at_fit / 10


def test_lora_fit_resumes_from_checkpoint(lora_trained, mistral_tokenizer):
    dm_old, _, _, ckpt_path = lora_trained
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3
    L.seed_everything(0, workers=True)
    dm = make_datamodule(mistral_tokenizer, batch_size=2, max_records=12, max_val_queries=2)
    module = make_module(dm, mistral_tokenizer, lora=LORA, lr=2e-2)
    rec = LossRecorder()
    trainer = make_trainer(5, [rec], limit_val_batches=0)
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path))
    assert rec.start_step == 3
    assert trainer.global_step == 5
    assert len(rec.losses) == 2
    # The adapter weights came back from the checkpoint (the base comes from the model config).
    for name, value in saved["state_dict"].items():
        torch.testing.assert_close(rec.start_params[name], value, atol=0, rtol=0)


class BatchRecorder(L.Callback):
    """(global step, input ids) of every training batch, to compare runs batch by batch."""

    def __init__(self):
        self.batches: list[tuple[int, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((trainer.global_step, batch["pair"]["input_ids"].clone()))


def test_resumed_run_sees_the_batches_of_an_uninterrupted_run(mistral_tokenizer, tmp_path):
    """SPEC 2: stopping mid-epoch and resuming from the checkpoint trains on exactly the batches,
    in the same order, that an uninterrupted run sees (Lightning alone would restart the epoch)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_steps, ckpt_path=None, save_every=None):
        dm = make_datamodule(mistral_tokenizer, batch_size=2, max_records=10, max_val_queries=None)
        dm.val_data = None  # training batches only
        recorder = BatchRecorder()
        callbacks = [recorder]
        if save_every:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=save_every, save_top_k=-1,
                                             filename="step{step}", auto_insert_metric_name=False))
        trainer = make_trainer(max_steps, callbacks, enable_checkpointing=bool(save_every))
        trainer.fit(make_module(dm, mistral_tokenizer), datamodule=dm, ckpt_path=ckpt_path)
        return recorder.batches, trainer.global_step

    # 10 records, 2 per batch: 5 steps per epoch; stop at step 3 (mid epoch 0) and at 7 (mid epoch 1)
    full, _ = run(9)
    for stop in (3, 7):
        run(stop, save_every=stop)
        resumed, final_step = run(9, ckpt_path=tmp_path / f"step{stop}.ckpt")
        assert final_step == 9
        assert [step for step, _ in resumed] == list(range(stop, 9))
        for (step, ids), (full_step, full_ids) in zip(resumed, full[stop:]):
            assert step == full_step and torch.equal(ids, full_ids), f"batch at step {step} differs"


def test_evaluate_cli_on_export_reproduces_validation_metrics(trained, full_export, capsys):
    """SPEC 8/9: the exported model, evaluated standalone, gives the metrics validation logged in training."""
    import json as _json

    from rerank_lightning.eval.evaluate import main as evaluate_main

    dm, module, trainer, _ = trained
    logged = trainer.validate(module, datamodule=dm, verbose=False)[0]
    export_dir = full_export[0]
    evaluate_main([str(export_dir), str(SAMPLE / "val_candidates.jsonl"), "--max-queries", "8"])
    printed = _json.loads(capsys.readouterr().out)
    for name in ("MRR@10", "nDCG@10", "MAP"):
        assert printed[name] == pytest.approx(logged[f"val/{name}"], abs=1e-5), name


def test_gradient_checkpointing_gives_the_same_gradients(mistral_tokenizer):
    """model.gradient_checkpointing=true trades compute for memory without changing the gradients."""
    dm = make_datamodule(mistral_tokenizer, max_records=4)
    dm.setup("fit")
    batch = dm.collator([dm.train_set[(0, i)] for i in range(4)])
    grads = []
    for checkpointing in (False, True):
        cfg = dict(TINY_MODEL, gradient_checkpointing=checkpointing)
        module = RerankerModule(cfg, dm.formatter.yes_id, dm.formatter.no_id, len(mistral_tokenizer))
        module.configure_model()
        module.train()
        assert any(getattr(m, "gradient_checkpointing", False) for m in module.lm.modules()) == checkpointing
        scores = module.score_logits(batch["pair"])[:, dm.formatter.yes_id].view(-1, batch["group_size"])
        torch.nn.functional.cross_entropy(scores, torch.zeros(scores.shape[0], dtype=torch.long)).backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_checkpoint_exports_on_its_own(mistral_tokenizer, tmp_path, lora):
    """A train.py checkpoint carries model config and recipe: `python -m rerank_lightning.inference.export
    CKPT DIR` gives an export that scores like the module that wrote the checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from rerank_lightning.inference.export import main as export_main

    L.seed_everything(0, workers=True)
    dm = make_datamodule(mistral_tokenizer, batch_size=2, max_records=4, max_val_queries=None)
    dm.val_data = None
    cfg = dict(TINY_MODEL, lora=lora or {"enabled": False})
    module = RerankerModule(cfg, dm.formatter.yes_id, dm.formatter.no_id, len(mistral_tokenizer),
                            optim={"lr": 1e-2}, recipe=dm.formatter.recipe())
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(2, [ckpt], enable_checkpointing=True).fit(module, datamodule=dm)
    trained = module_scores(module, dm, PAIRS)

    export_main([str(tmp_path / "ckpt" / "last.ckpt"), str(tmp_path / "export")])
    exported = Reranker.from_pretrained(tmp_path / "export").score(PAIRS)
    assert exported == pytest.approx(trained, abs=1e-4)


def test_bf16_weights_with_bf16_mixed_precision_train_with_fp32_losses(mistral_tokenizer):
    """The model=mistral setting (bfloat16 weights, bf16-mixed) on CPU, for correctness: the step runs,
    the loss is fp32 and finite (SPEC 6), and the weights move."""
    L.seed_everything(0, workers=True)
    dm = make_datamodule(mistral_tokenizer, batch_size=2, max_records=4, max_val_queries=None)
    dm.val_data = None
    cfg = dict(TINY_MODEL, dtype="bfloat16", lora=LORA)
    module = RerankerModule(cfg, dm.formatter.yes_id, dm.formatter.no_id, len(mistral_tokenizer),
                            optim={"lr": 1e-2})
    rec = LossRecorder()
    losses = []

    class LossDtype(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"])

    # gradient clipping as conf/trainer sets it: Lightning's mixed precision refuses it with a fused optimizer
    trainer = make_trainer(2, [rec, LossDtype()], precision="bf16-mixed", gradient_clip_val=1.0)
    trainer.fit(module, datamodule=dm)
    assert not trainer.optimizers[0].defaults["fused"]
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses)
    assert next(p for n, p in module.named_parameters() if "q_proj.base_layer" in n).dtype == torch.bfloat16
    moved = [n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p, rec.start_params[n])]
    assert moved, "no trainable weight changed"


def test_export_leaves_the_callers_tokenizer_unchanged(mistral_tokenizer, tmp_path):
    """The export gets a pad token and left padding; the tokenizer still used for training does not change."""
    import copy

    tok = copy.deepcopy(mistral_tokenizer)
    tok.padding_side = "right"
    assert tok.pad_token_id is None
    dm = make_datamodule(tok, max_records=4)
    module = make_module(dm, tok)
    module.configure_model()
    export_reranker(module.lm, dm.formatter, tmp_path)
    assert tok.pad_token_id is None and tok.padding_side == "right"
    assert Reranker.from_pretrained(tmp_path).formatter.tokenizer.pad_token == "<unk>"


def test_adapter_only_export_scores_like_the_trained_module(mistral_tokenizer, tmp_path):
    """SPEC 9 "base + adapter": `export.merge=false` writes the LoRA adapter and the base's config only;
    `Reranker.from_pretrained` rebuilds the base, applies the adapter and scores as in training."""
    L.seed_everything(0, workers=True)
    dm = make_datamodule(mistral_tokenizer, batch_size=2, max_records=4, max_val_queries=None)
    dm.val_data = None
    module = make_module(dm, mistral_tokenizer, lora=LORA, lr=2e-2)
    make_trainer(2).fit(module, datamodule=dm)
    trained = module_scores(module, dm, PAIRS)

    export_reranker(module.lm, dm.formatter, tmp_path, merge=False, base_model=module.model_cfg)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", RECIPE_FILE} <= files
    assert "model.safetensors" not in files
    assert json.loads((tmp_path / RECIPE_FILE).read_text())["base_model"]["random_init"]["model_type"] == "llama"
    assert Reranker.from_pretrained(tmp_path).score(PAIRS) == pytest.approx(trained, abs=1e-4)
    assert module_scores(module, dm, PAIRS) == trained  # the module keeps its adapter

    with pytest.raises(ValueError, match="base_model"):
        export_reranker(module.lm, dm.formatter, tmp_path / "again", merge=False)


def test_gradients_are_freed_after_each_optimizer_step_and_kept_while_accumulating(mistral_tokenizer):
    """A full fine-tune must not hold a weights-sized gradient set through the next forward or
    validation (Lightning zeroes gradients only before the next backward); accumulation still sums."""

    class GradsHeld(L.Callback):
        def __init__(self):
            self.at_batch_start, self.at_validation = [], []

        @staticmethod
        def held(module):
            return any(p.grad is not None for p in module.parameters())

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.at_batch_start.append(self.held(module))

        def on_validation_start(self, trainer, module):
            self.at_validation.append(self.held(module))

    L.seed_everything(0, workers=True)
    dm = make_datamodule(mistral_tokenizer, batch_size=2, max_records=8, max_val_queries=2)
    module = make_module(dm, mistral_tokenizer)
    probe = GradsHeld()
    make_trainer(2, [probe], accumulate_grad_batches=2, limit_val_batches=1).fit(module, datamodule=dm)
    # batches 0-1 make step 1, batches 2-3 step 2: gradients exist only between the two halves of a step
    assert probe.at_batch_start == [False, True, False, True]
    assert probe.at_validation and not any(probe.at_validation)
