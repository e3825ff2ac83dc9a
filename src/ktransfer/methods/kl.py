"""KL distillation and the paper's data-partitioned variant (KL-Dist + DP).

KL-Dist:   T² · KL(σ(z_t/T) ‖ σ(z_s/T)), mean over the batch.
KL + DP:   the target of each sample is the teacher's distribution where the teacher is more
           confident than the original (frozen) student, else the original student's own; the
           masks use T = 1 and ties go to the original student. Computed for the whole batch.
           The flip ablations choose between the same two targets by prediction flips, which
           the authors decide from the student being trained, at each step (``flips_from``).
Margin DP: the same switch by each model's margin, p(y) − max_{c≠y} p(c) at T = 1 (without labels:
           the largest probability minus the second), so a model whose probability of the label
           is high but whose next class is close counts as less sure (beyond the paper).
Top-k:     with ``top_k = k > 0`` both distributions are taken over only the target's k most
           probable classes and renormalised over them (a softmax over those k logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Hyperparameters, LossOutput, Method, StepInputs, chunked_targets, hparam, register_method

ROUTINGS = ("confidence", "margin", "teacher_on_positive_flips", "student_on_negative_flips", "self")
FLIP_ROUTINGS = ("teacher_on_positive_flips", "student_on_negative_flips")
FLIPS_FROM = ("current", "original")


def restrict_to_top_k(target_logits: torch.Tensor, student_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logits gathered at the target's ``top_k`` largest classes, ``[B, k]`` each (0 or k ≥ C: all classes).

    A softmax over the gathered logits equals the full softmax renormalised over those classes,
    whatever the temperature, so callers just apply their softmax to the result.
    """
    if top_k <= 0 or top_k >= target_logits.shape[-1]:
        return target_logits, student_logits
    classes = target_logits.topk(top_k, dim=-1).indices
    return target_logits.gather(-1, classes), student_logits.gather(-1, classes)


def kl_per_sample(target_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float, top_k: int = 0) -> torch.Tensor:
    """T² · KL(σ(target/T) ‖ σ(student/T)) of each sample, ``[B]``."""
    target_logits, student_logits = restrict_to_top_k(target_logits, student_logits, top_k)
    target_log_probs = F.log_softmax(target_logits / temperature, dim=-1)
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    return (target_log_probs.exp() * (target_log_probs - student_log_probs)).sum(-1) * temperature**2


def kl_to_target(target_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float, top_k: int = 0) -> torch.Tensor:
    """T² · KL(σ(target/T) ‖ σ(student/T)), averaged over the batch."""
    if top_k:
        return kl_per_sample(target_logits, student_logits, temperature, top_k).mean()
    target_log_probs = F.log_softmax(target_logits / temperature, dim=-1)
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(student_log_probs, target_log_probs, reduction="batchmean", log_target=True) * temperature**2


def route(original_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None, routing: str = "confidence", flips_logits: torch.Tensor | None = None, confidence: torch.Tensor | None = None) -> torch.Tensor:
    """Which model each sample learns from: 0 for the original student, k for teacher k (1-based).

    ``teacher_logits`` is ``[K, B, C]``. ``confidence`` (the paper's DP): the most confident of
    the original student and the K teachers, by the probability of the true class (supervised,
    ``labels`` given) or the maximum probability (``labels=None``); ties go to the original
    student, then to the earlier teacher. The other routings are the paper's ablations and need
    labels and one teacher; their flips compare the teacher with ``flips_logits``, the student
    whose predictions decide them (default: the original student). ``confidence`` (``[K+1, B, 2]``:
    probability of the true class, maximum probability) replaces the ones the logits would give,
    for logits stored rounded (see ``StepInputs.routing_confidence``). ``margin``: the same choice
    by :func:`margins` (``confidence`` does not apply; a view cache's rounded logits are refused
    before training, in ``ktransfer.transfer_checks.view_storage``).
    """
    candidates = torch.cat([original_logits.unsqueeze(0), teacher_logits], dim=0)  # [K+1, B, C]
    if routing == "self":
        return torch.zeros(original_logits.shape[0], dtype=torch.long, device=original_logits.device)
    if routing == "margin":
        return margins(candidates, labels).argmax(dim=0)  # ties: the first, the original student
    if routing == "confidence" and confidence is not None:
        return confidence[..., 0 if labels is not None else 1].argmax(dim=0)  # ties: as below
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
    student_right = (original_logits if flips_logits is None else flips_logits).argmax(-1) == labels
    teacher_right = teacher_logits[0].argmax(-1) == labels
    if routing == "teacher_on_positive_flips":
        return (teacher_right & ~student_right).long()
    if routing == "student_on_negative_flips":
        return (~(student_right & ~teacher_right)).long()
    raise ValueError(f"unknown routing {routing!r}; choose one of {', '.join(ROUTINGS)}")


def margins(candidate_logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Each model's margin at T = 1, ``[K, B]`` from ``[K, B, C]`` logits.

    With labels: the probability of the true class minus the largest other probability (negative
    where the model is wrong). Without: the largest probability minus the second largest.
    """
    probs = candidate_logits.float().softmax(dim=-1)
    if labels is None:
        top = probs.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    index = labels.view(1, -1, 1).expand(len(probs), -1, 1)
    true = probs.gather(-1, index).squeeze(-1)
    others = probs.scatter(-1, index, float("-inf")).amax(dim=-1)
    return true - others


def select(candidates: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """Per sample, the logits of the chosen candidate: ``candidates[choice[b], b]``."""
    return candidates[choice, torch.arange(candidates.shape[1], device=candidates.device)]


TOP_K_HELP = "distil over only the teacher's k most probable classes, both distributions renormalised over them (0: all classes; the paper tried 10 and 100)"


@dataclass
class KLParams(Hyperparameters):
    temperature: float = hparam(1.0, "softmax temperature T of both distributions", 1e-3, 100.0)
    top_k: int = hparam(0, TOP_K_HELP, 0, 1_000_000)


@register_method
class KLDist(Method):
    name = "kl"
    summary = "KL distillation from the teacher (overwrites the student's own knowledge)"
    Params = KLParams

    def fixed_targets(self, teacher_logits, original_logits, labels):
        if self.params.top_k:  # the top-k classes are gathered per step from the student's logits too
            return None
        return {"target_log_probs": F.log_softmax(teacher_logits[0] / self.params.temperature, dim=-1)}

    def loss(self, inputs: StepInputs) -> LossOutput:
        temperature = self.params.temperature
        if inputs.fixed is not None:
            student_log_probs = F.log_softmax(inputs.student_logits / temperature, dim=-1)
            loss = F.kl_div(student_log_probs, inputs.fixed["target_log_probs"], reduction="batchmean", log_target=True) * temperature**2
        else:
            loss = kl_to_target(inputs.teacher_logits[0], inputs.student_logits, temperature, self.params.top_k)
        return LossOutput(loss, {"teacher_share": 1.0})


@dataclass
class KLDPParams(Hyperparameters):
    temperature: float = hparam(1.0, "temperature T of the distillation loss (the masks always use T = 1)", 1e-3, 100.0)
    supervised: bool = hparam(True, "route by the probability of the true class (true) or by the maximum probability, without labels (false)")
    routing: str = hparam("confidence", "confidence: the paper's DP; margin: by p(y) minus the largest other probability (beyond the paper, kl_dp_margin); teacher_on_positive_flips, student_on_negative_flips, self: ablations", choices=ROUTINGS)
    flips_from: str = hparam("current", "for the flip ablations, whose predictions decide the flips: current (the student being trained, each step, as the authors do) or original (the frozen student); targets stay the original student's and the teacher's", choices=FLIPS_FROM)


@register_method
class KLDistDP(Method):
    name = "kl_dp"
    summary = "KL distillation with data partitioning: learn from the teacher only where it is more confident than the original student (the paper's method)"
    Params = KLDPParams
    needs_original = True
    supports_multiple_teachers = True

    @property
    def flips_from_current_student(self) -> bool:
        """Whether the routing reads the student being trained, so that it changes from step to step."""
        return self.params.routing in FLIP_ROUTINGS and self.params.flips_from == "current"

    def targets(self, original_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, student_logits: torch.Tensor | None = None, confidence: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The routing ``choice`` of each sample and its target log-probabilities at temperature T.

        ``student_logits`` (the student being trained) decide the flips of the flip ablations when
        ``flips_from`` is ``current``; the targets themselves stay the frozen models' outputs.
        """
        routing_labels = labels if self.params.supervised or self.params.routing not in ("confidence", "margin") else None  # ablations need labels
        flips_logits = student_logits.detach() if self.flips_from_current_student else None
        choice = route(original_logits, teacher_logits, routing_labels, self.params.routing, flips_logits, confidence)
        candidates = torch.cat([original_logits.unsqueeze(0), teacher_logits], dim=0)
        target_log_probs = F.log_softmax(select(candidates, choice) / self.params.temperature, dim=-1)
        return {"choice": choice, "target_log_probs": target_log_probs}

    def fixed_targets(self, teacher_logits, original_logits, labels):
        if self.flips_from_current_student:  # the routing follows the student being trained: decided every step
            return None
        # Frozen models and fixed labels: the routing never changes, so compute it once, in chunks.
        return chunked_targets(self.targets, teacher_logits, original_logits, labels)

    def loss(self, inputs: StepInputs) -> LossOutput:
        fixed = inputs.fixed or self.targets(inputs.original_logits, inputs.teacher_logits, inputs.labels, inputs.student_logits, inputs.routing_confidence)
        choice, temperature = fixed["choice"], self.params.temperature
        student_log_probs = F.log_softmax(inputs.student_logits / temperature, dim=-1)
        loss = F.kl_div(student_log_probs, fixed["target_log_probs"], reduction="batchmean", log_target=True) * temperature**2
        # Tensors, not floats: the engine sums them on the device and reads them once per epoch.
        stats = {"teacher_share": (choice > 0).float().mean()}
        candidates = inputs.teacher_logits.shape[0] + 1 if inputs.teacher_logits is not None else int(choice.max()) + 1
        if candidates > 2:
            shares = torch.bincount(choice, minlength=candidates).float() / len(choice)
            stats.update({f"share_{k}": shares[k] for k in range(candidates)})
        return LossOutput(loss, stats)


@dataclass
class KLDPUnsupervisedParams(KLDPParams):
    supervised: bool = hparam(False, "route by the probability of the true class (true) or by the maximum probability, without labels (false)")


@register_method
class KLDistDPUnsupervised(KLDistDP):
    name = "kl_dp_unsup"
    summary = "kl_dp without labels: learn from the teacher where its maximum probability beats the original student's (same as kl_dp with supervised=false)"
    Params = KLDPUnsupervisedParams


@dataclass
class KLDPMarginParams(KLDPParams):
    supervised: bool = hparam(True, "route by the margin on the true class, p(y) minus the largest other probability (true), or by the largest probability minus the second, without labels (false)")
    routing: str = hparam("margin", "margin: by p(y) minus the largest other probability; confidence: the paper's DP (kl_dp); teacher_on_positive_flips, student_on_negative_flips, self: ablations", choices=ROUTINGS)


@register_method
class KLDistDPMargin(KLDistDP):
    name = "kl_dp_margin"
    summary = "kl_dp routed by margin: learn from the teacher where its margin on the label (p(y) minus the largest other probability) beats the original student's (same as kl_dp with routing=margin)"
    Params = KLDPMarginParams
