"""Complementary knowledge among N models (SPEC section 1): flip matrices and per-class views.

N models need N forward passes over the evaluation set (through :class:`PredictionCache`);
every pair is then read off the prediction vectors. :func:`analyze_predictions` is the pure
part, on prediction vectors alone; :func:`analyze` runs the models first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .data.base import ImageData
from .errors import ConfigError, DataError
from .metrics import (
    TOP_X_PERCENTS, accuracy, ceiling_matrices, class_concentration, dp_routing_summary, flip_matrices, mean_entropy, mean_true_class_probability,
    per_class_positive_flips, softmax,
)
from .models.base import Model
from .predictions import PredictionCache


@dataclass
class ComplementarityAnalysis:
    """Flip matrices (row = student, column = teacher, percent of ``n_eval``) and per-class positive flips.

    ``per_class[i, j, c]`` counts the evaluation samples of class ``c`` that model ``i`` gets
    wrong and model ``j`` gets right; the diagonal is zero.
    """

    models: list[str]
    class_names: list[str]
    n_eval: int
    accuracy: dict[str, float]
    positive_flips: np.ndarray
    negative_flips: np.ndarray
    per_class: np.ndarray
    percents: tuple[float, ...] = field(default=TOP_X_PERCENTS)
    # The ceiling of each pair (from probabilities; None when only top-1 predictions were given):
    # the ensemble's Δ over the student (row) and the oracle's accuracy, percent.
    ensemble_delta: np.ndarray | None = None
    oracle: np.ndarray | None = None

    def index(self, name: str) -> int:
        for candidate in (name, f"zoo:{name}"):
            if candidate in self.models:
                return self.models.index(candidate)
        short = [m for m in self.models if m.split(":", 1)[-1] == name]
        if len(short) == 1:
            return self.models.index(short[0])
        raise ConfigError(f"model {name!r} is not in this analysis; it has: {', '.join(self.models)}")

    def pairs(self) -> list[tuple[str, str]]:
        return [(s, t) for s in self.models for t in self.models if s != t]

    def pair_view(self, student: str, teacher: str) -> dict:
        """Per-class positive flips of ``teacher`` against ``student``: counts, entropy and top-X% classes by name."""
        i, j = self.index(student), self.index(teacher)
        if i == j:
            raise ConfigError(f"pick two different models for a pair; got {student!r} twice")
        counts = self.per_class[i, j]
        concentration = class_concentration(counts, self.percents)
        return {
            "student": self.models[i],
            "teacher": self.models[j],
            "positive_flips": float(self.positive_flips[i, j]),
            "negative_flips": float(self.negative_flips[i, j]),
            "flip_count": int(counts.sum()),
            "counts": [int(c) for c in counts],
            "class_names": list(self.class_names),
            "entropy": concentration["entropy"],
            "uniform_entropy": concentration["uniform_entropy"],
            "top_classes": {p: [self.class_names[c] for c in classes] for p, classes in concentration["top_classes"].items()},
            "n_eval": self.n_eval,
        }

    def pair_views(self) -> list[dict]:
        return [self.pair_view(s, t) for s, t in self.pairs()]

    def to_dict(self) -> dict:
        """A superset of the demo's ``complementarity.json``: the same keys, plus accuracy and per-class counts."""
        return {
            "models": list(self.models),
            "positive_flips": self.positive_flips.tolist(),
            "negative_flips": self.negative_flips.tolist(),
            "n_eval": self.n_eval,
            "accuracy": dict(self.accuracy),
            "class_names": list(self.class_names),
            "per_class_positive_flips": self.per_class.tolist(),
            **({"ensemble_delta": self.ensemble_delta.tolist()} if self.ensemble_delta is not None else {}),
            **({"oracle_accuracy": self.oracle.tolist()} if self.oracle is not None else {}),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def from_dict(cls, data: dict) -> "ComplementarityAnalysis":
        """Read :meth:`to_dict` output; the demo's older file (no per-class counts) loads with an empty per-class array."""
        try:
            models = list(data["models"])
            positive = np.asarray(data["positive_flips"], dtype=np.float64)
            negative = np.asarray(data["negative_flips"], dtype=np.float64)
            n_eval = int(data["n_eval"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"complementarity data lacks or garbles {exc}; rewrite it with 'ktransfer analyze --out'") from exc
        class_names = list(data.get("class_names") or [])
        per_class = np.asarray(data.get("per_class_positive_flips") or np.zeros((len(models), len(models), 0)), dtype=np.int64)
        ceiling = {key: np.asarray(data[key], dtype=np.float64) if data.get(key) is not None else None for key in ("ensemble_delta", "oracle_accuracy")}
        return cls(models, class_names, n_eval, dict(data.get("accuracy") or {}), positive, negative, per_class,
                   ensemble_delta=ceiling["ensemble_delta"], oracle=ceiling["oracle_accuracy"])

    @classmethod
    def load(cls, path: str | Path) -> "ComplementarityAnalysis":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read {path}: {exc}") from exc

    @property
    def has_per_class(self) -> bool:
        return self.per_class.ndim == 3 and self.per_class.shape[-1] > 0


def per_class_flip_tensor(labels, predictions: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """``[N, N, C]`` counts of positive flips per true class for every ordered pair at once.

    One matrix product per class (the samples of that class only), so memory stays at
    N × samples, never N × N × samples.
    """
    labels = np.asarray(labels).reshape(-1)
    right = np.stack([np.asarray(p).reshape(-1) == labels for p in predictions]).astype(np.int64)  # [N, S]
    out = np.zeros((len(predictions), len(predictions), num_classes), dtype=np.int64)
    for c in range(num_classes):
        of_class = labels == c
        if of_class.any():
            r = right[:, of_class]
            out[:, :, c] = (1 - r) @ r.T
    return out


def analyze_predictions(labels, predictions: Mapping[str, object], class_names: Sequence[str], probabilities: Mapping[str, object] | None = None) -> ComplementarityAnalysis:
    """The analysis from one prediction vector per model (top-1 class indices).

    With ``probabilities`` (per model ``[samples, C]``, the same names) the ceiling of every pair
    comes too: the ensemble's Δ over the student and the oracle's accuracy.
    """
    if len(predictions) < 2:
        raise ConfigError(f"an analysis needs at least two models; got {len(predictions)}")
    labels = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels).reshape(-1)
    vectors = {name: np.asarray(p.cpu() if hasattr(p, "cpu") else p).reshape(-1) for name, p in predictions.items()}
    names, positive, negative = flip_matrices(labels, vectors)
    per_class = per_class_flip_tensor(labels, [vectors[n] for n in names], len(class_names))
    ensemble = oracle = None
    if probabilities is not None:
        if set(probabilities) != set(names):
            raise ConfigError(f"give probabilities for the same models as predictions; got {', '.join(probabilities)} for {', '.join(names)}")
        _, ensemble, oracle = ceiling_matrices(labels, {name: probabilities[name] for name in names})
    return ComplementarityAnalysis(
        models=names,
        class_names=list(class_names),
        n_eval=len(labels),
        accuracy={name: accuracy(labels, vectors[name]) for name in names},
        positive_flips=positive,
        negative_flips=negative,
        per_class=per_class,
        ensemble_delta=ensemble,
        oracle=oracle,
    )


def analyze(models: Mapping[str, Model] | Sequence[Model], data: ImageData, cache: PredictionCache | None = None, device: str = "cpu") -> ComplementarityAnalysis:
    """Run each model once over ``data`` (cached), then analyse every pair."""
    if not isinstance(models, Mapping):
        models = {(m.spec or m.name): m for m in models}
    for name, model in models.items():
        if model.num_classes != data.num_classes:
            raise ConfigError(f"model {name} predicts {model.num_classes} classes but {data.name} has {data.num_classes}; analyse models of one label space")
    cache = cache if cache is not None else PredictionCache()
    logits = {name: cache.logits(model, data, device=device) for name, model in models.items()}
    predictions = {name: z.argmax(dim=1) for name, z in logits.items()}
    return analyze_predictions(data.labels, predictions, data.class_names, {name: softmax(z) for name, z in logits.items()})


# --------------------------------------------------------------------------- what the transfer set can carry


@dataclass
class TransferSetDiagnostics:
    """Before any training: how the models see the transfer set, against held-out data.

    ``per_model[name]``: accuracy, mean probability of the true class (percent) and mean entropy
    (nats) on the transfer set and on the held-out data. ``positive_flips_transfer`` and
    ``positive_flips_held_out``: ρ_pos matrices (row = student, column = teacher, percent) on
    each. ``routing``: per ordered pair, KL+DP's routing on the transfer set (``routed``: percent
    of samples routed to the teacher; ``routed_useful``: percent of those where the teacher is
    right and the original student wrong).
    """

    models: list[str]
    transfer_data: str
    held_out_data: str
    n_transfer: int
    n_held_out: int
    per_model: dict[str, dict[str, float]]
    positive_flips_transfer: np.ndarray
    positive_flips_held_out: np.ndarray
    routing: list[dict]

    def to_dict(self) -> dict:
        return {
            "models": list(self.models), "transfer_data": self.transfer_data, "held_out_data": self.held_out_data,
            "n_transfer": self.n_transfer, "n_held_out": self.n_held_out, "per_model": self.per_model,
            "positive_flips_transfer": self.positive_flips_transfer.tolist(), "positive_flips_held_out": self.positive_flips_held_out.tolist(),
            "routing": self.routing,
        }


def diagnose_probabilities(transfer_labels, transfer: Mapping[str, object], held_out_labels, held_out: Mapping[str, object], *, transfer_name: str = "transfer data", held_out_name: str = "held-out data") -> TransferSetDiagnostics:
    """The diagnostics from each model's probabilities ``[samples, C]`` on the transfer set and on held-out data (pure)."""
    names = list(transfer)
    if len(names) < 2:
        raise ConfigError(f"transfer-set diagnostics need at least two models; got {len(names)}")
    if set(held_out) != set(names):
        raise ConfigError(f"give the same models on both data sets; got {', '.join(names)} and {', '.join(held_out)}")
    per_model, predictions = {}, {"transfer": {}, "held_out": {}}
    for name in names:
        row = {}
        for part, labels, probs in (("transfer", transfer_labels, transfer[name]), ("held_out", held_out_labels, held_out[name])):
            top = np.asarray(probs).argmax(axis=1)
            predictions[part][name] = top
            row[f"{part}_acc"] = accuracy(labels, top)
            row[f"{part}_true_class_probability"] = mean_true_class_probability(labels, probs)
            row[f"{part}_entropy"] = mean_entropy(probs)
        per_model[name] = row
    _, flips_transfer, _ = flip_matrices(transfer_labels, predictions["transfer"])
    _, flips_held_out, _ = flip_matrices(held_out_labels, predictions["held_out"])
    routing = [
        {"student": s, "teacher": t, **dp_routing_summary(transfer_labels, transfer[s], transfer[t])}
        for s in names for t in names if s != t
    ]
    return TransferSetDiagnostics(names, transfer_name, held_out_name, len(np.asarray(transfer_labels).reshape(-1)), len(np.asarray(held_out_labels).reshape(-1)),
                                  per_model, flips_transfer, flips_held_out, routing)


def diagnose_transfer_set(models: Mapping[str, Model] | Sequence[Model], transfer_data: ImageData, held_out_data: ImageData, cache: PredictionCache | None = None, device: str = "cpu") -> TransferSetDiagnostics:
    """Run each model once over the transfer set and the held-out data (cached), then :func:`diagnose_probabilities`."""
    if not isinstance(models, Mapping):
        models = {(m.spec or m.name): m for m in models}
    if list(transfer_data.class_names) != list(held_out_data.class_names):
        raise ConfigError(f"{transfer_data.name} and {held_out_data.name} have different classes; diagnose a transfer set in the label space of the held-out data")
    for name, model in models.items():
        if model.num_classes != transfer_data.num_classes:
            raise ConfigError(f"model {name} predicts {model.num_classes} classes but {transfer_data.name} has {transfer_data.num_classes}; diagnose models of its label space")
    cache = cache if cache is not None else PredictionCache()
    probs = {
        part: {name: softmax(cache.logits(model, data, device=device)) for name, model in models.items()}
        for part, data in (("transfer", transfer_data), ("held_out", held_out_data))
    }
    return diagnose_probabilities(transfer_data.labels, probs["transfer"], held_out_data.labels, probs["held_out"], transfer_name=transfer_data.name, held_out_name=held_out_data.name)


# Re-exported so users find the single-pair function next to the all-pairs one.
__all__ = [
    "ComplementarityAnalysis", "TransferSetDiagnostics", "analyze", "analyze_predictions", "diagnose_probabilities", "diagnose_transfer_set",
    "per_class_flip_tensor", "per_class_positive_flips",
]
