"""What runs around the loop, as callbacks: checkpoints, Ctrl-C, the no-regression guard, the rollback
after a non-finite loss, and progress. Trackers and users' own hooks are callbacks too.

The engine calls each hook on every callback in its list, in order (see :class:`Callback`); the
built-in ones come first, so a user's callback sees the epoch's record with the guard's score in it
and after the checkpoint is written.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..checkpoints import CheckpointStore
from .evaluation import Evaluator
from .state import to_cpu

if TYPE_CHECKING:
    from ..methods.base import LossOutput
    from .loop import Engine


class Callback:
    """Hooks of :class:`~ktransfer.engine.Engine`; each default does nothing.

    - ``on_run_start``: before the first epoch (after a resume, for the callbacks after :class:`Checkpointing`).
    - ``on_epoch_start``: before each epoch's first step (also before an epoch retried after a rollback).
    - ``on_step_end``: after each optimiser step, with the step's :class:`~ktransfer.methods.base.LossOutput`
      (tensors on the device: reading one back on a GPU waits for the step). ``engine.state.step`` is the
      steps done so far, ``engine.state.epoch_sums`` the epoch's running sums.
    - ``on_evaluated``: the epoch's record, evaluated, before it is final: a callback may add numbers to it.
    - ``on_epoch_end``: the epoch's final record, after it was added to ``engine.state.history``.
    - ``on_loss_not_finite``: a NaN or infinite loss ended the epoch; return True if the run was put back
      to a good state and the epoch should run again (the error is raised if none does).
    - ``on_run_end``: when the run ends, also by an error or Ctrl-C.
    """

    def on_run_start(self, engine: Engine) -> None:
        pass

    def on_epoch_start(self, engine: Engine) -> None:
        pass

    def on_step_end(self, engine: Engine, out: LossOutput) -> None:
        pass

    def on_evaluated(self, engine: Engine, record: dict) -> None:
        pass

    def on_epoch_end(self, engine: Engine, record: dict) -> None:
        pass

    def on_loss_not_finite(self, engine: Engine, error: Exception) -> bool:
        return False

    def on_run_end(self, engine: Engine) -> None:
        pass


class Progress(Callback):
    """Calls ``on_step(steps done, steps in all)`` after each step and ``on_epoch(record)`` after each epoch."""

    def __init__(self, on_step: Callable[[int, int], None] | None = None, on_epoch: Callable[[dict], None] | None = None):
        self.on_step, self.on_epoch = on_step, on_epoch

    def on_step_end(self, engine: Engine, out: LossOutput) -> None:
        if self.on_step is not None:
            self.on_step(engine.state.step, engine.steps_per_epoch * engine.config.epochs)

    def on_epoch_end(self, engine: Engine, record: dict) -> None:
        if self.on_epoch is not None:
            self.on_epoch(record)


class Checkpointing(Callback):
    """Resumes from the newest readable checkpoint, and writes one after every epoch and mid-epoch when
    the store says one is due (every N steps or minutes). Under torchrun every rank reads, rank 0 alone
    writes, and rank 0's clock decides when."""

    def __init__(self, store: CheckpointStore):
        self.store = store
        self.has_checkpoint = False  # one was loaded or written in this run: a rollback can go back to it

    def load_latest(self, engine: Engine) -> dict | None:
        """The newest readable checkpoint; rank 0 alone sets a damaged one aside."""
        return self.store.load_latest(set_aside=engine.runtime.ranks.is_main)

    def on_run_start(self, engine: Engine) -> None:
        checkpoint = self.load_latest(engine)
        if checkpoint is not None:
            engine.load_state_dict(checkpoint["state"])
            self.has_checkpoint = True

    def on_step_end(self, engine: Engine, out: LossOutput) -> None:
        state, ranks = engine.state, engine.runtime.ranks
        if state.position < engine.steps_per_epoch and ranks.agree(ranks.is_main and self.store.due(state.step)):
            engine.check_finite(state.epoch_sums["loss"], state.step)  # never checkpoint a run that has diverged
            self.save(engine)

    def on_epoch_end(self, engine: Engine, record: dict) -> None:
        self.save(engine)

    def save(self, engine: Engine) -> Path | None:
        """Write a checkpoint of the engine as it is now; every rank must call it (the epoch's sums are summed over them)."""
        self.has_checkpoint = True
        state, ranks = engine.state, engine.runtime.ranks
        sums = ranks.summed(state.epoch_sums) if state.epoch_sums else {}
        if not ranks.is_main:
            return None
        return self.store.save(engine.state_dict(epoch_sums=sums), state.step, engine.checkpoint_where())


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run with checkpoints: the step in progress finished and a checkpoint was written."""

    def __init__(self, path, where: str):
        super().__init__(f"interrupted at {where}; checkpoint {path}")
        self.path, self.where = path, where


class StopOnCtrlC(Callback):
    """With checkpoints, in the main thread of one process: Ctrl-C finishes the step in progress, writes a
    checkpoint and raises :class:`Interrupted`; a second Ctrl-C stops at once. (Under torchrun the ranks
    would stop at different steps: Ctrl-C stops them, and the last checkpoint resumes.)"""

    def __init__(self, checkpointing: Checkpointing):
        self.checkpointing = checkpointing
        self.interrupted, self.previous = False, None

    def on_run_start(self, engine: Engine) -> None:
        self.interrupted = False
        if not engine.runtime.ranks.stops_on_ctrl_c or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)
        previous = previous if previous is not None else signal.default_int_handler  # None: set outside Python

        def interrupt(signum, frame):
            self.interrupted = True
            signal.signal(signal.SIGINT, previous)

        self.previous = previous
        signal.signal(signal.SIGINT, interrupt)

    def on_step_end(self, engine: Engine, out: LossOutput) -> None:
        if self.interrupted:  # at this batch boundary the state is whole, so it is saved
            engine.check_finite(engine.state.epoch_sums["loss"], engine.state.step)
            path = self.checkpointing.save(engine)
            raise Interrupted(path, engine.checkpoint_where())

    def on_run_end(self, engine: Engine) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


class Guard(Callback):
    """The no-regression guard: scores the student on held-out data before training and after every epoch,
    and keeps the best (earliest on ties) weights, which :meth:`restore_best` puts back at the end. Its
    state is in ``engine.state.guard``, so a checkpoint carries it."""

    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator

    def on_run_start(self, engine: Engine) -> None:
        if not engine.state.guard:
            self.score(engine, 0)  # the original: a checkpoint written later carries its score and weights

    def on_evaluated(self, engine: Engine, record: dict) -> None:
        record["guard_acc"] = self.score(engine, engine.state.epoch + 1)

    def score(self, engine: Engine, epoch: int) -> float:
        model = engine.evaluated_model()
        accuracy_now = self.evaluator(model)["acc"]
        best = engine.state.guard
        if not best or accuracy_now > best["acc"]:
            best.update(epoch=epoch, acc=accuracy_now, state=to_cpu(model.module.state_dict()))
            best.setdefault("acc_before", accuracy_now)
        return accuracy_now

    def restore_best(self, engine: Engine) -> int:
        """Load the chosen weights into the evaluated module; returns the chosen epoch (0 = the original)."""
        best = engine.state.guard
        if best["epoch"] != engine.state.epoch:
            engine.method.eval_module(engine.student.module).load_state_dict(best["state"])
        return best["epoch"]


class Rollback(Callback):
    """After a NaN or infinite loss: back to the last good state, once, at half the learning rate.

    The last good state is the newest checkpoint where the run has one (written or resumed from), else
    the state at the epoch's start, copied then (once per epoch, and only in runs without checkpoints,
    or in the first epoch before the first checkpoint). After one rollback no copy is taken: a second
    non-finite loss ends the run.
    """

    def __init__(self, checkpointing: Checkpointing | None = None):
        self.checkpointing = checkpointing
        self.good: dict | None = None

    def on_epoch_start(self, engine: Engine) -> None:
        covered = self.checkpointing is not None and self.checkpointing.has_checkpoint
        self.good = None if covered or engine.state.rollback else engine.state_dict()

    def on_loss_not_finite(self, engine: Engine, error: Exception) -> bool:
        state, config = engine.state, engine.config
        if state.rollback:
            return False
        failed_at = state.step
        checkpoint = self.checkpointing.load_latest(engine) if self.checkpointing is not None else None
        good = checkpoint["state"] if checkpoint is not None else self.good
        if good is None:  # the checkpoints it counted on are unreadable now
            return False
        engine.load_state_dict(good)
        config.lr /= 2
        for group in state.optimizer.param_groups:
            group["lr"] = config.lr_at(state.step, engine.steps_per_epoch * config.epochs)
        state.rollback = {"retries": 1, "lr_halved_at_step": failed_at, "resumed_from_step": state.step, "final_lr": config.lr}
        if self.checkpointing is not None:
            self.checkpointing.store.log(
                f"Warning: {engine.method.name}: the loss became NaN or infinite by step {failed_at}; "
                f"rolled back to step {state.step} and retrying with half the learning rate ({config.lr:g})"
            )
        return True
