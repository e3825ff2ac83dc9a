"""One settings object for a transfer: what it trains with, validated once, with one spelling per setting.

:class:`TransferSettings` is frozen and typed. :func:`ktransfer.transfer`, :func:`ktransfer.transfer_multi`
and the controls take it (``settings=``), or its fields as keyword arguments; a name that is not a field
is answered with the nearest one ("unknown setting 'epoch'; did you mean 'epochs'?"). The method's own
hyperparameters are not settings: they go to ``method_params=`` (``ktransfer methods`` lists them).

:meth:`TransferSettings.identity` says which settings make two runs the same run (their results can
differ otherwise); the others (device, speed switches, where checkpoints go) change nothing beyond
rounding and are left out of it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import ConfigError

SCHEDULES = ("constant", "cosine")
SWITCHES = ("auto", "on", "off")
TARGETS = ("cached", "online", "views")
CACHE_DTYPES = ("float16", "float32")
AUGMENTS = ("none", "paper")


def _setting(default, help: str, identity: bool = True, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "identity": identity, "choices": choices})


@dataclass(frozen=True)
class TransferSettings:
    """The settings of one transfer (and of its controls, which must share them)."""

    epochs: int = _setting(3, "Passes over the transfer data.")
    lr: float | None = _setting(None, "SGD learning rate (default: the method's paper value).")
    batch_size: int = _setting(128, "Images per optimiser step (under torchrun: the global batch).")
    momentum: float = _setting(0.9, "SGD momentum.")
    weight_decay: float = _setting(1e-3, "SGD weight decay.")
    seed: int = _setting(0, "Seed of the batch order and the augmentation.")
    schedule: str = _setting("constant", "Learning-rate schedule: constant (the paper's) or cosine (annealed to 0 over all steps).", choices=SCHEDULES)
    augment: str = _setting("none", "paper: the paper's augmentation of transfer batches (flip, colour distortion, grayscale; flip and shift on 1-channel images), the same view for teacher, original student and student.", choices=AUGMENTS)
    targets: str | None = _setting(None, "cached: the frozen models' outputs computed once (the default without augmentation); online: computed per batch (the default with augmentation); views (with augment paper): the outputs on each augmented view, computed once into the prediction cache and reused by every run on the same views.", choices=TARGETS)
    cache_dtype: str | None = _setting(None, "With targets views: how the cached outputs are stored; float32 reproduces online targets exactly (default: float16).", choices=CACHE_DTYPES)
    cache_top_k: int | None = _setting(None, "With targets views: keep only each view's K largest logits (the target renormalised over them; 0, the default: every class).")
    device: str = _setting("cpu", "Where the models run: cpu, cuda, cuda:N or mps.", identity=False)
    amp: bool = _setting(False, "bfloat16 autocast for the student's forward pass and the loss (on a GPU: faster, less memory).")
    amp_frozen: bool = _setting(False, "With amp, also run the teachers and the original student under autocast (routing still reads float32 copies of their logits).")
    channels_last: str = _setting("auto", "Channels-last memory for the models and batches; auto: on for conv nets on CUDA.", identity=False, choices=SWITCHES)
    prefetch: str = _setting("auto", "auto: on CUDA, copy the next batch from pinned memory while the step runs.", identity=False, choices=SWITCHES)
    compile: bool = _setting(False, "torch.compile the student and the frozen models (the first steps then take longer).", identity=False)
    guard: bool = _setting(False, "No-regression guard: score the student after every epoch on validation data and keep the best of the original and each epoch's student (docs/guard.md).")
    guard_holdout: float = _setting(0.1, "The guard without validation data: the stratified share of the transfer data held out of training (default: 0.1).")
    eval_every: int = _setting(1, "Score the evaluation data after every N-th epoch and always after the last (0: only after the last). The final record is the same either way; the history holds the epochs scored.", identity=False)
    checkpoint_dir: str | None = _setting(None, "Folder for checkpoints (one at the end of every epoch); the same call again resumes from the newest.", identity=False)
    checkpoint_every: int | None = _setting(None, "Also checkpoint every N optimiser steps.", identity=False)
    checkpoint_minutes: float | None = _setting(10.0, "Also checkpoint when this many minutes have passed since the last (default: 10).", identity=False)
    keep_checkpoints: bool = _setting(False, "Keep the checkpoints after the run finishes (by default they are removed then).", identity=False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name)))
        self._validate()

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "") -> "TransferSettings":
        """Settings from a mapping (a YAML section, keyword arguments); unknown names are refused with the nearest one."""
        check_names(values, where=where)
        return cls(**values)

    def replace(self, **changes) -> "TransferSettings":
        """A copy with ``changes``, validated; unknown names are refused with the nearest one."""
        check_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.names()}

    def identity(self) -> dict:
        """The settings that make two runs the same run: the part of a run's key and record that comes from its settings."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["identity"]}

    def _validate(self) -> None:
        check_training(self.epochs, self.lr, self.batch_size, self.momentum, self.weight_decay)
        if not 0 < self.guard_holdout < 1:
            raise ConfigError(f"guard_holdout is the share of the transfer data held out for the guard and must lie in (0, 1); got {self.guard_holdout}")
        if self.cache_top_k is not None and self.cache_top_k < 0:
            raise ConfigError(f"cache_top_k must be 0 (every logit) or a positive number of logits; got {self.cache_top_k}")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every is how many epochs lie between two scorings of the evaluation data (0: only after the last); got {self.eval_every}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be at least 1 step; got {self.checkpoint_every}")
        if self.checkpoint_minutes is not None and not self.checkpoint_minutes > 0:
            raise ConfigError(f"checkpoint_minutes must be positive (or None: no timed checkpoints); got {self.checkpoint_minutes}")
        if self.checkpoint_dir is None and (self.checkpoint_every is not None or self.keep_checkpoints):
            raise ConfigError("checkpoint_every and keep_checkpoints need checkpoint_dir, the folder to write checkpoints into")
        if self.amp_frozen and not self.amp:
            raise ConfigError("amp_frozen runs the frozen models under amp's autocast: set amp too")


def check_training(epochs: int, lr: float | None, batch_size: int, momentum: float, weight_decay: float) -> None:
    """The optimiser's numbers, checked alike for a transfer's settings and the engine's ``TrainConfig`` (``lr`` None: the method's default)."""
    if epochs < 1:
        raise ConfigError(f"epochs must be at least 1; got {epochs}")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"learning rate must be a positive number; got {lr}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1; got {batch_size}")
    if not 0 <= momentum < 1:
        raise ConfigError(f"momentum must lie in [0, 1); got {momentum}")
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ConfigError(f"weight decay must not be negative; got {weight_decay}")


# The settings every transfer record holds under their own names, which a control and the transfers it is
# compared with, or a reused soup ingredient and the soup, must share (with the student and the data).
RECORDED = ("epochs", "lr", "batch_size", "momentum", "weight_decay", "seed", "schedule", "augment")


def recorded_setting(record: Mapping, name: str):
    """A record's value of setting ``name``; a record written before the setting was recorded had its default."""
    if name in record:
        return record[name]
    return getattr(TransferSettings(), name) if name in _LATER else None


_LATER = ("schedule", "augment", "amp", "amp_frozen", "compile")  # recorded only from some version on


def check_names(names: Iterable[str], known: Iterable[str] = (), where: str = "") -> None:
    """Refuse names that are not settings (nor in ``known``), each with the nearest name as a suggestion."""
    valid = [*TransferSettings.names(), *known]
    for name in names:
        if name not in valid:
            raise ConfigError(f"{where}{': ' if where else ''}{unknown_phrase(name, valid, 'setting')}")


def unknown_phrase(name: str, valid: Iterable[str], kind: str) -> str:
    """``unknown setting 'epoch'; did you mean 'epochs'?`` (or the list of valid names where none is near)."""
    valid = list(valid)
    near = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if near:
        return f"unknown {kind} {name!r}; did you mean {near[0]!r}?"
    return f"unknown {kind} {name!r}; the {kind}s are: {', '.join(valid)}"


def setting_kind(f: dataclasses.Field) -> type:
    """The type of a setting's values (``int`` for ``cache_top_k``, whose default is None)."""
    return type(f.default) if f.default is not None else _OPTIONAL_KINDS[f.name]


def _coerce(f: dataclasses.Field, value):
    """A value of the field's type: numbers from YAML strings such as '1e-3', paths as strings; a clear error otherwise."""
    choices = f.metadata["choices"]
    if value is None:
        if f.default is None:
            return None
        raise ConfigError(f"{f.name} may not be empty; the default is {f.default!r}")
    kind = setting_kind(f)
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                value = value.lower() in ("true", "yes", "1")
            elif not isinstance(value, bool):
                raise ValueError
        elif kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        elif kind is str:
            if not isinstance(value, (str, Path)):
                raise ValueError
            value = str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{f.name}={value!r} is not a valid {kind.__name__}") from None
    if choices and value not in choices:
        raise ConfigError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}")
    return value


_OPTIONAL_KINDS = {"lr": float, "targets": str, "cache_dtype": str, "cache_top_k": int, "checkpoint_dir": str, "checkpoint_every": int, "checkpoint_minutes": float}
