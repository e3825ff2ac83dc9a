"""Teacher scouting: which teachers are worth a transfer, from one forward pass of each model.

Before any training, four cheap statistics of a (student, teacher) pair on held-out labelled data
predict the Δ a transfer would give:

- ``positive_flips``  ρ_pos, percent of samples the student gets wrong and the teacher right;
- ``teacher_share``   percent of samples KL+DP would route to the teacher (the method's own rule);
- ``accuracy_gap``    teacher accuracy minus student accuracy, in points;
- ``flip_spread``     how evenly the positive flips spread over classes: their entropy over ln C
                      (1: spread evenly, 0: all in one class).

A fifth statistic, ``ensemble_delta`` (the ensemble of student and teacher over the student, in
points: the pair's ceiling), is shown beside them and can be chosen as a feature when fitting
(``fit_study(..., features=...)``); the shipped predictor keeps the four above, and a predictor
always predicts from the feature list stored in its file.

A :class:`ScoutPredictor` (standardised features, ridge regression) maps them to a predicted Δ
with an interval from leave-one-out residuals. It is fitted on a study's realised Δs
(:func:`fit_study`), and :func:`leave_one_student_out` says how well it ranks pairs of a model it
has not seen (leave-one-model-out, with the optimistic leave-one-student-out beside it). :func:`scout` ranks a student's candidate teachers with it.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from .data.base import ImageData
from .errors import ConfigError, DataError
from .metrics import accuracy, ceiling, entropy, mcnemar_p_value, negative_flips, per_class_positive_flips, positive_flips, softmax
from .models.base import Model
from .predictions import PredictionCache

FEATURES = ("positive_flips", "teacher_share", "accuracy_gap", "flip_spread")  # the default fit, and the shipped predictor's
AVAILABLE_FEATURES = (*FEATURES, "ensemble_delta")  # what a fit may choose from (--features)
FEATURE_LABELS = {
    "positive_flips": "ρ_pos %",
    "teacher_share": "to teacher %",
    "accuracy_gap": "acc gap",
    "flip_spread": "flip spread",
    "ensemble_delta": "ensemble Δ",
}
DEFAULT_PREDICTOR = "scout_predictor.json"  # shipped inside the package
STUDY_SCOUT_FILE = "scout.json"  # per-pair predicted and realised Δ, written into a study folder by the fit
PREDICTOR_FILE = "scout-predictor.json"  # the fitted predictor, default place: the study folder
DEFAULT_RIDGE = 1.0
DEFAULT_COVERAGE = 0.9
VERDICTS = ("likely to help", "uncertain", "unlikely to help")


# --------------------------------------------------------------------------- statistics


def _vector(values) -> np.ndarray:
    return np.asarray(values.cpu() if hasattr(values, "cpu") else values).reshape(-1)


def routed_share(labels, student_logits: torch.Tensor, teacher_logits: torch.Tensor, method=None) -> float:
    """Percent of samples that KL+DP routes to the teacher, with the student as the original student.

    The routing is the method's own (:meth:`KLDistDP.targets`), so a scout of ``kl_dp`` with other
    parameters (``supervised=False``, say) counts what that method would do.
    """
    from .methods import create_method

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


# --------------------------------------------------------------------------- ranking statistics


def ranks(values) -> np.ndarray:
    """Ranks 1..n, ties given the mean of the ranks they span."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        out[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return out


def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson's r of the ranks); NaN when either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError(f"spearman needs two sequences of one length; got {len(x)} and {len(y)}")
    if len(x) < 2:
        return float("nan")
    rx, ry = ranks(x) - (len(x) + 1) / 2.0, ranks(y) - (len(y) + 1) / 2.0
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def spearman_with_interval(x, y, *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict:
    """Spearman's ρ, a percentile bootstrap interval over the pairs, and a two-sided permutation p-value."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    rho = spearman(x, y)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(resamples):
        pick = rng.integers(0, len(x), len(x))
        value = spearman(x[pick], y[pick])
        if not math.isnan(value):
            boot.append(value)
    tail = (1.0 - confidence) / 2.0
    low, high = (float(np.quantile(boot, tail)), float(np.quantile(boot, 1.0 - tail))) if boot else (float("nan"), float("nan"))
    # Permutation test: how often shuffled realised values correlate at least as strongly (+1 keeps p > 0).
    extreme = sum(1 for _ in range(resamples) if abs(spearman(x, rng.permutation(y))) >= abs(rho) - 1e-12) if not math.isnan(rho) else resamples
    return {"spearman": rho, "low": low, "high": high, "confidence": confidence, "p_value": (extreme + 1) / (resamples + 1), "n": len(x)}


# --------------------------------------------------------------------------- the predictor


def _ridge(features: np.ndarray, targets: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Ridge regression on standardised features: (mean, scale, coefficients, intercept); the intercept is not penalised."""
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)  # a constant feature contributes nothing instead of dividing by zero
    z = (features - mean) / scale
    intercept = float(targets.mean())
    gram = z.T @ z + ridge * np.eye(z.shape[1])
    coefficients = np.linalg.solve(gram, z.T @ (targets - intercept))
    return mean, scale, coefficients, intercept


@dataclass
class ScoutPredictor:
    """Predicted Δ = intercept + Σ coefficient · (feature − mean) / scale, with an interval.

    The interval adds the ``coverage`` quantiles of the leave-one-out residuals of the fit: on
    pairs like those it was fitted on, the realised Δ fell inside it that often.
    """

    features: list[str]
    mean: list[float]
    scale: list[float]
    coefficients: list[float]
    intercept: float
    residual_low: float
    residual_high: float
    coverage: float = DEFAULT_COVERAGE
    ridge: float = DEFAULT_RIDGE
    method: str = "kl_dp"
    n_pairs: int = 0
    setting: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)

    def predict(self, features) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(predicted Δ, interval low, interval high) for rows of features in the order of ``self.features``."""
        features = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if features.shape[1] != len(self.features):
            raise ConfigError(f"the predictor takes {len(self.features)} features ({', '.join(self.features)}); got {features.shape[1]}")
        z = (features - np.asarray(self.mean)) / np.asarray(self.scale)
        predicted = self.intercept + z @ np.asarray(self.coefficients)
        return predicted, predicted + self.residual_low, predicted + self.residual_high

    def predict_pair(self, stats: PairStatistics) -> tuple[float, float, float]:
        predicted, low, high = self.predict([stats.features(self.features)])
        return float(predicted[0]), float(low[0]), float(high[0])

    def to_dict(self) -> dict:
        return {"format": "ktransfer-scout-predictor", "version": 1, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_clean(self.to_dict()), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict, where: str = "predictor") -> "ScoutPredictor":
        if not isinstance(data, dict) or data.get("format") != "ktransfer-scout-predictor":
            raise DataError(f"{where} is not a scouting predictor; make one with 'ktransfer scout --fit STUDY_FOLDER'")
        try:
            predictor = cls(**{k: v for k, v in data.items() if k not in ("format", "version")})
        except TypeError as exc:
            raise DataError(f"{where} does not have the fields of a scouting predictor ({exc}); fit it again with 'ktransfer scout --fit'") from exc
        if not len(predictor.features) == len(predictor.mean) == len(predictor.scale) == len(predictor.coefficients):
            raise DataError(f"{where} lists {len(predictor.features)} features but {len(predictor.coefficients)} coefficients; fit it again")
        unknown = [name for name in predictor.features if name not in AVAILABLE_FEATURES]
        if unknown:
            raise DataError(f"{where} uses features this version does not compute ({', '.join(unknown)}); known: {', '.join(AVAILABLE_FEATURES)}")
        return predictor

    @classmethod
    def load(cls, path: str | Path | None = None) -> "ScoutPredictor":
        """A predictor file, or the one shipped with ktransfer (``path=None``)."""
        if path is None:
            text = resources.files("ktransfer").joinpath(DEFAULT_PREDICTOR).read_text(encoding="utf-8")
            return cls.from_dict(json.loads(text), "the shipped predictor")
        path = Path(path)
        if not path.is_file():
            raise DataError(f"predictor file {path} does not exist; give a file written by 'ktransfer scout --fit', or leave --predictor out for the shipped one")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read predictor {path}: {exc}") from exc
        return cls.from_dict(data, str(path))


def _clean(value):
    """JSON-safe: NaN and infinities become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def fit_predictor(features, deltas, feature_names: Sequence[str] = FEATURES, *, ridge: float = DEFAULT_RIDGE, coverage: float = DEFAULT_COVERAGE, method: str = "kl_dp", setting: dict | None = None) -> ScoutPredictor:
    """Fit the ridge predictor on rows of features and their realised Δ; the interval from leave-one-out residuals."""
    features = np.atleast_2d(np.asarray(features, dtype=np.float64))
    deltas = np.asarray(deltas, dtype=np.float64).reshape(-1)
    if len(features) != len(deltas):
        raise ConfigError(f"{len(features)} rows of features for {len(deltas)} realised Δs")
    if len(deltas) < 3:
        raise DataError(f"fitting a scouting predictor needs at least 3 pairs with a realised Δ; got {len(deltas)}")
    if not 0.0 < coverage < 1.0:
        raise ConfigError(f"the interval's coverage must lie strictly between 0 and 1; got {coverage}")
    if ridge < 0:
        raise ConfigError(f"the ridge penalty must be at least 0; got {ridge}")
    mean, scale, coefficients, intercept = _ridge(features, deltas, ridge)
    residuals = []
    for i in range(len(deltas)):
        keep = np.arange(len(deltas)) != i
        m, s, c, b = _ridge(features[keep], deltas[keep], ridge)
        residuals.append(deltas[i] - (b + ((features[i] - m) / s) @ c))
    tail = (1.0 - coverage) / 2.0
    return ScoutPredictor(
        features=list(feature_names), mean=mean.tolist(), scale=scale.tolist(), coefficients=coefficients.tolist(), intercept=intercept,
        residual_low=float(np.quantile(residuals, tail)), residual_high=float(np.quantile(residuals, 1.0 - tail)),
        coverage=coverage, ridge=ridge, method=method, n_pairs=len(deltas), setting=dict(setting or {}),
    )


# --------------------------------------------------------------------------- pairs and evaluation


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


# --------------------------------------------------------------------------- studies


def realised_deltas(records: Sequence[dict], method: str) -> dict[tuple[str, str], dict]:
    """Per (student, teacher): the mean Δ of ``method``'s finished transfers over seeds, and their summed flip counts."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        if record.get("method") != method or record.get("control") or not record.get("teacher") or "strategy" in record:
            continue
        if not isinstance(record.get("delta"), (int, float)):
            continue
        grouped.setdefault((record["student"], record["teacher"]), []).append(record)
    out = {}
    for key, runs in grouped.items():
        counts = [(r.get("gain_count"), r.get("loss_count"), r.get("n_eval")) for r in runs]
        complete = all(isinstance(c, int) for triple in counts for c in triple)
        out[key] = {
            "delta": statistics.fmean(r["delta"] for r in runs),
            "runs": len(runs),
            # Summed over seeds, the counts give the McNemar scale of the mean Δ (noise = √(gain + loss) / n).
            "gain_count": sum(c[0] for c in counts) if complete else None,
            "loss_count": sum(c[1] for c in counts) if complete else None,
            "n_eval": sum(c[2] for c in counts) if complete else None,
        }
    return out


def _study_config(folder: Path):
    from .study import StudyConfig

    config_path = folder / "study.yaml"
    if not config_path.is_file():
        raise DataError(f"{folder} has no study.yaml; fit on a folder written by 'ktransfer study'")
    return StudyConfig.load(config_path)


def study_records(folder: str | Path, method: str) -> dict[tuple[str, str], dict]:
    """The realised Δ of each pair of a study folder, for ``method``; a clear error when there is none."""
    from .study import load_records

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; give the folder of a finished 'ktransfer study'")
    realised = realised_deltas(load_records(folder), method)
    if not realised:
        raise DataError(f"{folder} has no finished {method} transfers; run the study first, or name its method with --method")
    return realised


def study_pairs(folder: str | Path, method: str = "kl_dp", *, cache: PredictionCache | None = None, device: str = "cpu", log: Callable[[str], None] | None = None) -> tuple[list[ScoutedPair], dict]:
    """Every pair of a study with a finished ``method`` run: its statistics on the study's evaluation
    data (one cached forward pass per model) and its realised Δ. Also the setting, for the record."""
    from .models import load_model

    folder = Path(folder)
    realised = study_records(folder, method)
    config = _study_config(folder)
    data = config.data.load().eval
    if log:
        log(f"statistics on {data.name} ({len(data):,} images): one forward pass per model")
    cache = cache if cache is not None else PredictionCache()
    specs = list(dict.fromkeys(spec for pair in realised for spec in pair))
    logits = {spec: cache.logits(load_model(spec, data_dir=config.data.dir), data, device=device) for spec in specs}
    kl_dp = _routing_method(config, method)
    pairs = []
    for (student, teacher), r in realised.items():
        stats = pair_statistics(data.labels, logits[student], logits[teacher], student=student, teacher=teacher, method=kl_dp)
        pairs.append(ScoutedPair(stats, r["delta"], r["gain_count"], r["loss_count"], r["n_eval"], r["runs"]))
    setting = {
        "study": config.name, "method": method, "data": config.data.describe(), "evaluated_on": data.name, "n_eval": len(data),
        "epochs": config.epochs, "lr": _method_lr(config, method), "seeds": list(config.seeds), "batch_size": config.batch_size,
    }
    return pairs, setting


def _routing_method(config, method: str):
    """The KL+DP whose routing the statistics count: the study's own kl_dp settings where it has them."""
    from .methods import create_method

    for candidate in config.methods:
        if candidate.name == "kl_dp":
            # Hyperparameters searched over a grid keep their defaults here: only single values are the study's own.
            params = {k: v[0] for k, v in (candidate.params or {}).items() if len(v) == 1}
            return create_method("kl_dp", **params)
    return create_method("kl_dp")


def _method_lr(config, method: str):
    for candidate in config.methods:
        if candidate.name == method and len(candidate.lr) == 1:
            return candidate.lr[0]
    return config.lr


def check_score_on(folder: str | Path, score_on: str | Path) -> None:
    """Refuse a ``--score-on`` study evaluated on data that shares samples with the fitted study's
    evaluation data: the statistics and the realised Δs the predictor is fitted on come from that data,
    so a score there is no test of it."""
    from .data.overlap import shared_samples

    folder, score_on = Path(folder), Path(score_on)
    if folder.resolve() == score_on.resolve():
        raise ConfigError(
            f"--score-on {score_on} is the study the predictor is fitted on; score on a study of the same pairs evaluated on other data "
            f"(e.g. the same config with data fashion-mnist, the test set, where the fit used fashion-mnist:validation), or leave out --score-on"
        )
    if not (score_on / "study.yaml").is_file():
        raise DataError(f"--score-on {score_on} is not a study folder (it has no study.yaml); give the folder of a finished 'ktransfer study'")
    fitted, scored = _study_config(folder).data.load().eval, _study_config(score_on).data.load().eval
    shared = shared_samples(scored, fitted)
    if shared:
        raise ConfigError(
            f"--score-on {score_on} is evaluated on {scored.name}, which shares {shared:,} of its {len(scored):,} samples with {fitted.name}, "
            f"the evaluation data of {folder} where the predictor's statistics and Δs come from; score on a study evaluated on other data "
            f"(e.g. fashion-mnist, the test set, where the fit used fashion-mnist:validation), or leave out --score-on"
        )


PER_PAIR_KEYS = ("predicted", "predicted_lomo", "test_deltas")  # kept in scout.json's rows, not in the summaries


@dataclass
class StudyFit:
    """A predictor fitted on a study, how well it ranked unseen students, and the per-pair rows."""

    predictor: ScoutPredictor
    pairs: list[ScoutedPair]
    evaluation: dict

    def rows(self) -> list[dict]:
        """Per pair: statistics, the leave-one-model-out and leave-one-student-out predictions, the full fit's prediction and interval, the realised Δ."""
        out = []
        lomo = self.evaluation.get("predicted_lomo") or [None] * len(self.pairs)
        for pair, loso, held_out in zip(self.pairs, self.evaluation["predicted"], lomo):
            predicted, low, high = self.predictor.predict_pair(pair.stats)
            test = self.evaluation.get("test_deltas", {}).get(f"{pair.stats.student}|{pair.stats.teacher}")
            out.append({
                **asdict(pair.stats), "predicted_lomo": held_out, "predicted_loso": loso, "predicted": predicted, "low": low, "high": high,
                "delta": pair.delta, "noise": pair.noise, "p_value": pair.p_value, "runs": pair.runs, "test_delta": test,
            })
        return out

    def save_rows(self, folder: str | Path) -> Path:
        """``scout.json`` in a study folder: what ``ktransfer report`` shows as predicted against realised Δ."""
        path = Path(folder) / STUDY_SCOUT_FILE
        summary = {k: v for k, v in self.evaluation.items() if k not in PER_PAIR_KEYS}
        payload = {"method": self.predictor.method, "setting": self.predictor.setting, "coverage": self.predictor.coverage, "evaluation": summary, "pairs": self.rows()}
        path.write_text(json.dumps(_clean(payload), indent=1) + "\n", encoding="utf-8")
        return path


def check_features(names: Sequence[str]) -> list[str]:
    """A fit's feature list: known names, each once, at least one."""
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in AVAILABLE_FEATURES]
    if unknown or not names:
        raise ConfigError(f"unknown feature(s) {', '.join(map(repr, unknown)) or '(none given)'}; choose among {', '.join(AVAILABLE_FEATURES)}")
    return names


def fit_study(folder: str | Path, method: str = "kl_dp", *, score_on: str | Path | None = None, ridge: float = DEFAULT_RIDGE, coverage: float = DEFAULT_COVERAGE, resamples: int = 2000, cache: PredictionCache | None = None, device: str = "cpu", log: Callable[[str], None] | None = None, features: Sequence[str] = FEATURES) -> StudyFit:
    """Fit the scouting predictor on a study's pairs and check it leave-one-model-out (and leave-one-student-out).

    ``score_on`` names a second study of the same pairs and method whose Δs were measured on other
    data (the test set): both splits' held-out predictions are also scored against those
    (``test_lomo`` and ``test``). No choice is made on it. ``features``: the statistics the predictor uses (``AVAILABLE_FEATURES``;
    default the four of the shipped predictor); the file stores them, and predictions use its list.
    """
    features = check_features(features)
    if score_on is not None:
        check_score_on(folder, score_on)  # before any model runs
    pairs, setting = study_pairs(folder, method, cache=cache, device=device, log=log)
    evaluation = leave_one_student_out(pairs, features, ridge=ridge, resamples=resamples)
    known = [p for p in pairs if p.delta is not None]
    for name in AVAILABLE_FEATURES:  # each statistic alone, for reference (ensemble Δ too)
        if name not in evaluation["baselines"]:
            evaluation["baselines"][name] = spearman_with_interval([p.stats.features([name])[0] for p in known], [p.delta for p in known], resamples=resamples)
    if score_on is not None:
        test = {key: r["delta"] for key, r in study_records(score_on, method).items()}
        evaluation["test"] = {**score_predictions(pairs, evaluation["predicted"], test, resamples=resamples), "study": str(Path(score_on).name)}
        if evaluation["predicted_lomo"] is not None:
            evaluation["test_lomo"] = {**score_predictions(pairs, evaluation["predicted_lomo"], test, resamples=resamples), "study": str(Path(score_on).name)}
        evaluation["test_deltas"] = {f"{s}|{t}": d for (s, t), d in test.items()}
    predictor = fit_predictor([p.stats.features(features) for p in pairs], [p.delta for p in pairs], features, ridge=ridge, coverage=coverage, method=method, setting=setting)
    predictor.evaluation = {k: v for k, v in evaluation.items() if k not in PER_PAIR_KEYS}
    return StudyFit(predictor, pairs, evaluation)


# --------------------------------------------------------------------------- scouting


def verdict(low: float, high: float) -> str:
    """``likely to help`` when the whole interval is above 0, ``unlikely to help`` when none of it is, else ``uncertain``."""
    if low > 0:
        return VERDICTS[0]
    if high <= 0:
        return VERDICTS[2]
    return VERDICTS[1]


@dataclass
class ScoutedTeacher:
    teacher: str
    predicted: float
    low: float
    high: float
    verdict: str
    stats: PairStatistics


@dataclass
class ScoutResult:
    """A student's candidate teachers, best predicted Δ first."""

    student: str
    teachers: list[ScoutedTeacher]
    method: str
    coverage: float
    n: int
    data: str
    setting: dict = field(default_factory=dict)

    @property
    def ranking(self) -> list[str]:
        return [t.teacher for t in self.teachers]

    @property
    def unlikely(self) -> list[str]:
        """The teachers unlikely to help: the upper end of their interval is at most 0."""
        return [t.teacher for t in self.teachers if t.verdict == VERDICTS[2]]

    def to_dict(self) -> dict:
        return _clean({
            "student": self.student, "method": self.method, "coverage": self.coverage, "n": self.n, "data": self.data, "setting": self.setting,
            "teachers": [{"teacher": t.teacher, "predicted": t.predicted, "low": t.low, "high": t.high, "verdict": t.verdict, **asdict(t.stats)} for t in self.teachers],
        })


def _as_model(model: Model | str, data_dir=None) -> Model:
    if isinstance(model, Model):
        return model
    from .models import load_model

    return load_model(str(model), data_dir=data_dir)


def _name(model: Model) -> str:
    return model.spec or model.name


def scout(student: Model | str, teachers: Sequence[Model | str], data: ImageData, *, predictor: ScoutPredictor | str | Path | None = None, cache: PredictionCache | None = None, device: str = "cpu", batch_size: int = 1024, data_dir=None) -> ScoutResult:
    """Rank candidate teachers for ``student`` by the Δ a transfer is predicted to give.

    ``data`` is held-out labelled data (not the data the ranking will be judged on): each model
    runs over it once, through ``cache``, so scouting again is free. ``predictor`` is a
    :class:`ScoutPredictor`, a file from ``ktransfer scout --fit``, or None for the shipped one.
    """
    if not teachers:
        raise ConfigError("name at least one teacher to scout")
    if not isinstance(predictor, ScoutPredictor):
        predictor = ScoutPredictor.load(predictor)
    if len(data) == 0:
        raise DataError(f"{data.name} holds no samples; scout on held-out labelled data")
    student_model = _as_model(student, data_dir)
    teacher_models = [_as_model(t, data_dir) for t in teachers]
    for model in [student_model, *teacher_models]:
        if model.num_classes != data.num_classes:
            raise ConfigError(f"{_name(model)} predicts {model.num_classes} classes but {data.name} has {data.num_classes}; scout models of the data's label space")
    names = [_name(t) for t in teacher_models]
    if _name(student_model) in names:
        raise ConfigError(f"{_name(student_model)} is the student; a model never teaches itself")
    cache = cache if cache is not None else PredictionCache()
    student_logits = cache.logits(student_model, data, batch_size, device)
    scouted = []
    for name, model in zip(names, teacher_models):
        stats = pair_statistics(data.labels, student_logits, cache.logits(model, data, batch_size, device), student=_name(student_model), teacher=name)
        predicted, low, high = predictor.predict_pair(stats)
        scouted.append(ScoutedTeacher(name, predicted, low, high, verdict(low, high), stats))
    scouted.sort(key=lambda t: -t.predicted)
    return ScoutResult(_name(student_model), scouted, predictor.method, predictor.coverage, len(data), data.name, predictor.setting)


__all__ = [
    "AVAILABLE_FEATURES", "FEATURES", "PairStatistics", "ScoutPredictor", "ScoutResult", "ScoutedPair", "ScoutedTeacher", "StudyFit", "fit_predictor", "fit_study",
    "flip_spread", "held_out_predictions", "leave_one_student_out", "pair_statistics", "routed_share", "scout", "spearman", "spearman_with_interval", "verdict",
]
