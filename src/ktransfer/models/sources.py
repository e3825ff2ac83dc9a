"""Model sources beyond the zoo: timm, torchvision and any Python factory of an ``nn.Module``.

Every spec has the form ``SOURCE:NAME`` with optional options after a ``?``::

    timm:resnet50                                 pretrained weights (timm fetches them)
    timm:resnet50?file=weights.safetensors        weights from a local file
    timm:test_vit?pretrained=false&img_size=32    random init; other options go to timm.create_model
    torchvision:resnet18?weights=IMAGENET1K_V1
    mypackage.models:make_net?width=64            any factory (or nn.Module object) importable from Python

Options every source understands: ``file`` (weights to load; safetensors or a weights-only
``torch.save`` file), ``num_classes`` (a new classification layer of that size), and the
preprocessing overrides ``input_size`` (``224`` or ``224x192``), ``mean``/``std`` (comma lists),
``interpolation``, ``crop_pct`` and ``in_chans``. Checkpoint files are in :mod:`.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import re
import sys
from typing import Any

from torch import nn

from ..errors import ModelError
from .base import Model, Preprocess
from .registry import MODEL_SOURCES, register_source
from .weights import classifier, fit_head, load_weights, read_state_dict  # noqa: F401  (classifier, fit_head: part of this module's interface)

PREPROCESS_OPTIONS = ("input_size", "mean", "std", "interpolation", "crop_pct", "in_chans")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INSTALL_HINT = "pip install 'ktransfer[timm]'"
PYTHON_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


# ---------------------------------------------------------------------------------------- specs


def parse_value(text: str) -> Any:
    """An option's value as the Python literal it looks like: bool, None, int, float, else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes"):
        return True
    if lowered in ("false", "no"):
        return False
    if lowered == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def split_options(rest: str, spec: str = "") -> tuple[str, dict[str, Any]]:
    """``NAME?a=1&b=x`` -> ``("NAME", {"a": 1, "b": "x"})``."""
    name, _, query = rest.partition("?")
    options: dict[str, Any] = {}
    for pair in filter(None, query.split("&")):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ModelError(f"model spec {spec or rest!r}: option {pair!r} is not KEY=VALUE (write options as NAME?key=value&key=value)")
        options[key.strip()] = value if key.strip() in ("file", "weights") else parse_value(value)
    return name.strip(), options


def join_options(name: str, options: dict[str, Any]) -> str:
    if not options:
        return name
    return name + "?" + "&".join(f"{k}={_format_value(v)}" for k, v in options.items())


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def _floats(value: Any, key: str, spec: str) -> tuple[float, ...]:
    try:
        if isinstance(value, (int, float)):
            return (float(value),)
        return tuple(float(v) for v in str(value).split(","))
    except ValueError:
        raise ModelError(f"model spec {spec!r}: {key} must be a number or comma-separated numbers; got {value!r}") from None


def _size(value: Any, spec: str) -> tuple[int, int]:
    text = str(value).lower()
    parts = text.split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) == 3:  # timm's (channels, height, width)
        sizes = sizes[1:]
    if len(sizes) != 2 or min(sizes) < 1:
        raise ModelError(f"model spec {spec!r}: input_size must be N or HxW (e.g. 224 or 224x192); got {value!r}")
    return sizes[0], sizes[1]


def apply_preprocess_options(base: Preprocess, options: dict[str, Any], spec: str) -> Preprocess:
    """The model's own preprocessing with the user's overrides from the spec."""
    changes: dict[str, Any] = {}
    if "input_size" in options:
        changes["input_size"] = _size(options["input_size"], spec)
    for key in ("mean", "std"):
        if key in options:
            changes[key] = _floats(options[key], key, spec)
    if "interpolation" in options:
        if options["interpolation"] not in INTERPOLATIONS:
            raise ModelError(f"model spec {spec!r}: interpolation must be one of {', '.join(INTERPOLATIONS)}; got {options['interpolation']!r}")
        changes["interpolation"] = options["interpolation"]
    if "crop_pct" in options:
        crop = options["crop_pct"]
        if not isinstance(crop, (int, float)) or not 0 < crop <= 1:
            raise ModelError(f"model spec {spec!r}: crop_pct must lie in (0, 1]; got {crop!r}")
        changes["crop_pct"] = float(crop)
    if "in_chans" in options:
        changes["in_chans"] = int(options["in_chans"])
    return dataclasses.replace(base, **changes) if changes else base


def _pop_common(options: dict[str, Any]) -> tuple[str | None, int | None, dict[str, Any]]:
    """Split off ``file``, ``num_classes`` and the preprocessing overrides; the rest goes to the builder."""
    file = options.pop("file", None)
    num_classes = options.pop("num_classes", None)
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1):
        raise ModelError(f"num_classes must be a positive integer; got {num_classes!r}")
    overrides = {k: options.pop(k) for k in PREPROCESS_OPTIONS if k in options}
    return file, num_classes, overrides


def interpolation_name(value: Any) -> str:
    name = str(getattr(value, "value", value)).lower()
    return name if name in INTERPOLATIONS else "bilinear"


def guess_family(module: nn.Module) -> str:
    """cnn, transformer or mlp, from the class name: the families the analyses group by."""
    name = type(module).__name__.lower()
    if any(word in name for word in ("transformer", "vit", "swin", "deit", "beit", "eva", "former", "xcit", "cait")):
        return "transformer"
    if any(word in name for word in ("mixer", "mlp", "resmlp")):
        return "mlp"
    return "cnn"


def load_weights_file(module: nn.Module, file: str, spec: str) -> None:
    load_weights(module, read_state_dict(file), f"{file} (for {spec})")


# ---------------------------------------------------------------------------- timm


def require(package: str, source: str):
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(package)
    except Exception as exc:  # noqa: BLE001 - a broken install (e.g. torchvision built for another torch) reads the same to the user
        raise ModelError(f"{source} models need {package.split('.')[0]}, which could not be imported ({type(exc).__name__}: {exc}); install it with: {INSTALL_HINT}") from exc


def timm_preprocess(module: nn.Module, kwargs: dict[str, Any]) -> Preprocess:
    data = require("timm.data", "timm")
    config = data.resolve_data_config({}, model=module)
    channels, height, width = config["input_size"]
    if "img_size" in kwargs:  # timm builds the model for this size but leaves its pretrained config as it was
        size = kwargs["img_size"]
        height, width = (size, size) if isinstance(size, int) else tuple(size)
    return Preprocess(
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        input_size=(int(height), int(width)),
        in_chans=int(kwargs.get("in_chans", channels)),
        interpolation=interpolation_name(config.get("interpolation", "bicubic")),
        crop_pct=float(config["crop_pct"]) if config.get("crop_pct") else None,
    )


def preprocess_from_config(config: dict) -> Preprocess:
    """From a timm-style config dict (``input_size`` as (C, H, W), mean, std, interpolation, crop_pct), without timm."""
    channels, height, width = config.get("input_size", (3, None, None))
    return Preprocess(
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config.get("std", (1.0,) * len(config["mean"]))),
        input_size=(int(height), int(width)) if height else None,
        in_chans=int(channels),
        interpolation=interpolation_name(config.get("interpolation", "bilinear")),
        crop_pct=float(config["crop_pct"]) if config.get("crop_pct") else None,
    )


@register_source("timm")
def timm_model(rest: str, **_) -> Model:
    spec = f"timm:{rest}"
    name, options = split_options(rest, spec)
    file, num_classes, overrides = _pop_common(options)
    pretrained = bool(options.pop("pretrained", file is None))
    timm = require("timm", "timm")
    kwargs = dict(options)
    if num_classes is not None and not file:
        kwargs["num_classes"] = num_classes
    try:
        module = timm.create_model(name, pretrained=pretrained and not file, **kwargs)
    except Exception as exc:  # noqa: BLE001 - timm raises many kinds; each becomes one line that says what to do
        if "Unknown model" in str(exc) or "unknown model" in str(exc).lower():
            raise ModelError(f"timm has no model {name!r}; list them with: python -c \"import timm; print(timm.list_models('*{name[:6]}*'))\"") from exc
        if pretrained and not file:
            raise ModelError(
                f"could not get pretrained weights for timm:{name} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                f"point at a local weights file with timm:{name}?file=PATH, or use timm:{name}?pretrained=false for random init"
            ) from exc
        raise ModelError(f"timm could not build {name!r} with {kwargs}: {exc}") from exc
    if file:
        load_weights_file(module, file, spec)
        if num_classes is not None and classifier(module).out_features != num_classes:
            fit_head(module, num_classes)
    module.eval()
    preprocess = apply_preprocess_options(timm_preprocess(module, kwargs), overrides, spec)
    return Model(module, name, preprocess, guess_family(module), spec)


# ---------------------------------------------------------------------------- torchvision


@register_source("torchvision")
def torchvision_model(rest: str, **_) -> Model:
    spec = f"torchvision:{rest}"
    name, options = split_options(rest, spec)
    file, num_classes, overrides = _pop_common(options)
    weights_name = options.pop("weights", None)
    pretrained = bool(options.pop("pretrained", file is None and weights_name is None)) or weights_name is not None
    models = require("torchvision.models", "torchvision")
    weights = None
    if pretrained and not file:
        try:
            enum = models.get_model_weights(name)
            weights = enum.DEFAULT if weights_name in (None, "DEFAULT") else enum[str(weights_name)]
        except (ValueError, KeyError) as exc:
            raise ModelError(f"torchvision has no weights {weights_name or 'DEFAULT'!r} for {name!r}: {exc}; see torchvision.models.get_model_weights('{name}')") from exc
    kwargs = dict(options)
    if num_classes is not None and weights is None and not file:
        kwargs["num_classes"] = num_classes
    try:
        module = models.get_model(name, weights=weights, **kwargs)
    except ValueError as exc:
        raise ModelError(f"torchvision has no model {name!r} ({exc}); list them with: python -c \"import torchvision; print(torchvision.models.list_models())\"") from exc
    except Exception as exc:  # noqa: BLE001 - a failed download among others
        raise ModelError(f"could not build torchvision:{name} ({type(exc).__name__}: {exc}); use ?file=PATH for local weights or ?pretrained=false") from exc
    if file:
        load_weights_file(module, file, spec)
    if num_classes is not None and classifier(module).out_features != num_classes:
        fit_head(module, num_classes)
    module.eval()
    if weights is not None:
        transform = weights.transforms()
        crop, resize = transform.crop_size[0], transform.resize_size[0]
        base = Preprocess(tuple(transform.mean), tuple(transform.std), (crop, crop), 3, interpolation_name(transform.interpolation), crop / resize)
    else:  # torchvision's ImageNet recipe: resize to 256, center-crop 224
        base = Preprocess(IMAGENET_MEAN, IMAGENET_STD, (224, 224), 3, "bilinear", 224 / 256)
    return Model(module, name, apply_preprocess_options(base, overrides, spec), guess_family(module), spec)


# ---------------------------------------------------------------------------- Python factories


def import_object(target: str, spec: str):
    """``package.module:attr.sub`` -> the object; the current directory is searched too, like ``python -m``."""
    module_name, _, attr_path = target.partition(":")
    if not module_name or not attr_path:
        raise ModelError(f"model spec {spec!r}: write a Python factory as package.module:factory")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        hint = "" if "." in module_name else f" (if {module_name!r} was meant as a model source: the sources are {', '.join(sorted(MODEL_SOURCES))})"
        raise ModelError(f"model spec {spec!r}: cannot import {module_name!r} ({exc}); install it or put its folder on PYTHONPATH{hint}") from exc
    except Exception as exc:  # noqa: BLE001 - an error inside the user's module
        raise ModelError(f"model spec {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"model spec {spec!r}: {module_name} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    return obj


def _accepts(fn, keyword: str) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == keyword or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


@register_source("python")
def python_model(target: str, **_) -> Model:
    """``python:package.module:factory?kw=value`` (the ``python:`` prefix may be left out)."""
    spec = target
    target, options = split_options(target, spec)
    file, num_classes, overrides = _pop_common(options)
    obj = import_object(target, spec)
    if isinstance(obj, (nn.Module, Model)):
        if options:
            raise ModelError(f"model spec {spec!r}: {target} is a model object, not a factory, so it takes no options {sorted(options)}")
        built = obj
    elif callable(obj):
        kwargs = dict(options)
        if num_classes is not None and not file and _accepts(obj, "num_classes"):
            kwargs["num_classes"] = num_classes
        try:
            built = obj(**kwargs)
        except TypeError as exc:
            raise ModelError(f"model spec {spec!r}: calling {target} with {kwargs} failed: {exc}") from exc
    else:
        raise ModelError(f"model spec {spec!r}: {target} is a {type(obj).__name__}, not an nn.Module or a function that returns one")
    if isinstance(built, Model):
        module, base, family = built.module, built.preprocess, built.family
    elif isinstance(built, nn.Module):
        module, family = built, guess_family(built)
        config = getattr(built, "pretrained_cfg", None)
        base = preprocess_from_config(config) if isinstance(config, dict) and config.get("mean") else Preprocess()
    else:
        raise ModelError(f"model spec {spec!r}: {target} returned a {type(built).__name__}; it must return an nn.Module or a ktransfer.Model")
    if file:
        load_weights_file(module, file, spec)
    if num_classes is not None and classifier(module).out_features != num_classes:
        fit_head(module, num_classes)
    module.eval()
    return Model(module, target.rpartition(":")[2], apply_preprocess_options(base, overrides, spec), family, spec)


def architecture_spec(spec: str) -> str:
    """The spec that builds the same architecture without fetching or loading any weights."""
    scheme, _, rest = spec.partition(":")
    if scheme in ("timm", "torchvision"):
        name, options = split_options(rest, spec)
        for key in ("file", "weights", "pretrained"):
            options.pop(key, None)
        return f"{scheme}:{join_options(name, {**options, 'pretrained': False})}"
    if scheme == "python" or (PYTHON_MODULE.fullmatch(scheme) and scheme not in MODEL_SOURCES):
        name, options = split_options(rest if scheme == "python" else spec, spec)
        options.pop("file", None)
        return join_options(name, options)
    return spec
