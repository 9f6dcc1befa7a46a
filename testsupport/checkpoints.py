"""The one checkpoint factory of the tests and benchmarks: freshly initialised, seeded
networks written with ``models.save_checkpoint`` (nothing is downloaded or trained)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import models
from service.preprocess import normalise

MNIST = models.InputSpec(channels=1, height=28, width=28, mean=(0.1307,), std=(0.3081,))
CIFAR = models.InputSpec(
    channels=3, height=32, width=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)
)
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"]  # fmt: skip


def sharpen_heads(net: models.BranchyNet, factor: float = 40.0) -> models.BranchyNet:
    """Scale every head's last linear layer so that a freshly initialised net gives
    entropies spread over [0, ln C] instead of all near ln C, as a trained net would."""
    with torch.no_grad():
        for head in net.heads:
            last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
            last.weight.mul_(factor)
            last.bias.mul_(factor)
    return net


def spec_for(net: models.BranchyNet) -> models.InputSpec:
    """MNIST's input statistics for a one-channel network, CIFAR-10's otherwise (only the
    normalisation, not the weights, depends on them)."""
    return MNIST if net.input_shape[0] == 1 else CIFAR


def random_calibration(
    net: models.BranchyNet, spec: models.InputSpec, *, seed: int, samples: int
) -> models.CalibrationData:
    """Calibration data of ``net`` on random images, with labels that agree with the final
    exit for 80% of them, so that accuracy-driven threshold choices have something to
    trade."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (samples, *spec.shape), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        outs = net(normalise(pixels, spec))
    entropy = torch.stack([models.entropy_from_logits(z) for z in outs], dim=1)
    labels = outs[-1].argmax(1)
    flip = torch.rand(samples, generator=g) < 0.2
    labels = torch.where(flip, (labels + 1) % 10, labels)
    correct = torch.stack([z.argmax(1) == labels for z in outs], dim=1)
    return models.CalibrationData(entropy=entropy, correct=correct)


def write_checkpoint(
    path: Path,
    architecture: str = "b-lenet",
    *,
    seed: int = 0,
    calibration: bool = True,
    samples: int = 200,
    sharpen: bool = False,
    thresholds: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write a freshly initialised checkpoint of ``architecture`` to the folder ``path``.

    Args:
        path: checkpoint folder to create.
        architecture: registry name (``b-lenet`` is the cheapest on a CPU).
        seed: torch seed of the initialisation (and of the calibration images).
        calibration: store calibration data (:func:`random_calibration`).
        samples: calibration images.
        sharpen: :func:`sharpen_heads` first, for entropies spread like a trained net's.
        thresholds: default thresholds (default: the checkpoint format's).
        class_names: default: the digits for a one-channel net, CIFAR-10's names otherwise.
        provenance: stored as the checkpoint's provenance.

    Returns:
        ``path``.
    """
    torch.manual_seed(seed)
    net = models.build_model(architecture).eval()
    if sharpen:
        sharpen_heads(net)
    spec = spec_for(net)
    if class_names is None:
        class_names = [str(i) for i in range(10)] if spec is MNIST else CIFAR_CLASSES
    calib = random_calibration(net, spec, seed=seed, samples=samples) if calibration else None
    return models.save_checkpoint(
        path,
        net,
        class_names=list(class_names),
        input_spec=spec,
        thresholds=None if thresholds is None else list(thresholds),
        calibration=calib,
        provenance=None if provenance is None else dict(provenance),
    )
