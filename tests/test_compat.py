"""Forward compatibility: the project calls no deprecated library API, and the suite would say if it did.

pyproject.toml's filterwarnings turn DeprecationWarning and FutureWarning into errors when they are
attributed to the project's modules, and transformers' deprecated keywords of a module's `forward`
(attributed to torch's `Module.__call__`, the frame that called the decorated forward) wherever they come from.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers.utils.deprecation import deprecate_kwarg

from conftest import TINY_MODEL

PROJECT_FRAME = "rerank_lightning.compat_probe"  # the module a warning is attributed to, as for src/ code


class Layer(torch.nn.Module):
    """A decoder layer whose cache keyword was renamed, the way transformers renames them."""

    @deprecate_kwarg("past_key_values", version="99.0", new_name="cache")
    def forward(self, hidden: torch.Tensor, cache: object = None) -> torch.Tensor:
        return hidden


@deprecate_kwarg("past_key_values", version="99.0", new_name="cache")
def make_mask(hidden: torch.Tensor, cache: object = None) -> torch.Tensor:
    return torch.ones(hidden.shape[:2])


def run_in_project(code: str, **names) -> None:
    exec(code, {"__name__": PROJECT_FRAME, **names})  # noqa: S102 - a frame that belongs to the project


def test_a_deprecated_call_in_project_code_fails_the_suite():
    hidden = torch.zeros(1, 3, 4)
    with pytest.raises(FutureWarning, match="past_key_values"):
        run_in_project("make_mask(hidden, past_key_values=None)", make_mask=make_mask, hidden=hidden)
    with pytest.raises(DeprecationWarning, match="old"):
        run_in_project("warnings.warn('old', DeprecationWarning)", warnings=warnings)
    run_in_project("make_mask(hidden, cache=None)", make_mask=make_mask, hidden=hidden)  # the new name passes


def test_a_deprecated_keyword_of_a_layer_forward_fails_the_suite():
    """The warning lands on torch's Module.__call__, not on the caller: filtered by that module."""
    layer, hidden = Layer(), torch.zeros(1, 3, 4)
    with pytest.raises(FutureWarning, match="past_key_values"):
        run_in_project("layer(hidden, past_key_values=None)", layer=layer, hidden=hidden)
    assert layer(hidden, cache=None) is hidden


def test_matryoshka_exit_pass_uses_no_deprecated_argument():
    """Every exit, compressed, on the installed transformers: not one DeprecationWarning or FutureWarning."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rerank_lightning.model.matryoshka import exit_hidden_states

    init = {k: v for k, v in TINY_MODEL["random_init"].items() if k != "model_type"}
    init["num_hidden_layers"] = 3
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=128, **init)).eval()
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        with torch.no_grad():
            out = exit_hidden_states(lm, ids, mask, [1, 2, 3], compress_layers=[2], compress_ratio=2,
                                     query_lengths=torch.tensor([3, 3]), prompt_lengths=torch.tensor([2, 2]))
    assert sorted(out) == [1, 2, 3] and all(v.shape == (2, 64) for v in out.values())
