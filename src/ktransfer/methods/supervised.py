"""Plain supervised training on labels: zoo pretraining and the baseline of the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import Hyperparameters, LossOutput, Method, StepInputs, hparam, register_method


@dataclass
class CEParams(Hyperparameters):
    label_smoothing: float = hparam(0.0, "label smoothing of the cross-entropy", 0.0, 1.0)


@register_method
class CrossEntropy(Method):
    name = "ce"
    summary = "supervised fine-tuning on the labels (no teacher): a baseline and the zoo's pretraining"
    Params = CEParams
    needs_teacher = False
    default_lr = 1e-3

    def loss(self, inputs: StepInputs) -> LossOutput:
        return LossOutput(F.cross_entropy(inputs.student_logits, inputs.labels, label_smoothing=self.params.label_smoothing))
