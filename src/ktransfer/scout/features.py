"""The scout's statistics of a (student, teacher) pair, from the two models' logits on held-out labelled data."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..metrics import accuracy, ceiling, entropy, negative_flips, per_class_positive_flips, positive_flips, softmax

FEATURES = ("positive_flips", "teacher_share", "accuracy_gap", "flip_spread")  # the default fit, and the shipped predictor's
AVAILABLE_FEATURES = (*FEATURES, "ensemble_delta")  # what a fit may choose from (--features)
FEATURE_LABELS = {
    "positive_flips": "ρ_pos %",
    "teacher_share": "to teacher %",
    "accuracy_gap": "acc gap",
    "flip_spread": "flip spread",
    "ensemble_delta": "ensemble Δ",
}


def _vector(values) -> np.ndarray:
    return np.asarray(values.cpu() if hasattr(values, "cpu") else values).reshape(-1)


def routed_share(labels, student_logits: torch.Tensor, teacher_logits: torch.Tensor, method=None) -> float:
    """Percent of samples that KL+DP routes to the teacher, with the student as the original student.

    The routing is the method's own (:meth:`KLDistDP.targets`), so a scout of ``kl_dp`` with other
    parameters (``supervised=False``, say) counts what that method would do.
    """
    from ..methods import create_method

    method = method if method is not None else create_method("kl_dp")
    labels = torch.as_tensor(_vector(labels))
    choice = method.targets(student_logits.float(), teacher_logits.float().unsqueeze(0), labels)["choice"]
    return 100.0 * float((choice > 0).float().mean()) if len(choice) else float("nan")


def flip_spread(labels, student_predictions, teacher_predictions, num_classes: int) -> float:
    """Entropy of the per-class positive-flip histogram over ln C: 1 when flips spread evenly, 0 when
    they sit in one class (or there are none)."""
    if num_classes < 2:
        return 0.0
    counts = per_class_positive_flips(labels, student_predictions, teacher_predictions, num_classes)
    return entropy(counts) / math.log(num_classes)


@dataclass
class PairStatistics:
    """The scout's statistics of one (student, teacher) pair on ``n`` held-out samples (percent or points)."""

    student: str
    teacher: str
    positive_flips: float
    teacher_share: float
    accuracy_gap: float
    flip_spread: float
    negative_flips: float
    student_accuracy: float
    teacher_accuracy: float
    n: int
    ensemble_delta: float = float("nan")  # the ensemble of the two over the student, points (the pair's ceiling)

    def features(self, names: Sequence[str] = FEATURES) -> list[float]:
        return [float(getattr(self, name)) for name in names]


def pair_statistics(labels, student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, student: str = "student", teacher: str = "teacher", method=None) -> PairStatistics:
    """All statistics of one pair from the two models' logits ``[N, C]`` on the same labelled samples."""
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(
            f"{student} and {teacher} give logits of shapes {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}; "
            f"scout models of one label space on the same data"
        )
    label_vector = _vector(labels)
    if len(label_vector) != student_logits.shape[0]:
        raise DataError(f"{len(label_vector)} labels for {student_logits.shape[0]} samples of logits; give the labels of the data the models ran on")
    s_pred, t_pred = student_logits.argmax(1), teacher_logits.argmax(1)
    student_acc, teacher_acc = accuracy(label_vector, s_pred), accuracy(label_vector, t_pred)
    return PairStatistics(
        student=student,
        teacher=teacher,
        positive_flips=positive_flips(label_vector, s_pred, t_pred),
        teacher_share=routed_share(label_vector, student_logits, teacher_logits, method),
        accuracy_gap=teacher_acc - student_acc,
        flip_spread=flip_spread(label_vector, s_pred, t_pred, student_logits.shape[1]),
        negative_flips=negative_flips(label_vector, s_pred, t_pred),
        student_accuracy=student_acc,
        teacher_accuracy=teacher_acc,
        n=len(label_vector),
        ensemble_delta=ceiling(label_vector, [softmax(student_logits.float()), softmax(teacher_logits.float())])["ensemble_delta"],
    )


def check_features(names: Sequence[str]) -> list[str]:
    """A fit's feature list: known names, each once, at least one."""
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in AVAILABLE_FEATURES]
    if unknown or not names:
        raise ConfigError(f"unknown feature(s) {', '.join(map(repr, unknown)) or '(none given)'}; choose among {', '.join(AVAILABLE_FEATURES)}")
    return names
