"""Multi-GPU / multi-node strategies (`trainer=ddp`, `trainer=fsdp`) and full-model gathering for export.

`RerankFSDPStrategy` is Lightning's `FSDPStrategy` (FSDP1, `use_orig_params=True`) with what a
Hugging Face causal LM needs and Lightning leaves to the user:

- the auto-wrap policy and activation checkpointing use the model's own decoder-layer class,
  found on the built model (the classes named by `_no_split_modules` of its transformers
  `PreTrainedModel`: `LlamaDecoderLayer`, `MistralDecoderLayer`, `Qwen2DecoderLayer`, ...), so one
  config serves every backbone;
- a LoRA model whose adapter is fp32 on a bf16 base (peft's default) gets its trainable
  parameters cast to the base dtype, because an FSDP1 flat parameter holds one dtype;
- gradient clipping by norm works (Lightning's FSDP precision plugin refuses it): it calls the
  root's `FullyShardedDataParallel.clip_grad_norm_`, which reduces the norm over all shards;
- `trainer.validate` -> `trainer.fit` -> `trainer.validate` (what train.py does) reuses the root
  FSDP wrapper instead of leaving the root's own parameters (embeddings, final norm, LM head)
  as shards outside any FSDP unit;
- sharded LoRA checkpoints (which keep only the adapter) load back: missing frozen keys are
  allowed when the module sets `strict_loading = False`;
- it also runs on CPU with gloo (for the tests), which Lightning's `strategy="fsdp"` refuses.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["RerankFSDPStrategy", "decoder_layer_classes", "decoder_layer_policy", "full_state_dict", "is_sharded",
           "unify_dtypes"]


# ---------------------------------------------------------------- the model's own layer classes


def decoder_layer_classes(model: nn.Module, names: Iterable[str] | None = None) -> tuple[type[nn.Module], ...]:
    """Classes of `model`'s repeated decoder blocks: those its transformers models list in
    `_no_split_modules` (or the class names given in `names`), as found among `model.modules()`.

    Works through a peft wrapper or a LightningModule holding the LM. Raises if none is found, since
    FSDP without a per-layer policy would gather the whole model at once.
    """
    wanted = set(names or ())
    if not wanted:
        for module in model.modules():
            no_split = getattr(type(module), "_no_split_modules", None) or getattr(module, "_no_split_modules", None)
            if no_split and hasattr(module, "config"):  # a transformers PreTrainedModel
                wanted.update(no_split)
    found: dict[str, type[nn.Module]] = {}
    for module in model.modules():
        cls = type(module)
        if cls.__name__ in wanted:
            found[cls.__name__] = cls
    if not found:
        raise ValueError(
            f"no decoder-layer class found in {type(model).__name__}: looked for {sorted(wanted) or 'the classes in '}"
            f"{'' if wanted else '_no_split_modules of its transformers models'}; name them with "
            f"trainer.strategy.layer_classes=[...]"
        )
    return tuple(found[name] for name in sorted(found))


def unify_dtypes(model: nn.Module) -> torch.dtype | None:
    """Cast trainable floating parameters to the dtype of the frozen ones when the two differ.

    peft keeps LoRA weights in fp32 on a bf16 base; FSDP1 flattens each wrapped unit into one
    tensor, which must have one dtype. Returns the dtype cast to, or None when nothing changed.
    """
    frozen = {p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad}
    trainable = [p for p in model.parameters() if p.is_floating_point() and p.requires_grad]
    if len(frozen) != 1 or all(p.dtype in frozen for p in trainable):
        return None
    (dtype,) = frozen
    for p in trainable:
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    log.info("FSDP: cast %d trainable parameters to the frozen parameters' dtype %s", len(trainable), dtype)
    return dtype


def _hf_gradient_checkpointing(model: nn.Module) -> bool:
    """Whether a transformers model inside `model` has its own gradient checkpointing switched on."""
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m, "_no_split_modules"):
            flag = m.is_activation_checkpointing if hasattr(m, "is_activation_checkpointing") else \
                getattr(m, "is_gradient_checkpointing", False)
            if flag:
                return True
    return False


# ---------------------------------------------------------------- FSDP


def decoder_layer_policy(names: Iterable[str] | None = None) -> Any:
    """An FSDP1 auto-wrap policy with one unit per decoder layer, the classes resolved from the
    model being wrapped (see `decoder_layer_classes`) when FSDP applies it."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    class DecoderLayerWrapPolicy(ModuleWrapPolicy):
        def __init__(self) -> None:
            super().__init__(())
            self.names = list(names) if names else None

        def _run_policy(self, root_module: nn.Module, ignored_modules: set, root_kwargs: dict) -> dict:
            self._module_classes = set(decoder_layer_classes(root_module, self.names))
            self._module_classes_str = str(self._module_classes)
            return super()._run_policy(root_module, ignored_modules, root_kwargs)

    return DecoderLayerWrapPolicy()


class _NormClippingFSDPPrecision(FSDPPrecision):
    """FSDPPrecision that clips by norm through the root FSDP module (set by the strategy)."""

    root: nn.Module | None = None

    def clip_grad_by_norm(self, optimizer: Any, clip_val: int | float, norm_type: float = 2.0) -> None:
        if self.root is None:  # not set up by RerankFSDPStrategy: Lightning's error
            return super().clip_grad_by_norm(optimizer, clip_val)
        self.root.clip_grad_norm_(clip_val, norm_type=norm_type)  # the norm over all shards


class RerankFSDPStrategy(FSDPStrategy):
    """FSDPStrategy for Hugging Face causal LMs (see the module docstring).

    sharding_strategy: FULL_SHARD (default, ZeRO-3), SHARD_GRAD_OP (ZeRO-2), HYBRID_SHARD (full shard
        within a node, replicas across nodes), _HYBRID_SHARD_ZERO2 or NO_SHARD.
    wrap_layers: one FSDP unit per decoder layer (the layers of `_no_split_modules`, or `layer_classes`).
    activation_checkpointing_layers: recompute each decoder layer in backward. Skipped when the model
        already uses transformers' gradient checkpointing (`model.gradient_checkpointing=true`).
    layer_classes: class names to use instead of the model's `_no_split_modules`.
    cast_trainable_to_base_dtype: see `unify_dtypes` (LoRA on a bf16 base).
    state_dict_type: "sharded" (default: each rank writes its shards into a checkpoint directory) or
        "full" (rank 0 writes one file; needs the whole model in rank 0's CPU memory).
    Other arguments go to Lightning's FSDPStrategy and on to FullyShardedDataParallel
    (e.g. cpu_offload, limit_all_gathers, forward_prefetch).
    """

    strategy_name = "rerank_fsdp"

    def __init__(
        self,
        sharding_strategy: str = "FULL_SHARD",
        wrap_layers: bool = True,
        activation_checkpointing_layers: bool = True,
        layer_classes: list[str] | None = None,
        cast_trainable_to_base_dtype: bool = True,
        state_dict_type: str = "sharded",
        process_group_backend: str | None = None,
        timeout_minutes: float | None = None,
        **kwargs: Any,
    ) -> None:
        if timeout_minutes is not None:
            kwargs["timeout"] = timedelta(minutes=timeout_minutes)
        if wrap_layers and kwargs.get("auto_wrap_policy") is None:
            kwargs["auto_wrap_policy"] = decoder_layer_policy(layer_classes)
        super().__init__(sharding_strategy=sharding_strategy, state_dict_type=state_dict_type,
                         process_group_backend=process_group_backend, **kwargs)
        self.wrap_layers = wrap_layers
        self.activation_checkpointing_layers = activation_checkpointing_layers
        self.layer_classes = list(layer_classes) if layer_classes else None
        self.cast_trainable_to_base_dtype = cast_trainable_to_base_dtype
        self._root: nn.Module | None = None  # the FSDP wrapper of the LightningModule, reused across runs

    # Lightning builds an FSDPPrecision for any FSDPStrategy; swap in the one that can clip by norm.
    @property
    def precision_plugin(self) -> FSDPPrecision:
        plugin = self._precision_plugin
        if plugin is None:
            plugin = FSDPPrecision("32-true")
        if not isinstance(plugin, _NormClippingFSDPPrecision):
            plugin = _NormClippingFSDPPrecision(plugin.precision, scaler=plugin.scaler)
            self._precision_plugin = plugin
        return plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin: Any) -> None:
        FSDPStrategy.precision_plugin.fset(self, plugin)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if self._root is not None and getattr(self._root, "module", None) is model:
            return self._root  # fit after validate, validate after fit: same shards, same root
        if any(isinstance(m, FSDP) for m in model.modules()):
            raise RuntimeError("the model is already wrapped in FSDP by another strategy instance")
        classes = ()
        if self.wrap_layers or self.activation_checkpointing_layers:  # fails early if the model has none
            classes = decoder_layer_classes(model, self.layer_classes)
        log.info("FSDP: %s, decoder layers %s", self.sharding_strategy.name, [c.__name__ for c in classes])
        if self.cast_trainable_to_base_dtype:
            unify_dtypes(model)
        kwargs = dict(self.kwargs)  # holds the decoder-layer policy unless wrap_layers=false
        cpu = self.root_device.type == "cpu"
        wrapped = FSDP(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            # FSDP1 reads device_id=None as "the current CUDA device": name the CPU (tests, gloo) explicitly
            device_id=self.root_device if cpu else self.root_device.index,
            **kwargs,
        )
        if self.activation_checkpointing_layers:
            if _hf_gradient_checkpointing(model):
                log.info("FSDP: transformers gradient checkpointing is on; not wrapping layers a second time")
            else:
                from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing

                _setup_activation_checkpointing(wrapped, {"check_fn": lambda m: isinstance(m, classes)})
        self.precision_plugin.root = wrapped
        self._root = wrapped
        return wrapped

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not checkpoint.get("state_dict"):  # e.g. a LoRA filter that matched no (wrapped) parameter name
            raise RuntimeError(f"refusing to write {filepath}: the checkpoint holds no model weights")
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def _reload_train_dataloader(self) -> None:
        """FSDP restores a checkpoint after `setup`, where `configure_optimizers` (through
        `trainer.estimated_stepping_batches`) has already built the training dataloader; the datamodule's
        restored state (the mid-epoch position, see `RerankDataModule.state_dict`) would never reach it.
        Drop the built loader so that fit builds it again after the restore, as it does without FSDP."""
        module = self.lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        if trainer is not None and trainer.state.fn == "fit" and hasattr(trainer.fit_loop, "_combined_loader"):
            trainer.fit_loop._combined_loader = None

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """A sharded checkpoint of a module with `strict_loading = False` (LoRA: adapter only) loads the
        keys it has; everything else goes to Lightning."""
        from lightning.fabric.strategies.fsdp import _get_sharded_state_dict_context, _is_sharded_checkpoint

        self._reload_train_dataloader()
        path = Path(self.broadcast(checkpoint_path))
        module = self.lightning_module
        if not _is_sharded_checkpoint(path) or module is None or module.strict_loading:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        reader = dcp.FileSystemReader(path)
        saved = {key.split(".", 1)[1] for key in reader.read_metadata().state_dict_metadata if key.startswith("model.")}
        with _get_sharded_state_dict_context(self.model):
            state = {k: v for k, v in self.model.state_dict().items() if k in saved}
            missing = saved - set(state)
            if missing:
                raise KeyError(f"{path}: the checkpoint holds weights this model does not have: {sorted(missing)[:5]}")
            module_state = {"model": state}
            dcp.load(module_state, storage_reader=reader)
            self.model.load_state_dict(module_state["model"], strict=False)
            if module.trainer.state.fn == "fit" and self.optimizers:
                for idx, optim in enumerate(self.optimizers):
                    key = f"optimizer_{idx}"
                    optim_state = load_sharded_optimizer_state_dict(
                        model_state_dict=module_state["model"], optimizer_key=key, storage_reader=reader)
                    optim.load_state_dict(FSDP.optim_state_dict_to_load(
                        model=self.model, optim=optim, optim_state_dict=optim_state[key]))
        from lightning.fabric.strategies.fsdp import _METADATA_FILENAME

        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)


# ---------------------------------------------------------------- gathering for export


def is_sharded(model: nn.Module | None) -> bool:
    """Whether `model` (a strategy's wrapped model) holds parameter shards: FSDP1 or FSDP2/DTensor."""
    if model is None:
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if any(isinstance(m, FSDP) for m in model.modules()):
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of a sharded model, offloaded to CPU, on global rank 0 (empty elsewhere).

    A collective: every rank must call it. Keys are those of the unwrapped module (no FSDP or
    activation-checkpointing prefixes).
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    on_cpu = next(model.parameters()).device.type == "cpu"
    # On GPUs: gather layer by layer into rank 0's CPU memory. On CPU (the gloo tests) FSDP1's offload
    # path clones freed memory and segfaults (torch 2.13), so every rank gathers and all but rank 0 drop it.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not on_cpu))
    if on_cpu and dist.is_initialized() and dist.get_rank() != 0:
        return {}
    return state
