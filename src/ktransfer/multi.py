"""Transfer from several teachers: parallel, sequential and soup (paper section 4.3, appendix B.6).

Every strategy is built from calls of :func:`ktransfer.transfer`; none has a training loop of its own.

- ``parallel``: one run in which each sample learns from the most confident of the original
  student and the K teachers (a DP method routes among K+1 models).
- ``sequential``: one stage per teacher, ordered by teacher accuracy; each stage is a fresh
  ``transfer`` call (fresh optimiser) whose student, and so whose DP retain target, is the
  student the previous stage left.
- ``soup``: one single-teacher transfer per teacher into copies of the same student, then a
  uniform average of the students' weights, optionally with batch-norm statistics recomputed on
  the transfer data.

The result is a :class:`~ktransfer.api.TransferResult` whose ``metrics`` is a ``results.jsonl``
record with ``strategy`` and ``teachers``; see ``docs/multi-teacher.md`` for its fields.

(About 460 lines: the three strategies share one ``_Run`` and one record builder, and apart they would
import each other; the weight averaging of the soup is in :mod:`ktransfer.weight_averaging`.)
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from ._version import __version__
from .api import TransferResult, check_compatible, eval_ceiling, kept_as_given, resolve_run, transfer
from .data.base import ImageData, as_image_data
from .errors import ConfigError
from .methods.base import Method
from .metrics import accuracy, ceiling_fields, transfer_metrics
from .models.base import Model, as_model
from .predictions import PredictionCache, compute_logits
from .settings import RECORDED, TransferSettings, recorded_setting
from .targets import resolve_targets
from .weight_averaging import average_state_dicts, average_weights, recalibrate_batch_norm  # noqa: F401  (average_state_dicts: part of this module's face)

STRATEGIES = ("parallel", "sequential", "soup")
ORDERS = ("ascending", "descending", "given")
# Settings that must agree before a finished single-teacher result can serve as a soup ingredient.
REUSE_SETTINGS = ("student", "teacher", "method", "hparams", *RECORDED, "transfer_data", "eval_data")
# Settings that records written before they existed lack, with the value those runs had.
# Per-epoch numbers a sequential stage reports against its own start; the combined history prefixes them with ``stage_``.
STAGE_KEYS = ("acc_before", "delta", "knowledge_gain", "knowledge_loss")


# ---------------------------------------------------------------- weight averaging and batch norm


class _TrainedStudentsInMemory(PredictionCache):
    """The caller's cache for the models the user gave; students trained here stay in memory only.

    Intermediate students of a sequential run or soup are used once: writing their logits to the
    on-disk cache would only fill it.
    """

    def __init__(self, base: PredictionCache, on_disk: set[str]):
        super().__init__(base.root, enabled=False)
        self.base, self.on_disk = base, on_disk

    def logits(self, model: Model, data: ImageData, batch_size: int = 1024, device="cpu") -> torch.Tensor:
        if model.fingerprint() in self.on_disk:
            return self.base.logits(model, data, batch_size=batch_size, device=device)
        return super().logits(model, data, batch_size=batch_size, device=device)


@dataclass
class _Run:
    """What every strategy needs: the models, the data, the settings, and the pre-transfer predictions."""

    student: Model
    teachers: list[Model]
    transfer_set: ImageData
    eval_set: ImageData
    method: Method
    settings: dict  # keyword arguments of ``transfer`` shared by every call
    cache: PredictionCache
    first_predictions: torch.Tensor
    teacher_predictions: list[torch.Tensor]
    on_epoch: Callable[[dict], None] | None

    @property
    def names(self) -> list[str]:
        return [_name(t) for t in self.teachers]

    @property
    def teacher_accuracies(self) -> list[float]:
        return [accuracy(self.eval_set.labels, p) for p in self.teacher_predictions]

    def fresh_method(self) -> Method:
        # Each stage or ingredient gets its own method object: some keep state (MCL's slow weights).
        return copy.deepcopy(self.method)

    def call_transfer(self, student, teacher, method: Method, *, context: dict, epochs: int | None = None, **extra) -> TransferResult:
        settings = dict(self.settings)
        if epochs is not None:
            settings["epochs"] = epochs

        def on_epoch(record: dict) -> None:
            record.update(context)
            if self.on_epoch is not None:
                self.on_epoch(record)

        # Views are cached on disk per frozen model: there the models are the user's (sequential runs with views are refused).
        cache = self.cache.base if settings.get("targets") == "views" else self.cache
        return transfer(student, teacher, self.transfer_set, self.eval_set, method=method, cache=cache, on_epoch=on_epoch, **settings, **extra)


def _name(model: Model) -> str:
    return model.spec or model.name


def _prepare(student, teachers, transfer_data, eval_data, method: Method, settings, cache, class_names, on_epoch) -> _Run:
    if not isinstance(teachers, (list, tuple)):
        raise ConfigError("teachers must be a list of models (nn.Module or ktransfer.Model); for one teacher use ktransfer.transfer")
    if not teachers:
        raise ConfigError("give at least one teacher")
    student_model = as_model(student, "student")
    teacher_models = [as_model(t, f"teacher{i + 1}") for i, t in enumerate(teachers)]
    names = [_name(t) for t in teacher_models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"teacher {duplicates[0]} is given more than once; name each teacher once")
    transfer_set = as_image_data(transfer_data, "transfer data", class_names)
    eval_set = as_image_data(eval_data, "eval data", class_names)
    check_compatible(student_model, teacher_models, transfer_set, eval_set)
    device = settings.get("device", "cpu")
    for model in (student_model, *teacher_models):  # transfer_multi puts them back where they were
        model.module.to(device)
    base_cache = cache if cache is not None else PredictionCache(enabled=False)
    given = {student_model.fingerprint(), *(t.fingerprint() for t in teacher_models)}
    run_cache = _TrainedStudentsInMemory(base_cache, given)
    first_predictions = run_cache.predictions(student_model, eval_set, device=device)
    teacher_predictions = [run_cache.predictions(t, eval_set, device=device) for t in teacher_models]
    return _Run(student_model, teacher_models, transfer_set, eval_set, method, settings, run_cache, first_predictions, teacher_predictions, on_epoch)


def _outcome(run: _Run, after: torch.Tensor) -> dict:
    """Metrics of the final student against the very first one, and flips against the teachers jointly.

    ``pos_flips_*``: share the student gets wrong and at least one teacher right (the teachers'
    complementary knowledge together); ``neg_flips_*``: share the student gets right and every
    teacher wrong. ``teacher_acc`` is the best teacher's accuracy.
    """
    labels = run.eval_set.labels
    any_right = torch.stack([p == labels for p in run.teacher_predictions]).any(dim=0)
    # A stand-in prediction vector that is right exactly where some teacher is right.
    joint = torch.where(any_right, labels, run.teacher_predictions[0])
    metrics = transfer_metrics(labels, run.first_predictions, after, joint)
    accuracies = run.teacher_accuracies
    metrics.update(teacher_acc=max(accuracies), teachers_acc=accuracies, teachers_any_right=accuracy(labels, joint))
    # The ceiling: the ensemble of the first student and every teacher; oracle = any of them right.
    metrics.update(ceiling_fields(eval_ceiling(run.cache, run.student, run.teachers, run.eval_set, run.settings.get("device", "cpu")), metrics["delta"]))
    return metrics


def _record(run: _Run, strategy: str, base: dict, after: torch.Tensor, started: float, **fields) -> dict:
    """A ``results.jsonl`` record: the settings of ``base`` (a single-run record), the strategy's outcome, then ``fields``."""
    record = {
        "student": _name(run.student),
        "teacher": "+".join(run.names),
        "teachers": run.names,
        "strategy": strategy,
        "method": run.method.name,
    }
    record.update(_outcome(run, after))
    record["teacher_share"] = None
    for key in ("epochs", "lr", "batch_size", "momentum", "weight_decay", "seed", "schedule", "targets", "augment", "amp", "amp_frozen", "compile", "hparams", "n_transfer", "transfer_data", "eval_data"):
        record[key] = recorded_setting(base, key)
    record.update(seconds=time.perf_counter() - started, version=__version__, history=[])
    record.update(fields)
    return record


def _predict(model: Model, data: ImageData, device) -> torch.Tensor:
    return compute_logits(model, data, device=device).argmax(dim=1)


def _without_history(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "history"}


# ---------------------------------------------------------------- the strategies


def check_parallel_method(method: Method, teachers: int) -> None:
    """Parallel transfer needs a method that routes each sample among the original student and K teachers."""
    if not method.supports_multiple_teachers:
        raise ConfigError(
            f"the parallel strategy routes each sample to the most confident of the original student and the teachers, "
            f"which needs a data-partitioning method (kl_dp); {method.name} takes one teacher: use strategy sequential or soup"
        )
    routing = getattr(method.params, "routing", "confidence")
    if routing != "confidence" and teachers > 1:
        raise ConfigError(f"the parallel strategy needs kl_dp's routing 'confidence'; the ablation {routing!r} is defined for one teacher only")


def _parallel(run: _Run) -> TransferResult:
    started = time.perf_counter()
    result = run.call_transfer(run.student, list(run.teachers), run.fresh_method(), context={"strategy": "parallel"})
    after = _predict(result.model, run.eval_set, run.settings.get("device", "cpu"))
    models = ["original", *run.names]
    final = result.history[-1]
    if len(run.teachers) > 1:
        shares = [final[f"share_{k}"] for k in range(len(models))]
    else:  # with one teacher the method logs only the teacher's share
        shares = [1.0 - final["teacher_share"], final["teacher_share"]]
    for epoch in result.history:
        epoch["routed_shares"] = dict(zip(models, [epoch.get(f"share_{k}") for k in range(len(models))])) if len(run.teachers) > 1 else None
    record = _record(
        run, "parallel", result.metrics, after, started,
        teacher_share=final.get("teacher_share"),
        routed_shares=dict(zip(models, shares)),
        history=result.history,
    )
    result.metrics = record
    return result


def _stage_order(run: _Run, order: str) -> list[int]:
    if order not in ORDERS:
        raise ConfigError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
    indices = list(range(len(run.teachers)))
    accuracies = run.teacher_accuracies
    if order == "ascending":
        return sorted(indices, key=lambda k: accuracies[k])  # stable: equal accuracies keep the given order
    if order == "descending":
        return sorted(indices, key=lambda k: -accuracies[k])
    return indices


def _stage_epochs(epochs, count: int) -> list[int]:
    budgets = [epochs] * count if isinstance(epochs, int) else list(epochs)
    if len(budgets) != count:
        raise ConfigError(f"give one epoch budget per teacher ({count}), or a single number; got {len(budgets)}")
    # Checked here, so that a bad budget for a late stage does not throw away the earlier stages.
    if any(not isinstance(e, int) or isinstance(e, bool) or e < 1 for e in budgets):
        raise ConfigError(f"every epoch budget must be a whole number of at least 1; got {budgets}")
    return budgets


def _sequential(run: _Run, order: str, epochs) -> TransferResult:
    started = time.perf_counter()
    budgets = _stage_epochs(epochs, len(run.teachers))  # aligned with the teachers as given
    sequence = _stage_order(run, order)
    current, stages, history, offset, result = run.student, [], [], 0, None
    for number, k in enumerate(sequence, 1):
        teacher = run.teachers[k]
        context = {"strategy": "sequential", "stage": number, "stage_teacher": _name(teacher)}
        # A new transfer call is a new stage: a fresh optimiser, and `current` is both the student
        # that trains on and, for DP, the frozen "original" it retains.
        result = run.call_transfer(current, teacher, run.fresh_method(), context=context, epochs=budgets[k], eval_references={"first": run.first_predictions})
        for epoch in result.history:
            combined = {"epoch": offset + epoch["epoch"], "stage": number, "stage_epoch": epoch["epoch"], "stage_teacher": _name(teacher)}
            combined.update({k2: v for k2, v in epoch.items() if k2 not in ("epoch", *STAGE_KEYS) and not k2.endswith("_vs_first")})
            combined.update({f"stage_{key}": epoch[key] for key in STAGE_KEYS})
            combined.update({key: epoch[f"{key}_vs_first"] for key in STAGE_KEYS})
            history.append(combined)
        offset += len(result.history)
        final = result.history[-1]
        stage_record = _without_history(result.metrics)
        stage_record.update(stage=number, **{f"{key}_vs_first": final[f"{key}_vs_first"] for key in STAGE_KEYS})
        stages.append(stage_record)
        current = result.model
    after = _predict(current, run.eval_set, run.settings.get("device", "cpu"))
    record = _record(
        run, "sequential", result.metrics, after, started,
        epochs=budgets[0] if len(set(budgets)) == 1 else [budgets[k] for k in sequence],
        total_epochs=offset,
        order=order,
        stage_teachers=[run.names[k] for k in sequence],
        stages=stages,
        history=history,
    )
    return TransferResult(current.module, record, history, current)


def _match_reuse(run: _Run, reuse: Iterable[TransferResult] | None, settings_record: dict) -> dict[str, TransferResult]:
    """Finished single-teacher results by teacher name, after checking they were made with this run's settings."""
    matched: dict[str, TransferResult] = {}
    for result in reuse or []:
        record = result.metrics
        teacher = record.get("teacher")
        if teacher not in run.names:
            raise ConfigError(f"a result to reuse comes from teacher {teacher!r}, which is not among the teachers ({', '.join(run.names)})")
        for key in REUSE_SETTINGS:
            if key == "teacher":
                continue
            value = recorded_setting(record, key)
            if value != settings_record.get(key):
                raise ConfigError(f"the result to reuse for teacher {teacher} has {key}={value!r} but this soup uses {settings_record.get(key)!r}; reuse only results made with the same settings")
        if record.get("strategy") is not None:
            raise ConfigError(f"the result to reuse for teacher {teacher} is itself a {record['strategy']} result; soup ingredients are single-teacher transfers")
        matched[teacher] = result
    return matched


def _soup_settings(run: _Run) -> dict:
    """The record fields a single-teacher ingredient made by this run would have, for comparing reused results."""
    settings = run.settings
    return {
        "student": _name(run.student),
        "method": run.method.name,
        "hparams": run.method.describe(),
        **{key: settings[key] for key in RECORDED},
        "lr": settings["lr"] if settings["lr"] is not None else run.method.default_lr,
        "transfer_data": run.transfer_set.name,
        "eval_data": run.eval_set.name,
    }


def _ingredient(student, transfer_set, eval_set, teacher, method: Method, settings: dict, cache_root, cache_enabled: bool, context: dict):
    """One soup ingredient in a Ray worker: the same ``transfer`` call as in one process; its epoch records come back with it."""
    records: list[dict] = []

    def on_epoch(record: dict) -> None:
        records.append({**record, **context})

    cache = PredictionCache(cache_root, enabled=cache_enabled)  # on disk: the teachers' logits are computed once per machine
    return transfer(student, teacher, transfer_set, eval_set, method=method, cache=cache, on_epoch=on_epoch, **settings), records


def _ingredients_on_ray(run: _Run, todo: list[tuple[int, Model]], contexts: dict[int, dict], address: str | None) -> dict[int, TransferResult]:
    from .extras import start_ray

    ray, owned = start_ray(address, "a soup on Ray (executor='ray')")
    try:
        gpus = 1 if str(run.settings.get("device", "cpu")).startswith("cuda") else 0
        task = ray.remote(_ingredient).options(num_cpus=1, num_gpus=gpus)
        shared = [ray.put(value) for value in (run.student, run.transfer_set, run.eval_set)]  # shipped once for all ingredients
        base = run.cache.base
        refs = {number: task.remote(*shared, teacher, run.fresh_method(), run.settings, base.root, base.enabled, contexts[number]) for number, teacher in todo}
        made = {}
        for number, ref in refs.items():
            made[number], records = ray.get(ref)
            for record in records:
                if run.on_epoch is not None:
                    run.on_epoch(record)
        return made
    finally:
        if owned:
            ray.shutdown()


def _soup(run: _Run, reuse, recalibrate_bn: bool, executor: str = "local", ray_address: str | None = None) -> TransferResult:
    started = time.perf_counter()
    expected = _soup_settings(run)
    reused = _match_reuse(run, reuse, expected)
    todo = [(number, teacher) for number, teacher in enumerate(run.teachers, 1) if _name(teacher) not in reused]
    contexts = {number: {"strategy": "soup", "ingredient": number, "ingredient_teacher": _name(teacher)} for number, teacher in todo}
    if executor == "ray":  # the ingredients are independent transfers: as many at once as the cluster holds
        made = _ingredients_on_ray(run, todo, contexts, ray_address)
    else:
        made = {number: run.call_transfer(run.student, teacher, run.fresh_method(), context=contexts[number]) for number, teacher in todo}
    ingredients = [reused[_name(teacher)] if _name(teacher) in reused else made[number] for number, teacher in enumerate(run.teachers, 1)]
    device = run.settings.get("device", "cpu")
    module = average_weights([result.student for result in ingredients]).to(device)
    student = run.student
    soup = student.rebuilt(module)
    recalibrated = recalibrate_batch_norm(soup, run.transfer_set, run.settings["batch_size"], device) if recalibrate_bn else 0
    soup.module.eval()
    after = _predict(soup, run.eval_set, device)
    ingredient_records = []
    for result in ingredients:
        ingredient = dict(result.metrics)
        ingredient["reused"] = any(result is r for r in reused.values())
        ingredient_records.append(ingredient)
    record = _record(
        run, "soup", ingredients[0].metrics, after, started,
        recalibrate_bn=recalibrate_bn,
        recalibrated_bn_layers=recalibrated,
        reused_ingredients=sum(1 for r in ingredient_records if r["reused"]),
        ingredients=ingredient_records,
    )
    return TransferResult(module, record, [], soup)


# ---------------------------------------------------------------- the entry point


def transfer_multi(
    student,
    teachers: Sequence,
    transfer_data,
    eval_data,
    method: str | Method = "kl_dp",
    settings: TransferSettings | None = None,
    *,
    strategy: str = "parallel",
    order: str = "ascending",
    recalibrate_bn: bool = False,
    reuse: Iterable[TransferResult] | None = None,
    method_params: dict | None = None,
    val_data=None,
    cache: PredictionCache | None = None,
    class_names: Sequence[str] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    **options,
) -> TransferResult:
    """Transfer from several ``teachers`` into a copy of ``student`` with one of the strategies.

    ``strategy``: ``parallel`` (one run; per sample the most confident of the original student
    and all teachers is the target; needs ``kl_dp``), ``sequential`` (one stage per teacher,
    ordered by teacher accuracy on ``eval_data`` per ``order``: ascending, descending or given;
    ``epochs`` may list one budget per teacher, in the order given) or ``soup`` (one transfer per
    teacher, weights averaged; ``recalibrate_bn`` recomputes batch-norm statistics on the
    transfer data; ``reuse`` takes finished single-teacher results with the same settings).
    ``settings`` and keyword arguments named as its fields are those of :func:`ktransfer.transfer`
    (every stage or ingredient runs with them), and so are ``method_params``, ``val_data``, ``cache``
    and ``class_names``; checkpoints apply to the parallel strategy only (the others run one
    transfer per teacher, and one checkpoint folder cannot hold them). ``on_epoch``
    records also carry the stage or ingredient they belong to. ``executor="ray"`` runs the soup's
    ingredients as Ray tasks at once (on the cluster at ``ray_address``, else a local instance);
    their records reach ``on_epoch`` as each ingredient ends.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if order != "ascending" and strategy != "sequential":
        raise ConfigError(f"order applies to the sequential strategy only (strategy is {strategy})")
    if recalibrate_bn and strategy != "soup":
        raise ConfigError(f"recalibrate_bn applies to the soup strategy only (strategy is {strategy})")
    if executor not in ("local", "ray"):
        raise ConfigError(f"executor must be local or ray; got {executor!r}")
    if executor != "local" and strategy != "soup":
        raise ConfigError(f"executor={executor!r} applies to the soup strategy only, whose ingredients are independent (strategy is {strategy})")
    if reuse and strategy != "soup":
        raise ConfigError(f"reuse applies to the soup strategy only (strategy is {strategy})")
    epochs = options.get("epochs")
    budgets = list(epochs) if isinstance(epochs, (list, tuple)) else None
    if budgets is not None:
        if strategy != "sequential":
            raise ConfigError("one epoch budget per teacher applies to the sequential strategy only; give a single number")
        if not budgets:
            raise ConfigError("give one epoch budget per teacher, or a single number")
        options["epochs"] = budgets[0]  # each budget is checked as a setting; each stage runs its own
        for budget in budgets[1:]:
            TransferSettings(epochs=budget)
    method, settings = resolve_run(method, settings, method_params, options)
    if settings.checkpoint_dir is not None and strategy != "parallel":
        raise ConfigError(f"checkpoints apply to one run, and the {strategy} strategy runs one transfer per teacher into one folder: use strategy parallel, or leave out checkpoint_dir")
    targets = resolve_targets(settings.targets, settings.augment)  # a bad combination fails before any stage runs
    if targets == "views" and strategy == "sequential":
        raise ConfigError("targets views caches the frozen models' outputs per view on disk, and each sequential stage after the first retains toward the student of the stage before, which is not kept there: use targets online with the sequential strategy")
    if strategy == "parallel":
        check_parallel_method(method, len(teachers) if isinstance(teachers, (list, tuple)) else 1)
    shared = {**settings.to_dict(), **({"val_data": val_data} if val_data is not None else {})}
    if budgets is not None:
        shared["epochs"] = None
        epochs = budgets
    else:
        epochs = settings.epochs
    # The user's models go back to their devices and modes at the end, also on an error.
    with kept_as_given(student, *(teachers if isinstance(teachers, (list, tuple)) else [])):
        run = _prepare(student, teachers, transfer_data, eval_data, method, shared, cache, class_names, on_epoch)
        if strategy == "parallel":
            return _parallel(run)
        if strategy == "sequential":
            return _sequential(run, order, epochs)
        return _soup(run, reuse, recalibrate_bn, executor, ray_address)
