"""What a report reads from a folder, and the aggregates its tables and figures share.

A folder is a study folder (``study.db`` plus the files the study writes) or any folder with a
``results.jsonl`` (``ktransfer demo``, ``ktransfer transfer``). ``zoo.json``,
``complementarity.json``, ``search.json`` and ``scout.json`` are used where present.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..analysis import ComplementarityAnalysis
from ..errors import DataError
from ..results import is_control, pair_means, success_by_student


def short(spec) -> str:
    """Model names as readers know them: ``zoo:cnn`` shows as ``cnn``."""
    return str(spec).removeprefix("zoo:")


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class ReportData:
    title: str
    records: list[dict]  # single-teacher runs
    controls: list[dict] = field(default_factory=list)  # ce and self runs (no teacher)
    multi_teacher: list[dict] = field(default_factory=list)  # runs with a ``strategy``
    zoo: list[dict] = field(default_factory=list)
    analysis: ComplementarityAnalysis | None = None
    search: dict | None = None
    failed: list[dict] = field(default_factory=list)
    scout: dict | None = None  # scout.json: per pair predicted and realised Δ, written by 'ktransfer scout --fit'

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.records))

    @property
    def students(self) -> list[str]:
        return list(dict.fromkeys(r["student"] for r in self.records))

    @property
    def n_eval(self) -> str:
        """The evaluation-set size(s) behind the numbers, as text (several if runs differ)."""
        sizes = sorted({int(r["n_eval"]) for r in [*self.records, *self.multi_teacher] if is_number(r.get("n_eval"))})
        return " / ".join(f"{n:,}" for n in sizes) or "–"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path.name} in {path.parent}: {exc}; delete or repair it") from exc


def _usable(record: dict) -> bool:
    return all(is_number(record.get(k)) for k in ("delta", "knowledge_gain", "knowledge_loss")) and "student" in record


def load(folder: str | Path) -> ReportData:
    from ..study import failed_runs, load_records

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; give the folder of a study or of 'ktransfer demo'")
    records = load_records(folder)
    single = [r for r in records if "strategy" not in r and not is_control(r) and _usable(r) and "teacher" in r and "method" in r]
    controls = [r for r in records if is_control(r) and _usable(r)]
    multi = [r for r in records if "strategy" in r]
    if not single and not multi:
        raise DataError(f"{folder} has no finished transfer runs yet; run the study or demo first")
    zoo = _read_json(folder / "zoo.json") if (folder / "zoo.json").exists() else []
    analysis = ComplementarityAnalysis.load(folder / "complementarity.json") if (folder / "complementarity.json").exists() else None
    search = _read_json(folder / "search.json") if (folder / "search.json").exists() else None
    scout = _read_json(folder / "scout.json") if (folder / "scout.json").exists() else None
    title = next((r["study"] for r in records if r.get("study")), None) or folder.resolve().name
    return ReportData(title, single, controls, multi, zoo if isinstance(zoo, list) else [], analysis, search, failed_runs(folder), scout if isinstance(scout, dict) else None)


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if is_number(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def success_rates(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per method, per student: the share (percent) of its teachers with Δ > 0 (SPEC §2), as every summary counts it."""
    return success_by_student(records)


def success_summary(data: ReportData) -> list[dict]:
    rates = success_rates(data.records)
    deltas = pair_means(data.records)
    rows = []
    for method in data.methods:
        per_student = list(rates.get(method, {}).values())
        pairs = [d for (m, _, _), d in deltas.items() if m == method]
        runs = [r for r in data.records if r["method"] == method]
        rows.append({
            "method": method,
            "students": len(per_student),
            "median": statistics.median(per_student) if per_student else float("nan"),
            "mean": statistics.fmean(per_student) if per_student else float("nan"),
            "min": min(per_student, default=float("nan")),
            "max": max(per_student, default=float("nan")),
            "positive": sum(1 for d in pairs if d > 0),
            "pairs": len(pairs),
            "mean_delta": mean_std([r["delta"] for r in runs])[0],
            "runs": len(runs),
            "n_eval": _n_eval(runs),
        })
    return rows


def ceiling_points(records: list[dict]) -> list[dict]:
    """One point per (method, student, teacher) with the ceiling keys: its ensemble Δ and its Δ averaged over seeds."""
    groups: dict[tuple, dict] = {}
    for r in records:
        if not is_number(r.get("ensemble_delta")) or not is_number(r.get("delta")):
            continue
        key = (r["method"], r["student"], r["teacher"])
        group = groups.setdefault(key, {"method": key[0], "student": key[1], "teacher": key[2], "ensemble_delta": r["ensemble_delta"], "deltas": []})
        group["deltas"].append(r["delta"])
    points = []
    for group in groups.values():
        delta = statistics.fmean(group.pop("deltas"))
        points.append({**group, "delta": delta, "capture": delta / group["ensemble_delta"] if group["ensemble_delta"] > 0 else None})
    return points


def _n_eval(records: list[dict]) -> str:
    sizes = sorted({int(r["n_eval"]) for r in records if is_number(r.get("n_eval"))})
    return " / ".join(f"{n:,}" for n in sizes) or "–"


def per_student(data: ReportData) -> list[dict]:
    """Per student and method: mean ± std of Δ, Δρ_pos and Δρ_neg over its teachers and seeds (Tables 7, 8)."""
    rows = []
    for student in data.students:
        runs = [r for r in data.records if r["student"] == student]
        row = {"student": student, "acc_before": mean_std([r.get("acc_before") for r in runs])[0], "n_eval": _n_eval(runs), "methods": {}}
        for method in data.methods:
            of_method = [r for r in runs if r["method"] == method]
            row["methods"][method] = {
                "runs": len(of_method),
                "delta": mean_std([r["delta"] for r in of_method]),
                "delta_pos_flips": mean_std([_delta_flips(r, "pos") for r in of_method]),
                "delta_neg_flips": mean_std([_delta_flips(r, "neg") for r in of_method]),
                "positive": sum(1 for r in of_method if r["delta"] > 0),
            }
        rows.append(row)
    return rows


def _delta_flips(record: dict, kind: str):
    value = record.get(f"delta_{kind}_flips")
    if is_number(value):
        return value
    before, after = record.get(f"{kind}_flips_before"), record.get(f"{kind}_flips_after")
    return after - before if is_number(before) and is_number(after) else None


def histories(records: list[dict]) -> list[tuple[str, list[dict]]]:
    """(group, per-epoch history) of every run that has one; multi-teacher runs chain their stages."""
    out = []
    for r in records:
        history = r.get("history")
        if not history and isinstance(r.get("stages"), list):
            history, offset = [], 0
            for stage in r["stages"]:
                stage_history = stage.get("history") if isinstance(stage, dict) else None
                for entry in stage_history or []:
                    history.append({**entry, "epoch": offset + int(entry.get("epoch", len(history) - offset + 1))})
                offset = len(history)
        history = [h for h in history or [] if isinstance(h, dict) and is_number(h.get("delta"))]
        if history:
            group = r["method"] if "strategy" not in r else f"{r['strategy']} ({r.get('method', '?')})"
            out.append((group, history))
    return out


def multi_teacher_rows(records: list[dict], single: list[dict] | None = None) -> list[dict]:
    """The multi-teacher table, read tolerantly: teachers as a list or a string, stages optional.

    Where the folder also has single-teacher runs of the same student and method from those
    teachers, their mean and best Δ stand beside (paper Table 9 compares with both).
    """
    rows = []
    for r in records:
        teachers = r.get("teachers") or r.get("teacher") or []
        if isinstance(teachers, str):
            teachers = [teachers]
        stages = r.get("stages") if isinstance(r.get("stages"), list) else []
        singles = [s["delta"] for s in single or [] if s["student"] == r.get("student") and s["method"] == r.get("method") and s["teacher"] in teachers]
        rows.append({
            "strategy": str(r.get("strategy")),
            "method": str(r.get("method", "–")),
            "student": short(r.get("student", "–")),
            "teachers": ", ".join(short(t) for t in teachers) or "–",
            "stages": len(stages),
            "acc_before": r.get("acc_before"),
            "acc_after": r.get("acc_after"),
            "delta": r.get("delta"),
            "knowledge_gain": r.get("knowledge_gain"),
            "knowledge_loss": r.get("knowledge_loss"),
            "single_mean_delta": statistics.fmean(singles) if singles else None,
            "single_best_delta": max(singles) if singles else None,
            "single_runs": len(singles),
            "n_eval": r.get("n_eval"),
        })
    return rows
