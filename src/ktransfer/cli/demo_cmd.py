from __future__ import annotations

from pathlib import Path

import click

from . import main
from .options import data_dir_option, split_list


@main.command("demo")
@click.option("--profile", type=click.Choice(["quick", "full"]), default="full", show_default=True, help="full: all 30 ordered pairs of the six zoo models, 3 epochs; quick: 3 students, 2 epochs (about two and a half minutes on 2 CPU cores, zoo training included).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("ktransfer-demo"), show_default=True, help="Output folder for results.jsonl, zoo.json, complementarity.json and summary.json. Rerunning into the same folder reuses finished transfers.")
@click.option("--methods", default="kl,kl_dp", show_default=True, help="Comma-separated method names (see `ktransfer methods`); 'all' stands for every transfer method.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Transfer epochs (default: the profile's).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True, help="SGD learning rate of every transfer.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the transfer runs (the zoo has its own fixed seeds).")
@click.option("--students", default=None, help="Comma-separated zoo models to use as students (default: the profile's).")
@click.option("--teachers", default=None, help="Comma-separated zoo models to use as teachers (default: the whole zoo).")
@click.option("--multi-teacher", is_flag=True, help="Run the multi-teacher table instead (appendix Table 9): per student, each single teacher's Δ (mean, min, max) beside sequential, parallel and soup transfer from all teachers. Default students cnn,resnet,mixer (quick: cnn,mixer), teachers mlp,convnext,vit; writes multi_teacher.json.")
@click.option("--device", default="cpu", show_default=True, help="Where transfers run: cpu, cuda, cuda:1, mps. The zoo always trains on the CPU.")
@data_dir_option
def demo_command(profile, out, methods, epochs, lr, seed, students, teachers, data_dir, multi_teacher, device):
    """Train (or reload) the embedded zoo, measure complementary knowledge, and transfer between every pair.

    Shows the paper's finding on Fashion-MNIST: plain KL distillation from a weaker teacher makes the
    student worse; KL+DP (data partitioning) keeps what the student knew and gains where the teacher helps.
    """
    from ..demo import DemoOptions, run_demo
    from ..multi_demo import run_multi_teacher_demo

    options = DemoOptions(
        profile=profile, out=out, methods=split_list(methods) or [], epochs=epochs, lr=lr, seed=seed,
        students=split_list(students), teachers=split_list(teachers), data_dir=data_dir, device=device,
    )
    if multi_teacher:
        run_multi_teacher_demo(options)
        return
    run_demo(options)
