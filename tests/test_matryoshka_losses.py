"""SPEC 7 Matryoshka self-distillation: teacher schedules and the summed loss, against hand computations."""

import pytest
import torch

from rerank_lightning.model.losses import distillation, listwise_ce, matryoshka_loss, self_distill_teachers

EXITS = list(range(4, 33))


# ---------------------------------------------------------------- teacher schedules


def test_teacher_method_has_no_self_teachers():
    assert self_distill_teachers(EXITS, "teacher") == {}


def test_final_layer_method_maps_every_lower_exit_to_the_top():
    assert self_distill_teachers(EXITS, "final_layer") == {e: 32 for e in range(4, 32)}


def test_cascade_method_maps_each_exit_to_the_one_above():
    expected = {e: e + 1 for e in range(4, 32)}
    assert self_distill_teachers(EXITS, "cascade") == expected
    assert expected[31] == 32 and expected[4] == 5 and 32 not in expected
    # Exits with gaps: the next exit up, not e + 1.
    assert self_distill_teachers([8, 16, 24, 32], "cascade") == {24: 32, 16: 24, 8: 16}


def test_fixed_interval_method_refreshes_the_teacher_every_eight_exits():
    expected = {}
    expected.update({e: 32 for e in range(24, 32)})     # 31..24 <- 32
    expected.update({e: 24 for e in range(16, 24)})     # 23..16 <- 24
    expected.update({e: 16 for e in range(8, 16)})      # 15..8  <- 16
    expected.update({e: 8 for e in range(4, 8)})        # 7..4   <- 8
    assert self_distill_teachers(EXITS, "fixed_interval", 8) == expected
    assert self_distill_teachers(EXITS, "fixed_interval") == expected      # 8 is the default
    # Input order does not matter.
    assert self_distill_teachers(EXITS[::-1], "fixed_interval", 8) == expected


def test_fixed_interval_edge_intervals():
    exits = [1, 2, 3, 4, 5]
    assert self_distill_teachers(exits, "fixed_interval", 1) == self_distill_teachers(exits, "cascade")
    assert self_distill_teachers(exits, "fixed_interval", 2) == {4: 5, 3: 5, 2: 3, 1: 3}
    assert self_distill_teachers(exits, "fixed_interval", 100) == self_distill_teachers(exits, "final_layer")


def test_single_exit_has_no_self_teacher():
    for method in ("teacher", "final_layer", "cascade", "fixed_interval"):
        assert self_distill_teachers([32], method) == {}


def test_unknown_method_and_bad_interval_raise():
    with pytest.raises(ValueError, match="self-distillation method"):
        self_distill_teachers(EXITS, "fix_layer")
    with pytest.raises(ValueError, match="interval"):
        self_distill_teachers(EXITS, "fixed_interval", 0)
    with pytest.raises(ValueError, match="interval"):
        self_distill_teachers(EXITS, "fixed_interval", -3)


# ---------------------------------------------------------------- the loss, by hand

S1 = [[2.0, 0.5, -1.0], [0.0, 1.0, 0.3]]
S2 = [[1.0, -0.5, 0.2], [0.7, 0.1, -2.0]]
S3 = [[3.0, 0.0, 1.0], [-1.0, 0.5, 2.0]]
T_DATA = [[4.0, 1.0, 0.0], [2.0, 2.0, -1.0]]


def _scores():
    return {l: torch.tensor(s, requires_grad=True) for l, s in ((1, S1), (2, S2), (3, S3))}


def _ce(s):
    return -torch.log_softmax(s, -1)[:, 0].mean()


def _kd(t, s, T=1.0):
    return -(torch.softmax(t / T, -1) * torch.log_softmax(s / T, -1)).sum(-1).mean()


def test_ce_and_kd_helpers_match_hand_values():
    s = torch.tensor([[0.0, 0.0]])
    assert listwise_ce(s).item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)
    t = torch.tensor([[0.0, 0.0]])
    assert distillation(t, s).item() == pytest.approx(0.6931472, abs=1e-6)
    # A sharp teacher on column 1 vs scores [ln 3, 0]: -log(1/4) ~= 1.3863
    t = torch.tensor([[-1e4, 0.0]])
    s = torch.tensor([[torch.log(torch.tensor(3.0)).item(), 0.0]])
    assert distillation(t, s).item() == pytest.approx(1.3862944, abs=1e-5)


def test_total_is_the_sum_over_exits_of_ce_plus_weighted_kds():
    scores = _scores()
    teacher = torch.tensor(T_DATA)
    self_teacher = {2: torch.tensor(S2) * 2.0, 3: torch.tensor(S3) + 0.5}
    teachers = {1: 2, 2: 3}
    total, parts = matryoshka_loss(scores, teacher, self_teacher, teachers,
                                   distill_weight=0.3, self_distill_weight=0.7)
    s1, s2, s3 = (torch.tensor(s) for s in (S1, S2, S3))
    ce = _ce(s1) + _ce(s2) + _ce(s3)
    kd = _kd(teacher, s1) + _kd(teacher, s2) + _kd(teacher, s3)
    kd_self = _kd(self_teacher[2], s1) + _kd(self_teacher[3], s2)      # the top exit has no self teacher
    assert parts["ce"].item() == pytest.approx(ce.item(), abs=1e-5)
    assert parts["distill"].item() == pytest.approx(kd.item(), abs=1e-5)
    assert parts["self_distill"].item() == pytest.approx(kd_self.item(), abs=1e-5)
    assert total.item() == pytest.approx((ce + 0.3 * kd + 0.7 * kd_self).item(), abs=1e-5)
    assert total.dtype == torch.float32
    # Sanity on magnitudes: the hand values are not trivially zero.
    assert ce.item() > 1 and kd.item() > 1 and kd_self.item() > 1


def test_nan_teacher_rows_are_skipped_by_the_data_kd():
    scores = _scores()
    teacher = torch.tensor([T_DATA[0], [float("nan"), 1.0, 0.0]])
    total, parts = matryoshka_loss(scores, teacher, distill_weight=1.0)
    expected = sum(_kd(teacher[:1], torch.tensor(s)[:1]) for s in (S1, S2, S3))
    assert torch.isfinite(total)
    assert parts["distill"].item() == pytest.approx(expected.item(), abs=1e-5)
    ce = sum(_ce(torch.tensor(s)) for s in (S1, S2, S3))
    assert total.item() == pytest.approx((ce + expected).item(), abs=1e-5)
    # All rows unknown: no data KD at all, and nothing NaN.
    total, parts = matryoshka_loss(_scores(), torch.full((2, 3), float("nan")))
    assert parts["distill"].item() == 0.0
    assert total.item() == pytest.approx(ce.item(), abs=1e-5)


def test_temperature_applies_to_the_data_kd():
    scores = _scores()
    teacher = torch.tensor(T_DATA)
    _, parts = matryoshka_loss(scores, teacher, temperature=2.0)
    expected = sum(_kd(teacher, torch.tensor(s), 2.0) for s in (S1, S2, S3))
    assert parts["distill"].item() == pytest.approx(expected.item(), abs=1e-5)
    assert abs(expected.item() - sum(_kd(teacher, torch.tensor(s)) for s in (S1, S2, S3)).item()) > 1e-2


def test_gradients_reach_the_students_and_not_the_self_teacher():
    scores = _scores()
    teacher_leaf = torch.tensor(S3, requires_grad=True)
    self_teacher = {3: teacher_leaf * 1.0}                 # a non-leaf view that still tracks grad
    total, _ = matryoshka_loss(scores, None, self_teacher, {1: 3, 2: 3})
    total.backward()
    assert teacher_leaf.grad is None
    # Student grads equal the hand loss's grads.
    ref = {l: torch.tensor(s, requires_grad=True) for l, s in ((1, S1), (2, S2), (3, S3))}
    t3 = torch.tensor(S3)
    hand = sum(_ce(s) for s in ref.values()) + _kd(t3, ref[1]) + _kd(t3, ref[2])
    hand.backward()
    for l in (1, 2, 3):
        torch.testing.assert_close(scores[l].grad, ref[l].grad, atol=1e-6, rtol=0)


def test_no_gradient_reaches_the_data_teacher_scores():
    # SPEC 7: teacher scores are targets. A data-teacher tensor that happens to track gradients (e.g. the
    # same model's uncompressed scores) must not be trained by the KD term.
    scores = _scores()
    teacher = torch.tensor(T_DATA, requires_grad=True)
    total, _ = matryoshka_loss(scores, teacher)
    total.backward()
    assert teacher.grad is None or not teacher.grad.abs().any(), (
        "gradient reached teacher_scores through losses.distillation: "
        f"grad={teacher.grad}; the data teacher must be detached like the self teacher")


def test_zero_weights_remove_their_parts():
    teacher = torch.tensor(T_DATA)
    self_teacher = {3: torch.tensor(S3) + 1.0}
    ce = sum(_ce(torch.tensor(s)) for s in (S1, S2, S3))
    kd_self = _kd(self_teacher[3], torch.tensor(S1)) + _kd(self_teacher[3], torch.tensor(S2))
    kd = sum(_kd(teacher, torch.tensor(s)) for s in (S1, S2, S3))

    total, parts = matryoshka_loss(_scores(), teacher, self_teacher, {1: 3, 2: 3},
                                   distill_weight=0.0, self_distill_weight=1.0)
    assert total.item() == pytest.approx((ce + kd_self).item(), abs=1e-5)

    total, parts = matryoshka_loss(_scores(), teacher, self_teacher, {1: 3, 2: 3},
                                   distill_weight=1.0, self_distill_weight=0.0)
    assert total.item() == pytest.approx((ce + kd).item(), abs=1e-5)

    total, parts = matryoshka_loss(_scores(), teacher, self_teacher, {1: 3, 2: 3},
                                   distill_weight=0.0, self_distill_weight=0.0)
    assert total.item() == pytest.approx(ce.item(), abs=1e-5)
    # Gradients of the CE-only loss match plain CE.
    scores = _scores()
    total, _ = matryoshka_loss(scores, teacher, self_teacher, {1: 3, 2: 3}, 0.0, 0.0)
    total.backward()
    ref = torch.tensor(S1, requires_grad=True)
    _ce(ref).backward()
    torch.testing.assert_close(scores[1].grad, ref.grad, atol=1e-6, rtol=0)


def test_no_teachers_at_all_is_plain_summed_ce():
    total, parts = matryoshka_loss(_scores())
    ce = sum(_ce(torch.tensor(s)) for s in (S1, S2, S3))
    assert total.item() == pytest.approx(ce.item(), abs=1e-5)
    assert parts["distill"].item() == 0.0 and parts["self_distill"].item() == 0.0
    # teachers given but no self_teacher scores (method "teacher"): no self part.
    total, parts = matryoshka_loss(_scores(), None, None, {1: 3})
    assert parts["self_distill"].item() == 0.0


def test_bf16_scores_are_computed_in_fp32():
    scores = {l: torch.tensor(s, dtype=torch.bfloat16) for l, s in ((1, S1), (3, S3))}
    total, parts = matryoshka_loss(scores, torch.tensor(T_DATA))
    assert total.dtype == torch.float32
    ce = _ce(torch.tensor(S1, dtype=torch.bfloat16).float()) + _ce(torch.tensor(S3, dtype=torch.bfloat16).float())
    assert parts["ce"].item() == pytest.approx(ce.item(), abs=1e-5)
