"""Embedding networks written in the project: a small CNN and ResNet-18, with retrieval heads.

A :class:`RetrievalNet` maps images ``(B, C, H, W)`` with pixels in [0, 1] to
``(B, dim)`` outputs in three stages:

1. input normalisation ``(x - mean) / std`` per channel (so callers, noise and
   attacks all work in pixel units);
2. a trunk: :class:`SmallCNN` or :class:`ResNet18` (He et al., CVPR 2016;
   the "small" stem is the usual 3x3, stride-1 variant for 28-64 px images,
   "imagenet" the 7x7/2 convolution and max-pool), ending in global average
   pooling, so any image size works;
3. a head: "embedding", a linear layer then l2 normalisation (``||h|| = 1``,
   F = 1), or "hash", a linear layer of K units then tanh (codes
   ``f in (-1, 1)^K``, ``||f|| < sqrt(K)``; ``b = sign(f)``).

A :class:`ModelSpec` describes the whole network; it is what a model card
stores, and :func:`build_model` rebuilds the network from it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ARCHS", "HEADS", "ModelSpec", "RetrievalNet", "SmallCNN", "ResNet18", "build_model"]

ARCHS = {"small-cnn": 32, "resnet18": 64}
"""Architecture -> default width (channels of the first stage)."""
HEADS = ("embedding", "hash")
STEMS = ("small", "imagenet")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a :class:`RetrievalNet`.

    arch : "small-cnn" or "resnet18".
    in_channels : C of the input images.
    head : "embedding" (l2-normalised) or "hash" (tanh).
    dim : embedding size, or K bits for a hash head.
    width : channels of the first stage (default per arch: 32 / 64).
    mean, std : per-channel input normalisation, C values each.
    stem : ResNet-18 only: "small" or "imagenet".
    """

    arch: str
    in_channels: int
    head: str
    dim: int
    width: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    stem: str = "small"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch: expected one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.head not in HEADS:
            raise ValueError(f"head: expected one of {', '.join(HEADS)}, got {self.head!r}")
        if self.stem not in STEMS:
            raise ValueError(f"stem: expected one of {', '.join(STEMS)}, got {self.stem!r}")
        width = ARCHS[self.arch] if self.width is None else self.width
        for name, value in (("in_channels", self.in_channels), ("dim", self.dim), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a whole number >= 1, got {value!r}")
        mean = (0.0,) * self.in_channels if self.mean is None else tuple(float(v) for v in self.mean)
        std = (1.0,) * self.in_channels if self.std is None else tuple(float(v) for v in self.std)
        if len(mean) != self.in_channels or len(std) != self.in_channels:
            raise ValueError(f"mean, std: expected {self.in_channels} values each (one per channel), "
                             f"got {len(mean)} and {len(std)}")
        if not all(math.isfinite(v) for v in mean) or not all(math.isfinite(v) and v > 0 for v in std):
            raise ValueError(f"std: expected finite values above 0 (and a finite mean), got {std} ({mean})")
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def norm_bound(self) -> float:
        """F, a bound on ``||h(x)||``: 1 for an embedding head, sqrt(K) for a hash head."""
        return 1.0 if self.head == "embedding" else math.sqrt(self.dim)

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, fields: dict) -> "ModelSpec":
        """The spec stored by :meth:`to_dict`; unknown or missing fields raise ValueError."""
        if not isinstance(fields, dict):
            raise ValueError(f"model: expected an object of model fields, got {type(fields).__name__}")
        try:
            return cls(**fields)
        except TypeError as exc:
            raise ValueError(f"model: {exc}") from None


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean and std are buffers of the state_dict."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def _conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out))


class SmallCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU stages (w, 2w, 4w channels; max-pool after the first two), then global pooling.

    features : 4w.
    """

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.features = 4 * width
        self.layers = nn.Sequential(
            _conv_bn(in_channels, width), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            _conv_bn(width, 2 * width), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            _conv_bn(2 * width, 4 * width), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x):
        return self.layers(x)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut (a 1x1 conv-BN when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.first = _conv_bn(c_in, c_out, 3, stride)
        self.second = _conv_bn(c_out, c_out, 3, 1)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else _conv_bn(c_in, c_out, 1, stride)

    def forward(self, x):
        out = F.relu(self.first(x), inplace=True)
        return F.relu(self.second(out) + self.shortcut(x), inplace=True)


class ResNet18(nn.Module):
    """ResNet-18: a stem, four stages of two basic blocks (w, 2w, 4w, 8w channels), global pooling.

    features : 8w (512 at the standard width 64).
    """

    def __init__(self, in_channels: int, width: int, stem: str = "small"):
        super().__init__()
        if stem == "small":
            self.stem = nn.Sequential(_conv_bn(in_channels, width, 3, 1), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(_conv_bn(in_channels, width, 7, 2), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
        stages, c_in = [], width
        for i in range(4):
            c_out = width * 2 ** i
            stages += [BasicBlock(c_in, c_out, 1 if i == 0 else 2), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.features = c_in

    def forward(self, x):
        return self.pool(self.stages(self.stem(x)))


class RetrievalNet(nn.Module):
    """Normalisation, trunk and head of a :class:`ModelSpec`: (B, C, H, W) in [0, 1] -> (B, dim)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.normalize = Normalize(spec.mean, spec.std)
        if spec.arch == "small-cnn":
            self.trunk = SmallCNN(spec.in_channels, spec.width)
        else:
            self.trunk = ResNet18(spec.in_channels, spec.width, spec.stem)
        self.head = nn.Linear(self.trunk.features, spec.dim)

    def forward(self, x):
        out = self.head(self.trunk(self.normalize(x)))
        return F.normalize(out, dim=1) if self.spec.head == "embedding" else torch.tanh(out)


def build_model(spec: ModelSpec, *, seed: int | None = None) -> RetrievalNet:
    """A freshly initialised :class:`RetrievalNet`; with ``seed``, the same weights every time
    (the global torch generator is left as it was)."""
    if seed is None:
        return RetrievalNet(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RetrievalNet(spec)
