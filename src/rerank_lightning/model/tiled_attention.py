"""sdpa that skips the empty tiles of a block-sparse mask: packed rows' attention costs what their pairs do.

A packed row (`data.packing`) holds several pairs, each seeing only its group's prefix and itself, under
one boolean [W, W] mask (`scoring.packed_attention_mask`). torch's sdpa computes every query-key product
of the row, so its cost grows with the square of the row's width, and most of that square is masked out.
`tiled_sdpa` cuts the row into tiles of `TILE` tokens and lets each query tile attend only to the key tiles
its mask does not empty out, gathered side by side: one sdpa call on [R * W / TILE, heads, TILE, K * TILE],
K the most key tiles any query tile needs. The products it skips are masked out anyway, so the output is
sdpa's up to the order of float additions; longer rows (fewer copies of a query's prefix, less padding)
then cost little more attention than short ones.

Every other call (no mask, a float mask, a mask that is not sparse enough to gain, attention dropout or
features sdpa refuses) goes to transformers' own sdpa function unchanged. `load_causal_lm` installs it as
the attention of models asked for sdpa (`SDPA_TILED`, with sdpa's mask builder); saved configs do not
keep the name, so exports load with their clients' own attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SDPA_TILED = "rerank_lightning_sdpa_tiled"
TILE = 32
GAIN = 0.5  # the tiled path runs where it computes at most this share of the dense products


def tile_plan(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For a boolean [R, W, W] mask (W a multiple of `TILE`): the key tiles each query tile attends to,
    [R, W / TILE, K] (its non-empty ones first, in order; K the most any query tile needs), and which of
    them are non-empty (the rest fill the width K). None where that saves too little (K > GAIN * W / TILE)."""
    rows, width, _ = mask.shape
    n = width // TILE
    nonempty = mask.view(rows, n, TILE, n, TILE).any(4).any(2)  # [R, query tile, key tile]
    k = int(nonempty.sum(-1).max())
    if k > GAIN * n:
        return None
    order = torch.sort(nonempty.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :k]
    return order, torch.gather(nonempty, 2, order)


def tiled_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [R, H, W, D], key and value [R, Hkv, W, D], a
    boolean mask [R, 1, W, W] (True: may attend); returns ([R, W, H, D], None) like sdpa's."""
    plan = None
    if _tileable(query, attention_mask, dropout, kwargs):
        rows, heads, width, dim = query.shape
        pad = -width % TILE
        mask = attention_mask[:, 0]
        if pad:  # padding tokens see themselves only: no query row is left without a key
            mask = F.pad(mask, (0, pad, 0, pad))
            mask[:, width:, width:] = torch.eye(pad, dtype=torch.bool, device=mask.device)
        plan = tile_plan(mask)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    order, nonempty = plan
    n, k = order.shape[1:]
    gqa = key.shape[1] != heads and _masked_gqa(query.device)
    if key.shape[1] != heads and not gqa:
        key, value = repeat_kv(key, heads // key.shape[1]), repeat_kv(value, heads // value.shape[1])
    if pad:
        query, key, value = (F.pad(x, (0, 0, 0, pad)) for x in (query, key, value))
    picked = (order + n * torch.arange(rows, device=order.device)[:, None, None]).flatten()

    def tiles(x: torch.Tensor) -> torch.Tensor:  # [R, h, W, D] -> [R * n, h, TILE, D]: a row per query tile
        return x.view(rows, x.shape[1], n, TILE, dim).transpose(1, 2).reshape(rows * n, x.shape[1], TILE, dim)

    def gathered(x: torch.Tensor) -> torch.Tensor:  # [R * n, h, K * TILE, D]: each query tile's key tiles
        x = tiles(x).index_select(0, picked).view(rows * n, k, x.shape[1], TILE, dim)
        return x.transpose(1, 2).reshape(rows * n, x.shape[2], k * TILE, dim)

    tile_mask = mask.view(rows, n, TILE, n, TILE).transpose(2, 3)  # [R, query tile, key tile, TILE, TILE]
    tile_mask = torch.gather(tile_mask, 2, order[..., None, None].expand(-1, -1, -1, TILE, TILE))
    tile_mask = (tile_mask & nonempty[..., None, None]).transpose(2, 3).reshape(rows * n, 1, TILE, k * TILE)
    out = F.scaled_dot_product_attention(tiles(query), gathered(key), gathered(value), attn_mask=tile_mask,
                                         scale=scaling, enable_gqa=gqa)
    return out.view(rows, n, heads, TILE, dim).transpose(2, 3).reshape(rows, n * TILE, heads, dim)[:, :width], None


def _masked_gqa(device: torch.device) -> bool:
    """Whether sdpa takes fewer key/value heads than query heads beside a mask without slowing down: on CPU;
    CUDA's fast kernels take them without a mask only, so there the heads are repeated first."""
    return device.type == "cpu"


def _tileable(query: torch.Tensor, mask: torch.Tensor | None, dropout: float, kwargs: dict) -> bool:
    """A call the tiled path computes as sdpa would: one boolean mask for all heads and queries, every query
    seeing some key, no dropout, none of the extras (soft-capping, position biases, sinks) sdpa handles or
    refuses; and rows of at least two tiles."""
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or dropout:
        return False
    if query.shape[2] < 2 * TILE or mask.shape[0] != query.shape[0] \
            or not mask.shape[2] == mask.shape[3] == query.shape[2]:
        return False
    if any(kwargs.get(extra) is not None for extra in ("softcap", "position_bias", "s_aux", "sinks")):
        return False
    return bool(mask.any(-1).all())


AttentionInterface.register(SDPA_TILED, tiled_sdpa)
AttentionMaskInterface.register(SDPA_TILED, sdpa_mask)
