"""Each `loss=` objective against its formula written out in plain Python, on fixed groups that
include score ties, a group of size 2, padded (masked) candidates and graded labels."""

import math

import pytest
import torch

from rerank_lightning.model.losses import (
    lambdaloss, listnet, listwise_ce, loss_config, margin_mse, pointwise_bce, ranknet, distillation,
)

# Three groups of G=4: graded labels, a score tie, and a last group whose two last columns are padding
# (so it is a group of size 2).
SCORES = [[2.0, 0.5, 0.5, -1.0], [0.3, 1.2, -0.4, 0.8], [1.0, 1.5, 9.0, -9.0]]
LABELS = [[3.0, 1.0, 0.0, 0.0], [1.0, 2.0, 0.0, 1.0], [0.0, 1.0, 5.0, 7.0]]
MASK = [[True, True, True, True], [True, True, True, True], [True, True, False, False]]
TEACHER = [[9.0, 4.0, 4.0, 1.0], [2.0, 5.0, 0.0, 3.0], [1.0, 3.0, float("nan"), float("nan")]]


def t(rows):
    return torch.tensor(rows)


def real(row, mask):
    return [x for x, m in zip(row, mask) if m]


def log_softmax(xs):
    m = max(xs)
    z = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - z for x in xs]


def softplus_neg(x, sigma=1.0):
    return math.log(1 + math.exp(-sigma * x))


# ---------------------------------------------------------------- listwise CE


def listwise_by_hand(scores, labels, mask):
    losses = []
    for s, y, m in zip(scores, labels, mask):
        s, y = real(s, m), real(y, m)
        if sum(y) == 0:
            continue
        lp = log_softmax(s)
        losses.append(-sum(yi / sum(y) * lpi for yi, lpi in zip(y, lp)))
    return sum(losses) / len(losses)


def test_listwise_ce_graded_and_masked():
    got = listwise_ce(t(SCORES), t(LABELS), t(MASK))
    assert got.item() == pytest.approx(listwise_by_hand(SCORES, LABELS, MASK), abs=1e-6)


def test_listwise_ce_without_labels_is_flagembedding_positive_first():
    one_hot = [[1.0, 0, 0, 0]] * 3
    assert listwise_ce(t(SCORES)).item() == pytest.approx(
        listwise_by_hand(SCORES, one_hot, [[True] * 4] * 3), abs=1e-6)


def test_listwise_ce_padding_does_not_change_a_group():
    """A group of size 2 padded to 4 gives the loss of the same group unpadded."""
    padded = listwise_ce(t([[0.7, -0.2, 50.0, 50.0]]), t([[1.0, 0, 0, 0]]), t([[True, True, False, False]]))
    assert padded.item() == pytest.approx(listwise_ce(t([[0.7, -0.2]])).item(), abs=1e-6)


def test_listwise_ce_skips_groups_without_a_positive():
    labels = [[0.0] * 4, LABELS[1], LABELS[2]]
    got = listwise_ce(t(SCORES), t(labels), t(MASK))
    assert got.item() == pytest.approx(listwise_by_hand(SCORES[1:], LABELS[1:], MASK[1:]), abs=1e-6)


# ---------------------------------------------------------------- ListNet


def test_listnet_by_hand():
    expected = 0.0
    for s, y, m in zip(SCORES, LABELS, MASK):
        s, y = real(s, m), real(y, m)
        p = [math.exp(v) for v in log_softmax(y)]
        expected += -sum(pi * qi for pi, qi in zip(p, log_softmax(s)))
    got = listnet(t(SCORES), t(LABELS), t(MASK))
    assert got.item() == pytest.approx(expected / 3, abs=1e-6)


# ---------------------------------------------------------------- pointwise BCE


def test_pointwise_bce_by_hand():
    terms = []
    for s, y, m in zip(SCORES, LABELS, MASK):
        for si, yi in zip(real(s, m), real(y, m)):
            p = 1 / (1 + math.exp(-si))
            terms.append(-math.log(p) if yi > 0 else -math.log(1 - p))
    got = pointwise_bce(t(SCORES), t(LABELS), t(MASK))
    assert got.item() == pytest.approx(sum(terms) / len(terms), abs=1e-6)


# ---------------------------------------------------------------- RankNet


@pytest.mark.parametrize("sigma", [1.0, 2.5])
def test_ranknet_by_hand(sigma):
    terms = []
    for s, y, m in zip(SCORES, LABELS, MASK):
        s, y = real(s, m), real(y, m)
        for i in range(len(s)):
            for j in range(len(s)):
                if y[i] > y[j]:
                    terms.append(softplus_neg(s[i] - s[j], sigma))
    got = ranknet(t(SCORES), t(LABELS), t(MASK), sigma=sigma)
    assert got.item() == pytest.approx(sum(terms) / len(terms), abs=1e-6)


def test_ranknet_tied_labels_give_no_pair():
    assert ranknet(t([[1.0, 2.0]]), t([[1.0, 1.0]])).item() == 0.0


# ---------------------------------------------------------------- LambdaLoss (NDCG-Loss2)


def lambdaloss_by_hand(scores, labels, mask, sigma=1.0):
    losses = []
    for s, y, m in zip(scores, labels, mask):
        s, y = real(s, m), real(y, m)
        # ranks under the current scores, ties by column (a stable descending sort)
        order = sorted(range(len(s)), key=lambda i: (-s[i], i))
        rank = {i: k + 1 for k, i in enumerate(order)}
        idcg = sum(g / math.log2(k + 2) for k, g in enumerate(sorted(y, reverse=True)))
        if idcg == 0:
            continue
        total = 0.0
        for i in range(len(s)):
            for j in range(len(s)):
                if y[i] > y[j]:
                    d = abs(rank[i] - rank[j])
                    delta = abs(1 / math.log2(1 + d) - 1 / math.log2(2 + d))
                    total += delta * abs(y[i] - y[j]) / idcg * math.log2(1 + math.exp(-sigma * (s[i] - s[j])))
        losses.append(total)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("sigma", [1.0, 0.5])
def test_lambdaloss_by_hand(sigma):
    got = lambdaloss(t(SCORES), t(LABELS), t(MASK), sigma=sigma)
    assert got.item() == pytest.approx(lambdaloss_by_hand(SCORES, LABELS, MASK, sigma), abs=1e-6)


def test_lambdaloss_ties_in_scores_rank_by_column():
    """Columns 1 and 2 of group 0 tie at 0.5; swapping them changes which is ranked first."""
    swapped = [[2.0, 0.5, 0.5, -1.0]]
    labels = [[0.0, 2.0, 1.0, 0.0]]
    got = lambdaloss(t(swapped), t(labels))
    assert got.item() == pytest.approx(lambdaloss_by_hand(swapped, labels, [[True] * 4]), abs=1e-6)


def test_lambdaloss_gradient_reaches_scores_only():
    s = torch.tensor(SCORES, requires_grad=True)
    lambdaloss(s, t(LABELS), t(MASK)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert (s.grad[2, 2:] == 0).all()  # padding gets no gradient


# ---------------------------------------------------------------- distillation


def test_margin_mse_by_hand():
    terms = []
    for s, tt, m in zip(SCORES, TEACHER, MASK):
        s, tt = real(s, m), real(tt, m)
        for j in range(1, len(s)):
            terms.append(((s[0] - s[j]) - (tt[0] - tt[j])) ** 2)
    got = margin_mse(t(TEACHER), t(SCORES), t(MASK))
    assert got.item() == pytest.approx(sum(terms) / len(terms), abs=1e-5)


def test_margin_mse_skips_groups_with_an_unknown_teacher_score():
    teacher = [TEACHER[0], [float("nan"), 1.0, 1.0, 1.0]]
    expected = sum(((SCORES[0][0] - SCORES[0][j]) - (TEACHER[0][0] - TEACHER[0][j])) ** 2 for j in (1, 2, 3)) / 3
    assert margin_mse(t(teacher), t(SCORES[:2])).item() == pytest.approx(expected, abs=1e-5)


def test_kd_with_padding_by_hand():
    T = 2.0
    expected = 0.0
    for s, tt, m in zip(SCORES, TEACHER, MASK):
        p = [math.exp(v) for v in log_softmax([x / T for x in real(tt, m)])]
        expected += -sum(pi * qi for pi, qi in zip(p, log_softmax([x / T for x in real(s, m)])))
    got = distillation(t(TEACHER), t(SCORES), T, t(MASK))
    assert got.item() == pytest.approx(expected / 3, abs=1e-5)


# ---------------------------------------------------------------- config checks


@pytest.mark.parametrize("key, value, words", [
    ("temperature", 0, "loss.temperature must be a number > 0"),
    ("sigma", -1.0, "loss.sigma must be a number > 0"),
    ("distill_weight", -0.5, "loss.distill_weight must be a number >= 0"),
    ("objective", "lambdarank", "loss.objective must be one of"),
    ("distill", "mse", "loss.distill must be one of"),
    ("temprature", 1.0, "loss.temprature: unknown key"),
])
def test_loss_config_names_the_key_and_range(key, value, words):
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        loss_config({key: value})


LOSS_GROUP = sorted(p.stem for p in (__import__("pathlib").Path(__file__).parents[1] / "conf" / "loss").glob("*.yaml"))


@pytest.mark.parametrize("name", LOSS_GROUP)
def test_every_loss_config_composes_to_a_valid_loss(name):
    """`train.py loss=NAME` gives every key the module reads, valid values, and an overridable key set."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from rerank_lightning.model.losses import LOSS_DEFAULTS

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(__file__).parents[1] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"loss={name}", "loss.sigma=2.0"])
    loss = OmegaConf.to_container(cfg.loss)
    assert set(loss) == set(LOSS_DEFAULTS)
    assert loss_config(loss)["sigma"] == 2.0
    assert {"listwise", "ranknet", "listnet", "lambdaloss", "bce", "pointwise", "margin_mse"} <= set(LOSS_GROUP)
