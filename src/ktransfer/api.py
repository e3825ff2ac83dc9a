"""The Python API: ``ktransfer.transfer(student, teacher, transfer_data, eval_data, method=...)``.

(About 450 lines: ``transfer``'s docstring is the reference of every argument, and ``_transfer`` builds the
run's record in one place; the checks before training are in :mod:`ktransfer.transfer_checks`.)
"""

from __future__ import annotations

import copy
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from ._version import __version__
from .checkpoints import CheckpointStore
from .data.base import ImageData, as_image_data
from .distributed import Ranks, join
from .engine import Callback, Engine, Evaluator, TrainConfig
from .errors import ConfigError, ModelError
from .methods import create_method
from .methods.base import Method
from .metrics import ceiling, ceiling_fields, softmax
from .models.base import Model, as_model
from .paths import atomic_path
from .predictions import PredictionCache
from .settings import TransferSettings, unknown_phrase
from .targets import CachedTargets, OnlineTargets, resolve_targets
from .tracking import Tracker, Tracking, run_name
from .transfer_checks import check_compatible, check_finite_logits, guard_data, probe_models, run_settings, view_storage
from .view_cache import ViewCachedTargets


class ModuleState:
    """Where a module's tensors live and which of its parts are in train mode, to put back later."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.modes = [(sub, sub.training) for sub in module.modules()]
        self.parameter_devices = {name: p.device for name, p in module.named_parameters()}
        self.buffer_devices = {name: b.device for name, b in module.named_buffers()}

    @torch.no_grad()
    def restore(self) -> None:
        # Parent before child, as modules() yields them: a part set apart from its parent keeps its own mode.
        for sub, training in self.modes:
            sub.train(training)
        devices = {*self.parameter_devices.values(), *self.buffer_devices.values()}
        if len(devices) == 1:  # the usual case: torch's own move
            self.module.to(devices.pop())
            return
        for name, parameter in self.module.named_parameters():  # spread over several devices: tensor by tensor
            device = self.parameter_devices.get(name)
            if device is not None and parameter.device != device:
                owner, _, leaf = name.rpartition(".")
                moved = parameter.to(device)
                try:
                    parameter.data = moved.data  # the same Parameter object, as Module.to keeps it where it can
                except RuntimeError:  # a tensor type it cannot take (meta): a new Parameter, as Module.to makes then
                    self.module.get_submodule(owner)._parameters[leaf] = nn.Parameter(moved.data, parameter.requires_grad)
        for name, buffer in self.module.named_buffers():
            device = self.buffer_devices.get(name)
            if device is not None and buffer.device != device:
                owner, _, leaf = name.rpartition(".")
                self.module.get_submodule(owner)._buffers[leaf] = buffer.to(device)


@contextmanager
def kept_as_given(*models):
    """Within the block the given models may be moved and switched to eval mode; afterwards, and on
    an error, each is back on its devices and in its modes. Anything that is not a model is ignored."""
    states, seen = [], set()
    for model in models:
        module = model.module if isinstance(model, Model) else model
        if isinstance(module, nn.Module) and id(module) not in seen:
            seen.add(id(module))
            states.append(ModuleState(module))
    try:
        yield
    finally:
        for state in states:
            state.restore()


@dataclass
class TransferResult:
    """What a transfer gives back: the trained student, its metrics (a ``results.jsonl`` record) and the per-epoch history."""

    student: nn.Module
    metrics: dict
    history: list[dict] = field(default_factory=list)
    model: Model | None = None
    # The returned student's top-1 predictions on the evaluation set, for paired comparisons (controls).
    predictions: torch.Tensor | None = None

    def save_student(self, path: str | Path, format: str = "native") -> Path:
        """Write the trained student; returns where it went.

        ``native`` (the default): where the student's own library loads it in one line. A
        Hugging Face student (``hf:``) becomes a ``save_pretrained`` folder (``path`` without its
        suffix), with its image processor; a timm or torchvision student a safetensors state dict with
        the library's own keys (``timm.create_model(name, pretrained=True, num_classes=N,
        pretrained_cfg_overlay=dict(file=PATH, num_classes=N))``, or ``load_state_dict``). ``ktransfer``: a safetensors
        checkpoint in ktransfer's keys. Both safetensors files also record the architecture, so
        ``ktransfer.load_model(PATH)`` (``--student PATH``) rebuilds the student where its spec allows.
        """
        from .models.checkpoint import save_checkpoint
        from .models.hf import HFImageClassifier

        if format not in SAVE_FORMATS:
            raise ConfigError(f"save format must be one of {', '.join(SAVE_FORMATS)}; got {format!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if format == "native" and isinstance(self.student, HFImageClassifier):
            folder = path.with_suffix("") if path.suffix == ".safetensors" else path
            self.student.model.save_pretrained(folder)
            if getattr(self.student, "processor", None) is not None:
                self.student.processor.save_pretrained(folder)
            return folder
        made = {key: str(self.metrics.get(key)) for key in ("student", "teacher", "method")}
        model = self.model if self.model is not None else Model(self.student, str(self.metrics.get("student", "student")))
        if path.suffix == ".safetensors":
            try:
                return save_checkpoint(model, path, model.class_names, transferred=made)
            except ModelError:  # no spec to record (a plain module): the weights alone
                pass
        state = {k: v.detach().cpu().clone().contiguous() for k, v in self.student.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(state, tmp, metadata=made)
        return path


SAVE_FORMATS = ("native", "ktransfer")


def transfer(
    student,
    teacher,
    transfer_data,
    eval_data,
    method: str | Method = "kl_dp",
    settings: TransferSettings | None = None,
    *,
    method_params: dict | None = None,
    val_data=None,
    cache: PredictionCache | None = None,
    class_names: Sequence[str] | None = None,
    eval_references: dict[str, torch.Tensor] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    on_result: Callable[[TransferResult], None] | None = None,
    log: Callable[[str], None] | None = None,
    distributed: bool | None = None,
    loggers: Sequence[str | Tracker] | None = None,
    tracking_dir: str | os.PathLike | None = None,
    tracking_tags: dict[str, str] | None = None,
    **options,
) -> TransferResult:
    """Transfer knowledge from ``teacher`` into a copy of ``student``; the models given are left untouched.

    ``student``/``teacher``: ``nn.Module`` (logits out) or :class:`ktransfer.Model` (module plus
    preprocessing). ``teacher`` may be a list for methods that route between several teachers.
    Data: ``(images, labels)`` tensors, a ``Dataset`` of ``(image, label)`` or :class:`ImageData`.
    ``settings``: a :class:`~ktransfer.TransferSettings` (epochs, lr, batch size, schedule, targets,
    guard, checkpoints, device options, ...); keyword arguments named as its fields override it
    (``transfer(..., epochs=5)``), and any other name is refused with the nearest one ("unknown
    setting 'epoch'; did you mean 'epochs'?"). ``lr`` defaults to the paper's value for the method.
    ``method_params``: the method's hyperparameters (``ktransfer methods`` lists them); as a
    shorthand they may also be given as keyword arguments where the method takes them. ``val_data``:
    the guard's validation data (with ``guard``). ``eval_references`` maps a name
    to another student's predictions on ``eval_data``: every epoch is also scored against it
    (history keys ``delta_vs_NAME``, ``knowledge_gain_vs_NAME``, ...).

    ``augment``: ``"none"`` or ``"paper"`` (the paper's flip and colour distortion; flip and
    shift on one-channel images): teacher, original student and student see the same augmented
    view of each batch (``ktransfer.augment``). ``targets``: ``"cached"`` (the frozen models'
    outputs computed once) or ``"online"`` (computed per batch); left out, it is cached where
    that is exact, i.e. without augmentation, and online with it. Cached with augmentation is
    refused; ``"views"`` (augmentation only) reads the frozen outputs on the very views of this
    run from the cache folder, computing missing epochs first, stored as ``cache_dtype``
    (``"float16"``, the default, or ``"float32"``, exact) and, with ``cache_top_k`` = k > 0, only
    each view's k largest logits (the target renormalised over them; docs/performance.md). Both are
    refused without ``targets="views"``, and so is a method ``top_k`` above ``cache_top_k``. The
    record says which was used.

    Checkpoints (off unless ``checkpoint_dir`` is given; see docs/checkpoints.md): one is written
    into ``checkpoint_dir`` at the end of every epoch, after every ``checkpoint_every`` optimiser
    steps and when ``checkpoint_minutes`` have passed since the last. Calling ``transfer`` again
    with the same arguments resumes from the newest one, with the same result as an uninterrupted
    run; a folder holding another configuration's unfinished run is refused
    (:class:`~ktransfer.checkpoints.CheckpointError`), and a run that finished there raises
    :class:`~ktransfer.checkpoints.RunFinishedError`. ``on_result`` is called with the result
    before the run is marked finished and its checkpoints are removed (kept with
    ``keep_checkpoints``): save what you need there. ``log`` receives the lines worth showing
    (resuming, a damaged checkpoint passed over); by default they go to the ``ktransfer`` logger.

    ``distributed``: one transfer on the processes torchrun started (see docs/scale.md); left out,
    it is detected from the environment torchrun sets. The student trains under
    DistributedDataParallel, each process on its share of every batch (``batch_size`` is the
    global batch, a multiple of the number of processes); evaluation is sharded and gathered, so
    the metrics are of the whole evaluation set. Every process returns the same metrics; only
    rank 0 calls ``on_step``, ``on_epoch``, ``on_result`` and ``log``, and writes checkpoints and
    the prediction cache. The process group is created if the script has not (and destroyed at exit).

    Speed on a GPU (see docs/performance.md): ``amp`` trains the student under bfloat16 autocast,
    ``amp_frozen`` also runs the teachers and the original student under it (DP still routes on
    float32 copies of their logits); ``channels_last`` ("auto": on for conv nets on CUDA, "on",
    "off"); ``prefetch`` ("auto": pinned batches copied ahead on CUDA); ``compile``: torch.compile
    the student and the frozen models. None of them changes the result beyond rounding.

    ``loggers``: experiment trackers to send the run to, by name (``"tensorboard"``, ``"mlflow"``,
    ``"wandb"``, ``"trackio"``) or as :class:`ktransfer.tracking.Tracker` objects: per step the loss
    and the method's statistics, per epoch the evaluation, once the settings and the final record
    (docs/tracking.md). Local ones write under ``tracking_dir`` (default: the current directory);
    ``tracking_tags`` are added to the run's tags. A tracker that fails is dropped with one warning.
    """
    started = time.perf_counter()
    method, settings = resolve_run(method, settings, method_params, options)
    s = settings
    student_model = as_model(student, "student")
    if not any(p.requires_grad for p in student_model.module.parameters()):
        raise ConfigError(f"{student_model.name} has no parameter that requires grad, so it cannot train; call module.requires_grad_(True) on it first")
    teachers = [as_model(t, f"teacher{i}" if isinstance(teacher, (list, tuple)) else "teacher") for i, t in enumerate(teacher if isinstance(teacher, (list, tuple)) else [teacher])]
    if len(teachers) > 1 and not method.supports_multiple_teachers:
        raise ConfigError(f"method {method.name} takes one teacher; for several teachers in one run use a DP method (kl_dp)")
    targets = resolve_targets(s.targets, s.augment)
    cache_dtype, cache_top_k = view_storage(targets, s.cache_dtype, s.cache_top_k, method, student_model.num_classes)
    transfer_set = as_image_data(transfer_data, "transfer data", class_names)
    eval_set = as_image_data(eval_data, "eval data", class_names)
    transfer_set, guard_set, guard_source = guard_data(s.guard, val_data, s.guard_holdout, transfer_set, s.seed, class_names, eval_set=eval_set)
    check_compatible(student_model, teachers, transfer_set, eval_set, *([guard_set] if guard_set is not None else []))
    if guard_source == "holdout":
        (log or _log_line)(
            f"Warning: the guard scores on {len(guard_set):,} transfer images held out of training ({s.guard_holdout:.0%}); "
            f"where the transfer data is the student's own training data this is a weak guard: give val_data (--val-data) the student never saw"
        )
    config = train_config(s, method)
    cache = cache if cache is not None else PredictionCache(enabled=False)
    checkpoints = None
    if s.checkpoint_dir is not None:
        fingerprint = run_settings(student_model, teachers, transfer_set, eval_set, method, config, targets, (cache_dtype, cache_top_k))
        if guard_set is not None:  # a checkpoint carries the guard's best so far: resumed only with the same guard
            fingerprint["guard"] = {"source": guard_source, "holdout": s.guard_holdout if guard_source == "holdout" else None, "data": guard_set.fingerprint()}
        checkpoints = CheckpointStore(s.checkpoint_dir, fingerprint, s.checkpoint_every, s.checkpoint_minutes, log or _log_line)
        checkpoints.check()  # a finished run or another configuration's folder: refused before any work

    ranks = join(distributed, s.device)
    if ranks is not None:
        config = replace(config, device=ranks.device(config.device))
        if not ranks.is_main:  # rank 0 alone reports progress and writes
            on_step = on_epoch = on_result = None
            if checkpoints is not None:
                checkpoints.log = lambda line: None
    tracking = None
    if loggers and (ranks is None or ranks.is_main):
        tags = dict(tracking_tags or {})
        control = tags.get("control")  # a control run (ktransfer.controls) is named by its kind, with no teacher
        names = {"student": student_model.spec or student_model.name, "teacher": "none" if control else teachers[0].spec or teachers[0].name, "method": control or method.name}
        recorded = {**names, "hparams": method.describe(), "lr": config.lr, **{k: v for k, v in asdict(s).items() if k != "lr"}}
        name = run_name(names["method"], names["student"], None if control else names["teacher"], s.seed)
        tracking = Tracking.start(loggers, name, recorded, {**names, **tags}, log or _log_line, tracking_dir or ".")
    # The user's models go back to their devices and modes when the transfer ends, also on an error.
    try:
        with kept_as_given(student_model, *teachers):
            result = _transfer(student_model, teachers, transfer_set, eval_set, method, config, cache, targets, on_step, on_epoch, eval_references, started, checkpoints, guard_set, guard_source, s.guard_holdout, ranks, (cache_dtype, cache_top_k), log, [tracking] if tracking is not None else [])
    except BaseException:
        if tracking is not None:
            tracking.finish(None)
        raise
    if tracking is not None:
        tracking.finish(result.metrics)
    if on_result is not None:
        on_result(result)
    if checkpoints is not None and (ranks is None or ranks.is_main):
        checkpoints.finish(keep=s.keep_checkpoints)
    if ranks is not None:
        ranks.barrier()  # every process returns once rank 0 has written
    return result


def resolve_run(method: str | Method, settings: TransferSettings | None, method_params: dict | None, options: dict) -> tuple[Method, TransferSettings]:
    """The method and the settings of a call: ``options`` split into settings (overriding ``settings``) and the method's hyperparameters.

    A name that is neither is refused with the nearest setting or hyperparameter ("unknown setting
    'epoch'; did you mean 'epochs'?"), before any work."""
    if settings is not None and not isinstance(settings, TransferSettings):
        raise ConfigError(f"settings must be a ktransfer.TransferSettings; got {type(settings).__name__} (give single settings as keyword arguments, e.g. epochs=5)")
    names = set(TransferSettings.names())
    changes = {k: v for k, v in options.items() if k in names}
    rest = {k: v for k, v in options.items() if k not in names}
    params = dict(method_params or {})
    if rest:
        takes = method_hyperparameters(method)
        unknown = [k for k in rest if k not in takes]
        if unknown:
            raise ConfigError(unknown_phrase(unknown[0], [*names, *takes], "setting"))
        doubled = sorted(set(rest) & set(params))
        if doubled:
            raise ConfigError(f"{', '.join(doubled)} given both in method_params and as keyword arguments: give each once")
        params.update(rest)
    if isinstance(method, str):
        method = create_method(method, **params)
    elif params:
        raise ConfigError("pass hyperparameters either to create_method or to transfer (method_params), not both")
    settings = settings or TransferSettings()
    return method, settings.replace(**changes) if changes else settings


def method_hyperparameters(method: str | Method) -> list[str]:
    """The hyperparameter names a method takes (none known for a method object: its parameters are already set)."""
    if not isinstance(method, str):
        return []
    from .methods.base import METHODS

    cls = METHODS.get(method)
    if cls is None:
        create_method(method)  # the unknown-method error
    return [f.name for f in fields(cls.Params)]


def train_config(settings: TransferSettings, method: Method) -> TrainConfig:
    """The engine's training configuration of these settings (the learning rate the method's paper value where left out)."""
    config = TrainConfig(
        epochs=settings.epochs, lr=settings.lr if settings.lr is not None else method.default_lr, batch_size=settings.batch_size, momentum=settings.momentum,
        weight_decay=settings.weight_decay, seed=settings.seed, device=settings.device, schedule=settings.schedule, augment=settings.augment,
        amp=settings.amp, amp_frozen=settings.amp_frozen, channels_last=settings.channels_last, prefetch=settings.prefetch, compile=settings.compile,
        eval_every=settings.eval_every,
    )
    config.validate()
    return config


def _log_line(line: str) -> None:
    logger = logging.getLogger("ktransfer")
    (logger.warning if line.startswith("Warning") else logger.info)(line)


def eval_ceiling(cache: PredictionCache, student: Model, teachers: Sequence[Model], data: ImageData, device="cpu") -> dict:
    """The ceiling (``ktransfer.metrics.ceiling``) of ``student`` with ``teachers`` on ``data``, from the cached logits of each model.

    A model whose logits are not finite on ``data`` is refused by name: its ensemble would be NaN.
    """
    models = (student, *teachers)
    logits = [cache.logits(model, data, device=device) for model in models]
    for model, z in zip(models, logits):
        check_finite_logits(model, z, data)
    return ceiling(data.labels, [softmax(z) for z in logits])


def _view_targets(teachers, original, transfer_set, student_preprocess, config: TrainConfig, cache: PredictionCache, ranks, storage: tuple[str, int], log) -> ViewCachedTargets:
    """The frozen outputs on this run's augmented views, from the cache folder; missing epochs are computed now."""
    if not cache.enabled:
        raise ConfigError("targets views keeps the frozen outputs per augmented view in the prediction cache folder; give a cache (PredictionCache(folder)) or use online targets")
    if ranks is not None:
        raise ConfigError("targets views is not supported under torchrun yet; build the cache first with ktransfer precompute in one process, or use online targets")
    source = ViewCachedTargets.for_transfer(cache.root, teachers, original, transfer_set, student_preprocess, config.augment, config.seed, *storage, device=config.device)
    source.ensure(config.epochs, config.eval_batch_size, config.device, log=log)
    return source


def _transfer(student_model: Model, teachers: list[Model], transfer_set: ImageData, eval_set: ImageData, method: Method, config: TrainConfig, cache: PredictionCache, targets: str, on_step, on_epoch, eval_references, started: float, checkpoints: CheckpointStore | None = None, guard_set: ImageData | None = None, guard_source: str | None = None, guard_holdout: float | None = None, ranks: Ranks | None = None, view_storage: tuple[str, int] = ("float16", 0), log=None, callbacks: Sequence[Callback] = ()) -> TransferResult:
    """The transfer itself, on checked arguments; it moves the given models to the device and may leave them in eval mode."""
    device = config.device
    # The user's student stays as it was and serves as the frozen original; a copy trains.
    original = student_model.rebuilt(name=f"{student_model.name} (original)", _fingerprint=student_model._fingerprint)
    trained = student_model.rebuilt(copy.deepcopy(student_model.module).to(device))
    for model in (original, *teachers):
        model.module.to(device)

    for data in (transfer_set, eval_set):
        probe_models(data, [student_model, *teachers], device)
    # Under torchrun rank 0 computes the frozen models' outputs (and writes the cache); the others receive them.
    main = ranks is None or ranks.is_main
    before, teacher_eval = (cache.predictions(original, eval_set, device=device), cache.predictions(teachers[0], eval_set, device=device)) if main else (None, None)
    if ranks is not None:
        before, teacher_eval = ranks.from_main((before, teacher_eval))
    # The pair's ceiling: the ensemble of the original student and the teachers, from the logits just cached.
    pair_ceiling = eval_ceiling(cache, original, teachers, eval_set, device) if main else None
    if ranks is not None:
        pair_ceiling = ranks.from_main(pair_ceiling)
    needs_original = method.needs_original
    if targets == "cached" and not method.needs_features:
        frozen = (teachers if method.needs_teacher else [], original if needs_original else None)
        source = CachedTargets(*frozen, transfer_set, cache, device) if main else CachedTargets([], None, transfer_set, cache, device)
        if ranks is not None:
            logits = ranks.from_main((source.teacher_logits, source.original_logits) if main else None)
            source.teacher_logits, source.original_logits = (None if x is None else x.to(device) for x in logits)
    elif targets == "views" and not method.needs_features:
        source = _view_targets(teachers if method.needs_teacher else [], original if needs_original else None, transfer_set, student_model.preprocess, config, cache, ranks, view_storage, log)
    else:
        source = OnlineTargets(teachers if method.needs_teacher else [], original if needs_original else None, with_features=method.needs_features, views=config.augment != "none")
    if isinstance(source, CachedTargets) and source.teacher_logits is not None:
        for teacher, logits in zip(teachers, source.teacher_logits):
            check_finite_logits(teacher, logits, transfer_set)
    evaluator = Evaluator(eval_set, before, teacher_eval, config.eval_batch_size, device, references=eval_references, ranks=ranks)
    guard = Evaluator(guard_set, batch_size=config.eval_batch_size, device=device, ranks=ranks) if guard_set is not None else None
    engine = Engine(trained, method, transfer_set, config, source, evaluator, on_step, on_epoch, checkpoints, guard, ranks, callbacks)
    history = engine.run()
    final = history[-1]
    guard_record = {}
    if guard is not None:
        best = engine.state.guard
        guard_epoch = engine.restore_best()
        guard_record = {"guard_epoch": guard_epoch, "guard_acc_before": best["acc_before"], "guard_acc_after": best["acc"], "guard_source": guard_source, "guard_size": len(guard_set)}
        if guard_source == "holdout":
            guard_record["guard_holdout"] = guard_holdout
        guard_record["last_epoch"] = {k: final[k] for k in ("acc_after", "delta", "knowledge_gain", "knowledge_loss", "p_value")}
        if guard_epoch != config.epochs:
            final = {**final, **engine.evaluate()}  # the returned student's evaluation-set numbers
    if evaluator.last_predictions is None:  # resumed from the last epoch's checkpoint: nothing left to train
        engine.evaluate()
    result_module = method.eval_module(trained.module)
    if result_module is not trained.module:
        # A module the method kept apart (MCL's slow weights) is frozen while it trains; hand it back
        # as trainable as the student, so that it can be transferred into or fine-tuned again.
        for returned, trained_parameter in zip(result_module.parameters(), trained.module.parameters()):
            returned.requires_grad_(trained_parameter.requires_grad)
    metrics = {
        "student": student_model.spec or student_model.name,
        "teacher": teachers[0].spec or teachers[0].name,
        "method": method.name,
        **{k: final[k] for k in ("acc_before", "acc_after", "teacher_acc", "delta", "knowledge_gain", "knowledge_loss", "pos_flips_before", "pos_flips_after", "neg_flips_before", "neg_flips_after", "delta_pos_flips", "delta_neg_flips", "n_eval", "gain_count", "loss_count", "p_value")},
        "teacher_share": final.get("teacher_share"),
        **ceiling_fields(pair_ceiling, final["delta"]),  # ensemble_acc, ensemble_delta, oracle_acc, capture
        "epochs": config.epochs,
        "lr": config.lr,  # as asked: a rollback after a NaN loss halves the engine's own copy (the record's final_lr)
        "batch_size": config.batch_size,
        "momentum": config.momentum,
        "weight_decay": config.weight_decay,
        "seed": config.seed,
        "schedule": config.schedule,
        "targets": "online" if isinstance(source, OnlineTargets) else "views" if isinstance(source, ViewCachedTargets) else "cached",  # feature methods always run online
        **({"view_cache": source.describe()} if isinstance(source, ViewCachedTargets) else {}),
        "augment": config.augment,
        # How it ran on the hardware: bf16 autocast, memory format, compilation (results agree up to rounding).
        "amp": config.amp,
        "amp_frozen": config.amp_frozen,
        "channels_last": engine.channels_last,
        "compile": config.compile,
        "hparams": method.describe(),
        "n_transfer": len(transfer_set),
        "transfer_data": transfer_set.name,
        "eval_data": eval_set.name,
        **guard_record,
        "seconds": time.perf_counter() - started,
        "version": __version__,
        "history": history,
    }
    if engine.state.rollback:  # a NaN or infinite loss was rolled back and retried at half the learning rate
        metrics.update(engine.state.rollback)
    if len(teachers) > 1:
        metrics["teachers"] = [t.spec or t.name for t in teachers]
    if ranks is not None:  # batch_size above is the global batch, shared out over these processes
        metrics["processes"] = ranks.world_size
    result_module.eval()  # ready for inference, as the models it was evaluated as
    final_model = trained.rebuilt(result_module)
    return TransferResult(result_module, metrics, history, final_model, evaluator.last_predictions)


