"""Cost of a transfer epoch against plain supervised fine-tuning on the same batches.

Prints, per zoo student (teacher: another zoo model):
  dp/ce       cached KL+DP epoch time / supervised cross-entropy epoch time (floor 1.0, target <= 1.05)
  online/cached  KL+DP epoch with a teacher and original-student forward per batch / with cached targets
Ratios come from one run, epochs interleaved and the median of several repeats taken, since
the machine is shared and absolute times are noisy.

  python benchmarks/bench_epoch.py [--students cnn,vit] [--repeats 5] [--device cuda] [--amp]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from ktransfer.data import fashion_mnist
from ktransfer.engine import Engine, TrainConfig
from ktransfer.methods import create_method
from ktransfer.models.base import Model
from ktransfer.models.store import DEFAULT_ZOO
from ktransfer.pretrain import load_zoo_model
from ktransfer.predictions import PredictionCache
from ktransfer.targets import CachedTargets, OnlineTargets


def epoch_seconds(engine: Engine, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    engine.train_epoch()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def median_epoch_seconds(engines: dict[str, Engine], repeats: int, device: str) -> dict[str, float]:
    """Each engine's median epoch time: one warm-up epoch each, then ``repeats`` rounds, the engines interleaved."""
    for engine in engines.values():
        epoch_seconds(engine, device)
    times = {key: [] for key in engines}
    for _ in range(repeats):
        for key, engine in engines.items():
            times[key].append(epoch_seconds(engine, device))
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--students", default=",".join(DEFAULT_ZOO))
    parser.add_argument("--teacher", default="cnn", help="teacher of every student (another model when the student is this one)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    args = parser.parse_args()

    splits = fashion_mnist.load()
    data = splits.transfer
    cache = PredictionCache()
    device = args.device
    print(f"device {device}{' (' + torch.cuda.get_device_name() + ')' if device.startswith('cuda') else ''}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, batch {args.batch_size}, {len(data):,} images per epoch, amp {args.amp}, median of {args.repeats}")
    print(f"{'student':<10}{'teacher':<10}{'ce s':>8}{'dp s':>8}{'online s':>10}{'dp/ce':>8}{'online/cached':>15}")
    for name in args.students.split(","):
        teacher_name = args.teacher if args.teacher != name else "mlp"
        student, teacher = load_zoo_model(name), load_zoo_model(teacher_name)
        for model in (student, teacher):
            model.module.to(device)
        original = Model(copy.deepcopy(student.module), f"{name} (original)", student.preprocess)
        config = TrainConfig(epochs=1, lr=1e-3, batch_size=args.batch_size, device=device, amp=args.amp)
        cached = CachedTargets([teacher], original, data, cache, device)
        online = OnlineTargets([teacher], original)
        engines = {
            "ce": Engine(Model(copy.deepcopy(student.module), name, student.preprocess), create_method("ce"), data, config),
            "dp": Engine(Model(copy.deepcopy(student.module), name, student.preprocess), create_method("kl_dp"), data, config, cached),
            "online": Engine(Model(copy.deepcopy(student.module), name, student.preprocess), create_method("kl_dp"), data, config, online),
        }
        med = median_epoch_seconds(engines, args.repeats, device)
        print(f"{name:<10}{teacher_name:<10}{med['ce']:8.2f}{med['dp']:8.2f}{med['online']:10.2f}{med['dp'] / med['ce']:8.3f}{med['online'] / med['dp']:15.2f}", flush=True)


if __name__ == "__main__":
    main()
