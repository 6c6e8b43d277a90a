"""Training runs shared by tests/test_distributed.py and tests/distributed/run_cases.py.

Each case is `rerank_lightning.train.train(cfg)` on a Hydra config composed from conf/ (the real
train.py path: validate, fit, validate, export) with the tiny random Llama on the sample data, plus a
`Recorder` callback that writes, on global rank 0, the loss of every global batch (averaged over ranks),
a fingerprint of each rank's batch, the validation metrics, how FSDP wrapped the model, and the
module's scores of `PAIRS` before and after fit (computed through the strategy's wrapped model, so
FSDP gathers the shards as in training).

The `matryoshka_*` runs are stage-1 Matryoshka self-distillation (`experiment=matryoshka_self_distill`,
SPEC 7) on the same model and data: exits at layers 1 and 2 of the tiny model, passages compressed by
2 before layer 2 at some steps (a pure function of the seed and the step, see `MATRYOSHKA`); for them
the recorder also keeps the scores of `PAIRS` at every exit, compressed and not (`EXIT_SETTINGS`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

PAIRS = [
    ("What is the atomic number of iron?", "The atomic number of iron is 26."),
    ("What is the atomic number of iron?", "The atomic number of copper is 29."),
    ("Who discovered penicillin?", "Penicillin was discovered by Alexander Fleming."),
    ("Who discovered penicillin?", "Wilhelm Röntgen discovered X-rays."),
    ("Which planet is the largest?", "Jupiter is the largest planet of the Solar System."),
]
MAX_STEPS = 4
SAVE_EVERY = 2   # checkpoints at steps 2 and 4 (the last one holds the trained weights)
RESUME_STEP = 2  # the resumed run starts from step 2 and must reproduce steps 2 and 3
GLOBAL_BATCH = 2  # queries per optimizer step, whatever the number of processes

LORA = ["model.lora.enabled=true", "model.gradient_checkpointing=true", "optim.lr=2e-2"]
FULL = ["++model.micro_batch_size=2", "optim.lr=1e-3"]
SAMPLE = ["data=sample"]
# Matryoshka stage 1 (its data recipe: right padding, query/prompt lengths) on the sample data, sized
# like data=sample, with exits 1 and 2 of the 2-layer model, ratio 1 or 2, compress layer 1.
# matryoshka.seed=2 draws (ratio, compress layers) = (1, []), (1, []), (2, [1]), (2, [1]) for steps 0-3
# (`MatryoshkaModule.sample_compression`): the graph changes at step 2, where the resumed runs start.
MATRYOSHKA = [
    "experiment=matryoshka_self_distill", "data.train_data=${paths.data_dir}/sample/train.jsonl",
    "data.val_data=${paths.data_dir}/sample/val_candidates.jsonl", "data.train_group_size=4",
    "data.passage_max_len=64", "data.num_workers=0", "matryoshka.start_layer=1", "matryoshka.compress_layers=[1]",
    "matryoshka.compress_ratios=[1,2]", "matryoshka.seed=2",
]
EXITS = (1, 2)
# (exit layer, compress ratio) at which the recorder scores PAIRS. With 2 layers and compress layer 1
# only the top exit is compressed (compression before layer 1 changes the states after layer 2 only):
# exit 1 at ratio 2 must equal exit 1 at ratio 1.
EXIT_SETTINGS = [(layer, ratio) for layer in EXITS for ratio in (1, 2)]
# single-process reference runs: name -> overrides
REFERENCES: dict[str, list[str]] = {
    "lora": [*SAMPLE, *LORA], "full": [*SAMPLE, *FULL],
    "matryoshka_lora": [*MATRYOSHKA, *LORA], "matryoshka_full": [*MATRYOSHKA, *FULL],
}
# distributed cases: name -> (trainer group, reference)
#   ddp_lora:  DDP, LoRA, transformers' gradient checkpointing (the model=mistral recipe)
#   fsdp_lora: the same under FSDP (the strategy leaves checkpointing to transformers)
#   fsdp_full: full fine-tuning under FSDP, the strategy's per-layer activation checkpointing and
#              micro-batches of 2 sequences (checkpointed per micro-batch) inside each group of 4
#   ddp_matryoshka_lora:  Matryoshka stage 1 as ddp_lora (its model=mistral recipe; the heads train in full)
#   fsdp_matryoshka_full: Matryoshka stage 1 as fsdp_full
# In both, compressed steps run the layer before the compress layer under activation checkpointing
# (transformers' or the strategy's), with the attention row that compression pools by.
CASES: dict[str, tuple[str, str]] = {
    "ddp_lora": ("ddp", "lora"),
    "fsdp_lora": ("fsdp", "lora"),
    "fsdp_full": ("fsdp", "full"),
    "ddp_matryoshka_lora": ("ddp", "matryoshka_lora"),
    "fsdp_matryoshka_full": ("fsdp", "matryoshka_full"),
}


def overrides(name: str, out: Path, world_size: int, resume: bool = False) -> list[str]:
    """Overrides for one run: a case of CASES on `world_size` processes, or with world_size 1 a
    reference of REFERENCES (trainer=cpu)."""
    if world_size == 1:
        trainer, extra = ["trainer=cpu"], REFERENCES[name]
    else:
        group, reference = CASES[name]
        trainer = [f"trainer={group}", "trainer.accelerator=cpu", f"trainer.devices={world_size}",
                   "trainer.precision=32-true"]
        extra = REFERENCES[reference]
    run_dir = out / ("resumed" if resume else "run")
    args = [
        "model=tiny", *extra, "data.max_example_num_per_dataset=24", "data.max_val_queries=2",
        "data.val_batch_size=16", f"data.batch_size={GLOBAL_BATCH // world_size}", "seed=0",
        *trainer, f"trainer.max_steps={MAX_STEPS}", "+trainer.enable_model_summary=false",
        "trainer.enable_progress_bar=false", "~logger", "~callbacks.progress_bar",
        f"callbacks.model_checkpoint.every_n_train_steps={SAVE_EVERY}", "callbacks.model_checkpoint.save_top_k=-1",
        "optim.warmup=1",
        f"+callbacks.recorder._target_={__name__}.Recorder", f"+callbacks.recorder.out={run_dir / 'record.json'}",
        f"hydra.runtime.output_dir={run_dir}",
    ]
    if resume:
        args += [f"ckpt_path={out / 'run' / 'checkpoints' / f'step{RESUME_STEP}.ckpt'}", "export.enabled=false"]
    return args


def compose(args: list[str]):
    """The job config train.py would get for `args` (with the hydra node registered for ${hydra:...})."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=args, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    from omegaconf import OmegaConf

    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.resolve(job)
    return job


def run(case: str, out: Path, world_size: int, resume: bool = False) -> None:
    from rerank_lightning.train import train

    train(compose(overrides(case, out, world_size, resume)))


def _through_wrapper(trainer: L.Trainer, module: L.LightningModule, method: str, *args):
    """`module.<method>(*args)` in eval mode without gradients; all ranks call it (under FSDP the module
    is the root unit, whose forward gathers the shards)."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        out = getattr(module, method)(*args)
    module.train(was_training)
    return out


def exit_scores(trainer: L.Trainer, module: L.LightningModule, pairs=PAIRS) -> dict[str, list[float]]:
    """A Matryoshka module's scores of `pairs`, {"<exit>x<ratio>": scores} for each of `EXIT_SETTINGS`,
    rows right-padded as `Reranker.score` pads them, compressed at the trained compress layers."""
    from rerank_lightning.data.instruction import pad_batch

    fmt = trainer.datamodule.formatter
    items = [fmt.encode_pair(q, p) for q, p in pairs]
    device = trainer.strategy.root_device
    batch = {"pair": {"input_ids": pad_batch([e.input_ids for e in items], fmt.pad_id, "right").to(device),
                      "attention_mask": pad_batch([[1] * len(e.input_ids) for e in items], 0, "right").to(device)},
             "query_lengths": torch.tensor([e.query_length for e in items], device=device),
             "prompt_lengths": torch.tensor([e.prompt_length for e in items], device=device)}
    out = {}
    for layer, ratio in EXIT_SETTINGS:
        layers = list(module.mcfg["compress_layers"]) if ratio > 1 else []
        scores = _through_wrapper(trainer, module, "exit_scores", batch, [layer], layers, ratio)
        out[f"{layer}x{ratio}"] = scores[layer].float().cpu().tolist()
    return out


def is_matryoshka(module: L.LightningModule) -> bool:
    from rerank_lightning.model.matryoshka_module import MatryoshkaModule

    return isinstance(module, MatryoshkaModule)


def trained_scores(trainer: L.Trainer, module: L.LightningModule, pairs=PAIRS) -> list[float]:
    """Yes-logits of `pairs` from the module as trained, through the strategy's wrapper (all ranks call it);
    for a Matryoshka module the top exit's uncompressed scores (what `Reranker.score(pairs)` gives)."""
    if is_matryoshka(module):
        return exit_scores(trainer, module, pairs)[f"{max(EXITS)}x1"]
    fmt = trainer.datamodule.formatter
    items = [[{"input_ids": (ids := fmt.encode_pair(q, p)), "attention_mask": [1] * len(ids)}] for q, p in pairs]
    pair = {k: v.to(trainer.strategy.root_device) for k, v in trainer.datamodule.collator(items)["pair"].items()
            if isinstance(v, torch.Tensor)}
    logits = _through_wrapper(trainer, module, "score_logits", pair)
    return logits[:, fmt.yes_id].float().cpu().tolist()


def wrapping(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Class names of the FSDP2 units (fully_shard renames a class C to FSDPC), and of the modules whose
    activations are recomputed in backward (transformers' gradient checkpointing)."""
    from torch.distributed.fsdp import FSDPModule

    units = [type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)]
    checkpointed = [type(m).__name__.removeprefix("FSDP") for m in model.modules()
                    if getattr(m, "gradient_checkpointing", False) and type(m).__name__.endswith("DecoderLayer")]
    return units, checkpointed


class Recorder(L.Callback):
    """On global rank 0, writes `out` (JSON): per global step the loss averaged over ranks (= the loss of
    the global batch), the gradient norm before clipping and a fingerprint of each rank's batch; the scores of PAIRS at the start and at
    the end of fit; the validation metrics of every validation (train.py: before and after fit); how
    FSDP wrapped the model."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.record: dict[str, Any] = {"losses": {}, "batches": {}, "validations": []}

    def _write(self, trainer) -> None:
        if trainer.is_global_zero:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.record, indent=1))

    def on_train_start(self, trainer, pl_module):
        self.record.update(start_step=trainer.global_step, start_scores=trained_scores(trainer, pl_module))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = str(trainer.global_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        """The gradient norm before Lightning clips it (over all shards: a DTensor under FSDP)."""
        norm = torch.nn.utils.get_total_norm([p.grad for p in pl_module.parameters() if p.grad is not None])
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.record.setdefault("grad_norms", {})[self._step] = float(norm)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = trainer.strategy.reduce(outputs["loss"].detach().float(), reduce_op="mean")
        self.record["losses"][self._step] = float(loss)
        ids = batch["pair"]["input_ids"]
        weights = torch.arange(1, ids.numel() + 1, device=ids.device).view_as(ids)
        fingerprint = (ids.long() * weights).sum() % 1_000_000_007
        self.record["batches"][self._step] = [int(x) for x in trainer.strategy.all_gather(fingerprint).view(-1)]

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self.record["validations"].append({"step": trainer.global_step, **metrics})
            self._write(trainer)

    def on_fit_end(self, trainer, pl_module):
        units, checkpointed = wrapping(trainer.strategy.model)
        self.record.update(
            world_size=trainer.world_size, strategy=type(trainer.strategy).__name__,
            global_step=trainer.global_step, scores=trained_scores(trainer, pl_module),
            fsdp_units=units, checkpointed=checkpointed,
        )
        if is_matryoshka(pl_module):
            self.record["exit_scores"] = exit_scores(trainer, pl_module)
            self.record["compression"] = {str(s): pl_module.sample_compression(s) for s in range(MAX_STEPS)}
        self._write(trainer)


def main(argv: list[str]) -> None:
    """run_cases.py OUT_DIR CASE [CASE ...]: each case trains, then resumes from its step-2 checkpoint."""
    out = Path(argv[0])
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    for case in argv[1:]:
        run(case, out / case, world_size)
        run(case, out / case, world_size, resume=True)


if __name__ == "__main__":
    main(sys.argv[1:])
