"""Each rule in its one home: the exit rule, threshold validation and their JSON form
(``models.exits``), normalisation (``InputSpec``), calibration collection, MAC counting
and device resolution, at the public surface of ``models``."""

from __future__ import annotations

import math

import pytest
import torch

import models
from models.calibration import collect_calibration, exit_outputs
from models.checkpoint import InputSpec
from models.devices import resolve_device
from models.exits import check_thresholds, encode_thresholds, entropy_from_logits, leaves
from models.macs import exit_macs


def test_exit_rule_is_strict() -> None:
    e = torch.tensor([0.0, 0.5, 1.0])
    assert leaves(e, 0.5).tolist() == [True, False, False]  # equal to T: stays
    assert not leaves(0.5, 0.5) and leaves(0.49, 0.5)
    assert leaves(e, math.inf).all() and not leaves(e, 0.0).any()


def test_engine_follows_the_exit_rule() -> None:
    torch.manual_seed(0)
    net = models.build_model("b-lenet").eval()
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        first = entropy_from_logits(net(x)[0])
    t = float(first.median())
    result = net.early_exit(x, [t])
    assert result.exit_index.tolist() == [0 if leaves(float(h), t) else 1 for h in first]


def test_one_threshold_rule() -> None:
    assert check_thresholds([0.5, "inf"], 3) == (0.5, math.inf)
    assert check_thresholds(["0.25", 1], 3) == (0.25, 1.0)
    for bad, message in [
        ([float("nan"), 1.0], "NaN"),
        ([-0.1, 1.0], ">= 0"),
        ([True, 1.0], "must be a number"),
        (["abc", 1.0], "must be a number"),
        ([0.5], "expected 2 threshold"),
        ("0.5,1", "must be a list"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_thresholds(bad, 3)


def test_inf_round_trips_through_json() -> None:
    encoded = encode_thresholds([0.05, math.inf])
    assert encoded == [0.05, "inf"]
    assert check_thresholds(encoded, 3) == (0.05, math.inf)


def test_normalise_is_torchvision_arithmetic_and_copies() -> None:
    spec = InputSpec(3, 4, 4, mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261))
    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean = torch.tensor(spec.mean).view(-1, 1, 1)
    std = torch.tensor(spec.std).view(-1, 1, 1)
    expected = (pixels.float() / 255 - mean) / std
    assert torch.equal(spec.normalise(pixels), expected)
    as_float = pixels.float()
    before = as_float.clone()
    spec.normalise(as_float)
    assert torch.equal(as_float, before)  # the caller's tensor is never changed


def test_collect_calibration_measures_every_exit_in_eval_mode() -> None:
    torch.manual_seed(1)
    net = models.build_model("b-lenet")
    net.train()
    x, y = torch.randn(10, 1, 28, 28), torch.randint(0, 10, (10,))
    data = collect_calibration(net, [(x[:6], y[:6]), (x[6:], y[6:])])
    assert net.training  # mode restored
    net.eval()
    entropy, prediction = exit_outputs(net, x)
    assert torch.equal(data.entropy, entropy) and torch.equal(data.prediction, prediction)
    assert torch.equal(data.correct, prediction == y[:, None])


def test_macs_are_a_function_of_the_net() -> None:
    net = models.build_model("b-alexnet")
    counted = exit_macs(net)
    assert counted == net.exit_macs() and counted == sorted(counted) and counted[0] > 0


def test_one_device_resolver() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda", local_rank=0)
    else:
        assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
