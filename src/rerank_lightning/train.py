"""`train(cfg)`: instantiate data, model, loggers, callbacks and trainer from a Hydra config; fit; export."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .checkpoints import check_resume
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
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.ckpt_path:  # before any model is loaded: a missing, broken or finished checkpoint is one error line
        check_resume(cfg.ckpt_path, cfg.trainer.get("max_steps"), cfg.trainer.get("max_epochs"))
    datamodule, module, trainer = build(cfg)
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

    export_dir = None
    if cfg.export.enabled:  # every rank: under FSDP the full model is gathered to rank 0, which writes it
        export_dir = export_from_trainer(trainer, module, datamodule.formatter, cfg.export.dir,
                                         merge=cfg.export.merge, base_model=module.model_cfg)
    _summary(cfg, trainer, before, after, export_dir)
    metric = after.get(cfg.optimized_metric) if cfg.get("optimized_metric") else None
    return metric


def _summary(cfg: DictConfig, trainer: L.Trainer, before: dict, after: dict, export_dir: Path | None) -> None:
    if not trainer.is_global_zero:
        return
    lines = [f"finished {trainer.global_step} optimizer steps"]
    for name in sorted(after):
        start = f"{before[name]:.4f} at step 0 -> " if name in before else ""
        lines.append(f"  {name}: {start}{after[name]:.4f} at step {trainer.global_step}")
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and ckpt.last_model_path:
        lines.append(f"checkpoint: {ckpt.last_model_path}")
    if export_dir is not None:
        lines.append(f"exported model: {export_dir}")
    for logger in trainer.loggers:
        # MLflow keeps its runs in a tracking store (a URI), the others in a folder
        where = getattr(logger, "log_dir", None) or logger.save_dir or getattr(logger, "_tracking_uri", None)
        lines.append(f"{type(logger).__name__} logs: {where}")
    print("\n".join(lines), flush=True)
