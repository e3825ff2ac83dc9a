"""A planned run of a study (:class:`RunSpec`): everything that determines its result, its key in the
store, and the :class:`~ktransfer.TransferSettings` it runs with. The runner plans them from a
:class:`~ktransfer.study.config.StudyConfig`; the store keeps them; the executors run them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..settings import TransferSettings

CONTROL_PREFIX = "control:"  # a control's method in the store, apart from a method a study may list (ce is one)


@dataclass(frozen=True)
class RunSpec:
    """One transfer of a study, with everything that determines its result."""

    phase: str
    student: str
    teacher: str
    method: str
    lr: float
    params_json: str
    seed: int
    epochs: int
    batch_size: int
    targets: str
    data_json: str
    augment: str = "none"
    guard: bool = False
    settings_json: str = ""  # the other settings that change the result (StudyConfig.run_settings), where given
    runtime_json: str = ""  # speed switches (channels_last, prefetch, compile): not part of the key
    tracking_json: str = ""  # the trackers the run is sent to, their folder and its tags: not part of the key

    @property
    def params(self) -> dict:
        return json.loads(self.params_json)

    def tracking(self) -> dict:
        """``transfer``'s tracking arguments (``loggers``, ``tracking_dir``, ``tracking_tags``), or none."""
        if not self.tracking_json:
            return {}
        given = json.loads(self.tracking_json)
        tags = {**given["tags"], "phase": self.phase, "run": self.key, "seed": str(self.seed)}
        return {"loggers": given["loggers"], "tracking_dir": given["folder"], "tracking_tags": tags}

    def transfer_settings(self, device: str) -> TransferSettings:
        """The run's :class:`~ktransfer.TransferSettings` (the method's hyperparameters are :attr:`params`)."""
        extra = {**(json.loads(self.settings_json) if self.settings_json else {}), **(json.loads(self.runtime_json) if self.runtime_json else {})}
        return TransferSettings(
            epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed, targets=self.targets, augment=self.augment,
            guard=self.guard, device=device, **extra,
        )

    def config(self) -> dict:
        config = {
            "phase": self.phase, "student": self.student, "teacher": self.teacher, "method": self.method, "lr": self.lr,
            "params": self.params, "seed": self.seed, "epochs": self.epochs, "batch_size": self.batch_size,
            "targets": self.targets, "data": json.loads(self.data_json),
        }
        if self.augment != "none":  # absent otherwise, so runs stored before augmentation existed keep their keys
            config["augment"] = self.augment
        if self.guard:  # likewise
            config["guard"] = True
        if self.settings_json:  # likewise
            config["settings"] = json.loads(self.settings_json)
        return config

    @property
    def key(self) -> str:
        return hashlib.blake2b(json.dumps(self.config(), sort_keys=True).encode(), digest_size=8).hexdigest()

    @property
    def control(self) -> str | None:
        """``ce`` or ``self`` for a control run, else None."""
        return self.method.removeprefix(CONTROL_PREFIX) if self.method.startswith(CONTROL_PREFIX) else None

    def describe(self) -> str:
        if self.control:
            return f"{self.control} control (lr {self.lr:g}, no teacher): {self.student}, seed {self.seed}" + (", guarded" if self.guard else "")
        params = " ".join(f"{k}={v}" for k, v in self.params.items())
        augmented = (f", augment {self.augment}" if self.augment != "none" else "") + (", guarded" if self.guard else "")
        return f"{self.method} (lr {self.lr:g}{' ' + params if params else ''}): {self.teacher} → {self.student}, seed {self.seed}{augmented}"


def setting_label(setting: dict) -> str:
    params = " ".join(f"{k}={v}" for k, v in sorted(setting["params"].items()))
    return f"lr={setting['lr']:g}" + (f" {params}" if params else "")

