"""Per-exit multiply-accumulate counts."""

import itertools

import pytest

import models
from models.macs import stage_and_head_macs


def test_lenet_first_conv_by_formula() -> None:
    net = models.build_model("b-lenet")
    stages, heads = stage_and_head_macs(net)
    # Conv(1->5, k5, p3) on 28x28: 5 x 30 x 30 outputs, 25 MACs each
    assert stages[0] == 5 * 30 * 30 * 25
    # B1: Conv(5->10, k3, p1) on 15x15 + FC(640->10)
    assert heads[0] == 10 * 15 * 15 * 5 * 9 + 640 * 10


@pytest.mark.parametrize("name", models.list_models())
def test_exit_macs_cumulative_and_consistent(name: str) -> None:
    net = models.build_model(name)
    macs = net.exit_macs()
    assert len(macs) == net.num_exits
    assert all(a < b for a, b in itertools.pairwise(macs))
    stages, heads = stage_and_head_macs(net)
    assert macs[-1] == sum(stages) + sum(heads)


@pytest.mark.parametrize(
    ("plain", "branchy"),
    [("lenet", "b-lenet"), ("alexnet", "b-alexnet"), ("resnet110", "b-resnet110")],
)
def test_plain_cost_is_branchy_cost_without_side_heads(plain: str, branchy: str) -> None:
    b = models.build_model(branchy)
    _, heads = stage_and_head_macs(b)
    assert models.build_model(plain).exit_macs() == [b.exit_macs()[-1] - sum(heads[:-1])]
