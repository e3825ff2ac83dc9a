"""The embedded zoo: six small classifiers of three families for 1x28x28 images.

Every zoo model exposes ``forward_features`` (pooled penultimate features) and
``forward_head`` (the classifier), as timm models do, so feature-based transfer
methods work on them without hooks.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ZOO_ARCHITECTURES: dict[str, tuple[str, Callable[..., nn.Module]]] = {}


def register_zoo(name: str, family: str):
    def wrap(cls):
        ZOO_ARCHITECTURES[name] = (family, cls)
        cls.zoo_name = name
        cls.family = family
        return cls

    return wrap


class ZooModel(nn.Module):
    """Common shape: features -> head. Subclasses define ``forward_features``."""

    num_features: int

    def __init__(self, num_classes: int, num_features: int):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = num_features
        self.head = nn.Linear(num_features, num_classes)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_zoo("mlp", "mlp")
class MLP(ZooModel):
    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28, hidden: int = 256):
        super().__init__(num_classes, 128)
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_chans * img_size * img_size, hidden),
            nn.GELU(),
            nn.Linear(hidden, 128),
            nn.GELU(),
        )

    def forward_features(self, x):
        return self.body(x)


@register_zoo("cnn", "cnn")
class SmallCNN(ZooModel):
    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28):
        super().__init__(num_classes, 128)
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, 16, 5, stride=2, padding=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(32 * ((img_size + 3) // 4) ** 2, 128),
            nn.ReLU(inplace=True),
        )

    def forward_features(self, x):
        return self.body(x)


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


@register_zoo("resnet", "cnn")
class SmallResNet(ZooModel):
    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28, widths=(16, 32)):
        super().__init__(num_classes, widths[-1])
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        blocks, in_ch = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(in_ch, w, stride=1 if i == 0 else 2))
            in_ch = w
        self.blocks = nn.Sequential(*blocks)

    def forward_features(self, x):
        return self.blocks(self.stem(x)).mean(dim=(2, 3))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float = 1e-1):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x):
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.fc2(F.gelu(self.fc1(self.norm(x))))
        return shortcut + (self.gamma * x).permute(0, 3, 1, 2)


@register_zoo("convnext", "cnn")
class SmallConvNeXt(ZooModel):
    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28, dim: int = 48, depth: int = 2):
        super().__init__(num_classes, dim)
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dim, 4, 4), LayerNorm2d(dim))
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward_features(self, x):
        return self.norm(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


@register_zoo("vit", "transformer")
class SmallViT(ZooModel):
    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28, patch: int = 7, dim: int = 64, depth: int = 3, num_heads: int = 4, mlp_ratio: float = 2.0):
        super().__init__(num_classes, dim)
        self.patch_embed = PatchEmbed(in_chans, dim, patch)
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward_features(self, x):
        x = self.blocks(self.patch_embed(x) + self.pos_embed)
        return self.norm(x.mean(dim=1))


class MixerBlock(nn.Module):
    def __init__(self, dim: int, tokens: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = Mlp(tokens, token_hidden)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = Mlp(dim, channel_hidden)

    def forward(self, x):
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


@register_zoo("mixer", "mlp")
class SmallMixer(ZooModel):
    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28, patch: int = 7, dim: int = 64, depth: int = 3):
        super().__init__(num_classes, dim)
        tokens = (img_size // patch) ** 2
        self.patch_embed = PatchEmbed(in_chans, dim, patch)
        self.blocks = nn.Sequential(*[MixerBlock(dim, tokens, 64, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward_features(self, x):
        return self.norm(self.blocks(self.patch_embed(x)).mean(dim=1))
