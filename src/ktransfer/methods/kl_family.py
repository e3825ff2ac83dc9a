"""Variants of KL distillation that still overwrite the student: XE-KL-Dist and soft-target CE.

XE-KL-Dist:     λ · T² · KL(σ(z_t/T) ‖ σ(z_s/T)) + (1 − λ) · CE(z_s, y), with the cross-entropy
                on the logits (the authors' code applied it to softmax outputs, a double softmax).
soft-target CE: T² · H(σ(z_t/T), σ(z_s/T)) = T² · (−Σ_c p_t log p_s), which is the KL term plus
                the teacher's entropy: same gradients in z_s at a fixed teacher, but a minimum of
                T²·H(p_t) instead of 0 (appendix B.1 found it 1.2 points worse on average).

Both take ``top_k`` like ``kl``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Hyperparameters, LossOutput, Method, StepInputs, hparam, register_method
from .kl import TOP_K_HELP, KLParams, kl_to_target, restrict_to_top_k


def soft_cross_entropy(target_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float, top_k: int = 0) -> torch.Tensor:
    """T² · H(σ(target/T), σ(student/T)), averaged over the batch."""
    target_logits, student_logits = restrict_to_top_k(target_logits, student_logits, top_k)
    target_probs = F.softmax(target_logits / temperature, dim=-1)
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    return -(target_probs * student_log_probs).sum(-1).mean() * temperature**2


def xe_kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor, weight: float, temperature: float, top_k: int = 0) -> torch.Tensor:
    """λ · KL-Dist + (1 − λ) · CE(z_s, y), both means over the batch."""
    distillation = kl_to_target(teacher_logits, student_logits, temperature, top_k)
    return weight * distillation + (1.0 - weight) * F.cross_entropy(student_logits, labels)


@dataclass
class XEKLParams(Hyperparameters):
    weight: float = hparam(0.5, "λ, the weight of the distillation term; 1 − λ weighs the cross-entropy on labels (paper's grid 0.05-0.5: larger for stronger teachers)", 0.0, 1.0)
    temperature: float = hparam(1.0, "softmax temperature T of the distillation term (paper's grid 0.1, 1, 4, 10)", 1e-3, 100.0)
    top_k: int = hparam(0, TOP_K_HELP, 0, 1_000_000)


@register_method
class XEKLDist(Method):
    name = "xe_kl"
    summary = "KL distillation plus cross-entropy on the labels, λ·KL + (1−λ)·CE (overwrites less than kl)"
    Params = XEKLParams

    def loss(self, inputs: StepInputs) -> LossOutput:
        p = self.params
        return LossOutput(xe_kl_loss(inputs.teacher_logits[0], inputs.student_logits, inputs.labels, p.weight, p.temperature, p.top_k), {"teacher_share": 1.0})


@register_method
class SoftTargetCE(Method):
    name = "soft_ce"
    summary = "cross-entropy to the teacher's soft targets in place of KL (the paper's appendix B.1 variant)"
    Params = KLParams  # the same knobs as kl

    def loss(self, inputs: StepInputs) -> LossOutput:
        p = self.params
        return LossOutput(soft_cross_entropy(inputs.teacher_logits[0], inputs.student_logits, p.temperature, p.top_k), {"teacher_share": 1.0})
