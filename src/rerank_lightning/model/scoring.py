"""The pair score (SPEC 3): next-token logits at one position per row, never [N, L, V]."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


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
    hidden = lm.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]
    logits = lm.get_output_embeddings()(picked)
    softcap = getattr(lm.config, "final_logit_softcapping", None)  # Gemma 2 caps its logits
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
