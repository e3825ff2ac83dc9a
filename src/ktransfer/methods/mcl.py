"""XE-KL-Dist + MCL: distillation with a slow, momentum-averaged copy of the student (after Stojanovski et al., 2022).

The loss is XE-KL-Dist, λ · T² · KL(σ(z_t/T) ‖ σ(z_s/T)) + (1 − λ) · CE(z_s, y), except that a
sample on which the teacher is wrong and the student being trained is right gets no KL term:
the KL is averaged over the kept samples only, as the authors do (0 when none is kept; under
torchrun over the kept samples of the whole global batch, as in one process). After every N-th optimiser step the slow weights move
towards the training weights, θ_slow ← τ·θ_slow + (1 − τ)·θ, for parameters and floating-point
buffers (batch-norm statistics; integer buffers are copied). Evaluation and the returned
student use θ_slow; training continues on θ.

The slow weights live in a module of their own, so evaluating them never touches θ. The
authors' code instead, by accident, continued training from the slow weights after every
evaluation; ``reset_to_slow_each_epoch`` reproduces that on purpose.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Hyperparameters, LossOutput, Method, StepInputs, hparam, register_method
from .kl import TOP_K_HELP, kl_per_sample


def mcl_distillation_mask(teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """True where the sample keeps its KL term: everywhere except teacher wrong and student right."""
    teacher_wrong = teacher_logits.argmax(-1) != labels
    student_right = student_logits.argmax(-1) == labels
    return ~(teacher_wrong & student_right)


def masked_mean(values: torch.Tensor, keep: torch.Tensor, divisor=None) -> torch.Tensor:
    """The mean of ``values`` over the kept samples; 0 (not NaN) when none is kept.

    ``divisor`` (``StepInputs.subset_divisor`` under torchrun) turns this rank's kept count into
    the divisor that makes the mean one over the kept samples of all ranks.
    """
    kept = keep.sum()
    return (values * keep).sum() / (divisor(kept) if divisor is not None else kept.clamp(min=1))


@dataclass
class MCLParams(Hyperparameters):
    weight: float = hparam(0.7, "λ, the weight of the distillation term; 1 − λ weighs the cross-entropy on labels", 0.0, 1.0)
    temperature: float = hparam(1.0, "softmax temperature T of the distillation term", 1e-3, 100.0)
    top_k: int = hparam(0, TOP_K_HELP, 0, 1_000_000)
    slow_momentum: float = hparam(0.9999, "τ in θ_slow ← τ·θ_slow + (1−τ)·θ (closer to 1: the slow weights change more slowly)", 0.0, 1.0)
    update_every: int = hparam(2, "N: update the slow weights after every N-th optimiser step", 1, 1_000_000)
    reset_to_slow_each_epoch: bool = hparam(False, "after each epoch continue training from the slow weights, as the authors' code did by accident (false: the method as described)")


@register_method
class XEKLDistMCL(Method):
    name = "xe_kl_mcl"
    summary = "XE-KL distillation with a momentum-averaged slow copy of the student that is evaluated and returned (keeps the student's knowledge)"
    Params = MCLParams
    default_lr = 1e-2

    def __init__(self, params: Hyperparameters | None = None):
        super().__init__(params)
        self.slow: nn.Module | None = None

    def setup(self, student: nn.Module) -> list[nn.Parameter]:
        self.slow = copy.deepcopy(student).requires_grad_(False).eval()
        return []

    def loss(self, inputs: StepInputs) -> LossOutput:
        p = self.params
        teacher, student, labels = inputs.teacher_logits[0], inputs.student_logits, inputs.labels
        keep = mcl_distillation_mask(teacher, student, labels)
        distillation = masked_mean(kl_per_sample(teacher, student, p.temperature, p.top_k), keep, inputs.subset_divisor)
        loss = p.weight * distillation + (1.0 - p.weight) * F.cross_entropy(student, labels)
        return LossOutput(loss, {"teacher_share": keep.float().mean()})

    @torch.no_grad()
    def after_step(self, student: nn.Module, step: int) -> None:
        if step % self.params.update_every:
            return
        blend = 1.0 - self.params.slow_momentum
        slow_params, live_params = list(self.slow.parameters()), list(student.parameters())
        torch._foreach_lerp_(slow_params, live_params, blend)
        for slow_buffer, live_buffer in zip(self.slow.buffers(), student.buffers()):
            if slow_buffer.is_floating_point():
                slow_buffer.lerp_(live_buffer, blend)
            else:
                slow_buffer.copy_(live_buffer)

    @torch.no_grad()
    def on_epoch_end(self, student: nn.Module) -> None:
        if not self.params.reset_to_slow_each_epoch:
            return
        for live, slow in zip([*student.parameters(), *student.buffers()], [*self.slow.parameters(), *self.slow.buffers()]):
            live.copy_(slow)

    def eval_module(self, student: nn.Module) -> nn.Module:
        return self.slow if self.slow is not None else student

    def state_dict(self) -> dict:
        # The update schedule follows the engine's step counter, which the loop's state carries.
        return {"slow": self.slow.state_dict()} if self.slow is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "slow" in state:
            self.slow.load_state_dict(state["slow"])
