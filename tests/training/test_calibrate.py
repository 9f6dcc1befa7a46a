"""Offline re-calibration (``python -m training.calibrate``) of a trained checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import models
from training import calibrate, train


@pytest.fixture(scope="module")
def trained(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("calib")
    out = {}
    for name in ("b-lenet", "lenet"):
        argv = [
            "--model", name, "--dataset", "mnist", "--data-dir", str(mnist_dir),
            "--val-size", "200", "--batch-size", "64", "--threads", "1", "--no-progress",
            "--epochs", "1", "--out", str(root / name), "--work-dir", str(root / f"{name}-w"),
        ]  # fmt: skip
        path = train.main(train.parse_config(argv))
        assert path is not None
        out[name] = path
    return out


def copy_of(checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the session's trained checkpoint, for a test to rewrite."""
    return Path(shutil.copytree(checkpoint, tmp_path / checkpoint.name))


def test_match_baseline_picks_the_cheapest_thresholds_at_the_baselines_accuracy(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    ckpt_dir = copy_of(trained["b-lenet"], tmp_path)
    before = models.load_checkpoint(ckpt_dir)
    base = models.load_checkpoint(trained["lenet"])
    target = base.metrics["val_exit_accuracy"][-1]

    point = calibrate.main(
        ["--checkpoint", str(ckpt_dir), "--match-baseline", str(trained["lenet"])]
    )

    after = models.load_checkpoint(ckpt_dir)
    assert point["accuracy"] >= target
    want = models.choose_thresholds(before.calibration, before.model.exit_macs(), target=target)
    assert after.thresholds == pytest.approx(list(want.thresholds))
    rule = after.metrics["calibration_rule"]
    assert rule["target_accuracy"] == target and rule["match_baseline"] == str(trained["lenet"])
    # the old choice is kept as history; weights and calibration data are untouched
    assert after.metrics["calibration_history"][0]["point"] == before.metrics["val_calibrated"]
    for k, v in before.model.state_dict().items():
        assert torch.equal(v, after.model.state_dict()[k]), k
    assert torch.equal(before.calibration.entropy, after.calibration.entropy)


def test_tolerance_rule_and_a_baseline_from_another_split_is_refused(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    ckpt_dir = copy_of(trained["b-lenet"], tmp_path)
    point = calibrate.main(["--checkpoint", str(ckpt_dir), "--tolerance", "1.0"])
    macs = models.load_checkpoint(ckpt_dir).model.exit_macs()
    # any accuracy will do, so every sample leaves at the first exit
    assert point["exit_shares"][0] == 1.0
    assert point["relative_cost"] == pytest.approx(macs[0] / macs[-1])
    assert models.load_checkpoint(ckpt_dir).thresholds == pytest.approx(point["thresholds"])

    other = tmp_path / "lenet-other-split"
    shutil.copytree(trained["lenet"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["provenance"]["split"]["seed"] = 7
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="validation split differs"):
        calibrate.main(["--checkpoint", str(ckpt_dir), "--match-baseline", str(other)])
    with pytest.raises(ValueError, match="plain"):
        calibrate.main(["--checkpoint", str(ckpt_dir), "--match-baseline", str(ckpt_dir)])


def test_recollect_adds_predictions_without_touching_weights_or_thresholds(
    trained: dict[str, Path], tmp_path: Path, mnist_dir: Path
) -> None:
    ckpt_dir = copy_of(trained["b-lenet"], tmp_path)
    # make it look like a checkpoint from before predictions were collected
    before = models.load_checkpoint(ckpt_dir)
    assert before.calibration is not None
    old = models.CalibrationData(before.calibration.entropy, before.calibration.correct)
    models.save_calibration(ckpt_dir, old)
    assert models.load_checkpoint(ckpt_dir).calibration.prediction is None
    weights = (ckpt_dir / "model.safetensors").read_bytes()

    summary = calibrate.main(
        ["--checkpoint", str(ckpt_dir), "--recollect", "--data-dir", str(mnist_dir)]
    )

    after = models.load_checkpoint(ckpt_dir)
    assert summary["has_predictions"] is True
    assert (ckpt_dir / "model.safetensors").read_bytes() == weights
    assert after.thresholds == before.thresholds
    assert torch.equal(after.calibration.entropy, old.entropy)
    assert torch.equal(after.calibration.prediction, before.calibration.prediction)

    # another split cannot be passed off as this one
    manifest = json.loads((ckpt_dir / "manifest.json").read_text())
    manifest["provenance"]["split"]["seed"] = 3
    (ckpt_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="differs"):
        calibrate.main(["--checkpoint", str(ckpt_dir), "--recollect", "--data-dir", str(mnist_dir)])


def test_certified_rule_sets_the_certified_thresholds(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    ckpt_dir = copy_of(trained["b-lenet"], tmp_path)
    before = models.load_checkpoint(ckpt_dir)
    # 200 validation samples: a 1 % budget cannot be certified (needs 299 even with no loss)
    with pytest.raises(models.NotCertifiable):
        calibrate.main(["--checkpoint", str(ckpt_dir), "--max-disagreement", "0.01"])
    out = calibrate.main(
        ["--checkpoint", str(ckpt_dir), "--max-disagreement", "0.2", "--confidence", "0.9"]
    )
    want = models.certify_thresholds(
        before.calibration, before.model.exit_macs(), epsilon=0.2, delta=0.1
    )
    after = models.load_checkpoint(ckpt_dir)
    assert after.thresholds == pytest.approx(list(want.point.thresholds))
    assert out["certified_bound"] <= 0.2 and out["risk"] == "disagreement"
    assert after.metrics["calibration_rule"]["max_disagreement"] == 0.2
