"""The batched early-exit engine against the seed's per-sample algorithm.

Seed (one sample):  for n = 1..N: y = softmax(z_n); e = entropy(y);
                    if e < T_n: return argmax(y)
                    return argmax(y)
"""

import math

import pytest
import torch

import models
from testsupport.checkpoints import sharpen_heads
from testsupport.exits import spread_thresholds

# one network per family: the engine is shared, the deeper ResNets only add blocks
BRANCHY = ["b-lenet", "b-alexnet", "b-resnet20"]


@torch.no_grad()
def reference(net: models.BranchyNet, x: torch.Tensor, thresholds: list[float]):
    """The seed's algorithm, one sample at a time, from the full forward pass."""
    exits, classes, entropies = [], [], []
    for sample in x:
        outs = net(sample.unsqueeze(0))
        for n, z in enumerate(outs):
            e = float(models.entropy_from_logits(z)[0])
            if n == len(outs) - 1 or e < thresholds[n]:
                exits.append(n)
                classes.append(int(z.argmax()))
                entropies.append(e)
                break
    return exits, classes, entropies


def make(name: str) -> models.BranchyNet:
    return sharpen_heads(models.build_model(name)).eval()


@pytest.mark.parametrize("name", BRANCHY)
def test_batch_equals_per_sample_reference(name: str) -> None:
    net = make(name)
    x = torch.randn(16 if "resnet" in name else 48, *net.input_shape)
    t = spread_thresholds(net, x)
    got = net.early_exit(x, t)
    exits, classes, entropies = reference(net, x, t)
    assert got.exit_index.tolist() == exits
    assert got.prediction.tolist() == classes
    torch.testing.assert_close(got.entropy, torch.tensor(entropies), atol=1e-5, rtol=1e-5)
    # the mix is real: several exits are used
    assert len(set(exits)) >= 2
    # logits are those of the exit taken
    with torch.no_grad():
        outs = net(x)
    for i, k in enumerate(exits):
        torch.testing.assert_close(got.logits[i], outs[k][i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", BRANCHY)
def test_thresholds_inf_and_zero(name: str) -> None:
    net = make(name)
    x = torch.randn(9, *net.input_shape)
    early = net.num_exits - 1
    everyone = net.early_exit(x, [math.inf] * early)
    assert everyone.exit_index.tolist() == [0] * 9
    nobody = net.early_exit(x, [0.0] * early)
    assert nobody.exit_index.tolist() == [net.num_exits - 1] * 9
    with torch.no_grad():
        final = net(x)[-1]
    assert nobody.prediction.tolist() == final.argmax(1).tolist()


def test_empty_batch() -> None:
    net = make("b-alexnet")
    got = net.early_exit(torch.randn(0, *net.input_shape), [1.0, 1.0])
    assert got.logits.shape == (0, 10)
    assert got.exit_index.shape == (0,) and got.entropy.shape == (0,)
    assert got.exit_index.dtype == torch.int64


@pytest.mark.parametrize("name", BRANCHY)
def test_batch_of_one_matches_batch(name: str) -> None:
    net = make(name)
    x = torch.randn(12, *net.input_shape)
    t = spread_thresholds(net, x)
    batched = net.early_exit(x, t)
    for i in range(12):
        one = net.early_exit(x[i : i + 1], t)
        assert one.exit_index.shape == (1,) and one.logits.shape == (1, 10)
        assert int(one.exit_index) == int(batched.exit_index[i])
        assert int(one.prediction) == int(batched.prediction[i])
        torch.testing.assert_close(one.entropy, batched.entropy[i : i + 1], atol=1e-5, rtol=0)


def test_all_exit_early_and_none() -> None:
    net = make("b-lenet")
    x = torch.randn(20, *net.input_shape)
    with torch.no_grad():
        e0 = models.entropy_from_logits(net(x)[0])
    all_early = net.early_exit(x, [float(e0.max()) + 1e-3])
    assert (all_early.exit_index == 0).all()
    none_early = net.early_exit(x, [float(e0.min())])  # strict: the minimum does not leave
    assert (none_early.exit_index == 1).all()


@pytest.mark.parametrize("batch", [1, 5])
def test_tie_at_threshold_does_not_exit(batch: int) -> None:
    net = make("b-lenet")
    x = torch.randn(batch, *net.input_shape)
    with torch.no_grad():
        e = models.entropy_from_logits(net(x)[0])
    t = e.unsqueeze(1)  # (B, 1): each sample's own exit-0 entropy as its threshold
    tie = net.early_exit(x, t)
    assert (tie.exit_index == 1).all()
    above = net.early_exit(x, torch.nextafter(t, torch.full_like(t, math.inf)))
    assert (above.exit_index == 0).all()


def test_per_sample_thresholds_mix_in_one_batch() -> None:
    net = make("b-alexnet")
    x = torch.randn(6, *net.input_shape)
    inf, zero = math.inf, 0.0
    t = torch.tensor([[inf, 0], [0, inf], [0, 0], [inf, inf], [zero, inf], [0, 0]])
    got = net.early_exit(x, t)
    assert got.exit_index.tolist() == [0, 1, 2, 0, 1, 2]
    # each row equals running that sample alone with its own thresholds
    for i in range(6):
        one = net.early_exit(x[i : i + 1], t[i].tolist())
        assert int(one.exit_index) == int(got.exit_index[i])
        assert int(one.prediction) == int(got.prediction[i])


def test_bad_thresholds_are_named() -> None:
    net = make("b-alexnet")
    x = torch.randn(2, *net.input_shape)
    with pytest.raises(ValueError, match="expected 2 threshold"):
        net.early_exit(x, [1.0])
    with pytest.raises(ValueError, match="shape \\(2, 2\\)"):
        net.early_exit(x, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="NaN"):
        net.early_exit(x, [math.nan, 1.0])


def test_plain_net_single_exit() -> None:
    net = make("alexnet")
    x = torch.randn(4, *net.input_shape)
    got = net.early_exit(x, [])
    assert got.exit_index.tolist() == [0] * 4
    with torch.no_grad():
        assert got.prediction.tolist() == net(x)[0].argmax(1).tolist()


def test_half_precision_logits_give_finite_entropy() -> None:
    net = make("b-lenet").to(torch.bfloat16)
    x = torch.randn(8, *net.input_shape, dtype=torch.bfloat16)
    got = net.early_exit(x, [0.5])
    assert torch.isfinite(got.entropy).all()
    assert got.logits.dtype == torch.float32
