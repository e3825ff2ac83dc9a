"""``hf:NAME_OR_PATH``: an image classifier from Hugging Face ``transformers``, with its image processor as ktransfer's preprocessing.

NAME_OR_PATH is a folder written by ``save_pretrained`` or a Hub name found in the local Hugging Face
cache (or downloaded, where the Hub can be reached and ``HF_HUB_OFFLINE`` is not set). The model is
``AutoModelForImageClassification``; its processor's resize, crop, mean and std become a
:class:`~ktransfer.Preprocess`, so an HF model and a timm or zoo model see the same images, each
prepared its own way. Needs the ``hf`` extra (``pip install 'ktransfer[hf]'``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from ..extras import require
from .base import Model, Preprocess
from .registry import register_source
from .sources import _pop_common, apply_preprocess_options, fit_head, guess_family, load_weights_file, split_options

# PIL's resampling filters by their number, as image processors store them.
_RESAMPLE = {0: "nearest", 1: "bilinear", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}  # 1 LANCZOS, 4 BOX, 5 HAMMING: the nearest kernel torch has


class HFImageClassifier(nn.Module):
    """An ``transformers`` image classifier as a module that maps pixel values to logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _load(transformers, kind: str, name: str, spec: str):
    loader = getattr(transformers, kind)
    try:
        return loader.from_pretrained(name)
    except OSError as exc:
        raise ModelError(
            f"{spec}: no {'model' if kind.startswith('AutoModel') else 'image processor'} found as a folder or in the local Hugging Face cache "
            f"({str(exc).splitlines()[0]}); give the folder of a save_pretrained model, or download it first where the Hub can be reached: "
            f"hf download {name}   (HF_HUB_OFFLINE=1 keeps transformers from trying the network)"
        ) from None


def processor_preprocess(processor, num_channels: int = 3) -> Preprocess:
    """The :class:`~ktransfer.Preprocess` of an image processor: its rescale, resize, crop, mean and std.

    A resize to a fixed height and width maps to ``input_size``; a shortest-edge resize with a
    ``crop_pct`` (ConvNeXt's and ResNet's processors), or a resize followed by a center crop, to
    ``crop_pct`` and the crop's size (ktransfer crops the square frame, then resizes, which for the
    square images it trains on is the same geometry)."""
    if getattr(processor, "do_rescale", True) and abs(float(getattr(processor, "rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
        raise ModelError(f"{type(processor).__name__} rescales pixels by {processor.rescale_factor}, not 1/255; ktransfer's preprocessing scales uint8 images to [0, 1]")
    size = _size_fields(getattr(processor, "size", None))
    crop_pct = None
    if "height" in size and "width" in size:
        input_size = (int(size["height"]), int(size["width"]))
    elif "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        input_size = (edge, edge)
        pct = getattr(processor, "crop_pct", None)
        if pct is not None and edge < 384:  # ConvNeXt's processors crop only below 384
            crop_pct = float(pct)
    else:
        raise ModelError(f"{type(processor).__name__}: cannot read its resize {size!r}; give input_size=H,W in the spec")
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None):
        crop = _size_fields(processor.crop_size)
        crop_size = (int(crop["height"]), int(crop["width"])) if "height" in crop else (int(crop["shortest_edge"]),) * 2
        crop_pct = crop_size[0] / input_size[0]
        input_size = crop_size
    if getattr(processor, "do_resize", True) is False:
        input_size, crop_pct = None, None
    normalise = getattr(processor, "do_normalize", True)
    mean = tuple(float(v) for v in processor.image_mean) if normalise else (0.0,)
    std = tuple(float(v) for v in processor.image_std) if normalise else (1.0,)
    resample = getattr(processor, "resample", 2)
    return Preprocess(mean=mean, std=std, input_size=input_size, in_chans=num_channels, interpolation=_RESAMPLE.get(int(getattr(resample, "value", resample)), "bilinear"), crop_pct=crop_pct)


def _size_fields(size) -> dict:
    """A processor's size as a plain dict of the fields it sets (a dict in older transformers, a SizeDict in newer)."""
    if size is None:
        return {}
    if isinstance(size, dict):
        return {k: v for k, v in size.items() if v is not None}
    return {k: getattr(size, k) for k in ("height", "width", "shortest_edge", "longest_edge") if getattr(size, k, None) is not None}


def class_names_of(config) -> list[str] | None:
    """The label names a config carries, unless they are transformers' placeholders (LABEL_0, ...)."""
    names = [str(config.id2label[i]) for i in range(config.num_labels)] if getattr(config, "id2label", None) else []
    if not names or all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        return None
    return names


@register_source("hf")
def hf_model(rest: str, **_: Any) -> Model:
    """``hf:NAME_OR_PATH[?num_classes=N&file=W&input_size=...]``."""
    spec = f"hf:{rest}"
    name, options = split_options(rest, spec)
    file, num_classes, overrides = _pop_common(options)
    if options:
        raise ModelError(f"{spec}: unknown option(s) {', '.join(sorted(options))}; hf: takes file, num_classes and the preprocessing options")
    transformers = require("transformers", "hf", "hf: models")
    model = _load(transformers, "AutoModelForImageClassification", name, spec)
    processor = _load(transformers, "AutoImageProcessor", name, spec)
    module = HFImageClassifier(model)
    module.processor = processor  # not a submodule: kept so that a trained student is saved with it (save_pretrained)
    if file:
        load_weights_file(module, file, spec)
    if num_classes is not None and num_classes != model.config.num_labels:
        fit_head(module, num_classes)
    module.eval()
    preprocess = apply_preprocess_options(processor_preprocess(processor, int(getattr(model.config, "num_channels", 3))), overrides, spec)
    family = guess_family(model)
    names = class_names_of(model.config) if num_classes in (None, model.config.num_labels) else None
    return Model(module, name.rstrip("/").rpartition("/")[2] or name, preprocess, family, spec, class_names=names)
