"""`RerankerModule`: the training step, validation on candidate lists, optimiser and checkpoints."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.checkpoint import checkpoint

from ..eval.metrics import mean_metrics_from_rows
from .backbone import apply_lora, enable_activation_checkpointing, load_causal_lm
from .losses import DISTILLATIONS, OBJECTIVES, ScoredGroups, loss_config
from .scoring import answer_label_ids, answer_logits, packed_answer_logits, packed_order, score_positions


class NonFiniteTrainingError(RuntimeError):
    """A NaN or inf loss or gradient norm; raised before the optimizer step, so no weight took it."""


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


# Inserted into parameter names by FSDP1 units, activation-checkpoint wrappers and torch.compile;
# state dicts (FSDP's included) name parameters without them.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _unwrapped_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def trim_padding(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the columns that are padding in every row (either side); `positions` shift with them.

    Scores do not change: position ids come from the attention mask (model/scoring.py).
    """
    real = rows["attention_mask"].bool().any(0).nonzero()
    start, stop = int(real[0]), int(real[-1]) + 1
    out = {k: (v[:, start:stop] if v.ndim == 2 and v.shape[1] == rows["attention_mask"].shape[1] else v)
           for k, v in rows.items()}
    if "positions" in out:
        out["positions"] = out["positions"] - start
    return out


def micro_batched(fn: Callable[..., Any], rows: dict[str, torch.Tensor], size: int | None,
                  recompute: bool, **kwargs: Any) -> Any:
    """`fn(**rows, **kwargs)` over chunks of `size` rows, outputs (a tensor or a dict of them) concatenated.

    With `recompute` (training), each chunk runs under activation checkpointing: the forward keeps
    only the chunk's inputs and scores, and backward recomputes one chunk at a time, so activation
    memory is bounded by the micro-batch while the loss still sees the whole group (GradCache's
    memory profile for one extra forward).
    """
    n = rows["input_ids"].shape[0]
    if not size or size >= n:
        return fn(**rows, **kwargs)
    outputs = []
    for start in range(0, n, size):
        chunk = {k: v[start : start + size] for k, v in rows.items()}
        chunk = trim_padding(chunk) if "attention_mask" in chunk else chunk  # packed rows: full already
        if recompute:
            outputs.append(checkpoint(fn, use_reentrant=False, **chunk, **kwargs))
        else:
            outputs.append(fn(**chunk, **kwargs))
    if isinstance(outputs[0], dict):
        return {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
    return torch.cat(outputs)


class RerankerModule(L.LightningModule):
    """Scores pairs by the "Yes" logit at the answer position and trains them with SPEC 6 objectives.

    model: a `conf/model` block (weights, dtype, LoRA, gradient checkpointing).
    optim: lr, weight_decay, betas, warmup (fraction of total steps if < 1, else steps).
    loss: `loss.*` (conf/loss/; checked and completed by `losses.loss_config`).
    metrics: k, relevance_threshold.
    recipe: the formatting facts (`PairFormatter.recipe()`), kept in checkpoints for export.
    """

    def __init__(self, model: Mapping[str, Any], yes_token_id: int, no_token_id: int, vocab_size: int,
                 optim: Mapping[str, Any] | None = None, loss: Mapping[str, Any] | None = None,
                 metrics: Mapping[str, Any] | None = None, recipe: Mapping[str, Any] | None = None):
        super().__init__()
        # Plain containers, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({
            "model": _plain(model), "yes_token_id": yes_token_id, "no_token_id": no_token_id,
            "vocab_size": vocab_size, "optim": _plain(optim), "loss": _plain(loss), "metrics": _plain(metrics),
            "recipe": _plain(recipe),  # PairFormatter.recipe(): lets a checkpoint be exported on its own
        })
        self.model_cfg = _plain(model)
        self.optim_cfg = {"lr": 1e-4, "weight_decay": 0.0, "betas": (0.9, 0.999), "warmup": 0.1, **(_plain(optim) or {})}
        self.loss_cfg = loss_config(_plain(loss))  # defaults filled in; ValueError on a bad key or value
        self.metric_cfg = {"k": 10, "relevance_threshold": 1, **(_plain(metrics) or {})}
        self.yes_id, self.no_id = yes_token_id, no_token_id
        self.lm: torch.nn.Module | None = None
        self._val_outputs: list[torch.Tensor] = []
        self.last_validated_step: int | None = None
        self._losses_finite: torch.Tensor | None = None  # since the last optimizer step
        # With LoRA, checkpoints keep only trainable weights; the frozen base comes from `model`.
        self.strict_loading = not (self.model_cfg.get("lora") or {}).get("enabled", False)

    def configure_model(self) -> None:
        """Build the LM once (Lightning calls this inside the strategy's context, e.g. FSDP)."""
        if self.lm is not None:
            return
        lm = load_causal_lm(self.model_cfg, self.hparams.vocab_size)
        if self.model_cfg.get("gradient_checkpointing"):
            enable_activation_checkpointing(lm)
        lora = self.model_cfg.get("lora") or {}
        if lora.get("enabled"):
            lm = apply_lora(lm, lora)
        # `from_pretrained` returns eval mode: built for training, the LM starts in train mode (so Lightning's
        # start-of-fit summary and mode check see it); on_train_start makes sure of it on every path.
        self.lm = lm.train()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                scored_pair: torch.Tensor | None = None, pair_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[N, V] next-token logits at `positions` (packed rows: at `scored_pair`, row-major). Scoring goes
        through this forward so that a root-level FSDP wrapper gathers the embeddings and LM head around it."""
        if scored_pair is not None:
            return packed_answer_logits(self.lm, input_ids, position_ids, scored_pair, pair_ids)
        return answer_logits(self.lm, input_ids, attention_mask, positions)

    @property
    def micro_batch_size(self) -> int | None:
        """Sequences per forward inside a batch (`model.micro_batch_size`); None: all at once."""
        return self.model_cfg.get("micro_batch_size")

    def score_logits(self, pair: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[N, V] logits of the answer token for each pair of a collated `pair` (padded or packed rows)."""
        recompute = self.training and torch.is_grad_enabled()
        if "scored_pair" in pair:  # data.packing: micro-batches count packed rows
            rows = {k: pair[k] for k in ("input_ids", "position_ids", "scored_pair", "pair_ids") if k in pair}
            return micro_batched(self, rows, self.micro_batch_size, recompute)[packed_order(pair["scored_pair"])]
        rows = {"input_ids": pair["input_ids"], "attention_mask": pair["attention_mask"],
                "positions": score_positions(pair["attention_mask"], pair.get("labels"))}
        return micro_batched(self, rows, self.micro_batch_size, recompute)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        pair = batch["pair"]
        logits = self.score_logits(pair)
        scores = logits[:, self.yes_id].float().view(-1, batch["group_size"])  # real B, never a configured one
        groups = ScoredGroups(scores, batch.get("grades"), batch.get("group_mask"), logits, answer_label_ids(pair))
        cfg = self.loss_cfg
        loss = OBJECTIVES[cfg["objective"]](groups, cfg)
        self.log(f"train/{cfg['objective']}_loss", loss, batch_size=scores.shape[0])
        if cfg["distill_weight"] and "teacher_scores" in batch:
            distill = DISTILLATIONS[cfg["distill"]](batch["teacher_scores"], groups, cfg)
            self.log("train/distill_loss", distill, batch_size=scores.shape[0])
            loss = loss + cfg["distill_weight"] * distill
        self.log("train/loss", loss, prog_bar=True, batch_size=scores.shape[0])
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=False)
        return loss

    def on_train_start(self) -> None:
        # `from_pretrained` returns eval mode and Lightning keeps module modes at fit start; dropout and
        # transformers' gradient checkpointing need train mode. Validation captures and restores it.
        self.trainer.model.train()

    def on_before_backward(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach())
        self._losses_finite = finite if self._losses_finite is None else self._losses_finite & finite

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop on a non-finite loss or gradient norm before the step writes it into the weights."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor over the ranks' shards
            norm = norm.full_tensor()
        losses_finite = self._losses_finite if self._losses_finite is not None else torch.ones((), dtype=torch.bool)
        self._losses_finite = None
        # fp16's GradScaler skips the steps whose gradients overflow by itself; the loss must still be finite
        norm_finite = torch.isfinite(norm) | (self.trainer.scaler is not None)
        bad = not bool(losses_finite & norm_finite)
        if self.trainer.strategy.reduce_boolean_decision(bad, all=False):  # every rank stops together
            raise NonFiniteTrainingError(self._non_finite_message(bool(losses_finite), float(norm)))

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The step, then the gradients freed: Lightning zeroes them only before the next backward, so a
        full fine-tune would otherwise hold a weights-sized copy through the next forward and validation."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def _non_finite_message(self, losses_finite: bool, grad_norm: float) -> str:
        what = f"gradient norm {grad_norm}" + ("" if losses_finite else " and a non-finite loss")
        causes = [f"optim.lr={self.optim_cfg['lr']} too high"]
        if self.loss_cfg["distill_weight"]:
            causes.append(f"with teacher scores, loss.temperature={self.loss_cfg['temperature']} too small or "
                          "the scores too large for float32")
        if "16" in str(self.trainer.precision):
            causes.append(f"overflow in {self.trainer.precision} precision")
        return (f"training stopped at step {self.global_step + 1}: {what}; the update was not applied and "
                f"nothing was exported. Likely cause: {', or '.join(causes)}")

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        scores = self.score_logits(batch["pair"])[:, self.yes_id].float()
        keys = [batch[k].float() for k in ("query_index", "candidate_index", "label", "tie_order")]
        self._val_outputs.append(torch.stack([*keys, scores], dim=1))

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        rows = torch.cat(self._val_outputs)
        self._val_outputs.clear()
        rows = self.all_gather(rows).reshape(-1, rows.shape[-1])  # every rank sees all queries
        metrics = mean_metrics_from_rows(rows, self.metric_cfg["k"], self.metric_cfg["relevance_threshold"],
                                         **(getattr(self.trainer.datamodule, "val_judgements", None) or {}))
        if not self.trainer.sanity_checking:
            self.last_validated_step = self.trainer.global_step
        self.log_dict({f"val/{name}": value for name, value in metrics.items()}, prog_bar=True, sync_dist=False)

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_cfg
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        # fused: one kernel per step, no temporaries; torch's default on CPU (one parameter at a time) holds
        # two of the largest parameter's size, SmolLM2's 108 MiB embedding matrix, at the default run's
        # peak. Lightning's mixed-precision plugin refuses gradient clipping with a fused optimizer.
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg["lr"], betas=tuple(cfg["betas"]), fused=not str(self.trainer.precision).endswith("-mixed"),
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(cfg["warmup"] * total) if cfg["warmup"] < 1 else int(cfg["warmup"])

        def linear_warmup_decay(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()  # `load_from_checkpoint` needs the LM before the state dict is loaded

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.strict_loading:  # LoRA: keep the adapter, drop the frozen base weights
            trainable = {_unwrapped_name(name) for name, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
