"""Scouting: a student's candidate teachers ranked by the Δ the predictor gives each, with a verdict from its interval."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from ..data.base import ImageData
from ..errors import ConfigError, DataError
from ..models.base import Model
from ..predictions import PredictionCache
from .features import PairStatistics, pair_statistics
from .predictor import ScoutPredictor, _clean

VERDICTS = ("likely to help", "uncertain", "unlikely to help")


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
    from ..models import load_model

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
