"""The report generator end to end: every file, and numbers that agree with each other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import models
from training import evaluate, timing, train


def trained(data_dir: Path, out: Path, model: str, dataset: str, *extra: str) -> Path:
    argv = [
        "--model", model, "--dataset", dataset, "--data-dir", str(data_dir),
        "--val-size", "60", "--batch-size", "32", "--threads", "1", "--no-progress",
        "--epochs", "1", "--out", str(out), "--work-dir", str(out) + "-work",
        "--cache-dir", str(out.parent / "cache"), *extra,
    ]  # fmt: skip
    path = train.main(train.parse_config(argv))
    assert path is not None
    return path


def run_evaluate(data_dir: Path, out: Path, *argv: str) -> dict:
    args = evaluate.get_args_parser().parse_args(
        [
            *argv,
            "--data-dir",
            str(data_dir),
            "--cache-dir",
            str(out.parent / "cache"),
            "--latency-samples",
            "20",
            "--repeats",
            "1",
            "--out",
            str(out),
        ]
    )
    return evaluate.main(args)


def check_report(out: Path, report: dict, *, plots: set[str]) -> None:
    assert {p.name for p in out.iterdir()} == {"report.md", "report.json", *plots}
    for name in plots:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["branchy"]["accuracy"] == report["branchy"]["accuracy"]
    md = (out / "report.md").read_text()
    assert "| Network | Acc (%) | Time (ms) | Gain | Thresholds | Exit (%) |" in md
    assert "Throughput gain | FLOP-ideal gain | Time-ideal gain |" in md
    assert "Throughput gain / time-ideal gain = " in md
    b, base = on_disk["branchy"], on_disk["baseline"]
    assert sum(b["exit_shares"]) == pytest.approx(1.0)
    # the engine's accuracy and exit shares equal what the calibration maths predicts
    # from the same test entropies, so the sweep and the measured point agree
    g = on_disk["gains"]
    assert g["flop_ideal"] == pytest.approx(base["exit_macs"][-1] / b["expected_macs"])
    assert g["latency"] == pytest.approx(base["latency_ms"]["median"] / b["latency_ms"]["median"])
    # time-ideal: both nets' zero-bookkeeping time per image from their segment times
    for r in (b, base):
        seg = r["segment_us_per_image"]
        assert len(seg["stages"]) == len(seg["heads"]) == len(r["exit_macs"])
        assert min(seg["stages"] + seg["heads"]) > 0
        segments = timing.SegmentTimes(seg["stages"], seg["heads"])
        predicted = timing.predicted_seconds_per_image(segments, r["exit_shares"])
        assert r["predicted_us_per_image"] == pytest.approx(predicted)
        assert r["measured_us_per_image"] == pytest.approx(1e6 / r["throughput_img_s"])
    assert g["time_ideal"] > 0
    assert g["time_ideal"] == pytest.approx(
        base["predicted_us_per_image"] / b["predicted_us_per_image"]
    )
    assert g["time_ideal_measured_baseline"] == pytest.approx(
        base["measured_us_per_image"] / b["predicted_us_per_image"]
    )
    assert g["throughput_vs_time_ideal"] == pytest.approx(g["throughput"] / g["time_ideal"])
    assert f"| {g['time_ideal']:.2f}x |" in md
    assert b["latency_ms"]["samples"] == 20 and b["throughput_img_s"] > 0
    assert on_disk["sweeps"]["original"] and on_disk["frontier"]
    assert on_disk["versions"]["torch"] and on_disk["machine"]["cpu_count"]
    assert len(b["entropy"]) == len(b["exit_macs"])


def test_report_for_b_lenet(mnist_dir: Path, tmp_path: Path) -> None:
    branchy = trained(mnist_dir, tmp_path / "b-lenet", "b-lenet", "mnist")
    base = trained(mnist_dir, tmp_path / "lenet", "lenet", "mnist")
    out = tmp_path / "report"
    report = run_evaluate(mnist_dir, out, "--checkpoint", str(branchy), "--baseline", str(base))
    check_report(
        out,
        report,
        plots={"threshold_exit_share.png", "accuracy_vs_cost.png", "entropy_hist.png"},
    )
    ckpt = models.load_checkpoint(branchy)
    assert report["branchy"]["thresholds"] == ckpt.thresholds
    point = models.evaluate_thresholds(ckpt.calibration, ckpt.model.exit_macs(), ckpt.thresholds)
    assert report["validation_point"]["accuracy"] == pytest.approx(point.accuracy)
    assert report["test_samples"] == 200


def test_retargeted_thresholds_come_from_validation_data(mnist_dir: Path, tmp_path: Path) -> None:
    branchy = trained(mnist_dir, tmp_path / "b", "b-lenet", "mnist")
    report = run_evaluate(
        mnist_dir, tmp_path / "r", "--checkpoint", str(branchy), "--target-accuracy", "0.2",
        "--no-plots",
    )  # fmt: skip
    ckpt = models.load_checkpoint(branchy)
    expected = models.choose_thresholds(ckpt.calibration, ckpt.model.exit_macs(), target=0.2)
    assert report["branchy"]["thresholds"] == pytest.approx(list(expected.thresholds))
    assert report["baseline"] is None


def test_resnet_pipeline_smoke_with_ablation_plot(cifar_dir: Path, tmp_path: Path) -> None:
    """B-ResNet's whole pipeline (train, calibrate, evaluate) on a depth-20 trunk, and the
    B-AlexNet branch-depth ablation figure from two short runs."""
    branchy = trained(cifar_dir, tmp_path / "b-resnet20", "b-resnet20", "cifar10")
    base = trained(cifar_dir, tmp_path / "resnet20", "resnet20", "cifar10")
    ablation = [
        trained(
            cifar_dir,
            tmp_path / f"b-alexnet-k{k}",
            "b-alexnet",
            "cifar10",
            "--b1-extra-convs",
            str(k),
        )
        for k in (0, 2)
    ]
    out = tmp_path / "report"
    report = run_evaluate(
        cifar_dir, out, "--checkpoint", str(branchy), "--baseline", str(base),
        "--ablation", *map(str, ablation),
    )  # fmt: skip
    check_report(
        out,
        report,
        plots={
            "threshold_exit_share.png", "accuracy_vs_cost.png", "entropy_hist.png",
            "ablation.png",
        },
    )  # fmt: skip
    assert report["branchy"]["name"] == "b-resnet20" and len(report["branchy"]["exit_macs"]) == 3
    assert [r["b1_extra_convs"] for r in report["ablation"]] == [0, 2]
