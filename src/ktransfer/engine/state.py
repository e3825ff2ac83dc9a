"""Everything the loop changes, in one object that saves and loads (:class:`TrainState`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TrainState:
    """Everything the loop changes; ``state_dict``/``load_state_dict`` make a run resumable, also mid-epoch.

    The data order of an epoch is drawn from ``generator``; ``epoch_start_generator`` is its state
    just before that draw, so a resumed run draws the same permutation again and skips the
    ``position`` batches it had already trained on. ``epoch_sums`` are the running sums of the
    epoch's logged numbers, so its record comes out the same.
    """

    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    position: int = 0  # batches of the current epoch already trained on
    epoch_start_generator: torch.Tensor | None = None
    epoch_sums: dict = field(default_factory=dict)
    # The no-regression guard's best so far: epoch (0 = the original), held-out accuracy, weights (CPU).
    guard: dict = field(default_factory=dict)
    # After a non-finite loss: {"retries": 1, "lr_halved_at_step": N, "final_lr": lr}, see engine.callbacks.Rollback.
    rollback: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {
            "optimizer": to_cpu(self.optimizer.state_dict()),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "step": self.step,
            "history": list(self.history),
            "position": self.position,
            "epoch_start_generator": self.epoch_start_generator,
            "epoch_sums": to_cpu(self.epoch_sums),
            "guard": to_cpu(self.guard),
            "rollback": dict(self.rollback),
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], list(state["history"])
        self.position = state.get("position", 0)
        self.epoch_start_generator = state.get("epoch_start_generator")
        self.epoch_sums = dict(state.get("epoch_sums") or {})
        self.guard = dict(state.get("guard") or {})
        self.rollback = dict(state.get("rollback") or {})


def to_cpu(value):
    """A copy of nested dicts of tensors and numbers with every tensor on the CPU."""
    if torch.is_tensor(value):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    return value


def to_device(value, device):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    return value
