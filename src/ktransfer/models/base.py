"""A model as ktransfer sees it: a module, its own preprocessing, and where its features are."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError


@functools.lru_cache(maxsize=64)
def _normalisation(mean: tuple, std: tuple, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as [1, C, 1, 1] tensors, made once per device: building them on a GPU every batch
    is a host-to-device copy that makes the CPU wait for the GPU. Made outside inference mode, so the
    tensors a prediction pass first made also serve training."""
    with torch.inference_mode(False):
        return (torch.tensor(mean, dtype=dtype, device=device).view(1, -1, 1, 1), torch.tensor(std, dtype=dtype, device=device).view(1, -1, 1, 1))


@dataclass(frozen=True)
class Preprocess:
    """How one model wants its input: every model gets the same image prepared its own way.

    uint8 images are scaled to [0, 1]; then center-cropped to the fraction ``crop_pct`` of
    their height and width (if set: timm's eval crop, applied to the square raw image), resized
    to ``input_size`` (if set), channels repeated to ``in_chans`` (greyscale to colour), and
    normalised with ``mean``/``std``. The defaults leave float input untouched.
    """

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    input_size: tuple[int, int] | None = None
    in_chans: int | None = None
    interpolation: str = "bilinear"
    crop_pct: float | None = None

    @property
    def needs_images(self) -> bool:
        """Whether any step works on images ``[N, C, H, W]``: crop, resize, channels, per-channel normalisation."""
        return self != Preprocess(interpolation=self.interpolation)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 and self.needs_images:
            raise ModelError(f"this preprocessing works on images [N, C, H, W]; got input of shape {tuple(images.shape)} (give a model that takes such input without image preprocessing)")
        x = self.frame(images)
        if self.in_chans is not None and x.shape[1] != self.in_chans:
            if x.shape[1] != 1:
                raise ModelError(f"cannot turn {x.shape[1]}-channel images into the {self.in_chans} channels the model expects")
            x = x.expand(-1, self.in_chans, -1, -1)
        if self.mean == (0.0,) and self.std == (1.0,):
            return x
        mean, std = _normalisation(tuple(self.mean), tuple(self.std), x.dtype, x.device)
        return (x - mean) / std

    def frame(self, images: torch.Tensor) -> torch.Tensor:
        """The geometric part: float in [0, 1] (from uint8), the crop, the resize to ``input_size``.

        Augmentation works on this frame of the student's; each model then prepares the
        augmented view with :meth:`for_views`.
        """
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        if self.crop_pct is not None and self.crop_pct < 1:
            height, width = x.shape[-2:]
            crop_h, crop_w = max(1, round(height * self.crop_pct)), max(1, round(width * self.crop_pct))
            top, left = (height - crop_h) // 2, (width - crop_w) // 2
            x = x[..., top : top + crop_h, left : left + crop_w]
        if self.input_size is not None and tuple(x.shape[-2:]) != tuple(self.input_size):
            x = F.interpolate(x, size=self.input_size, mode=self.interpolation, antialias=self.interpolation in ("bilinear", "bicubic"), align_corners=False if self.interpolation != "nearest" else None)
        return x

    def for_views(self) -> "Preprocess":
        """This preprocessing for input that is already framed (another model's :meth:`frame`, augmented): no second crop."""
        return dataclasses.replace(self, crop_pct=None)

    def describe(self) -> str:
        return repr(self)


@dataclass
class Model:
    """A classifier ready for transfer.

    ``module`` maps preprocessed images to logits. ``forward_features``/``forward_head`` are
    used where the module has them (zoo and timm models: for timm, whose ``forward_features``
    is unpooled, the features are ``forward_head(..., pre_logits=True)``); otherwise the input of
    the final ``nn.Linear`` is taken as the features (see :meth:`features_and_logits`). ``feature_layer``
    names a submodule (as in ``named_modules()``) whose flattened output are the features instead.
    """

    module: nn.Module
    name: str
    preprocess: Preprocess = field(default_factory=Preprocess)
    family: str = ""
    spec: str = ""
    _fingerprint: str | None = field(default=None, repr=False, compare=False)
    feature_layer: str | None = None
    # The spec that builds this module afresh, where it differs from ``spec`` (a checkpoint records it).
    architecture: str | None = None
    # The names of its classes, where the model came with them (an adapted head, a checkpoint).
    class_names: list[str] | None = None

    def rebuilt(self, module: nn.Module | None = None, **changes) -> "Model":
        """This model with another ``module`` (a trained copy, a soup) or other fields: the one way to rebuild one.

        Every field not changed is kept; the fingerprint is recomputed from the new module unless
        ``_fingerprint`` is given (the same module under another name)."""
        return dataclasses.replace(self, **{"module": self.module if module is None else module, "_fingerprint": None, **changes})

    @property
    def num_classes(self) -> int:
        head = getattr(self.module, "num_classes", None)
        if isinstance(head, int):
            return head
        last = final_linear(self.module)
        if last is None:
            raise ModelError(f"{self.name}: cannot tell its number of classes; give the module a `num_classes` attribute")
        return last.out_features

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(self.preprocess(images))

    def for_views(self) -> "Model":
        """The same module (shared, not copied) taking augmented views framed for another model (see ``ktransfer.augment``)."""
        return self.rebuilt(preprocess=self.preprocess.for_views())

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocess(images)
        module = self.module
        if self.feature_layer is not None:
            return self._named_layer_features_and_logits(x)
        if hasattr(module, "forward_features") and hasattr(module, "forward_head"):
            features = module.forward_features(x)
            if not takes_pre_logits(module):  # the zoo's forward_features is already pooled
                return features, module.forward_head(features)
            # timm: forward_features is the map before pooling; forward_head(..., pre_logits=True)
            # pools it (and applies the head's norm), which gives the penultimate features.
            feature_map, features = features, module.forward_head(features, pre_logits=True)
            head = timm_linear_head(module)
            return features, head(features) if head is not None else module.forward_head(feature_map)
        last = final_linear(module)
        if last is None:
            raise ModelError(f"{self.name}: has no forward_features/forward_head and no final nn.Linear whose input could serve as features")
        captured = {}
        handle = last.register_forward_pre_hook(lambda _m, args: captured.__setitem__("features", args[0]))
        try:
            logits = module(x)
        finally:
            handle.remove()
        return captured["features"], logits

    def _named_layer_features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            layer = self.module.get_submodule(self.feature_layer)
        except AttributeError:
            names = [name for name, _ in self.module.named_modules() if name]
            raise ModelError(f"{self.name}: has no layer {self.feature_layer!r} to take features from; its layers: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}") from None
        captured = {}
        handle = layer.register_forward_hook(lambda _m, _args, output: captured.__setitem__("features", output))
        try:
            logits = self.module(x)
        finally:
            handle.remove()
        if not isinstance(captured.get("features"), torch.Tensor):
            raise ModelError(f"{self.name}: layer {self.feature_layer!r} did not produce a tensor in the forward pass; name another layer")
        return captured["features"].flatten(1), logits

    def fingerprint(self) -> str:
        """A hash of the weights, buffers and preprocessing; frozen models only (it is cached)."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=10)
            digest.update(type(self.module).__qualname__.encode())
            digest.update(self.preprocess.describe().encode())
            for key, tensor in self.module.state_dict().items():
                digest.update(key.encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


def takes_pre_logits(module: nn.Module) -> bool:
    """Whether ``module.forward_head`` accepts ``pre_logits`` (timm's models do; the zoo's do not)."""
    try:
        return "pre_logits" in inspect.signature(module.forward_head).parameters
    except (TypeError, ValueError):
        return False


def timm_linear_head(module: nn.Module) -> nn.Linear | None:
    """The ``nn.Linear`` that ``get_classifier()`` names, which maps timm's pre-logits to the logits.

    ``None`` where there is no single linear classifier (distilled ViTs have two heads): then the
    caller runs ``forward_head`` once more on the feature map.
    """
    get_classifier = getattr(module, "get_classifier", None)
    if not callable(get_classifier):
        return None
    try:
        head = get_classifier()
    except Exception:  # noqa: BLE001 - any failure means: no single linear head to use
        return None
    return head if isinstance(head, nn.Linear) else None


def final_linear(module: nn.Module) -> nn.Linear | None:
    """The last ``nn.Linear`` registered in the module, which for classifiers is the head."""
    last = None
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            last = sub
    return last


def as_model(model, name: str) -> Model:
    if isinstance(model, Model):
        return model
    if isinstance(model, nn.Module):
        return Model(model, name)
    raise ModelError(f"{name}: expected a torch nn.Module or ktransfer.Model; got {type(model).__name__}")
