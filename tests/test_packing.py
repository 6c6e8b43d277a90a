"""Padding-free groups (`data.packing=true`): pairs packed into shared rows score, train and validate
exactly like padded rows, for every architecture the project supports (tiny random models, fp32, CPU)."""

import lightning as L
import pytest
import torch
import transformers

from conftest import ROOT, TINY_MODEL, group_pairs
from rerank_lightning.data import RerankCollator, RerankDataModule
from rerank_lightning.data.formatting import FormatConfigError
from rerank_lightning.data.instruction import pad_batch
from rerank_lightning.data import packing
from rerank_lightning.data.packing import balanced_rows, pack_pairs, pack_rows
from rerank_lightning.model import RerankerModule, answer_logits, score_positions
from rerank_lightning.model.losses import listwise_ce
from rerank_lightning.model.scoring import answer_label_ids, packed_answer_logits, packed_attention_mask, packed_order

ATOL = 1e-5
SAMPLE = ROOT / "data" / "sample"
YES, NO = 7, 9

# Sliding windows of 5 tokens are shorter than every pair below, so they really cut attention.
ARCHS = {
    "llama": ("sdpa", dict(tie_word_embeddings=False)),
    "mistral": ("sdpa", dict(sliding_window=5)),
    "mistral-eager": ("eager", dict(sliding_window=5)),
    "qwen2": ("sdpa", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "gemma": ("sdpa", {}),
    "gemma2": ("eager", dict(sliding_window=5, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_lm(arch):
    impl, extra = ARCHS[arch]
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(
        arch.split("-")[0], hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=256, head_dim=16, **extra)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()


def random_pairs(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 100, (n,), generator=g).tolist() for n in lengths]


LENGTHS = [13, 6, 9, 21, 7, 12, 8, 10]  # one query's group of 8, lengths as different as WikiQA's


def test_pack_rows_places_every_pair_once_within_the_budget():
    rows = pack_rows(LENGTHS, budget=24)
    assert sorted(i for row in rows for i in row) == list(range(len(LENGTHS)))
    assert all(sum(LENGTHS[i] for i in row) <= 24 for row in rows)
    assert len(rows) == 4  # 86 tokens need at least 4 rows of 24; 8 padded rows would hold 8 * 24
    assert pack_rows([30, 5], budget=24) == [[0], [1]]  # a pair longer than the budget gets its own row


def test_balanced_rows_keep_the_row_count_and_even_out_the_rows():
    lengths = [100, 90, 60, 50]  # first fit at 256: [100, 90, 60] and [50], padded to 250 + 250
    assert pack_rows(lengths, budget=256) == [[0, 1, 2], [3]]
    rows = balanced_rows(lengths, budget=256)
    assert len(rows) == 2 and max(sum(lengths[i] for i in row) for row in rows) == 150
    # a group's prefix (10 tokens) counts once per row that holds the group
    assert pack_rows([30, 30, 30], budget=50, groups=[0, 0, 0], prefix={0: 10}) == [[0, 1], [2]]


def test_pack_rows_keeps_groups_together_when_that_needs_fewer_rows():
    """Two groups of three pairs: longest pair first mixes them (three rows, each holding some prefix twice
    over); group by group fits each group's pairs behind one copy of its prefix (two rows)."""
    lengths, groups, prefix = [26, 14, 20, 26, 30, 12], [0, 0, 0, 1, 1, 1], {0: 4, 1: 3}
    longest_first = packing._first_fit(sorted(range(6), key=lambda i: -lengths[i]), lengths, 64, groups, prefix)
    assert longest_first[0] == [[4, 0], [3, 2, 1], [5]]
    rows = pack_rows(lengths, budget=64, groups=groups, prefix=prefix)
    assert rows == [[4, 3, 5], [0, 2, 1]]
    assert [sum(lengths[i] for i in row) - prefix[groups[row[0]]] * (len(row) - 1) for row in rows] == [62, 52]


def test_packed_rows_hold_each_pair_with_restarting_positions_and_its_score_token():
    seqs = random_pairs(LENGTHS)
    labels = [[-100] * (n - 1) + [YES if i == 0 else NO] for i, n in enumerate(LENGTHS)]
    packed = pack_pairs(seqs, [n - 2 for n in LENGTHS], pad_value=0, budget=24, multiple=8, labels=labels)
    ids, pos, scored = packed["input_ids"], packed["position_ids"], packed["scored_pair"]
    assert ids.shape[1] == 24 and ids.shape[0] == 4  # rows of at most 24 tokens
    assert ids.numel() < len(seqs) * 24
    for i, seq in enumerate(seqs):
        r, c = (scored == i).nonzero()[0].tolist()  # the token that predicts the answer
        start = c - (len(seq) - 2)
        assert ids[r, start : start + len(seq)].tolist() == seq
        assert pos[r, start : start + len(seq)].tolist() == list(range(len(seq)))
    assert (scored >= 0).sum() == len(seqs)
    assert answer_label_ids(packed).tolist() == [YES] + [NO] * 7


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("side", ["left", "right"])
def test_packed_scores_equal_padded_scores(arch, side):
    lm = make_lm(arch)
    seqs = random_pairs(LENGTHS)
    ids = pad_batch(seqs, 0, side, 8)
    mask = pad_batch([[1] * len(s) for s in seqs], 0, side, 8)
    packed = pack_pairs(seqs, [len(s) - 1 for s in seqs], pad_value=0, budget=24, multiple=8)
    assert packed["input_ids"].shape[0] < len(seqs)
    with torch.no_grad():
        padded = answer_logits(lm, ids, mask, score_positions(mask))
        got = packed_answer_logits(lm, packed["input_ids"], packed["position_ids"], packed["scored_pair"])
        got = got[packed_order(packed["scored_pair"])]
    torch.testing.assert_close(got, padded, atol=ATOL, rtol=0)


def test_packed_scores_would_differ_if_pairs_saw_each_other():
    """Guard for the check above: one row with a plain causal mask over all its pairs scores differently."""
    lm = make_lm("llama")
    seqs = random_pairs(LENGTHS)
    packed = pack_pairs(seqs, [len(s) - 1 for s in seqs], pad_value=0, budget=24, multiple=8)
    plain = torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])
    with torch.no_grad():
        right = packed_answer_logits(lm, packed["input_ids"], packed["position_ids"], packed["scored_pair"])
        leaky = packed_answer_logits(lm, packed["input_ids"], plain, packed["scored_pair"])
    assert (right - leaky).abs().max() > 1e-2


def test_shared_prefix_rows_hold_a_groups_prefix_once_per_row():
    seqs, groups = group_pairs(LENGTHS, 7)
    labels = [[-100] * (len(s) - 1) + [YES] for s in seqs]
    score_at = [len(s) - 2 for s in seqs]
    packed = pack_pairs(seqs, score_at, pad_value=0, budget=48, multiple=8, labels=labels, groups=groups)
    ids, pos, scored, owner = packed["input_ids"], packed["position_ids"], packed["scored_pair"], packed["pair_ids"]
    plain = pack_pairs(seqs, score_at, pad_value=0, budget=48, multiple=8)
    assert "pair_ids" not in plain
    assert int((owner >= 0).sum()) == sum(len(s) - 7 for s in seqs)  # each pair's own tokens once
    ends = [int((row >= 0).nonzero()[-1, 0]) + 1 for row in owner]  # a row's trailing padding starts there
    prefix_tokens = sum(int((row[:end] == -1).sum()) for row, end in zip(owner, ends))
    assert prefix_tokens % 7 == 0 and 2 <= prefix_tokens // 7 <= len(seqs) // 2  # 16 pairs, 2 groups: 8 copies
    assert (ids.shape[1] <= 48) and sum(ends) == prefix_tokens + sum(len(s) - 7 for s in seqs) < sum(map(len, seqs))
    for i, seq in enumerate(seqs):
        r, c = (scored == i).nonzero()[0].tolist()
        mine = (owner[r] == i).nonzero()[:, 0]
        start = int(mine[0])
        head = (pos[r, :start] == 0).nonzero()[-1, 0]  # the chunk this pair sits in starts there
        assert ids[r, head : head + 7].tolist() == seq[:7] and (owner[r, head : head + 7] == -1).all()
        assert ids[r, mine].tolist() == seq[7:] and pos[r, mine].tolist() == list(range(7, len(seq)))
        assert c == start + score_at[i] - 7
    assert answer_label_ids(packed).tolist() == [YES] * len(seqs)
    # a group of one shares nothing
    assert "pair_ids" not in pack_pairs(seqs[:1], score_at[:1], pad_value=0, groups=[0])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_shared_prefix_scores_equal_padded_scores(arch):
    """The prefix (7 tokens) is longer than the sliding windows (5): windowed layers must cut across it."""
    lm = make_lm(arch)
    seqs, groups = group_pairs(LENGTHS, 7)
    ids = pad_batch(seqs, 0, "left", 8)
    mask = pad_batch([[1] * len(s) for s in seqs], 0, "left", 8)
    packed = pack_pairs(seqs, [len(s) - 1 for s in seqs], pad_value=0, budget=48, multiple=8, groups=groups)
    assert "pair_ids" in packed
    with torch.no_grad():
        padded = answer_logits(lm, ids, mask, score_positions(mask))
        got = packed_answer_logits(lm, packed["input_ids"], packed["position_ids"], packed["scored_pair"],
                                   packed["pair_ids"])[packed_order(packed["scored_pair"])]
    torch.testing.assert_close(got, padded, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_shared_prefix_scores_would_differ_if_pairs_saw_each_other(arch):
    """Guard for the check above: if a chunk's pairs all saw each other, scores change."""
    lm = make_lm(arch)
    seqs, groups = group_pairs(LENGTHS, 7)
    packed = pack_pairs(seqs, [len(s) - 1 for s in seqs], pad_value=0, budget=48, multiple=8, groups=groups)
    args = (lm, packed["input_ids"], packed["position_ids"], packed["scored_pair"])
    with torch.no_grad():
        right = packed_answer_logits(*args, packed["pair_ids"])
        leaky = packed_answer_logits(*args, torch.full_like(packed["pair_ids"], -1))
    assert (right - leaky).abs().max() > 1e-2


def test_shared_prefix_refuses_attention_that_takes_no_mask():
    lm = make_lm("llama")
    lm.set_attn_implementation("flex_attention")
    seqs, groups = group_pairs(LENGTHS, 7)
    packed = pack_pairs(seqs, [len(s) - 1 for s in seqs], pad_value=0, budget=48, multiple=8, groups=groups)
    with pytest.raises(ValueError, match="need attn_implementation sdpa or eager, not 'flex_attention'; "
                                         "set data.share_query_prefix=false"):
        packed_attention_mask(lm, packed["position_ids"], packed["pair_ids"])


# ---------------------------------------------------------------- the training module


def groups(n_groups=3, size=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_groups):
        group, query = [], torch.randint(3, 30000, (6,), generator=g).tolist()  # the group's shared prefix
        for j in range(size):
            n = int(torch.randint(8, 40, (1,), generator=g))
            ids = query + torch.randint(3, 30000, (n - 6,), generator=g).tolist() + [YES if j == 0 else NO]
            group.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                          "labels": [-100] * n + [ids[-1]]})
        out.append(group)
    return out


def tiny_module(micro_batch_size=None, gradient_checkpointing=False):
    cfg = dict(TINY_MODEL, micro_batch_size=micro_batch_size, gradient_checkpointing=gradient_checkpointing)
    module = RerankerModule(cfg, YES, NO, 32000)
    module.configure_model()
    return module.train()


@pytest.mark.parametrize("micro_batch_size, packed_length, checkpointing",
                         [(None, 64, False), (2, 64, False), (None, 1024, False), (None, 1024, True)])
def test_packed_batch_gives_the_padded_loss_and_gradients(mistral_tokenizer, micro_batch_size, packed_length,
                                                          checkpointing, tile_plans):
    """Rows of 64 tokens attend through sdpa's dense masks; one row of all 12 pairs through the tiled path,
    whose layers (and their recomputation under activation checkpointing) share one tile plan."""
    features = groups()
    padded = RerankCollator(mistral_tokenizer)(features)
    packed = RerankCollator(mistral_tokenizer, packing=True, packed_length=packed_length)(features)
    assert packed["pair"]["input_ids"].numel() < padded["pair"]["input_ids"].numel()
    own = int((packed["pair"]["pair_ids"] >= 0).sum())  # tokens held per pair: fewer than the pairs' tokens
    assert own == sum(len(e["input_ids"]) - 6 for g in features for e in g)  # each group's 6-token prefix is shared
    unshared = RerankCollator(mistral_tokenizer, packing=True, packed_length=64, share_query_prefix=False)(features)
    assert "pair_ids" not in unshared["pair"]
    results = []
    for batch in (padded, packed):
        module = tiny_module(micro_batch_size, checkpointing)
        logits = module.score_logits(batch["pair"])
        scores = logits[:, YES].view(-1, batch["group_size"])
        pointwise = torch.nn.functional.cross_entropy(logits, answer_label_ids(batch["pair"]))
        loss = listwise_ce(scores) + pointwise
        loss.backward()
        results.append((scores.detach(), loss.detach(), {n: p.grad for n, p in module.named_parameters()}))
    (s0, l0, g0), (s1, l1, g1) = results
    tiled = [p for p in tile_plans if p is not None]
    calls = TINY_MODEL["random_init"]["num_hidden_layers"] * (2 if checkpointing else 1)  # recomputed in backward
    assert len(tiled) == (calls if packed_length == 1024 else 0)
    assert len({id(plan) for plan in tiled}) == (packed_length == 1024)
    torch.testing.assert_close(s1, s0, atol=ATOL, rtol=0)
    torch.testing.assert_close(l1, l0, atol=ATOL, rtol=0)
    assert len(g0) > 10
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=ATOL, rtol=1e-4)


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_packed_training_run_logs_the_padded_losses_and_metrics(mistral_tokenizer):
    """`data.packing=true` end to end: same losses, trained weights and validation metrics as padded rows
    (real records: each group's `[BOS] A: query \\n B:` is held once per row)."""
    runs = []
    for packing in (False, True):
        dm = RerankDataModule(mistral_tokenizer, train_data=str(SAMPLE / "train.jsonl"),
                              val_data=str(SAMPLE / "val_candidates.jsonl"), train_group_size=4, passage_max_len=64,
                              max_example_num_per_dataset=8, max_val_queries=4, batch_size=2, val_batch_size=16,
                              seed=0, cache_dir=None, packing=packing)
        if packing:
            dm.setup("fit")
            assert "pair_ids" in next(iter(dm.train_dataloader()))["pair"]
        module = RerankerModule(TINY_MODEL, dm.formatter.yes_id, dm.formatter.no_id, len(mistral_tokenizer),
                                optim={"lr": 1e-3, "warmup": 0}, loss={"objective": "listwise"})
        recorder = LossRecorder()
        trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            callbacks=[recorder], deterministic=True)
        L.seed_everything(0)
        trainer.fit(module, datamodule=dm)
        trainer.validate(module, datamodule=dm, verbose=False)
        runs.append((recorder.losses, dict(trainer.callback_metrics), module.lm.state_dict()))
    (loss0, metrics0, weights0), (loss1, metrics1, weights1) = runs
    assert len(loss0) == 3
    assert loss1 == pytest.approx(loss0, abs=1e-5)
    for name in ("val/MRR@10", "val/nDCG@10", "val/MAP"):
        assert float(metrics1[name]) == pytest.approx(float(metrics0[name]), abs=1e-5)
    for name, value in weights0.items():  # Adam divides by sqrt(v): float noise in tiny gradients grows to ~lr/100
        torch.testing.assert_close(weights1[name], value, atol=1e-4, rtol=0)


def test_matryoshka_recipe_refuses_packing(mistral_tokenizer):
    with pytest.raises(FormatConfigError, match="data.packing is not supported by the Matryoshka recipe"):
        RerankDataModule(mistral_tokenizer, train_data=str(SAMPLE / "train.jsonl"), recipe="matryoshka",
                         packing=True)
