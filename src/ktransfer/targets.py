"""Where the teachers' and the original student's outputs for a batch come from.

``CachedTargets`` reads them from logits computed once over the transfer set; ``OnlineTargets``
runs the frozen models on each batch. With the same data and no augmentation both give the
same numbers. With augmentation, cached logits of the un-augmented images do not apply: online
targets run the models on each view, and ``ktransfer.view_cache.ViewCachedTargets`` (mode
``views``) reads their outputs on the very same views, computed once (see :func:`resolve_targets`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .augment import check_augment
from .data.base import ImageData
from .errors import ConfigError
from .models.base import Model
from .predictions import PredictionCache

TARGET_MODES = ("cached", "online", "views")


def refuse_view_options(targets: str, cache_dtype: str | None, cache_top_k: int | None) -> None:
    """``cache_dtype``/``cache_top_k`` set how targets views stores the frozen outputs: refused with any other targets, where they would be ignored."""
    if targets == "views":
        return
    given = [name for name, value in (("cache_dtype", cache_dtype), ("cache_top_k", cache_top_k)) if value is not None]
    if given:
        raise ConfigError(f"{' and '.join(given)} (--cache-dtype, --cache-top-k) set how targets views stores the frozen outputs, but this run's targets are {targets}: use targets views (with augment paper) or leave them out")


def resolve_targets(targets: str | None, augment: str = "none", where: str = "targets") -> str:
    """The target mode a run uses: ``targets`` as given, or, when not given, cached where that is exact.

    Cached targets are the frozen models' outputs on the un-augmented images, so with
    augmentation the default is online, and an explicit ``cached`` is refused; ``views`` caches
    the outputs on the augmented views themselves, so it needs augmentation.
    """
    check_augment(augment)
    if targets is None:
        return "cached" if augment == "none" else "online"
    if targets not in TARGET_MODES:
        raise ConfigError(f"{where} must be one of {', '.join(TARGET_MODES)}; got {targets!r}")
    if targets == "cached" and augment != "none":
        raise ConfigError(
            f"{where}: cached teacher outputs are of the un-augmented images, not of the views augment={augment!r} trains on; "
            f"use views (the frozen outputs cached per augmented view), online targets (the default with augmentation) or augment none"
        )
    if targets == "views" and augment == "none":
        raise ConfigError(f"{where}: views caches the frozen outputs per augmented view; without augmentation use cached (the default)")
    return targets


@dataclass
class BatchTargets:
    teacher_logits: torch.Tensor | None  # [K, B, C]
    original_logits: torch.Tensor | None  # [B, C]
    teacher_features: torch.Tensor | None = None  # first teacher's, [B, D]
    routing_confidence: torch.Tensor | None = None  # [K+1, B, 2], see StepInputs.routing_confidence


class TargetSource:
    # True when get() takes augmented views framed for the student (its models use Model.for_views).
    takes_views: bool = False
    # True when get() reads by the sample indices on the host (a cache on disk): the engine passes
    # its CPU copy rather than the device one, so no step waits to copy indices back.
    host_indices: bool = False

    def get(self, indices: torch.Tensor, images: torch.Tensor, epoch: int = 0) -> BatchTargets:
        raise NotImplementedError


class CachedTargets(TargetSource):
    def __init__(self, teachers: list[Model], original: Model | None, data: ImageData, cache: PredictionCache, device="cpu"):
        self.teacher_logits = torch.stack([cache.logits(t, data, device=device) for t in teachers]).to(device) if teachers else None
        self.original_logits = cache.logits(original, data, device=device).to(device) if original is not None else None

    def get(self, indices, images, epoch: int = 0):
        indices = indices.to(self.teacher_logits.device if self.teacher_logits is not None else "cpu")
        return BatchTargets(
            self.teacher_logits[:, indices] if self.teacher_logits is not None else None,
            self.original_logits[indices] if self.original_logits is not None else None,
        )


class OnlineTargets(TargetSource):
    """Runs the frozen models on each batch. ``views=True``: batches are augmented views framed for the student."""

    def __init__(self, teachers: list[Model], original: Model | None, with_features: bool = False, views: bool = False):
        if views:
            teachers = [teacher.for_views() for teacher in teachers]
            original = original.for_views() if original is not None else None
        self.teachers, self.original, self.with_features, self.takes_views = teachers, original, with_features, views
        for model in [*teachers, original]:
            if model is not None:
                model.module.eval()

    def prepare(self, convert) -> None:
        """Replace each frozen module by ``convert(module)`` (channels-last memory, torch.compile)."""
        self.teachers = [dataclasses.replace(t, module=convert(t.module)) for t in self.teachers]
        self.original = dataclasses.replace(self.original, module=convert(self.original.module)) if self.original is not None else None

    @torch.no_grad()
    def get(self, indices, images, epoch: int = 0):
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
