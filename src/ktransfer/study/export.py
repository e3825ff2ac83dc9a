"""A study's finished runs as records, ``results.csv``/``results.jsonl`` and a pandas DataFrame."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from ..controls import attach_controls, is_control, load_predictions
from ..errors import DataError
from ..extras import require
from .store import DB_FILE, LABELS_KEY, PREDICTIONS_DIR, StudyStore, study_records

def compare_with_controls(folder: Path, records: list[dict]) -> None:
    """Add each transfer's comparison with the controls of its setting (ktransfer.controls), from the predictions the study saved."""
    if not any(is_control(r) for r in records):
        return
    labels = load_predictions(folder / PREDICTIONS_DIR, LABELS_KEY)
    if labels is None:
        return
    predictions = {id(r): p for r in records if (p := load_predictions(folder / PREDICTIONS_DIR, r.get("run_key", ""))) is not None}
    attach_controls(records, predictions, labels)



# Columns first in the CSV and the DataFrame, in this order; the rest follow alphabetically.
LEADING_COLUMNS = (
    "student", "teacher", "method", "seed", "epochs", "lr", "acc_before", "acc_after", "teacher_acc", "delta", "knowledge_gain",
    "knowledge_loss", "p_value", "pos_flips_before", "pos_flips_after", "neg_flips_before", "neg_flips_after", "delta_pos_flips",
    "delta_neg_flips", "teacher_share", "ensemble_acc", "ensemble_delta", "oracle_acc", "capture", "n_eval", "n_transfer",
)


def flat_row(record: dict) -> dict:
    """One table row: scalars as they are, hyperparameters as ``hparam_NAME``, lists joined; the per-epoch history left out."""
    row: dict[str, Any] = {}
    for key, value in record.items():
        if key in ("history", "stages"):
            continue
        if key == "hparams" and isinstance(value, dict):
            row.update({f"hparam_{k}": v for k, v in value.items()})
        elif isinstance(value, (list, tuple)):
            row[key] = ",".join(map(str, value))
        elif isinstance(value, dict):
            row[key] = json.dumps(value, sort_keys=True)
        else:
            row[key] = value
    return row


def _columns(rows: list[dict]) -> list[str]:
    present = dict.fromkeys(k for row in rows for k in row)
    return [c for c in LEADING_COLUMNS if c in present] + sorted(k for k in present if k not in LEADING_COLUMNS)


def records_to_csv(records: list[dict]) -> str:
    rows = [flat_row(r) for r in records]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(rows), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def load_records(folder: str | Path) -> list[dict]:
    """Finished runs of a study folder (its database) or of any folder with a ``results.jsonl`` (the demo's, say)."""
    folder = Path(folder)
    if (folder / DB_FILE).exists():
        store = StudyStore(folder / DB_FILE)
        try:
            records = study_records(store)
        finally:
            store.close()
        compare_with_controls(folder, records)
        return records
    if (folder / "results.jsonl").exists():
        from ..results import read_records

        return read_records(folder / "results.jsonl")
    raise DataError(f"{folder} holds neither a study ({DB_FILE}) nor results.jsonl; run 'ktransfer study' or 'ktransfer demo' into it first")


def load_results(folder: str | Path, include_failed: bool = False):
    """The finished runs as a pandas DataFrame, one row per run (columns as in ``results.csv``).

    With ``include_failed`` the failed runs of a study come too, with ``status`` and ``error``.
    """
    pandas = require("pandas", "study", "load_results")
    folder = Path(folder)
    rows = [{**flat_row(r), "status": "done"} for r in load_records(folder)]
    if include_failed and (folder / DB_FILE).exists():
        store = StudyStore(folder / DB_FILE)
        try:
            plan = store.get_meta("plan")
            for row in store.rows("study", keys=plan) if plan is not None else store.rows("study"):
                if row["status"] == "failed":
                    config = json.loads(row["config"])
                    rows.append({
                        "student": row["student"], "teacher": row["teacher"], "method": row["method"], "seed": row["seed"],
                        "epochs": config["epochs"], "lr": config["lr"], **{f"hparam_{k}": v for k, v in config["params"].items()},
                        "status": "failed", "error": row["error"], "run_key": row["key"],
                    })
        finally:
            store.close()
    return pandas.DataFrame(rows, columns=_columns(rows) if rows else list(LEADING_COLUMNS))


def failed_runs(folder: str | Path) -> list[dict]:
    """Failed runs of a study folder (empty for a folder without a study database)."""
    folder = Path(folder)
    if not (folder / DB_FILE).exists():
        return []
    store = StudyStore(folder / DB_FILE)
    try:
        return [
            {"phase": row["phase"], "student": row["student"], "teacher": row["teacher"], "method": row["method"], "seed": row["seed"], "error": row["error"]}
            for row in store.rows() if row["status"] == "failed"
        ]
    finally:
        store.close()

