"""KL family: top-k KL, soft-target CE and XE-KL, against dense references and hand-computed cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from ktransfer.errors import ConfigError
from ktransfer.methods import create_method
from ktransfer.methods.base import StepInputs
from ktransfer.methods.kl import kl_per_sample, kl_to_target
from ktransfer.methods.kl_family import soft_cross_entropy, xe_kl_loss


def dense_top_k_kl(teacher, student, temperature, k):
    """Reference: full softmaxes, zero outside the teacher's top k by an explicit mask, renormalised, KL summed over classes."""
    p = F.softmax(teacher / temperature, -1)
    q = F.softmax(student / temperature, -1)
    mask = torch.zeros_like(p)
    for row in range(p.shape[0]):
        order = sorted(range(p.shape[1]), key=lambda c: -float(p[row, c]))
        for c in order[:k]:
            mask[row, c] = 1.0
    p_k = p * mask / (p * mask).sum(-1, keepdim=True)
    q_k = q * mask / (q * mask).sum(-1, keepdim=True)
    terms = torch.where(mask > 0, p_k * (torch.log(p_k.clamp_min(1e-30)) - torch.log(q_k.clamp_min(1e-30))), torch.zeros_like(p_k))
    return terms.sum(-1).mean() * temperature**2


@pytest.mark.parametrize("temperature,k", [(1.0, 3), (2.0, 1), (0.5, 5)])
def test_top_k_value_and_gradient_match_dense_reference(temperature, k):
    torch.manual_seed(0)
    teacher = torch.randn(5, 8) * 2
    student = torch.randn(5, 8, requires_grad=True)
    student_ref = student.detach().clone().requires_grad_(True)
    ours = kl_to_target(teacher, student, temperature, top_k=k)
    reference = dense_top_k_kl(teacher, student_ref, temperature, k)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-7)
    ours.backward()
    reference.backward()
    assert torch.allclose(student.grad, student_ref.grad, atol=1e-6)
    # classes outside the teacher's top k get no gradient at all
    outside = torch.ones_like(teacher, dtype=torch.bool).scatter_(1, teacher.topk(k, -1).indices, False)
    assert torch.all(student.grad[outside] == 0)


def test_top_k_hand_computed_and_all_classes():
    teacher = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    student = torch.log(torch.tensor([[0.2, 0.2, 0.6]]))
    # top 2 of the teacher: classes 0 and 1; renormalised p = (0.625, 0.375), q = (0.5, 0.5)
    expected = 0.625 * math.log(0.625 / 0.5) + 0.375 * math.log(0.375 / 0.5)
    assert kl_to_target(teacher, student, 1.0, top_k=2).item() == pytest.approx(expected, rel=1e-5)
    full = kl_to_target(teacher, student, 1.0)
    for k in (0, 3, 50):  # 0 and k >= C mean all classes
        assert kl_to_target(teacher, student, 1.0, top_k=k).item() == pytest.approx(full.item(), rel=1e-6)
    assert kl_per_sample(teacher, student, 1.0, 2).shape == (1,)


def test_top_k_is_zero_when_student_matches_teacher_on_those_classes_only():
    teacher = torch.tensor([[4.0, 3.0, 0.0, -1.0]])
    student = torch.tensor([[5.0, 4.0, 9.0, 9.0]])  # same top-2 logits up to a shift; the tail disagrees wildly
    assert kl_to_target(teacher, student, 1.0, top_k=2).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_to_target(teacher, student, 1.0).item() > 1.0


@pytest.mark.parametrize("k", [0, 3])
def test_kl_family_non_negative_and_minimal_at_the_teacher(k):
    torch.manual_seed(1)
    teacher, student = torch.randn(64, 10) * 3, torch.randn(64, 10) * 3
    labels = torch.randint(0, 10, (64,))
    assert kl_per_sample(teacher, student, 2.0, k).min().item() >= -1e-6
    entropy_gap = soft_cross_entropy(teacher, student, 2.0, k) - kl_to_target(teacher, student, 2.0, k)
    assert entropy_gap.item() >= -1e-6
    # at student = teacher: KL is 0 and soft CE sits at its minimum, the teacher's entropy (gradient zero)
    at_teacher = teacher.clone().requires_grad_(True)
    loss = soft_cross_entropy(teacher, at_teacher, 2.0, k)
    loss.backward()
    assert at_teacher.grad.abs().max().item() < 1e-6
    assert kl_to_target(teacher, teacher.clone(), 2.0, k).item() == pytest.approx(0.0, abs=1e-6)
    assert xe_kl_loss(teacher, student, labels, 1.0, 2.0, k).item() == pytest.approx(kl_to_target(teacher, student, 2.0, k).item(), rel=1e-6)


def test_soft_ce_is_kl_plus_teacher_entropy_hand_computed():
    teacher = torch.log(torch.tensor([[0.5, 0.5]]))
    student = torch.log(torch.tensor([[0.25, 0.75]]))
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert soft_cross_entropy(teacher, student, 1.0).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(kl_to_target(teacher, student, 1.0).item() + math.log(2), rel=1e-6)
    # T = 2: T² times the cross-entropy of the softened distributions
    p, q = F.softmax(teacher / 2, -1), F.log_softmax(student / 2, -1)
    assert soft_cross_entropy(teacher, student, 2.0).item() == pytest.approx(-4 * float((p * q).sum()), rel=1e-6)


def test_xe_kl_hand_computed_cross_entropy_on_logits():
    teacher = torch.log(torch.tensor([[0.5, 0.5]]))
    student = torch.log(torch.tensor([[0.25, 0.75]]))
    labels = torch.tensor([0])
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    ce = -math.log(0.25)  # on the logits: no second softmax
    method = create_method("xe_kl", weight=0.25)
    out = method.loss(StepInputs(student, labels, teacher[None]))
    assert out.loss.item() == pytest.approx(0.25 * kl + 0.75 * ce, rel=1e-6)
    assert xe_kl_loss(teacher, student, labels, 0.0, 1.0).item() == pytest.approx(ce, rel=1e-6)


def test_methods_of_the_family_use_their_options():
    torch.manual_seed(2)
    student, teacher, labels = torch.randn(4, 6), torch.randn(1, 4, 6), torch.randint(0, 6, (4,))
    inputs = StepInputs(student, labels, teacher)
    assert create_method("kl", top_k=2).loss(inputs).loss.item() == pytest.approx(kl_to_target(teacher[0], student, 1.0, 2).item())
    assert create_method("soft_ce", temperature=3.0, top_k=4).loss(inputs).loss.item() == pytest.approx(soft_cross_entropy(teacher[0], student, 3.0, 4).item())
    xe = create_method("xe_kl", weight="0.1", temperature="4", top_k="3")  # strings, as from --param
    assert (xe.params.weight, xe.params.temperature, xe.params.top_k) == (0.1, 4.0, 3)
    assert xe.loss(inputs).loss.item() == pytest.approx(xe_kl_loss(teacher[0], student, labels, 0.1, 4.0, 3).item())


def test_bad_values_get_clear_errors():
    with pytest.raises(ConfigError, match="weight=1.5 is above its maximum 1.0"):
        create_method("xe_kl", weight=1.5)
    with pytest.raises(ConfigError, match="top_k=-1 is below its minimum 0"):
        create_method("kl", top_k=-1)
    with pytest.raises(ConfigError, match="top_k='ten' is not a valid int"):
        create_method("soft_ce", top_k="ten")


def test_unsupervised_dp_preset_equals_kl_dp_without_labels():
    torch.manual_seed(3)
    inputs = StepInputs(torch.randn(8, 5), torch.randint(0, 5, (8,)), torch.randn(1, 8, 5), torch.randn(8, 5))
    preset = create_method("kl_dp_unsup")
    assert preset.params.supervised is False
    switched = create_method("kl_dp", supervised=False)
    assert preset.loss(inputs).loss.item() == pytest.approx(switched.loss(inputs).loss.item())
    assert preset.loss(inputs).stats == switched.loss(inputs).stats
