"""Matryoshka re-ranker (SPEC 7): layer-wise exits and passage compression in one decoder pass.

`exit_scores` runs the decoder layer by layer, stops at the deepest requested exit, reads the
last real token's hidden state after each requested exit layer, and scores it with that layer's
head. Before each compress layer the passage tokens are pooled by `token_compress`, weighted by
the attention the last real token paid to them in the previous layer. That one attention row is
computed beside the normal (sdpa / eager / flash) attention of that one layer: no layer ever
materialises its full attention matrix for this.

Works for the decoders whose model loop is embed -> rotary -> per-layer masks -> layers -> norm
(Llama, Mistral, Qwen2/3, Gemma 1/2, ...); `check_supported` names what is missing otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .compression import token_compress
from .scoring import causal_lm

COMPRESS_METHODS = ("attention", "mean")
HEADS_FILE = "matryoshka_heads.safetensors"  # beside a stage-1 export


def exit_layers(num_layers: int, start_layer: int, layer_sep: int = 1) -> list[int]:
    """The exits with a head: start_layer, start_layer + layer_sep, ..., and always the top layer."""
    if not 1 <= start_layer <= num_layers or layer_sep < 1:
        raise ValueError(f"exits need 1 <= start_layer <= {num_layers} layers and layer_sep >= 1, "
                         f"got start_layer={start_layer}, layer_sep={layer_sep}")
    return sorted(set(range(start_layer, num_layers + 1, layer_sep)) | {num_layers})


class LayerwiseHeads(nn.Module):
    """One `Linear(hidden, 1, bias=False)` per exit layer, indexed by the layer number itself.

    Each starts as the LM head's "Yes" row, so exit l scores like the "Yes" logit read after l layers.
    """

    def __init__(self, hidden_size: int, layers: Iterable[int]):
        super().__init__()
        self.layers = sorted(set(int(l) for l in layers))
        self.heads = nn.ModuleDict({str(l): nn.Linear(hidden_size, 1, bias=False) for l in self.layers})

    @classmethod
    def from_yes_row(cls, lm: nn.Module, yes_token_id: int, layers: Iterable[int]) -> "LayerwiseHeads":
        weight = causal_lm(lm).get_output_embeddings().weight
        heads = cls(weight.shape[1], layers).to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for head in heads.heads.values():
                head.weight.copy_(weight[yes_token_id][None])
        return heads

    def check(self, layers: Iterable[int]) -> list[int]:
        layers = sorted(set(int(l) for l in layers))
        missing = [l for l in layers if l not in self.layers]
        if missing:
            raise ValueError(f"no head for exit layer(s) {missing}; this model has heads at layers {self.layers}")
        return layers

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.heads[str(layer)](hidden).squeeze(-1)


# ---- the attention row of the last real token, beside the layer's own attention -------------------

_LAST_ROW = "rerank_lightning_last_row"


@dataclass
class _LastRowCapture:
    inner: str                   # the model's own attention implementation
    last_index: torch.Tensor     # [B] position of each row's last real token
    key_mask: torch.Tensor       # [B, L] 1 = real token
    weights: torch.Tensor | None = None


def _eager_for(module: nn.Module):
    import sys

    return getattr(sys.modules[type(module).__module__], "eager_attention_forward")


def _attention_with_last_row(module, query, key, value, attention_mask, last_row_capture: _LastRowCapture,
                             **kwargs):
    """The layer's normal attention output, plus the last real token's attention row, summed over heads."""
    inner = ALL_ATTENTION_FUNCTIONS.get_interface(last_row_capture.inner, _eager_for(module))
    output = inner(module, query, key, value, attention_mask, **kwargs)
    query, key = query.detach(), key.detach()  # no autograd record: checkpoint recomputation runs without it
    cap = last_row_capture
    batch, heads, length, _ = query.shape
    rows = torch.arange(batch, device=query.device)
    q = query[rows, :, cap.last_index].float()                                  # [B, H, D]
    k = key.float().repeat_interleave(heads // key.shape[1], dim=1)              # [B, H, L, D] (GQA)
    logits = torch.einsum("bhd,bhld->bhl", q, k) * module.scaling
    softcap = getattr(module.config, "attn_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    pos = torch.arange(length, device=query.device)
    allowed = cap.key_mask.bool() & (pos[None] <= cap.last_index[:, None])
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if window:
        allowed &= pos[None] > cap.last_index[:, None] - window
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    cap.weights = torch.softmax(logits, dim=-1).sum(1).detach()                 # [B, L]
    return output


AttentionInterface.register(_LAST_ROW, _attention_with_last_row)


# ---- the layer loop --------------------------------------------------------------------------------

def check_supported(decoder: nn.Module) -> None:
    missing = [a for a in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(decoder, a)]
    if missing:
        raise NotImplementedError(f"{type(decoder).__name__} lacks {missing}: Matryoshka exits support decoders "
                                  f"built as embed_tokens -> rotary_emb -> layers -> norm (Llama, Mistral, Qwen2, Gemma)")


class _LayerInputs:
    """Masks (per attention type), position ids and rotary embeddings for the current sequence length."""

    def __init__(self, decoder: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor):
        config = decoder.config
        # No cache: passed by position, since transformers renames that argument (past_key_values -> cache,
        # the old name removed in 5.40) and older 5.x releases take cache_position there, unused.
        args = (config, hidden, mask, None)
        self.types = getattr(config, "layer_types", None)
        self.sliding = not self.types and bool(getattr(config, "sliding_window", None))
        self.masks = {"full_attention": create_causal_mask(*args, position_ids=position_ids)}
        if self.sliding or (self.types and "sliding_attention" in self.types):
            self.masks["sliding_attention"] = create_sliding_window_causal_mask(*args, position_ids=position_ids)
        self.position_ids = position_ids
        self.position_embeddings = decoder.rotary_emb(hidden, position_ids)

    def mask(self, layer: int):
        if self.types:
            return self.masks[self.types[layer]]
        return self.masks["sliding_attention" if self.sliding else "full_attention"]


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    return mask.shape[-1] - 1 - mask.flip(-1).int().argmax(-1)


def exit_hidden_states(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       exits: Sequence[int], compress_layers: Sequence[int] = (), compress_ratio: int = 1,
                       query_lengths: torch.Tensor | None = None, prompt_lengths: torch.Tensor | None = None,
                       compress_method: str = "attention") -> dict[int, torch.Tensor]:
    """{exit layer l: final-norm(hidden state after l layers) at each row's last real token}, [N, D] each.

    Compression is applied before every layer c in `compress_layers` with 0 < c < deepest exit
    (SPEC 7), when `compress_ratio` > 1; it needs right padding and the query / prompt lengths.
    """
    lm = causal_lm(lm)
    decoder = lm.get_decoder()
    check_supported(decoder)
    exits = sorted(set(int(l) for l in exits))
    n_layers = len(decoder.layers)
    if not exits or exits[0] < 1 or exits[-1] > n_layers:
        raise ValueError(f"exit layers must be in 1..{n_layers}, got {exits}")
    deepest = exits[-1]
    if compress_method not in COMPRESS_METHODS:
        raise ValueError(f"compress_method must be one of {COMPRESS_METHODS}, got {compress_method!r}")
    compress_at = sorted({int(c) for c in compress_layers if 0 < int(c) < deepest}) if compress_ratio > 1 else []
    if compress_at and (query_lengths is None or prompt_lengths is None):
        raise ValueError("token compression needs query_lengths and prompt_lengths (the Matryoshka data recipe)")

    mask = attention_mask
    hidden = decoder.embed_tokens(input_ids)
    inputs = _LayerInputs(decoder, hidden, mask, (mask.long().cumsum(-1) - 1).clamp(min=0))
    weights, out = None, {}
    for i in range(deepest):                     # `hidden` holds the state after i layers
        if i in exits:
            out[i] = _read_last(decoder, hidden, mask)
        if i in compress_at:
            hidden, mask = token_compress(hidden, mask, query_lengths, prompt_lengths, compress_ratio,
                                          weights if compress_method == "attention" else None)
            position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None].expand(hidden.shape[0], -1)
            inputs = _LayerInputs(decoder, hidden, mask, position_ids)
        capture = None
        if compress_method == "attention" and (i + 1) in compress_at:
            capture = _LastRowCapture(decoder.config._attn_implementation, last_real_index(mask), mask)
        hidden = _run_layer(decoder, i, hidden, inputs, capture)
        if capture is not None:
            weights = capture.weights
    out[deepest] = _read_last(decoder, hidden, mask)
    return out


def _read_last(decoder: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return decoder.norm(hidden[rows, last_real_index(mask)])


def _run_layer(decoder: nn.Module, i: int, hidden: torch.Tensor, inputs: _LayerInputs,
               capture: _LastRowCapture | None) -> torch.Tensor:
    # no cache argument (its default is none; its name changes across transformers releases)
    kwargs = dict(attention_mask=inputs.mask(i), position_ids=inputs.position_ids,
                  position_embeddings=inputs.position_embeddings, use_cache=False)
    if capture is None:
        out = decoder.layers[i](hidden, **kwargs)
    else:  # this one call goes through the attention that also returns the last token's row
        config = decoder.config
        config._attn_implementation = _LAST_ROW
        try:
            out = decoder.layers[i](hidden, last_row_capture=capture, **kwargs)
        finally:
            config._attn_implementation = capture.inner
    return out[0] if isinstance(out, tuple) else out


def exit_scores(lm: nn.Module, heads: LayerwiseHeads, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                exits: Sequence[int], compress_layers: Sequence[int] = (), compress_ratio: int = 1,
                query_lengths: torch.Tensor | None = None, prompt_lengths: torch.Tensor | None = None,
                compress_method: str = "attention") -> dict[int, torch.Tensor]:
    """{exit layer: [N] fp32 scores}, every requested exit from one pass that stops at the deepest."""
    exits = heads.check(exits)
    states = exit_hidden_states(lm, input_ids, attention_mask, exits, compress_layers, compress_ratio,
                                query_lengths, prompt_lengths, compress_method)
    return {l: heads(l, states[l]).float() for l in exits}


def load_heads(directory: str | Path, device: torch.device | None = None) -> LayerwiseHeads:
    """The heads written next to an exported stage-1 model."""
    from safetensors.torch import load_file

    path = Path(directory) / HEADS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} is not an exported Matryoshka stage-1 model")
    state = load_file(str(path), device=str(device or "cpu"))
    layers = [int(k.split(".")[1]) for k in state]
    heads = LayerwiseHeads(next(iter(state.values())).shape[1], layers)
    heads.load_state_dict(state)
    return heads.to(next(iter(state.values())).dtype)


def compensation_name(factor: str, ratio: int) -> str:
    """The adapter folder under `<stage-1 export>/compensation/`: `depth` or `width_r<ratio>`."""
    return "depth" if factor == "depth" else f"width_r{int(ratio)}"
