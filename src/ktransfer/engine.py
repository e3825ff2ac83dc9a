"""The one training loop every method and strategy runs on.

The student trains in train mode; teachers and the original student stay frozen in eval mode
(they live in a :class:`~ktransfer.targets.TargetSource`). After every epoch the student is
evaluated and the numbers appended to the history. All loop state sits in :class:`TrainState`
so a run can be saved and resumed.
"""

from __future__ import annotations

import copy
import itertools
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Callable

import torch

from .augment import Augmentation, check_augment
from .checkpoints import CheckpointStore
from .data.base import ImageData
from .errors import ConfigError, TrainingError
from .methods.base import Method, StepInputs
from .metrics import accuracy, transfer_metrics
from .models.base import Model
from .predictions import compute_logits
from .settings import SCHEDULES, SWITCHES, check_training
from .targets import CachedTargets, OnlineTargets, TargetSource

if TYPE_CHECKING:
    from .distributed import Ranks


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
        for name in ("channels_last", "prefetch"):
            if getattr(self, name) not in SWITCHES:
                raise ConfigError(f"{name} must be one of {', '.join(SWITCHES)}; got {getattr(self, name)!r}")

    def lr_at(self, step: int, total_steps: int) -> float:
        """The learning rate of optimiser step ``step`` (0-based) out of ``total_steps``: a pure function, so resuming needs no scheduler state."""
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
        return self.lr




def is_conv_net(module: torch.nn.Module) -> bool:
    """More than one 2-d convolution: a ViT's single patch-embedding convolution gains nothing from channels-last."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in module.modules()) > 1


def uses_channels_last(setting: str, device: str, module: torch.nn.Module) -> bool:
    if setting == "auto":
        return torch.device(device).type == "cuda" and is_conv_net(module)
    return setting == "on"


class Prefetcher:
    """Batches ``(cpu_index, index, images, labels)`` with the last three on ``device``, one batch ahead.

    On CUDA the next batch is pinned and copied on a side stream while the current step's kernels
    run; the compute stream waits for that copy before it uses the batch, so there is no
    host-device sync. Elsewhere the batches pass through unchanged (the order is the same).
    """

    def __init__(self, batches, device: str):
        self.batches, self.device = iter(batches), torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _load(self):
        batch = next(self.batches, None)
        if batch is None:
            return None
        index, images, labels = batch
        if self.stream is None:
            return index, *(t.to(self.device) for t in (index, images, labels))
        with torch.cuda.stream(self.stream):
            return index, *((t.pin_memory() if t.device.type == "cpu" else t).to(self.device, non_blocking=True) for t in (index, images, labels))

    def __iter__(self):
        upcoming = self._load()
        while upcoming is not None:
            current = upcoming
            if self.stream is not None:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_stream(self.stream)
                for tensor in current[1:]:  # their memory stays reserved until the compute stream is done with it
                    tensor.record_stream(compute)
            upcoming = self._load()  # enqueued before the current step's kernels: the copy overlaps them
            yield current


def plain_batches(batches, device: str):
    """The same tuples as :class:`Prefetcher`, each batch copied when the step asks for it."""
    for index, images, labels in batches:
        yield index, *(t.to(device, non_blocking=True) for t in (index, images, labels))


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


class Evaluator:
    """Scores a student on the evaluation set against its pre-transfer predictions and the teachers'."""

    def __init__(self, data: ImageData, before: torch.Tensor | None = None, teacher: torch.Tensor | None = None, batch_size: int = 1024, device="cpu", references: dict[str, torch.Tensor] | None = None, ranks: Ranks | None = None):
        self.data, self.before, self.teacher = data, before, teacher
        self.batch_size, self.device = batch_size, device
        # Under torchrun each rank predicts its share and the predictions are gathered by sample index.
        self.ranks = ranks
        # Extra students to compare against, by name (sequential transfer: the very first student).
        self.references = dict(references or {})
        self.last_predictions: torch.Tensor | None = None

    def predict(self, student: Model) -> torch.Tensor:
        """The student's top-1 predictions on the whole evaluation set (each sample once, also under torchrun)."""
        if self.ranks is None:
            return compute_logits(student, self.data, self.batch_size, self.device).argmax(1)
        index = self.ranks.eval_indices(len(self.data))
        mine = compute_logits(student, self.data.subset(index, self.data.name), self.batch_size, self.device).argmax(1)
        return self.ranks.gather_by_index(mine, len(self.data))

    def __call__(self, student: Model) -> dict:
        predictions = self.predict(student)
        self.last_predictions = predictions
        if self.before is None:
            return {"acc": accuracy(self.data.labels, predictions), "n_eval": len(self.data)}
        metrics = transfer_metrics(self.data.labels, self.before, predictions, self.teacher)
        metrics["acc"] = metrics["acc_after"]
        for name, reference in self.references.items():
            versus = transfer_metrics(self.data.labels, reference, predictions)
            metrics.update({f"{key}_vs_{name}": versus[key] for key in ("acc_before", "delta", "knowledge_gain", "knowledge_loss")})
        return metrics


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
    # After a non-finite loss: {"retries": 1, "lr_halved_at_step": N, "final_lr": lr}, see Engine.run.
    rollback: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "step": self.step,
            "history": list(self.history),
            "position": self.position,
            "epoch_start_generator": self.epoch_start_generator,
            "epoch_sums": _to_cpu(self.epoch_sums),
            "guard": _to_cpu(self.guard),
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


def _to_cpu(value):
    """A copy of nested dicts of tensors and numbers with every tensor on the CPU."""
    if torch.is_tensor(value):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    return value


def _to_device(value, device):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run with checkpoints: the step in progress finished and a checkpoint was written."""

    def __init__(self, path, where: str):
        super().__init__(f"interrupted at {where}; checkpoint {path}")
        self.path, self.where = path, where


class Engine:
    def __init__(
        self,
        student: Model,
        method: Method,
        data: ImageData,
        config: TrainConfig,
        targets: TargetSource | None = None,
        evaluator: Evaluator | None = None,
        on_step: Callable[[int, int], None] | None = None,
        on_epoch: Callable[[dict], None] | None = None,
        checkpoints: CheckpointStore | None = None,
        guard: Evaluator | None = None,
        ranks: Ranks | None = None,
    ):
        config.validate()
        if ranks is not None and config.batch_size % ranks.world_size:
            raise ConfigError(f"batch size {config.batch_size} must be a multiple of the {ranks.world_size} processes, each of which takes an equal share of every batch")
        if (method.needs_teacher or method.needs_original) and targets is None:
            raise ConfigError(f"method {method.name} needs a teacher; none was given")
        # A copy: a rollback after a NaN loss halves this run's learning rate, not the caller's config.
        self.student, self.method, self.data, self.config = student, method, data, replace(config)
        self.targets, self.evaluator = targets, evaluator
        # With augmentation, the student trains on views framed at its own input size; the
        # frozen models (in the target source) get the same views.
        self.augmentation = Augmentation(config.seed) if config.augment != "none" else None
        self.trained_model = student.for_views() if self.augmentation is not None else student
        if self.augmentation is not None:
            self._check_augmentable()
        self.fixed = None
        if isinstance(targets, CachedTargets):
            labels = data.labels.to(config.device)
            self.fixed = method.fixed_targets(targets.teacher_logits, targets.original_logits, labels)
        self.on_step, self.on_epoch = on_step, on_epoch
        self.checkpoints = checkpoints
        # Scores the student on held-out data after every epoch; the best state is kept (see keep_best).
        self.guard = guard
        self._interrupted = False
        torch.manual_seed(config.seed)
        if method.needs_features and targets is not None:
            method.on_feature_dims(*self._probe_feature_dims())
        extra = method.setup(student.module)
        self._to_channels_last(student)  # before DDP wraps the student: its gradient buckets follow the parameters' layout
        # Under torchrun only the student trains wrapped in DDP; the frozen models stay as they are.
        self.ranks = ranks
        if ranks is not None:
            from .distributed import check_distributable

            check_distributable(method, extra)
            self.trained_model = replace(self.trained_model, module=ranks.wrap(student.module, config.device))
        self._compile()
        optimizer = torch.optim.SGD(
            [*student.module.parameters(), *extra], lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        self.state = TrainState(optimizer, torch.Generator().manual_seed(config.seed))

    def _to_channels_last(self, student: Model) -> None:
        """Channels-last memory for the student and the frozen conv nets, as configured (changes results only by rounding)."""
        config = self.config
        self.channels_last = uses_channels_last(config.channels_last, config.device, student.module)
        if self.channels_last:
            student.module.to(memory_format=torch.channels_last)
        if isinstance(self.targets, OnlineTargets):
            self.targets.prepare(lambda module: module.to(memory_format=torch.channels_last) if uses_channels_last(config.channels_last, config.device, module) else module)

    def _compile(self) -> None:
        """torch.compile of the student (as it trains: DDP-wrapped under torchrun) and of the frozen models, if asked."""
        config = self.config
        if config.compile:
            # Under torchrun the DDP-wrapped student is compiled (DDP's bucketing then splits the graph).
            self.trained_model = replace(self.trained_model, module=torch.compile(self.trained_model.module, backend=config.compile_backend))
            if isinstance(self.targets, OnlineTargets):
                self.targets.prepare(lambda module: torch.compile(module, backend=config.compile_backend))

    def _batches(self, order: torch.Tensor, batch_size: int, last: torch.Tensor | None = None):
        """``(cpu_index, index, images, labels)`` for the epoch, the last three on the device; ``last``: one more batch, of its own size."""
        batches = self.data.batches(order, batch_size) if len(order) else iter(())
        if last is not None:
            batches = itertools.chain(batches, self.data.batches(last, len(last)))
        prefetch = self.config.prefetch == "on" or (self.config.prefetch == "auto" and torch.device(self.config.device).type == "cuda")
        return Prefetcher(batches, self.config.device) if prefetch else plain_batches(batches, self.config.device)

    def _check_augmentable(self) -> None:
        """Augmentation needs online targets that take views, and 1- or 3-channel images: checked before any training."""
        if isinstance(self.targets, CachedTargets):
            raise ConfigError(f"augment={self.config.augment!r}: cached targets are of the un-augmented images; give the engine OnlineTargets(..., views=True)")
        if self.targets is not None and not self.targets.takes_views:
            raise ConfigError(f"augment={self.config.augment!r}: the target source must take augmented views; build it as OnlineTargets(..., views=True)")
        if len(self.data) == 0:
            return
        _, images, _ = next(iter(self.data.batches(torch.arange(1), 1)))
        frame = self.student.preprocess.frame(images)
        self.augmentation.sample(torch.zeros(1, dtype=torch.long), 0, frame.shape)  # checks the channels
        if frame.shape[1] == 3 and (frame.min() < 0 or frame.max() > 1):
            raise ConfigError(
                f"augment={self.config.augment!r} distorts colours of images in [0, 1] (uint8, or float scaled to [0, 1]); "
                f"these reach {float(frame.min()):.3g}..{float(frame.max()):.3g}: pass them unnormalised and give the model its normalisation in ktransfer.Preprocess"
            )

    def _views(self, images: torch.Tensor, index: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        """The batch as every model of the step sees it: raw images, or the student's frame augmented."""
        if self.augmentation is None:
            return images
        return self.augmentation(self.student.preprocess.frame(images), index, epoch)

    @torch.no_grad()
    def _probe_feature_dims(self) -> tuple[int, int]:
        """Feature widths of the student and the first teacher, from one eval-mode forward of two samples (changes no state)."""
        module = self.student.module
        was_training = module.training
        module.eval()
        try:
            index, images, _ = next(iter(self.data.batches(torch.arange(min(2, len(self.data))), 2)))
            images = self._views(images.to(self.config.device), index)
            student_features, _ = self.trained_model.features_and_logits(images)
            teacher_features = self.targets.get(index, images).teacher_features
        finally:
            module.train(was_training)
        if teacher_features is None:
            raise ConfigError(f"method {self.method.name} compares features: give the engine OnlineTargets(..., with_features=True), as ktransfer.transfer does")
        return student_features.flatten(1).shape[1], teacher_features.flatten(1).shape[1]

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data) / self.config.batch_size)

    def train_epoch(self) -> dict:
        module, method, config, state = self.student.module, self.method, self.config, self.state
        module.train()
        # The order stays drawn from one generator seeded once per run, as before checkpoints existed
        # (so earlier results reproduce); resuming replays the epoch's draw from the state saved here.
        if state.position == 0:
            state.epoch_start_generator = state.generator.get_state()
            order = torch.randperm(len(self.data), generator=state.generator)
        else:  # resumed mid-epoch: the same permutation again, from its state before the draw
            replay = torch.Generator()
            replay.set_state(state.epoch_start_generator)
            order = torch.randperm(len(self.data), generator=replay)[state.position * config.batch_size :]
        # Sums stay on the device: reading a number back each step would stall a GPU.
        # The loss is checked for NaN every step on the CPU (free) and every 32 steps elsewhere.
        device_type = torch.device(config.device).type
        check_every = 1 if device_type == "cpu" else 32
        if state.position == 0:
            loss_sum, stat_sums, batches = torch.zeros((), device=config.device), {}, 0
        else:
            sums = _to_device(state.epoch_sums, config.device)
            loss_sum, stat_sums, batches = sums["loss"], dict(sums["stats"]), sums["batches"]
        # Under torchrun: this rank's share of each global batch, and the loss weight that makes
        # DDP's gradient average the global batch's (see ktransfer.distributed).
        weights, local_batch_size, last = None, config.batch_size, None
        if self.ranks is not None:
            shard = self.ranks.shard(order, config.batch_size)
            order, last, weights = shard.full, shard.last, shard.weights
            local_batch_size = config.batch_size // self.ranks.world_size
        # Augmentation parameters are drawn from the CPU indices (see ktransfer.augment). One copy of
        # the batch's sample indices on the device serves the cached targets, the precomputed targets
        # and the method (CRD's memory), instead of one copy each.
        for step_in_epoch, (sample_index, index, images, labels) in enumerate(self._batches(order, local_batch_size, last)):
            weight = weights[step_in_epoch] if weights is not None else None
            images = self._views(images, sample_index, state.epoch)
            if self.channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.amp and config.amp_frozen):
                batch = self.targets.get(sample_index if self.targets.host_indices else index, images, epoch=state.epoch) if self.targets is not None else None
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.amp):
                if method.needs_features:
                    features, logits = self.trained_model.features_and_logits(images)
                else:
                    features, logits = None, self.trained_model.logits(images)
                inputs = StepInputs(
                    student_logits=logits.float(),
                    labels=labels,
                    teacher_logits=batch.teacher_logits if batch else None,
                    original_logits=batch.original_logits if batch else None,
                    student_features=features,
                    teacher_features=batch.teacher_features if batch else None,
                    indices=index,
                    fixed={key: value[index] for key, value in self.fixed.items()} if self.fixed is not None else None,
                    routing_confidence=batch.routing_confidence if batch else None,
                    subset_divisor=self.ranks.subset_divisor(weight) if self.ranks is not None else None,
                )
                out = method.loss(inputs)
            if weight is not None:
                out.loss = out.loss * weight
                out.stats = {key: value * weight for key, value in out.stats.items()}
            loss_value = out.loss.detach()
            if (state.step + 1) % check_every == 0:
                self._check_finite(loss_value, state.step + 1)
            state.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if config.schedule != "constant":
                for group in state.optimizer.param_groups:
                    group["lr"] = config.lr_at(state.step, self.steps_per_epoch * config.epochs)
            state.optimizer.step()
            state.step += 1
            method.after_step(module, state.step)
            loss_sum += loss_value
            for key, value in out.stats.items():
                stat_sums[key] = stat_sums.get(key, 0.0) + (value.detach() if torch.is_tensor(value) else value)
            batches += 1
            state.position += 1
            if self.checkpoints is not None and state.position < self.steps_per_epoch and self._checkpoint_due():
                self._check_finite(loss_sum, state.step)  # never checkpoint a run that has diverged
                state.epoch_sums = self._summed({"loss": loss_sum, "stats": stat_sums, "batches": batches})
                self.save_checkpoint()
            if self.on_step is not None:
                self.on_step(state.step, self.steps_per_epoch * config.epochs)
            if self._interrupted:  # Ctrl-C: at this batch boundary the state is whole, so it is saved
                state.epoch_sums = {"loss": loss_sum, "stats": stat_sums, "batches": batches}
                self._check_finite(loss_sum, state.step)
                path = self.save_checkpoint()
                raise Interrupted(path, self.checkpoint_where())
        self._check_finite(loss_sum, state.step)
        state.position, state.epoch_sums = 0, {}
        if self.ranks is not None:  # each rank's sums are weighted by its share: their sum over ranks / W is the global mean
            summed = self._summed({"loss": loss_sum, "stats": stat_sums})
            loss_sum = summed["loss"] / self.ranks.world_size
            stat_sums = {key: value / self.ranks.world_size for key, value in summed["stats"].items()}
        batches = max(batches, 1)
        return {"train_loss": float(loss_sum) / batches, **{k: float(v) / batches for k, v in stat_sums.items()}}

    def _checkpoint_due(self) -> bool:
        """Whether a mid-epoch checkpoint is due; under torchrun rank 0's clock decides for every rank."""
        if self.ranks is None:
            return self.checkpoints.due(self.state.step)
        return self.ranks.agree(self.ranks.is_main and self.checkpoints.due(self.state.step))

    def _summed(self, sums: dict) -> dict:
        """An epoch's running sums over all ranks (as they are in one process); the sums themselves are left alone."""
        if self.ranks is None:
            return dict(sums)
        stats = {key: self.ranks.sum(torch.as_tensor(value, dtype=torch.float32, device=self.config.device)) for key, value in sums["stats"].items()}
        return {**sums, "loss": self.ranks.sum(sums["loss"]), "stats": stats}

    def _check_finite(self, loss: torch.Tensor, step: int) -> None:
        # Under torchrun every rank must see the same verdict, or one would roll back alone.
        value = float(loss) if self.ranks is None else float(self.ranks.sum(loss))
        if not math.isfinite(value):
            retried = self.state.rollback
            again = f"; it had already been rolled back at step {retried['lr_halved_at_step']} and retried with half the learning rate" if retried else ""
            error = TrainingError(
                f"{self.method.name}: the loss became {value} at epoch {self.state.epoch + 1} (by step {step}); "
                f"lower the learning rate (now {self.config.lr}) or check the inputs for NaN{again}"
            )
            error.loss_not_finite = True  # what Engine.run rolls back from (any other TrainingError ends the run)
            raise error

    def _evaluated_model(self) -> Model:
        evaluated = self.method.eval_module(self.student.module)
        if self.ranks is not None:  # every rank evaluates (and rank 0 saves) rank 0's weights and batch-norm statistics
            self.ranks.sync_module(self.student.module)
            if evaluated is not self.student.module:
                self.ranks.sync_module(evaluated)
        return self.student if evaluated is self.student.module else self.student.rebuilt(evaluated)

    def evaluate(self) -> dict:
        if self.evaluator is None:
            return {}
        return self.evaluator(self._evaluated_model())

    def _guard_score(self, epoch: int) -> float:
        """Held-out accuracy of the student as evaluated now; the best (earliest on ties) is kept with its weights."""
        model = self._evaluated_model()
        accuracy_now = self.guard(model)["acc"]
        best = self.state.guard
        if not best or accuracy_now > best["acc"]:
            best.update(epoch=epoch, acc=accuracy_now, state=_to_cpu(model.module.state_dict()))
            best.setdefault("acc_before", accuracy_now)
        return accuracy_now

    def restore_best(self) -> int:
        """Load the guard's chosen weights into the evaluated module; returns the chosen epoch (0 = the original)."""
        best = self.state.guard
        if best["epoch"] != self.state.epoch:
            self.method.eval_module(self.student.module).load_state_dict(best["state"])
        return best["epoch"]

    def state_dict(self) -> dict:
        """All a run needs to go on where it stopped: the student, the loop, the method and the RNG."""
        rng = {"torch": torch.get_rng_state()}
        if torch.device(self.config.device).type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(torch.device(self.config.device))
        return {
            "student": _to_cpu(self.student.module.state_dict()),
            "loop": self.state.state_dict(),
            "method": _to_cpu(self.method.state_dict()),
            "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        device = self.config.device
        self.student.module.load_state_dict(state["student"])
        self.method.load_state_dict(_to_device(state["method"], device))
        self.state.load_state_dict(state["loop"])
        if self.ranks is not None and not self.ranks.is_main and self.state.epoch_sums:
            # A checkpoint holds the sums over all ranks; counted once, by rank 0.
            sums = self.state.epoch_sums
            self.state.epoch_sums = {**sums, "loss": torch.zeros_like(sums["loss"]), "stats": {key: torch.zeros_like(torch.as_tensor(v)) for key, v in sums["stats"].items()}}
        if self.state.rollback:  # a run that was rolled back goes on at its halved learning rate
            self.config.lr = self.state.rollback["final_lr"]
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.device(device).type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], torch.device(device))

    def checkpoint_where(self) -> str:
        state = self.state
        if state.position:
            return f"epoch {state.epoch + 1} of {self.config.epochs}, batch {state.position} of {self.steps_per_epoch}, step {state.step}"
        return f"end of epoch {state.epoch} of {self.config.epochs}, step {state.step}"

    def save_checkpoint(self):
        if self.ranks is not None and not self.ranks.is_main:  # only rank 0 writes
            return None
        return self.checkpoints.save(self.state_dict(), self.state.step, self.checkpoint_where())

    @contextmanager
    def _stopping_at_a_step_on_ctrl_c(self):
        """With checkpoints, in the main thread: Ctrl-C finishes the step in progress, writes a checkpoint and
        raises :class:`Interrupted`; a second Ctrl-C stops at once."""
        self._interrupted = False
        # Under torchrun the ranks would stop at different steps: Ctrl-C stops them, the last checkpoint resumes.
        if self.checkpoints is None or self.ranks is not None or threading.current_thread() is not threading.main_thread():
            yield
            return

        def interrupt(signum, frame):
            self._interrupted = True
            signal.signal(signal.SIGINT, previous)

        previous = signal.getsignal(signal.SIGINT)
        previous = previous if previous is not None else signal.default_int_handler  # None: set outside Python
        signal.signal(signal.SIGINT, interrupt)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _load_latest(self) -> dict | None:
        """The newest readable checkpoint; under torchrun every rank reads it, and rank 0 alone sets a damaged one aside."""
        if self.checkpoints is None:
            return None
        return self.checkpoints.load_latest(set_aside=self.ranks is None or self.ranks.is_main)

    def resume(self) -> bool:
        """Load the newest readable checkpoint, if there is one; True if one was loaded."""
        checkpoint = self._load_latest()
        if checkpoint is None:
            return False
        self.load_state_dict(checkpoint["state"])
        return True

    def run(self) -> list[dict]:
        with self._stopping_at_a_step_on_ctrl_c():
            return self._run()

    def _run(self) -> list[dict]:
        state = self.state
        if self.checkpoints is not None:
            self.resume()
        if self.guard is not None and not state.guard:
            self._guard_score(0)  # the original: a checkpoint written later carries its score and weights
        while state.epoch < self.config.epochs:
            started = time.perf_counter()
            # The last good state in memory, for a rollback when no checkpoint has been written yet.
            good = copy.deepcopy(self.state_dict())
            try:
                train = self.train_epoch()
            except TrainingError as error:
                if state.rollback or not getattr(error, "loss_not_finite", False):
                    raise
                self._roll_back(good)
                continue
            record = {"epoch": state.epoch + 1, **train}
            record.update(self.evaluate())
            if self.guard is not None:
                record["guard_acc"] = self._guard_score(state.epoch + 1)
            self.method.on_epoch_end(self.student.module)
            record["seconds"] = time.perf_counter() - started
            state.epoch += 1
            state.history.append(record)
            if self.checkpoints is not None:
                self.save_checkpoint()
            if self.on_epoch is not None:
                self.on_epoch(record)
        return state.history

    def _roll_back(self, good: dict) -> None:
        """After a NaN or infinite loss: back to the last good checkpoint (or the epoch's start), once, at half the learning rate."""
        failed_at = self.state.step
        checkpoint = self._load_latest()
        self.load_state_dict(checkpoint["state"] if checkpoint is not None else good)
        self.config.lr /= 2
        for group in self.state.optimizer.param_groups:
            group["lr"] = self.config.lr_at(self.state.step, self.steps_per_epoch * self.config.epochs)
        self.state.rollback = {"retries": 1, "lr_halved_at_step": failed_at, "resumed_from_step": self.state.step, "final_lr": self.config.lr}
        if self.checkpoints is not None:
            self.checkpoints.log(f"Warning: {self.method.name}: the loss became NaN or infinite by step {failed_at}; rolled back to step {self.state.step} and retrying with half the learning rate ({self.config.lr:g})")

    def config_dict(self) -> dict:
        return asdict(self.config)
