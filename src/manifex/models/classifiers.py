"""Image classifiers: MLP, the seed's LeNet, small VGG- and ResNet-style nets.

All take (N, C, H, W) images in [0, 1] and return logits (N, num_classes). Activations are ``nn.ReLU``
modules (never ``F.relu``) so that β-smoothing and LRP can find and hook them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import InputError

__all__ = ["MLP", "LeNet", "SmallVGG", "SmallResNet", "ClassifierConfig", "build_classifier", "CLASSIFIERS"]


class MLP(nn.Sequential):
    """Flatten → [Linear → ReLU] × len(hidden) → Linear."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int = 10, hidden: tuple[int, ...] = (256, 128)) -> None:
        d = 1
        for s in in_shape:
            d *= s
        layers: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, num_classes))
        super().__init__(*layers)


class LeNet(nn.Module):
    """The seed's MNIST classifier: conv(32,3) → ReLU → conv(64,3) → ReLU → maxpool 2 → dropout .25 →
    fc 128 → ReLU → dropout .5 → fc classes (12544 → 128 at 32×32)."""

    def __init__(self, in_shape: tuple[int, ...] = (1, 32, 32), num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        c, h, w = in_shape
        if h < 6 or w < 6:
            raise InputError(f"LeNet needs images of at least 6×6, got {h}×{w}.")
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3), nn.ReLU(), nn.Conv2d(width, 2 * width, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25)
        )
        flat = 2 * width * ((h - 4) // 2) * ((w - 4) // 2)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallVGG(nn.Module):
    """VGG-style: blocks of [conv3×3 → ReLU] × 2 → maxpool, then a small classifier."""

    def __init__(self, in_shape: tuple[int, ...] = (1, 32, 32), num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for width in widths:
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = width, h // 2, w // 2
        if h < 1 or w < 1:
            raise InputError(f"SmallVGG with {len(widths)} blocks needs images of at least {2 ** len(widths)} pixels a side.")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus identity (or 1×1 projection) shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Identity() if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet-style: stem conv → BasicBlocks (stride 2 between stages) → global average pool → linear."""

    def __init__(self, in_shape: tuple[int, ...] = (1, 32, 32), num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        c = in_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks = []
        cin = widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(cin, width, stride=1 if i == 0 else 2))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


#: The built-in classifiers by name (``--classifier``): ``{name: class(in_shape, num_classes)}``.
CLASSIFIERS = {"mlp": MLP, "lenet": LeNet, "vgg": SmallVGG, "resnet": SmallResNet}


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything that determines a classifier's architecture (part of the cache key)."""

    arch: str = "lenet"
    in_shape: tuple[int, ...] = (1, 32, 32)
    num_classes: int = 10

    def to_dict(self) -> dict:
        return asdict(self)


def build_classifier(config: ClassifierConfig) -> nn.Module:
    """An untrained built-in classifier: ``config.arch`` from :data:`CLASSIFIERS` for images of ``config.in_shape``
    (C, H, W) and ``config.num_classes`` logits."""
    if config.arch not in CLASSIFIERS:
        raise InputError(f"unknown classifier {config.arch!r}; choose one of {', '.join(CLASSIFIERS)}.")
    return CLASSIFIERS[config.arch](tuple(config.in_shape), config.num_classes)
