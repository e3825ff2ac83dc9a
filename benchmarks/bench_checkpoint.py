"""Cost of checkpointing a transfer, as a ratio of the same transfer without checkpoints.

Prints, per zoo student (teacher: another zoo model, kl_dp, cached targets):
  epoch/none   a run that checkpoints at the end of every epoch / the same run without checkpoint_dir
  steps/none   the same, with a checkpoint every --every optimiser steps as well
  size         the size of one checkpoint file
Whole runs (training and the per-epoch evaluation) are timed, interleaved, the median of several
repeats taken, since the machine is shared and absolute times are noisy. Every run writes into a
fresh temporary folder, so nothing resumes.

  python benchmarks/bench_checkpoint.py [--students cnn,vit,resnet] [--epochs 2] [--every 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import ktransfer
from ktransfer.data import fashion_mnist
from ktransfer.pretrain import load_zoo_model
from ktransfer.predictions import PredictionCache


def timed_run(student, teacher, data, settings: dict, checkpoints: dict | None) -> tuple[float, int]:
    """Seconds of one transfer and the size in bytes of its newest checkpoint (0 without checkpoints)."""
    with tempfile.TemporaryDirectory() as folder:
        extra = {"checkpoint_dir": Path(folder) / "checkpoints", "keep_checkpoints": True, "log": lambda line: None, **checkpoints} if checkpoints is not None else {}
        started = time.perf_counter()
        ktransfer.transfer(student, teacher, data.transfer, data.eval, method="kl_dp", **settings, **extra)
        seconds = time.perf_counter() - started
        files = sorted(Path(folder).glob("checkpoints/*.pt"), key=lambda p: p.stat().st_mtime) if checkpoints is not None else []
        return seconds, files[-1].stat().st_size if files else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--students", default="cnn,vit,resnet")
    parser.add_argument("--teacher", default="mlp", help="teacher of every student (cnn when the student is this one)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--every", type=int, default=10, help="steps between checkpoints in the steps/none column")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    data = fashion_mnist.load()
    settings = {"epochs": args.epochs, "lr": 3e-3, "seed": 0, "device": args.device, "cache": PredictionCache()}
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, {len(data.transfer):,} images per epoch, "
          f"{args.epochs} epochs, checkpoint every {args.every} steps in steps/none, median of {args.repeats}")
    print(f"{'student':<10}{'none s':>9}{'epoch s':>9}{'steps s':>9}{'epoch/none':>12}{'steps/none':>12}{'size MB':>9}")
    variants = {"none": None, "epoch": {"checkpoint_minutes": None}, "steps": {"checkpoint_every": args.every, "checkpoint_minutes": None}}
    for name in args.students.split(","):
        student = load_zoo_model(name)
        teacher = load_zoo_model(args.teacher if args.teacher != name else "cnn")
        timed_run(student, teacher, data, settings, None)  # warm-up: predictions cached, kernels ready
        times: dict[str, list[float]] = {key: [] for key in variants}
        size = 0
        for _ in range(args.repeats):
            for key, checkpoints in variants.items():
                seconds, written = timed_run(student, teacher, data, settings, checkpoints)
                times[key].append(seconds)
                size = max(size, written)
        med = {key: statistics.median(values) for key, values in times.items()}
        print(f"{name:<10}{med['none']:9.2f}{med['epoch']:9.2f}{med['steps']:9.2f}{med['epoch'] / med['none']:12.3f}{med['steps'] / med['none']:12.3f}{size / 1e6:9.2f}", flush=True)


if __name__ == "__main__":
    main()
