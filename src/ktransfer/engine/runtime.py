"""Where and how the loop computes: device, autocast, memory format, the process group, compilation and
the loading of batches. The loop asks the same of one process as of torchrun's several
(:class:`~ktransfer.distributed.OneProcess` answers every collective with the identity).
"""

from __future__ import annotations

import itertools
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ..distributed import OneProcess
from ..models.base import Model
from ..targets import OnlineTargets, TargetSource
from .config import TrainConfig

if TYPE_CHECKING:
    from ..data.base import ImageData
    from ..distributed import Ranks
    from ..methods.base import Method


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


class Runtime:
    """The device side of one run, configured once from the :class:`TrainConfig`."""

    def __init__(self, config: TrainConfig, ranks: Ranks | None = None):
        self.config = config
        self.ranks: Ranks | OneProcess = ranks if ranks is not None else OneProcess()
        self.device = config.device
        self.device_type = torch.device(config.device).type
        # Reading a number back each step would stall a GPU: the loss is checked for NaN every step
        # on the CPU (free) and every 32 steps elsewhere.
        self.check_every = 1 if self.device_type == "cpu" else 32
        self.channels_last = False
        self.prefetch = config.prefetch == "on" or (config.prefetch == "auto" and self.device_type == "cuda")

    def prepare(self, student: Model, trained: Model, targets: TargetSource | None, method: Method, extra: list) -> Model:
        """The student as the loop trains it, in this order: channels-last memory (before DDP, whose
        gradient buckets follow the parameters' layout), the DDP wrapper under torchrun (the frozen
        models stay as they are), then torch.compile (of the wrapped student, if asked)."""
        config = self.config
        self.ranks.check_batch_size(config.batch_size)
        self.channels_last = uses_channels_last(config.channels_last, config.device, student.module)
        if self.channels_last:
            student.module.to(memory_format=torch.channels_last)
        online = isinstance(targets, OnlineTargets)
        if online:
            targets.prepare(lambda module: module.to(memory_format=torch.channels_last) if uses_channels_last(config.channels_last, config.device, module) else module)
        self.ranks.check_method(method, extra)
        wrapped = self.ranks.wrap(student.module, config.device)
        if wrapped is not student.module:
            trained = replace(trained, module=wrapped)
        if config.compile:
            trained = replace(trained, module=torch.compile(trained.module, backend=config.compile_backend))
            if online:
                targets.prepare(lambda module: torch.compile(module, backend=config.compile_backend))
        return trained

    def autocast(self, frozen: bool = False) -> AbstractContextManager:
        """bfloat16 autocast for the student's forward pass and the loss (``frozen``: for the frozen models), as configured."""
        config = self.config
        return torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=config.amp and (config.amp_frozen or not frozen))

    def memory_format(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last and images.dim() == 4 else images

    def batches(self, data: ImageData, order: torch.Tensor, batch_size: int, last: torch.Tensor | None = None):
        """``(cpu_index, index, images, labels)`` for the epoch, the last three on the device; ``last``: one more batch, of its own size."""
        batches = data.batches(order, batch_size) if len(order) else iter(())
        if last is not None:
            batches = itertools.chain(batches, data.batches(last, len(last)))
        return Prefetcher(batches, self.device) if self.prefetch else plain_batches(batches, self.device)
