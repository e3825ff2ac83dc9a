"""Transfer metrics (SPEC section 2) and complementary-knowledge measures (section 1).

Pure functions of label and prediction vectors: no model, no device. Shares are percent of
the evaluation set, from top-1 predictions (integer class indices).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

TOP_X_PERCENTS = (2, 5, 20, 50)

# The significance tests live in ktransfer.significance; these names are part of this module's face too.
from .significance import (  # noqa: E402,F401
    benjamini_hochberg,
    benjamini_hochberg_adjusted,
    expected_false_positives,
    mcnemar_p_value,
    significance_summary,
)


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

    ``delta == knowledge_gain - knowledge_loss`` holds exactly in counts (``gain_count``,
    ``loss_count``); the percentages are those counts over ``n_eval``. ``p_value`` is the exact
    McNemar p of Δ (:func:`mcnemar_p_value` of the two counts).
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
        "gain_count": gain,
        "loss_count": loss,
        "p_value": mcnemar_p_value(gain, loss),
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


# --------------------------------------------------------------------------- significance


def paired_counts(labels, first, second) -> tuple[int, int]:
    """Discordant counts of two prediction vectors on the same samples: (only ``first`` right, only ``second`` right)."""
    second_only, first_only = flip_counts(labels, first, second)
    return first_only, second_only


def paired_p_value(labels, first, second) -> float:
    """Exact McNemar p of the accuracy difference of two prediction vectors on the same samples.

    E.g. a transfer's student against its fine-tuning control: only the samples one gets right
    and the other wrong count. It covers the noise of the evaluation sample only, not of training.
    """
    return mcnemar_p_value(*paired_counts(labels, first, second))


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


def ceiling_matrices(labels, probabilities: Mapping[str, object]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """N×N matrices of the ensemble's Δ over the student and of the oracle's accuracy (percent); row = student, column = teacher.

    ``probabilities`` maps a model's name to its probabilities ``[samples, C]``. The diagonal is the
    model with itself: ensemble Δ 0, oracle its own accuracy. ``oracle[i, j]`` equals model i's
    accuracy plus ρ_pos(i→j).
    """
    names = list(probabilities)
    (labels,) = _arrays(labels)
    arrays = _checked([probabilities[name] for name in names])
    predictions = [a.argmax(axis=1) for a in arrays]
    accuracies = [accuracy(labels, p) for p in predictions]
    ensemble = np.zeros((len(names), len(names)))
    oracle = np.zeros((len(names), len(names)))
    for i in range(len(names)):
        for j in range(len(names)):
            if j < i:  # the ensemble and the oracle of a pair do not depend on who is the student
                ensemble[i, j], oracle[i, j] = ensemble[j, i] + accuracies[j] - accuracies[i], oracle[j, i]
            elif j == i:
                oracle[i, i] = accuracies[i]
            else:
                ensemble[i, j] = ensemble_accuracy(labels, [arrays[i], arrays[j]]) - accuracies[i]
                oracle[i, j] = oracle_accuracy(labels, [predictions[i], predictions[j]])
    return names, ensemble, oracle


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


# --------------------------------------------------------------------------- the ceiling of a pair
#
# What combining the models would give without any training: the ensemble (mean of their softmax
# probabilities, argmax) and the oracle (right wherever any model is right). A transfer's
# ``capture`` is how much of the ensemble's gain over the student it reached.


def _probabilities(values) -> np.ndarray:
    array = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)
    if array.dtype not in (np.float32, np.float64):  # float32 stays float32: large eval sets times many classes
        array = array.astype(np.float64)
    if array.ndim != 2:
        raise ValueError(f"probabilities are [samples, classes]; got shape {array.shape}")
    return array


def softmax(logits) -> np.ndarray:
    """Row-wise softmax of logits ``[N, C]`` (float64, stable for large logits)."""
    z = _probabilities(logits)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _checked(probabilities: Sequence) -> list[np.ndarray]:
    if not len(probabilities):
        raise ValueError("give the probabilities of at least one model")
    arrays = [_probabilities(p) for p in probabilities]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"the models' probabilities differ in shape: {[a.shape for a in arrays]}")
    return arrays


def ensemble_predictions(probabilities: Sequence) -> np.ndarray:
    """Top-1 class of the mean of the models' probabilities ``[N, C]`` (ties: the lowest class index)."""
    arrays = _checked(probabilities)
    total = arrays[0].astype(np.float64)
    for array in arrays[1:]:
        total += array
    return total.argmax(axis=1)  # the sum ranks classes as the mean does


def ensemble_accuracy(labels, probabilities: Sequence) -> float:
    """Accuracy (percent) of the ensemble of the models whose probabilities ``[N, C]`` are given."""
    return accuracy(labels, ensemble_predictions(probabilities))


def oracle_accuracy(labels, predictions: Sequence) -> float:
    """Share (percent) of samples at least one of the models (top-1 predictions) gets right.

    It is at least every model's own accuracy; it can be below the ensemble's, whose averaged
    probabilities may pick a class that no single model ranks first.
    """
    if not len(predictions):
        raise ValueError("give the predictions of at least one model")
    labels, *vectors = _arrays(labels, *predictions)
    right = np.stack([v == labels for v in vectors]).any(axis=0)
    return _percent(int(right.sum()), len(labels))


def capture(delta: float | None, ensemble_delta: float | None) -> float | None:
    """Δ ÷ ensemble Δ: the part of the ensemble's gain over the student a transfer reached (1: all of it).

    Undefined (None) where the ensemble does not beat the student (ensemble Δ ≤ 0) or a value is missing.
    """
    if delta is None or ensemble_delta is None or not math.isfinite(delta) or not math.isfinite(ensemble_delta) or ensemble_delta <= 0:
        return None
    return delta / ensemble_delta


def ceiling(labels, probabilities: Sequence) -> dict[str, float]:
    """The ceiling of a student (the first model) with its teachers (the rest), from their probabilities ``[N, C]``.

    ``ensemble_acc``: accuracy of the mean of all the models' probabilities; ``oracle_acc``: share
    of samples any model gets right; ``ensemble_delta``: ``ensemble_acc`` minus the student's
    accuracy (points), the gain a transfer could aim at.
    """
    arrays = _checked(probabilities)
    predictions = [array.argmax(axis=1) for array in arrays]
    ensemble = ensemble_accuracy(labels, arrays)
    return {
        "ensemble_acc": ensemble,
        "ensemble_delta": ensemble - accuracy(labels, predictions[0]),
        "oracle_acc": oracle_accuracy(labels, predictions),
    }


def ceiling_fields(ceiling_values: Mapping[str, float] | None, delta: float | None) -> dict[str, float | None]:
    """The record keys ``ensemble_acc``, ``ensemble_delta``, ``oracle_acc`` and ``capture`` of a transfer with Δ ``delta``."""
    values = dict(ceiling_values or {})
    out = {key: values.get(key) for key in ("ensemble_acc", "ensemble_delta", "oracle_acc")}
    out["capture"] = capture(delta, out["ensemble_delta"])
    return out


# --------------------------------------------------------------------------- what a transfer set can carry


def mean_true_class_probability(labels, probabilities) -> float:
    """Mean probability (percent) a model gives the true class: near 100 on data it has fitted."""
    probabilities = _probabilities(probabilities)
    (labels,) = _arrays(labels)
    if len(labels) != len(probabilities):
        raise ValueError(f"{len(labels)} labels for {len(probabilities)} rows of probabilities")
    return 100.0 * float(probabilities[np.arange(len(labels)), labels].mean()) if len(labels) else float("nan")


def mean_entropy(probabilities) -> float:
    """Mean entropy (nats) of a model's output distributions: 0 for one-hot outputs, ln C for uniform ones."""
    p = _probabilities(probabilities)
    if not len(p):
        return float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return float(-terms.sum(axis=1).mean())


def dp_routed_to_teacher(labels, student_probabilities, teacher_probabilities) -> np.ndarray:
    """Which samples KL+DP routes to the teacher: its true-class probability beats the original student's (ties: the student)."""
    student, teacher = _probabilities(student_probabilities), _probabilities(teacher_probabilities)
    (labels,) = _arrays(labels)
    rows = np.arange(len(labels))
    return teacher[rows, labels] > student[rows, labels]


def dp_routing_summary(labels, student_probabilities, teacher_probabilities) -> dict[str, float | int]:
    """KL+DP's routing on a data set: how much goes to the teacher, and how much of that corrects the student.

    ``routed``: share (percent) of samples routed to the teacher; ``routed_useful``: share (percent)
    of the routed samples where the teacher is right and the original student wrong (top-1), the
    samples on which the teacher's targets teach something the labels and the student's own
    outputs do not already say in its top-1.
    """
    (labels,) = _arrays(labels)
    student, teacher = _probabilities(student_probabilities), _probabilities(teacher_probabilities)
    routed = dp_routed_to_teacher(labels, student, teacher)
    useful = routed & (teacher.argmax(axis=1) == labels) & (student.argmax(axis=1) != labels)
    count = int(routed.sum())
    return {"n": len(labels), "routed_count": count, "routed": _percent(count, len(labels)), "routed_useful_count": int(useful.sum()), "routed_useful": _percent(int(useful.sum()), count)}
