"""sdpa that skips the empty tiles of a block-sparse mask: packed rows' attention costs what their pairs do.

A packed row (`data.packing`) holds several pairs, each seeing only its group's prefix and itself, under
one boolean [W, W] mask (`scoring.packed_attention_mask`). torch's sdpa computes every query-key product
of the row, so its cost grows with the square of the row's width, and most of that square is masked out.
`tiled_sdpa` cuts the row into tiles of `TILE` tokens and lets each query tile attend only to the key tiles
its mask does not empty out, gathered side by side: one sdpa call on [R * W / TILE, heads, TILE, K * TILE],
K the most key tiles any query tile needs. The products it skips are masked out anyway, so the output is
sdpa's up to the order of float additions; longer rows (fewer copies of a query's prefix, less padding)
then cost little more attention than short ones. Which tiles to gather is worked out once per mask
(`plan_for`), not in each layer.

Every other call (no mask, a float mask, a mask that is not sparse enough to gain, attention dropout or
features sdpa refuses) goes to transformers' own sdpa function unchanged. `load_causal_lm` installs it as
the attention of models asked for sdpa (`SDPA_TILED`, with sdpa's mask builder); saved configs do not
keep the name, so exports load with their clients' own attention.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SDPA_TILED = "rerank_lightning_sdpa_tiled"
TILE = 32
GAIN = 0.5  # the tiled path runs where it computes at most this share of the dense products


@dataclass(frozen=True)
class TilePlan:
    """How `tiled_sdpa` attends under one boolean [R, 1, W, W] mask, over n = ceil(W / TILE) query tiles a row."""

    pad: int  # the tokens that make a row whole tiles (they see themselves only)
    order: torch.Tensor  # [R, n, K]: each query tile's key tiles, its non-empty ones first (K: the most any needs)
    picked: torch.Tensor  # [R * n * K]: the same, as indices into all rows' tiles
    tile_mask: torch.Tensor  # [R * n, 1, TILE, K * TILE]: the mask over each query tile's gathered key tiles


def tile_plan(mask: torch.Tensor) -> TilePlan | None:
    """The plan of a boolean [R, 1, W, W] mask; None where it leaves a query without keys (sdpa's NaN rows,
    which tiles would not reproduce) or where tiles save too little (K > GAIN * n)."""
    if not bool(mask.any(-1).all()):
        return None
    rows, _, width, _ = mask.shape
    pad = -width % TILE
    mask = mask[:, 0]
    if pad:
        mask = F.pad(mask, (0, pad, 0, pad))
        mask[:, width:, width:] = torch.eye(pad, dtype=torch.bool, device=mask.device)
    n = (width + pad) // TILE
    tiled = mask.view(rows, n, TILE, n, TILE).transpose(2, 3)  # [R, query tile, key tile, TILE, TILE]
    nonempty = tiled.any(-1).any(-1)
    k = int(nonempty.sum(-1).max())
    if k > GAIN * n:
        return None
    order = torch.sort(nonempty.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :k]
    tile_mask = torch.gather(tiled, 2, order[..., None, None].expand(-1, -1, -1, TILE, TILE))
    tile_mask = tile_mask & torch.gather(nonempty, 2, order)[..., None, None]
    picked = (order + n * torch.arange(rows, device=order.device)[:, None, None]).flatten()
    return TilePlan(pad, order, picked, tile_mask.transpose(2, 3).reshape(rows * n, 1, TILE, k * TILE))


_recent: list[tuple[weakref.ref, TilePlan | None]] = []  # the plans of the masks still alive


def plan_for(mask: torch.Tensor) -> TilePlan | None:
    """`tile_plan(mask)`, made once for every layer of a forward (and gradient checkpointing's recomputation)
    that attends under this mask (so its host syncs happen once per mask, not per layer): transformers hands
    each layer the mask tensor its forward built, which nothing changes in place; a plan is dropped with
    its mask."""
    _recent[:] = [(ref, plan) for ref, plan in _recent if ref() is not None]
    for ref, plan in _recent:
        if ref() is mask:
            return plan
    plan = tile_plan(mask)
    _recent.append((weakref.ref(mask), plan))
    return plan


def tiled_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [R, H, W, D], key and value [R, Hkv, W, D], a
    boolean mask [R, 1, W, W] (True: may attend); returns ([R, W, H, D], None) like sdpa's."""
    plan = plan_for(attention_mask) if _tileable(query, attention_mask, dropout, kwargs) else None
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    rows, heads, width, dim = query.shape
    n, k = plan.order.shape[1:]
    gqa = key.shape[1] != heads and _masked_gqa(query.device)
    if key.shape[1] != heads and not gqa:
        key, value = repeat_kv(key, heads // key.shape[1]), repeat_kv(value, heads // value.shape[1])
    if plan.pad:
        query, key, value = (F.pad(x, (0, 0, 0, plan.pad)) for x in (query, key, value))

    def tiles(x: torch.Tensor) -> torch.Tensor:  # [R, h, W, D] -> [R * n, h, TILE, D]: a row per query tile
        return x.view(rows, x.shape[1], n, TILE, dim).transpose(1, 2).reshape(rows * n, x.shape[1], TILE, dim)

    def gathered(x: torch.Tensor) -> torch.Tensor:  # [R * n, h, K * TILE, D]: each query tile's key tiles
        x = tiles(x).index_select(0, plan.picked).view(rows * n, k, x.shape[1], TILE, dim)
        return x.transpose(1, 2).reshape(rows * n, x.shape[2], k * TILE, dim)

    out = F.scaled_dot_product_attention(tiles(query), gathered(key), gathered(value), attn_mask=plan.tile_mask,
                                         scale=scaling, enable_gqa=gqa)
    return out.view(rows, n, heads, TILE, dim).transpose(2, 3).reshape(rows, n * TILE, heads, dim)[:, :width], None


def _masked_gqa(device: torch.device) -> bool:
    """Whether sdpa takes fewer key/value heads than query heads beside a mask without slowing down: on CPU;
    CUDA's fast kernels take them without a mask only, so there the heads are repeated first."""
    return device.type == "cpu"


def _tileable(query: torch.Tensor, mask: torch.Tensor | None, dropout: float, kwargs: dict) -> bool:
    """A call the tiled path may compute as sdpa would: one boolean mask for all heads and queries, no dropout,
    none of the extras (soft-capping, position biases, sinks) sdpa handles or refuses; rows of at least two
    tiles. (`tile_plan` checks that every query sees some key.)"""
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or dropout:
        return False
    if query.shape[2] < 2 * TILE or mask.shape[0] != query.shape[0] \
            or not mask.shape[2] == mask.shape[3] == query.shape[2]:
        return False
    return not any(kwargs.get(extra) is not None for extra in ("softcap", "position_bias", "s_aux", "sinks"))


AttentionInterface.register(SDPA_TILED, tiled_sdpa)
AttentionMaskInterface.register(SDPA_TILED, sdpa_mask)
