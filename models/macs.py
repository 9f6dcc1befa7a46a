"""Multiply-accumulate counts of conv and linear layers, measured with forward hooks.

A measurement of a network, not part of it: these functions take any object shaped like
a :class:`~models.branchy.BranchyNet` (:class:`StagedNet`), so this module imports
nothing of ``models`` and ``models.branchy`` can use it without an import circle.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

import torch
from torch import Tensor, nn


class StagedNet(Protocol):
    """What MAC counting needs of a network: trunk stages, one head per stage, and the
    ``(C, H, W)`` input shape."""

    @property
    def stages(self) -> Iterable[nn.Module]: ...

    @property
    def heads(self) -> Iterable[nn.Module]: ...

    @property
    def input_shape(self) -> tuple[int, ...]: ...

    @property
    def training(self) -> bool: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def eval(self) -> object: ...

    def train(self, mode: bool = True) -> object: ...


def _layer_macs(module: nn.Module, out: Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        # each output element: in_channels/groups * kh * kw multiply-adds
        kh, kw = module.kernel_size
        per_out = (module.in_channels // module.groups) * kh * kw
        return int(out[0].numel()) * per_out
    if isinstance(module, nn.Linear):
        return int(out[0].numel()) * module.in_features
    return 0


def module_macs(module: nn.Module, x: Tensor) -> tuple[int, Tensor]:
    """MACs of one sample through ``module`` (conv + linear layers), and its output."""
    total = 0

    def hook(m: nn.Module, _inp: object, out: Tensor) -> None:
        nonlocal total
        total += _layer_macs(m, out)

    handles = [
        m.register_forward_hook(hook)
        for m in module.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    try:
        out = module(x)
    finally:
        for h in handles:
            h.remove()
    return total, out


@torch.no_grad()
def stage_and_head_macs(net: StagedNet) -> tuple[list[int], list[int]]:
    """Per-stage and per-head MACs for one sample of ``net.input_shape``."""
    param = next(net.parameters())
    was_training = net.training
    net.eval()
    try:
        h = torch.zeros((1, *net.input_shape), dtype=param.dtype, device=param.device)
        stages, heads = [], []
        for stage, head in zip(net.stages, net.heads, strict=True):
            s, h = module_macs(stage, h)
            hm, _ = module_macs(head, h)
            stages.append(s)
            heads.append(hm)
    finally:
        net.train(was_training)
    return stages, heads


def exit_macs(net: StagedNet) -> list[int]:
    """Multiply-accumulates to reach and evaluate each exit, for one sample.

    Entry ``i`` counts stages ``0..i`` and heads ``0..i``: a sample leaving at exit ``i``
    has paid for every earlier head too. Counted from conv and linear layers by running
    one dummy sample, not typed in by hand.
    """
    stage_macs, head_macs = stage_and_head_macs(net)
    total, cumulative = 0, []
    for s, h in zip(stage_macs, head_macs, strict=True):
        total += s + h
        cumulative.append(total)
    return cumulative
