from __future__ import annotations

import json
from pathlib import Path

import click

from .group import main
from .options import data_dir_option, parse_seeds, split_list


@main.command("demo")
@click.option("--profile", type=click.Choice(["quick", "full", "gain"]), default="full", show_default=True, help="full: all 30 ordered pairs of the six zoo models, 3 epochs at a constant lr 3e-3 (the paper's keeping); quick: 3 students, 2 epochs (about two and a half minutes on 2 CPU cores, zoo training included); gain: all 30 pairs, 30 epochs (where KL+DP moved the students past both controls on the validation split; ten times as long as full). See docs/demo.md.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("ktransfer-demo"), show_default=True, help="Output folder: a study folder (study.db, study.yaml, results.jsonl, results.csv, zoo.json, complementarity.json, summary.json, the report). Rerunning into the same folder reuses the finished runs whose settings are the same (batch size included).")
@click.option("--methods", default=None, help="Comma-separated method names (see `ktransfer methods`); 'all' stands for every transfer method [default: kl,kl_dp].")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Transfer epochs (default: the profile's).")
@click.option("--setting", type=click.Choice(["paper", "new-data"]), default="paper", show_default=True, help="paper: transfer on a stratified 20% of the zoo's own training pool (seen data, converged students: fine-tuning adds nothing, so a gain comes from the teacher). new-data: transfer on the 10k training images the zoo never saw, where fine-tuning alone gains and the ce control is the baseline to beat.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="SGD learning rate of every transfer and control [default: 3e-3, chosen on the validation split; see docs/demo.md].")
@click.option("--schedule", type=click.Choice(["constant", "cosine"]), default=None, help="Learning-rate schedule of every transfer and control [default: constant, as the paper trained].")
@click.option("--seeds", default=None, help="Comma-separated seeds of the transfer runs, e.g. 0,1,2: the tables then give each pair's mean ± std over seeds and a McNemar test pooled over them. The zoo has fixed seeds of its own [default: 0].")
@click.option("--controls/--no-controls", default=True, show_default=True, help="Run the ce (labels only) and self (KL+DP toward the original only) controls once per student and compare every transfer with them.")
@click.option("--augment", type=click.Choice(["none", "paper"]), default="none", show_default=True, help="Augment transfer batches (paper: the authors' recipe; on one-channel images a random shift and flip). Targets are then computed online.")
@click.option("--students", default=None, help="Comma-separated zoo models to use as students (default: the profile's).")
@click.option("--teachers", default=None, help="Comma-separated zoo models to use as teachers (default: the whole zoo).")
@click.option("--multi-teacher", is_flag=True, help="Run the multi-teacher table instead (appendix Table 9): per student, each single teacher's Δ (mean, min, max) beside sequential, parallel and soup transfer from all teachers. Default students cnn,resnet,mixer (quick: cnn,mixer), teachers mlp,convnext,vit; writes multi_teacher.json.")
@click.option("--device", default="cpu", show_default=True, help="Where transfers run: cpu, cuda, cuda:1, mps. The zoo always trains on the CPU.")
@click.option("--executor", type=click.Choice(["local", "processes", "ray"]), default=None, help="Where the runs execute [default: processes: one worker process per usable CPU, one thread each]; local: one after another in this process; ray: Ray tasks (needs ktransfer[ray]). See docs/scale.md.")
@click.option("--guard", is_flag=True, help="Every transfer and control returns the best of the original student and each epoch's student on the validation split (a held-out 10% of the transfer data with --setting new-data); see docs/guard.md.")
@click.option("--json", "as_json", is_flag=True, help="For scripts: print the results as one JSON object on standard output (records, per-method summary, controls, each method against kl_dp, timing, output folder); the tables and progress go to standard error.")
@data_dir_option
def demo_command(profile, out, methods, epochs, setting, lr, schedule, seeds, controls, augment, students, teachers, data_dir, multi_teacher, device, executor, guard, as_json):
    """Train (or reload) the embedded zoo, measure complementary knowledge, and transfer between every pair.

    Shows the paper's finding on Fashion-MNIST, in the paper's setting by default (transfer on data the
    converged students trained on): plain KL distillation from a weaker teacher makes the student worse;
    KL+DP (data partitioning) keeps what the student knew. Every student also runs the ce and self
    controls, and every Δ carries an exact McNemar p-value.
    """
    from ..demo import DemoOptions, run_demo
    from ..output import output_console
    from ..errors import ConfigError
    from ..multi_demo import run_multi_teacher_demo

    options = DemoOptions(
        profile=profile, out=out, epochs=epochs, lr=lr, schedule=schedule,
        **({"methods": split_list(methods) or []} if methods is not None else {}), **({"seeds": parse_seeds(seeds) or []} if seeds is not None else {}),
        setting=setting, controls=controls, augment=augment, students=split_list(students), teachers=split_list(teachers), data_dir=data_dir, device=device, guard=guard,
        **({"executor": executor} if executor is not None else {}),
    )
    console = output_console(stderr=as_json)  # with --json, standard output holds the JSON alone
    if multi_teacher:
        if guard:
            raise ConfigError("--guard applies to the single-teacher demo, not yet to --multi-teacher")
        if executor is not None:
            raise ConfigError("--executor applies to the single-teacher demo; --multi-teacher runs in this process (leave --executor out)")
        result = run_multi_teacher_demo(options, console)
    else:
        result = run_demo(options, console)
    if as_json:
        click.echo(json.dumps({key: result[key] for key in JSON_KEYS if key in result}, default=str))


# What --json prints of a demo's result (the tables' numbers and more, as ktransfer.demo.run_demo returns them).
JSON_KEYS = ("records", "summary", "controls", "head_to_head", "zoo", "rows", "teachers", "timing", "out")
