"""The pair score (SPEC 3): next-token logits at one position per row, never [N, L, V]."""

from __future__ import annotations

import torch

from .tiled_attention import SDPA_TILED

IGNORE_INDEX = -100
MASKED_ATTENTION = ("sdpa", "eager")  # the attn_implementations that take `packed_attention_mask`'s masks


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def score_positions(attention_mask: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Row-wise index of the token that predicts the answer.

    With labels: the token before the single labelled one. Without: the last real token.
    Either works for left and right padding.
    """
    if labels is not None:
        return (labels != IGNORE_INDEX).int().argmax(-1) - 1
    length = attention_mask.shape[-1]
    return length - 1 - attention_mask.flip(-1).int().argmax(-1)


def answer_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
    """[N, V] next-token logits at `positions`, from the decoder's last hidden state.

    Position ids count real tokens only, so a pair scores the same whatever the padding side and
    amount. The LM head runs on N hidden states, not N*L.
    """
    lm = causal_lm(model)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    tokens, head_weight = _decoder_input(lm, input_ids)
    hidden = lm.get_decoder()(
        **tokens, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return _head(lm, hidden[torch.arange(hidden.shape[0], device=hidden.device), positions], head_weight)


def packed_answer_logits(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                         scored_pair: torch.Tensor, pair_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[N, V] next-token logits at the score tokens of packed rows (`data.packing.pack_pairs`), in
    row-major order (`packed_order` puts them back in pair order).

    Without `pair_ids` (one pair per chunk) there is no attention mask: transformers reads the restarting
    `position_ids` as packed sequences and keeps attention within each pair. With them (groups sharing
    their prefix), `packed_attention_mask` does. Either way every score equals the padded path's.
    """
    lm = causal_lm(model)
    mask = None if pair_ids is None else packed_attention_mask(lm, position_ids, pair_ids)
    tokens, head_weight = _decoder_input(lm, input_ids)
    hidden = lm.get_decoder()(
        **tokens, attention_mask=mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return _head(lm, hidden[scored_pair >= 0], head_weight)


def packed_attention_mask(lm: torch.nn.Module, position_ids: torch.Tensor,
                          pair_ids: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
    """The attention masks of rows whose chunks share a prefix ([R, 1, W, W]: True / 0 where a token may look).

    A chunk starts where the position ids restart at 0; within it a token sees the earlier tokens of its
    own pair and of the shared prefix (`pair_ids` -1), and, in sliding-window layers, only those fewer
    than the window behind it in its own pair's positions. Models with `layer_types` get one mask per
    type, as their forward takes them; others one mask (windowed if the model has a window: Mistral).
    sdpa takes boolean masks, eager additive ones; flash and flex attention take neither.
    """
    config = lm.config
    impl = "sdpa" if config._attn_implementation == SDPA_TILED else config._attn_implementation
    if impl not in MASKED_ATTENTION:
        raise ValueError(f"packed rows with shared query prefixes need attn_implementation sdpa or eager, "
                         f"not {impl!r}; set data.share_query_prefix=false (pairs then pack one to a chunk)")
    column = torch.arange(position_ids.shape[1], device=position_ids.device)
    chunk = (position_ids == 0).cumsum(-1)
    allowed = ((column[:, None] >= column[None, :])
               & (chunk[:, :, None] == chunk[:, None, :])
               & ((pair_ids[:, :, None] == pair_ids[:, None, :]) | (pair_ids[:, None, :] < 0)))
    window = getattr(config, "sliding_window", None)
    windowed = allowed & (position_ids[:, :, None] - position_ids[:, None, :] < window) if window else allowed

    def as_mask(keep: torch.Tensor) -> torch.Tensor:
        if impl == "sdpa":
            return keep[:, None]
        dtype = lm.get_input_embeddings().weight.dtype
        additive = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
        return additive.masked_fill(~keep, torch.finfo(dtype).min)[:, None]

    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return as_mask(windowed)
    masks = {"full_attention": allowed, "sliding_attention": windowed}
    unknown = set(layer_types) - set(masks)
    if unknown:
        raise ValueError(f"packed rows with shared query prefixes support full and sliding-window attention layers, "
                         f"not {sorted(unknown)}; set data.share_query_prefix=false")
    return {kind: as_mask(masks[kind]) for kind in set(layer_types)}


def packed_order(scored_pair: torch.Tensor) -> torch.Tensor:
    """Indices that put row-major score-token values (logits, labels) back in pair order."""
    return scored_pair[scored_pair >= 0].argsort()


def answer_label_ids(pair: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N] each pair's answer token id (its single label), padded or packed rows."""
    labels = pair["labels"]
    if "scored_pair" in pair:  # packed: the answer follows the score token in the same row
        scored = pair["scored_pair"]
        return labels[:, 1:][scored[:, :-1] >= 0][packed_order(scored)]
    return labels.gather(1, (score_positions(pair["attention_mask"], labels) + 1)[:, None])[:, 0]


def _decoder_input(lm: torch.nn.Module, input_ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The decoder's input (`input_ids`, or `inputs_embeds` looked up here) and the weight `_head` is to use
    (None: the LM head's own).

    A tied matrix (input embedding and LM head; SmolLM2's is 49,152 x 576, 108 MiB in fp32) gets two
    gradients in a full fine-tune, which autograd sums before `.grad`. With the model's own lookup the
    embedding's gradient is dense and comes last, so at the end of backward two such matrices are held
    (the default run's peak). Here, when training in one process, the lookup gives a sparse gradient (the
    batch's rows only) and the head reads the matrix through an alias made before the lookup. Autograd
    runs the nodes made earlier later, so the sparse gradient arrives first and the head's dense one is
    added to it in place: one matrix, the same sum up to the order of float additions.
    The model's own lookup stays for: embedding modules that are not a plain `nn.Embedding` (Gemma 3
    scales inside its own), a frozen embedding (LoRA), inference, and DDP or FSDP (they reduce dense
    gradients).
    """
    embedding, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    weight = embedding.weight
    if not (torch.is_grad_enabled() and weight.requires_grad and type(embedding) is torch.nn.Embedding
            and type(head) is torch.nn.Linear and head.weight is weight
            and not (torch.distributed.is_available() and torch.distributed.is_initialized())):
        return {"input_ids": input_ids}, None
    head_weight = torch.ops.aten.alias(weight)  # before the lookup; its backward passes the gradient as is
    embeds = torch.nn.functional.embedding(input_ids, weight, embedding.padding_idx, embedding.max_norm,
                                           embedding.norm_type, embedding.scale_grad_by_freq, sparse=True)
    return {"inputs_embeds": embeds}, head_weight


def _head(lm: torch.nn.Module, hidden: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The LM head on picked hidden states (tied or not), with Gemma 2's logit softcap; `weight` stands in
    for a linear head's own (`_decoder_input`).

    A plain linear head runs as (W h^T)^T: the same products as the module's h W^T (bitwise equal on
    SmolLM2), but backward then yields W's gradient as a tensor of its own, not as a transposed view of
    one, which autograd can add a tied embedding's gradient into in place.
    """
    head = lm.get_output_embeddings()
    if type(head) is torch.nn.Linear:
        logits = torch.mm(head.weight if weight is None else weight, hidden.t()).t()
        logits = logits if head.bias is None else logits + head.bias
    else:
        logits = head(hidden)
    softcap = getattr(lm.config, "final_logit_softcapping", None)  # Gemma 2 caps its logits
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
