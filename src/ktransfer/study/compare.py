"""Two methods of a study folder head to head, on the same pairs, settings and seeds.

A study's summary compares every method with the controls; this compares two methods with each other,
say a new method with KL+DP. Over pairs (a pair's difference is its mean over seeds) it counts how
often the method is ahead and tests that count with a sign test; over every image of every shared run
it counts the images only one of the two gets right and tests them with McNemar's exact test. The
McNemar test is optimistic where a study has several pairs: the same evaluation images count once per
pair and seed, so it covers the noise of the evaluation sample, not of training or of the choice of
pairs. The sign test over pairs is the one to read first.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from ..controls import SETTING_KEYS, is_control, load_predictions, setting_key
from ..errors import DataError
from ..metrics import paired_counts
from ..significance import mcnemar_p_value
from .export import load_records
from .store import LABELS_KEY, PREDICTIONS_DIR


def _runs_by_setting(records: list[dict], method: str, folder: Path) -> dict[tuple, dict]:
    runs: dict[tuple, dict] = {}
    for record in records:
        if record["method"] != method or is_control(record):
            continue
        key = (str(record.get("teacher")), setting_key(record))
        if key in runs:
            raise DataError(
                f"{folder} holds several runs of {method!r} for {record.get('teacher')} → {record['student']} with the same setting "
                "(its hyperparameters differ): compare a folder that holds one setting of each method"
            )
        runs[key] = record
    return runs


def compare_methods(folder: str | Path, method: str, reference: str) -> dict:
    """``method`` against ``reference`` on every run they share in the study (or demo) folder ``folder``.

    Runs are matched by teacher, student, training setting and seed. Returns the counts and tests
    described in the module's docstring: ``pairs``, ``runs``, ``ahead``, ``behind``, ``level``,
    ``mean_difference`` (points, over pairs), ``sign_test_p``, ``only_method`` and ``only_reference``
    (images right after one run and wrong after the other, summed over runs) and ``mcnemar_p``;
    ``by_pair`` lists each pair's difference.
    """
    folder = Path(folder)
    records = load_records(folder)
    if method == reference:
        raise DataError(f"compare two different methods (both are {method!r})")
    present = sorted({r["method"] for r in records if not is_control(r)})
    runs = {}
    for name in (method, reference):
        runs[name] = _runs_by_setting(records, name, folder)
        if not runs[name]:
            raise DataError(f"{folder} has no finished run of {name!r}; its methods are {', '.join(present) or 'none'}")
    shared = sorted(runs[method].keys() & runs[reference].keys())
    if not shared:
        raise DataError(f"no run of {method!r} in {folder} shares its teacher, student, setting and seed with a run of {reference!r}")
    labels = load_predictions(folder / PREDICTIONS_DIR, LABELS_KEY)
    if labels is None:
        raise DataError(f"{folder} keeps no evaluation predictions ({PREDICTIONS_DIR}/{LABELS_KEY}.pt): rerun the study into it to compare images")

    seed_at = SETTING_KEYS.index("seed")  # a pair is its setting without the seed
    differences: dict[tuple, list[float]] = defaultdict(list)
    only_method = only_reference = 0
    for key in shared:
        a, b = runs[method][key], runs[reference][key]
        teacher, setting = key
        pair = (a["student"], teacher, setting[:seed_at] + setting[seed_at + 1:])
        differences[pair].append(a["acc_after"] - b["acc_after"])
        predictions_a = load_predictions(folder / PREDICTIONS_DIR, a.get("run_key", ""))
        predictions_b = load_predictions(folder / PREDICTIONS_DIR, b.get("run_key", ""))
        if predictions_a is None or predictions_b is None:
            raise DataError(f"the evaluation predictions of {teacher} → {a['student']} (seed {a.get('seed')}) are missing in {folder / PREDICTIONS_DIR}: rerun the study into the folder")
        first_only, second_only = paired_counts(labels, predictions_a, predictions_b)
        only_method += first_only
        only_reference += second_only

    by_pair = [{"student": student, "teacher": teacher, "seeds": len(values), "difference": statistics.fmean(values)}
               for (student, teacher, _), values in sorted(differences.items(), key=lambda item: item[0][:2])]
    ahead = sum(1 for p in by_pair if p["difference"] > 0)
    behind = sum(1 for p in by_pair if p["difference"] < 0)
    return {
        "method": method,
        "reference": reference,
        "pairs": len(by_pair),
        "runs": len(shared),
        "ahead": ahead,
        "behind": behind,
        "level": len(by_pair) - ahead - behind,
        "mean_difference": statistics.fmean(p["difference"] for p in by_pair),
        "sign_test_p": mcnemar_p_value(ahead, behind),  # the same exact binomial test, over pairs instead of images
        "only_method": only_method,
        "only_reference": only_reference,
        "mcnemar_p": mcnemar_p_value(only_method, only_reference),
        "by_pair": by_pair,
    }
