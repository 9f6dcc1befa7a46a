"""Multiply-accumulate counts of conv and linear layers, measured with forward hooks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from models.branchy import BranchyNet


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
def stage_and_head_macs(net: BranchyNet) -> tuple[list[int], list[int]]:
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
