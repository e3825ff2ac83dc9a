"""Transfer metrics (SPEC section 2) and complementary-knowledge measures (section 1).

Pure functions of label and prediction vectors: no model, no device. Shares are percent of
the evaluation set, from top-1 predictions (integer class indices).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

TOP_X_PERCENTS = (2, 5, 20, 50)


def _arrays(*vectors) -> list[np.ndarray]:
    arrays = [np.asarray(v.cpu() if hasattr(v, "cpu") else v).reshape(-1) for v in vectors]
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(f"label and prediction vectors differ in length: {[len(a) for a in arrays]}")
    return arrays


def _percent(count: int, total: int) -> float:
    return 100.0 * count / total if total else float("nan")


def accuracy(labels, predictions) -> float:
    labels, predictions = _arrays(labels, predictions)
    return _percent(int((labels == predictions).sum()), len(labels))


def flip_counts(labels, reference, other) -> tuple[int, int]:
    """(positive, negative) flip counts of ``other`` against ``reference``.

    Positive: ``reference`` wrong and ``other`` right; negative: the opposite.
    """
    labels, reference, other = _arrays(labels, reference, other)
    ref_right, other_right = reference == labels, other == labels
    return int((~ref_right & other_right).sum()), int((ref_right & ~other_right).sum())


def positive_flips(labels, student, teacher) -> float:
    """ρ_pos(s→t): share the student gets wrong and the teacher right (complementary knowledge)."""
    return _percent(flip_counts(labels, student, teacher)[0], len(np.asarray(labels).reshape(-1)))


def negative_flips(labels, student, teacher) -> float:
    """ρ_neg(s→t): share the student gets right and the teacher wrong."""
    return _percent(flip_counts(labels, student, teacher)[1], len(np.asarray(labels).reshape(-1)))


def transfer_metrics(labels, before, after, teacher=None) -> dict[str, float | int]:
    """Δ, knowledge gain and loss of a student before/after transfer; flips against the teacher.

    ``delta == knowledge_gain - knowledge_loss`` holds exactly in counts; the percentages
    are those counts over ``n_eval``.
    """
    labels, before, after = _arrays(labels, before, after)
    total = len(labels)
    correct_before, correct_after = int((before == labels).sum()), int((after == labels).sum())
    gain, loss = flip_counts(labels, before, after)
    out: dict[str, float | int] = {
        "n_eval": total,
        "acc_before": _percent(correct_before, total),
        "acc_after": _percent(correct_after, total),
        "delta": _percent(correct_after - correct_before, total),
        "knowledge_gain": _percent(gain, total),
        "knowledge_loss": _percent(loss, total),
    }
    if teacher is not None:
        (teacher,) = _arrays(teacher)
        pos_before, neg_before = flip_counts(labels, before, teacher)
        pos_after, neg_after = flip_counts(labels, after, teacher)
        out.update(
            teacher_acc=accuracy(labels, teacher),
            pos_flips_before=_percent(pos_before, total),
            pos_flips_after=_percent(pos_after, total),
            neg_flips_before=_percent(neg_before, total),
            neg_flips_after=_percent(neg_after, total),
            delta_pos_flips=_percent(pos_after - pos_before, total),
            delta_neg_flips=_percent(neg_after - neg_before, total),
        )
    return out


def success_rate(deltas: Sequence[float]) -> float:
    """Share (percent) of transfers with Δ strictly above zero."""
    deltas = list(deltas)
    return _percent(sum(1 for d in deltas if d > 0), len(deltas))


def flip_matrices(labels, predictions: Mapping[str, object]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """N×N matrices of ρ_pos and ρ_neg; row = student, column = teacher. N prediction vectors, no pairs re-run."""
    names = list(predictions)
    (labels,) = _arrays(labels)
    right = np.stack([_arrays(predictions[name])[0] == labels for name in names])  # [N, samples]
    wrong = ~right
    total = len(labels)
    positive = 100.0 * (wrong.astype(np.int64) @ right.T.astype(np.int64)) / total
    negative = 100.0 * (right.astype(np.int64) @ wrong.T.astype(np.int64)) / total
    return names, positive, negative


def per_class_positive_flips(labels, student, teacher, num_classes: int) -> np.ndarray:
    """Counts of positive flips per true class."""
    labels, student, teacher = _arrays(labels, student, teacher)
    mask = (student != labels) & (teacher == labels)
    return np.bincount(labels[mask], minlength=num_classes)


def entropy(counts) -> float:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def top_classes(counts, percent: float) -> list[int]:
    """Smallest set of classes that holds at least ``percent``% of the flips, largest first."""
    counts = np.asarray(counts)
    total = counts.sum()
    if total == 0:
        return []
    order = np.argsort(-counts, kind="stable")
    cumulative = np.cumsum(counts[order])
    needed = int(np.searchsorted(cumulative, total * percent / 100.0 - 1e-9) + 1)
    return [int(i) for i in order[:needed]]


def class_concentration(counts, percents: Sequence[float] = TOP_X_PERCENTS) -> dict:
    """Entropy of the per-class flip histogram against the uniform one (ln C), and top-X% classes."""
    counts = np.asarray(counts)
    return {
        "entropy": entropy(counts),
        "uniform_entropy": math.log(len(counts)) if len(counts) else 0.0,
        "top_classes": {float(p): top_classes(counts, p) for p in percents},
    }
