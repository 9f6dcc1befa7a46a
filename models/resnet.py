"""CIFAR ResNets (He et al. 2016, depth 6n+2) and their branchy versions.

B-ResNet places its branches where the BranchyNet paper does: B1 after the first residual
block, B2 after the last block of stage 1. The original code's versions of this network
disagree with each other (one gives B1 a 26 M-parameter two-layer FC); we keep the
paper's placement with modest heads, built below:

* B1: ReLU -> LRN -> Conv(16->32, k3, p1) + ReLU -> Conv(32->32, k3, p1) + ReLU ->
  MaxPool(3, 2) -> FC(->classes);
* B2: one more basic block (16 channels) -> FC(16 * 32 * 32 -> classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from models.registry import register_family


@dataclass(frozen=True)
class ResNetConfig:
    """Architecture of a CIFAR (B-)ResNet.

    Attributes:
        depth: 6n+2 layers, n basic blocks per stage (20, 32, 56, 110, ...).
        num_classes: classes of every exit.
        in_channels: input channels.
        branches: True for the 3-exit branchy network, False for the plain one.
    """

    depth: int = 110
    num_classes: int = 10
    in_channels: int = 3
    branches: bool = True

    def __post_init__(self) -> None:
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1; got {self.depth}")

    @property
    def blocks_per_stage(self) -> int:
        return (self.depth - 2) // 6


class BasicBlock(nn.Module):
    """conv3-BN-ReLU-conv3-BN plus a parameter-free shortcut (option A), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride = stride
        self.pad = cout - cin

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1 or self.pad:
            # option A: subsample spatially, zero-pad the new channels
            shortcut = x[:, :, :: self.stride, :: self.stride]
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


def _stage(cin: int, cout: int, blocks: int, stride: int) -> list[nn.Module]:
    first: list[nn.Module] = [BasicBlock(cin, cout, stride)]
    return first + [BasicBlock(cout, cout) for _ in range(blocks - 1)]


def _b1(num_classes: int) -> nn.Sequential:
    # (B, 16, 32, 32) -> (B, num_classes)
    return nn.Sequential(
        nn.ReLU(), nn.LocalResponseNorm(size=3, alpha=1.5e-4, beta=0.75, k=2.0),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, ceil_mode=True), nn.Flatten(),  # 32×16×16
        nn.Linear(32 * 16 * 16, num_classes),
    )  # fmt: skip


def _b2(num_classes: int) -> nn.Sequential:
    # (B, 16, 32, 32) -> (B, num_classes)
    return nn.Sequential(BasicBlock(16, 16), nn.Flatten(), nn.Linear(16 * 32 * 32, num_classes))


def _parts(cfg: ResNetConfig) -> tuple[list[nn.Module], list[nn.Module]]:
    """B-ResNet: the CIFAR ResNet of ``cfg.depth`` with branches after block 1 and after
    stage 1 (3 exits); ResNet: the plain network (1 exit)."""
    n = cfg.blocks_per_stage
    stem = [nn.Conv2d(cfg.in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    stage1 = _stage(16, 16, n, 1)  # (B, 16, 32, 32)
    rest = [*_stage(16, 32, n, 2), *_stage(32, 64, n, 2)]  # (B, 64, 8, 8)
    classifier = nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, cfg.num_classes)
    )
    if cfg.branches:
        stages: list[nn.Module] = [
            nn.Sequential(*stem, stage1[0]),
            nn.Sequential(*stage1[1:]),
            nn.Sequential(*rest),
        ]
        heads: list[nn.Module] = [_b1(cfg.num_classes), _b2(cfg.num_classes), classifier]
    else:
        stages, heads = [nn.Sequential(*stem, *stage1, *rest)], [classifier]
    for m in stages:
        for layer in m.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    return stages, heads


def _name(cfg: ResNetConfig) -> str:
    return f"{'b-' if cfg.branches else ''}resnet{cfg.depth}"


for _depth in (20, 32, 56, 110):
    register_family(
        ResNetConfig,
        _parts,
        names=(f"b-resnet{_depth}", f"resnet{_depth}"),
        input_size=(32, 32),
        name_of=_name,
        defaults={"depth": _depth},
    )
