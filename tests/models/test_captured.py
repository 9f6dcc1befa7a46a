"""The bucketed (on CUDA: graph-captured) executor against the eager engine.

On the CPU it runs the same buckets, padding and in-segment exit masks as on a GPU, only
without capture, so these tests check everything but the capture itself (that is
``scripts/gpu_session.sh``'s ``answers_agree``).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import models
from models.captured import CapturedExecutor
from models.engine import TorchExecutor, early_exit
from testsupport.checkpoints import sharpen_heads
from testsupport.exits import assert_same_exits, spread_thresholds

NETS = ["b-lenet", "lenet", "b-alexnet", "alexnet", "b-resnet20"]
ZOO = Path(__file__).resolve().parents[2] / "zoo"


def make(name: str) -> models.BranchyNet:
    torch.manual_seed(0)
    return sharpen_heads(models.build_model(name)).eval()


@pytest.mark.parametrize("name", NETS)
def test_answers_equal_the_eager_engine_at_odd_sizes_and_batch_one(name: str) -> None:
    net = make(name)
    x = torch.randn(37, *net.input_shape)
    thresholds = spread_thresholds(net, x) if net.num_exits > 1 else []
    cap = CapturedExecutor(net, buckets=(1, 4, 16))  # 37 is beyond the largest bucket
    eager = TorchExecutor(net)
    for n in (0, 1, 3, 5, 16, 17, 37):
        want = early_exit(eager, x[:n], thresholds)
        assert_same_exits(cap.early_exit(x[:n], thresholds), want)  # decisions in the segment
        assert_same_exits(early_exit(cap, x[:n], thresholds), want)  # as a plain Executor
    if net.num_exits > 1:  # the thresholds really split the batch
        assert len(set(cap.early_exit(x, thresholds).exit_index.tolist())) > 1


def test_padding_follows_the_buckets() -> None:
    cap = CapturedExecutor(make("b-lenet"), buckets=(1, 2, 8))
    assert [cap.bucket(k) for k in (1, 2, 3, 8, 9, 100)] == [1, 2, 8, 8, 9, 100]
    assert cap.capture is False and cap.captured == 0


@pytest.mark.parametrize("name", ["b-alexnet", "b-resnet20"])
def test_everybody_or_nobody_leaving_and_per_sample_thresholds(name: str) -> None:
    net = make(name)
    x = torch.randn(11, *net.input_shape)
    e = net.num_exits - 1
    cap, eager = CapturedExecutor(net), TorchExecutor(net)
    # inf: all leave at exit 0 (nothing continues); 0: nobody leaves before the last
    for value in (math.inf, 0.0):
        got = cap.early_exit(x, [value] * e)
        assert_same_exits(got, early_exit(eager, x, [value] * e))
        assert set(got.exit_index.tolist()) == {0 if value else e}
    per_sample = torch.rand(11, e) * math.log(net.num_classes)
    per_sample[::3] = math.inf
    assert_same_exits(cap.early_exit(x, per_sample), early_exit(eager, x, per_sample))
    assert set(cap.early_exit(x, per_sample).exit_index[::3].tolist()) == {0}


def test_release_hands_back_every_sample_once_in_exit_order() -> None:
    net = make("b-alexnet")
    x = torch.randn(30, *net.input_shape)
    released: list[tuple[list[int], int, torch.Tensor]] = []
    got = CapturedExecutor(net).early_exit(
        x,
        spread_thresholds(net, x),
        release=lambda rows, i, z, e: released.append((rows.tolist(), i, z)),
    )
    assert [i for _, i, _ in released] == sorted(i for _, i, _ in released)
    assert sorted(r for rows, _, _ in released for r in rows) == list(range(30))
    for rows, i, z in released:
        assert all(int(got.exit_index[r]) == i for r in rows)
        torch.testing.assert_close(z, got.logits[rows])


def test_bad_thresholds_and_buckets_are_refused() -> None:
    net = make("b-lenet")
    cap = CapturedExecutor(net)
    with pytest.raises(ValueError, match="threshold"):
        cap.early_exit(torch.randn(2, *net.input_shape), [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        cap.early_exit(torch.randn(2, *net.input_shape), [math.nan])
    for bad in ((), (4, 2), (0, 1), (2, 2)):
        with pytest.raises(ValueError, match="buckets"):
            CapturedExecutor(net, buckets=bad)
    with pytest.raises(ValueError, match="CUDA"):
        CapturedExecutor(net, capture=True)


def test_load_engine_captured_on_the_cpu_serves_the_zoo_like_the_eager_engine() -> None:
    ckpt = models.load_checkpoint(ZOO / "b-alexnet")
    logs: list[str] = []
    engine = models.load_engine(ckpt, runtime="captured", log=logs.append)
    assert engine.runtime == "captured" and "eagerly" in engine.reason and logs
    torch.manual_seed(1)
    x = torch.randn(50, *ckpt.model.input_shape)
    assert_same_exits(
        engine.early_exit(x, ckpt.thresholds), ckpt.model.early_exit(x, ckpt.thresholds)
    )


def test_zoo_agrees_with_the_eager_engine_on_real_test_images() -> None:
    """B-LeNet on 1,000 real MNIST test digits: the same class and exit for each."""
    data = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if not data.is_dir():
        pytest.skip("../shared/data is not there")
    from training.data import load_mnist, normalize

    _, test = load_mnist(data / "mnist")
    ckpt = models.load_checkpoint(ZOO / "b-lenet")
    spec = ckpt.input_spec
    x = normalize(test.images[:1000], torch.tensor(spec.mean), torch.tensor(spec.std))
    want = ckpt.model.early_exit(x, ckpt.thresholds)
    cap = CapturedExecutor(ckpt.model)
    for xb, start in ((x, 0), (x[:77], 0), (x[500:501], 500)):
        got = cap.early_exit(xb, ckpt.thresholds)
        n = xb.shape[0]
        assert torch.equal(got.exit_index, want.exit_index[start : start + n])
        assert torch.equal(got.prediction, want.prediction[start : start + n])


def test_buffers_made_under_inference_mode_serve_calls_outside_it() -> None:
    net = make("b-lenet")
    cap = CapturedExecutor(net)
    x = torch.randn(5, *net.input_shape)
    with torch.inference_mode():  # the service's batcher runs under inference_mode
        inside = cap.early_exit(x, [0.5])
    assert_same_exits(cap.early_exit(x, [0.5]), inside)
