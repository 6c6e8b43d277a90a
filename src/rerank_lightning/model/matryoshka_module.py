"""`MatryoshkaModule`: cascaded self-distillation (stage 1) and compensation (stage 2), SPEC 7."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..eval.metrics import mean_metrics_from_rows
from .losses import SELF_DISTILL_METHODS, matryoshka_loss, self_distill_teachers
from .matryoshka import (  # noqa: F401  (HEADS_FILE, compensation_name: part of this module's API)
    COMPRESS_METHODS, HEADS_FILE, LayerwiseHeads, compensation_name, exit_layers, exit_scores, load_heads,
)
from .module import RerankerModule, _plain, micro_batched

STAGES = ("self_distill", "compensation")
FACTORS = ("depth", "width")
DEFAULTS: dict[str, Any] = {
    "stage": "self_distill",
    "start_layer": 4,             # first exit with a head; exits every `layer_sep` layers up to the top
    "layer_sep": 1,
    "compress_layers": [4, 8, 12, 16, 20, 24, 28],
    "compress_ratios": [1, 2, 4, 8],
    "compress_method": "attention",   # attention | mean
    "method": "fixed_interval",       # teacher | final_layer | cascade | fixed_interval
    "interval": 8,
    "self_distill_weight": 1.0,
    "factor": None,                   # compensation: depth | width
    "val_compress_ratio": 1,          # validation: this ratio at every compress layer
    "seed": 0,                        # with the step, picks each step's compression
}


def check_settings(matryoshka: Mapping[str, Any], lora: bool) -> None:
    """ValueError naming the `matryoshka.*` key whose value cannot work (before any model is loaded)."""
    cfg = {**DEFAULTS, **matryoshka}
    for key, allowed in (("stage", STAGES), ("compress_method", COMPRESS_METHODS),
                         ("method", SELF_DISTILL_METHODS)):
        if cfg[key] not in allowed:
            raise ValueError(f"matryoshka.{key} must be one of {allowed}, got {cfg[key]!r}")
    if any(int(r) < 1 for r in cfg["compress_ratios"]) or not cfg["compress_ratios"]:
        raise ValueError(f"matryoshka.compress_ratios must be integers >= 1, got {cfg['compress_ratios']}")
    if cfg["stage"] == "compensation":
        if cfg["factor"] not in FACTORS:
            raise ValueError(f"compensation needs matryoshka.factor in {FACTORS}, got {cfg['factor']!r}")
        if not lora:
            raise ValueError("compensation trains a fresh LoRA adapter: set model.lora.enabled=true")


class MatryoshkaModule(RerankerModule):
    """Layer-wise heads at every exit, trained with random passage compression (SPEC 7).

    Stage `self_distill`: LoRA (or full) fine-tuning plus heads; per step a ratio from
    `compress_ratios` and each compress layer with probability 1/2; loss summed over exits of
    CE + KD(data teacher) + KD(deeper uncompressed exit, per `method`).
    Stage `compensation`: the model is a merged stage-1 export (`model.pretrained`), its heads are
    loaded and frozen, and a fresh LoRA learns one factor (`factor: depth` with ratio 1 at every
    exit, or `width` with one ratio at random compress layers), distilling from the same weights
    with the adapter disabled (top exit, uncompressed) and from data teacher scores.
    """

    def __init__(self, *args: Any, matryoshka: Mapping[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.mcfg = {**DEFAULTS, **(_plain(matryoshka) or {})}
        self.hparams["matryoshka"] = self.mcfg
        check_settings(self.mcfg, lora=(self.model_cfg.get("lora") or {}).get("enabled", False))
        self.heads: LayerwiseHeads | None = None
        self.exits: list[int] = []
        self._val_exits: dict[int, list[torch.Tensor]] = {}
        # strict_loading (set by RerankerModule): with LoRA only trainable weights (adapter, stage-1
        # heads) are checkpointed; compensation's frozen heads come back from the stage-1 export.

    # ---- model ------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.lm is not None:
            return
        super().configure_model()
        if self.mcfg["stage"] == "compensation":  # the stage-1 heads and exits, frozen
            heads = load_heads(self.model_cfg["pretrained"], next(self.lm.parameters()).device)
            heads.requires_grad_(False)
        else:
            n_layers = len(self._decoder().layers)
            layers = exit_layers(n_layers, int(self.mcfg["start_layer"]), int(self.mcfg["layer_sep"]))
            heads = LayerwiseHeads.from_yes_row(self.lm, self.yes_id, layers)
        self.heads, self.exits = heads, heads.layers

    def _decoder(self) -> torch.nn.Module:
        from .scoring import causal_lm

        return causal_lm(self.lm).get_decoder()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_lengths: torch.Tensor | None = None,
                prompt_lengths: torch.Tensor | None = None, exits: tuple[int, ...] = (),
                compress_layers: tuple[int, ...] = (), compress_ratio: int = 1) -> dict[int, torch.Tensor]:
        """{exit layer: [N] scores} for one batch of rows, one pass up to the deepest exit."""
        return exit_scores(self.lm, self.heads, input_ids, attention_mask, exits or self.exits, compress_layers,
                           compress_ratio, query_lengths, prompt_lengths, self.mcfg["compress_method"])

    def exit_scores(self, batch: Mapping[str, Any], exits: list[int], compress_layers: list[int],
                    ratio: int) -> dict[int, torch.Tensor]:
        pair = batch["pair"]
        rows = {"input_ids": pair["input_ids"], "attention_mask": pair["attention_mask"]}
        for key in ("query_lengths", "prompt_lengths"):
            value = batch.get(key, pair.get(key))
            if value is not None:
                rows[key] = torch.as_tensor(value, device=pair["input_ids"].device)
        recompute = self.training and torch.is_grad_enabled()
        return micro_batched(self, rows, self.micro_batch_size, recompute, exits=tuple(exits),
                             compress_layers=tuple(compress_layers), compress_ratio=int(ratio))

    def sample_compression(self, step: int) -> tuple[int, list[int]]:
        """This step's ratio and compress layers: a pure function of (seed, step), the same on every rank."""
        gen = torch.Generator().manual_seed(int(self.mcfg["seed"]) * 1_000_003 + step)
        ratios = [int(r) for r in self.mcfg["compress_ratios"]]
        ratio = ratios[int(torch.randint(len(ratios), (1,), generator=gen))]
        layers = [int(c) for c in self.mcfg["compress_layers"] if torch.rand((), generator=gen) < 0.5]
        return ratio, layers if ratio > 1 else []

    # ---- training ---------------------------------------------------------------------------------

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        group = batch["group_size"]
        ratio, layers = self.sample_compression(self.global_step)
        scores = {l: s.view(-1, group) for l, s in self.exit_scores(batch, self.exits, layers, ratio).items()}
        top = max(self.exits)
        if self.mcfg["stage"] == "compensation":
            teachers = {l: top for l in self.exits}
            with torch.no_grad(), self.lm.disable_adapter():
                full = self.exit_scores(batch, [top], [], 1)
        else:
            teachers = self_distill_teachers(self.exits, self.mcfg["method"], int(self.mcfg["interval"]))
            needed = sorted(set(teachers.values()))
            if not needed:
                full = {}
            elif ratio == 1 or not layers:  # this pass was uncompressed already
                full = {m: scores[m].detach().flatten() for m in needed}
            else:
                with torch.no_grad():
                    full = self.exit_scores(batch, needed, [], 1)
        self_teacher = {m: s.view(-1, group) for m, s in full.items()}
        loss, parts = matryoshka_loss(
            scores, batch.get("teacher_scores"), self_teacher, teachers,
            distill_weight=self.loss_cfg["distill_weight"], self_distill_weight=self.mcfg["self_distill_weight"],
            temperature=self.loss_cfg["temperature"],
        )
        size = next(iter(scores.values())).shape[0]
        for name, value in parts.items():
            self.log(f"train/{name}_loss", value, batch_size=size)
        self.log("train/compress_ratio", float(ratio), batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=False)
        return loss

    # ---- validation: every exit at `val_compress_ratio` --------------------------------------------

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        ratio = int(self.mcfg["val_compress_ratio"])
        layers = list(self.mcfg["compress_layers"]) if ratio > 1 else []
        keys = [batch[k].float() for k in ("query_index", "candidate_index", "label", "tie_order")]
        for layer, s in self.exit_scores(batch, self.exits, layers, ratio).items():
            self._val_exits.setdefault(layer, []).append(torch.stack([*keys, s.float()], dim=1))

    def on_validation_epoch_end(self) -> None:
        if not self._val_exits:
            return
        top = max(self._val_exits)
        logged: dict[str, torch.Tensor] = {}
        for layer, chunks in sorted(self._val_exits.items()):
            rows = torch.cat(chunks)
            rows = self.all_gather(rows).reshape(-1, rows.shape[-1])
            metrics = mean_metrics_from_rows(rows, self.metric_cfg["k"], self.metric_cfg["relevance_threshold"],
                                             **(getattr(self.trainer.datamodule, "val_judgements", None) or {}))
            for name, value in metrics.items():
                logged[f"val/exit{layer}/{name}"] = value
                if layer == top:
                    logged[f"val/{name}"] = value
        self._val_exits.clear()
        if not self.trainer.sanity_checking:
            self.last_validated_step = self.trainer.global_step
        self.log_dict(logged, prog_bar=False, sync_dist=False)
