"""Config values that cannot work: `train.py` stops before loading any model, with one `error:` line
naming the key and what it accepts, and exit code 2 (part of the bad-input corpus)."""

from __future__ import annotations

import pytest

from cli_run import TRAIN_FAST, describe, error_line, run_train

# (overrides, fragments of the error line): the key and its allowed values
BAD = {
    "temperature-zero": (["loss.temperature=0"], ["loss.temperature", "> 0", "got 0"]),
    "lr-negative": (["optim.lr=-1e-4"], ["optim.lr", ">= 0"]),
    "lr-not-a-number": (["optim.lr=fast"], ["optim.lr", "a number >= 0", "'fast'"]),
    "warmup-negative": (["optim.warmup=-0.1"], ["optim.warmup", ">= 0", "-0.1"]),
    "betas-out-of-range": (["optim.betas=[0.9,1.5]"], ["optim.betas", "[0, 1)"]),
    "group-size-zero": (["data.train_group_size=0"], ["data.train_group_size", "an integer >= 1", "got 0"]),
    "group-size-fraction": (["data.train_group_size=2.5"], ["data.train_group_size", "an integer >= 1", "2.5"]),
    "batch-size-zero": (["data.batch_size=0"], ["data.batch_size", "an integer >= 1"]),
    "metrics-k-zero": (["metrics.k=0"], ["metrics.k", "an integer >= 1"]),
    "unknown-on-error": (["data.on_error=ignore"], ["data.on_error", "raise, skip", "'ignore'"]),
    "sigma-zero": (["loss=ranknet", "loss.sigma=0"], ["loss.sigma", "> 0", "got 0"]),
    "unknown-objective": (["loss.objective=pairwise"], ["loss.objective", "listwise", "'pairwise'"]),
    "packed-length-zero": (["data.packing=true", "data.packed_length=0"], ["data.packed_length", "an integer >= 1"]),
    "shared-prefix-flash": (["data.packing=true", "model.attn_implementation=flash_attention_2"],
                            ["data.share_query_prefix=true", "sdpa or eager", "'flash_attention_2'",
                             "data.share_query_prefix=false"]),
    "unknown-recipe": (["data.recipe=bge"], ["data.recipe", "instruction", "matryoshka", "'bge'"]),
    "matryoshka-unknown-stage": (["experiment=matryoshka_self_distill", "matryoshka.stage=stage3"],
                                 ["matryoshka.stage", "self_distill", "'stage3'"]),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_config_value_is_named_before_any_model_loads(name, tmp_path):
    overrides, fragments = BAD[name]
    # model=mistral: its weights are not on this machine, so reaching the model loader would fail differently
    fast = [arg if arg != "model=tiny" else "model=mistral" for arg in TRAIN_FAST]
    proc = run_train([*fast, *overrides], tmp_path, timeout=120)
    error_line(proc, *fragments)
    assert "not in the local Hugging Face cache" not in proc.stderr, describe(proc)


def test_config_error_from_a_constructor_is_one_line(tmp_path):
    """A value Lightning's Trainer refuses (Hydra wraps it in InstantiationException): one line, exit 2."""
    proc = run_train([*TRAIN_FAST, "trainer.precision=17-banana"], tmp_path, timeout=120)
    error_line(proc, "trainer", "17-banana")
