"""The batch-of-one fast path of ``BranchyNet.early_exit`` (plain-number thresholds, no
threshold tensor) decides exactly as the tensor path does, boundaries included."""

from __future__ import annotations

import math

import pytest
import torch

import models


@pytest.mark.parametrize("name", ["b-lenet", "b-alexnet"])
def test_fast_path_matches_tensor_path_at_the_boundary(name: str) -> None:
    torch.manual_seed(0)
    net = models.build_model(name).eval()
    x = torch.randn(1, *net.input_shape)
    early = net.num_exits - 1
    with torch.no_grad():
        entropies = [float(models.entropy_from_logits(z)[0]) for z in net(x)][:early]
    settings = [
        [0.0] * early,
        [math.inf] * early,
        entropies,  # strict <: equal entropy does not leave
        [math.nextafter(e, math.inf) for e in entropies],  # rounds to float32 like the tensor
        [e + 1e-6 for e in entropies],
        [0.1] * early,
    ]
    for thr in settings:
        fast = net.early_exit(x, list(thr))
        slow = net.early_exit(x, torch.tensor([thr], dtype=torch.float32))
        assert int(fast.exit_index) == int(slow.exit_index), thr
        assert torch.equal(fast.logits, slow.logits) and torch.equal(fast.entropy, slow.entropy)
    assert int(net.early_exit(x, entropies).exit_index) == early  # nobody below itself
    with pytest.raises(ValueError, match="NaN"):
        net.early_exit(x, [math.nan] * early)
    with pytest.raises(ValueError, match=f"expected {early} threshold"):
        net.early_exit(x, [0.5] * (early + 1))
