"""The ``results.jsonl`` format shared by every command that writes transfer results, and summaries of it."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from fractions import Fraction
from pathlib import Path
from typing import Iterable

from .errors import DataError
from .metrics import mcnemar_p_value, significance_summary, success_rate
from .paths import atomic_write_bytes

ALPHA = 0.05  # the significance level of every table

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


def write_records(path: Path, records: Iterable[dict]) -> None:
    """Replace ``path`` with ``records``, one per line, atomically: a reader never sees half a file."""
    atomic_write_bytes(Path(path), "".join(json.dumps(_clean(r)) + "\n" for r in records).encode("utf-8"))


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


def is_control(record: dict) -> bool:
    """A control run (``ce`` or ``self``, no teacher), kept apart from transfers in every summary."""
    return bool(record.get("control"))


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def exact_delta(record: dict) -> Fraction | float:
    """A record's Δ (percent) as an exact fraction of its integer counts, so a mean of Δs that is 0 comes out exactly 0.

    The counts are ``gain_count − loss_count`` (which equals correct_after − correct_before) over
    ``n_eval``. A record without them gives its count back from ``delta × n_eval / 100`` where that
    reproduces ``delta``; otherwise its float ``delta`` is taken exactly as it is.
    """
    delta, n_eval = record["delta"], record.get("n_eval")
    if _is_count(n_eval) and n_eval > 0:
        gain, loss = record.get("gain_count"), record.get("loss_count")
        if _is_count(gain) and _is_count(loss):
            return Fraction(100 * (gain - loss), n_eval)
        count = round(delta * n_eval / 100)
        if 100.0 * count / n_eval == delta:
            return Fraction(100 * count, n_eval)
    return Fraction(delta) if math.isfinite(delta) else delta


def pair_means(records: Iterable[dict], key: str = "delta") -> dict[tuple[str, str, str], float]:
    """Mean of ``key`` per (method, student, teacher), over seeds: a pair counts once in a success rate.

    Δ (``key == "delta"``) is averaged exactly over the integer counts (:func:`exact_delta`): the float
    percentages ``100·k/n`` of counts that sum to 0 would average to ±1e-17 and count as a success.
    """
    groups: dict[tuple[str, str, str], list] = defaultdict(list)
    for r in records:
        if r.get(key) is not None:
            groups[(r["method"], r["student"], r["teacher"])].append(exact_delta(r) if key == "delta" else r[key])
    if key != "delta":
        return {pair: statistics.fmean(values) for pair, values in groups.items()}
    return {pair: _exact_mean(values) for pair, values in groups.items()}


def _exact_mean(values: list) -> float:
    if all(isinstance(v, Fraction) for v in values):
        return float(sum(values, Fraction(0)) / len(values))  # a nonzero fraction never rounds to 0.0 here
    return statistics.fmean(float(v) for v in values)


# Each p-value of a record, with the discordant counts of its paired test: pooled over seeds by summing them.
PAIRED_TESTS = (
    ("p_value", "gain_count", "loss_count"),
    ("p_value_vs_control", "gain_count_vs_control", "loss_count_vs_control"),
    ("p_value_vs_self", "gain_count_vs_self", "loss_count_vs_self"),
)
# Averaged over seeds (and spread given as ``KEY_std``) where several seeds ran.
_MEANS = (
    "acc_before", "acc_after", "teacher_acc", "delta", "knowledge_gain", "knowledge_loss", "teacher_share", "ensemble_acc",
    "ensemble_delta", "oracle_acc", "control_delta", "self_delta", "delta_vs_control", "delta_vs_self", "seconds",
)
_SPREADS = ("delta", "delta_vs_control", "delta_vs_self")


def _group_key(record: dict) -> tuple:
    """What the seeds of one pair share: the method at one setting, the student and the teacher."""
    return (is_control(record), record["method"], record["student"], record.get("teacher"), record.get("lr"), json.dumps(record.get("hparams"), sort_keys=True, default=str))


def pool_seeds(records: Iterable[dict]) -> list[dict]:
    """One row per pair and method (per student for a control), its seeds pooled; rows in the order pairs first appear.

    A pair with one seed is its record unchanged. With several: the accuracies and Δs are means (Δ exactly, from the integer counts: :func:`exact_delta`)
    over seeds (``delta_std``, ``delta_vs_control_std``, ``delta_vs_self_std`` their sample
    standard deviations), the discordant counts are sums, and each p-value is the exact McNemar
    test on the summed gain and loss counts. That test treats every (seed, sample) pair as a
    discordant unit of its own, as if the seeds had drawn new evaluation images; they did not
    (the same images are scored in every seed), so it is an approximation that grows
    optimistic where seeds agree closely. Where a record lacks the counts (older files) the
    pooled p-value is None. ``capture`` is recomputed from the mean Δ; ``seeds`` counts the
    records pooled and ``seed`` is None.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[_group_key(r)].append(r)
    pooled = []
    for rows in groups.values():
        if len(rows) == 1:
            pooled.append({**rows[0], "seeds": 1})
            continue
        row = {**rows[0], "seed": None, "seeds": len(rows)}
        for key in _MEANS:
            values = [r.get(key) for r in rows]
            row[key] = statistics.fmean(values) if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) else None
        if row.get("delta") is not None:  # exactly, from the integer counts: Δs whose counts sum to 0 average to 0.0, not ±1e-17
            row["delta"] = _exact_mean([exact_delta(r) for r in rows])
        for key in _SPREADS:
            values = [r.get(key) for r in rows]
            row[f"{key}_std"] = statistics.stdev(values) if all(isinstance(v, (int, float)) for v in values) else None
        for p_key, gain_key, loss_key in PAIRED_TESTS:
            gains, losses = [r.get(gain_key) for r in rows], [r.get(loss_key) for r in rows]
            if all(isinstance(c, int) for c in gains + losses):
                row[gain_key], row[loss_key] = sum(gains), sum(losses)
                row[p_key] = mcnemar_p_value(row[gain_key], row[loss_key])
            elif any(r.get(p_key) is not None for r in rows):
                row[p_key] = None
                row.pop(gain_key, None), row.pop(loss_key, None)
        if row.get("ensemble_delta") is not None and row.get("delta") is not None:
            row["capture"] = row["delta"] / row["ensemble_delta"] if row["ensemble_delta"] > 0 else None
        for key in ("history", "guard_epoch", "last_epoch", "run_key"):  # one seed's, not the pair's
            row.pop(key, None)
        pooled.append(row)
    return pooled


def success_by_student(records: Iterable[dict], significant: bool = False, alpha: float = ALPHA) -> dict[str, dict[str, float]]:
    """Per method, per student: the share (percent) of its teachers with Δ > 0 (the paper's success rate, SPEC §2).

    Pairs are averaged over seeds first. With ``significant``, a pair counts only where its Δ is
    also significant: McNemar p < ``alpha``, with several seeds the test pooled over them (:func:`pool_seeds`).
    """
    pairs = pool_seeds(r for r in records if not is_control(r))
    by_student: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in pairs:
        value = (1.0 if row["delta"] > 0 and _significant(row, "p_value", alpha) else 0.0) if significant else row["delta"]
        by_student[row["method"]][row["student"]].append(value)
    return {method: {student: success_rate(values) for student, values in students.items()} for method, students in by_student.items()}


def median_success_rate(per_student: dict[str, float]) -> float:
    """The paper's summary of a method: the median over students of their success rates."""
    return statistics.median(per_student.values()) if per_student else float("nan")


def _significant(record: dict, key: str, alpha: float) -> bool:
    p = record.get(key)
    return p is not None and p < alpha


def _count(rows, test) -> int:
    return sum(1 for r in rows if test(r))


def _versus(rows: list[dict], name: str, alpha: float) -> dict:
    compared = [r for r in rows if r.get(f"delta_vs_{name}") is not None]
    return {
        f"compared_with_{name}": len(compared),
        f"beats_{name}": _count(compared, lambda r: r[f"delta_vs_{name}"] > 0),
        f"beats_{name}_significantly": _count(compared, lambda r: r[f"delta_vs_{name}"] > 0 and _significant(r, f"p_value_vs_{name}", alpha)),
        f"mean_delta_vs_{name}": _mean(r[f"delta_vs_{name}"] for r in compared),
    }


def summarize(records: list[dict], alpha: float = ALPHA) -> dict[str, dict]:
    """Per method (controls apart): success rates, mean Δ (± std over seeds), Δ by teacher strength, and each control's comparison.

    ``success_rate`` is the paper's: per student the share of teachers with Δ > 0, then the median
    over students; ``success_rate_significant`` counts only Δ > 0 with McNemar p < ``alpha``. With
    many pairs some p-values are small by chance: ``expected_by_chance`` is that count
    (``alpha`` × pairs), ``fdr_discoveries`` the Benjamini–Hochberg discoveries at FDR ``alpha``.
    Every count is of pairs: with several seeds a pair's Δ is its mean over seeds and its p-value
    the McNemar test pooled over them (:func:`pool_seeds`); ``runs`` counts the records.
    """
    out: dict[str, dict] = {}
    transfers = [r for r in records if not is_control(r)]
    rates = success_by_student(transfers, alpha=alpha)
    significant_rates = success_by_student(transfers, significant=True, alpha=alpha)
    pooled = pool_seeds(transfers)
    for method in dict.fromkeys(r["method"] for r in transfers):
        runs = [r for r in transfers if r["method"] == method]
        rows = [r for r in pooled if r["method"] == method]
        weaker = [r["delta"] for r in rows if r["teacher_acc"] < r["acc_before"]]
        stronger = [r["delta"] for r in rows if r["teacher_acc"] >= r["acc_before"]]
        seeds = sorted({r.get("seed") for r in runs}, key=str)
        seed_means = [_mean(r["delta"] for r in runs if r.get("seed") == seed) for seed in seeds]
        p_values = [r.get("p_value") for r in rows]
        significance = significance_summary(p_values, alpha=alpha, fdr=alpha)
        out[method] = {
            "pairs": len(rows),
            "runs": len(runs),
            "positive": _count(rows, lambda r: r["delta"] > 0),
            "significant_positive": _count(rows, lambda r: r["delta"] > 0 and _significant(r, "p_value", alpha)),
            "significant_negative": _count(rows, lambda r: r["delta"] < 0 and _significant(r, "p_value", alpha)),
            "success_rate": median_success_rate(rates.get(method, {})),
            "success_rate_significant": median_success_rate(significant_rates.get(method, {})),
            "success_by_student": rates.get(method, {}),
            "students": len(rates.get(method, {})),
            "mean_delta": _mean(r["delta"] for r in runs),
            "seeds": len(seeds),
            "mean_delta_std_over_seeds": statistics.stdev(seed_means) if len(seed_means) > 1 else None,
            "mean_delta_weaker_teacher": _mean(weaker),
            "weaker_pairs": len(weaker),
            "weaker_negative": sum(1 for d in weaker if d < 0),
            "mean_delta_stronger_teacher": _mean(stronger),
            "stronger_pairs": len(stronger),
            "mean_knowledge_gain": _mean(r["knowledge_gain"] for r in runs),
            "mean_knowledge_loss": _mean(r["knowledge_loss"] for r in runs),
            "expected_by_chance": significance["expected_by_chance"],
            "fdr_discoveries": significance["discoveries"],
            **_versus(rows, "control", alpha),
            **_versus(rows, "self", alpha),
            **ceiling_summary(runs),
        }
    return out


def ceiling_summary(rows: list[dict]) -> dict:
    """The ceiling of a method's pairs: mean ensemble Δ, and the median capture over the pairs whose ensemble Δ is positive.

    A pair's capture is its mean Δ over seeds divided by its ensemble Δ (the same in every seed: the
    models before transfer). Records without the ceiling keys (older files) do not count.
    """
    pairs: dict[tuple, dict] = {}
    for r in rows:
        if r.get("ensemble_delta") is None:
            continue
        pair = pairs.setdefault((r["student"], r["teacher"]), {"ensemble_delta": r["ensemble_delta"], "deltas": []})
        pair["deltas"].append(r["delta"])
    ceilings = [p["ensemble_delta"] for p in pairs.values()]
    captures = [statistics.fmean(p["deltas"]) / p["ensemble_delta"] for p in pairs.values() if p["ensemble_delta"] > 0]
    return {
        "ceiling_pairs": len(pairs),
        "mean_ensemble_delta": _mean(ceilings),
        "capture_pairs": len(captures),  # pairs with ensemble Δ > 0, where capture is defined
        "median_capture": statistics.median(captures) if captures else None,
    }


def summarize_controls(records: list[dict], alpha: float = ALPHA) -> dict[str, dict]:
    """Per control (``ce``, ``self``): runs, mean Δ (± std over seeds) and how many students' Δs are significant either way.

    With several seeds a student's Δ is its mean over seeds and its p-value pooled over them (:func:`pool_seeds`).
    """
    out: dict[str, dict] = {}
    controls = [r for r in records if is_control(r)]
    pooled = pool_seeds(controls)
    for kind in dict.fromkeys(r["method"] for r in controls):
        runs = [r for r in controls if r["method"] == kind]
        rows = [r for r in pooled if r["method"] == kind]
        seeds = sorted({r.get("seed") for r in runs}, key=str)
        seed_means = [_mean(r["delta"] for r in runs if r.get("seed") == seed) for seed in seeds]
        out[kind] = {
            "runs": len(runs),
            "students": len({r["student"] for r in rows}),
            "mean_delta": _mean(r["delta"] for r in runs),
            "mean_delta_std_over_seeds": statistics.stdev(seed_means) if len(seed_means) > 1 else None,
            "min_delta": min(r["delta"] for r in rows),
            "max_delta": max(r["delta"] for r in rows),
            "significant_positive": _count(rows, lambda r: r["delta"] > 0 and _significant(r, "p_value", alpha)),
            "significant_negative": _count(rows, lambda r: r["delta"] < 0 and _significant(r, "p_value", alpha)),
            "by_student": {student: _mean(r["delta"] for r in rows if r["student"] == student) for student in dict.fromkeys(r["student"] for r in rows)},
        }
    return out
