"""Checkpoint round trip and every kind of damaged checkpoint."""

import json
import math
import pickle
from pathlib import Path

import pytest
import torch

import models
from models.checkpoint import CALIBRATION, MANIFEST, WEIGHTS

SPEC_RGB = models.InputSpec(3, 32, 32, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
SPEC_GREY = models.InputSpec(1, 28, 28, (0.13,), (0.31,))
CLASSES = [f"c{i}" for i in range(10)]


def calib(n: int, exits: int) -> models.CalibrationData:
    return models.CalibrationData(
        entropy=torch.rand(n, exits) * 2, correct=torch.rand(n, exits) > 0.3
    )


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    net = models.build_model("b-alexnet")
    return models.save_checkpoint(
        tmp_path / "ck",
        net,
        class_names=CLASSES,
        input_spec=SPEC_RGB,
        thresholds=[0.05, math.inf],
        calibration=calib(50, 3),
        metrics={"val_accuracy": 0.5},
        provenance={"command": "test"},
    )


@pytest.mark.parametrize("name", ["lenet", "b-lenet", "alexnet", "b-alexnet", "b-resnet20"])
def test_round_trip_is_bit_identical(tmp_path: Path, name: str) -> None:
    net = models.build_model(name).eval()
    spec = SPEC_GREY if net.input_shape[0] == 1 else SPEC_RGB
    t = [0.1 * (i + 1) for i in range(net.num_exits - 1)]
    models.save_checkpoint(tmp_path, net, class_names=CLASSES, input_spec=spec, thresholds=t)
    ck = models.load_checkpoint(tmp_path)
    assert not ck.model.training
    assert ck.thresholds == pytest.approx(t)
    assert ck.class_names == CLASSES and ck.input_spec == spec
    x = torch.randn(5, *net.input_shape)
    with torch.no_grad():
        for a, b in zip(net(x), ck.model(x), strict=True):
            assert torch.equal(a, b)
    for k, v in net.state_dict().items():
        assert torch.equal(v, ck.model.state_dict()[k]), k


def test_manifest_contents(saved: Path) -> None:
    manifest = json.loads((saved / MANIFEST).read_text())
    assert manifest["format_version"] == 1
    assert manifest["architecture"] == {
        "name": "b-alexnet",
        "config": {"num_classes": 10, "in_channels": 3, "branches": True, "b1_extra_convs": 1},
    }
    assert manifest["thresholds"] == [0.05, "inf"]  # JSON has no infinity
    assert manifest["input"]["mean"] == [0.49, 0.48, 0.45]
    assert manifest["exit_macs"] == models.build_model("b-alexnet").exit_macs()
    ck = models.load_checkpoint(saved)
    assert ck.thresholds == [0.05, math.inf]
    assert ck.metrics == {"val_accuracy": 0.5} and ck.provenance == {"command": "test"}
    assert ck.calibration is not None and ck.calibration.entropy.shape == (50, 3)
    assert ck.calibration.correct.dtype == torch.bool


def test_non_default_config_round_trips(tmp_path: Path) -> None:
    net = models.build_model("b-alexnet", b1_extra_convs=3, num_classes=4)
    models.save_checkpoint(tmp_path, net, class_names=list("abcd"), input_spec=SPEC_RGB)
    ck = models.load_checkpoint(tmp_path)
    assert ck.model.config.b1_extra_convs == 3 and ck.thresholds == [0.0, 0.0]


def _edit_manifest(path: Path, **changes: object) -> None:
    m = json.loads((path / MANIFEST).read_text())
    m.update(changes)
    (path / MANIFEST).write_text(json.dumps(m))


DAMAGE = {
    "missing directory": (lambda p: p.rename(p.with_name("gone")), "not a directory"),
    "missing manifest": (lambda p: (p / MANIFEST).unlink(), "missing manifest.json"),
    "missing weights": (lambda p: (p / WEIGHTS).unlink(), "missing model.safetensors"),
    "bad json": (lambda p: (p / MANIFEST).write_text("{not json"), "not valid JSON"),
    "not a manifest": (lambda p: (p / MANIFEST).write_text("[1, 2]"), "not a branchy-checkpoint"),
    "future version": (lambda p: _edit_manifest(p, format_version=99), "format_version 99"),
    "unknown architecture": (
        lambda p: _edit_manifest(p, architecture={"name": "vgg16", "config": {}}),
        "unknown model 'vgg16'",
    ),
    "unknown config option": (
        lambda p: _edit_manifest(p, architecture={"name": "b-alexnet", "config": {"x": 1}}),
        "unknown option",
    ),
    "wrong shapes": (
        lambda p: _edit_manifest(
            p, architecture={"name": "b-alexnet", "config": {"b1_extra_convs": 0}}
        ),
        "unexpected",
    ),
    "other architecture": (
        lambda p: _edit_manifest(p, architecture={"name": "alexnet", "config": {}}),
        "do not match architecture 'alexnet'",
    ),
    "shape mismatch": (
        lambda p: _edit_manifest(
            p, architecture={"name": "b-alexnet", "config": {"num_classes": 7}}
        ),
        "has shape",
    ),
    "truncated weights": (
        lambda p: (p / WEIGHTS).write_bytes((p / WEIGHTS).read_bytes()[:1000]),
        "cannot read model.safetensors",
    ),
    "pickled weights": (
        lambda p: (p / WEIGHTS).write_bytes(pickle.dumps({"a": 1})),
        "cannot read model.safetensors",
    ),
    "wrong threshold count": (lambda p: _edit_manifest(p, thresholds=[0.1]), "1 threshold"),
    "negative threshold": (lambda p: _edit_manifest(p, thresholds=[-1, 0.1]), ">= 0"),
    "text threshold": (lambda p: _edit_manifest(p, thresholds=["low", 1]), "malformed manifest"),
    "class count": (lambda p: _edit_manifest(p, class_names=["a"]), "1 class name"),
    "input spec": (
        lambda p: _edit_manifest(
            p, input={"channels": 1, "height": 28, "width": 28, "mean": [0], "std": [1]}
        ),
        "does not match",
    ),
    "bad std": (
        lambda p: _edit_manifest(
            p, input={"channels": 3, "height": 32, "width": 32, "mean": [0] * 3, "std": [0] * 3}
        ),
        "std must be",
    ),
    "missing field": (
        lambda p: (p / MANIFEST).write_text(
            json.dumps({"format": "branchy-checkpoint", "format_version": 1})
        ),
        "malformed manifest",
    ),
    "missing calibration": (lambda p: (p / CALIBRATION).unlink(), "calibration.safetensors"),
    "damaged calibration": (
        lambda p: (p / CALIBRATION).write_bytes(b"\x00" * 20),
        "cannot read calibration",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_checkpoint_raises_one_clear_error(saved: Path, case: str) -> None:
    damage, message = DAMAGE[case]
    damage(saved)
    with pytest.raises(models.CheckpointError, match=message):
        models.load_checkpoint(saved)


def test_save_rejects_inconsistent_metadata(tmp_path: Path) -> None:
    net = models.build_model("b-lenet")
    with pytest.raises(models.CheckpointError, match="2 threshold"):
        models.save_checkpoint(
            tmp_path, net, class_names=CLASSES, input_spec=SPEC_GREY, thresholds=[1, 2]
        )
    with pytest.raises(models.CheckpointError, match="does not match"):
        models.save_checkpoint(tmp_path, net, class_names=CLASSES, input_spec=SPEC_RGB)
    with pytest.raises(models.CheckpointError, match="calibration data has 3"):
        models.save_checkpoint(
            tmp_path, net, class_names=CLASSES, input_spec=SPEC_GREY, calibration=calib(5, 3)
        )
    assert not (tmp_path / MANIFEST).exists()


def test_load_to_device_string(saved: Path) -> None:
    ck = models.load_checkpoint(saved, device="cpu")
    assert next(ck.model.parameters()).device.type == "cpu"


def test_calibration_predictions_round_trip_and_old_files_still_load(tmp_path: Path) -> None:
    net = models.build_model("b-lenet")
    n = 40
    pred = torch.randint(0, 10, (n, 2))
    data = models.CalibrationData(torch.rand(n, 2), torch.rand(n, 2) > 0.5, pred)
    path = models.save_checkpoint(
        tmp_path / "ck", net, class_names=CLASSES, input_spec=SPEC_GREY, calibration=data
    )
    back = models.load_checkpoint(path).calibration
    assert back is not None and back.prediction is not None
    assert torch.equal(back.prediction, pred) and back.prediction.dtype == torch.int64
    assert json.loads((path / MANIFEST).read_text())["calibration"]["has_predictions"] is True

    # a calibration file written before predictions were collected: entropy and correct only
    from safetensors.torch import save_file

    save_file(
        {"entropy": data.entropy, "correct": data.correct.to(torch.uint8)}, str(path / CALIBRATION)
    )
    old = models.load_checkpoint(path).calibration
    assert old is not None and old.prediction is None
    assert torch.equal(old.entropy, data.entropy)
    with pytest.raises(ValueError, match="disagreement risk needs them"):
        models.certify_thresholds(old, net.exit_macs(), epsilon=0.5, delta=0.5)


def test_save_calibration_rewrites_only_the_calibration(saved: Path) -> None:
    weights = (saved / WEIGHTS).read_bytes()
    before = json.loads((saved / MANIFEST).read_text())
    n = 30
    fresh = models.CalibrationData(
        torch.rand(n, 3), torch.rand(n, 3) > 0.5, torch.randint(0, 10, (n, 3))
    )
    models.save_calibration(saved, fresh)
    after = json.loads((saved / MANIFEST).read_text())
    assert (saved / WEIGHTS).read_bytes() == weights
    assert {k: v for k, v in after.items() if k != "calibration"} == {
        k: v for k, v in before.items() if k != "calibration"
    }
    assert after["calibration"]["num_samples"] == n
    loaded = models.load_checkpoint(saved).calibration
    assert loaded is not None and loaded.prediction is not None
    assert torch.equal(loaded.prediction, fresh.prediction)
    # predictions must be class indices of the model
    bad = models.CalibrationData(fresh.entropy, fresh.correct, fresh.prediction + 10)
    with pytest.raises(models.CheckpointError, match="class indices"):
        models.save_calibration(saved, bad)
