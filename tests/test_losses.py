"""SPEC 6 objectives on fixed tensors, and the training step's reshape on a short last batch (SPEC 5)."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rerank_lightning.model import RerankerModule, distillation, listwise_ce, pointwise_ce


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _kd_by_hand(teacher, scores, T):
    """-mean_b sum_j softmax(t_b/T)_j * log softmax(s_b/T)_j, with plain Python floats."""
    total = 0.0
    for t_row, s_row in zip(teacher, scores):
        p = _softmax([t / T for t in t_row])
        q = _softmax([s / T for s in s_row])
        total += -sum(pj * math.log(qj) for pj, qj in zip(p, q))
    return total / len(teacher)


# ---------------------------------------------------------------- listwise


def test_listwise_ce_single_group():
    scores = torch.tensor([[2.0, 0.0, 0.0]])
    expected = math.log(math.exp(2) + 2) - 2
    assert listwise_ce(scores).item() == pytest.approx(expected, abs=1e-6)


def test_listwise_ce_is_mean_over_groups_and_positive_is_column_zero():
    scores = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, -1.0]])
    row0 = math.log(math.exp(2) + 2) - 2
    row1 = math.log(1 + math.e + math.exp(-1)) - 0.0
    assert listwise_ce(scores).item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    # Moving the positive out of column 0 changes the loss: column 0 is the positive.
    assert listwise_ce(scores[:, [1, 0, 2]]).item() != pytest.approx((row0 + row1) / 2, abs=1e-3)


def test_listwise_ce_uniform_scores_is_log_group_size():
    assert listwise_ce(torch.zeros(5, 8)).item() == pytest.approx(math.log(8), abs=1e-6)


def test_listwise_ce_is_stable_for_large_scores():
    scores = torch.tensor([[1000.0, 0.0], [0.0, 1000.0]])
    assert listwise_ce(scores).item() == pytest.approx(500.0, abs=1e-3)


# ---------------------------------------------------------------- pointwise


def test_pointwise_ce_by_hand():
    # Two labelled positions over a 4-token vocabulary: token 2 = "Yes", token 3 = "No".
    logits = torch.tensor([[0.0, 0.0, 3.0, 1.0], [1.0, -1.0, 0.5, 2.0]])
    labels = torch.tensor([2, 3])

    def nll(row, target):
        return math.log(sum(math.exp(x) for x in row)) - row[target]

    expected = (nll([0.0, 0.0, 3.0, 1.0], 2) + nll([1.0, -1.0, 0.5, 2.0], 3)) / 2
    assert pointwise_ce(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_pointwise_ce_uses_the_full_vocabulary():
    """Not a 2-way Yes/No softmax: mass on other tokens counts (SPEC 6 'cross-entropy of the label token')."""
    logits = torch.tensor([[5.0, 5.0, 1.0, 0.0]])
    full = math.log(2 * math.exp(5) + math.e + 1) - 1.0
    assert pointwise_ce(logits, torch.tensor([2])).item() == pytest.approx(full, abs=1e-6)


# ---------------------------------------------------------------- distillation


TEACHER = [[90.0, 40.0, 10.0], [55.0, 60.0, 20.0]]
STUDENT = [[1.5, 0.2, -0.3], [0.1, 0.4, -1.0]]


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_distillation_by_hand(T):
    expected = _kd_by_hand(TEACHER, STUDENT, T)
    got = distillation(torch.tensor(TEACHER), torch.tensor(STUDENT), temperature=T)
    assert got.item() == pytest.approx(expected, abs=1e-5)


def test_distillation_temperature_matters():
    t, s = torch.tensor(TEACHER), torch.tensor(STUDENT)
    assert abs(distillation(t, s, 1.0).item() - distillation(t, s, 2.0).item()) > 1e-3
    assert distillation(t, s, 10.0).item() == pytest.approx(_kd_by_hand(TEACHER, STUDENT, 10.0), abs=1e-5)


def test_distillation_default_temperature_is_one():
    t, s = torch.tensor(TEACHER), torch.tensor(STUDENT)
    assert distillation(t, s).item() == pytest.approx(_kd_by_hand(TEACHER, STUDENT, 1.0), abs=1e-5)


def test_distillation_excludes_groups_with_nan_teacher_scores():
    teacher = torch.tensor(TEACHER + [[float("nan"), 3.0, 1.0]])
    student = torch.tensor(STUDENT + [[9.0, -9.0, 0.0]])
    expected = _kd_by_hand(TEACHER, STUDENT, 1.0)  # mean over the two known groups only
    got = distillation(teacher, student)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(expected, abs=1e-5)


def test_distillation_all_nan_is_zero_and_finite():
    got = distillation(torch.full((2, 3), float("nan")), torch.randn(2, 3))
    assert torch.isfinite(got) and got.item() == 0.0


def test_distillation_gradient_flows_only_to_student():
    s = torch.tensor(STUDENT, requires_grad=True)
    distillation(torch.tensor(TEACHER), s, 2.0).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# ---------------------------------------------------------------- fp32


def test_losses_are_fp32_for_bf16_inputs():
    s = torch.tensor([[2.0, 0.0, 0.0], [0.5, 0.25, -1.0]], dtype=torch.bfloat16)
    t = torch.tensor([[9.0, 1.0, 0.0], [1.0, 2.0, 3.0]], dtype=torch.bfloat16)
    ce = listwise_ce(s)
    kd = distillation(t, s, 2.0)
    pw = pointwise_ce(torch.randn(2, 16).to(torch.bfloat16), torch.tensor([1, 2]))
    assert ce.dtype == kd.dtype == pw.dtype == torch.float32
    # The values are the fp32 losses of the (exactly representable) bf16 inputs.
    assert ce.item() == pytest.approx(listwise_ce(s.float()).item(), abs=1e-6)
    assert kd.item() == pytest.approx(distillation(t.float(), s.float(), 2.0).item(), abs=1e-6)


def test_bf16_loss_gradient_reaches_bf16_scores():
    s = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.bfloat16, requires_grad=True)
    listwise_ce(s).backward()
    assert s.grad.dtype == torch.bfloat16
    expected = F.softmax(torch.tensor([2.0, 0.0, 0.0]), -1) - torch.tensor([1.0, 0.0, 0.0])
    torch.testing.assert_close(s.grad.float()[0], expected, atol=1e-2, rtol=0)


# ---------------------------------------------------------------- module: short last batch


def _module_and_batch(tokenizer, cfg, n_groups, group_size=4, loss=None, teacher=False):
    from rerank_lightning.data import RerankCollator
    from rerank_lightning.data.formatting import PairFormatter

    fmt = PairFormatter(tokenizer, 32, 64)
    module = RerankerModule(model=cfg, yes_token_id=fmt.yes_id, no_token_id=fmt.no_id,
                            vocab_size=len(tokenizer), loss=loss)
    module.configure_model()
    groups = []
    for b in range(n_groups):
        group = []
        for j in range(group_size):
            label = fmt.yes_id if j == 0 else fmt.no_id
            ids = fmt.encode_pair(f"question number {b}?", f"passage {j} " * (1 + j + b), label=label)
            enc = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * (len(ids) - 1) + [label]}
            if teacher:
                enc["teacher_score"] = float(10 * (group_size - j) + b)
            group.append(enc)
        groups.append(group)
    batch = RerankCollator(tokenizer, 32, 64, 8, "left")(groups)
    logged = {}
    module.log = lambda name, value, *a, **k: logged.__setitem__(name, (value, k))
    module._trainer = SimpleNamespace(optimizers=[SimpleNamespace(param_groups=[{"lr": 1e-4}])])
    return module, batch, fmt, logged


def test_training_step_short_last_batch_uses_real_batch_size(mistral_tokenizer, tiny_model_cfg):
    """3 groups of G=4 when batch_size is configured as 4: scores are [3, 4], not regrouped into [4, 3]."""
    module, batch, fmt, logged = _module_and_batch(mistral_tokenizer, tiny_model_cfg, n_groups=3)
    assert batch["pair"]["input_ids"].shape[0] == 12
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        scores = module.score_logits(batch["pair"])[:, fmt.yes_id].float()
    expected = listwise_ce(scores.view(3, 4))
    wrong = listwise_ce(scores.view(4, 3))  # what a configured batch_size=4 reshape would give
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert abs(expected.item() - wrong.item()) > 1e-4
    assert logged["train/loss"][1].get("batch_size") == 3


def test_training_step_pointwise_objective(mistral_tokenizer, tiny_model_cfg):
    module, batch, fmt, _ = _module_and_batch(mistral_tokenizer, tiny_model_cfg, n_groups=2,
                                              loss={"objective": "pointwise"})
    loss = module.training_step(batch, 0)
    pair = batch["pair"]
    with torch.no_grad():
        logits = module.score_logits(pair)
    labels = torch.tensor([fmt.yes_id if r % 4 == 0 else fmt.no_id for r in range(8)])
    assert loss.item() == pytest.approx(F.cross_entropy(logits.float(), labels).item(), abs=1e-5)


def test_training_step_adds_weighted_distillation(mistral_tokenizer, tiny_model_cfg):
    module, batch, fmt, logged = _module_and_batch(
        mistral_tokenizer, tiny_model_cfg, n_groups=3, teacher=True,
        loss={"distill_weight": 0.5, "temperature": 2.0})
    assert batch["teacher_scores"].shape == (3, 4)
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        scores = module.score_logits(batch["pair"])[:, fmt.yes_id].float().view(3, 4)
    expected = listwise_ce(scores) + 0.5 * distillation(batch["teacher_scores"], scores, 2.0)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert "train/distill_loss" in logged


@pytest.mark.parametrize("objective", ["ranknet", "listnet", "lambdaloss", "bce"])
def test_training_step_calls_the_configured_objective(mistral_tokenizer, tiny_model_cfg, objective):
    """`loss.objective` picks the loss; on a short last batch (3 groups) it sees [3, 4] scores."""
    from rerank_lightning.model.losses import OBJECTIVES, ScoredGroups

    module, batch, fmt, logged = _module_and_batch(mistral_tokenizer, tiny_model_cfg, n_groups=3,
                                                   loss={"objective": objective, "sigma": 2.0})
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        scores = module.score_logits(batch["pair"])[:, fmt.yes_id].float().view(3, 4)
    expected = OBJECTIVES[objective](ScoredGroups(scores, None, None, None, None), module.loss_cfg)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert f"train/{objective}_loss" in logged


def test_training_step_margin_mse_distillation(mistral_tokenizer, tiny_model_cfg):
    from rerank_lightning.model.losses import margin_mse

    module, batch, fmt, _ = _module_and_batch(mistral_tokenizer, tiny_model_cfg, n_groups=3, teacher=True,
                                              loss={"distill": "margin_mse", "distill_weight": 0.5})
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        scores = module.score_logits(batch["pair"])[:, fmt.yes_id].float().view(3, 4)
    expected = listwise_ce(scores) + 0.5 * margin_mse(batch["teacher_scores"], scores)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_module_rejects_a_bad_loss_setting(tiny_model_cfg):
    with pytest.raises(ValueError, match=r"loss\.temperature must be a number > 0"):
        RerankerModule(model=tiny_model_cfg, yes_token_id=1, no_token_id=2, vocab_size=10,
                       loss={"temperature": 0.0})


def test_training_step_reads_graded_labels(mistral_tokenizer, tiny_model_cfg):
    """A batch with `grades` (records with pos_grades/neg_grades) trains on them, not on 'positive first'."""
    module, batch, fmt, _ = _module_and_batch(mistral_tokenizer, tiny_model_cfg, n_groups=2,
                                              loss={"objective": "lambdaloss"})
    from rerank_lightning.model.losses import lambdaloss

    batch["grades"] = torch.tensor([[3.0, 1.0, 0.0, 2.0], [1.0, 0.0, 0.0, 0.0]])
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        scores = module.score_logits(batch["pair"])[:, fmt.yes_id].float().view(2, 4)
    assert loss.item() == pytest.approx(lambdaloss(scores, batch["grades"]).item(), abs=1e-5)
    assert abs(lambdaloss(scores, batch["grades"]).item() - lambdaloss(scores).item()) > 1e-4
