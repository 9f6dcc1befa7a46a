"""Helpers of the engine tests (``tests/models``): thresholds that split a batch at every
exit, and the comparison of two engines' early-exit answers."""

from __future__ import annotations

import torch

import models


def spread_thresholds(net: models.BranchyNet, x: torch.Tensor) -> list[float]:
    """Per early exit, midway between the two middle entropies: about half the samples
    leave at each, and no sample sits within float noise of its threshold."""
    with torch.no_grad():
        outs = net(x)
    ts = []
    for z in outs[:-1]:
        e = models.entropy_from_logits(z).sort().values
        mid = len(e) // 2
        ts.append(float(e[mid - 1] + e[mid]) / 2)
    return ts


def assert_same_exits(a: models.ExitResult, b: models.ExitResult) -> None:
    """``a`` and ``b`` take the same exits and classes, with logits and entropies equal
    within 1e-4, and both carry the engine contract's dtypes."""
    assert torch.equal(a.exit_index, b.exit_index)
    assert torch.equal(a.prediction, b.prediction)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.entropy, b.entropy, rtol=1e-4, atol=1e-4)
    assert a.logits.dtype == torch.float32 and a.entropy.dtype == torch.float32
    assert a.exit_index.dtype == torch.int64
