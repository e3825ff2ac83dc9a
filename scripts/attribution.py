"""Where a method's gains land: on the images the teacher gets right, or anywhere, as the controls' do.

A transfer's knowledge gain (images wrong before, right after) could come from the teacher or from more
training alone. If it is the teacher's, it lands on the teacher's positive flips (images the teacher gets
right and the student wrong) more often than the `ce` and `self` controls' gains do, measured against the
same teacher. For every transfer of METHOD in a study or demo folder and the controls of its student and seed:

    python scripts/attribution.py FOLDER [--method kl_dp]

prints, pooled over all pairs and seeds: the base rate (the share of the student's errors the teacher gets
right), each run kind's gains and the share of them on images the teacher gets right, the share of the
teacher's positive flips it closed, and its losses and the share of them on images the teacher gets wrong.
It reads the folder's saved predictions and the teachers' predictions from the prediction cache (computed
where missing), so it trains nothing.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch


def attribution_counts(labels: torch.Tensor, before: torch.Tensor, teacher: torch.Tensor, after: torch.Tensor) -> Counter:
    """Counts over the evaluation images of one run against one teacher (all arguments are predicted classes, ``[N]``)."""
    right_before, teacher_right, right_after = before == labels, teacher == labels, after == labels
    gained, lost = ~right_before & right_after, right_before & ~right_after
    positive = ~right_before & teacher_right
    return Counter({
        "errors": int((~right_before).sum()), "positive_flips": int(positive.sum()),
        "gains": int(gained.sum()), "gains_teacher_right": int((gained & teacher_right).sum()), "closed": int((positive & right_after).sum()),
        "losses": int(lost.sum()), "losses_teacher_wrong": int((lost & ~teacher_right).sum()),
    })


def summarize(counts: Counter) -> dict:
    """Shares (percent) from summed :func:`attribution_counts`; None where the denominator is zero."""
    share = lambda part, whole: 100.0 * counts[part] / counts[whole] if counts[whole] else None  # noqa: E731
    return {
        "base_rate": share("positive_flips", "errors"), "gains": counts["gains"], "gains_on_teacher_right": share("gains_teacher_right", "gains"),
        "closed": share("closed", "positive_flips"), "losses": counts["losses"], "losses_on_teacher_wrong": share("losses_teacher_wrong", "losses"),
    }


def measure(folder: Path, method: str) -> dict[str, dict]:
    import yaml

    import ktransfer
    from ktransfer.controls import load_predictions
    from ktransfer.predictions import PredictionCache
    from ktransfer.study.config import StudyConfig
    from ktransfer.study.store import LABELS_KEY, PREDICTIONS_DIR

    records = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line.strip()]
    config = StudyConfig.from_dict(yaml.safe_load((folder / "study.yaml").read_text()))
    data = config.data.load(guard=config.guard)
    labels = load_predictions(folder / PREDICTIONS_DIR, LABELS_KEY)
    if labels is None:
        raise SystemExit(f"{folder} has no saved labels: run the study (or demo) into it first")
    cache, models = PredictionCache(), {}

    def predictions(spec: str) -> torch.Tensor:
        if spec not in models:
            models[spec] = cache.predictions(ktransfer.load_model(spec, data_dir=config.data.dir), data.eval)
        return models[spec]

    saved = lambda record: load_predictions(folder / PREDICTIONS_DIR, record["run_key"])  # noqa: E731
    controls = {(r["method"], r["student"], r["seed"]): r for r in records if r.get("control")}
    totals = {kind: Counter() for kind in (method, "ce", "self")}
    for record in records:
        if record.get("control") or record["method"] != method:
            continue
        before, teacher = predictions(record["student"]), predictions(record["teacher"])
        runs = {method: record, **{kind: controls.get((kind, record["student"], record["seed"])) for kind in ("ce", "self")}}
        for kind, run in runs.items():
            if run is not None and (after := saved(run)) is not None:
                totals[kind] += attribution_counts(labels, before, teacher, after)
    if not totals[method]:
        raise SystemExit(f"no finished {method} run with saved predictions in {folder}")
    return {kind: summarize(counts) for kind, counts in totals.items() if counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a study or demo folder with results.jsonl, study.yaml and predictions/")
    parser.add_argument("--method", default="kl_dp")
    args = parser.parse_args()
    result = measure(args.folder, args.method)
    fmt = lambda x: "–" if x is None else f"{x:.1f}%"  # noqa: E731
    first = next(iter(result.values()))
    print(f"student errors the teacher gets right (base rate): {fmt(first['base_rate'])}")
    print("| run | gains | on images the teacher gets right | teacher's positive flips closed | losses | on images the teacher gets wrong |")
    print("|---|---|---|---|---|---|")
    for kind, row in result.items():
        print(f"| {kind} | {row['gains']:,} | {fmt(row['gains_on_teacher_right'])} | {fmt(row['closed'])} | {row['losses']:,} | {fmt(row['losses_on_teacher_wrong'])} |")


if __name__ == "__main__":
    main()
