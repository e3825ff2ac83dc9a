"""Augmentation of transfer batches: the paper's recipe, replayable sample by sample.

``augment="paper"`` turns each transfer batch into a *view* that the teacher, the original
student and the student all see (function matching): the images are framed at the student's
input size (its crop and resize, :meth:`Preprocess.frame`), augmented here as one batch tensor
on the device the models run on, and then each model prepares the view its own way (resize to
its own input size, channels, its own normalisation; :meth:`Model.for_views`).

- Three channels, as in the authors' code: horizontal flip (p 0.5); colour distortion (p 0.8)
  with brightness, contrast and saturation factors uniform in [0.2, 1.8] and a hue shift
  uniform in [-0.2, 0.2], applied in a random order per sample (torchvision's ``ColorJitter``
  semantics); grayscale (p 0.2).
- One channel (Fashion-MNIST), where colour means nothing: horizontal flip (p 0.5) and a
  random shift of up to a tenth of the side in each direction with zeros shifted in (pad and
  crop back), 3 pixels on 28×28 images.

Every random number is a pure function of (seed, epoch, sample index): a counter-based hash in
int64 tensor arithmetic that never overflows, so the same sample gets the same view in any batch
position, batch size, process or device, and :meth:`Augmentation.sample` materialises a batch's
parameters as a small dict of tensors that :meth:`Augmentation.apply` replays exactly.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .errors import ConfigError

AUGMENTS = ("none", "paper")

# torchvision's ColorJitter(0.8, 0.8, 0.8, 0.2) inside RandomApply(p=0.8), RandomGrayscale(p=0.2).
FLIP_P = 0.5
JITTER_P = 0.8
GRAYSCALE_P = 0.2
JITTER_STRENGTH = 0.8  # brightness, contrast, saturation factors in [1 - 0.8, 1 + 0.8]
HUE_STRENGTH = 0.2  # hue shift in [-0.2, 0.2] of a full turn
SHIFT_FRACTION = 0.1  # one channel: shift by up to this share of the side
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale
COLOUR_OPS = ("brightness", "contrast", "saturation", "hue")

_MASK32 = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B  # below 2**27: a 32-bit value times it stays below 2**59, no int64 overflow
# One constant per random quantity, so that each one is an independent stream.
_STREAMS = {
    name: number * 0x9E3779B1 & _MASK32
    for number, name in enumerate(("flip", "jitter", "brightness", "contrast", "saturation", "hue", "order0", "order1", "order2", "order3", "grayscale", "shift_y", "shift_x"), 1)
}


def check_augment(augment: str, where: str = "augment") -> str:
    if augment not in AUGMENTS:
        raise ConfigError(f"{where} must be one of {', '.join(AUGMENTS)}; got {augment!r}")
    return augment


# --------------------------------------------------------------------------- counter-based random numbers


def _mix32(x):
    """A 32-bit integer hash (xor-shift-multiply, three rounds); works on Python ints and int64 tensors alike."""
    x = ((x >> 16) ^ x) * _MULTIPLIER & _MASK32
    x = ((x >> 16) ^ x) * _MULTIPLIER & _MASK32
    return (x >> 16) ^ x


def _fold32(value: int) -> int:
    value = int(value) & 0xFFFFFFFFFFFFFFFF
    return (value ^ (value >> 32)) & _MASK32


def uniform(seed: int, epoch: int, index: torch.Tensor, stream: str) -> torch.Tensor:
    """Uniform floats in [0, 1), one per sample index: a pure function of (seed, epoch, index, stream).

    24 random bits each, exactly representable in float32, so the numbers are the same on every
    device. ``index`` is an integer tensor of sample indices (below 2**32).
    """
    key = _mix32(_mix32(_fold32(seed) ^ _STREAMS[stream]) ^ _fold32(epoch))
    counter = index.to(torch.int64) & _MASK32
    bits = _mix32(_mix32(counter) ^ key)
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


# --------------------------------------------------------------------------- colour operations (float images in [0, 1])


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` → ``[B, 1, H, W]`` luma."""
    red, green, blue = images.unbind(1)
    return (LUMA[0] * red + LUMA[1] * green + LUMA[2] * blue).unsqueeze(1)


def _per_sample(factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Each image scaled by its factor (0: black, 1: unchanged)."""
    return (images * _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Each image blended with the mean of its grayscale (0: flat grey, 1: unchanged)."""
    mean = grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)
    factor = _per_sample(factor)
    return (factor * images + (1.0 - factor) * mean).clamp_(0.0, 1.0)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Each image blended with its grayscale (0: grayscale, 1: unchanged)."""
    factor = _per_sample(factor)
    return (factor * images + (1.0 - factor) * grayscale(images)).clamp_(0.0, 1.0)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each image's hue turned by its shift (a share of the full turn, in [-0.5, 0.5]), through HSV."""
    red, green, blue = images.unbind(1)
    value, _ = images.max(dim=1)
    chroma = value - images.min(dim=1).values
    has_hue = chroma > 0
    safe_chroma = torch.where(has_hue, chroma, torch.ones_like(chroma))
    # Hue in sixths of a turn: measured from the channel that is largest.
    hue = torch.where(
        value == red,
        (green - blue) / safe_chroma,
        torch.where(value == green, 2.0 + (blue - red) / safe_chroma, 4.0 + (red - green) / safe_chroma),
    )
    hue = torch.where(has_hue, hue / 6.0, torch.zeros_like(hue))
    saturation = chroma / torch.where(value > 0, value, torch.ones_like(value))
    hue = torch.remainder(hue + shift.view(-1, 1, 1), 1.0)
    # Back to RGB: channel n ∈ (5, 3, 1) is v − v·s·clamp(min(k, 4 − k), 0, 1) with k = (n + 6h) mod 6.
    sixths = (hue * 6.0).unsqueeze(1)
    offsets = torch.tensor([5.0, 3.0, 1.0], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    k = torch.remainder(offsets + sixths, 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    value, saturation = value.unsqueeze(1), saturation.unsqueeze(1)
    return value - value * saturation * ramp


_ADJUST = {"brightness": adjust_brightness, "contrast": adjust_contrast, "saturation": adjust_saturation, "hue": adjust_hue}


# --------------------------------------------------------------------------- the augmentation


def shift_limit(height: int, width: int) -> int:
    """How far (in pixels) a one-channel view may be shifted each way: a tenth of the shorter side, at least 1."""
    return max(1, round(SHIFT_FRACTION * min(height, width)))


class Augmentation:
    """The ``paper`` augmentation with counter-based randomness keyed by ``seed``.

    ``augmentation(views, index, epoch)`` augments a batch of framed views (float, in [0, 1],
    ``[B, C, H, W]`` with C 1 or 3) of the samples ``index`` in ``epoch``. The same call with
    :meth:`sample` then :meth:`apply` lets a caller keep the parameters and replay the view.
    """

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def __repr__(self) -> str:
        return f"Augmentation(seed={self.seed})"

    def sample(self, index: torch.Tensor, epoch: int, shape: Sequence[int]) -> dict[str, torch.Tensor]:
        """The parameters of the views of samples ``index`` in ``epoch`` for images of ``shape`` ``[B, C, H, W]``.

        One row per sample, on ``index``'s device: ``flip`` (bool) always; for three channels
        ``jitter`` and ``grayscale`` (bool), ``brightness``, ``contrast``, ``saturation`` (factors),
        ``hue`` (shift) and ``order`` (``[B, 4]``, the colour operations' order as indices into
        ``COLOUR_OPS``); for one channel ``shift_y``, ``shift_x`` (int64 pixels).
        """
        channels, height, width = int(shape[1]), int(shape[2]), int(shape[3])
        check_channels(channels)
        index = torch.as_tensor(index).reshape(-1)

        def draw(stream: str) -> torch.Tensor:
            return uniform(self.seed, epoch, index, stream)

        params = {"flip": draw("flip") < FLIP_P}
        if channels == 1:
            limit = shift_limit(height, width)
            for axis in ("shift_y", "shift_x"):
                params[axis] = (draw(axis) * (2 * limit + 1)).to(torch.int64) - limit
            return params
        params["jitter"] = draw("jitter") < JITTER_P
        for name in ("brightness", "contrast", "saturation"):
            params[name] = 1.0 - JITTER_STRENGTH + 2.0 * JITTER_STRENGTH * draw(name)
        params["hue"] = -HUE_STRENGTH + 2.0 * HUE_STRENGTH * draw("hue")
        keys = torch.stack([draw(f"order{slot}") for slot in range(4)], dim=1)
        params["order"] = torch.argsort(keys, dim=1, stable=True)
        params["grayscale"] = draw("grayscale") < GRAYSCALE_P
        return params

    def apply(self, views: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Replay the views described by ``params`` (from :meth:`sample`) on the framed batch ``views``."""
        check_channels(views.shape[1])
        if views.shape[1] == 1:
            return _flip_and_shift(views, params)
        return _flip_and_colour(views, params)

    def __call__(self, views: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        # Parameters are drawn where the indices are (the data's CPU indices in the engine: the
        # grouping by colour order then needs no read-back from the GPU) and moved once.
        return self.apply(views, self.sample(index, epoch, views.shape))


def check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ConfigError(f"augment='paper' works on 1-channel (grayscale) or 3-channel (RGB) images; these have {channels} channels: use augment='none'")


def _flip_and_shift(views: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """One channel: flip, then shift with zeros shifted in, as one gather per batch."""
    batch, channels, height, width = views.shape
    device = views.device
    flip = params["flip"].to(device, non_blocking=True).view(-1, 1)
    shift_y = params["shift_y"].to(device, non_blocking=True).view(-1, 1)
    shift_x = params["shift_x"].to(device, non_blocking=True).view(-1, 1)
    rows = torch.arange(height, device=device).view(1, -1) + shift_y  # [B, H] source rows
    cols = torch.arange(width, device=device).view(1, -1) + shift_x  # [B, W] source columns of the flipped image
    inside = ((rows >= 0) & (rows < height)).unsqueeze(2) & ((cols >= 0) & (cols < width)).unsqueeze(1)  # [B, H, W]
    cols = torch.where(flip, width - 1 - cols, cols)
    flat = rows.clamp(0, height - 1).unsqueeze(2) * width + cols.clamp(0, width - 1).unsqueeze(1)  # [B, H, W]
    gathered = views.reshape(batch, channels, height * width).gather(2, flat.view(batch, 1, -1).expand(-1, channels, -1))
    return gathered.view(batch, channels, height, width) * inside.unsqueeze(1).to(views.dtype)


def _flip_and_colour(views: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Three channels: flip, colour distortion in each sample's own order, grayscale."""
    device = views.device
    flip = params["flip"].to(device, non_blocking=True).view(-1, 1, 1, 1)
    out = torch.where(flip, views.flip(-1), views)
    # Which samples take which operation at each of the four steps: decided on the parameters'
    # device (the CPU in the engine), so the GPU never has to report a count back.
    order, jitter = params["order"], params["jitter"]
    factors = {name: params[name].to(device, non_blocking=True) for name in COLOUR_OPS}
    for slot in range(4):
        for op, name in enumerate(COLOUR_OPS):
            chosen = torch.nonzero(jitter & (order[:, slot] == op)).view(-1)
            if chosen.numel() == 0:
                continue
            chosen = chosen.to(device, non_blocking=True)
            out.index_copy_(0, chosen, _ADJUST[name](out.index_select(0, chosen), factors[name].index_select(0, chosen)))
    gray = params["grayscale"].to(device, non_blocking=True).view(-1, 1, 1, 1)
    return torch.where(gray, grayscale(out).expand_as(out), out)
