"""Fitting on pairs with a realised Δ: held-out predictions (leave-one-model-out, leave-one-student-out) and how well they rank."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from ..metrics import mcnemar_p_value
from ..rank_statistics import spearman, spearman_with_interval
from .features import FEATURES, PairStatistics
from .predictor import DEFAULT_RIDGE, fit_predictor


@dataclass
class ScoutedPair:
    """A pair's statistics, its realised Δ where known (mean over seeds) and that Δ's noise."""

    stats: PairStatistics
    delta: float | None = None
    gain_count: int | None = None
    loss_count: int | None = None
    n_eval: int | None = None
    runs: int = 0

    @property
    def noise(self) -> float | None:
        """Standard deviation (points) of Δ under no effect: √(gain + loss) / n, the McNemar scale."""
        if self.gain_count is None or not self.n_eval:
            return None
        return 100.0 * math.sqrt(self.gain_count + self.loss_count) / self.n_eval

    @property
    def p_value(self) -> float | None:
        return mcnemar_p_value(self.gain_count, self.loss_count) if self.gain_count is not None else None


HELD_OUT_SPLITS = ("model", "student")


def held_out_predictions(pairs: Sequence[ScoutedPair], split: str = "model", feature_names: Sequence[str] = FEATURES, *, ridge: float = DEFAULT_RIDGE) -> tuple[np.ndarray | None, str | None]:
    """Each pair's Δ predicted by a fit that did not see its student: (predictions, None), or (None, why not).

    Every student in turn is held out and its pairs predicted. ``split="model"`` (leave-one-model-out)
    fits on the pairs that involve the held-out model in neither role, so the model is wholly unseen;
    ``split="student"`` (leave-one-student-out) only leaves out the pairs it is the student of, so it
    still teaches in training pairs whose features mirror its own (ρ_pos(t→s) = ρ_neg(s→t), the
    accuracy gap negated), which makes that score optimistic.
    """
    if split not in HELD_OUT_SPLITS:
        raise ConfigError(f"held-out split {split!r} is not one of {', '.join(HELD_OUT_SPLITS)}")
    predicted = np.empty(len(pairs))
    for student in dict.fromkeys(p.stats.student for p in pairs):
        held = np.array([p.stats.student == student for p in pairs])
        if split == "model":
            train = [p for p in pairs if student not in (p.stats.student, p.stats.teacher)]
        else:
            train = [p for p, h in zip(pairs, held) if not h]
        if len(train) < 3:
            return None, f"holding out {student} leaves {len(train)} training pairs (a fit needs 3)"
        model = fit_predictor([p.stats.features(feature_names) for p in train], [p.delta for p in train], feature_names, ridge=ridge)
        predicted[held] = model.predict([p.stats.features(feature_names) for p, h in zip(pairs, held) if h])[0]
    return predicted, None


def _within_student_mean(pairs: Sequence[ScoutedPair], predicted: np.ndarray, realised: np.ndarray) -> float:
    within = []
    for student in dict.fromkeys(p.stats.student for p in pairs):
        held = np.array([p.stats.student == student for p in pairs])
        if held.sum() >= 3:
            value = spearman(predicted[held], realised[held])
            if not math.isnan(value):
                within.append(value)
    return statistics.fmean(within) if within else float("nan")


def leave_one_student_out(pairs: Sequence[ScoutedPair], feature_names: Sequence[str] = FEATURES, *, ridge: float = DEFAULT_RIDGE, resamples: int = 2000, seed: int = 0) -> dict:
    """Predict each student's pairs from a fit without it; Spearman over all pairs, with interval, two ways.

    ``lomo`` (the headline) is leave-one-model-out: the fit sees no pair involving the held-out model,
    as student or as teacher (None, with ``lomo_note`` saying why, when too few pairs remain).
    ``loso`` is leave-one-student-out, where the held-out student still teaches in training pairs
    (:func:`held_out_predictions`): an optimistic score, kept beside it. Also, for reference, the
    Spearman of single statistics (no fitting: a rank correlation does not care about scale), and the
    mean Spearman within each student (ranking one student's teachers, what ``scout`` is used for).
    ``predicted`` and ``predicted_lomo`` are the per-pair predictions of the two splits.
    """
    pairs = [p for p in pairs if p.delta is not None]
    students = list(dict.fromkeys(p.stats.student for p in pairs))
    if len(students) < 3:
        raise DataError(f"leave-one-student-out needs pairs of at least 3 students; got {len(students)}")
    realised = np.array([p.delta for p in pairs])
    predicted, note = held_out_predictions(pairs, "student", feature_names, ridge=ridge)
    if predicted is None:
        raise DataError(f"leave-one-student-out: {note}; fit on a study with more pairs")
    lomo_predicted, lomo_note = held_out_predictions(pairs, "model", feature_names, ridge=ridge)
    baselines = {
        name: spearman_with_interval([p.stats.features([name])[0] for p in pairs], realised, resamples=resamples, seed=seed)
        for name in FEATURES
    }
    return {
        "pairs": len(pairs),
        "students": len(students),
        "lomo": spearman_with_interval(lomo_predicted, realised, resamples=resamples, seed=seed) if lomo_predicted is not None else None,
        "lomo_note": lomo_note,
        "within_student_mean_lomo": _within_student_mean(pairs, lomo_predicted, realised) if lomo_predicted is not None else float("nan"),
        "loso": spearman_with_interval(predicted, realised, resamples=resamples, seed=seed),
        "within_student_mean": _within_student_mean(pairs, predicted, realised),
        "baselines": baselines,
        "noise": noise_summary(pairs),
        "predicted": predicted.tolist(),
        "predicted_lomo": lomo_predicted.tolist() if lomo_predicted is not None else None,
    }


def noise_summary(pairs: Sequence[ScoutedPair]) -> dict:
    """Whether the realised Δs are large enough to rank: their spread against the noise of one Δ."""
    deltas = [p.delta for p in pairs if p.delta is not None]
    noises = [p.noise for p in pairs if p.noise is not None]
    p_values = [p.p_value for p in pairs if p.p_value is not None]
    spread = statistics.stdev(deltas) if len(deltas) > 1 else float("nan")
    noise = statistics.fmean(noises) if noises else float("nan")
    return {
        "mean_delta": statistics.fmean(deltas) if deltas else float("nan"),
        "spread": spread,
        "range": [min(deltas), max(deltas)] if deltas else None,
        "noise": noise,
        "spread_over_noise": spread / noise if noise and noise > 0 else float("nan"),
        "significant": sum(1 for p in p_values if p < 0.05),
        "tested": len(p_values),
    }


def score_predictions(pairs: Sequence[ScoutedPair], predicted: Sequence[float], realised: Mapping[tuple[str, str], float], *, resamples: int = 2000, seed: int = 0) -> dict:
    """Spearman of predictions against realised Δs measured elsewhere (e.g. on the test set), over the pairs both have."""
    chosen = [(pred, realised[(p.stats.student, p.stats.teacher)]) for p, pred in zip(pairs, predicted) if (p.stats.student, p.stats.teacher) in realised]
    if len(chosen) < 3:
        raise DataError(f"only {len(chosen)} pairs have a realised Δ to score against; the scored study must run the same pairs and method")
    x, y = zip(*chosen)
    return spearman_with_interval(x, y, resamples=resamples, seed=seed)
