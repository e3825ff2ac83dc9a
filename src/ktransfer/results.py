"""The ``results.jsonl`` format shared by every command that writes transfer results, and summaries of it."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Iterable

from .errors import DataError
from .metrics import success_rate

REQUIRED_KEYS = (
    "student", "teacher", "method", "acc_before", "acc_after", "teacher_acc", "delta", "knowledge_gain", "knowledge_loss",
    "pos_flips_before", "pos_flips_after", "neg_flips_before", "neg_flips_after", "epochs", "lr", "seed", "n_eval", "seconds", "hparams",
)


def _clean(value):
    """JSON has no NaN: write None instead, so the file stays readable by any JSON parser."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def append_record(path: Path, record: dict) -> None:
    """Append one record as a line and flush it, so finished work survives an interruption."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(_clean(record), sort_keys=False) + "\n")
        handle.flush()


def read_records(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no results file at {path}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg}); remove or repair that line") from exc
    return records


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


def summarize(records: list[dict]) -> dict[str, dict]:
    """Per method: pairs, success rate (Δ > 0), mean Δ, and mean Δ for weaker and stronger teachers."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in records):
        rows = [r for r in records if r["method"] == method]
        weaker = [r["delta"] for r in rows if r["teacher_acc"] < r["acc_before"]]
        stronger = [r["delta"] for r in rows if r["teacher_acc"] >= r["acc_before"]]
        out[method] = {
            "pairs": len(rows),
            "positive": sum(1 for r in rows if r["delta"] > 0),
            "success_rate": success_rate(r["delta"] for r in rows),
            "mean_delta": _mean(r["delta"] for r in rows),
            "mean_delta_weaker_teacher": _mean(weaker),
            "weaker_pairs": len(weaker),
            "weaker_negative": sum(1 for d in weaker if d < 0),
            "mean_delta_stronger_teacher": _mean(stronger),
            "stronger_pairs": len(stronger),
            "mean_knowledge_gain": _mean(r["knowledge_gain"] for r in rows),
            "mean_knowledge_loss": _mean(r["knowledge_loss"] for r in rows),
        }
    return out
