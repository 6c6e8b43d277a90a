"""Fully sharded training (`trainer=fsdp`) and full-model gathering for export.

`RerankFSDPStrategy` is Lightning's `ModelParallelStrategy` with FSDP2 (torch's `fully_shard`: every
parameter a DTensor sharded over the ranks, so a LoRA step keeps gradients of the adapter only).
Lightning leaves the sharding itself to the user; this strategy does it before Lightning sets the
module up, the same way for every backbone and for both modules (`RerankerModule`, `MatryoshkaModule`):

- one `fully_shard` unit per decoder layer, the model's own class (`decoder_layer_classes`: the
  classes named by `_no_split_modules` of its transformers model), then the LightningModule as the
  root unit (embeddings, final norm, LM head, Matryoshka heads; its `forward` gathers them);
- activation checkpointing of those layers by transformers' own switch (model.backbone)
  (torch's non-reentrant `torch.utils.checkpoint`), so the Matryoshka exit pass, which calls the
  layers itself, is checkpointed too;
- every rank is a data-parallel replica for the samplers (Lightning's default mesh, nodes x devices,
  is laid out for tensor parallelism); `hybrid_shard` shards within a node and replicates across nodes;
- sharded checkpoints load back: LoRA's (the adapter only) into the frozen base already built, and
  optimizer state that a never-updated trainable weight lacks is not asked for.

Gradient clipping is Lightning's own (`trainer.gradient_clip_val`): torch's `clip_grad_norm_` takes
the norm over all shards of DTensor gradients. Runs on CPU with gloo too (the tests).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from .model.backbone import enable_activation_checkpointing

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_METADATA", "RerankFSDPStrategy", "decoder_layer_classes", "full_state_dict", "is_sharded",
           "shard_model", "sharded_weight_names", "unify_dtypes"]

# A sharded checkpoint is a directory: the tensors in torch.distributed.checkpoint files under these two
# top-level keys (Lightning's layout), everything else (hyperparameters, loops, callbacks) in one file.
CHECKPOINT_METADATA = "meta.pt"
WEIGHTS_KEY = "state_dict"


# ---------------------------------------------------------------- the model's own layer classes


def decoder_layer_classes(model: nn.Module, names: Iterable[str] | None = None) -> tuple[type[nn.Module], ...]:
    """Classes of `model`'s repeated decoder blocks: those its transformers models list in
    `_no_split_modules` (or the class names given in `names`), as found among `model.modules()`.

    Works through a peft wrapper or a LightningModule holding the LM. Raises if none is found, since
    sharding without per-layer units would gather the whole model at once.
    """
    wanted = set(names or ())
    if not wanted:
        for module in model.modules():
            no_split = getattr(module, "_no_split_modules", None)
            if no_split and hasattr(module, "config"):  # a transformers PreTrainedModel
                wanted.update(no_split)
    found = {type(m).__name__: type(m) for m in model.modules() if type(m).__name__ in wanted}
    if not found:
        raise ValueError(
            f"no decoder-layer class found in {type(model).__name__}: looked for {sorted(wanted) or 'the classes in '}"
            f"{'' if wanted else '_no_split_modules of its transformers models'}; name them with "
            f"trainer.strategy.layer_classes=[...]"
        )
    return tuple(found[name] for name in sorted(found))


def unify_dtypes(model: nn.Module) -> torch.dtype | None:
    """Cast trainable floating parameters to the dtype of the frozen ones when the two differ.

    peft keeps LoRA weights in fp32 on a bf16 base; an FSDP unit gathers its parameters in one
    dtype. Returns the dtype cast to, or None when nothing changed.
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


def enable_gradient_checkpointing(model: nn.Module) -> bool:
    """Switch on transformers' gradient checkpointing of the decoder layers of the (outermost) transformers
    model inside `model`; False if there is none that supports it."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            enable_activation_checkpointing(module)
            return True
    return False


def shard_model(model: nn.Module, mesh: Any, layer_classes: Iterable[str] | None = None,
                checkpointing: bool = True, cast_trainable_to_base_dtype: bool = True,
                reshard_after_forward: bool = True) -> bool:
    """FSDP2 over `mesh`: one unit per decoder layer, then `model` itself as the root unit; with
    `checkpointing`, the decoder layers recompute their activations in backward. In place; False if
    `model` was sharded already (validate, then fit, then validate: the same shards)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return False
    classes = decoder_layer_classes(model, layer_classes)
    if cast_trainable_to_base_dtype:
        unify_dtypes(model)
    if checkpointing and not enable_gradient_checkpointing(model):
        log.warning("FSDP: no transformers model with gradient checkpointing in %s; not checkpointing",
                    type(model).__name__)
    layers = [m for m in model.modules() if isinstance(m, classes)]
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    log.info("FSDP: %d %s units and the root over %s", len(layers), [c.__name__ for c in classes], mesh)
    return True


# ---------------------------------------------------------------- the strategy


class RerankFSDPStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy sharding a Hugging Face causal LM with FSDP2 (module docstring).

    hybrid_shard: shard within a node, replicate across nodes (HSDP) instead of sharding over all ranks.
    activation_checkpointing: recompute each decoder layer in backward.
    layer_classes: class names to use instead of the model's `_no_split_modules`.
    cast_trainable_to_base_dtype: see `unify_dtypes` (LoRA on a bf16 base).
    reshard_after_forward: free the gathered layer after its forward (ZeRO-3); false keeps it until
        backward (ZeRO-2: more memory, one all-gather less per layer).
    save_distributed_checkpoint: true: each rank writes its shards into a checkpoint directory; false:
        rank 0 writes one file (needs the whole model in rank 0's CPU memory).
    """

    def __init__(self, hybrid_shard: bool = False, activation_checkpointing: bool = True,
                 layer_classes: list[str] | None = None, cast_trainable_to_base_dtype: bool = True,
                 reshard_after_forward: bool = True, save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = None, timeout_minutes: float | None = None) -> None:
        kwargs = {"timeout": timedelta(minutes=timeout_minutes)} if timeout_minutes is not None else {}
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)
        self.hybrid_shard = hybrid_shard
        self.activation_checkpointing = activation_checkpointing
        self.layer_classes = list(layer_classes) if layer_classes else None
        self.cast_trainable_to_base_dtype = cast_trainable_to_base_dtype
        self.reshard_after_forward = reshard_after_forward

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def shard_mesh(self) -> Any:
        """All ranks in one dimension, or with `hybrid_shard` Lightning's (nodes, devices) mesh, which
        fully_shard reads as (replicate, shard)."""
        if self.hybrid_shard:
            return self.device_mesh
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.root_device.type, (self.world_size,))

    def setup(self, trainer: Any) -> None:
        module = self.lightning_module
        if not is_sharded(module):
            module = self.precision_plugin.convert_module(module)  # bf16-true: cast before sharding
            shard_model(module, self.shard_mesh(), self.layer_classes, self.activation_checkpointing,
                        self.cast_trainable_to_base_dtype, self.reshard_after_forward)
        super().setup(trainer)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not checkpoint.get("state_dict"):  # e.g. a LoRA filter that matched no parameter name
            raise RuntimeError(f"refusing to write {filepath}: the checkpoint holds no model weights")
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """A sharded checkpoint loads the weights it holds (with `strict_loading = False`, LoRA's trainable
        weights only; otherwise all of them) and the optimizer state it holds: a trainable weight that never
        had a gradient (the LM head of a Matryoshka run, scored by its exit heads) has none, and keeps the
        empty state torch gives it. A one-file checkpoint goes to Lightning."""
        path = Path(self.broadcast(checkpoint_path))
        if not (path / CHECKPOINT_METADATA).is_file():
            kwargs = {} if weights_only is None else {"weights_only": weights_only}  # Lightning < 2.6 takes none
            return super().load_checkpoint(checkpoint_path, **kwargs)

        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import DefaultLoadPlanner
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        saved = sharded_weight_names(path)
        weights = get_model_state_dict(self.model)
        if missing := saved - set(weights):
            raise KeyError(f"{path}: the checkpoint holds weights this model does not have: {sorted(missing)[:5]}")
        if self.lightning_module.strict_loading and (absent := set(weights) - saved):
            raise KeyError(f"{path}: the checkpoint lacks weights of this model: {sorted(absent)[:5]}")
        weights = {k: v for k, v in weights.items() if k in saved}
        dcp.load({WEIGHTS_KEY: weights}, checkpoint_id=path)
        set_model_state_dict(self.model, weights, options=StateDictOptions(strict=False))
        for idx, optimizer in enumerate(self.optimizers):
            state = {f"optimizer_{idx}": get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
            set_optimizer_state_dict(self.model, optimizer, state[f"optimizer_{idx}"])
        return torch.load(path / CHECKPOINT_METADATA, weights_only=weights_only)


# ---------------------------------------------------------------- checkpoints and export


def sharded_weight_names(path: str | Path) -> set[str]:
    """Names of the module weights in a sharded checkpoint directory (as in the module's state dict)."""
    import torch.distributed.checkpoint as dcp

    prefix = WEIGHTS_KEY + "."
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k[len(prefix):] for k in keys if k.startswith(prefix)}


def is_sharded(model: nn.Module | None) -> bool:
    """Whether `model` holds parameter shards (FSDP2 DTensors)."""
    from torch.distributed.tensor import DTensor

    return model is not None and any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of a sharded model, in CPU memory on global rank 0 (empty elsewhere).

    A collective: every rank must call it. Keys are those of the module's own state dict.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
