"""The paper's colour augmentation on a batch: ktransfer.augment (plain torch) against kornia and torchvision v2.

Per image size, the median time of one 256-image RGB batch (float in [0, 1]) for:
  ours            ktransfer.augment: flip, colour distortion in each sample's own random order, grayscale
  ours-fixed      the same four colour operations in one fixed order over the whole batch (no grouping)
  kornia-fn       kornia.enhance's per-sample functional ops, one fixed order (as ours-fixed)
  kornia-aug      kornia.augmentation: RandomHorizontalFlip, ColorJitter(0.8, 0.8, 0.8, 0.2, p=0.8), RandomGrayscale(0.2)
  tv-per-sample   torchvision.transforms.v2.functional, one call per image (its ops take one factor per call)
  tv-batch        torchvision v2 transforms on the whole batch: ONE set of parameters for all images (not
                  per-sample augmentation; a lower bound only)
and, for correctness, the largest difference of each operation against torchvision's, image by image
(torchvision's grayscale weighs red 0.2989, PIL's and ours 0.299: about 1e-4 in contrast and saturation).
Optional libraries that are missing are left out.

  python benchmarks/bench_augment.py [--sizes 32,224] [--batch 256] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from ktransfer import augment


def once(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def interleaved(candidates: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds per candidate; candidates take turns in every round, so load on a shared machine hits all alike."""
    for fn in candidates.values():
        fn()  # warm-up
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            times[name].append(once(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,224")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    try:
        import kornia
    except ImportError:
        kornia = None
    try:
        from torchvision.transforms import v2
        from torchvision.transforms.v2 import functional as tvf
    except ImportError:
        v2 = tvf = None
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, kornia {getattr(kornia, '__version__', 'missing')}, "
          f"torchvision {'present' if v2 else 'missing'}, device {args.device}")

    aug = augment.Augmentation(seed=0)
    for size in (int(s) for s in args.sizes.split(",")):
        images = torch.rand(args.batch, 3, size, size, generator=torch.Generator().manual_seed(size)).to(args.device)
        index = torch.arange(args.batch)
        params = aug.sample(index, 0, images.shape)
        factors = {name: params[name].to(args.device) for name in augment.COLOUR_OPS}
        candidates = {"ours": lambda: aug.apply(images, params)}

        def fixed(adjust):
            x = images
            for name in augment.COLOUR_OPS:
                x = adjust[name](x, factors[name])
            return x

        candidates["ours-fixed"] = lambda: fixed(augment._ADJUST)
        if kornia is not None:
            from kornia import enhance

            kornia_ops = {
                "brightness": enhance.adjust_brightness_accumulative,
                "contrast": enhance.adjust_contrast_with_mean_subtraction,
                "saturation": enhance.adjust_saturation_with_gray_subtraction,
                "hue": lambda x, f: enhance.adjust_hue(x, f * 2 * math.pi),
            }
            candidates["kornia-fn"] = lambda: fixed(kornia_ops)
            import kornia.augmentation as K

            pipeline = torch.nn.Sequential(K.RandomHorizontalFlip(), K.ColorJitter(0.8, 0.8, 0.8, 0.2, p=0.8), K.RandomGrayscale(p=0.2))
            candidates["kornia-aug"] = lambda: pipeline(images)
        if tvf is not None:
            def per_sample():
                out = []
                for b in range(args.batch):
                    x = images[b]
                    if params["flip"][b]:
                        x = tvf.horizontal_flip(x)
                    if params["jitter"][b]:
                        for op in params["order"][b].tolist():
                            name = augment.COLOUR_OPS[op]
                            x = getattr(tvf, f"adjust_{name}")(x, float(params[name][b]))
                    if params["grayscale"][b]:
                        x = tvf.rgb_to_grayscale(x, num_output_channels=3)
                    out.append(x)
                return torch.stack(out)

            candidates["tv-per-sample"] = per_sample
            batch_pipeline = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), v2.RandomGrayscale(p=0.2)])
            candidates["tv-batch"] = lambda: batch_pipeline(images)
        results = interleaved(candidates, args.repeats, args.device)
        base = results["ours"]
        print(f"\n{args.batch} images {size}×{size}: median seconds per batch (ratio to ours)")
        for name, seconds in results.items():
            print(f"  {name:14s} {seconds * 1000:9.1f} ms  {seconds / base:6.2f}×")

        if tvf is not None:
            print("  largest difference to torchvision's op, image by image, factors as drawn:")
            sample = images[:32]
            for name in augment.COLOUR_OPS:
                reference = torch.stack([getattr(tvf, f"adjust_{name}")(sample[b], float(params[name][b])) for b in range(len(sample))])
                ours = augment._ADJUST[name](sample, factors[name][:32])
                line = f"    {name:10s} ours {float((ours - reference).abs().max()):.2e}"
                if kornia is not None:
                    line += f"  kornia {float((kornia_ops[name](sample, factors[name][:32]) - reference).abs().max()):.2e}"
                print(line)


if __name__ == "__main__":
    main()
