"""Weight interpolation between the original and the transferred student (WiSE-FT-style), measured on the
validation split only: the search of docs/demo.md that found it to help the ce control more than the teacher's
methods.

For each pair and method the student is transferred as the demo does (``ktransfer.transfer``, constant
learning rate), then every float tensor of its state (parameters and batch-norm statistics) is interpolated,
``θ(α) = (1 − α)·θ_original + α·θ_transferred``, for α = 0, 0.1, …, 1. The validation split is cut in two
halves, alternating images: α is chosen on the first (the best accuracy, the larger α on a tie) and the
result read on the second, so the choice never sees the images it is judged on. ``ce`` is the control: the
same interpolation after fine-tuning on the labels.

    python scripts/weight_interpolation.py --pairs "vit<cnn" "mlp<cnn" "resnet<mlp" --epochs 30 --out interpolation.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import torch

WEIGHTS = tuple(i / 10 for i in range(11))


def interpolate(original: dict[str, torch.Tensor], transferred: dict[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
    """``(1 − weight)·original + weight·transferred`` for float tensors; the others (step counters) from ``transferred``."""
    return {
        key: torch.lerp(original[key], value, weight) if value.is_floating_point() else value.clone()
        for key, value in transferred.items()
    }


def choose(curve: list[dict]) -> dict:
    """The point with the best accuracy on the choosing half; on a tie the larger weight (nearer the transfer)."""
    return max(curve, key=lambda point: (point["delta_choose"], point["weight"]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=["vit<cnn", "mlp<cnn", "resnet<mlp"], help="STUDENT<TEACHER zoo names")
    parser.add_argument("--methods", nargs="+", default=["kl", "kl_dp", "ce"])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="interpolation.jsonl")
    args = parser.parse_args(argv)

    import ktransfer
    from ktransfer.data import fashion_mnist
    from ktransfer.predictions import compute_logits

    torch.set_num_threads(args.threads)
    splits = fashion_mnist.load()
    validation = splits.validation
    halves = {"choose": list(range(0, len(validation), 2)), "read": list(range(1, len(validation), 2))}
    choose_half = validation.subset(halves["choose"], "fashion-mnist/validation-choose")

    def accuracies(logits: torch.Tensor) -> dict[str, float]:
        right = (logits.argmax(-1) == validation.labels).float()
        return {name: 100.0 * right[index].mean().item() for name, index in halves.items()}

    with open(args.out, "a") as out:
        for pair in args.pairs:
            student_name, teacher_name = pair.split("<")
            student, teacher = ktransfer.load_model(f"zoo:{student_name}"), ktransfer.load_model(f"zoo:{teacher_name}")
            student_logits, teacher_logits = compute_logits(student, validation), compute_logits(teacher, validation)
            before = accuracies(student_logits)
            ensemble = accuracies((student_logits.softmax(-1) + teacher_logits.softmax(-1)) / 2)
            original = {key: value.detach().clone() for key, value in student.module.state_dict().items()}
            for method in args.methods:
                started = time.perf_counter()
                result = ktransfer.transfer(student, teacher, splits.transfer, choose_half, method=method, epochs=args.epochs, lr=args.lr, seed=args.seed)
                transferred = {key: value.detach().clone() for key, value in result.student.state_dict().items()}
                module = result.student
                curve = []
                for weight in WEIGHTS:
                    module.load_state_dict(interpolate(original, transferred, weight))
                    after = accuracies(compute_logits(student.rebuilt(module), validation))
                    curve.append({"weight": weight, "delta_choose": after["choose"] - before["choose"], "delta_read": after["read"] - before["read"]})
                chosen = choose(curve)
                row = {
                    "pair": pair, "method": method, "epochs": args.epochs, "lr": args.lr, "seed": args.seed,
                    "student_acc_read": before["read"], "ensemble_delta_read": ensemble["read"] - before["read"],
                    "chosen_weight": chosen["weight"], "delta_chosen_read": chosen["delta_read"], "delta_final_read": curve[-1]["delta_read"],
                    "curve": curve,
                }
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(
                    f"{pair:12s} {method:6s} {args.epochs:2d} epochs: Δ after the transfer {row['delta_final_read']:+.2f}, "
                    f"interpolated (α {row['chosen_weight']:.1f}) {row['delta_chosen_read']:+.2f}; ensemble Δ {row['ensemble_delta_read']:+.2f} "
                    f"({time.perf_counter() - started:.0f}s)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
