"""Stage-level batching: samples continuing past an exit pooled across batches."""

from __future__ import annotations

import math

import pytest
import torch

import models
from models.captured import CapturedExecutor
from models.engine import TorchExecutor, early_exit
from models.stage_pool import StagePool
from testsupport.checkpoints import sharpen_heads
from testsupport.exits import assert_same_exits, spread_thresholds


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(name: str) -> models.BranchyNet:
    torch.manual_seed(0)
    return sharpen_heads(models.build_model(name)).eval()


@pytest.mark.parametrize("name", ["b-alexnet", "b-lenet", "lenet"])
def test_every_batch_gets_the_eager_engines_answers_in_input_order(name: str) -> None:
    net = make(name)
    x = torch.randn(120, *net.input_shape)
    thresholds = spread_thresholds(net, x) if net.num_exits > 1 else []
    clock = FakeClock()
    pool = StagePool(CapturedExecutor(net, buckets=(1, 8, 32)), thresholds, target=32,
                     max_delay_s=1.0, clock=clock)  # fmt: skip
    sizes = [16, 1, 7, 0, 16, 30, 16, 34]  # odd sizes, one empty, one above the target
    batches, tickets, got = [], [], {}
    start = 0
    for s in sizes:
        batches.append(x[start : start + s])
        tickets.append(pool.submit(x[start : start + s]))
        start += s
        got.update(pool.pop_finished())
        clock.now += 0.1
    pool.flush()
    got.update(pool.pop_finished())
    assert pool.waiting == 0 and pool.pop_finished() == {}
    assert sorted(got) == tickets  # every batch answered once
    eager = TorchExecutor(net)
    for xb, tk in zip(batches, tickets, strict=True):
        assert_same_exits(got[tk], early_exit(eager, xb, thresholds))
    if net.num_exits > 1:
        # later segments ran on pooled batches: fewer runs than batches, none above target
        runs, samples = pool.segment_runs[1], pool.segment_samples[1]
        assert 0 < runs < len([s for s in sizes if s])
        assert samples / runs > 8


def test_a_segment_waits_for_its_target_or_its_delay() -> None:
    net = make("b-alexnet")
    x = torch.randn(64, *net.input_shape)
    clock = FakeClock()
    # nobody leaves early: every sample continues to the last segment
    pool = StagePool(CapturedExecutor(net), [0.0, 0.0], target=24, max_delay_s=0.5, clock=clock)
    pool.submit(x[:10])
    assert pool.waiting == 10 and pool.segment_runs[1] == 0  # 10 < 24: waits
    clock.now = 0.4
    pool.submit(x[10:20])
    assert pool.waiting == 20 and pool.pop_finished() == {}
    clock.now = 0.5  # the first batch has waited max_delay_s
    pool.run_due()
    assert pool.waiting == 0 and sorted(pool.pop_finished()) == [0, 1]
    assert pool.segment_samples[1] == 20 and pool.segment_runs[1] == 1
    pool.submit(x[20:50])  # 30 >= 24: runs 24 at once, keeps 6
    assert pool.segment_samples[1] == 44 and pool.waiting == 6
    clock.now = 2.0
    pool.run_due()
    results = pool.pop_finished()
    assert list(results) == [2] and pool.waiting == 0
    assert_same_exits(results[2], early_exit(TorchExecutor(net), x[20:50], [0.0, 0.0]))


def test_per_sample_thresholds_travel_with_their_samples() -> None:
    net = make("b-alexnet")
    x = torch.randn(40, *net.input_shape)
    t = torch.rand(40, 2) * math.log(10)
    t[::4] = math.inf
    pool = StagePool(CapturedExecutor(net), [0.1, 0.1], target=64, max_delay_s=10.0)
    a, b = pool.submit(x[:25], t[:25]), pool.submit(x[25:], t[25:])
    pool.flush()
    got = pool.pop_finished()
    eager = TorchExecutor(net)
    assert_same_exits(got[a], early_exit(eager, x[:25], t[:25]))
    assert_same_exits(got[b], early_exit(eager, x[25:], t[25:]))


def test_bad_settings_and_thresholds_are_refused() -> None:
    cap = CapturedExecutor(make("b-lenet"))
    with pytest.raises(ValueError, match="target"):
        StagePool(cap, [0.1], target=0)
    with pytest.raises(ValueError, match="max_delay_s"):
        StagePool(cap, [0.1], max_delay_s=-1)
    with pytest.raises(ValueError, match="threshold"):
        StagePool(cap, [0.1]).submit(torch.randn(2, 1, 28, 28), [0.1, 0.2])
