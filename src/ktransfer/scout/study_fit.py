"""A study folder's pairs and realised Δs, the predictor fitted on them (:func:`fit_study`) and the ``scout.json`` it leaves there."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..errors import ConfigError, DataError
from ..predictions import PredictionCache
from ..rank_statistics import spearman_with_interval
from .features import AVAILABLE_FEATURES, FEATURES, check_features, pair_statistics
from .fitting import ScoutedPair, leave_one_student_out, score_predictions
from .predictor import DEFAULT_COVERAGE, DEFAULT_RIDGE, ScoutPredictor, _clean, fit_predictor

STUDY_SCOUT_FILE = "scout.json"  # per-pair predicted and realised Δ, written into a study folder by the fit


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
    from ..study import StudyConfig

    config_path = folder / "study.yaml"
    if not config_path.is_file():
        raise DataError(f"{folder} has no study.yaml; fit on a folder written by 'ktransfer study'")
    return StudyConfig.load(config_path)


def study_records(folder: str | Path, method: str) -> dict[tuple[str, str], dict]:
    """The realised Δ of each pair of a study folder, for ``method``; a clear error when there is none."""
    from ..study import load_records

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
    from ..models import load_model

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
    from ..methods import create_method

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
    from ..data.overlap import shared_samples

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
