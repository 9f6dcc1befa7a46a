"""LeNet and B-LeNet for MNIST (1×28×28), after the original BranchyNet code.

Chainer's max-pooling rounds output sizes up, hence ``ceil_mode=True`` throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from models.registry import register_family


@dataclass(frozen=True)
class LeNetConfig:
    """Architecture of (B-)LeNet.

    Attributes:
        num_classes: classes of every exit.
        in_channels: input channels (1 for MNIST).
        branches: True for B-LeNet (side branch after the first conv), False for LeNet.
    """

    num_classes: int = 10
    in_channels: int = 1
    branches: bool = True


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(2, ceil_mode=True)


def _b1(num_classes: int) -> nn.Sequential:
    # (B, 5, 30, 30) -> (B, num_classes)
    return nn.Sequential(
        _pool(), nn.ReLU(), nn.Conv2d(5, 10, 3, padding=1),  # 10×15×15
        _pool(), nn.ReLU(), nn.Flatten(), nn.Linear(640, num_classes),  # 10×8×8
    )  # fmt: skip


def _parts(cfg: LeNetConfig) -> tuple[list[nn.Module], list[nn.Module]]:
    """B-LeNet: LeNet with one side branch after the first convolution (2 exits); LeNet:
    the same trunk and final classifier without the side branch."""
    conv1 = nn.Conv2d(cfg.in_channels, 5, 5, padding=3)  # (B, 5, 30, 30)
    rest = nn.Sequential(
        _pool(), nn.ReLU(), nn.Conv2d(5, 10, 5, padding=3),  # 10×17×17
        _pool(), nn.ReLU(), nn.Conv2d(10, 20, 5, padding=3),  # 20×11×11
        _pool(), nn.ReLU(), nn.Flatten(),  # 20×6×6 = 720
    )  # fmt: skip
    classifier = nn.Sequential(nn.Linear(720, 84), nn.Linear(84, cfg.num_classes))
    if cfg.branches:
        return [conv1, rest], [_b1(cfg.num_classes), classifier]
    return [nn.Sequential(conv1, rest)], [classifier]


b_lenet, lenet = register_family(
    LeNetConfig, _parts, names=("b-lenet", "lenet"), input_size=(28, 28)
)
