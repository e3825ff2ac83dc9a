"""One transfer on several processes (torchrun): what each rank trains and evaluates on, and how the ranks agree.

Only the student trains under :class:`~torch.nn.parallel.DistributedDataParallel`; the
teachers and the original student are frozen, unwrapped and never synchronised.

- Training: every rank draws the same epoch order (the engine's seeded generator), cuts it into
  the global batches one process would use, and takes its share of each (``torch.tensor_split``,
  so a short last batch is spread over the ranks). Each rank's loss is weighted by its share of
  the global batch, so DDP's gradient average is the gradient of the global batch's mean loss:
  the effective batch and learning rate are the one-process run's. A short last batch of fewer
  than ``2W`` samples goes to the first ``b // 2`` ranks only, two or three samples each, as
  batch-norm cannot train on one (a last batch of one sample gives rank 0 one, as in one process).
  A rank whose share of a short last batch is empty steps on a stand-in of two samples with weight
  0 (DDP needs every rank to step).
  This is exact for every method that :func:`check_distributable` lets through: ``kl``, ``kl_dp``
  (and ``kl_dp_unsup``), ``xe_kl``, ``soft_ce`` and ``ce`` take a mean over the batch's samples;
  ``xe_kl_mcl`` averages its KL over the samples its mask keeps, and divides by the kept count of
  the whole global batch (all-reduced each step, :meth:`Ranks.subset_divisor`), so it is exact too.
  (Models with batch-norm are the exception for all: see below.)
- Evaluation: rank ``r`` predicts samples ``r, r + W, r + 2W, ...``; the predictions are gathered
  and put back by sample index before any metric, so every number is of the whole set, once.
- Batch-norm: per-rank batch statistics in the forward pass (as DDP without SyncBatchNorm); the
  running statistics are rank 0's (DDP broadcasts buffers before every forward, and the module
  evaluated is broadcast from rank 0 before each evaluation).
- Frozen outputs (cached targets, predictions before the transfer): rank 0 computes them (and
  writes the prediction cache); the other ranks receive them by broadcast.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError

LAUNCH_HINT = "launch it with torchrun (torchrun --nproc-per-node N -m ktransfer transfer ...), which sets RANK, WORLD_SIZE and LOCAL_RANK"


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (or another launcher that sets the same variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


@dataclass
class Shard:
    """One rank's share of an epoch (see :meth:`Ranks.shard`)."""

    full: torch.Tensor  # its shares of the full global batches, one after the other
    last: torch.Tensor | None  # its share of a short last batch (or a stand-in); None when there is none
    weights: list[float] | None  # each step's loss weight, the last batch's included (None: one process, no weighting)


@dataclass
class Ranks:
    """This process's place among the ranks of one transfer."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- setting up and tearing down --------------------------------------------------------

    @classmethod
    def start(cls, device: str) -> "Ranks":
        """Join the process group, for a run on ``device``.

        A group the user's script started is used as it is. Otherwise one is created and kept for
        the transfers that follow in this process (torchrun's rendezvous serves one group per
        launch), and destroyed when the process exits.
        """
        if not dist.is_initialized():
            if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
                raise ConfigError(f"distributed=True but this process was not started by torchrun; {LAUNCH_HINT}")
            backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
            dist.init_process_group(backend)
            atexit.register(_destroy_group)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return cls(dist.get_rank(), dist.get_world_size(), local_rank)

    @property
    def collective_device(self) -> torch.device:
        """Where tensors must be for the group's collectives: this rank's GPU under NCCL, else the CPU."""
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def device(self, device: str) -> str:
        """The rank's device: ``cuda`` becomes this rank's GPU (``cuda:LOCAL_RANK``); an explicit index or the CPU stays."""
        if device == "cuda":
            device = f"cuda:{self.local_rank}"
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(torch.device(device))
        return device

    def wrap(self, module: nn.Module, device: str) -> nn.Module:
        """The student as DDP trains it; its parameters are the module's own (the optimiser's)."""
        kind = torch.device(device).type
        ids = [torch.device(device)] if kind == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)  # buffers (batch-norm statistics) from rank 0 at every forward

    # --- training -------------------------------------------------------------------------

    def shard(self, order: torch.Tensor, batch_size: int) -> Shard:
        """This rank's samples for the global batches of ``order``, and each step's loss weight.

        The full global batches are shared out equally (``batch_size`` is a multiple of the world
        size): ``Shard.full`` holds this rank's shares in one tensor that
        ``ImageData.batches(..., batch_size // world_size)`` cuts into exactly its per-step batches.
        A short last batch of ``b`` samples is its own step (``Shard.last``): fewer than ``2W`` go to
        the first ``b // 2`` ranks only, so that no rank trains on a single sample, which batch-norm
        cannot do (a share may then exceed ``batch_size // world_size``). The ranks left without
        samples step on a stand-in of two samples with weight 0. The weights keep the global batch's
        mean loss either way; only a last batch of one sample gives rank 0 one sample, as one process has.
        """
        parts, weights, last = [], [], None
        for batch in order.split(batch_size):
            short = len(batch) < batch_size
            sharing = min(self.world_size, max(len(batch) // 2, 1)) if short else self.world_size
            mine = torch.tensor_split(batch, sharing)[self.rank] if self.rank < sharing else batch[:0]
            weights.append(len(mine) * self.world_size / len(batch))
            if not len(mine):
                mine = batch[:2]  # the stand-in, weighted 0
            if short:
                last = mine
            else:
                parts.append(mine)
        return Shard(torch.cat(parts) if parts else order[:0], last, weights)

    def subset_divisor(self, weight: float):
        """For a step of loss weight ``weight``: this rank's count of the samples that a mean over part
        of its batch takes (a tensor) -> the divisor of their sum that makes the mean exact.

        The divisor is the subset's size over the whole global batch K (at least 1), times ``weight / W``.
        The engine multiplies the loss by ``weight`` and DDP averages over the W ranks, so rank r's
        sum contributes ``sum_r / K``: the global batch's mean over the subset, as in one process. A
        stand-in (weight 0) counts nothing. Every rank must call it at the same step (one all-reduce).
        """

        def divisor(count: torch.Tensor) -> torch.Tensor:
            total = self.sum(count.float() * (1.0 if weight > 0 else 0.0))
            if weight == 0:  # the stand-in's loss is multiplied by 0; any finite divisor will do
                return torch.ones_like(total)
            return total.clamp(min=1) * (weight / self.world_size)

        return divisor

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks (a new tensor)."""
        home = value.device
        value = value.detach().to(self.collective_device, copy=True)
        dist.all_reduce(value)
        return value.to(home)

    def agree(self, flag: bool) -> bool:
        """Rank 0's decision, for every rank (a checkpoint that is due by the clock, say)."""
        value = torch.tensor([1.0 if flag else 0.0], device=self.collective_device)
        dist.broadcast(value, 0)
        return bool(value.item())

    # --- frozen outputs and evaluation -------------------------------------------------------

    def from_main(self, value):
        """Rank 0's ``value`` (tensors, numbers, lists of them) on every rank; others pass None."""
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, 0)
        return box[0]

    @torch.no_grad()
    def sync_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers in ``module`` on every rank."""
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, 0)

    def eval_indices(self, size: int) -> torch.Tensor:
        return torch.arange(self.rank, size, self.world_size)

    def gather_by_index(self, local: torch.Tensor, size: int) -> torch.Tensor:
        """The whole set's values from each rank's ``local`` values of :meth:`eval_indices`; every sample once."""
        home, local = local.device, local.to(self.collective_device)
        per_rank = -(-size // self.world_size)
        padded = torch.zeros(per_rank, *local.shape[1:], dtype=local.dtype, device=local.device)
        padded[: len(local)] = local
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded)
        full = torch.empty(size, *local.shape[1:], dtype=local.dtype, device=local.device)
        for rank, values in enumerate(gathered):
            index = torch.arange(rank, size, self.world_size, device=local.device)
            full[index] = values[: len(index)]  # the padding rows are dropped here
        return full.to(home)

    def barrier(self) -> None:
        dist.barrier()


    # --- what the engine asks of any process group (OneProcess answers the same for one process) --

    @property
    def stops_on_ctrl_c(self) -> bool:
        """Under torchrun the ranks would stop at different steps: Ctrl-C stops them, and the last checkpoint resumes."""
        return False

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ConfigError(f"batch size {batch_size} must be a multiple of the {self.world_size} processes, each of which takes an equal share of every batch")

    def check_method(self, method, extra_parameters: list) -> None:
        check_distributable(method, extra_parameters)

    def eval_share(self, data):
        """This rank's samples of the evaluation data (see :meth:`eval_indices`)."""
        return data.subset(self.eval_indices(len(data)), data.name)

    def summed(self, sums: dict) -> dict:
        """An epoch's running sums (``loss``, ``stats``) over all ranks, as one process has them; ``sums`` is left alone."""
        stats = {key: self.sum(torch.as_tensor(value, dtype=torch.float32, device=sums["loss"].device)) for key, value in sums["stats"].items()}
        return {**sums, "loss": self.sum(sums["loss"]), "stats": stats}


class OneProcess:
    """A run in this process alone, behind the interface of :class:`Ranks`: the engine's loop reads the
    same whether one process trains or torchrun's several do. Every collective is the identity."""

    rank, world_size, local_rank, is_main = 0, 1, 0, True
    stops_on_ctrl_c = True

    def device(self, device: str) -> str:
        return device

    def wrap(self, module: nn.Module, device: str) -> nn.Module:
        return module

    def check_batch_size(self, batch_size: int) -> None:
        pass

    def check_method(self, method, extra_parameters: list) -> None:
        pass

    def shard(self, order: torch.Tensor, batch_size: int) -> Shard:
        return Shard(order, None, None)  # no weights: the loss stays as the method computed it

    def subset_divisor(self, weight):
        return None

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def summed(self, sums: dict) -> dict:
        return dict(sums)

    def agree(self, flag: bool) -> bool:
        return flag

    def from_main(self, value):
        return value

    def sync_module(self, module: nn.Module) -> None:
        pass

    def eval_share(self, data):
        return data

    def gather_by_index(self, local: torch.Tensor, size: int) -> torch.Tensor:
        return local

    def barrier(self) -> None:
        pass


def _destroy_group() -> None:
    """Leave the group at exit. Under gloo the ranks first meet (for at most 10 s, so that a rank whose peer
    failed still exits): a rank that tears its group down after its peer has closed the connections can be
    aborted by gloo's threads ("terminate called without an active exception")."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=10))
        except RuntimeError:  # a peer that has gone: nothing to wait for
            pass
    dist.destroy_process_group()


def check_distributable(method, extra_parameters: list) -> None:
    """Methods whose state DDP would not keep the same as one process are refused, in one line."""
    if method.needs_features:
        raise ConfigError(
            f"method {method.name} keeps a memory of embeddings (and trains a projection) that a distributed run would split by rank; "
            f"run it in one process, or use kl, kl_dp, xe_kl, xe_kl_mcl, soft_ce or ce under torchrun (their gradient is the global batch's, as in one process)"
        )
    if extra_parameters:
        raise ConfigError(f"method {method.name} trains parameters outside the student, which DistributedDataParallel would not synchronise; run it in one process")


def join(distributed: bool | None, device: str) -> Ranks | None:
    """The ranks of this run: ``distributed=None`` detects torchrun (or a process group the user started);
    ``True`` requires one; ``False`` runs in this process alone."""
    if distributed is False:
        return None
    if distributed is None:
        group_started = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not (launched_by_torchrun() or group_started):
            return None
    if not dist.is_available():
        raise ConfigError(f"distributed=True but this torch ({torch.__version__}) was built without torch.distributed; run in one process")
    return Ranks.start(device)


def is_main_process() -> bool:
    """False on the ranks other than 0 of a torchrun launch (they print and write nothing)."""
    return int(os.environ.get("RANK", "0")) == 0 or not launched_by_torchrun()
