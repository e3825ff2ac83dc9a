"""Where the teachers' and the original student's outputs for a batch come from.

``CachedTargets`` reads them from logits computed once over the transfer set; ``OnlineTargets``
runs the frozen models on each batch. With the same data and no augmentation both give the
same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data.base import ImageData
from .models.base import Model
from .predictions import PredictionCache


@dataclass
class BatchTargets:
    teacher_logits: torch.Tensor | None  # [K, B, C]
    original_logits: torch.Tensor | None  # [B, C]
    teacher_features: torch.Tensor | None = None  # first teacher's, [B, D]


class TargetSource:
    def get(self, indices: torch.Tensor, images: torch.Tensor) -> BatchTargets:
        raise NotImplementedError


class CachedTargets(TargetSource):
    def __init__(self, teachers: list[Model], original: Model | None, data: ImageData, cache: PredictionCache, device="cpu"):
        self.teacher_logits = torch.stack([cache.logits(t, data, device=device) for t in teachers]).to(device) if teachers else None
        self.original_logits = cache.logits(original, data, device=device).to(device) if original is not None else None

    def get(self, indices, images):
        indices = indices.to(self.teacher_logits.device if self.teacher_logits is not None else "cpu")
        return BatchTargets(
            self.teacher_logits[:, indices] if self.teacher_logits is not None else None,
            self.original_logits[indices] if self.original_logits is not None else None,
        )


class OnlineTargets(TargetSource):
    def __init__(self, teachers: list[Model], original: Model | None, with_features: bool = False):
        self.teachers, self.original, self.with_features = teachers, original, with_features
        for model in [*teachers, original]:
            if model is not None:
                model.module.eval()

    @torch.no_grad()
    def get(self, indices, images):
        teacher_logits, teacher_features = [], None
        for k, teacher in enumerate(self.teachers):
            if self.with_features and k == 0:
                teacher_features, logits = teacher.features_and_logits(images)
            else:
                logits = teacher.logits(images)
            teacher_logits.append(logits.float())
        return BatchTargets(
            torch.stack(teacher_logits) if teacher_logits else None,
            self.original.logits(images).float() if self.original is not None else None,
            teacher_features,
        )
