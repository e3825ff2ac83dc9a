"""Augmented transfer with the frozen outputs cached per view (targets views) against running them online.

Part 1, per zoo student (teacher: another zoo model), on the same augmented batches:
  kl views/ce, kl online/ce, dp views/ce, dp online/ce
      a transfer epoch's time / a plain supervised (cross-entropy) epoch's; target for views <= 1.10
Part 2, a study grid of N students x M teachers with augmentation, run twice with ktransfer.transfer:
  once with online targets, once with views (the cache built by the runs that need it first);
  wall times, the time the cache took to build, and the frozen-model forward passes each needed
  (counted in passes over the transfer set).
Ratios come from one run (the machine is shared and absolute times are noisy); part 1 interleaves
the epochs and takes the median of several repeats.

  python benchmarks/bench_view_cache.py [--students cnn,vit] [--repeats 5] [--grid-students mlp,cnn,vit]
      [--grid-teachers mixer,resnet,convnext] [--grid-size 2000] [--grid-epochs 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

import ktransfer
from ktransfer.data import fashion_mnist
from ktransfer.data.base import stratified_split
from ktransfer.engine import Engine, TrainConfig
from ktransfer.methods import create_method
from ktransfer.models.base import Model
from ktransfer.models.store import DEFAULT_ZOO
from ktransfer.pretrain import load_zoo_model
from ktransfer.predictions import PredictionCache
from ktransfer.targets import OnlineTargets
from ktransfer.view_cache import ViewCachedTargets

from bench_epoch import median_epoch_seconds  # a sibling script: benchmarks/ is on the path when this one runs


def epoch_ratios(args, data, root: Path) -> None:
    device = args.device
    print(f"\n1. epoch time / plain supervised epoch, augment paper, {len(data):,} images, batch {args.batch_size}, median of {args.repeats}")
    print(f"{'student':<10}{'teacher':<10}{'ce s':>7}{'kl views':>10}{'kl online':>11}{'dp views':>10}{'dp online':>11}")
    config = TrainConfig(epochs=1, lr=1e-3, batch_size=args.batch_size, device=device, augment="paper")
    for name in args.students.split(","):
        teacher_name = "mlp" if name == args.teacher else args.teacher
        student, teacher = load_zoo_model(name), load_zoo_model(teacher_name)
        for model in (student, teacher):
            model.module.to(device)
        original = Model(copy.deepcopy(student.module), f"{name} (original)", student.preprocess)
        views = ViewCachedTargets.for_transfer(root, [teacher], original, data, student.preprocess, "paper", config.seed, "float16")
        views.ensure(1, device=device)  # train_epoch alone stays in epoch 0

        def engine(method, targets=None):
            return Engine(Model(copy.deepcopy(student.module), name, student.preprocess), create_method(method), data, config, targets)

        engines = {
            "ce": engine("ce"),
            "kl views": engine("kl", views), "kl online": engine("kl", OnlineTargets([teacher], None, views=True)),
            "dp views": engine("kl_dp", views), "dp online": engine("kl_dp", OnlineTargets([teacher], original, views=True)),
        }
        med = median_epoch_seconds(engines, args.repeats, device)
        ratios = "".join(f"{med[key] / med['ce']:>{len(key) + 2}.3f}" for key in ("kl views", "kl online", "dp views", "dp online"))
        print(f"{name:<10}{teacher_name:<10}{med['ce']:7.2f}{ratios}", flush=True)


class PassCounter:
    """Counts the images each frozen module sees (a forward hook on the given modules only)."""

    def __init__(self, modules):
        self.images = 0
        self.targets = {id(module) for module in modules}
        self.handles = [module.register_forward_hook(self._hook) for module in modules]

    def _hook(self, module, inputs, output):
        if id(module) in self.targets:  # not the trained copies, which deepcopy gives the hook too
            self.images += len(inputs[0])

    def close(self):
        for handle in self.handles:
            handle.remove()


def grid(args, splits, root: Path) -> None:
    students, teachers = args.grid_students.split(","), args.grid_teachers.split(",")
    chosen, _ = stratified_split(splits.transfer.labels, args.grid_size, 0)
    transfer_set = splits.transfer.subset(chosen, f"transfer[{args.grid_size}]")
    chosen_eval, _ = stratified_split(splits.eval.labels, args.grid_size, 0)
    eval_set = splits.eval.subset(chosen_eval, f"test[{args.grid_size}]")
    models = {name: load_zoo_model(name) for name in dict.fromkeys([*students, *teachers])}
    pairs = [(s, t) for s in students for t in teachers if s != t]
    n, m, epochs = len(students), len(teachers), args.grid_epochs
    print(f"\n2. a study of {n} students x {m} teachers ({len(pairs)} pairs), kl_dp, augment paper, {epochs} epochs, "
          f"{len(transfer_set):,} transfer / {len(eval_set):,} evaluation images")
    results = {}
    for mode in ("online", "views"):
        cache = PredictionCache(root / mode)
        # the evaluation-set predictions of every model are computed once, before timing (both modes need them alike)
        for model in models.values():
            cache.predictions(model, eval_set, device=args.device)
        counter = PassCounter([model.module for model in models.values()])
        build = 0.0
        started = time.perf_counter()
        for student, teacher in pairs:
            if mode == "views":  # what the first run needing a shard spends on building it
                build_started = time.perf_counter()
                ViewCachedTargets.for_transfer(cache.root, [models[teacher]], models[student], transfer_set, models[student].preprocess, "paper", 0, "float16").ensure(epochs, device=args.device)
                build += time.perf_counter() - build_started
            ktransfer.transfer(models[student], models[teacher], transfer_set, eval_set, method="kl_dp", epochs=epochs, lr=3e-3, augment="paper",
                               targets=mode, cache=cache, device=args.device)
        wall = time.perf_counter() - started
        counter.close()
        results[mode] = (wall, build, counter.images / len(transfer_set))
        print(f"  {mode:<7} wall {wall:7.1f} s (cache building {build:5.1f} s of it)   frozen forward passes over the transfer set: {counter.images / len(transfer_set):6.1f}", flush=True)
    (online_wall, _, online_passes), (views_wall, views_build, views_passes) = results["online"], results["views"]
    print(f"  views/online wall time {views_wall / online_wall:.3f} (without the build {(views_wall - views_build) / online_wall:.3f}); "
          f"frozen passes online/views {online_passes / views_passes:.2f}x fewer (N*M/(N+M) = {n * m / (n + m):.2f}; "
          f"the passes include each run's 2-image input check)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--students", default="cnn,vit,resnet", help=f"part 1 students, from {','.join(DEFAULT_ZOO)}")
    parser.add_argument("--teacher", default="cnn", help="part 1 teacher of every student (mlp where the student is this one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--grid-students", default="mlp,cnn,vit")
    parser.add_argument("--grid-teachers", default="mixer,resnet,convnext")
    parser.add_argument("--grid-size", type=int, default=2000, help="transfer and evaluation images of the grid's runs")
    parser.add_argument("--grid-epochs", type=int, default=2)
    parser.add_argument("--skip", choices=["epochs", "grid"], default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    splits = fashion_mnist.load()
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as folder:
        if args.skip != "epochs":
            epoch_ratios(args, splits.transfer, Path(folder) / "epochs")
        if args.skip != "grid":
            grid(args, splits, Path(folder) / "grid")


if __name__ == "__main__":
    main()
