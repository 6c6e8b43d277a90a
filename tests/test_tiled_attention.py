"""`model/tiled_attention.py`: sdpa over the non-empty tiles of packed rows' masks gives sdpa's outputs
and gradients (fp32), runs where it saves work and leaves every other call to sdpa itself."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers

from conftest import TINY_MODEL, group_pairs
from rerank_lightning.data.instruction import pad_batch
from rerank_lightning.data.packing import pack_pairs
from rerank_lightning.model import answer_logits, load_causal_lm, score_positions
from rerank_lightning.model import tiled_attention
from rerank_lightning.model.scoring import packed_answer_logits, packed_attention_mask, packed_order
from rerank_lightning.model.tiled_attention import SDPA_TILED, tiled_sdpa

ATOL = 1e-5
LONG = [43, 18, 27, 61, 21, 36, 24, 30]  # a group of 8 pairs' own tokens, after their shared prefix


class Attention(torch.nn.Module):  # what transformers' attention functions read from the layer
    num_key_value_groups = 2
    is_causal = True


def packed_rows(budget=512):
    seqs, groups = group_pairs(LONG, 11)
    return seqs, pack_pairs(seqs, [len(s) - 1 for s in seqs], pad_value=0, budget=budget, multiple=8, groups=groups)


def mask_config(sliding_window=None):
    return type("LM", (), {"config": transformers.LlamaConfig(sliding_window=sliding_window)})()


@pytest.mark.parametrize("window, masked_gqa", [(None, True), (9, True), (None, False)])
def test_tiled_sdpa_gives_sdpa_outputs_and_gradients_on_packed_rows(tile_plans, window, masked_gqa, monkeypatch):
    """masked_gqa False: key and value heads repeated first, as on CUDA."""
    monkeypatch.setattr(tiled_attention, "_masked_gqa", lambda device: masked_gqa)
    _, packed = packed_rows()
    lm = mask_config(window)
    lm.config._attn_implementation = "sdpa"
    mask = packed_attention_mask(lm, packed["position_ids"], packed["pair_ids"])
    rows, width = packed["input_ids"].shape
    assert width % tiled_attention.TILE  # the tiled path pads the row to whole tiles
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(rows, heads, width, 16, generator=g, requires_grad=True) for heads in (4, 2, 2)]
    upstream = torch.randn(rows, width, 4, 16, generator=g)
    results = []
    for attention in (transformers.integrations.sdpa_attention.sdpa_attention_forward, tiled_sdpa):
        out, _ = attention(Attention(), *inputs, mask, scaling=0.25)
        grads = torch.autograd.grad((out * upstream).sum(), inputs)
        results.append((out, grads))
    (want, want_grads), (got, got_grads) = results
    assert len(tile_plans) == 1 and tile_plans[0] is not None  # the tiled path ran
    assert tile_plans[0].order.shape[-1] * 2 <= tile_plans[0].order.shape[1]  # at most half the dense products
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad, atol=ATOL, rtol=0)


def test_tiled_sdpa_leaves_a_dense_causal_mask_to_sdpa(tile_plans):
    width = 96
    causal = torch.ones(width, width, dtype=torch.bool).tril()[None, None].expand(2, 1, width, width)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, width, 16, generator=g) for heads in (4, 2, 2))
    want, _ = transformers.integrations.sdpa_attention.sdpa_attention_forward(Attention(), q, k, v, causal)
    got, _ = tiled_sdpa(Attention(), q, k, v, causal)
    assert tile_plans == [None]  # a query tile near the end needs every key tile: nothing to skip
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch, extra", [
    ("llama", {}), ("mistral", dict(sliding_window=9)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=9, max_window_layers=1)), ("gemma", {})])
def test_packed_scores_through_tiled_attention_equal_padded_scores(tile_plans, arch, extra, monkeypatch):
    """Every layer attends through tiles, under a plan made once per mask (Qwen2 here has two: full and windowed)."""
    made, make = [], tiled_attention.tile_plan
    monkeypatch.setattr(tiled_attention, "tile_plan", lambda mask: made.append(mask) or make(mask))
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(
        arch, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=512, head_dim=16, **extra)
    lm = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    seqs, packed = packed_rows()
    ids = pad_batch(seqs, 0, "left", 8)
    mask = pad_batch([[1] * len(s) for s in seqs], 0, "left", 8)
    with torch.no_grad():
        padded = answer_logits(lm, ids, mask, score_positions(mask))
        lm.config._attn_implementation = SDPA_TILED
        got = packed_answer_logits(lm, packed["input_ids"], packed["position_ids"], packed["scored_pair"],
                                   packed["pair_ids"])[packed_order(packed["scored_pair"])]
    assert len(tile_plans) == cfg.num_hidden_layers and None not in tile_plans  # every layer took the tiled path
    assert len(made) == len(set(getattr(cfg, "layer_types", None) or [None])) == len({id(p) for p in tile_plans})
    torch.testing.assert_close(got, padded, atol=ATOL, rtol=0)


def test_plan_for_makes_one_plan_a_mask_and_drops_it_with_the_mask():
    _, packed = packed_rows()
    lm = mask_config()
    lm.config._attn_implementation = "sdpa"
    first, second = (packed_attention_mask(lm, packed["position_ids"], packed["pair_ids"]) for _ in range(2))
    second[0, 0, 40, :40] = False  # token 40 sees itself only: a different plan
    plans = [tiled_attention.plan_for(mask) for mask in (first, second, first, second)]
    assert plans[0] is plans[2] and plans[1] is plans[3] and plans[0] is not plans[1]
    assert not torch.equal(plans[0].tile_mask, plans[1].tile_mask)
    for got, mask in zip(plans[:2], (first, second)):
        want = tiled_attention.tile_plan(mask)
        assert got.pad == want.pad and all(torch.equal(getattr(got, field), getattr(want, field))
                                           for field in ("order", "picked", "tile_mask"))
    held = len(tiled_attention._recent)
    del first, plans
    tiled_attention.plan_for(second)
    assert len(tiled_attention._recent) == held - 1  # the first mask's plan went with it


def test_load_causal_lm_attends_through_tiled_sdpa_and_saves_a_plain_config(tmp_path):
    lm = load_causal_lm(TINY_MODEL, vocab_size=128)
    assert lm.config._attn_implementation == SDPA_TILED
    lm.save_pretrained(tmp_path)
    assert SDPA_TILED not in (tmp_path / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config._attn_implementation == "sdpa"
    eager = load_causal_lm({**TINY_MODEL, "attn_implementation": "eager"}, vocab_size=128)
    assert eager.config._attn_implementation == "eager"
