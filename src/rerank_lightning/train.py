"""`train(cfg)`: instantiate data, model, loggers, callbacks and trainer from a Hydra config; fit; export."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from .checkpoints import check_resume
from .config_checks import check_config
from .data import RerankDataModule
from .inference.export import export_from_trainer
from .data.formatting import FormatConfigError
from .model import RerankerModule, load_tokenizer
from .model.matryoshka_module import MatryoshkaModule

log = logging.getLogger(__name__)


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    """Every `_target_` entry of a config group such as `logger` or `callbacks` (None entries skipped)."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def build(cfg: DictConfig) -> tuple[RerankDataModule, RerankerModule, L.Trainer]:
    """The three objects of a run, without running anything."""
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = load_tokenizer(cfg.model)  # fails fast if the weights are not available
    datamodule: RerankDataModule = instantiate(cfg.data, tokenizer=tokenizer, _convert_="all")
    fmt = datamodule.formatter
    kwargs = dict(model=cfg.model, yes_token_id=fmt.yes_id, no_token_id=fmt.no_id, vocab_size=len(tokenizer),
                  optim=cfg.optim, loss=cfg.loss, metrics=cfg.metrics, recipe=fmt.recipe())
    if cfg.get("matryoshka"):  # experiment=matryoshka_*: layer-wise exits and compression (SPEC 7)
        if fmt.name != "matryoshka":
            raise FormatConfigError("the Matryoshka experiments need data=matryoshka (query/prompt lengths, "
                                    f"right padding); this run uses the {fmt.name!r} recipe")
        module: RerankerModule = MatryoshkaModule(**kwargs, matryoshka=cfg.matryoshka)
    else:
        module = RerankerModule(**kwargs)
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=_instantiate_all(cfg.get("logger")) or False,
        callbacks=_instantiate_all(cfg.get("callbacks")),
    )
    return datamodule, module, trainer


def train(cfg: DictConfig) -> float | None:
    """Fit with validation before and after, export, and return `cfg.optimized_metric` for sweepers."""
    check_config(cfg)  # before any weights are read
    _write_resolved_config(cfg)
    if cfg.ckpt_path:  # before any model is loaded: a missing, broken or finished checkpoint is one error line
        check_resume(cfg.ckpt_path, cfg.trainer.get("max_steps"), cfg.trainer.get("max_epochs"))
    datamodule, module, trainer = build(cfg)
    try:
        metric = _fit_and_export(cfg, datamodule, module, trainer)
    except BaseException:
        _finish_logger_runs(trainer, exit_code=1)
        raise
    _finish_logger_runs(trainer, exit_code=0)
    return metric


def _write_resolved_config(cfg: DictConfig) -> None:
    """The config as this run used it, to <run folder>/resolved_config.yaml (the screen shows only the path)."""
    if rank_zero_only.rank != 0:
        return
    path = Path(cfg.paths.output_dir) / "resolved_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log.info("resolved config: %s", path)


def _finish_logger_runs(trainer: L.Trainer, exit_code: int) -> None:
    """End this job's W&B run: W&B keeps one run per process, so the next job of a sweep would log into it."""
    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


def _fit_and_export(cfg: DictConfig, datamodule: RerankDataModule, module: RerankerModule,
                    trainer: L.Trainer) -> float | None:
    has_val = datamodule.has_val
    if has_val and cfg.validate_before_training and not cfg.ckpt_path:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the step-0 baseline
        before = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    else:
        before = {}
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    if has_val and getattr(module, "last_validated_step", None) != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    after = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    # Training is over (its checkpoint is saved): drop the optimizer state and the gradients, three times
    # the trainable weights in fp32, before the export makes its own copy of the weights.
    for optimizer in trainer.optimizers:
        optimizer.state.clear()
    module.zero_grad(set_to_none=True)

    export_dir = None
    if cfg.export.enabled:  # every rank: under FSDP the full model is gathered to rank 0, which writes it
        export_dir = export_from_trainer(trainer, module, datamodule.formatter, cfg.export.dir,
                                         merge=cfg.export.merge, base_model=module.model_cfg)
    _summary(cfg, trainer, before, after, export_dir)
    metric = after.get(cfg.optimized_metric) if cfg.get("optimized_metric") else None
    return metric


def _summary(cfg: DictConfig, trainer: L.Trainer, before: dict, after: dict, export_dir: Path | None) -> None:
    """Print the end-of-run summary and write it to <run folder>/summary.json."""
    if not trainer.is_global_zero:
        return
    ckpt = trainer.checkpoint_callback
    checkpoint = ckpt.last_model_path if ckpt is not None and ckpt.last_model_path else None
    # MLflow keeps its runs in a tracking store (a URI), the others in a folder
    logs = {type(logger).__name__: str(getattr(logger, "log_dir", None) or logger.save_dir
                                       or getattr(logger, "_tracking_uri", None)) for logger in trainer.loggers}
    summary = {"steps": trainer.global_step, "metrics_before": before, "metrics_after": after,
               "checkpoint": checkpoint, "export": str(export_dir) if export_dir else None, "logs": logs}
    path = Path(cfg.paths.output_dir) / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")

    lines = [f"finished {trainer.global_step} optimizer steps"]
    for name in sorted(after):
        start = f"{before[name]:.4f} at step 0 -> " if name in before else ""
        lines.append(f"  {name}: {start}{after[name]:.4f} at step {trainer.global_step}")
    if checkpoint:
        lines.append(f"checkpoint: {checkpoint}")
    if export_dir is not None:
        lines.append(f"exported model: {export_dir}")
    lines += [f"{name} logs: {where}" for name, where in logs.items()]
    lines.append(f"summary: {path}")
    print("\n".join(lines), flush=True)
