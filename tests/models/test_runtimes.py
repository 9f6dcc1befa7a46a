"""The early-exit engine on the fast CPU runtimes (ONNX Runtime, OpenVINO) against the
eager torch engine: same exits and classes, same contract, clear fallbacks."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from models.onnx_export import ExportError, export_segments
from models.runtimes import openvino_has_bf16
from testsupport.checkpoints import sharpen_heads
from testsupport.exits import assert_same_exits, spread_thresholds

RUNTIMES = ["onnxruntime", "openvino"]
NETS = ["b-lenet", "lenet", "b-alexnet", "alexnet", "b-resnet20"]


def make(name: str) -> models.BranchyNet:
    torch.manual_seed(0)
    return sharpen_heads(models.build_model(name)).eval()


def save(tmp_path: Path, net: models.BranchyNet, thresholds: list[float] | None = None) -> Path:
    c, _, _ = net.input_shape
    spec = models.InputSpec(c, net.input_shape[1], net.input_shape[2], (0.5,) * c, (0.25,) * c)
    names = [str(i) for i in range(net.num_classes)]
    return models.save_checkpoint(
        tmp_path / net.name, net, class_names=names, input_spec=spec, thresholds=thresholds
    )


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("name", NETS)
def test_runtime_gives_the_eager_engines_exits_and_classes(
    tmp_path: Path, name: str, runtime: str
) -> None:
    net = make(name)
    x = torch.randn(48, *net.input_shape)
    thresholds = spread_thresholds(net, x)
    engine = models.load_engine(save(tmp_path, net), runtime=runtime, precision="fp32")
    assert (engine.runtime, engine.precision) == (runtime, "fp32")
    assert_same_exits(engine.early_exit(x, thresholds), net.early_exit(x, thresholds))
    if net.num_exits > 1:  # the batch really split across the exits
        assert len(set(engine.early_exit(x, thresholds).exit_index.tolist())) > 1


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_per_sample_thresholds_order_one_and_empty(tmp_path: Path, runtime: str) -> None:
    net = make("b-alexnet")
    engine = models.load_engine(save(tmp_path, net), runtime=runtime)
    x = torch.randn(12, *net.input_shape)
    # rows alternate between "everyone leaves at exit 0", "at exit 1" and "nobody leaves"
    per_sample = torch.tensor([[math.inf, 0.0], [0.0, math.inf], [0.0, 0.0]] * 4)
    got = engine.early_exit(x, per_sample)
    assert got.exit_index.tolist() == [0, 1, 2] * 4
    assert_same_exits(got, net.early_exit(x, per_sample))
    # input order survives compaction: each row's answer is that row's alone
    for k in range(12):
        one = engine.early_exit(x[k : k + 1], per_sample[k].tolist())
        assert int(one.exit_index) == int(got.exit_index[k])
        torch.testing.assert_close(one.logits[0], got.logits[k], rtol=1e-4, atol=1e-4)
    # a batch of one given as a tensor of thresholds, and an empty batch
    assert_same_exits(
        engine.early_exit(x[:1], per_sample[:1]), net.early_exit(x[:1], per_sample[:1])
    )
    empty = engine.early_exit(x[:0], [0.5, 0.5])
    assert empty.logits.shape == (0, 10) and empty.exit_index.shape == (0,)
    assert empty.entropy.shape == (0,)
    with pytest.raises(ValueError, match="expected 2 threshold"):
        engine.early_exit(x, [0.5])
    with pytest.raises(ValueError, match="NaN"):
        engine.early_exit(x[:1], [math.nan, 0.5])


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_release_hands_back_every_sample_once_as_its_exit_is_decided(
    tmp_path: Path, runtime: str
) -> None:
    net = make("b-alexnet")
    engine = models.load_engine(save(tmp_path, net), runtime=runtime)
    x = torch.randn(30, *net.input_shape)
    thresholds = spread_thresholds(net, x)
    released: list[tuple[list[int], int, torch.Tensor]] = []
    got = engine.early_exit(
        x, thresholds, release=lambda rows, i, z, e: released.append((rows.tolist(), i, z.clone()))
    )
    assert [i for _, i, _ in released] == sorted(i for _, i, _ in released)  # in exit order
    seen = [r for rows, _, _ in released for r in rows]
    assert sorted(seen) == list(range(30))
    for rows, i, z in released:
        assert all(int(got.exit_index[r]) == i for r in rows)
        torch.testing.assert_close(z, got.logits[rows])


def test_zoo_agrees_with_torch_on_real_test_images() -> None:
    """The committed checkpoints on real MNIST/CIFAR test images: every runtime in fp32
    gives the eager engine's class and exit for every image of the sample."""
    data = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if not data.is_dir():
        pytest.skip("../shared/data is not there")
    from training.data import load_mnist, normalize

    _, test = load_mnist(data / "mnist")
    ckpt = models.load_checkpoint(Path(__file__).resolve().parents[2] / "zoo" / "b-lenet")
    spec = ckpt.input_spec
    x = normalize(test.images[:2000], torch.tensor(spec.mean), torch.tensor(spec.std))
    ref = ckpt.model.early_exit(x, ckpt.thresholds)
    for runtime in RUNTIMES:
        engine = models.load_engine(ckpt, runtime=runtime)
        got = engine.early_exit(x, ckpt.thresholds)
        assert torch.equal(got.exit_index, ref.exit_index), runtime
        assert torch.equal(got.prediction, ref.prediction), runtime


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def test_a_layer_without_an_onnx_form_falls_back_to_torch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    net = make("b-lenet")
    path = save(tmp_path, net)
    ckpt = models.load_checkpoint(path)
    ckpt.model.heads[0][1] = Swish()  # type: ignore[index]
    with pytest.raises(ExportError, match="Swish"):
        export_segments(ckpt.model)
    x = torch.randn(8, *net.input_shape)
    with caplog.at_level(logging.WARNING, logger="models.runtimes"):
        engine = models.load_engine(ckpt, runtime="onnxruntime")
    assert engine.runtime == "torch"
    assert "onnxruntime fp32 unavailable" in engine.reason and "Swish" in engine.reason
    assert "falling back to torch" in caplog.text
    assert_same_exits(engine.early_exit(x, [0.3]), ckpt.model.early_exit(x, [0.3]))
    auto = models.load_engine(ckpt)  # auto: every exporting runtime is skipped, and said
    assert auto.runtime == "torch" and "skipped" in auto.reason and "Swish" in auto.reason


def test_auto_picks_an_agreeing_runtime_and_says_why(tmp_path: Path) -> None:
    net = make("b-lenet")
    engine = models.load_engine(save(tmp_path, net))
    assert engine.runtime in ("torch", *RUNTIMES) and engine.precision == "fp32"
    assert set(engine.timings) == {"torch", *RUNTIMES}
    assert "fastest" in engine.reason
    best = min(engine.timings, key=lambda r: math.prod(engine.timings[r].values()))
    assert engine.runtime == best


def test_bf16_only_where_the_cpu_has_it(tmp_path: Path) -> None:
    net = make("b-lenet")
    engine = models.load_engine(save(tmp_path, net), runtime="openvino", precision="bf16")
    x = torch.randn(64, *net.input_shape)
    if openvino_has_bf16():
        assert (engine.runtime, engine.precision) == ("openvino", "bf16")
        assert "calibrated in fp32" in engine.reason
        ref = net.early_exit(x, [0.0])
        agree = (engine.early_exit(x, [0.0]).prediction == ref.prediction).float().mean()
        assert agree >= 0.9
    else:
        assert engine.runtime == "torch" and "no native bf16" in engine.reason


def test_unknown_runtime_or_precision_is_refused(tmp_path: Path) -> None:
    path = save(tmp_path, make("lenet"))
    with pytest.raises(ValueError, match="unknown runtime"):
        models.load_engine(path, runtime="tensorrt")
    with pytest.raises(ValueError, match="unknown precision"):
        models.load_engine(path, precision="int4")
