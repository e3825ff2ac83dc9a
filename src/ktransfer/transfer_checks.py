"""What a transfer checks before it trains, and what makes two runs the same for a checkpoint.

Each check fails with one line that says what to change: models with different label spaces, data that
does not fit them, guard data that overlaps the evaluation data, view-cache options that would be
ignored, a model that cannot take the images or gives NaN logits.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Sequence

import torch

from .data.base import ImageData, as_image_data, stratified_split
from .engine import TrainConfig
from .errors import ConfigError, DataError, ModelError
from .methods.base import Method
from .models.base import Model
from .targets import refuse_view_options


def check_compatible(student: Model, teachers: Sequence[Model], *datasets: ImageData) -> None:
    """Teacher and student must share one label space, and the data must fit it (and fit their preprocessing)."""
    classes = student.num_classes
    for teacher in teachers:
        if teacher.num_classes != classes:
            raise ModelError(
                f"teacher {teacher.name} predicts {teacher.num_classes} classes but student {student.name} predicts {classes}; "
                f"fit both to the same label space first with 'ktransfer adapt'"
            )
    for data in datasets:
        if len(data) == 0:
            raise DataError(f"{data.name} is empty: it holds no samples; give it at least one labelled image")
        if data.num_classes > classes or (len(data) and int(data.labels.max()) >= classes):
            raise ModelError(f"{data.name} has {data.num_classes} classes but the models predict {classes}; fit the models to this data with 'ktransfer adapt'")
        if not getattr(data, "is_images", True):
            for model in (student, *teachers):
                if model.preprocess.needs_images:
                    raise ModelError(
                        f"{data.name} holds input of shape {tuple(data.images.shape)}, not images [N, C, H, W], but {model.name} preprocesses images "
                        f"({model.preprocess.describe()}); give it as a plain nn.Module, or as ktransfer.Model without image preprocessing"
                    )


def guard_data(guard: bool, val_data, holdout: float, transfer_set: ImageData, seed: int, class_names=None, *, eval_set: ImageData | None = None) -> tuple[ImageData, ImageData | None, str | None]:
    """The data the student trains on, the guard's held-out data and where that came from ("val_data" or "holdout").

    Guard data that shares any sample with ``eval_set`` is refused: the guard would choose the epoch
    on the evaluation data, and every number reported there would be biased."""
    if not guard:
        if val_data is not None:
            raise ConfigError("val_data is the guard's held-out data: pass guard=True (--guard) with it, or leave it out")
        return transfer_set, None, None
    if val_data is not None:
        guard_set = as_image_data(val_data, "validation data", class_names)
        if eval_set is not None:
            check_guard_data(guard_set, eval_set, "val_data")
        return transfer_set, guard_set, "val_data"
    if not 0 < holdout < 1:
        raise ConfigError(f"guard_holdout is the share of the transfer data held out for the guard and must lie in (0, 1); got {holdout}")
    size = round(holdout * len(transfer_set))
    if not 1 <= size < len(transfer_set):
        raise ConfigError(f"a {holdout:.0%} guard holdout of {len(transfer_set)} transfer images leaves none to hold out or none to train on; give val_data or change guard_holdout")
    held_out, kept = stratified_split(transfer_set.labels, size, seed)
    # The trained part keeps the data's name: the record's guard fields say what was held out.
    guard_set = transfer_set.subset(held_out, f"{transfer_set.name} (guard holdout)")
    if eval_set is not None:
        check_guard_data(guard_set, eval_set, "holdout")
    return transfer_set.subset(kept, transfer_set.name), guard_set, "holdout"


def check_guard_data(guard_set, eval_set, source: str) -> None:
    """Refuse guard data that shares samples with the evaluation data (the same set, a copy, a part of it, the same files)."""
    from .data.overlap import overlap_phrase, shared_samples

    shared = shared_samples(guard_set, eval_set)
    if not shared:
        return
    if source == "val_data":
        raise ConfigError(
            f"the guard's validation data {overlap_phrase(guard_set, eval_set, shared)}: choosing the epoch on it would bias every number reported there; "
            f"give validation data the evaluation never sees (for Fashion-MNIST: fashion-mnist:validation), or leave out val_data (--val-data) to hold out a share of the transfer data"
        )
    raise ConfigError(
        f"the guard's holdout {overlap_phrase(guard_set, eval_set, shared)}: the transfer data overlaps the evaluation data, "
        f"so the guard would choose the epoch on evaluation samples; give val_data (--val-data) the evaluation never sees (for Fashion-MNIST: fashion-mnist:validation), "
        f"or transfer data disjoint from the evaluation data"
    )


def view_storage(targets: str, cache_dtype: str | None, cache_top_k: int | None, method: Method, classes: int) -> tuple[str, int]:
    """How a view cache stores the frozen outputs, ``(dtype, top_k)``, from the options as given (None: left out).

    They are refused where they would be ignored (targets other than views), and so is a method
    ``top_k`` above the cache's: the classes the cache dropped read back tied, so the method would
    pick its extra classes among them arbitrarily.
    """
    refuse_view_options(targets, cache_dtype, cache_top_k)
    if targets != "views":
        return "float16", 0
    dtype, top_k = cache_dtype if cache_dtype is not None else "float16", cache_top_k if cache_top_k is not None else 0
    some_classes = isinstance(top_k, int) and 0 < top_k < classes  # the cache keeps only each view's top_k logits
    if getattr(getattr(method, "params", None), "routing", None) == "margin" and (dtype != "float32" or some_classes):
        raise ConfigError(
            f"method {method.name} routes by margin, which a view cache keeps only approximately (its logits are {dtype}"
            f"{f', top {top_k} only' if some_classes else ''}): use targets online, or a view cache with cache_dtype float32 and every class"
        )
    method_top_k = getattr(getattr(method, "params", None), "top_k", 0) or 0
    if some_classes and top_k < method_top_k < classes:
        raise ConfigError(
            f"method {method.name} has top_k {method_top_k} but the view cache keeps only each view's {top_k} largest logits, so it would pick "
            f"{method_top_k - top_k} classes among tied ones arbitrarily: give the method a top_k of at most {top_k}, or the cache a top-k of at least {method_top_k}"
        )
    return dtype, top_k


def run_settings(student: Model, teachers: list[Model], transfer_set: ImageData, eval_set: ImageData, method: Method, config: TrainConfig, targets: str = "cached", storage: tuple[str, int] = ("float16", 0)) -> dict:
    """What determines a run's training and its history, as plain data: a checkpoint is resumed only by a run with the same.

    The target mode counts (a top-k or float16 view cache changes the loss itself), and with views
    the cache's dtype and top-k; methods that compare features always run online.
    """
    training = {key: value for key, value in asdict(config).items() if key not in ("device", "eval_batch_size", "prefetch", "compile", "compile_backend")}
    mode = "online" if method.needs_features else targets
    cache_dtype, cache_top_k = storage if mode == "views" else (None, None)
    return {
        "method": method.name,
        "hparams": method.describe(),
        **training,
        "targets": mode,
        "cache_dtype": cache_dtype,
        "cache_top_k": cache_top_k,
        "student": student.fingerprint(),
        "teachers": [teacher.fingerprint() for teacher in teachers],
        "transfer_data": transfer_set.fingerprint(),
        "eval_data": eval_set.fingerprint(),  # the history's numbers come from it
    }


@torch.no_grad()
def probe_models(data: ImageData, models: Sequence[Model], device) -> None:
    """One eval-mode forward of the first sample through each model, before any training: an input
    the model cannot take, or a model whose logits are NaN or infinite, is a one-line error naming it."""
    _, images, _ = next(iter(data.batches(torch.arange(1), 1)))
    images = images.to(device)
    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        raise DataError(f"{data.name} holds NaN or infinite pixel values (its first sample has some); clean the images before transferring on them")
    for model in models:
        was_training = model.module.training
        model.module.eval()
        try:
            logits = model.logits(images)
        except Exception as exc:  # noqa: BLE001 - whatever the module raises, the cause is its input
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"{model.name} cannot take the images of {data.name} (one sample of shape {tuple(images.shape)}): {reason}; "
                f"resize the images to the size the model expects, or give the model a Preprocess that does"
            ) from exc
        finally:
            model.module.train(was_training)
        check_finite_logits(model, logits, data)


def check_finite_logits(model: Model, logits: torch.Tensor, data: ImageData) -> None:
    bad = ~torch.isfinite(logits).all(dim=-1)
    if bool(bad.any()):
        raise ModelError(
            f"{model.name} gives NaN or infinite logits on {int(bad.sum())} of {len(bad)} samples of {data.name} checked; "
            f"check its weights (load them again) and its preprocessing before transferring from it"
        )
