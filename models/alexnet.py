"""AlexNet and B-AlexNet for CIFAR-10 (3×32×32), after the original BranchyNet code.

Chainer's max-pooling rounds output sizes up (``ceil_mode=True``). Chainer's LRN does not
divide alpha by the window size and PyTorch's does, so Chainer's alpha 5e-5 with n=3
becomes PyTorch's 1.5e-4.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from models.registry import register_family


@dataclass(frozen=True)
class AlexNetConfig:
    """Architecture of (B-)AlexNet.

    Attributes:
        num_classes: classes of every exit.
        in_channels: input channels.
        branches: True for B-AlexNet (branches after conv2 and conv3), False for AlexNet.
        b1_extra_convs: Conv(32→32) layers in the first branch after its Conv(64→32);
            the paper's branch has 1. The seed's ablation varies it from 0 to 4.
    """

    num_classes: int = 10
    in_channels: int = 3
    branches: bool = True
    b1_extra_convs: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.b1_extra_convs <= 8:
            raise ValueError(f"b1_extra_convs must be in 0..8; got {self.b1_extra_convs}")


def _lrn() -> nn.LocalResponseNorm:
    return nn.LocalResponseNorm(size=3, alpha=1.5e-4, beta=0.75, k=2.0)


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(3, stride=2, ceil_mode=True)


def _conv_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]


def _b1(cfg: AlexNetConfig) -> nn.Sequential:
    # (B, 64, 16, 16) -> (B, num_classes)
    layers: list[nn.Module] = [nn.ReLU(), _pool(), _lrn(), *_conv_relu(64, 32)]  # 32×8×8
    for _ in range(cfg.b1_extra_convs):
        layers += _conv_relu(32, 32)
    layers += [_pool(), nn.Flatten(), nn.Linear(512, cfg.num_classes)]  # 32×4×4
    return nn.Sequential(*layers)


def _b2(cfg: AlexNetConfig) -> nn.Sequential:
    # (B, 96, 8, 8) -> (B, num_classes)
    return nn.Sequential(
        nn.ReLU(), _pool(), _lrn(), *_conv_relu(96, 32),  # 32×4×4
        _pool(), nn.Flatten(), nn.Linear(128, cfg.num_classes),  # 32×2×2
    )  # fmt: skip


def _parts(cfg: AlexNetConfig) -> tuple[list[nn.Module], list[nn.Module]]:
    """B-AlexNet: AlexNet with side branches after conv2 and conv3 (3 exits); AlexNet:
    the same trunk and final classifier without side branches."""
    s1 = nn.Sequential(
        nn.Conv2d(cfg.in_channels, 32, 5, padding=2), nn.ReLU(), _pool(), _lrn(),  # 32×16×16
        nn.Conv2d(32, 64, 5, padding=2),  # 64×16×16
    )  # fmt: skip
    s2 = nn.Sequential(nn.ReLU(), _pool(), _lrn(), nn.Conv2d(64, 96, 3, padding=1))  # 96×8×8
    s3 = nn.Sequential(
        nn.ReLU(), *_conv_relu(96, 96), nn.Conv2d(96, 64, 3, padding=1), nn.ReLU(),
        _pool(), nn.Flatten(),  # 64×4×4 = 1024
    )  # fmt: skip
    classifier = nn.Sequential(
        nn.Linear(1024, 256), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(256, 128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, cfg.num_classes),
    )  # fmt: skip
    if cfg.branches:
        return [s1, s2, s3], [_b1(cfg), _b2(cfg), classifier]
    return [nn.Sequential(s1, s2, s3)], [classifier]


b_alexnet, alexnet = register_family(
    AlexNetConfig, _parts, names=("b-alexnet", "alexnet"), input_size=(32, 32)
)
