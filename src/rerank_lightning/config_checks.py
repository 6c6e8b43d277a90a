"""Reject config values that cannot work before any model is loaded, naming the key and its allowed range."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from .data.datamodule import RECIPES
from .data.records import ON_ERROR
from .model.matryoshka_module import check_settings
from .model.losses import loss_config
from .model.scoring import MASKED_ATTENTION


class ConfigError(ValueError):
    """A config value outside what the code accepts; the message names the key and the allowed values."""


# key: (integer?, lowest allowed, lowest excluded?)
RANGES: dict[str, tuple[bool, float, bool]] = {
    "optim.lr": (False, 0, False),
    "optim.warmup": (False, 0, False),          # < 1: fraction of the steps, >= 1: steps
    "optim.weight_decay": (False, 0, False),
    "data.train_group_size": (True, 1, False),
    "data.batch_size": (True, 1, False),
    "data.val_batch_size": (True, 1, False),
    "data.query_max_len": (True, 1, False),
    "data.passage_max_len": (True, 1, False),
    "data.packed_length": (True, 1, False),
    "metrics.k": (True, 1, False),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "data.on_error": ON_ERROR,
    "data.recipe": tuple(RECIPES),
}


def _range_error(key: str, value: Any, integer: bool, low: float, exclusive: bool) -> str | None:
    kind = "an integer" if integer else "a number"
    allowed = f"{kind} {'>' if exclusive else '>='} {low:g}"
    number = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not number or value < low or (exclusive and value == low):
        return f"{key} must be {allowed}, got {value!r}"
    return None


def check_config(cfg: DictConfig) -> None:
    """Raise `ConfigError` for the first key of `RANGES`/`CHOICES` (and `loss.*`, `matryoshka.*`) that cannot work."""
    for key, (integer, low, exclusive) in RANGES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and (message := _range_error(key, value, integer, low, exclusive)):
            raise ConfigError(message)
    betas = OmegaConf.select(cfg, "optim.betas", default=None)
    if betas is not None and (len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(betas)}")
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    try:  # loss.*: the loss registry checks its own keys (objective, distill, temperature, sigma, ...)
        loss_config(OmegaConf.to_container(cfg.loss, resolve=True) if cfg.get("loss") else None)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    attn = OmegaConf.select(cfg, "model.attn_implementation", default=None)
    shared = OmegaConf.select(cfg, "data.packing", default=False) and OmegaConf.select(
        cfg, "data.share_query_prefix", default=True)
    if shared and attn is not None and attn not in MASKED_ATTENTION:
        raise ConfigError(f"data.share_query_prefix=true needs model.attn_implementation sdpa or eager (its rows take "
                          f"an attention mask), got {attn!r}; set data.share_query_prefix=false")
    if cfg.get("matryoshka"):
        lora = bool(OmegaConf.select(cfg, "model.lora.enabled", default=False))
        try:
            check_settings(OmegaConf.to_container(cfg.matryoshka, resolve=True), lora=lora)
        except ValueError as err:
            raise ConfigError(str(err)) from None
