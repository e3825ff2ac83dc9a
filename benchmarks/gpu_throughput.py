"""Images/second of a transfer against plain supervised training of the same student, in one process.

Three modes run through the same engine on the same batches (same data, seed and order):

- ``plain``: supervised fine-tuning of the student (the ``ce`` method), the reference;
- ``kl_dp cached``: the teacher's and the original student's logits computed once before timing,
  read from memory per batch (``CachedTargets``). A cache of logits per augmented view is read
  the same way, one memory read per batch, so this measures that cost too;
- ``kl_dp online``: the teacher and the original student run on every batch.

Each prints images/second, its ratio to ``plain`` and the peak GPU memory of the mode
(``torch.cuda.max_memory_allocated``, reset between modes). On the CPU there is no GPU memory:
each mode prints "n/a (CPU)", and the last line gives the process's peak resident memory.
Random weights and random images: speed does not depend on either.

    python benchmarks/gpu_throughput.py --device cuda            # ResNet-50 from ViT-B/16, 224 px, batch 256
    python benchmarks/gpu_throughput.py --device cpu --student resnet10t --teacher test_vit \\
        --image-size 32 --batch 8 --warmup 1 --steps 2 --classes 10   # the end-to-end check on the CPU
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import warnings

import torch

from ktransfer.data.base import ImageData
from ktransfer.engine import Engine, TrainConfig, uses_channels_last
from ktransfer.engine.callbacks import Progress
from ktransfer.methods import create_method
from ktransfer.models.base import Model, Preprocess
from ktransfer.predictions import PredictionCache
from ktransfer.targets import CachedTargets, OnlineTargets

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def arguments(argv=None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=env("GPU_CHECK_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
    parser.add_argument("--student", default=env("GPU_CHECK_STUDENT", "resnet50"), help="timm model name")
    parser.add_argument("--teacher", default=env("GPU_CHECK_TEACHER", "vit_base_patch16_224"), help="timm model name")
    parser.add_argument("--image-size", type=int, default=int(env("GPU_CHECK_IMAGE_SIZE", 224)))
    parser.add_argument("--batch", type=int, default=int(env("GPU_CHECK_BATCH", 256)))
    parser.add_argument("--warmup", type=int, default=int(env("GPU_CHECK_WARMUP", 10)), help="steps per mode before timing")
    parser.add_argument("--steps", type=int, default=int(env("GPU_CHECK_STEPS", 30)), help="timed steps per mode")
    parser.add_argument("--classes", type=int, default=int(env("GPU_CHECK_CLASSES", 1000)))
    parser.add_argument("--compile", action="store_true", default=env("GPU_CHECK_COMPILE", "0") == "1", help="torch.compile the student and frozen models")
    parser.add_argument("--no-amp", action="store_true", default=env("GPU_CHECK_NO_AMP", "0") == "1", help="float32 instead of bf16 autocast")
    parser.add_argument("--amp-frozen", action="store_true", default=env("GPU_CHECK_AMP_FROZEN", "1") == "1", help="frozen models under autocast too (on by default here)")
    return parser.parse_args(argv)


def timm_model(name: str, classes: int, image_size: int) -> Model:
    import timm

    kwargs = {"img_size": image_size} if "vit" in name else {}
    module = timm.create_model(name, pretrained=False, num_classes=classes, **kwargs)
    return Model(module, name, Preprocess(mean=IMAGENET_MEAN, std=IMAGENET_STD))


def peak_memory(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return "n/a (CPU)"


def timed_epoch(engine: Engine, device: str, warmup: int) -> float:
    """Seconds of the epoch's steps after ``warmup`` (the device synchronised at both ends)."""
    cuda = torch.device(device).type == "cuda"
    marks = {}

    def on_step(step, total):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize(device)
            marks["start"] = time.perf_counter()

    engine.callbacks.append(Progress(on_step))
    engine.train_epoch()
    engine.callbacks.pop()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - marks["start"]


def syncs_per_step(build, data: ImageData, batch: int, device: str) -> str:
    """Synchronising CUDA calls in steps 3 and 4 of a 4-step epoch (torch.cuda.set_sync_debug_mode), per step."""
    if torch.device(device).type != "cuda":
        return "n/a (CPU)"
    if len(data) < 4 * batch:
        return "n/a (fewer than 4 batches)"
    small = data.subset(torch.arange(min(len(data), 4 * batch)), data.name)
    engine, counts = build(small), {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.callbacks.append(Progress(lambda step, total: counts.setdefault(step, sum("synchroniz" in str(w.message) for w in caught))))
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.train_epoch()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = sorted({str(w.filename) + ":" + str(w.lineno) for w in caught if "synchroniz" in str(w.message)})
    return f"{(counts[4] - counts[2]) / 2:g}" + (f" (warned at {', '.join(where[:4])})" if where else "")


def main(argv=None) -> int:
    args = arguments(argv)
    device = args.device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    n = args.batch * (args.warmup + args.steps)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, args.image_size, args.image_size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, args.classes, (n,), generator=generator)
    data = ImageData(images, labels, [f"class{i}" for i in range(args.classes)], "random images")
    torch.manual_seed(0)
    student, teacher = timm_model(args.student, args.classes, args.image_size), timm_model(args.teacher, args.classes, args.image_size)
    student.module.to(device)
    teacher.module.to(device).eval()
    original = Model(_copy(student.module), student.name, student.preprocess)  # the student before transfer
    original.module.eval()
    config = TrainConfig(epochs=1, lr=1e-4, batch_size=args.batch, device=device, amp=not args.no_amp, amp_frozen=args.amp_frozen and not args.no_amp, compile=args.compile)
    print(f"torch {torch.__version__}; device {torch.cuda.get_device_name(device) if cuda else 'cpu'}")
    print(f"student {args.student}, teacher {args.teacher}, {args.image_size} px, batch {args.batch}, {args.classes} classes, "
          f"{args.warmup} warm-up + {args.steps} timed steps per mode; amp={config.amp} amp_frozen={config.amp_frozen} "
          f"channels_last={config.channels_last} (student: {'on' if uses_channels_last(config.channels_last, device, student.module) else 'off'}) prefetch={config.prefetch} compile={config.compile}")
    started = time.perf_counter()
    cached = CachedTargets([teacher], original, data, PredictionCache(enabled=False), device=device)
    print(f"cached targets: teacher and original student logits of {n} images computed once in {time.perf_counter() - started:.1f}s (not in the timings)")
    modes = {
        "plain": lambda data: Engine(_fresh(student), create_method("ce"), data, config),
        "kl_dp cached": lambda data: Engine(_fresh(student), create_method("kl_dp"), data, config, targets=cached),
        "kl_dp online": lambda data: Engine(_fresh(student), create_method("kl_dp"), data, config, targets=OnlineTargets([teacher], original)),
    }
    rates = {}
    for name, build in modes.items():
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        engine = build(data)
        seconds = timed_epoch(engine, device, args.warmup)
        rates[name] = args.batch * args.steps / seconds
        ratio = rates[name] / rates["plain"]
        print(f"{name:13s} {rates[name]:9.1f} images/s  ratio to plain {ratio:.3f}  peak GPU memory {peak_memory(device)}")
        del engine
    for name, build in modes.items():
        print(f"host-device syncs per step, {name}: {syncs_per_step(build, data, args.batch, device)}")
    print("note: a cache of logits per augmented view is read like the cached targets here (one memory read per batch)")
    goal = rates["kl_dp cached"] / rates["plain"]
    print(f"goal kl_dp cached >= 0.95 of plain: {'met' if goal >= 0.95 else 'not met'} ({goal:.3f})")
    print(f"peak resident memory of the process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0


def _copy(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module)


def _fresh(student: Model) -> Model:
    """A copy of the untrained student for each mode, so every mode starts from the same weights."""
    return Model(_copy(student.module), student.name, student.preprocess)


if __name__ == "__main__":
    sys.exit(main())
