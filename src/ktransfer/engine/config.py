"""The loop's settings as the engine takes them (:class:`TrainConfig`), and the device check.

:class:`ktransfer.TransferSettings` is what users write; :func:`ktransfer.api.train_config` turns
it into this, the engine's own, flat view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..augment import check_augment
from ..errors import ConfigError
from ..settings import SCHEDULES, SWITCHES, check_training


@dataclass
class TrainConfig:
    epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    eval_batch_size: int = 1024
    amp: bool = False  # bfloat16 autocast for the student's forward pass and the loss
    # "constant" (the paper's transfers) or "cosine": annealed to zero over all steps (the zoo's pretraining).
    schedule: str = "constant"
    # With amp, also run the frozen models (teachers, original student) under autocast. Off by
    # default: their outputs are targets, and DP routes on them, so they stay float32.
    amp_frozen: bool = False
    augment: str = "none"  # "paper": every model sees the same augmented view of each batch (ktransfer.augment)
    # "auto": channels-last memory for conv nets on CUDA (faster convolutions under bf16), else contiguous; "on"/"off".
    channels_last: str = "auto"
    # "auto": on CUDA the next batch is copied from pinned memory on a side stream while the step runs; "on"
    # forces the one-batch-ahead loader elsewhere too (no copy there: used to test it), "off": copied in the step.
    prefetch: str = "auto"
    # Score the evaluation data after every N-th epoch and always after the last (0: only after the last).
    eval_every: int = 1
    compile: bool = False  # torch.compile the student and the frozen models (of online targets)
    compile_backend: str = "inductor"  # torch.compile's backend ("eager" checks the wiring without generating code)

    def validate(self) -> None:
        if self.lr is None:
            raise ConfigError("the learning rate must be given")
        check_training(self.epochs, self.lr, self.batch_size, self.momentum, self.weight_decay)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        check_augment(self.augment)
        check_device(self.device)
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be 0 (only after the last epoch) or a number of epochs; got {self.eval_every}")
        for name in ("channels_last", "prefetch"):
            if getattr(self, name) not in SWITCHES:
                raise ConfigError(f"{name} must be one of {', '.join(SWITCHES)}; got {getattr(self, name)!r}")

    def evaluates_after(self, epoch: int) -> bool:
        """Whether the evaluation data is scored after ``epoch`` (1-based): every ``eval_every``-th and the last."""
        return epoch == self.epochs or (self.eval_every > 0 and epoch % self.eval_every == 0)

    def lr_at(self, step: int, total_steps: int) -> float:
        """The learning rate of optimiser step ``step`` (0-based) out of ``total_steps``: a pure function, so resuming needs no scheduler state."""
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
        return self.lr


def check_device(device: str) -> None:
    """A device name torch knows and this machine has."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA GPU here (torch {torch.__version__}); use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} asked for, but MPS is not available here; use --device cpu")
