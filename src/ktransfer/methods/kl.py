"""KL distillation and the paper's data-partitioned variant (KL-Dist + DP).

KL-Dist:   T² · KL(σ(z_t/T) ‖ σ(z_s/T)), mean over the batch.
KL + DP:   the target of each sample is the teacher's distribution where the teacher is more
           confident than the original (frozen) student, else the original student's own; the
           masks use T = 1 and ties go to the original student. Computed for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Hyperparameters, LossOutput, Method, StepInputs, hparam, register_method

ROUTINGS = ("confidence", "teacher_on_positive_flips", "student_on_negative_flips", "self")


def kl_to_target(target_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(σ(target/T) ‖ σ(student/T)), averaged over the batch."""
    target_log_probs = F.log_softmax(target_logits / temperature, dim=-1)
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(student_log_probs, target_log_probs, reduction="batchmean", log_target=True) * temperature**2


def route(original_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None, routing: str = "confidence") -> torch.Tensor:
    """Which model each sample learns from: 0 for the original student, k for teacher k (1-based).

    ``teacher_logits`` is ``[K, B, C]``. ``confidence`` (the paper's DP): the most confident of
    the original student and the K teachers, by the probability of the true class (supervised,
    ``labels`` given) or the maximum probability (``labels=None``); ties go to the original
    student, then to the earlier teacher. The other routings are the paper's ablations and need
    labels and one teacher.
    """
    candidates = torch.cat([original_logits.unsqueeze(0), teacher_logits], dim=0)  # [K+1, B, C]
    if routing == "self":
        return torch.zeros(original_logits.shape[0], dtype=torch.long, device=original_logits.device)
    if routing == "confidence":
        probs = candidates.softmax(dim=-1)
        if labels is None:
            confidence = probs.amax(dim=-1)  # [K+1, B]
        else:
            confidence = probs.gather(-1, labels.view(1, -1, 1).expand(len(candidates), -1, 1)).squeeze(-1)
        # argmax returns the first maximum: ties go to index 0, the original student.
        return confidence.argmax(dim=0)
    if labels is None:
        raise ValueError(f"routing {routing!r} needs labels")
    if teacher_logits.shape[0] != 1:
        raise ValueError(f"routing {routing!r} takes exactly one teacher")
    original_right = original_logits.argmax(-1) == labels
    teacher_right = teacher_logits[0].argmax(-1) == labels
    if routing == "teacher_on_positive_flips":
        return (teacher_right & ~original_right).long()
    if routing == "student_on_negative_flips":
        return (~(original_right & ~teacher_right)).long()
    raise ValueError(f"unknown routing {routing!r}; choose one of {', '.join(ROUTINGS)}")


def select(candidates: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """Per sample, the logits of the chosen candidate: ``candidates[choice[b], b]``."""
    return candidates[choice, torch.arange(candidates.shape[1], device=candidates.device)]


@dataclass
class KLParams(Hyperparameters):
    temperature: float = hparam(1.0, "softmax temperature T of both distributions", 1e-3, 100.0)


@register_method
class KLDist(Method):
    name = "kl"
    summary = "KL distillation from the teacher (overwrites the student's own knowledge)"
    Params = KLParams

    def loss(self, inputs: StepInputs) -> LossOutput:
        return LossOutput(kl_to_target(inputs.teacher_logits[0], inputs.student_logits, self.params.temperature), {"teacher_share": 1.0})


@dataclass
class KLDPParams(Hyperparameters):
    temperature: float = hparam(1.0, "temperature T of the distillation loss (the masks always use T = 1)", 1e-3, 100.0)
    supervised: bool = hparam(True, "route by the probability of the true class (true) or by the maximum probability, without labels (false)")
    routing: str = hparam("confidence", "confidence: the paper's DP; teacher_on_positive_flips, student_on_negative_flips, self: ablations", choices=ROUTINGS)


@register_method
class KLDistDP(Method):
    name = "kl_dp"
    summary = "KL distillation with data partitioning: learn from the teacher only where it is more confident than the original student (the paper's method)"
    Params = KLDPParams
    needs_original = True
    supports_multiple_teachers = True

    def loss(self, inputs: StepInputs) -> LossOutput:
        labels = inputs.labels if self.params.supervised else None
        if self.params.routing != "confidence" and labels is None:
            labels = inputs.labels  # the ablations are defined on correctness, which needs labels
        choice = route(inputs.original_logits, inputs.teacher_logits, labels, self.params.routing)
        candidates = torch.cat([inputs.original_logits.unsqueeze(0), inputs.teacher_logits], dim=0)
        target = select(candidates, choice)
        stats = {"teacher_share": float((choice > 0).float().mean())}
        if inputs.teacher_logits.shape[0] > 1:
            counts = torch.bincount(choice, minlength=len(candidates)).tolist()
            stats.update({f"share_{k}": c / len(choice) for k, c in enumerate(counts)})
        return LossOutput(kl_to_target(target, inputs.student_logits, self.params.temperature), stats)
