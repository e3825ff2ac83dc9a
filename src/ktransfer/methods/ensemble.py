"""Distillation toward the student–teacher ensemble, and KL+DP with soft routing (beyond the paper).

On data that both models have fitted, each frozen model's distribution is close to one-hot on the
label, so KL+DP's hard switch between the original student and the teacher hands the student
little it does not already have. The ensemble of the two (the mean of their probabilities) is, on
held-out data, the ceiling a transfer can hope for (``ensemble_acc`` in every record); these
methods aim the student at it.

KL-Ens:      target p = (1 − w)·σ(z_st/T) + (w/K)·Σ_k σ(z_tk/T), the original student and the K
             teachers mixed in probability space at temperature T; loss T²·KL(p ‖ σ(z_s/T)).
             w = 0 is the ``self`` control (distillation toward the original student alone),
             w = 1 is plain KL from the teacher (from the teachers' mean, for several).
KL+DP soft:  the target mixes every frozen model with weights that grow with its confidence in
             the label, c_k = σ(z_k)[y] at T = 1 (max probability without labels), as
             c_k^γ / Σ_j c_j^γ; the mixture is of σ(z_k/T). γ = 0 is the equal-weight ensemble;
             as γ grows it approaches KL+DP's hard switch (γ → ∞ is KL+DP exactly, ties aside).

Both targets depend only on the frozen models and the labels, so with cached targets they are
computed once over the transfer set (:meth:`Method.fixed_targets`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Hyperparameters, LossOutput, Method, StepInputs, chunked_targets, hparam, register_method

def mixture_log_probs(candidate_logits: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """log Σ_k weights[k, b] · σ(candidate_logits[k, b] / T), ``[B, C]``, computed in log space.

    ``candidate_logits`` is ``[K, B, C]``; ``weights`` is ``[K, B]`` (or ``[K, 1]``), non-negative,
    summing to 1 over k. A zero weight drops its model exactly.
    """
    log_probs = F.log_softmax(candidate_logits.float() / temperature, dim=-1)
    log_weights = torch.log(weights.float()).unsqueeze(-1)  # log 0 = -inf: that model adds nothing
    return torch.logsumexp(log_weights + log_probs, dim=0)


def kl_from_log_target(target_log_probs: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(target ‖ σ(student/T)), averaged over the batch."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(student_log_probs, target_log_probs, reduction="batchmean", log_target=True) * temperature**2


def confidences(candidate_logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Each model's probability of the true class at T = 1 (its maximum probability when ``labels`` is None), ``[K, B]``."""
    probs = candidate_logits.float().softmax(dim=-1)
    if labels is None:
        return probs.amax(dim=-1)
    return probs.gather(-1, labels.view(1, -1, 1).expand(len(candidate_logits), -1, 1)).squeeze(-1)


def confidence_weights(confidence: torch.Tensor, sharpness: float) -> torch.Tensor:
    """Weights c_k^γ / Σ_j c_j^γ over the models (dim 0), computed as a softmax of γ·log c.

    γ = 0 gives equal weights. A model with c = 0 gets weight 0 for γ > 0; if every model has
    c = 0 the weights are equal (the softmax of equal -inf·γ is undefined, so they are clamped).
    """
    log_confidence = torch.log(confidence.clamp(min=torch.finfo(torch.float32).tiny))
    return torch.softmax(sharpness * log_confidence, dim=0)


@dataclass
class EnsembleParams(Hyperparameters):
    teacher_weight: float = hparam(0.5, "w: the teachers' share of the target (split equally among several); 1 − w is the original student's (0: the self control, 1: plain kl)", 0.0, 1.0)
    temperature: float = hparam(1.0, "softmax temperature T of each model's distribution and of the loss", 1e-3, 100.0)


@register_method
class KLEnsemble(Method):
    name = "kl_ens"
    summary = "KL distillation toward the ensemble of the original student and the teacher (mean of their probabilities): keeps the student and adds what the teacher knows"
    Params = EnsembleParams
    needs_original = True
    supports_multiple_teachers = True

    def targets(self, original_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        teachers = teacher_logits.shape[0]
        w = self.params.teacher_weight
        weights = torch.tensor([1.0 - w] + [w / teachers] * teachers, device=original_logits.device).unsqueeze(1)
        candidates = torch.cat([original_logits.unsqueeze(0), teacher_logits], dim=0)
        return {"target_log_probs": mixture_log_probs(candidates, weights, self.params.temperature)}

    def fixed_targets(self, teacher_logits, original_logits, labels):
        return chunked_targets(self.targets, teacher_logits, original_logits, labels)

    def loss(self, inputs: StepInputs) -> LossOutput:
        fixed = inputs.fixed or self.targets(inputs.original_logits, inputs.teacher_logits)
        loss = kl_from_log_target(fixed["target_log_probs"], inputs.student_logits, self.params.temperature)
        return LossOutput(loss, {"teacher_share": self.params.teacher_weight})


@dataclass
class SoftDPParams(Hyperparameters):
    sharpness: float = hparam(4.0, "γ: each model's weight in the target is c^γ / Σ c^γ, c its probability of the label (0: the equal ensemble; large: KL+DP's hard switch)", 0.0, 1000.0)
    temperature: float = hparam(1.0, "softmax temperature T of the mixed distributions and of the loss (the weights always use T = 1)", 1e-3, 100.0)
    supervised: bool = hparam(True, "weigh by the probability of the true class (true) or by the maximum probability, without labels (false)")


@register_method
class KLDistSoftDP(Method):
    name = "kl_dp_soft"
    summary = "KL+DP with soft routing: the target mixes the original student and the teacher, each weighted by its confidence in the label (between the ensemble and KL+DP's hard switch)"
    Params = SoftDPParams
    needs_original = True
    supports_multiple_teachers = True

    def targets(self, original_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        candidates = torch.cat([original_logits.unsqueeze(0), teacher_logits], dim=0)
        weights = confidence_weights(confidences(candidates, labels if self.params.supervised else None), self.params.sharpness)
        return {"target_log_probs": mixture_log_probs(candidates, weights, self.params.temperature), "teacher_weight": 1.0 - weights[0]}

    def fixed_targets(self, teacher_logits, original_logits, labels):
        return chunked_targets(self.targets, teacher_logits, original_logits, labels)

    def loss(self, inputs: StepInputs) -> LossOutput:
        fixed = inputs.fixed or self.targets(inputs.original_logits, inputs.teacher_logits, inputs.labels)
        loss = kl_from_log_target(fixed["target_log_probs"], inputs.student_logits, self.params.temperature)
        # Tensors, not floats: the engine sums them on the device and reads them once per epoch.
        return LossOutput(loss, {"teacher_share": fixed["teacher_weight"].mean()})
