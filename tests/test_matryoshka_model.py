"""SPEC 7 Matryoshka re-ranker: exits, heads, the captured last-row attention and in-loop compression.

Every check compares `rerank_lightning.model.matryoshka` with an independent path built from the
Hugging Face model's own forward (tiny random models, fp32, CPU).
"""

import pytest
import torch
import transformers
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from rerank_lightning.model.compression import token_compress
from rerank_lightning.model.matryoshka import (
    LayerwiseHeads,
    _LAST_ROW,
    _LastRowCapture,
    _LayerInputs,
    _run_layer,
    exit_hidden_states,
    exit_layers,
    exit_scores,
    last_real_index,
)
from rerank_lightning.model.scoring import answer_logits

ATOL = 1e-5

ARCHS = {
    "llama": ("sdpa", dict(tie_word_embeddings=False)),
    "mistral": ("sdpa", dict(sliding_window=5)),
    "qwen2": ("sdpa", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "qwen3": ("sdpa", {}),
    "gemma": ("sdpa", {}),
    "gemma2": ("eager", dict(sliding_window=5, attn_logit_softcapping=5.0)),
}


def make_lm(model_type, impl="eager", seed=0, **extra):
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=256, head_dim=16, **extra)
    cfg._attn_implementation = impl
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()


def right_padded_batch(lengths=(13, 9, 6), seed=1):
    g = torch.Generator().manual_seed(seed)
    length = max(lengths)
    ids = torch.randint(3, 100, (len(lengths), length), generator=g)
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        ids[b, n:] = 0
    return ids, mask


def positions(mask):
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def rows(x):
    return torch.arange(x.shape[0])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: intra-op threads only contend on a shared 2-core box (10x slower). Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama():
    return make_lm("llama", "eager", tie_word_embeddings=False)


# ---------------------------------------------------------------- 1. exits equal the model's own forward


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_top_exit_equals_decoder_forward_and_intermediate_exits_equal_normed_hidden_states(model_type):
    impl, extra = ARCHS[model_type]
    lm = make_lm(model_type, impl, **extra)
    ids, mask = right_padded_batch()
    last = last_real_index(mask)
    assert last.tolist() == [12, 8, 5]
    with torch.no_grad():
        ref = lm.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
        full = lm(input_ids=ids, attention_mask=mask, position_ids=positions(mask), output_hidden_states=True)
        got = exit_hidden_states(lm, ids, mask, [1, 2, 3])
    assert sorted(got) == [1, 2, 3]
    torch.testing.assert_close(got[3], ref[rows(ids), last], atol=ATOL, rtol=0)
    norm = lm.get_decoder().norm
    for layer in (1, 2):
        expected = norm(full.hidden_states[layer][rows(ids), last])
        torch.testing.assert_close(got[layer], expected, atol=ATOL, rtol=0)
    # A single exit below the top gives the same state as in the multi-exit pass.
    with torch.no_grad():
        only2 = exit_hidden_states(lm, ids, mask, [2])
    assert list(only2) == [2]
    torch.testing.assert_close(only2[2], got[2], atol=ATOL, rtol=0)


def test_sliding_window_actually_matters_in_the_mistral_check():
    # Guard for the test above: with a window of 5 and a 13-token row, a full-attention pass differs.
    ids, mask = right_padded_batch()
    slid = make_lm("mistral", "sdpa", sliding_window=5)
    full = make_lm("mistral", "sdpa", sliding_window=None)
    with torch.no_grad():
        a = exit_hidden_states(slid, ids, mask, [3])[3]
        b = exit_hidden_states(full, ids, mask, [3])[3]
    assert (a[0] - b[0]).abs().max() > 1e-3


def test_left_padding_without_compression_scores_like_right_padding(llama):
    ids, mask = right_padded_batch()
    n = mask.sum(1)
    left_ids, left_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for b in range(ids.shape[0]):
        left_ids[b, ids.shape[1] - n[b]:] = ids[b, :n[b]]
        left_mask[b, ids.shape[1] - n[b]:] = 1
    with torch.no_grad():
        right = exit_hidden_states(llama, ids, mask, [2, 3])
        left = exit_hidden_states(llama, left_ids, left_mask, [2, 3])
    for layer in (2, 3):
        torch.testing.assert_close(left[layer], right[layer], atol=ATOL, rtol=0)


def test_bad_exit_lists_raise(llama):
    ids, mask = right_padded_batch()
    for exits in ([], [0], [4]):
        with pytest.raises(ValueError, match="exit layers"):
            exit_hidden_states(llama, ids, mask, exits)
    with pytest.raises(ValueError, match="compress_method"):
        exit_hidden_states(llama, ids, mask, [3], compress_method="max")


# ---------------------------------------------------------------- 2. the captured last-row attention

# Larger init so the attention logits reach the cap of 5 (with the default 0.02 the cap would be a no-op).
GEMMA2_CAPPED = dict(sliding_window=5, attn_logit_softcapping=5.0, initializer_range=0.3)

CAPTURE_CASES = [
    ("llama", "sdpa", {}),
    ("llama", "eager", {}),
    ("mistral", "sdpa", dict(sliding_window=5)),
    ("mistral", "eager", dict(sliding_window=5)),
    ("qwen3", "sdpa", {}),
    ("qwen3", "eager", {}),
    ("gemma2", "eager", GEMMA2_CAPPED),
]


@pytest.mark.parametrize("model_type,inner,extra", CAPTURE_CASES, ids=[f"{m}-{i}" for m, i, _ in CAPTURE_CASES])
def test_captured_last_row_equals_eager_attentions_and_leaves_the_layer_output_alone(model_type, inner, extra):
    lm = make_lm(model_type, "eager", **extra)
    ids, mask = right_padded_batch()                    # row 0 has 13 tokens > window 5
    pos = positions(mask)
    last = last_real_index(mask)
    with torch.no_grad():
        ref = lm(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True,
                 output_attentions=True)
    decoder = lm.get_decoder()
    decoder.config._attn_implementation = inner         # the model's own implementation for this check
    try:
        for layer in range(3):
            hidden = ref.hidden_states[layer]
            inputs = _LayerInputs(decoder, hidden, mask, pos)
            capture = _LastRowCapture(inner, last, mask)
            with torch.no_grad():
                plain = _run_layer(decoder, layer, hidden, inputs, None)
                captured = _run_layer(decoder, layer, hidden, inputs, capture)
            assert decoder.config._attn_implementation == inner
            expected = ref.attentions[layer][rows(ids), :, last].sum(1)            # [B, L]
            assert capture.weights is not None and capture.weights.shape == expected.shape
            torch.testing.assert_close(capture.weights, expected, atol=ATOL, rtol=0)
            # Each row sums to the number of heads and puts nothing on pads.
            torch.testing.assert_close(capture.weights.sum(-1), torch.full((3,), 4.0), atol=1e-5, rtol=0)
            assert (capture.weights[mask == 0] == 0).all()
            torch.testing.assert_close(captured, plain, atol=0, rtol=0)
            if layer < 2:   # hidden_states[l + 1] is the raw output of layer l (the last is normed); pad rows
                real = mask.bool()  # may differ between sdpa and eager (fully masked rows), real tokens may not
                torch.testing.assert_close(plain[real], ref.hidden_states[layer + 1][real], atol=ATOL, rtol=0)
    finally:
        decoder.config._attn_implementation = "eager"
    if extra.get("sliding_window"):
        # The window really cuts row 0: its first tokens get no attention in a sliding layer.
        sliding_layer = 0
        assert (ref.attentions[sliding_layer][0, :, 12, :8] == 0).all()


def test_softcap_actually_matters_in_the_gemma2_check():
    ids, mask = right_padded_batch()
    last = last_real_index(mask)
    with torch.no_grad():
        capped = make_lm("gemma2", "eager", **GEMMA2_CAPPED)(
            input_ids=ids, attention_mask=mask, position_ids=positions(mask), output_attentions=True).attentions
        uncapped = make_lm("gemma2", "eager", **{**GEMMA2_CAPPED, "attn_logit_softcapping": None})(
            input_ids=ids, attention_mask=mask, position_ids=positions(mask), output_attentions=True).attentions
    assert (capped[0][rows(ids), :, last] - uncapped[0][rows(ids), :, last]).abs().max() > 1e-2


def test_attn_implementation_is_swapped_during_the_call_and_restored_when_the_layer_raises(llama):
    decoder = llama.get_decoder()
    ids, mask = right_padded_batch()
    hidden = decoder.embed_tokens(ids)
    inputs = _LayerInputs(decoder, hidden, mask, positions(mask))
    seen = []

    def boom(module, args, kwargs):
        seen.append(decoder.config._attn_implementation)
        raise RuntimeError("boom inside attention")

    handle = decoder.layers[1].self_attn.register_forward_pre_hook(boom, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            _run_layer(decoder, 1, hidden, inputs, _LastRowCapture("eager", last_real_index(mask), mask))
    finally:
        handle.remove()
    assert seen == [_LAST_ROW]
    assert decoder.config._attn_implementation == "eager"
    assert llama.config._attn_implementation == "eager"
    # And the model still runs normally afterwards.
    with torch.no_grad():
        out = exit_hidden_states(llama, ids, mask, [3])[3]
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- 3. compression inside the loop


def _compressed_reference(lm_eager, ids, mask, q, p, ratio, method):
    """Independent path: full eager forward, compress after 2 layers, run layers[2:] by hand."""
    decoder = lm_eager.get_decoder()
    last = last_real_index(mask)
    with torch.no_grad():
        out = lm_eager(input_ids=ids, attention_mask=mask, position_ids=positions(mask), output_hidden_states=True,
                       output_attentions=True)
        hidden = out.hidden_states[2]                                          # after 2 layers
        weights = out.attentions[1][rows(ids), :, last].sum(1) if method == "attention" else None
        h, m = token_compress(hidden, mask, q, p, ratio, weights)
        pos = torch.arange(h.shape[1])[None].expand(h.shape[0], -1)
        args = (decoder.config, h, m, None)  # no cache, by position (its keyword's name changes across releases)
        types = getattr(decoder.config, "layer_types", None) or ["full_attention"] * 3
        masks = {"full_attention": create_causal_mask(*args, position_ids=pos)}
        if "sliding_attention" in types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(*args, position_ids=pos)
        rope = decoder.rotary_emb(h, pos)
        for i in (2,):
            h = decoder.layers[i](h, attention_mask=masks[types[i]], position_ids=pos, position_embeddings=rope)
            h = h[0] if isinstance(h, tuple) else h
        return decoder.norm(h[rows(h), last_real_index(m)]), m


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["attention", "mean"])
def test_compression_in_the_loop_equals_an_independent_path(llama, impl, method):
    ids, mask = right_padded_batch((14, 11, 7))
    q = torch.tensor([3, 2, 1])
    p = torch.tensor([2, 3, 1])
    expected, new_mask = _compressed_reference(llama, ids, mask, q, p, 2, method)
    # passages 9, 6, 5 -> pooled 5, 3, 3: lengths 10, 8, 5; the compression really shortens.
    assert new_mask.sum(1).tolist() == [10, 8, 5]
    llama.config._attn_implementation = impl
    try:
        with torch.no_grad():
            got = exit_hidden_states(llama, ids, mask, [3], compress_layers=[2], compress_ratio=2,
                                     query_lengths=q, prompt_lengths=p, compress_method=method)
    finally:
        llama.config._attn_implementation = "eager"
    torch.testing.assert_close(got[3], expected, atol=ATOL, rtol=0)
    # Not the uncompressed answer.
    with torch.no_grad():
        plain = exit_hidden_states(llama, ids, mask, [3])[3]
    assert (got[3] - plain).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["attention", "mean"])
def test_compression_in_the_loop_with_sliding_layers_equals_an_independent_path(method):
    # Qwen2 with layers 1 and 2 sliding (window 5): the weights come from a sliding layer, and the layer after
    # compression needs a sliding mask rebuilt for the compressed length (10 > 5 for row 0).
    lm = make_lm("qwen2", "eager", **ARCHS["qwen2"][1])
    assert lm.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    ids, mask = right_padded_batch((14, 11, 7))
    q, p = torch.tensor([3, 2, 1]), torch.tensor([2, 3, 1])
    expected, new_mask = _compressed_reference(lm, ids, mask, q, p, 2, method)
    assert new_mask.sum(1).tolist() == [10, 8, 5]
    with torch.no_grad():
        got = exit_hidden_states(lm, ids, mask, [3], compress_layers=[2], compress_ratio=2,
                                 query_lengths=q, prompt_lengths=p, compress_method=method)
    torch.testing.assert_close(got[3], expected, atol=ATOL, rtol=0)


def test_attention_and_mean_pooling_differ(llama):
    ids, mask = right_padded_batch((14, 11, 7))
    q, p = torch.tensor([3, 2, 1]), torch.tensor([2, 3, 1])
    kw = dict(compress_layers=[2], compress_ratio=2, query_lengths=q, prompt_lengths=p)
    with torch.no_grad():
        a = exit_hidden_states(llama, ids, mask, [3], compress_method="attention", **kw)[3]
        m = exit_hidden_states(llama, ids, mask, [3], compress_method="mean", **kw)[3]
    assert (a - m).abs().max() > 1e-4


def test_ratio_one_and_compress_layers_at_or_above_the_deepest_exit_change_nothing(llama):
    ids, mask = right_padded_batch((14, 11, 7))
    q, p = torch.tensor([3, 2, 1]), torch.tensor([2, 3, 1])
    with torch.no_grad():
        plain = exit_hidden_states(llama, ids, mask, [1, 2, 3])
        ratio1 = exit_hidden_states(llama, ids, mask, [1, 2, 3], compress_layers=[2], compress_ratio=1,
                                    query_lengths=q, prompt_lengths=p)
        ignored = exit_hidden_states(llama, ids, mask, [1, 2], compress_layers=[2, 3], compress_ratio=2,
                                     query_lengths=q, prompt_lengths=p)
        at_zero = exit_hidden_states(llama, ids, mask, [3], compress_layers=[0], compress_ratio=2,
                                     query_lengths=q, prompt_lengths=p)
    for layer in (1, 2, 3):
        torch.testing.assert_close(ratio1[layer], plain[layer], atol=0, rtol=0)
    for layer in (1, 2):
        torch.testing.assert_close(ignored[layer], plain[layer], atol=0, rtol=0)
    torch.testing.assert_close(at_zero[3], plain[3], atol=0, rtol=0)
    # Ratio 1 needs no lengths either.
    with torch.no_grad():
        no_lengths = exit_hidden_states(llama, ids, mask, [3], compress_layers=[2], compress_ratio=1)
    torch.testing.assert_close(no_lengths[3], plain[3], atol=0, rtol=0)


def test_compression_needs_lengths_and_right_padding(llama):
    ids, mask = right_padded_batch((14, 11, 7))
    with pytest.raises(ValueError, match="query_lengths and prompt_lengths"):
        exit_hidden_states(llama, ids, mask, [3], compress_layers=[2], compress_ratio=2)
    with pytest.raises(ValueError, match="query_lengths and prompt_lengths"):
        exit_hidden_states(llama, ids, mask, [3], compress_layers=[2], compress_ratio=2,
                           query_lengths=torch.tensor([1, 1, 1]))
    left_mask = mask.flip(-1)
    with pytest.raises(ValueError, match="padding_side='right'"):
        exit_hidden_states(llama, ids.flip(-1), left_mask, [3], compress_layers=[2], compress_ratio=2,
                           query_lengths=torch.tensor([1, 1, 1]), prompt_lengths=torch.tensor([1, 1, 1]))


def test_stacked_compression_with_mean_equals_two_token_compress_calls(llama):
    ids, mask = right_padded_batch((14, 11, 7))
    q, p = torch.tensor([3, 2, 1]), torch.tensor([2, 3, 1])
    decoder = llama.get_decoder()
    with torch.no_grad():
        got = exit_hidden_states(llama, ids, mask, [3], compress_layers=[1, 2], compress_ratio=2,
                                 query_lengths=q, prompt_lengths=p, compress_method="mean")[3]
        h = llama(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                  output_hidden_states=True).hidden_states[1]
        m = mask
        for layer in (1, 2):
            h, m = token_compress(h, m, q, p, 2)
            pos = torch.arange(h.shape[1])[None].expand(h.shape[0], -1)
            causal = create_causal_mask(decoder.config, h, m, None, position_ids=pos)
            h = decoder.layers[layer](h, attention_mask=causal, position_ids=pos,
                                      position_embeddings=decoder.rotary_emb(h, pos))
            h = h[0] if isinstance(h, tuple) else h
        expected = decoder.norm(h[rows(h), last_real_index(m)])
    assert m.sum(1).tolist() == [8, 7, 4]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- 4. heads


def test_heads_start_from_the_yes_row_untied_and_tied():
    yes = 17
    untied = make_lm("llama", "eager", tie_word_embeddings=False)
    tied = make_lm("llama", "eager", tie_word_embeddings=True)
    assert untied.get_output_embeddings().weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()
    assert tied.get_output_embeddings().weight.data_ptr() == tied.get_input_embeddings().weight.data_ptr()
    for lm in (untied, tied):
        heads = LayerwiseHeads.from_yes_row(lm, yes, [3, 1, 2, 2])
        assert heads.layers == [1, 2, 3]
        for layer in (1, 2, 3):
            w = heads.heads[str(layer)].weight
            assert w.shape == (1, 64)
            assert torch.equal(w[0], lm.get_output_embeddings().weight[yes])
            assert w.data_ptr() != lm.get_output_embeddings().weight.data_ptr()   # a copy, not a view
        assert not torch.equal(heads.heads["1"].weight[0], lm.get_output_embeddings().weight[yes + 1])


def test_top_exit_score_at_init_equals_the_yes_logit(llama):
    yes = 42
    ids, mask = right_padded_batch()
    heads = LayerwiseHeads.from_yes_row(llama, yes, exit_layers(3, 1))
    with torch.no_grad():
        scores = exit_scores(llama, heads, ids, mask, [1, 2, 3])
        logits = answer_logits(llama, ids, mask, last_real_index(mask))
    assert sorted(scores) == [1, 2, 3]
    assert all(s.dtype == torch.float32 and s.shape == (3,) for s in scores.values())
    torch.testing.assert_close(scores[3], logits[:, yes], atol=ATOL, rtol=0)


def test_partial_exit_lists_pick_the_head_of_that_layer(llama):
    decoder = llama.get_decoder()
    heads = LayerwiseHeads(64, [1, 2, 3])
    torch.manual_seed(5)
    with torch.no_grad():
        for h in heads.heads.values():
            h.weight.normal_()
    ids, mask = right_padded_batch()
    last = last_real_index(mask)
    with torch.no_grad():
        only2 = exit_scores(llama, heads, ids, mask, [2])
        all3 = exit_scores(llama, heads, ids, mask, [1, 2, 3])
        only3 = exit_scores(llama, heads, ids, mask, [3])
        hs = llama(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                   output_hidden_states=True).hidden_states
        by_hand = {l: decoder.norm(hs[l][rows(ids), last]) @ heads.heads[str(l)].weight[0] for l in (1, 2)}
        by_hand[3] = hs[3][rows(ids), last] @ heads.heads["3"].weight[0]      # hidden_states[-1] is normed
    assert list(only2) == [2]
    torch.testing.assert_close(only2[2], all3[2], atol=ATOL, rtol=0)
    for layer in (1, 2, 3):
        torch.testing.assert_close(all3[layer], by_hand[layer], atol=ATOL, rtol=0)
    torch.testing.assert_close(only3[3], by_hand[3], atol=ATOL, rtol=0)
    # Distinct heads really give distinct scores (the reference's "position in the list" bug would show).
    assert (by_hand[2] - decoder.norm(hs[2][rows(ids), last]) @ heads.heads["1"].weight[0]).abs().max() > 1e-3


def test_an_exit_without_a_head_raises_naming_the_heads(llama):
    heads = LayerwiseHeads(64, [2, 3])
    ids, mask = right_padded_batch()
    with pytest.raises(ValueError, match=r"\[1\].*heads at layers \[2, 3\]"):
        exit_scores(llama, heads, ids, mask, [1, 3])


def test_exit_layers():
    assert exit_layers(32, 4, 1) == list(range(4, 33))
    assert exit_layers(32, 4) == list(range(4, 33))
    assert exit_layers(30, 4, 4) == [4, 8, 12, 16, 20, 24, 28, 30]
    assert exit_layers(32, 8, 8) == [8, 16, 24, 32]
    assert exit_layers(3, 3) == [3]
    for args in ((32, 0, 1), (32, 33, 1), (32, -1, 1), (32, 4, 0)):
        with pytest.raises(ValueError):
            exit_layers(*args)


# ---------------------------------------------------------------- 5. the pass stops at the deepest exit


@pytest.mark.parametrize("exits,ran", [([1], [0]), ([1, 2], [0, 1]), ([2], [0, 1]), ([1, 3], [0, 1, 2])])
def test_the_pass_stops_at_the_deepest_exit(llama, exits, ran):
    calls = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
               for i, layer in enumerate(llama.get_decoder().layers)]
    try:
        ids, mask = right_padded_batch()
        heads = LayerwiseHeads(64, [1, 2, 3])
        with torch.no_grad():
            exit_scores(llama, heads, ids, mask, exits)
    finally:
        for h in handles:
            h.remove()
    assert calls == ran


# ---------------------------------------------------------------- 6. gradients and bf16


@pytest.mark.parametrize("compressed", [False, True])
def test_gradients_reach_heads_and_decoder(compressed):
    lm = make_lm("llama", "sdpa", tie_word_embeddings=False)
    heads = LayerwiseHeads.from_yes_row(lm, 7, [1, 2, 3])
    ids, mask = right_padded_batch((14, 11, 7))
    kw = dict(compress_layers=[2], compress_ratio=2, query_lengths=torch.tensor([3, 2, 1]),
              prompt_lengths=torch.tensor([2, 3, 1])) if compressed else {}
    scores = exit_scores(lm, heads, ids, mask, [1, 2, 3], **kw)
    sum(s.sum() for s in scores.values()).backward()
    for layer in (1, 2, 3):
        g = heads.heads[str(layer)].weight.grad
        assert g is not None and g.abs().sum() > 0
    decoder = lm.get_decoder()
    for i in range(3):
        g = decoder.layers[i].self_attn.q_proj.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert decoder.embed_tokens.weight.grad.abs().sum() > 0
    assert lm.config._attn_implementation == "sdpa"


def test_bf16_model_runs_and_matches_fp32_roughly():
    lm = make_lm("llama", "sdpa", tie_word_embeddings=False)
    ids, mask = right_padded_batch((14, 11, 7))
    kw = dict(compress_layers=[2], compress_ratio=2, query_lengths=torch.tensor([3, 2, 1]),
              prompt_lengths=torch.tensor([2, 3, 1]))
    heads32 = LayerwiseHeads.from_yes_row(lm, 7, [1, 2, 3])
    with torch.no_grad():
        ref = exit_scores(lm, heads32, ids, mask, [1, 2, 3], **kw)
    lm = lm.to(torch.bfloat16)
    heads = LayerwiseHeads.from_yes_row(lm, 7, [1, 2, 3])
    assert heads.heads["1"].weight.dtype == torch.bfloat16
    with torch.no_grad():
        got = exit_scores(lm, heads, ids, mask, [1, 2, 3], **kw)
    for layer in (1, 2, 3):
        assert got[layer].dtype == torch.float32 and torch.isfinite(got[layer]).all()
        torch.testing.assert_close(got[layer], ref[layer], atol=0.1, rtol=0.05)
