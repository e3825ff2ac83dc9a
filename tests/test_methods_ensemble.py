"""kl_ens and kl_dp_soft: hand-computed targets and the identities that tie them to kl, self and kl_dp."""

import math

import pytest
import torch
import torch.nn.functional as F

import ktransfer
from ktransfer.methods import create_method
from ktransfer.methods.base import StepInputs
from ktransfer.methods.ensemble import confidence_weights, mixture_log_probs
from ktransfer.methods.kl import kl_to_target
from ktransfer.models.zoo import MLP


def logits_of(probs):
    return torch.log(torch.tensor(probs))


def test_mixture_hand_computed():
    a, b = logits_of([[0.9, 0.1]]), logits_of([[0.3, 0.7]])
    weights = torch.tensor([[0.25], [0.75]])
    mixed = mixture_log_probs(torch.stack([a, b]), weights, 1.0).exp()
    assert mixed.tolist()[0] == pytest.approx([0.25 * 0.9 + 0.75 * 0.3, 0.25 * 0.1 + 0.75 * 0.7], rel=1e-6)
    # a zero weight drops a model exactly, even one that puts (almost) no mass on a class
    only_b = mixture_log_probs(torch.stack([a, b]), torch.tensor([[0.0], [1.0]]), 1.0)
    assert torch.allclose(only_b, F.log_softmax(b, -1), atol=1e-7)


def test_kl_ens_loss_hand_computed():
    original, teacher = logits_of([[0.8, 0.2]]), logits_of([[0.2, 0.8]])
    student = logits_of([[0.6, 0.4]])
    method = create_method("kl_ens", teacher_weight=0.25)
    target = [0.75 * 0.8 + 0.25 * 0.2, 0.75 * 0.2 + 0.25 * 0.8]  # 0.65, 0.35
    expected = sum(p * math.log(p / q) for p, q in zip(target, [0.6, 0.4]))
    loss = method.loss(StepInputs(student_logits=student, labels=torch.tensor([0]), teacher_logits=teacher[None], original_logits=original)).loss
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_kl_ens_ends_are_self_and_kl():
    torch.manual_seed(0)
    original, teacher, student = torch.randn(6, 5), torch.randn(1, 6, 5), torch.randn(6, 5)
    inputs = StepInputs(student_logits=student, labels=torch.zeros(6, dtype=torch.long), teacher_logits=teacher, original_logits=original)
    for temperature in (1.0, 3.0):
        at_zero = create_method("kl_ens", teacher_weight=0.0, temperature=temperature).loss(inputs).loss
        at_one = create_method("kl_ens", teacher_weight=1.0, temperature=temperature).loss(inputs).loss
        assert at_zero.item() == pytest.approx(kl_to_target(original, student, temperature).item(), rel=1e-5)
        assert at_one.item() == pytest.approx(kl_to_target(teacher[0], student, temperature).item(), rel=1e-5)


def test_kl_ens_splits_the_teacher_weight_among_several_teachers():
    original = logits_of([[0.5, 0.25, 0.25]])
    teachers = torch.stack([logits_of([[0.1, 0.8, 0.1]]), logits_of([[0.1, 0.1, 0.8]])])
    target = create_method("kl_ens", teacher_weight=0.5).targets(original, teachers)["target_log_probs"].exp()
    assert target.tolist()[0] == pytest.approx([0.5 * 0.5 + 0.25 * 0.1 * 2, 0.5 * 0.25 + 0.25 * 0.8 + 0.25 * 0.1, 0.5 * 0.25 + 0.25 * 0.1 + 0.25 * 0.8], rel=1e-6)


def test_confidence_weights_hand_computed_and_limits():
    confidence = torch.tensor([[0.2], [0.6]])
    assert confidence_weights(confidence, 0.0).flatten().tolist() == pytest.approx([0.5, 0.5])
    assert confidence_weights(confidence, 1.0).flatten().tolist() == pytest.approx([0.25, 0.75])
    assert confidence_weights(confidence, 2.0).flatten().tolist() == pytest.approx([0.04 / 0.40, 0.36 / 0.40])
    assert confidence_weights(torch.zeros(2, 1), 3.0).flatten().tolist() == pytest.approx([0.5, 0.5])  # nobody is right: equal


def test_kl_dp_soft_between_the_ensemble_and_kl_dp():
    torch.manual_seed(1)
    original, teacher, student = torch.randn(32, 10) * 3, torch.randn(1, 32, 10) * 3, torch.randn(32, 10)
    labels = torch.randint(0, 10, (32,))
    inputs = StepInputs(student_logits=student, labels=labels, teacher_logits=teacher, original_logits=original)
    equal = create_method("kl_dp_soft", sharpness=0.0).loss(inputs).loss
    ensemble = create_method("kl_ens", teacher_weight=0.5).loss(inputs).loss
    assert equal.item() == pytest.approx(ensemble.item(), rel=1e-5)
    # very sharp weights are KL+DP's hard switch (no exact ties in random logits)
    sharp = create_method("kl_dp_soft", sharpness=1000.0).loss(inputs)
    dp = create_method("kl_dp").loss(inputs)
    assert sharp.loss.item() == pytest.approx(dp.loss.item(), rel=1e-4)
    assert float(sharp.stats["teacher_share"]) == pytest.approx(float(dp.stats["teacher_share"]), abs=1e-6)


def test_precomputed_targets_equal_per_step_targets():
    torch.manual_seed(2)
    original, teachers, labels = torch.randn(40, 10), torch.randn(2, 40, 10), torch.randint(0, 10, (40,))
    student = torch.randn(40, 10)
    for name, params in (("kl_ens", {"teacher_weight": 0.7, "temperature": 2.0}), ("kl_dp_soft", {"sharpness": 2.0, "temperature": 2.0})):
        method = create_method(name, **params)
        fixed = method.fixed_targets(teachers, original, labels)
        rows = torch.arange(10, 30)
        with_fixed = method.loss(StepInputs(student_logits=student[rows], labels=labels[rows], fixed={k: v[rows] for k, v in fixed.items()})).loss
        online = method.loss(StepInputs(student_logits=student[rows], labels=labels[rows], teacher_logits=teachers[:, rows], original_logits=original[rows])).loss
        assert with_fixed.item() == pytest.approx(online.item(), rel=1e-6)


def test_kl_ens_with_weight_zero_trains_like_the_self_control(tiny_data):
    """w = 0 is distillation toward the original student alone: the same run as kl_dp with routing self."""
    transfer_set, eval_set = tiny_data
    torch.manual_seed(0)
    student, teacher = MLP(hidden=32).eval(), MLP(hidden=48).eval()
    ens = ktransfer.transfer(student, teacher, transfer_set, eval_set, method=create_method("kl_ens", teacher_weight=0.0), epochs=1, lr=0.05, batch_size=64)
    self_control = ktransfer.transfer(student, teacher, transfer_set, eval_set, method=create_method("kl_dp", routing="self"), epochs=1, lr=0.05, batch_size=64)
    for a, b in zip(ens.student.state_dict().values(), self_control.student.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
