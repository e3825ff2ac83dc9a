"""The two controls every comparison carries, and how a transfer is scored against them.

A gain counts only beside a run that could have produced it without the teacher:

``ce``    fine-tuning on the labels alone, no teacher: what the labels give.
``self``  KL+DP with every sample routed to the original student (``kl_dp`` with
          ``routing=self``): what DP's pull toward the original gives on its own.

A control runs once per student and training setting (data, epochs, learning rate, batch size,
seed, augmentation) and is a record of its own (``teacher: null``, ``control: true``). Each
transfer record then gains, against each control, the difference of accuracies and the exact
McNemar p-value of that difference on the same evaluation images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from .methods import create_method
from .methods.base import Method
from .metrics import paired_counts, paired_p_value
from .paths import atomic_path
from .settings import RECORDED, recorded_setting

CONTROLS = ("ce", "self")
# The record fields of a transfer that only make sense with a teacher; a control leaves them empty.
TEACHER_FIELDS = ("teacher_acc", "pos_flips_before", "pos_flips_after", "neg_flips_before", "neg_flips_after", "delta_pos_flips", "delta_neg_flips", "teacher_share",
                  "ensemble_acc", "ensemble_delta", "oracle_acc", "capture")  # no teacher, no ceiling: the keys stay, empty
# What a control must share with the transfer it is compared with.
SETTING_KEYS = ("student", *RECORDED, "transfer_data", "eval_data")


def control_method(kind: str) -> Method:
    if kind == "ce":
        return create_method("ce")
    if kind == "self":
        return create_method("kl_dp", routing="self")
    raise ValueError(f"unknown control {kind!r}; the controls are {', '.join(CONTROLS)}")


def check_controls(kinds: Iterable[str]) -> list[str]:
    from .errors import ConfigError

    kinds = list(dict.fromkeys(kinds))
    unknown = [k for k in kinds if k not in CONTROLS]
    if unknown:
        raise ConfigError(f"unknown control(s) {', '.join(map(repr, unknown))}; the controls are {', '.join(CONTROLS)}")
    return kinds


def run_control(kind: str, student, transfer_data, eval_data, settings=None, **options):
    """One control run of ``student``: a :class:`~ktransfer.api.TransferResult` whose record says ``control: true``.

    ``settings`` (a :class:`~ktransfer.TransferSettings`) and ``options`` are those of
    :func:`ktransfer.transfer` (epochs, lr, seed, ..., cache, val_data) and must be the ones of the
    transfers the control is compared with. ``lr`` should be given: the methods'
    paper defaults differ, and a control at another learning rate answers another question.
    """
    from .api import transfer

    # The student stands in for the teacher: ce never reads it, and self routes every sample to the original.
    if options.get("loggers"):  # a tracker names the run by its kind
        options = {**options, "tracking_tags": {**(options.get("tracking_tags") or {}), "control": kind}}
    result = transfer(student, student, transfer_data, eval_data, control_method(kind), settings, **options)
    result.metrics = as_control_record(result.metrics, kind)
    return result


def as_control_record(record: dict, kind: str) -> dict:
    record = dict(record)
    record.update({"teacher": None, "method": kind, "control": True, **{k: None for k in TEACHER_FIELDS if k in record}})
    if kind == "self":
        record["hparams"] = {**record.get("hparams", {}), "routing": "self"}
    return record


def is_control(record: Mapping) -> bool:
    return bool(record.get("control"))


def setting_key(record: Mapping) -> tuple:
    """What a control and the transfers it serves have in common."""
    return tuple(str(recorded_setting(record, k)) for k in SETTING_KEYS)


def attach_controls(
    records: Sequence[dict],
    predictions: Mapping[int, torch.Tensor],
    labels: torch.Tensor,
) -> None:
    """Add ``control_delta``, ``delta_vs_control``, ``p_value_vs_control`` and the ``self`` fields to each transfer record, in place.

    ``predictions`` maps ``id(record)`` to that run's final predictions on the evaluation set
    (every record, controls included). Fields stay absent where no matching control ran.
    """
    controls = {(r["method"], setting_key(r)): r for r in records if is_control(r)}
    for record in records:
        if is_control(record):
            continue
        for kind, prefix, versus in (("ce", "control", "control"), ("self", "self", "self")):
            control = controls.get((kind, setting_key(record)))
            if control is None or id(control) not in predictions or id(record) not in predictions:
                continue
            control_only, transfer_only = paired_counts(labels, predictions[id(control)], predictions[id(record)])
            record[f"{prefix}_delta"] = control["delta"]
            record[f"delta_vs_{versus}"] = record["acc_after"] - control["acc_after"]
            record[f"p_value_vs_{versus}"] = paired_p_value(labels, predictions[id(control)], predictions[id(record)])
            record[f"gain_count_vs_{versus}"], record[f"loss_count_vs_{versus}"] = transfer_only, control_only


def save_predictions(folder: Path, key: str, predictions: torch.Tensor) -> None:
    """Keep a run's evaluation-set predictions (``folder/KEY.pt``), so reused runs can still be compared with new controls."""
    with atomic_path(folder / f"{key}.pt") as tmp:
        torch.save(predictions.to(torch.int32).cpu(), tmp)


def load_predictions(folder: Path, key: str) -> torch.Tensor | None:
    path = Path(folder) / f"{key}.pt"
    try:
        return torch.load(path, weights_only=True).long() if path.is_file() else None
    except Exception:  # noqa: BLE001 - a damaged file only costs the paired comparison (and, in the demo, a rerun)
        return None
