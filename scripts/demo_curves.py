"""Learning-rate × epochs curves of the demo's transfers, measured on the validation split only.

Every run transfers on the demo's transfer set (the paper setting: images the zoo trained on) and is
evaluated after every epoch on Fashion-MNIST's validation split (the 10k training images the zoo never
saw), never on the test set: these curves are what the demo's defaults are chosen from (docs/demo.md).
With a constant learning rate one run of E epochs gives the whole curve from 1 to E epochs.

    python scripts/demo_curves.py run --out curves.jsonl            # measure (resumable: done runs are skipped)
    python scripts/demo_curves.py plot curves.jsonl docs/figures/demo-curves.png

Variants of the setting are tagged (``--tag``) and resumed by their tag: ``--param temperature=4`` sets a
method hyperparameter of the transfers (the controls keep theirs), ``--transfer-data pool`` transfers on
the whole 50k pretraining pool instead of the 10k transfer set (``student``: on every image the student
trained on, the transfer set and its private part), ``--augment`` augments every batch, and
``--zoo-augment paper`` loads a zoo trained with the same augmentation (each model's recipe with
``augment="paper"``, trained and cached on first use: pair it with ``--augment paper``), and
``--shard K/N`` runs every N-th job from the K-th, so that N processes share one measurement.

Each line of the output is one run: student, teacher (None for a control), method, lr, the
student's validation accuracy before, the ensemble Δ of the pair (the ceiling), and Δ after each epoch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PAIRS = ["vit<cnn", "mlp<cnn", "resnet<mlp"]
METHODS = ["kl", "kl_dp"]
CONTROLS = ["ce", "self"]
LRS = [1e-3, 3e-3, 1e-2, 3e-2]


def measure(args) -> None:
    import torch

    import ktransfer
    from ktransfer.controls import run_control
    from ktransfer.data import fashion_mnist

    torch.set_num_threads(args.threads)
    splits = fashion_mnist.load(args.data_dir)
    pairs = [tuple(pair.split("<")) for pair in args.pairs]
    models = {name: zoo_model(name, args.zoo_augment) for pair in pairs for name in pair}
    out = Path(args.out)
    done = set()
    if out.exists():
        done = {(r["student"], r["teacher"], r["method"], r["lr"]) for r in map(json.loads, out.read_text().splitlines()) if r.get("schedule", "constant") == args.schedule and r.get("epochs", args.epochs) == args.epochs and r.get("tag", "") == args.tag}
    jobs = [(s, t, m, lr) for lr in args.lrs for s, t in pairs for m in args.methods]
    jobs += [(s, None, c, lr) for lr in args.lrs for s in dict.fromkeys(s for s, _ in pairs) for c in args.controls]
    shard, shards = (int(x) for x in args.shard.split("/"))
    jobs = [job for job in jobs[shard::shards] if job not in done]
    params = dict(_parse_param(text) for text in args.param)

    def transfer_data(student: str):
        if args.transfer_data == "pool":
            return splits.pool
        if args.transfer_data == "student":  # every image this student trained on: the transfer set and its private part
            from ktransfer.models import store
            from ktransfer.pretrain import training_index

            return splits.pool.subset(training_index(store.DEFAULT_ZOO[student], len(splits.pool), splits.transfer_index), f"{splits.pool.name}[{student}'s training images]")
        return splits.transfer

    print(f"{len(jobs)} run(s) of {args.epochs} epochs to go, on the validation split", flush=True)
    for n, (student, teacher, method, lr) in enumerate(jobs, 1):
        started = time.perf_counter()
        settings = dict(epochs=args.epochs, lr=lr, seed=args.seed, augment=args.augment, schedule=args.schedule)
        if teacher is None:
            result = run_control(method, models[student], transfer_data(student), splits.validation, **settings)
        else:
            result = ktransfer.transfer(models[student], models[teacher], transfer_data(student), splits.validation, method=method, method_params=params, **settings)
        record = result.metrics
        before = record["acc_before"]
        row = {
            "tag": args.tag, "params": params if teacher is not None else {}, "transfer_data": args.transfer_data, "zoo_augment": args.zoo_augment,
            "student": student, "teacher": teacher, "method": method, "lr": lr, "seed": args.seed, "augment": args.augment, "schedule": args.schedule, "epochs": args.epochs,
            "acc_before": before, "ensemble_delta": record.get("ensemble_delta"),
            "delta_by_epoch": [round(epoch["acc"] - before, 4) for epoch in result.history],
            "p_value": record.get("p_value"),
        }
        with out.open("a") as file:
            file.write(json.dumps(row) + "\n")
        last = row["delta_by_epoch"][-1]
        print(f"[{n}/{len(jobs)}] {student}<{teacher or method} {method} lr {lr:g}: Δ after {args.epochs} epochs {last:+.2f} ({time.perf_counter() - started:.0f} s)", flush=True)


def zoo_model(name: str, augment: str):
    """The zoo model ``name``, or the same recipe trained with ``augment`` (its own cache entry)."""
    from dataclasses import replace

    import ktransfer
    from ktransfer.models import store
    from ktransfer.pretrain import load_zoo_model

    if augment == "none":
        return ktransfer.load_model(f"zoo:{name}")
    print(f"zoo model {name} with augment={augment} (trained on first use)", flush=True)
    return load_zoo_model(name, recipe=replace(store.DEFAULT_ZOO[name], augment=augment))


def _parse_param(text: str):
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines()]
    rows = [r for r in rows if r.get("schedule", "constant") == "constant" and r.get("tag", "") == args.tag]  # a constant lr's run gives the whole curve
    pairs = list(dict.fromkeys((r["student"], r["teacher"]) for r in rows if r["teacher"] is not None))
    lrs = sorted({r["lr"] for r in rows})
    colors = {"kl": "tab:red", "kl_dp": "tab:blue", "ce": "tab:gray", "self": "tab:green"}
    figure, axes = plt.subplots(len(pairs), len(lrs), figsize=(3.2 * len(lrs), 2.6 * len(pairs)), sharex=True, sharey="row", squeeze=False)
    for i, (student, teacher) in enumerate(pairs):
        for j, lr in enumerate(lrs):
            ax = axes[i][j]
            ceiling = next((r["ensemble_delta"] for r in rows if (r["student"], r["teacher"]) == (student, teacher) and r["ensemble_delta"] is not None), 0.0)
            for r in rows:
                if r["lr"] != lr or r["student"] != student or r["teacher"] not in (teacher, None):
                    continue
                curve = r["delta_by_epoch"]
                ax.plot(range(1, len(curve) + 1), curve, color=colors.get(r["method"], "black"), label=r["method"], linestyle="--" if r["teacher"] is None else "-")
            ax.axhline(0, color="black", linewidth=0.5)
            ax.axhline(ceiling, color="tab:purple", linewidth=0.8, linestyle=":", label="ensemble Δ")
            ax.set_ylim(-3, max(ceiling + 0.5, 2))  # the ceiling in view; a student knocked out below -3 points runs off the bottom
            ax.set_title(f"{student} ← {teacher}, lr {lr:g}", fontsize=9)
            if j == 0:
                ax.set_ylabel("Δ on validation (points)")
            if i == len(pairs) - 1:
                ax.set_xlabel("epochs (constant lr)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.figure, dpi=110)
    print(f"wrote {args.figure}")


def table(args) -> None:
    """A markdown table: per pair and learning rate, Δ after the given epochs for every method and control."""
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines()]
    rows = [r for r in rows if r.get("schedule", "constant") == "constant" and r.get("tag", "") == args.tag]
    pairs = list(dict.fromkeys((r["student"], r["teacher"]) for r in rows if r["teacher"] is not None))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["teacher"] is not None))
    controls = list(dict.fromkeys(r["method"] for r in rows if r["teacher"] is None))
    epochs = [int(e) for e in args.epochs.split(",")]
    print("| pair (ens Δ) | lr | " + " | ".join(f"{m} ({'/'.join(map(str, epochs))} ep)" for m in [*methods, *controls]) + " |")
    print("|---|---|" + "---|" * (len(methods) + len(controls)))
    for student, teacher in pairs:
        for lr in sorted({r["lr"] for r in rows}):
            cells, ceiling = [], None
            for method in [*methods, *controls]:
                match = [r for r in rows if r["lr"] == lr and r["student"] == student and r["method"] == method and r["teacher"] in ((teacher,) if method in methods else (None,))]
                if match:
                    curve = match[0]["delta_by_epoch"]
                    ceiling = match[0]["ensemble_delta"] if match[0]["teacher"] is not None else ceiling
                    cells.append(" / ".join(f"{curve[e - 1]:+.2f}" if e <= len(curve) else "·" for e in epochs))
                else:
                    cells.append("")
            print(f"| {student} ← {teacher} ({ceiling:+.2f}) | {lr:g} | " + " | ".join(cells) + " |")


def variants(args) -> None:
    """Every tagged variant side by side: a markdown table of Δ after each run's last epoch, and a figure.

    A row is one (variant, pair); a control's Δ is its student's. Variants differ in budget (the epochs of
    a pass over more images are fewer), so the table names each one's epochs and transfer data.
    """
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines()]
    rows = [r for r in rows if r.get("schedule", "constant") == "constant" and r["lr"] == args.lr]
    tags = list(dict.fromkeys(r.get("tag", "") for r in rows))
    pairs = list(dict.fromkeys((r["student"], r["teacher"]) for r in rows if r["teacher"] is not None))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["teacher"] is not None))
    controls = list(dict.fromkeys(r["method"] for r in rows if r["teacher"] is None))

    def run(tag, student, teacher, method):
        wanted = None if method in controls else teacher
        return next((r for r in rows if r.get("tag", "") == tag and r["student"] == student and r["method"] == method and r["teacher"] == wanted), None)

    print("| variant | data, epochs | pair (ens Δ) | " + " | ".join([*methods, *controls]) + " |")
    print("|---|---|---|" + "---|" * (len(methods) + len(controls)))
    for tag in tags:
        for student, teacher in pairs:
            found = [run(tag, student, teacher, m) for m in [*methods, *controls]]
            if not any(found):
                continue
            first = next(r for r in found if r)
            ceiling = next((r["ensemble_delta"] for r in found if r and r.get("ensemble_delta") is not None), None)
            cells = [f"{r['delta_by_epoch'][-1]:+.2f}" if r else "" for r in found]
            budget = f"{first.get('transfer_data', 'transfer')}, {len(first['delta_by_epoch'])}"
            print(f"| {tag or 'base'} | {budget} | {student} ← {teacher} ({'' if ceiling is None else f'{ceiling:+.2f}'}) | " + " | ".join(cells) + " |")
    if not args.figure:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colors = {"kl": "tab:red", "kl_dp": "tab:blue", "kl_ens": "tab:orange", "kl_dp_soft": "tab:cyan", "kl_dp_unsup": "tab:brown", "ce": "tab:gray", "self": "tab:green"}
    figure, axes = plt.subplots(len(pairs), len(tags), figsize=(2.9 * len(tags), 2.5 * len(pairs)), sharey="row", squeeze=False)
    for i, (student, teacher) in enumerate(pairs):
        tops = [2.0]
        for j, tag in enumerate(tags):
            ax = axes[i][j]
            ceiling = None
            for method in [*methods, *controls]:
                r = run(tag, student, teacher, method)
                if r is None:
                    continue
                ceiling = r.get("ensemble_delta") if r.get("ensemble_delta") is not None else ceiling
                curve = r["delta_by_epoch"]
                tops.append(max(curve) + 0.3)
                ax.plot(range(1, len(curve) + 1), curve, color=colors.get(method, "black"), label=method, linestyle="--" if method in controls else "-")
            ax.axhline(0, color="black", linewidth=0.5)
            if ceiling is not None:
                ax.axhline(ceiling, color="tab:purple", linewidth=0.8, linestyle=":", label="ensemble Δ")
            tops.append((ceiling or 0) + 0.5)
            ax.set_title(f"{tag or 'base'}: {student} ← {teacher}", fontsize=9)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if j == 0:
                ax.set_ylabel("Δ on validation (points)")
            if i == len(pairs) - 1:
                ax.set_xlabel("epochs")
        axes[i][0].set_ylim(-3, max(tops))  # the row shares its axis: every variant's ceiling and peak in view
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    figure.legend(handles.values(), handles.keys(), loc="upper center", ncol=len(handles), frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.figure, dpi=100)
    print(f"wrote {args.figure}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="measure the curves (resumable)")
    run.add_argument("--out", default="demo-curves.jsonl")
    run.add_argument("--pairs", nargs="+", default=PAIRS, help="STUDENT<TEACHER zoo names")
    run.add_argument("--methods", nargs="+", default=METHODS)
    run.add_argument("--controls", nargs="*", default=CONTROLS)
    run.add_argument("--lrs", nargs="+", type=float, default=LRS)
    run.add_argument("--epochs", type=int, default=30)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--augment", default="none")
    run.add_argument("--schedule", default="constant", help="cosine: one budget per run (only the last epoch's point is that budget's result)")
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--tag", default="", help="names this variant of the setting in the results (resumed by it)")
    run.add_argument("--param", action="append", default=[], help="KEY=VALUE, a hyperparameter of the transfers' methods")
    run.add_argument("--transfer-data", choices=["transfer", "pool", "student"], default="transfer", help="the demo's 10k transfer set, the whole 50k pool, or every image the student trained on")
    run.add_argument("--zoo-augment", choices=["none", "paper"], default="none", help="paper: a zoo trained with the augmentation (cached apart from the default zoo)")
    run.add_argument("--shard", default="0/1", help="K/N: run the jobs K, K+N, K+2N, ...")
    run.add_argument("--data-dir", default=None)
    run.set_defaults(func=measure)
    draw = commands.add_parser("plot", help="draw the curves of a results file")
    draw.add_argument("results")
    draw.add_argument("figure")
    draw.add_argument("--tag", default="", help="the variant to draw")
    draw.set_defaults(func=plot)
    show = commands.add_parser("table", help="print a markdown table of a results file")
    show.add_argument("results")
    show.add_argument("--epochs", default="3,10,30", help="the epochs to show, comma-separated")
    show.add_argument("--tag", default="", help="the variant to show")
    show.set_defaults(func=table)
    side = commands.add_parser("variants", help="every tagged variant side by side: a markdown table and, with --figure, the curves")
    side.add_argument("results")
    side.add_argument("--figure", default=None)
    side.add_argument("--lr", type=float, default=3e-3, help="the learning rate the variants share")
    side.set_defaults(func=variants)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
