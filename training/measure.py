"""Measuring for ``training.evaluate``: test inputs, thresholds, and everything timed or
counted for each network on the test split (accuracy, exit shares, latency, throughput,
segment times, entropies).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import models
from models import BranchyNet, CalibrationData, Checkpoint
from models.calibration import collect_calibration
from training import data as data_mod
from training import timing

# A finer grid than the original: log-spaced from 1e-5 to ln(10) plus the original values.
FINE_GRID_POINTS = 48


@dataclass
class NetResult:
    """Everything measured for one network on the test split."""

    name: str
    checkpoint: str
    exit_accuracy: list[float]
    thresholds: list[float]
    accuracy: float
    exit_shares: list[float]
    latency: timing.LatencyResult
    throughput: float
    segments: timing.SegmentTimes
    exit_macs: list[int]
    expected_macs: float
    calibration: CalibrationData
    num_classes: int
    latency_class_counts: list[int] | None = None  # images per class in the latency sample


def load_inputs(
    ckpt: Checkpoint, args: argparse.Namespace, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Normalised test images on ``device`` and their labels (CPU)."""
    name = args.dataset or ckpt.provenance.get("dataset")
    if name is None:
        raise ValueError(f"{ckpt.path}: no dataset recorded; pass --dataset")
    data_dir = args.data_dir or data_mod.default_data_dir()
    test, classes = data_mod.load_test_split(name, data_dir, cache_dir=args.cache_dir)
    if list(classes) != ckpt.class_names:
        raise ValueError(f"test classes {classes} differ from the checkpoint's {ckpt.class_names}")
    if args.limit:
        test = data_mod.Split(test.images[: args.limit], test.labels[: args.limit])
    spec = ckpt.input_spec
    mean = torch.tensor(spec.mean, device=device)
    std = torch.tensor(spec.std, device=device)
    return data_mod.normalize(test.images.to(device), mean, std), test.labels


def choose(ckpt: Checkpoint, args: argparse.Namespace) -> list[float]:
    """The checkpoint's thresholds, or new ones from its validation calibration data."""
    if args.tolerance is None and args.target_accuracy is None:
        return list(ckpt.thresholds)
    if ckpt.calibration is None:
        raise ValueError(f"{ckpt.path}: no calibration data to re-choose thresholds from")
    tol = 0.005 if args.tolerance is None else args.tolerance
    point = models.choose_thresholds(
        ckpt.calibration, ckpt.model.exit_macs(), tolerance=tol, target=args.target_accuracy
    )
    return list(point.thresholds)


def measure_all(
    runs: list[tuple[Checkpoint, list[float]]],
    x: Tensor,
    labels: Tensor,
    args: argparse.Namespace,
) -> list[NetResult]:
    """Per-exit accuracy, engine accuracy and exit shares, latency, throughput and
    per-segment times of several networks on the same inputs.

    Batch-1 latency is timed on ``args.latency_samples`` class-balanced test images
    (:func:`training.data.class_balanced_indices`; all of them by default). The timings
    interleave the networks (batch-1 latency in four chunks of the samples,
    alternating which network goes first; throughput and segment times one repeat each
    in turn, with the same threads and oneDNN setting), so that a change in machine
    load during the run hits all of them alike.
    """
    n_lat = min(args.latency_samples or x.shape[0], x.shape[0])
    # the same number of images from every class: the first N in folder order are
    # only a few classes (CIFAR-10: airplanes and automobiles), which exit differently
    lat_idx = data_mod.class_balanced_indices(labels, n_lat)
    x_lat = x[lat_idx.to(x.device)]
    cpu = x.device.type == "cpu"
    threads = torch.get_num_threads()
    cuts = [round(n_lat * i / 4) for i in range(5)]
    lat_parts: list[list[timing.LatencyResult]] = [[] for _ in runs]
    rates: list[list[float]] = [[] for _ in runs]
    segments: list[list[timing.SegmentTimes]] = [[] for _ in runs]
    try:
        if cpu:
            torch.set_num_threads(args.latency_threads)
        with torch.backends.mkldnn.flags(enabled=args.latency_onednn == "on"):
            for c in range(4):
                for k in _turns(len(runs), c):
                    ckpt, thr = runs[k]
                    part = x_lat[cuts[c] : cuts[c + 1]]
                    lat_parts[k].append(
                        timing.latency_batch1(ckpt.model, part, thr, warmup=50 if c == 0 else 10)
                    )
        if cpu:
            torch.set_num_threads(args.throughput_threads or threads)
        with torch.backends.mkldnn.flags(enabled=args.throughput_onednn == "on"):
            for r in range(args.repeats):
                for k in _turns(len(runs), r):
                    ckpt, thr = runs[k]
                    rates[k].append(
                        timing.throughput(ckpt.model, x, thr, batch_size=args.batch_size, repeats=1)
                    )
                    segments[k].append(
                        timing.segment_times(ckpt.model, x, batch_size=args.batch_size)
                    )
    finally:
        torch.set_num_threads(threads)
    results = []
    for k, (ckpt, thr) in enumerate(runs):
        lat = timing.LatencyResult(
            [s for p in lat_parts[k] for s in p.seconds],
            [e for p in lat_parts[k] for e in p.exits],
            [q for p in lat_parts[k] for q in p.predictions],
        )
        best = timing.SegmentTimes.best(segments[k])
        result = _accuracy(ckpt, thr, x, labels, lat, max(rates[k]), best)
        counts = torch.bincount(labels[lat_idx], minlength=result.num_classes)
        result.latency_class_counts = counts.tolist()
        results.append(result)
    return results


def _turns(n: int, round_: int) -> list[int]:
    # alternate the order in which the networks are timed from one round to the next
    return list(range(n)) if round_ % 2 == 0 else list(reversed(range(n)))


def _accuracy(
    ckpt: Checkpoint,
    thresholds: list[float],
    x: Tensor,
    labels: Tensor,
    lat: timing.LatencyResult,
    tput: float,
    segments: timing.SegmentTimes,
) -> NetResult:
    """The engine's own accuracy and exit shares over the whole split, plus per-exit
    accuracy with every sample through every exit."""
    model = ckpt.model
    calib = calibration_on(model, x, labels)
    result = _chunked(model, x, thresholds)
    pred, exits = result.prediction.cpu(), result.exit_index.cpu()
    accuracy = float((pred == labels).double().mean())
    shares = torch.bincount(exits, minlength=model.num_exits).double() / x.shape[0]
    macs = model.exit_macs()
    expected = float((shares * torch.tensor(macs, dtype=torch.float64)).sum())
    return NetResult(
        name=model.name,
        checkpoint=str(ckpt.path),
        exit_accuracy=calib.correct.double().mean(0).tolist(),
        thresholds=thresholds,
        accuracy=accuracy,
        exit_shares=shares.tolist(),
        latency=lat,
        throughput=tput,
        segments=segments,
        exit_macs=macs,
        expected_macs=expected,
        calibration=calib,
        num_classes=model.num_classes,
    )


def _chunked(model: BranchyNet, x: Tensor, thresholds: list[float]) -> models.ExitResult:
    parts = [model.early_exit(c, thresholds) for c in x.split(4096)]
    return models.ExitResult(
        torch.cat([p.logits for p in parts]),
        torch.cat([p.exit_index for p in parts]),
        torch.cat([p.entropy for p in parts]),
    )


def calibration_on(model: BranchyNet, x: Tensor, labels: Tensor) -> CalibrationData:
    """Every exit's entropy, correctness and predicted class on normalised inputs ``x``."""
    return collect_calibration(model, zip(x.split(1024), labels.split(1024), strict=True))


def fine_grid(num_classes: int) -> list[float]:
    """Log-spaced thresholds from 1e-5 to ln(C), merged with the original grid."""
    hi = math.log(num_classes)
    logs = torch.linspace(math.log(1e-5), math.log(hi), FINE_GRID_POINTS).exp().tolist()
    return sorted({*logs, *models.ORIGINAL_GRID})


def entropy_summary(calib: CalibrationData, num_classes: int, bins: int = 30) -> list[dict]:
    """Per exit: a histogram over [0, ln C] and quantiles, for correct and wrong answers."""
    hi = math.log(num_classes)
    out = []
    for i in range(calib.num_exits):
        e = calib.entropy[:, i]
        ok = calib.correct[:, i]
        q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
        out.append(
            {
                "exit": i,
                "bin_edges": torch.linspace(0, hi, bins + 1).tolist(),
                "hist_correct": torch.histc(e[ok], bins, 0, hi).int().tolist(),
                "hist_wrong": torch.histc(e[~ok], bins, 0, hi).int().tolist(),
                "quantiles": dict(
                    zip(["10", "25", "50", "75", "90"], e.quantile(q).tolist(), strict=True)
                ),
                "mean": float(e.mean()),
            }
        )
    return out


def first_exit_curve(calib: CalibrationData, macs: list[int], grid: list[float]) -> list[dict]:
    """The seed's figure: first-exit threshold vs share leaving there (other exits at 0)."""
    rows = []
    for t in grid:
        thr = [t] + [0.0] * (calib.num_exits - 2)
        p = models.evaluate_thresholds(calib, macs, thr)
        rows.append({"threshold": t, "exit0_share": p.exit_shares[0], "accuracy": p.accuracy})
    return rows


def ablation_rows(paths: list[Path], args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Test accuracy of each ablation checkpoint (no timing)."""
    rows = []
    for path in paths:
        ckpt = models.load_checkpoint(path, device=device)
        x, labels = load_inputs(ckpt, args, device)
        calib = calibration_on(ckpt.model, x, labels)
        point = models.evaluate_thresholds(calib, ckpt.model.exit_macs(), ckpt.thresholds)
        rows.append(
            {
                "checkpoint": str(path),
                "b1_extra_convs": ckpt.model.config_dict().get("b1_extra_convs"),
                "exit_accuracy": calib.correct.double().mean(0).tolist(),
                "thresholds": ckpt.thresholds,
                "accuracy": point.accuracy,
                "exit_shares": list(point.exit_shares),
                "relative_cost": point.relative_cost,
                "epochs": ckpt.metrics.get("epochs"),
            }
        )
    return rows
