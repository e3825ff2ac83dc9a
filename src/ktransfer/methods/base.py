"""What a transfer method is: per-batch targets and a loss, plus optional hooks. No loop of its own.

A method declares its hyperparameters as a dataclass whose fields carry the paper's
defaults, a description and a valid range; :func:`create_method` checks user values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..errors import ConfigError

METHODS: dict[str, type["Method"]] = {}


def hparam(default, help: str, low: float | None = None, high: float | None = None, choices: tuple | None = None):
    """A hyperparameter field: default, meaning and valid range (inclusive bounds)."""
    return field(default=default, metadata={"help": help, "low": low, "high": high, "choices": choices})


@dataclass
class Hyperparameters:
    """Base of every method's hyperparameters."""

    def validate(self, method: str) -> None:
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta.get("choices") is not None and value not in meta["choices"]:
                raise ConfigError(f"{method}: {f.name}={value!r} is not one of {', '.join(map(str, meta['choices']))}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if value != value:
                    raise ConfigError(f"{method}: {f.name} is NaN")
                if meta.get("low") is not None and value < meta["low"]:
                    raise ConfigError(f"{method}: {f.name}={value} is below its minimum {meta['low']} ({meta['help']})")
                if meta.get("high") is not None and value > meta["high"]:
                    raise ConfigError(f"{method}: {f.name}={value} is above its maximum {meta['high']} ({meta['help']})")


@dataclass
class StepInputs:
    """Everything a method may use for one batch. Teacher logits are stacked ``[K, B, C]``."""

    student_logits: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    original_logits: torch.Tensor | None = None
    student_features: torch.Tensor | None = None
    teacher_features: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    # This batch's rows of what :meth:`Method.fixed_targets` computed once over the transfer set.
    fixed: dict[str, torch.Tensor] | None = None
    # ``[K+1, B, 2]``, original student first: each frozen model's probability of the true class and
    # its maximum probability, from full-precision logits where the logits above were stored rounded
    # (ktransfer.view_cache). DP routes on these when given, so rounding never changes the routing.
    routing_confidence: torch.Tensor | None = None
    # Under torchrun (ktransfer.distributed): this rank's count of the samples a mean over part of the
    # batch is taken over (a tensor) -> the divisor of their sum that makes the averaged gradient the
    # global batch's. None in one process: divide by the count itself.
    subset_divisor: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class LossOutput:
    loss: torch.Tensor
    # Per-batch numbers worth logging, e.g. the share of samples routed to the teacher.
    stats: dict[str, float] = field(default_factory=dict)


class Method:
    """Base class. Subclasses set ``name``, ``summary``, ``Params`` and implement :meth:`loss`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[Hyperparameters]] = Hyperparameters
    # What the engine must provide in StepInputs.
    needs_teacher: ClassVar[bool] = True
    needs_original: ClassVar[bool] = False
    needs_features: ClassVar[bool] = False
    # Several teachers in one run (the parallel strategy) needs a method that chooses per sample.
    supports_multiple_teachers: ClassVar[bool] = False
    # Learning rate the paper used with this method.
    default_lr: ClassVar[float] = 1e-4

    def __init__(self, params: Hyperparameters | None = None):
        self.params = params if params is not None else self.Params()

    def setup(self, student: nn.Module) -> list[nn.Parameter]:
        """Called once before training; returns extra parameters to optimise (projection heads)."""
        return []

    def loss(self, inputs: StepInputs) -> LossOutput:
        raise NotImplementedError

    def fixed_targets(self, teacher_logits: torch.Tensor | None, original_logits: torch.Tensor | None, labels: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Per-sample tensors that depend only on the frozen models and the labels, computed once.

        Called with the cached logits of the whole transfer set (teachers ``[K, N, C]``, original
        ``[N, C]``) when targets are cached; each step then finds its rows in ``StepInputs.fixed``.
        Saves recomputing the same targets every epoch. ``None``: nothing to precompute.
        """
        return None

    def after_step(self, student: nn.Module, step: int) -> None:
        """Called after every optimiser step."""

    def on_epoch_end(self, student: nn.Module) -> None:
        """Called after each epoch, once it has been evaluated."""

    def on_feature_dims(self, student_dim: int, teacher_dim: int) -> None:
        """For ``needs_features`` methods, called before :meth:`setup`: the feature widths of the student and the first teacher."""

    def eval_module(self, student: nn.Module) -> nn.Module:
        """The weights to evaluate and return (MCL's slow weights, for example)."""
        return student

    def state_dict(self) -> dict[str, Any]:
        """What the method changes while training, beyond the student and the optimiser, for a checkpoint (default: nothing)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave; called after :meth:`setup`, with tensors already on the run's device."""

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self.params)


PRECOMPUTE_CHUNK = 16384  # rows of the transfer set per step of a fixed_targets computation: bounds the [K+1, rows, C] memory


def chunked_targets(targets, teacher_logits: torch.Tensor, original_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``targets(original, teachers, labels)`` over the whole transfer set, chunk by chunk, concatenated:
    for :meth:`Method.fixed_targets` of methods whose per-batch targets are a pure function of the frozen models and labels."""
    chunk = PRECOMPUTE_CHUNK
    parts = [targets(o, t, y) for o, t, y in zip(original_logits.split(chunk), teacher_logits.split(chunk, dim=1), labels.split(chunk))]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(METHODS)


def create_method(name: str, **hparams) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(method_names())} (see 'ktransfer methods')")
    cls = METHODS[name]
    known = {f.name for f in dataclasses.fields(cls.Params)}
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise ConfigError(f"{name}: unknown hyperparameter(s) {', '.join(unknown)}; it takes: {', '.join(sorted(known)) or 'none'}")
    typed = {}
    for f in dataclasses.fields(cls.Params):
        if f.name in hparams:
            typed[f.name] = _coerce(name, f.name, hparams[f.name], type(f.default))
    params = cls.Params(**typed)
    params.validate(name)
    return cls(params)


def _coerce(method: str, key: str, value, kind: type):
    if isinstance(value, kind) or kind is type(None):
        return value
    try:
        if kind is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{method}: {key}={value!r} is not a valid {kind.__name__}") from None
