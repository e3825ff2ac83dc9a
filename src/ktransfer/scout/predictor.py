"""The scouting predictor: standardised features, ridge regression, an interval from leave-one-out residuals; its file and the shipped one."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConfigError, DataError
from .features import AVAILABLE_FEATURES, FEATURES, PairStatistics

DEFAULT_PREDICTOR = "scout_predictor.json"  # shipped inside the package
PREDICTOR_FILE = "scout-predictor.json"  # the fitted predictor, default place: the study folder
DEFAULT_RIDGE = 1.0
DEFAULT_COVERAGE = 0.9


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
