"""``benchmarks/layer_profile.py``: the layer plan follows the engine, MACs add up to the
model's own counts, and the three gains are computed as documented (no timing judged)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import models

ROOT = Path(__file__).resolve().parents[2]

spec = importlib.util.spec_from_file_location(
    "layer_profile", ROOT / "benchmarks" / "layer_profile.py"
)
assert spec is not None and spec.loader is not None
layer_profile = importlib.util.module_from_spec(spec)
sys.modules["layer_profile"] = layer_profile
spec.loader.exec_module(layer_profile)
Layer = layer_profile.Layer


def test_plan_charges_shared_layers_to_the_stage() -> None:
    net = models.build_model("b-alexnet")
    plan = layer_profile.plan(net)
    assert [name for name, _ in plan] == [
        "stage 0", "head 0", "stage 1", "head 1", "stage 2", "head 2",
    ]  # fmt: skip
    names = {seg: [type(m).__name__ for m in mods] for seg, mods in plan}
    # ReLU, pooling and LRN open both branch 1 and stage 1: run once, as stage 0's end
    assert names["stage 0"][-3:] == ["ReLU", "MaxPool2d", "LocalResponseNorm"]
    assert names["head 0"][0] == "Conv2d"
    # ReLU opens both branch 2 and stage 2
    assert names["stage 1"] == ["Conv2d", "ReLU"] and names["head 1"][0] == "MaxPool2d"


@pytest.mark.parametrize("name", ["b-lenet", "b-alexnet", "alexnet"])
def test_profile_counts_every_mac_once(name: str) -> None:
    torch.manual_seed(0)
    net = models.build_model(name).eval()
    layers = layer_profile.profile(net, torch.randn(6, *net.input_shape), 4, 1)
    assert all(lay.seconds > 0 for lay in layers)
    per_exit, total = [], 0
    for k in range(net.num_exits):
        total += sum(lay.macs for lay in layers if lay.segment in (f"stage {k}", f"head {k}"))
        per_exit.append(total)
    assert per_exit == net.exit_macs()


def test_gains_follow_their_definitions() -> None:
    # baseline: conv 100 MACs in 1 s, pool 1 s; branchy: stage 0 conv 20 MACs in 1 s and
    # pool 1 s, head 0 linear 5 MACs in 0.1 s, stage 1 conv 80 MACs in 0.8 s, head 1 free
    base = [Layer("stage 0", "Conv2d", (1,), 100, 1.0), Layer("stage 0", "MaxPool2d", (1,), 0, 1.0),
            Layer("head 0", "Linear", (1,), 0, 0.0)]  # fmt: skip
    branchy = [
        Layer("stage 0", "Conv2d", (1,), 20, 1.0),
        Layer("stage 0", "MaxPool2d", (1,), 0, 1.0),
        Layer("head 0", "Linear", (1,), 5, 0.1),
        Layer("stage 1", "Conv2d", (1,), 80, 0.8),
        Layer("head 1", "Linear", (1,), 0, 0.0),
    ]
    g = layer_profile.gains(branchy, base, [0.5, 0.5])
    # MACs: exit 0 costs 25, exit 1 costs 105: 100 / (0.5 * 25 + 0.5 * 105)
    assert g["flop_ideal_gain"] == pytest.approx(100 / 65)
    # seconds: exit 0 2.1, exit 1 2.9; baseline 2.0
    assert g["time_ideal_gain"] == pytest.approx(2.0 / 2.5)
    # best rate 100 MAC/s (the stage-1 conv and baseline conv): convs cost MACs/100
    assert g["best_mac_rate_gmacs"] == pytest.approx(100 / 1e9)
    ideal_exit0, ideal_exit1 = 0.2 + 1.0 + 0.05, 0.2 + 1.0 + 0.05 + 0.8
    assert g["ideal_conv_gain"] == pytest.approx(2.0 / (0.5 * ideal_exit0 + 0.5 * ideal_exit1))
