"""The loop every method and strategy trains on (:class:`Engine`).

The student trains in train mode; teachers and the original student stay frozen in eval mode (they
live in a :class:`~ktransfer.targets.TargetSource`). After every epoch the student is evaluated and
the numbers are appended to the history. Device, autocast, memory format, DDP and compilation are
the :class:`~ktransfer.engine.runtime.Runtime`'s; checkpoints, Ctrl-C, the guard, the rollback and
progress are callbacks (:mod:`ktransfer.engine.callbacks`). All the loop changes sits in
:class:`~ktransfer.engine.state.TrainState`, so a run can be saved and resumed.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from ..augment import Augmentation
from ..checkpoints import CheckpointStore
from ..data.base import ImageData
from ..errors import ConfigError, TrainingError
from ..methods.base import Method, StepInputs
from ..models.base import Model
from ..targets import CachedTargets, TargetSource
from .callbacks import Callback, Checkpointing, Guard, Progress, Rollback, StopOnCtrlC
from .config import TrainConfig
from .evaluation import Evaluator
from .runtime import Runtime
from .state import TrainState, to_cpu, to_device

if TYPE_CHECKING:
    from ..distributed import Ranks


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
        callbacks: Sequence[Callback] = (),
    ):
        config.validate()
        # A copy: a rollback after a NaN loss halves this run's learning rate, not the caller's config.
        self.student, self.method, self.data, self.config = student, method, data, replace(config)
        self.runtime = Runtime(self.config, ranks)
        self.runtime.ranks.check_batch_size(config.batch_size)
        if (method.needs_teacher or method.needs_original) and targets is None:
            raise ConfigError(f"method {method.name} needs a teacher; none was given")
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
        torch.manual_seed(config.seed)
        if method.needs_features and targets is not None:
            method.on_feature_dims(*self._probe_feature_dims())
        extra = method.setup(student.module)
        self.trained_model = self.runtime.prepare(student, self.trained_model, targets, method, extra)
        optimizer = torch.optim.SGD(
            [*student.module.parameters(), *extra], lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        self.state = TrainState(optimizer, torch.Generator().manual_seed(config.seed))
        self.checkpoints = checkpoints
        checkpointing = Checkpointing(checkpoints) if checkpoints is not None else None
        self.guard = Guard(guard) if guard is not None else None
        # In this order: a resume comes first, the guard's score is in the record the others see, the
        # checkpoint is written before progress is reported, and Ctrl-C stops after all of a step's hooks.
        self.callbacks: list[Callback] = [
            *([checkpointing] if checkpointing is not None else []),
            *([self.guard] if self.guard is not None else []),
            Rollback(checkpointing),
            *([Progress(on_step, on_epoch)] if on_step is not None or on_epoch is not None else []),
            *callbacks,
            *([StopOnCtrlC(checkpointing)] if checkpointing is not None else []),
        ]

    @property
    def channels_last(self) -> bool:
        return self.runtime.channels_last

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data) / self.config.batch_size)

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> list[dict]:
        """Train the epochs left (all of them, unless a checkpoint resumed the run); returns the history."""
        state = self.state
        try:
            for callback in self.callbacks:
                callback.on_run_start(self)
            while state.epoch < self.config.epochs:
                started = time.perf_counter()
                for callback in self.callbacks:
                    callback.on_epoch_start(self)
                try:
                    train = self.train_epoch()
                except TrainingError as error:
                    if getattr(error, "loss_not_finite", False) and any(callback.on_loss_not_finite(self, error) for callback in self.callbacks):
                        continue
                    raise
                record = {"epoch": state.epoch + 1, **train, **(self.evaluate() if self.config.evaluates_after(state.epoch + 1) else {})}
                for callback in self.callbacks:
                    callback.on_evaluated(self, record)
                self.method.on_epoch_end(self.student.module)
                record["seconds"] = time.perf_counter() - started
                state.epoch += 1
                state.history.append(record)
                for callback in self.callbacks:
                    callback.on_epoch_end(self, record)
            return state.history
        finally:
            for callback in self.callbacks:
                callback.on_run_end(self)

    def train_epoch(self) -> dict:
        """One pass over the transfer data (what is left of it, when resumed mid-epoch); returns the epoch's mean loss and statistics."""
        module, method, config, state, runtime = self.student.module, self.method, self.config, self.state, self.runtime
        ranks = runtime.ranks
        module.train()
        # Sums stay on the device: reading a number back each step would stall a GPU.
        state.epoch_sums = to_device(state.epoch_sums, config.device) if state.position else {"loss": torch.zeros((), device=config.device), "stats": {}, "batches": 0}
        sums = state.epoch_sums
        # Under torchrun: this rank's share of each global batch, and the loss weight that makes DDP's
        # gradient average the global batch's (see ktransfer.distributed); one process takes it all.
        shard = ranks.shard(self._epoch_order(), config.batch_size)
        # Augmentation parameters are drawn from the CPU indices (see ktransfer.augment). One copy of
        # the batch's sample indices on the device serves the cached targets, the precomputed targets
        # and the method (CRD's memory), instead of one copy each.
        batches = runtime.batches(self.data, shard.full, config.batch_size // ranks.world_size, shard.last)
        for step_in_epoch, (sample_index, index, images, labels) in enumerate(batches):
            weight = shard.weights[step_in_epoch] if shard.weights is not None else None
            images = runtime.memory_format(self._views(images, sample_index, state.epoch))
            with runtime.autocast(frozen=True):
                batch = self.targets.get(sample_index if self.targets.host_indices else index, images, epoch=state.epoch) if self.targets is not None else None
            with runtime.autocast():
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
                    subset_divisor=ranks.subset_divisor(weight),
                )
                out = method.loss(inputs)
            if weight is not None:
                out.loss = out.loss * weight
                out.stats = {key: value * weight for key, value in out.stats.items()}
            loss_value = out.loss.detach()
            if (state.step + 1) % runtime.check_every == 0:
                self.check_finite(loss_value, state.step + 1)
            state.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if config.schedule != "constant":
                for group in state.optimizer.param_groups:
                    group["lr"] = config.lr_at(state.step, self.steps_per_epoch * config.epochs)
            state.optimizer.step()
            state.step += 1
            method.after_step(module, state.step)
            sums["loss"] = sums["loss"] + loss_value
            for key, value in out.stats.items():
                sums["stats"][key] = sums["stats"].get(key, 0.0) + (value.detach() if torch.is_tensor(value) else value)
            sums["batches"] += 1
            state.position += 1
            for callback in self.callbacks:
                callback.on_step_end(self, out)
        self.check_finite(sums["loss"], state.step)
        state.position, state.epoch_sums = 0, {}
        # Each rank's sums are weighted by its share: their sum over the ranks / W is the global mean.
        summed = ranks.summed(sums)
        loss = summed["loss"] / ranks.world_size
        stats = {key: value / ranks.world_size for key, value in summed["stats"].items()}
        count = max(sums["batches"], 1)
        return {"train_loss": float(loss) / count, **{key: float(value) / count for key, value in stats.items()}}

    def _epoch_order(self) -> torch.Tensor:
        """The epoch's order of samples, still to train on.

        It is drawn from one generator seeded once per run, as before checkpoints existed (so earlier
        results reproduce); resumed mid-epoch, the same permutation is drawn again from the state saved
        before the draw, and the batches already trained on are skipped.
        """
        state = self.state
        if state.position == 0:
            state.epoch_start_generator = state.generator.get_state()
            return torch.randperm(len(self.data), generator=state.generator)
        replay = torch.Generator()
        replay.set_state(state.epoch_start_generator)
        return torch.randperm(len(self.data), generator=replay)[state.position * self.config.batch_size :]

    def check_finite(self, loss: torch.Tensor, step: int) -> None:
        """A TrainingError (marked ``loss_not_finite``, which a rollback answers) if ``loss`` is NaN or infinite on any rank."""
        value = float(self.runtime.ranks.sum(loss))  # under torchrun every rank must see the same verdict
        if not math.isfinite(value):
            retried = self.state.rollback
            again = f"; it had already been rolled back at step {retried['lr_halved_at_step']} and retried with half the learning rate" if retried else ""
            error = TrainingError(
                f"{self.method.name}: the loss became {value} at epoch {self.state.epoch + 1} (by step {step}); "
                f"lower the learning rate (now {self.config.lr}) or check the inputs for NaN{again}"
            )
            error.loss_not_finite = True
            raise error

    # --- the views every model of a step sees -----------------------------------------------

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

    # --- evaluation and the guard's choice --------------------------------------------------

    def evaluated_model(self) -> Model:
        """The student as it is evaluated and returned (the method's ``eval_module``); under torchrun every
        rank evaluates (and rank 0 saves) rank 0's weights and batch-norm statistics."""
        evaluated = self.method.eval_module(self.student.module)
        self.runtime.ranks.sync_module(self.student.module)
        if evaluated is not self.student.module:
            self.runtime.ranks.sync_module(evaluated)
        return self.student if evaluated is self.student.module else self.student.rebuilt(evaluated)

    def evaluate(self) -> dict:
        if self.evaluator is None:
            return {}
        return self.evaluator(self.evaluated_model())

    def restore_best(self) -> int:
        """With the guard: load its chosen weights into the evaluated module; returns the chosen epoch (0 = the original)."""
        if self.guard is None:
            raise ConfigError("restore_best needs the engine built with a guard (an Evaluator of held-out data)")
        return self.guard.restore_best(self)

    # --- saving and resuming ----------------------------------------------------------------

    def state_dict(self, epoch_sums: dict | None = None) -> dict:
        """All a run needs to go on where it stopped: the student, the loop, the method and the RNG (copies,
        on the CPU). ``epoch_sums``: the epoch's running sums to save in place of this rank's own."""
        rng = {"torch": torch.get_rng_state()}
        if self.runtime.device_type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(torch.device(self.config.device))
        loop = self.state.state_dict()
        if epoch_sums is not None:
            loop["epoch_sums"] = to_cpu(epoch_sums)
        return {"student": to_cpu(self.student.module.state_dict()), "loop": loop, "method": to_cpu(self.method.state_dict()), "rng": rng}

    def load_state_dict(self, state: dict) -> None:
        device = self.config.device
        self.student.module.load_state_dict(state["student"])
        self.method.load_state_dict(to_device(state["method"], device))
        self.state.load_state_dict(state["loop"])
        if not self.runtime.ranks.is_main and self.state.epoch_sums:
            # A checkpoint holds the sums over all ranks; counted once, by rank 0.
            sums = self.state.epoch_sums
            self.state.epoch_sums = {**sums, "loss": torch.zeros_like(sums["loss"]), "stats": {key: torch.zeros_like(torch.as_tensor(v)) for key, v in sums["stats"].items()}}
        if self.state.rollback:  # a run that was rolled back goes on at its halved learning rate
            self.config.lr = self.state.rollback["final_lr"]
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.runtime.device_type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], torch.device(device))

    def checkpoint_where(self) -> str:
        state = self.state
        if state.position:
            return f"epoch {state.epoch + 1} of {self.config.epochs}, batch {state.position} of {self.steps_per_epoch}, step {state.step}"
        return f"end of epoch {state.epoch} of {self.config.epochs}, step {state.step}"
