"""Wall time of one transfer epoch per method, as a ratio to `kl` measured in the same run.

Untrained zoo architectures on synthetic 28×28 images: only the cost matters here. Methods are
interleaved over rounds so that load on a shared machine hits all of them alike; the median of
the rounds is reported.

    python benchmarks/bench_methods.py --student cnn --teacher resnet --images 4096 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ktransfer
from ktransfer.data.base import ImageData
from ktransfer.methods import transfer_method_names
from ktransfer.models.base import Model
from ktransfer.models.store import FASHION_MNIST_PREPROCESS
from ktransfer.models.zoo import ZOO_ARCHITECTURES
from ktransfer.predictions import PredictionCache


def synthetic(count: int, seed: int) -> ImageData:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 1, 28, 28), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 10, (count,), generator=generator)
    return ImageData(images, labels, [str(c) for c in range(10)], f"synthetic/{seed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default="cnn", choices=sorted(ZOO_ARCHITECTURES))
    parser.add_argument("--teacher", default="resnet", choices=sorted(ZOO_ARCHITECTURES))
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default=",".join(transfer_method_names()))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    student = Model(ZOO_ARCHITECTURES[args.student][1]().eval(), args.student, FASHION_MNIST_PREPROCESS)
    teacher = Model(ZOO_ARCHITECTURES[args.teacher][1]().eval(), args.teacher, FASHION_MNIST_PREPROCESS)
    transfer_set, eval_set = synthetic(args.images, 1), synthetic(max(args.images // 4, 256), 2)
    cache = PredictionCache(enabled=False)
    methods = args.methods.split(",")
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.rounds):
        for method in methods:
            started = time.perf_counter()
            ktransfer.transfer(student, teacher, transfer_set, eval_set, method=method, epochs=1, lr=1e-3, cache=cache, device=args.device)
            seconds[method].append(time.perf_counter() - started)
    base = statistics.median(seconds["kl"]) if "kl" in seconds else None
    print(f"{args.teacher} → {args.student}, {args.images} images, 1 epoch, median of {args.rounds} rounds on {args.device} (torch threads: {torch.get_num_threads()})")
    for method in methods:
        median = statistics.median(seconds[method])
        ratio = f"{median / base:5.2f}× kl" if base else ""
        print(f"  {method:<12} {median:7.2f} s  {ratio}")


if __name__ == "__main__":
    main()
