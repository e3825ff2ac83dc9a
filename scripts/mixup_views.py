"""Mixup views seen alike by the student, the original student and the teacher (function matching), measured
on the validation split only: the search of docs/demo.md that found them to hurt on this zoo.

A plain loop, kept apart from the engine on purpose: mixup is not one of ktransfer's augmentations (it lost on
every pair measured), so this script is what the page's numbers come from, not a feature. Each batch of the
transfer set is mixed with itself shifted by one (``x = λ·x + (1 − λ)·x_next``, λ uniform per sample);
KL+DP routes by each model's probability of the mixed label ``λ·p(y) + (1 − λ)·p(y_next)``, ``ce`` trains on
the mixed label, ``self`` distils the original student's outputs on the mixed images. SGD with momentum 0.9
and weight decay 1e-3, batch 128, a constant learning rate, as the demo.

    python scripts/mixup_views.py --pairs "vit<cnn" "mlp<cnn" "resnet<mlp" --out mixup.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F

METHODS = ("kl_dp", "self", "ce", "kl")


@torch.no_grad()
def probabilities(model, module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    module.eval()
    return torch.cat([module(model.preprocess(images[i : i + batch_size])).softmax(-1) for i in range(0, len(images), batch_size)])


def accuracy(model, module, data) -> float:
    return 100.0 * (probabilities(model, module, data.images).argmax(-1) == data.labels).float().mean().item()


def mixed_confidence(probs: torch.Tensor, labels: torch.Tensor, partner_labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * probs.gather(1, labels.view(-1, 1)).squeeze(1) + (1 - weight) * probs.gather(1, partner_labels.view(-1, 1)).squeeze(1)


def train(student, teacher, method: str, transfer, validation, epochs: int, lr: float, seed: int) -> list[float]:
    """Δ on the validation split after every epoch of one mixup-view transfer (or control)."""
    before = accuracy(student, student.module, validation)
    original = copy.deepcopy(student.module).eval()
    module = copy.deepcopy(student.module)
    optimiser = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)
    generator = torch.Generator().manual_seed(seed)
    curve = []
    for _ in range(epochs):
        order = torch.randperm(len(transfer), generator=generator)
        for start in range(0, len(order), 128):
            index = order[start : start + 128]
            images, labels = transfer.images[index].float() / 255.0, transfer.labels[index]
            weight = torch.rand(len(index), generator=generator)
            partner = torch.roll(torch.arange(len(index)), 1)
            images = weight.view(-1, 1, 1, 1) * images + (1 - weight.view(-1, 1, 1, 1)) * images[partner]
            partner_labels = labels[partner]
            with torch.no_grad():
                original_probs = original(student.preprocess(images)).softmax(-1)
                teacher_probs = teacher.module.eval()(teacher.preprocess(images)).softmax(-1) if method in ("kl", "kl_dp") else None
            module.train()
            log_probs = F.log_softmax(module(student.preprocess(images)), -1)
            if method == "ce":
                loss = -mixed_confidence(log_probs, labels, partner_labels, weight).mean()
            else:
                if method == "kl":
                    target = teacher_probs
                elif method == "kl_dp":
                    to_teacher = mixed_confidence(teacher_probs, labels, partner_labels, weight) > mixed_confidence(original_probs, labels, partner_labels, weight)
                    target = torch.where(to_teacher.view(-1, 1), teacher_probs, original_probs)
                else:  # self
                    target = original_probs
                loss = F.kl_div(log_probs, target, reduction="batchmean")
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        curve.append(round(accuracy(student, module, validation) - before, 2))
    return curve


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=["vit<cnn", "mlp<cnn", "resnet<mlp"], help="STUDENT<TEACHER zoo names")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="mixup-views.jsonl")
    args = parser.parse_args(argv)

    import ktransfer
    from ktransfer.data import fashion_mnist

    torch.set_num_threads(args.threads)
    splits = fashion_mnist.load()
    for pair in args.pairs:
        student_name, teacher_name = pair.split("<")
        student, teacher = ktransfer.load_model(f"zoo:{student_name}"), ktransfer.load_model(f"zoo:{teacher_name}")
        before = accuracy(student, student.module, splits.validation)
        ensemble = 0.5 * (probabilities(student, student.module, splits.validation.images) + probabilities(teacher, teacher.module, splits.validation.images))
        ensemble_delta = round(100.0 * (ensemble.argmax(-1) == splits.validation.labels).float().mean().item() - before, 4)
        for method in args.methods:
            started = time.perf_counter()
            torch.manual_seed(args.seed)
            curve = train(student, teacher, method, splits.transfer, splits.validation, args.epochs, args.lr, args.seed)
            control = method in ("ce", "self")
            row = {
                "tag": "mixup", "params": {}, "transfer_data": "transfer", "zoo_augment": "none", "student": student_name, "teacher": None if control else teacher_name,
                "method": method, "lr": args.lr, "seed": args.seed, "augment": "mixup", "schedule": "constant", "epochs": args.epochs,
                "acc_before": round(before, 4), "ensemble_delta": None if control else ensemble_delta, "delta_by_epoch": curve,
            }
            with open(args.out, "a") as file:
                file.write(json.dumps(row) + "\n")
            print(f"{pair} {method}: Δ after {args.epochs} epochs {curve[-1]:+.2f} ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
