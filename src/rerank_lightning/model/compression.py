"""Token compression for the Matryoshka re-ranker (SPEC 7).

SPEC 7: "Before decoder layer `c` (for `c` in the chosen compress layers, `c > 0`) the passage
tokens (positions `query_length .. len - prompt_length`) are pooled in consecutive chunks of
`ratio` tokens, starting at the passage start (the last chunk may be short); query and prompt
tokens are kept as they are; the result is re-packed as `query, pooled passage, prompt`,
right-padded, with a new attention mask [...]. Pooling is a weighted mean with weights
`w_k / sum(w_chunk)` [...] or uniform (`compress_method: mean`). A chunk whose weights sum to
zero must not produce NaN. Compression stacks: a second compress layer pools the already
pooled tokens."

Every input token is sent to one output slot (its own for query / prompt tokens, its chunk's
for passage tokens, a discarded sink slot for padding) and the slots are filled with one
`scatter_add`: no Python loop over rows or chunks.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

Lengths = Union[torch.Tensor, Sequence[int]]


def _lengths(values: Lengths, name: str, batch: int, device: torch.device) -> torch.Tensor:
    out = torch.as_tensor(values, device=device).long().reshape(-1)
    if out.numel() != batch:
        raise ValueError(f"{name} has {out.numel()} entries for a batch of {batch}")
    if (out < 0).any():
        raise ValueError(f"{name} must be >= 0, got {out.tolist()}")
    return out


def token_compress(
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    query_lengths: Lengths,
    prompt_lengths: Lengths,
    ratio: int,
    weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool each row's passage tokens in chunks of `ratio`; returns (hidden [B, L', D], mask [B, L']).

    `attention_mask` must be right-padded. `weights` is None (plain mean), per-token importance
    [B, L], or per-head attention rows [B, H, L] (summed over heads). A chunk whose weights sum
    to zero falls back to the plain mean of its tokens. With `ratio == 1` the inputs come back.
    """
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be [B, L, D], got shape {tuple(hidden_states.shape)}")
    batch, length, _ = hidden_states.shape
    if attention_mask.shape != (batch, length):
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match hidden_states [B, L] = {(batch, length)}"
        )
    if isinstance(ratio, bool) or int(ratio) != ratio or ratio < 1:
        raise ValueError(f"compression ratio must be an integer >= 1, got {ratio!r}")
    ratio = int(ratio)
    if weights is not None:
        if weights.dim() == 3 and weights.shape[0] == batch and weights.shape[2] == length:
            weights = weights.sum(dim=1)
        elif weights.shape != (batch, length):
            raise ValueError(
                f"weights must be [B, L] or [B, H, L] with B, L = {(batch, length)}, got {tuple(weights.shape)}"
            )
    device = hidden_states.device
    real = attention_mask != 0
    if (real[:, 1:] & ~real[:, :-1]).any():
        raise ValueError("token compression needs padding_side='right': a pad comes before a real token")
    n = real.sum(dim=1)
    q = _lengths(query_lengths, "query_lengths", batch, device)
    p = _lengths(prompt_lengths, "prompt_lengths", batch, device)
    bad = (q + p > n).nonzero().flatten().tolist()
    if bad:
        b = bad[0]
        raise ValueError(
            f"row {b}: query_length {q[b].item()} + prompt_length {p[b].item()} exceeds its {n[b].item()} real tokens"
        )
    if ratio == 1:
        return hidden_states, attention_mask

    passage = n - q - p
    kept = (passage + ratio - 1) // ratio
    new_lengths = q + kept + p
    new_length = int(new_lengths.max().item())

    # Destination slot of every input position; padding goes to the sink slot `new_length`.
    pos = torch.arange(length, device=device).unsqueeze(0)
    q_, passage_, kept_ = q[:, None], passage[:, None], kept[:, None]
    in_passage = (pos >= q_) & (pos < q_ + passage_)
    dest = torch.where(pos < q_, pos, torch.where(in_passage, q_ + (pos - q_) // ratio, pos - passage_ + kept_))
    dest = torch.where(real, dest, torch.full_like(dest, new_length))

    # Per-token coefficients in fp32: w / sum(w over the slot); query and prompt tokens get 1.
    w = torch.ones(batch, length, device=device) if weights is None else weights.float()
    w = torch.where(in_passage, w, torch.ones_like(w))
    slot_sum = w.new_zeros(batch, new_length + 1).scatter_add(1, dest, w)
    zero_chunk = (slot_sum == 0).gather(1, dest)
    w = torch.where(zero_chunk, torch.ones_like(w), w)  # zero-weight chunk: plain mean
    slot_sum = w.new_zeros(batch, new_length + 1).scatter_add(1, dest, w)
    coef = w / slot_sum.gather(1, dest)

    compute_dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    src = coef.to(compute_dtype).unsqueeze(-1) * hidden_states.to(compute_dtype)
    index = dest.unsqueeze(-1).expand_as(src)
    pooled = src.new_zeros(batch, new_length + 1, src.shape[-1]).scatter_add(1, index, src)
    new_hidden = pooled[:, :new_length].to(hidden_states.dtype)
    new_mask = (torch.arange(new_length, device=device)[None] < new_lengths[:, None]).to(attention_mask.dtype)
    return new_hidden, new_mask
