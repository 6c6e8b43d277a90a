"""SPEC 3 scoring: the Yes logit at the answer position, independent of padding side and amount."""

import pytest
import torch

from rerank_lightning.data.formatting import PairFormatter
from rerank_lightning.data.instruction import pad_batch
from rerank_lightning.model import answer_logits, load_causal_lm, score_positions
from rerank_lightning.model.backbone import apply_lora

ATOL = 1e-5
QUERY = "What is the atomic number of iron?"
PASSAGE = "The atomic number of iron is 26."
LONG_PASSAGE = " ".join(["Iron is a chemical element with symbol Fe and it is very common on Earth."] * 8)


@pytest.fixture(scope="module")
def fmt(mistral_tokenizer):
    return PairFormatter(mistral_tokenizer, 32, 128)


@pytest.fixture(scope="module")
def tiny_lm(mistral_tokenizer):
    from conftest import TINY_MODEL

    lm = load_causal_lm(TINY_MODEL, len(mistral_tokenizer)).eval()
    return lm


def _batch(seqs, side, pad_id, multiple=8, labels=None):
    ids = pad_batch(seqs, pad_id, side, multiple)
    mask = pad_batch([[1] * len(s) for s in seqs], 0, side, multiple)
    lab = pad_batch(labels, -100, side, multiple) if labels is not None else None
    return ids, mask, lab


@torch.no_grad()
def _scores(lm, seqs, side, pad_id, yes_id, multiple=8):
    ids, mask, _ = _batch(seqs, side, pad_id, multiple)
    return answer_logits(lm, ids, mask, score_positions(mask))[:, yes_id]


@torch.no_grad()
def _naive(lm, seq, yes_id):
    """model(input_ids).logits[0, last, yes] on the unpadded sequence."""
    return lm(torch.tensor([seq])).logits[0, len(seq) - 1, yes_id].float()


def test_score_positions_left_and_right():
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert score_positions(left).tolist() == [4, 4]
    assert score_positions(right).tolist() == [2, 4]
    labels_left = torch.tensor([[-100, -100, -100, -100, 7], [-100, -100, -100, -100, 7]])
    labels_right = torch.tensor([[-100, -100, 7, -100, -100], [-100, -100, -100, -100, 7]])
    assert score_positions(left, labels_left).tolist() == [3, 3]
    assert score_positions(right, labels_right).tolist() == [1, 3]


def test_answer_logits_shape(tiny_lm, fmt):
    seq = fmt.encode_pair(QUERY, PASSAGE)
    ids, mask, _ = _batch([seq, seq[:-3]], "left", fmt.pad_id)
    with torch.no_grad():
        out = answer_logits(tiny_lm, ids, mask, score_positions(mask))
    assert out.shape == (2, tiny_lm.config.vocab_size)


def test_score_matches_naive_forward(tiny_lm, fmt):
    seq = fmt.encode_pair(QUERY, PASSAGE)
    got = _scores(tiny_lm, [seq], "left", fmt.pad_id, fmt.yes_id)[0]
    torch.testing.assert_close(got, _naive(tiny_lm, seq, fmt.yes_id), atol=ATOL, rtol=0)


def test_score_independent_of_padding_side_and_amount(tiny_lm, fmt):
    short = fmt.encode_pair(QUERY, PASSAGE)
    long = fmt.encode_pair(QUERY, LONG_PASSAGE)
    assert len(long) > len(short) + 60
    expected = _naive(tiny_lm, short, fmt.yes_id)
    cases = {
        "alone-left-no-pad": _scores(tiny_lm, [short], "left", fmt.pad_id, fmt.yes_id, multiple=None)[0],
        "alone-left-mult8": _scores(tiny_lm, [short], "left", fmt.pad_id, fmt.yes_id)[0],
        "alone-right-mult64": _scores(tiny_lm, [short], "right", fmt.pad_id, fmt.yes_id, multiple=64)[0],
        "with-long-left": _scores(tiny_lm, [long, short], "left", fmt.pad_id, fmt.yes_id)[1],
        "with-long-right": _scores(tiny_lm, [short, long], "right", fmt.pad_id, fmt.yes_id)[0],
        "with-long-left-mult128": _scores(tiny_lm, [short, long], "left", fmt.pad_id, fmt.yes_id, 128)[0],
    }
    for name, value in cases.items():
        torch.testing.assert_close(value, expected, atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    # The long row too.
    long_expected = _naive(tiny_lm, long, fmt.yes_id)
    torch.testing.assert_close(_scores(tiny_lm, [long, short], "right", fmt.pad_id, fmt.yes_id)[0],
                               long_expected, atol=ATOL, rtol=0)


def test_training_and_inference_positions_give_same_yes_logit(tiny_lm, fmt):
    """With the label appended (training) and without (inference): the label token is after the scored one."""
    pairs = [(QUERY, PASSAGE), (QUERY, LONG_PASSAGE), ("Who discovered penicillin?", "Alexander Fleming.")]
    for side in ("left", "right"):
        train_seqs, labels = [], []
        for j, (q, p) in enumerate(pairs):
            label = fmt.yes_id if j == 0 else fmt.no_id
            ids = fmt.encode_pair(q, p, label=label)
            assert ids[:-1] == fmt.encode_pair(q, p)
            train_seqs.append(ids)
            labels.append([-100] * (len(ids) - 1) + [label])
        ids, mask, lab = _batch(train_seqs, side, fmt.pad_id, labels=labels)
        with torch.no_grad():
            train = answer_logits(tiny_lm, ids, mask, score_positions(mask, lab))[:, fmt.yes_id]
        infer = _scores(tiny_lm, [fmt.encode_pair(q, p) for q, p in pairs], side, fmt.pad_id, fmt.yes_id)
        torch.testing.assert_close(train, infer, atol=ATOL, rtol=0)


def test_gemma2_final_logit_softcapping_is_applied(fmt):
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=fmt.tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        final_logit_softcapping=0.5, attn_logit_softcapping=50.0, sliding_window=16,
        pad_token_id=fmt.pad_id, bos_token_id=1, eos_token_id=2,
    )
    config._attn_implementation = "eager"
    lm = AutoModelForCausalLM.from_config(config).eval()
    short = fmt.encode_pair(QUERY, PASSAGE)
    long = fmt.encode_pair(QUERY, LONG_PASSAGE)
    with torch.no_grad():
        ref = lm(torch.tensor([short])).logits[0, -1]
        raw = lm.get_output_embeddings()(lm.model(torch.tensor([short])).last_hidden_state[0, -1])
    assert ref.abs().max() <= 0.5 + 1e-6
    assert raw.abs().max() > 0.5  # the cap changes the logits, so the test can tell
    ids, mask, _ = _batch([short], "left", fmt.pad_id)
    with torch.no_grad():
        got = answer_logits(lm, ids, mask, score_positions(mask))[0]
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # Padding invariance holds for Gemma 2 as well (left-padded beside a longer sequence).
    got_batched = _scores(lm, [long, short], "left", fmt.pad_id, fmt.yes_id)[1]
    torch.testing.assert_close(got_batched, ref[fmt.yes_id], atol=ATOL, rtol=0)


def test_tied_embedding_model(mistral_tokenizer, fmt, tiny_model_cfg):
    tiny_model_cfg["random_init"]["tie_word_embeddings"] = True
    lm = load_causal_lm(tiny_model_cfg, len(mistral_tokenizer)).eval()
    assert lm.get_output_embeddings().weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    short = fmt.encode_pair(QUERY, PASSAGE)
    long = fmt.encode_pair(QUERY, LONG_PASSAGE)
    expected = _naive(lm, short, fmt.yes_id)
    for side in ("left", "right"):
        got = _scores(lm, [long, short], side, fmt.pad_id, fmt.yes_id)[1]
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_lora_scores_match_naive_peft_forward(mistral_tokenizer, fmt, tiny_model_cfg):
    base = load_causal_lm(tiny_model_cfg, len(mistral_tokenizer))
    with torch.no_grad():
        base_score = _naive(base, fmt.encode_pair(QUERY, PASSAGE), fmt.yes_id)
    lm = apply_lora(base, {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero: make the adapter non-trivial
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lm.eval()
    short = fmt.encode_pair(QUERY, PASSAGE)
    long = fmt.encode_pair(QUERY, LONG_PASSAGE)
    expected = _naive(lm, short, fmt.yes_id)
    assert abs(expected.item() - base_score.item()) > 1e-4  # the adapter is in the score
    for side in ("left", "right"):
        got = _scores(lm, [long, short], side, fmt.pad_id, fmt.yes_id)[1]
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_lm_head_gradient_is_not_a_view(tiny_lm, fmt):
    """Backward yields the LM head's weight gradient as a tensor of its own, not a view: with tied
    embeddings autograd can then add the input embedding's gradient into it in place, instead of
    allocating one more vocabulary-sized matrix at a full fine-tune's peak (BENCHMARKS 3c). The values
    are the head's own (test_score_matches_naive_forward)."""
    seq = fmt.encode_pair(QUERY, PASSAGE)
    ids, mask, _ = _batch([seq, seq[2:]], "left", fmt.pad_id)
    weight = tiny_lm.get_output_embeddings().weight
    logits = answer_logits(tiny_lm, ids, mask, score_positions(mask))
    (grad,) = torch.autograd.grad(logits.logsumexp(-1).sum(), weight)
    assert not grad._is_view()


def test_answer_logits_gradients_flow(tiny_lm, fmt):
    seq = fmt.encode_pair(QUERY, PASSAGE)
    ids, mask, _ = _batch([seq, seq[2:]], "left", fmt.pad_id)
    tiny_lm.zero_grad()
    answer_logits(tiny_lm, ids, mask, score_positions(mask))[:, fmt.yes_id].sum().backward()
    grad = tiny_lm.get_output_embeddings().weight.grad
    assert grad is not None and grad[fmt.yes_id].abs().sum() > 0
    tiny_lm.zero_grad()


def _graph_nodes(root):
    """Every autograd node reachable from `root`."""
    seen, todo = {}, [root]
    while todo:
        node = todo.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = node
            todo.extend(next_node for next_node, _ in node.next_functions)
    return list(seen.values())


def _tied_lm(mistral_tokenizer, tiny_model_cfg):
    tiny_model_cfg["random_init"]["tie_word_embeddings"] = True
    lm = load_causal_lm(tiny_model_cfg, len(mistral_tokenizer)).train()
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    return lm


def test_tied_matrix_gradient_is_one_matrix_summed_in_place(mistral_tokenizer, fmt, tiny_model_cfg):
    """Training a tied model (input embedding = LM head) in one process, the embedding's gradient is sparse
    and reaches the tied matrix before the head's dense one, which autograd adds it into in place: one
    vocabulary-sized gradient at the end of backward, not two (BENCHMARKS 3c). It equals the gradient of
    the model's own forward (the usual dense lookup) up to the order of float additions."""
    lm = _tied_lm(mistral_tokenizer, tiny_model_cfg)
    weight = lm.get_input_embeddings().weight
    ids, mask, _ = _batch([fmt.encode_pair(QUERY, PASSAGE), fmt.encode_pair(QUERY, LONG_PASSAGE)], "left", fmt.pad_id)
    positions = score_positions(mask)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    rows = torch.arange(ids.shape[0])
    reference = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[rows, positions]
    (expected,) = torch.autograd.grad(reference.logsumexp(-1).sum(), weight)

    logits = answer_logits(lm, ids, mask, positions)
    torch.testing.assert_close(logits, reference.detach(), atol=ATOL, rtol=0)
    nodes = {node.name(): node for node in _graph_nodes(logits.grad_fn)}
    alias, lookup = nodes["AliasBackward0"], nodes["EmbeddingBackward0"]
    accumulate = alias.next_functions[0][0]
    assert lookup.next_functions[0][0] is accumulate  # both feed the tied matrix
    arrivals = []
    lookup.register_hook(lambda grads_in, grads_out: arrivals.append(("embedding", grads_in[0].layout, None)))
    alias.register_hook(lambda grads_in, grads_out: arrivals.append(("head", grads_in[0].layout, grads_in[0].data_ptr())))
    accumulate.register_prehook(lambda grads: arrivals.append(("sum", grads[0].layout, grads[0].data_ptr())))
    logits.logsumexp(-1).sum().backward()
    (_, sparse, _), (_, head_layout, head_ptr), (_, sum_layout, sum_ptr) = arrivals
    assert [a[0] for a in arrivals] == ["embedding", "head", "sum"]
    assert sparse == torch.sparse_coo and head_layout == sum_layout == torch.strided
    assert sum_ptr == head_ptr  # added into the head's gradient, no third matrix
    assert weight.grad.layout == torch.strided
    torch.testing.assert_close(weight.grad, expected, atol=1e-6, rtol=1e-5)


def test_tied_matrix_keeps_the_usual_lookup_under_distributed_training(mistral_tokenizer, fmt, tiny_model_cfg, tmp_path):
    """DDP and FSDP reduce dense gradients bucket by bucket: with a process group up, the lookup is the
    model's own (no alias) and the tied matrix's gradient dense."""
    lm = _tied_lm(mistral_tokenizer, tiny_model_cfg)
    ids, mask, _ = _batch([fmt.encode_pair(QUERY, PASSAGE)], "left", fmt.pad_id)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        logits = answer_logits(lm, ids, mask, score_positions(mask))
    finally:
        torch.distributed.destroy_process_group()
    names = {node.name() for node in _graph_nodes(logits.grad_fn)}
    assert "EmbeddingBackward0" in names and "AliasBackward0" not in names
    logits.logsumexp(-1).sum().backward()
    assert lm.get_input_embeddings().weight.grad.layout == torch.strided
