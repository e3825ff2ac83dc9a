"""Frozen models' logits on the exact augmented views a transfer trains on, computed once and reused.

With augmentation every step shows the student a new view of each image, and the teacher and the
original student must score that same view. The view is a pure function of (augmentation recipe,
seed, epoch, sample index) and of the frame the student crops (``ktransfer.augment``), so it is known
before training: a frozen model can be run over every view of an epoch once, and every transfer that
trains on those views (each student of a study with the same input frame) reads the logits instead of
running the model. A study of N students and M teachers then runs M + N frozen passes per epoch, not
2·N·M.

Layout, under the prediction cache's folder::

    views/<key>/meta.json          what determines the views and the logits (the key is its hash),
                                   including a hash of the augmentation's code (recipe_digest)
    views/<key>/epoch-0003/        one folder per epoch, written whole (temporary folder, then rename)
        logits.npy                 [N, C] float16 (default) or float32, memory-mapped on read
        confidence.npy             [N, 2] float32: the probability of the true class and the maximum
                                   probability, from the full-precision logits (DP routes on these)

Each epoch is a shard of its own: a run with fewer epochs reads a prefix, a longer one adds shards.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._version import __version__
from . import augment as augment_module
from .augment import Augmentation, check_augment
from .data.base import ImageData
from .errors import ConfigError, KTransferError
from .models.base import Model, Preprocess
from .paths import atomic_write_bytes, sync_directory, waiting_lock
from .targets import BatchTargets, TargetSource

FORMAT = 1
TOP_K_GAP = 1000.0  # how far below a view's smallest kept logit the dropped classes read back (top-k caches)
CACHE_DTYPES = {"float16": np.float16, "float32": np.float32}


class ViewCacheError(KTransferError):
    """A view cache that cannot be used for what was asked: the message says which part of its key differs."""


def frame_description(preprocess: Preprocess) -> dict:
    """What of a student's preprocessing decides the frame its views are cut from (``Preprocess.frame``)."""
    return {"input_size": list(preprocess.input_size) if preprocess.input_size else None, "crop_pct": preprocess.crop_pct, "interpolation": preprocess.interpolation}


@dataclass(frozen=True)
class ViewKey:
    """Everything that decides a frozen model's logits on the views: any change gives another key."""

    model: str  # the frozen model's fingerprint (weights, buffers, preprocessing)
    data: str  # the transfer set's fingerprint
    frame: str  # json of frame_description(student preprocessing)
    augment: str  # the recipe
    seed: int  # the augmentation seed (the transfer's seed)
    dtype: str
    top_k: int = 0  # > 0: only each view's k largest logits are kept (the rest read back as far below them)
    recipe: str = ""  # recipe_digest(): a hash of the code that makes the views

    def fields(self) -> dict:
        return {"format": FORMAT, "model": self.model, "data": self.data, "frame": json.loads(self.frame), "augment": self.augment, "recipe": self.recipe, "seed": self.seed, "dtype": self.dtype, "top_k": self.top_k}

    @property
    def digest(self) -> str:
        return hashlib.blake2b(json.dumps(self.fields(), sort_keys=True).encode(), digest_size=12).hexdigest()


def recipe_source() -> str:
    """The code that makes the views: all of ``ktransfer.augment`` and the student frame's crop and resize.

    Any edit to it (a constant, the hue maths, the random streams) gives every view cache a new key,
    so that views made by other code are never read. Without the source (a build that ships only
    bytecode) the package version stands in for it.
    """
    try:
        return inspect.getsource(augment_module) + inspect.getsource(Preprocess.frame)
    except (OSError, TypeError):
        return f"ktransfer {__version__} (source unavailable)"


def recipe_digest() -> str:
    return hashlib.blake2b(recipe_source().encode("utf-8"), digest_size=8).hexdigest()


def view_key(model: Model, data: ImageData, student_preprocess: Preprocess, augment: str, seed: int, dtype: str = "float16", top_k: int = 0) -> ViewKey:
    check_augment(augment)
    if augment == "none":
        raise ConfigError("a view cache holds outputs on augmented views; with augment none the plain prediction cache serves (targets cached)")
    if dtype not in CACHE_DTYPES:
        raise ConfigError(f"cache dtype must be one of {', '.join(CACHE_DTYPES)}; got {dtype!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"cache top-k must be 0 (every class) or a positive number of classes; got {top_k!r}")
    return ViewKey(model.fingerprint(), data.fingerprint(), json.dumps(frame_description(student_preprocess), sort_keys=True), augment, int(seed), dtype, int(top_k), recipe_digest())


def _differences(expected: dict, found: dict) -> list[str]:
    return [f"{name} is {found.get(name)!r}, this run needs {value!r}" for name, value in expected.items() if found.get(name) != value]


def routing_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[N, 2]`` float32: each sample's probability of its true class and its maximum probability."""
    probs = logits.float().softmax(dim=-1)
    return torch.stack([probs.gather(1, labels.view(-1, 1).long()).squeeze(1), probs.amax(dim=1)], dim=1)


class ViewCache:
    """The views of one frozen model for one (data, student frame, recipe, seed, dtype): epoch shards on disk."""

    def __init__(self, root: Path, model: Model, data: ImageData, student_preprocess: Preprocess, augment: str = "paper", seed: int = 0, dtype: str = "float16", top_k: int = 0):
        self.key = view_key(model, data, student_preprocess, augment, seed, dtype, top_k)
        self.folder = Path(root) / "views" / self.key.digest
        self.model, self.data, self.student_preprocess = model.for_views(), data, student_preprocess
        self.augmentation = Augmentation(seed)
        self._open: dict[str, np.ndarray | torch.Tensor] = {}
        self._open_epoch: int | None = None
        # Where reads go: on the CPU rows come from memory-mapped files; on a GPU each epoch's
        # arrays are copied over once and rows taken there by the device's indices, since copying
        # rows from (pageable) host memory every step would make the step wait for the GPU.
        self.read_device = torch.device("cpu")
        self._classes: int | None = None
        self._check_meta()

    # ---- where things are

    def shard(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch:04d}"

    def has(self, epoch: int) -> bool:
        return (self.shard(epoch) / "confidence.npy").is_file()  # a shard folder appears whole (see build)

    def epochs_built(self) -> list[int]:
        return sorted(int(p.name.split("-")[1]) for p in self.folder.glob("epoch-*") if (p / "confidence.npy").is_file())

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.folder.glob("epoch-*/*.npy"))

    def _check_meta(self) -> None:
        """A folder whose recorded key differs from ours (copied in by hand, or a hash collision) is refused, saying why."""
        meta = self.folder / "meta.json"
        if not meta.is_file():
            return
        try:
            found = json.loads(meta.read_text())
        except (OSError, ValueError) as exc:
            raise ViewCacheError(f"the view cache {self.folder} has an unreadable meta.json ({exc}); delete the folder to rebuild it") from exc
        differences = _differences(self.key.fields(), found)
        if differences:
            raise ViewCacheError(f"the view cache {self.folder} was built for other views: {'; '.join(differences)}; delete the folder to rebuild it")

    # ---- building

    @torch.no_grad()
    def views_logits(self, index: torch.Tensor, epoch: int, batch_size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
        """The model's float32 logits on the views of samples ``index`` in ``epoch`` (computed now).

        The images come from the data's batches, so a streamed folder (decoded from disk per batch)
        serves as well as data held in memory.
        """
        self.model.module.eval()
        out = []
        for chunk, images, _ in self.data.batches(torch.as_tensor(index, dtype=torch.int64).reshape(-1), batch_size):
            images = images.to(device)
            views = self.augmentation(self.student_preprocess.frame(images), chunk, epoch)
            out.append(self.model.logits(views).float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    def build(self, epoch: int, batch_size: int = 256, device: str | torch.device = "cpu") -> bool:
        """Compute and store ``epoch``'s shard unless it is there. Returns whether it computed it.

        Processes building the same shard at once (a study's parallel workers) take turns: the
        second waits for the first, then finds the shard built, so each shard is computed once.
        """
        if self.has(epoch):
            return False
        with waiting_lock(self.folder / f".epoch-{epoch:04d}.lock"):
            if self.has(epoch):  # built by another process while this one waited
                return False
            logits = self.views_logits(torch.arange(len(self.data)), epoch, batch_size, device)
            if not torch.isfinite(logits).all():
                raise ViewCacheError(f"{self.model.name} gives non-finite logits on the views of epoch {epoch + 1}; check the model and the data before caching")
            arrays = self._stored_arrays(logits, epoch)
            if not (self.folder / "meta.json").is_file():
                atomic_write_bytes(self.folder / "meta.json", (json.dumps(self.key.fields(), indent=1) + "\n").encode("utf-8"))
            self._write_shard(epoch, arrays)
        return True

    def _stored_arrays(self, logits: torch.Tensor, epoch: int) -> dict[str, np.ndarray]:
        """The shard's arrays by file name, as stored: checked finite after the cast to the cache's dtype."""
        store = CACHE_DTYPES[self.key.dtype]
        arrays = {"confidence": routing_confidence(logits, self.data.labels).numpy()}
        if 0 < self.key.top_k < logits.shape[1]:  # the k largest logits with their classes (int16 up to 32768 classes)
            top = logits.topk(self.key.top_k, dim=1)
            kept = top.values.numpy()
            arrays["top_classes"] = top.indices.numpy().astype(np.int16 if logits.shape[1] <= 2**15 else np.int32)
            arrays["classes"] = np.asarray([logits.shape[1]], dtype=np.int64)
            name = "top_values"
        else:
            kept, name = logits.numpy(), "logits"
        with np.errstate(over="ignore"):  # an overflow is reported below, in words
            arrays[name] = stored = kept.astype(store)
        if not np.isfinite(stored).all():  # float16 holds at most ±65504: larger logits would read back as ±inf
            raise ViewCacheError(
                f"{self.model.name}'s logits on the views of epoch {epoch + 1} reach {float(np.abs(kept).max()):.6g}, beyond what {self.key.dtype} holds "
                f"(±{float(np.finfo(store).max):.6g}), so they would be stored as infinite; cache them as float32 (--cache-dtype float32, cache_dtype='float32')"
            )
        return arrays

    def _write_shard(self, epoch: int, arrays: dict[str, np.ndarray]) -> None:
        """The shard's files, written into a temporary folder that is then renamed: it appears whole or not at all.

        Each file and the temporary folder are flushed to disk (fsync) before the rename, the cache's
        folder after it: after a power loss the shard is there whole or not at all.
        """
        tmp = self.folder / f".epoch-{epoch:04d}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()
        try:
            for name, array in arrays.items():
                with open(tmp / f"{name}.npy", "wb") as handle:
                    np.save(handle, array)
                    handle.flush()
                    os.fsync(handle.fileno())
            sync_directory(tmp)
            try:
                os.rename(tmp, self.shard(epoch))
            except OSError:  # without advisory locks another process may have renamed its copy first
                if not self.has(epoch):
                    raise
            sync_directory(self.folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- reading

    def _load(self, epoch: int) -> dict[str, np.ndarray]:
        """``epoch``'s files, memory-mapped (one epoch open at a time)."""
        if self._open_epoch != epoch:
            if not self.has(epoch):
                raise ViewCacheError(f"the view cache of {self.model.name} has no epoch {epoch + 1}; build it first (ktransfer precompute, or ViewCache.build)")
            self._open = {}  # the previous epoch's arrays go first
            arrays = {file.stem: np.load(file, mmap_mode="r") for file in self.shard(epoch).glob("*.npy")}
            self._classes = int(arrays.pop("classes")[0]) if "classes" in arrays else None  # top-k shards: the full width
            if self.read_device.type != "cpu":
                arrays = {name: torch.from_numpy(np.array(array)).to(self.read_device) for name, array in arrays.items()}
            self._open, self._open_epoch = arrays, epoch
        return self._open

    def _rows(self, name: str, index: torch.Tensor, epoch: int) -> torch.Tensor:
        dtype = torch.int64 if name == "top_classes" else torch.float32
        array = self._load(epoch)[name]
        if isinstance(array, torch.Tensor):  # on the read device already
            return array[index].to(dtype)
        return torch.from_numpy(np.asarray(array[np.asarray(index, dtype=np.int64)])).to(dtype)

    def logits(self, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """Float32 logits of the views of ``index`` in ``epoch`` from the shard (as stored: maybe rounded).

        With top-k, the classes outside a view's k largest logits read back ``TOP_K_GAP`` below its
        smallest kept one: a softmax gives them no mass (e^-1000 is 0 in float32), so the target is the
        top-k distribution renormalised. The student is renormalised over those k classes only by a
        method with ``top_k`` (at most k: the dropped classes tie, so a larger one is refused).
        """
        files = self._load(epoch)
        if "logits" in files:  # every class stored: no top-k, or k not below the number of classes
            return self._rows("logits", index, epoch)
        values, classes = self._rows("top_values", index, epoch), self._rows("top_classes", index, epoch)
        out = (values.amin(dim=1, keepdim=True) - TOP_K_GAP).expand(len(values), self._classes).clone()
        return out.scatter_(1, classes, values)

    def confidence(self, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """``[B, 2]``: true-class and maximum probability of the views, from the full-precision logits."""
        return self._rows("confidence", index, epoch)

    def check(self, samples: int = 64, epochs: list[int] | None = None, seed: int = 0, device: str | torch.device = "cpu") -> dict:
        """Recompute ``samples`` random cached entries per built epoch and compare them with the stored ones.

        Returns the largest absolute difference per epoch and whether it is within what the cache's
        dtype can hold; a cache that fails was damaged or built by other code and should be deleted.
        """
        generator = torch.Generator().manual_seed(seed)
        report = {}
        for epoch in epochs if epochs is not None else self.epochs_built():
            index = torch.randperm(len(self.data), generator=generator)[:samples].sort().values
            fresh, stored = self.views_logits(index, epoch, device=device), self.logits(index, epoch)
            if "logits" not in self._load(epoch):  # a top-k shard: compare the classes it kept
                kept = self._rows("top_classes", index, epoch)
                fresh, stored = fresh.gather(1, kept), stored.gather(1, kept)
            difference = float((fresh - stored).abs().max()) if len(index) else 0.0
            # The model's own rounding (batches of other sizes), and for float16 its 11 significant bits.
            tolerance = 2e-4 + (2.0**-10 * float(fresh.abs().max()) if self.key.dtype == "float16" else 0.0)
            report[epoch] = {"samples": len(index), "max_abs_difference": difference, "ok": difference <= tolerance}
        return report


class ViewCachedTargets(TargetSource):
    """Teacher and original-student logits on the augmented views, read from :class:`ViewCache` shards.

    Built with the models, the transfer set, the student's preprocessing and the run's augmentation;
    :meth:`ensure` computes any epoch shard that is missing (the first run that needs one builds it).
    """

    takes_views = True
    def __init__(self, teachers: list[ViewCache], original: ViewCache | None, device: str | torch.device = "cpu"):
        self.teachers, self.original = teachers, original
        device = torch.device(device)
        for cache in self.caches:
            cache.read_device = device
        # On the CPU rows are read from the files by the batch's CPU indices; elsewhere by the device's.
        self.host_indices = device.type == "cpu"

    @classmethod
    def for_transfer(cls, root: Path, teachers: list[Model], original: Model | None, data: ImageData, student_preprocess: Preprocess, augment: str, seed: int, dtype: str = "float16", top_k: int = 0, device: str | torch.device = "cpu") -> "ViewCachedTargets":
        make = lambda model: ViewCache(root, model, data, student_preprocess, augment, seed, dtype, top_k)  # noqa: E731
        return cls([make(t) for t in teachers], make(original) if original is not None else None, device)

    @property
    def caches(self) -> list[ViewCache]:
        return [*self.teachers, *([self.original] if self.original is not None else [])]

    def ensure(self, epochs: int, batch_size: int = 256, device: str | torch.device = "cpu", log=None) -> int:
        """Build every missing shard of epochs 0..epochs-1; returns how many were built."""
        built = 0
        for cache in self.caches:
            for epoch in range(epochs):
                if not cache.has(epoch):
                    if log is not None:
                        log(f"caching {cache.model.name} on the views of epoch {epoch + 1}/{epochs}")
                    built += cache.build(epoch, batch_size, device)
        return built

    def describe(self) -> dict:
        key = self.caches[0].key if self.caches else None
        return {"dtype": key and key.dtype, "top_k": key and key.top_k, "bytes": sum(c.nbytes() for c in self.caches), "keys": [c.key.digest for c in self.caches]}

    def get(self, indices, images, epoch: int = 0):
        device = images.device
        confidence = None
        if self.teachers and self.original is not None:  # what DP routes on: the original student first, as in route()
            confidence = torch.stack([c.confidence(indices, epoch) for c in (self.original, *self.teachers)]).to(device)
        return BatchTargets(
            torch.stack([t.logits(indices, epoch) for t in self.teachers]).to(device) if self.teachers else None,
            self.original.logits(indices, epoch).to(device) if self.original is not None else None,
            routing_confidence=confidence,
        )
