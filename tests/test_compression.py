"""SPEC 7 token compression: hand-computed cases, a per-row loop oracle, errors, dtype and gradients."""

import pytest
import torch

from rerank_lightning.model.compression import token_compress


def _col(values, dtype=torch.float32):
    """A single row of 1-d hidden states: [1, L, 1]."""
    return torch.tensor(values, dtype=dtype).reshape(1, -1, 1)


def _ones_mask(length):
    return torch.ones(1, length, dtype=torch.long)


# ---------------------------------------------------------------- hand-computed cases


def test_chunks_start_at_passage_start_and_short_last_chunk_is_its_own_mean():
    # query = [1], passage = [2, 4, 8, 16, 32], prompt = [64]; ratio 2 -> (2,4) (8,16) (32).
    h = _col([1, 2, 4, 8, 16, 32, 64])
    out, mask = token_compress(h, _ones_mask(7), [1], [1], 2)
    assert torch.equal(out, _col([1, 3, 12, 32, 64]))
    assert torch.equal(mask, torch.ones(1, 5, dtype=torch.long))


def test_weighted_short_last_chunk_normalised_over_its_real_tokens():
    # No query or prompt; passage [1, 2, 4, 8, 16], ratio 3 -> chunks (1, 2, 4) and (8, 16).
    h = _col([1, 2, 4, 8, 16])
    w = torch.tensor([[1.0, 1.0, 2.0, 1.0, 3.0]])
    out, mask = token_compress(h, _ones_mask(5), [0], [0], 3, w)
    assert torch.allclose(out, _col([(1 + 2 + 8) / 4, (8 + 48) / 4]), atol=1e-6)
    assert torch.equal(mask, torch.ones(1, 2, dtype=torch.long))


def test_stacked_compression_pools_the_pooled_tokens():
    # query [1], passage [2, 4, 8, 16, 32, 64], prompt [128].
    h = _col([1, 2, 4, 8, 16, 32, 64, 128])
    once, mask1 = token_compress(h, _ones_mask(8), [1], [1], 2)
    assert torch.equal(once, _col([1, 3, 12, 48, 128]))
    twice, mask2 = token_compress(once, mask1, [1], [1], 2)
    assert torch.equal(twice, _col([1, 7.5, 48, 128]))
    assert torch.equal(mask2, torch.ones(1, 4, dtype=torch.long))
    # With uniform weights, 2 then 2 is the same as 4 once.
    assert torch.equal(token_compress(h, _ones_mask(8), [1], [1], 4)[0], twice)


def test_zero_weight_chunk_falls_back_to_plain_mean():
    h = _col([1, 3, 5, 7])
    w = torch.tensor([[0.0, 0.0, 1.0, 3.0]])
    out, _ = token_compress(h, _ones_mask(4), [0], [0], 2, w)
    assert not torch.isnan(out).any()
    assert torch.allclose(out, _col([2, (5 + 21) / 4]), atol=1e-6)


def test_rows_of_different_lengths_are_right_padded_with_zeros():
    # Row 0: 6 real tokens, q=1 p=1 -> 1 + 2 + 1 = 4.  Row 1: 4 real tokens, q=1 p=1 -> 1 + 1 + 1 = 3.
    h = torch.tensor([
        [[1, -1], [2, -2], [4, -4], [6, -6], [10, -10], [7, -7]],
        [[5, 0], [1, 2], [3, 4], [9, 9], [99, 99], [99, 99]],  # last two are padding (garbage)
    ], dtype=torch.float32)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.int32)
    out, new_mask = token_compress(h, mask, torch.tensor([1, 1]), torch.tensor([1, 1]), 2)
    expected = torch.tensor([
        [[1, -1], [3, -3], [8, -8], [7, -7]],
        [[5, 0], [2, 3], [9, 9], [0, 0]],
    ], dtype=torch.float32)
    assert torch.equal(out, expected)
    assert torch.equal(new_mask, torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.int32))


def test_weights_none_equals_uniform_weights():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 11, 3, generator=g)
    mask = torch.tensor([[1] * 11, [1] * 8 + [0] * 3])
    plain, plain_mask = token_compress(h, mask, [2, 1], [1, 3], 3)
    uniform, uniform_mask = token_compress(h, mask, [2, 1], [1, 3], 3, torch.full((2, 11), 0.5))
    assert torch.allclose(plain, uniform, atol=1e-6)
    assert torch.equal(plain_mask, uniform_mask)
    # ... and non-uniform weights do change the result.
    skewed = token_compress(h, mask, [2, 1], [1, 3], 3, torch.rand(2, 11, generator=g) + 0.1)[0]
    assert not torch.allclose(plain, skewed, atol=1e-3)


# ---------------------------------------------------------------- loop oracle


def _loop_reference(h, mask, q, p, ratio, w):
    """Row by row, chunk by chunk: query, weighted chunk means of the passage, prompt, zero padding."""
    w = w.sum(dim=1)
    rows = []
    for b in range(h.shape[0]):
        n = int(mask[b].sum())
        qb, pb = int(q[b]), int(p[b])
        tokens = [h[b, i] for i in range(qb)]
        for start in range(qb, n - pb, ratio):
            idx = list(range(start, min(start + ratio, n - pb)))
            total = sum(float(w[b, i]) for i in idx)
            tokens.append(sum(float(w[b, i]) / total * h[b, i] for i in idx))
        tokens += [h[b, i] for i in range(n - pb, n)]
        rows.append(tokens)
    new_len = max(len(r) for r in rows)
    out = torch.zeros(h.shape[0], new_len, h.shape[2])
    out_mask = torch.zeros(h.shape[0], new_len, dtype=mask.dtype)
    for b, tokens in enumerate(rows):
        for j, t in enumerate(tokens):
            out[b, j] = t
        out_mask[b, : len(tokens)] = 1
    return out, out_mask


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("ratio", [2, 3, 4, 8])
def test_matches_loop_reference_on_random_inputs(seed, ratio):
    g = torch.Generator().manual_seed(seed)
    batch, length, dim, heads = 4, 30, 6, 3
    n = torch.tensor([30, 23, 17, 9])
    q = torch.tensor([4, 2, 5, 1]) + seed % 2
    p = torch.tensor([3, 6, 0, 2])
    mask = (torch.arange(length)[None] < n[:, None]).long()
    h = torch.randn(batch, length, dim, generator=g)
    w = torch.rand(batch, heads, length, generator=g) + 1e-3
    out, out_mask = token_compress(h, mask, q, p, ratio, w)
    expected, expected_mask = _loop_reference(h, mask, q, p, ratio, w)
    assert out.shape == expected.shape
    assert torch.equal(out_mask, expected_mask)
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)


def test_head_weights_equal_summed_weights():
    g = torch.Generator().manual_seed(7)
    h = torch.randn(2, 12, 4, generator=g)
    mask = torch.tensor([[1] * 12, [1] * 9 + [0] * 3])
    per_head = torch.rand(2, 5, 12, generator=g)
    a, _ = token_compress(h, mask, [2, 3], [1, 2], 4, per_head)
    b, _ = token_compress(h, mask, [2, 3], [1, 2], 4, per_head.sum(dim=1))
    assert torch.allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------- errors, dtype, gradients


def test_left_padding_raises():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="padding_side='right'"):
        token_compress(torch.zeros(2, 4, 2), mask, [1, 1], [1, 1], 2)


def test_query_plus_prompt_longer_than_row_raises():
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match=r"row 1: query_length 2 \+ prompt_length 2 exceeds its 3"):
        token_compress(torch.zeros(2, 5, 2), mask, [1, 2], [1, 2], 2)


@pytest.mark.parametrize("ratio", [0, -2])
def test_bad_ratio_raises(ratio):
    with pytest.raises(ValueError, match="ratio"):
        token_compress(torch.zeros(1, 4, 2), _ones_mask(4), [1], [1], ratio)


def test_shape_mismatches_raise():
    h = torch.zeros(2, 4, 3)
    mask = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask"):
        token_compress(h, torch.ones(2, 5), [1, 1], [1, 1], 2)
    with pytest.raises(ValueError, match="weights"):
        token_compress(h, mask, [1, 1], [1, 1], 2, torch.ones(2, 3))
    with pytest.raises(ValueError, match="query_lengths"):
        token_compress(h, mask, [1, 1, 1], [1, 1], 2)
    with pytest.raises(ValueError, match="hidden_states"):
        token_compress(torch.zeros(2, 4), mask, [1, 1], [1, 1], 2)


def test_bf16_in_bf16_out():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 10, 4, generator=g).to(torch.bfloat16)
    mask = torch.tensor([[1] * 10, [1] * 7 + [0] * 3])
    w = torch.rand(2, 2, 10, generator=g).to(torch.bfloat16)
    out, new_mask = token_compress(h, mask, [1, 2], [2, 1], 3, w)
    assert out.dtype == torch.bfloat16 and new_mask.dtype == mask.dtype
    ref, _ = token_compress(h.float(), mask, [1, 2], [2, 1], 3, w.float())
    assert torch.allclose(out.float(), ref, atol=2e-2, rtol=1e-2)


def test_gradients_flow_and_are_finite_even_with_a_zero_weight_chunk():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(1, 7, 3, generator=g, requires_grad=True)
    w = torch.tensor([[1.0, 0.0, 0.0, 2.0, 1.0, 3.0, 1.0]], requires_grad=True)
    # query [0], passage positions 1..5 -> chunks (1,2) with zero weight, (3,4), (5); prompt [6].
    out, _ = token_compress(h, _ones_mask(7), [1], [1], 2, w)
    out.sum().backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    # d sum(out) / d h_k is the token's pooling coefficient.
    coef = torch.tensor([1, 0.5, 0.5, 2 / 3, 1 / 3, 1, 1])
    assert torch.allclose(h.grad, coef[None, :, None].expand(1, 7, 3), atol=1e-6)
    assert w.grad[0, 3:5].abs().sum() > 0  # weights of a non-degenerate chunk receive gradient
    assert w.grad[0, 5].abs() < 1e-6  # a one-token chunk does not depend on its weight


def test_ratio_one_returns_the_inputs():
    h = torch.randn(2, 5, 3)
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])
    out, new_mask = token_compress(h, mask, [1, 1], [1, 1], 1)
    assert out is h and new_mask is mask
    with pytest.raises(ValueError, match="padding_side='right'"):
        token_compress(h, torch.tensor([[0, 1, 1, 1, 1]] * 2), [1, 1], [1, 1], 1)
