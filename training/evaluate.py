"""Evaluate a branchy checkpoint against its baseline on the test split and write a report.

Example::

    python -m training.evaluate --checkpoint zoo/b-lenet --baseline zoo/lenet \\
        --out reports/b-lenet

Writes ``report.md`` (the seed's table plus throughput, FLOP-ideal and time-ideal gains),
``report.json`` (every number, the machine and versions) and PNG plots. Thresholds are
the checkpoint's (chosen on the validation split at training time) unless
``--tolerance`` or ``--target-accuracy`` re-chooses them from the checkpoint's
calibration data; the test split only measures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import models
from models import BranchyNet, CalibrationData, Checkpoint, OperatingPoint
from models.calibration import collect_calibration
from models.devices import resolve_device
from training import data as data_mod
from training import timing
from training.train import git_commit, machine_info

log = logging.getLogger("training.evaluate")

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


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The evaluation CLI's arguments, grouped."""
    p = argparse.ArgumentParser(description="Evaluate a branchy checkpoint.", add_help=add_help)
    g = p.add_argument_group("models")
    g.add_argument("--checkpoint", type=Path, required=True, help="branchy checkpoint dir")
    g.add_argument("--baseline", type=Path, default=None, help="plain (1-exit) checkpoint dir")
    g.add_argument(
        "--ablation",
        type=Path,
        nargs="*",
        default=[],
        help="B-AlexNet checkpoints with different --b1-extra-convs, for the ablation plot",
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=data_mod.DATASETS, default=None,
                   help="default: the dataset recorded in the checkpoint")  # fmt: skip
    g.add_argument("--data-dir", type=Path, default=None,
                   help=f"default: ${data_mod.DATA_DIR_ENV}, then ./data")  # fmt: skip
    g.add_argument("--cache-dir", type=Path, default=Path("cache"))
    g.add_argument("--limit", type=int, default=None, help="use only the first N test images")
    g = p.add_argument_group("thresholds")
    g.add_argument("--tolerance", type=float, default=None,
                   help="re-choose thresholds on the validation calibration data")  # fmt: skip
    g.add_argument("--target-accuracy", type=float, default=None,
                   help="re-choose for an absolute validation accuracy (fraction)")  # fmt: skip
    g = p.add_argument_group("timing")
    g.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    g.add_argument("--latency-threads", type=int, default=1,
                   help="CPU threads for batch-1 latency (1 avoids per-op thread overhead)")  # fmt: skip
    g.add_argument("--throughput-threads", type=int, default=None,
                   help="CPU threads for batch-256 throughput (default: torch's)")  # fmt: skip
    g.add_argument("--latency-onednn", choices=("on", "off"), default="on",
                   help="oneDNN (mkldnn) kernels for batch-1 latency; off can win for tiny nets")  # fmt: skip
    g.add_argument("--throughput-onednn", choices=("on", "off"), default="on",
                   help="oneDNN (mkldnn) kernels for batch throughput")  # fmt: skip
    g.add_argument("--latency-samples", type=int, default=None,
                   help="time only N class-balanced test images at batch 1 (the first "
                        "N/classes of each class; default: all)")  # fmt: skip
    g.add_argument("--batch-size", type=int, default=256, help="throughput batch size")
    g.add_argument("--repeats", type=int, default=3, help="throughput repeats (best)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, required=True, help="report directory")
    g.add_argument("--no-plots", action="store_true")
    return p


# ---------------------------------------------------------------------------- measuring


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
    calib = _calibration_on(model, x, labels)
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


def _calibration_on(model: BranchyNet, x: Tensor, labels: Tensor) -> CalibrationData:
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


# ---------------------------------------------------------------------------- report


def build_report(
    branchy: NetResult,
    baseline: NetResult | None,
    val_point: OperatingPoint | None,
    sweeps: dict[str, list[OperatingPoint]],
    ablation: list[dict],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """All numbers as one JSON-able dict."""
    import torchvision

    def net_json(r: NetResult) -> dict[str, Any]:
        predicted = timing.predicted_seconds_per_image(r.segments, r.exit_shares)
        return {
            "name": r.name,
            "checkpoint": r.checkpoint,
            "exit_accuracy": r.exit_accuracy,
            "thresholds": models.exits.encode_thresholds(r.thresholds),
            "accuracy": r.accuracy,
            "exit_shares": r.exit_shares,
            "latency_ms": {
                "median": r.latency.median_ms,
                "mean": r.latency.mean_ms,
                "p90": r.latency.percentile_ms(90),
                "p99": r.latency.percentile_ms(99),
                "samples": len(r.latency.seconds),
                # class-balanced: the first images of every class, interleaved
                "class_counts": r.latency_class_counts,
            },
            "throughput_img_s": r.throughput,
            # batch-size throughput timing: every stage and head alone, µs per image
            "segment_us_per_image": {
                "stages": [1e6 * t for t in r.segments.stages],
                "heads": [1e6 * t for t in r.segments.heads],
            },
            "predicted_us_per_image": 1e6 * predicted,  # with zero engine bookkeeping
            "measured_us_per_image": 1e6 / r.throughput,
            "exit_macs": r.exit_macs,
            "expected_macs": r.expected_macs,
            "entropy": entropy_summary(r.calibration, r.num_classes),
        }

    report: dict[str, Any] = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m training.evaluate " + " ".join(_argv()),
        "git_commit": git_commit(),
        "device": args.device,
        "latency_threads": args.latency_threads,
        "latency_onednn": args.latency_onednn,
        "throughput_onednn": args.throughput_onednn,
        "throughput_threads": args.throughput_threads or torch.get_num_threads(),
        "batch_size": args.batch_size,
        "throughput_repeats": args.repeats,
        "machine": machine_info(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
        },
        "test_samples": int(branchy.calibration.num_samples),
        "branchy": net_json(branchy),
        "baseline": net_json(baseline) if baseline else None,
        "validation_point": val_point.to_json() if val_point else None,
        "sweeps": {k: [p.to_json() for p in v] for k, v in sweeps.items() if k != "fine"},
        "frontier": [p.to_json() for p in models.pareto_frontier(sweeps["fine"])],
        "first_exit_curve": first_exit_curve(
            branchy.calibration, branchy.exit_macs, fine_grid(branchy.num_classes)
        ),
        "ablation": ablation,
    }
    if baseline:
        b_pred, base_pred = (
            timing.predicted_seconds_per_image(r.segments, r.exit_shares)
            for r in (branchy, baseline)
        )
        g = report["gains"] = {
            "latency": baseline.latency.median_ms / branchy.latency.median_ms,
            "throughput": branchy.throughput / baseline.throughput,
            "flop_ideal": baseline.exit_macs[-1] / branchy.expected_macs,
            # time instead of MACs: both nets' segment times, engine bookkeeping free
            "time_ideal": base_pred / b_pred,
            # the same against the baseline's measured whole-path time (stricter: the
            # baseline keeps its own engine overhead, the branchy net has none)
            "time_ideal_measured_baseline": (1 / baseline.throughput) / b_pred,
            "accuracy_delta_pp": 100 * (branchy.accuracy - baseline.accuracy),
        }
        g["throughput_vs_ideal"] = g["throughput"] / g["flop_ideal"]
        g["throughput_vs_time_ideal"] = g["throughput"] / g["time_ideal"]
    return report


def _argv() -> list[str]:
    return sys.argv[1:]


def _fmt_thr(ts: list[float]) -> str:
    return ", ".join(f"{t:.4g}" for t in ts) if ts else "-"


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the seed's table plus throughput, FLOP-ideal and time-ideal gains."""
    b, base = report["branchy"], report["baseline"]
    lines = [
        f"# {b['name']} vs {base['name'] if base else '(no baseline)'}",
        "",
        f"Test split: {report['test_samples']} images. Device: {report['device']} "
        f"({report['machine']['processor']}, {report['machine']['cpu_count']} CPUs"
        f"{', ' + report['machine']['gpu'] if 'gpu' in report['machine'] else ''}); "
        f"batch-1 latency with {report['latency_threads']} thread(s) and oneDNN "
        f"{report['latency_onednn']}, median over {b['latency_ms']['samples']} test images "
        "(class-balanced); throughput at batch "
        f"{report['batch_size']} (best of {report['throughput_repeats']} passes) with {report['throughput_threads']} thread(s) and oneDNN "
        f"{report['throughput_onednn']}. Whole path: input tensor on the device "
        "to predicted class on the host, heads, entropies and exit decisions included.",
        "",
        "| Network | Acc (%) | Time (ms) | Gain | Thresholds | Exit (%) | Throughput (img/s) "
        "| Throughput gain | FLOP-ideal gain | Time-ideal gain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if base:
        lines.append(
            f"| {base['name']} | {100 * base['accuracy']:.2f} | "
            f"{base['latency_ms']['median']:.3f} | - | - | - | {base['throughput_img_s']:.0f} "
            "| - | - | - |"
        )
    g = report.get("gains", {})
    thr = [float(t) for t in b["thresholds"]]
    lines.append(
        f"| {b['name']} | {100 * b['accuracy']:.2f} | {b['latency_ms']['median']:.3f} | "
        f"{_x(g.get('latency'))} | {_fmt_thr(thr)} | "
        f"{', '.join(f'{100 * s:.2f}' for s in b['exit_shares'])} | "
        f"{b['throughput_img_s']:.0f} | {_x(g.get('throughput'))} | {_x(g.get('flop_ideal'))} "
        f"| {_x(g.get('time_ideal'))} |"
    )
    lines += ["", "Per-exit test accuracy (every sample through every exit):", ""]
    for r in (base, b):
        if r:
            accs = ", ".join(f"{100 * a:.2f}" for a in r["exit_accuracy"])
            lines.append(f"- {r['name']}: {accs} (exit MACs {r['exit_macs']})")
    vp = report["validation_point"]
    if vp:
        lines += [
            "",
            f"Thresholds chosen on the validation split: accuracy "
            f"{100 * vp['accuracy']:.2f}%, exit shares "
            f"{', '.join(f'{100 * s:.2f}' for s in vp['exit_shares'])}%, relative cost "
            f"{vp['relative_cost']:.3f}.",
        ]
    if g:
        lines += [
            "",
            f"Throughput gain / FLOP-ideal gain = {g['throughput_vs_ideal']:.2f}; "
            f"Throughput gain / time-ideal gain = {g['throughput_vs_time_ideal']:.2f}; "
            f"accuracy change {g['accuracy_delta_pp']:+.2f} pp.",
            "",
            "Time-ideal gain: each trunk stage and exit head timed alone at batch "
            f"{report['batch_size']} (same threads and oneDNN setting, best pass); a sample "
            "leaving at exit k is charged stages and heads 0..k, and nothing for entropies, "
            "exit decisions or compaction. Leading layers a head shares with the next stage "
            "run once, as the engine runs them, and count as the stage's. Per image (µs):",
            "",
        ]
        for r in (base, b):
            seg = r["segment_us_per_image"]
            lines.append(
                f"- {r['name']}: stages {_us(seg['stages'])}, heads {_us(seg['heads'])}; "
                f"predicted {r['predicted_us_per_image']:.2f}, measured "
                f"{r['measured_us_per_image']:.2f}"
            )
    lines += [
        "",
        f"Produced by `{report['command']}` at commit {report['git_commit']} "
        f"(torch {report['versions']['torch']}, {report['machine']['platform']}).",
        "",
    ]
    return "\n".join(lines)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _us(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


def write_plots(report: dict[str, Any], out: Path) -> list[str]:
    """PNG figures; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    curve = report["first_exit_curve"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogx(
        [r["threshold"] for r in curve], [100 * r["exit0_share"] for r in curve], "o-", ms=3
    )
    ax.set_xlabel("first-exit entropy threshold T1")
    ax.set_ylabel("samples leaving at exit 1 (%)")
    ax.set_title(f"{report['branchy']['name']}: T1 vs exit share (later early exits off)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "threshold_exit_share.png", dpi=120)
    plt.close(fig)
    names.append("threshold_exit_share.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    pts = report["sweeps"]["original"]
    ax.scatter([p["relative_cost"] for p in pts], [100 * p["accuracy"] for p in pts], s=6,
               alpha=0.4, label="original grid")  # fmt: skip
    fr = report["frontier"]
    ax.plot([p["relative_cost"] for p in fr], [100 * p["accuracy"] for p in fr], "-", c="C1",
            label="frontier (fine grid)")  # fmt: skip
    b = report["branchy"]
    chosen_cost = b["expected_macs"] / b["exit_macs"][-1]
    ax.scatter([chosen_cost], [100 * b["accuracy"]], marker="*", s=150, c="C3", label="chosen")
    if report["baseline"]:
        ax.axhline(100 * report["baseline"]["accuracy"], ls="--", c="gray", label="baseline")
    ax.set_xlabel("expected cost (fraction of final-exit MACs)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_cost.png", dpi=120)
    plt.close(fig)
    names.append("accuracy_vs_cost.png")

    ents = b["entropy"]
    fig, axes = plt.subplots(1, len(ents), figsize=(3.2 * len(ents), 3), squeeze=False)
    for ax, e in zip(axes[0], ents, strict=True):
        edges = e["bin_edges"]
        width = edges[1] - edges[0]
        ax.bar(edges[:-1], e["hist_correct"], width=width, align="edge", alpha=0.6, label="right")
        ax.bar(edges[:-1], e["hist_wrong"], width=width, align="edge", alpha=0.6, label="wrong")
        ax.set_yscale("log")
        ax.set_title(f"exit {e['exit']}")
        ax.set_xlabel("entropy (nats)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "entropy_hist.png", dpi=120)
    plt.close(fig)
    names.append("entropy_hist.png")

    if report["ablation"]:
        ab = sorted(report["ablation"], key=lambda r: r["b1_extra_convs"])
        fig, ax = plt.subplots(figsize=(5, 3.5))
        k = [r["b1_extra_convs"] for r in ab]
        ax.plot(k, [100 * r["accuracy"] for r in ab], "o-", label="calibrated thresholds")
        ax.plot(k, [100 * r["exit_accuracy"][-1] for r in ab], "s--", label="final exit")
        ax.set_xlabel("extra conv layers in B1")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "ablation.png", dpi=120)
        plt.close(fig)
        names.append("ablation.png")
    return names


def ablation_rows(paths: list[Path], args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Test accuracy of each ablation checkpoint (no timing)."""
    rows = []
    for path in paths:
        ckpt = models.load_checkpoint(path, device=device)
        x, labels = load_inputs(ckpt, args, device)
        calib = _calibration_on(ckpt.model, x, labels)
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


def main(args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Measure, then write report.md, report.json and the plots; returns the report."""
    if args is None:
        args = get_args_parser().parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    device = resolve_device(args.device)
    args.device = str(device)
    ckpt = models.load_checkpoint(args.checkpoint, device=device)
    x, labels = load_inputs(ckpt, args, device)
    thresholds = choose(ckpt, args)
    runs = [(ckpt, thresholds)]
    if args.baseline:
        runs.append((models.load_checkpoint(args.baseline, device=device), []))
    log.info(
        "timing %s on %d test images (thresholds %s)%s",
        ckpt.model.name,
        x.shape[0],
        thresholds,
        f" against {runs[1][0].model.name}" if args.baseline else "",
    )
    measured = measure_all(runs, x, labels, args)
    branchy, baseline = measured[0], (measured[1] if args.baseline else None)
    val_point = None
    if ckpt.calibration is not None:
        val_point = models.evaluate_thresholds(ckpt.calibration, branchy.exit_macs, thresholds)
    sweeps = {
        "original": models.sweep(branchy.calibration, branchy.exit_macs, models.ORIGINAL_GRID),
        "fine": models.sweep(
            branchy.calibration, branchy.exit_macs, fine_grid(ckpt.model.num_classes)
        ),
    }
    ablation = ablation_rows(list(args.ablation), args, device)
    report = build_report(branchy, baseline, val_point, sweeps, ablation, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    (args.out / "report.md").write_text(render_markdown(report))
    if not args.no_plots:
        report["plots"] = write_plots(report, args.out)
    log.info("wrote %s", args.out)
    sys.stdout.write(render_markdown(report))  # the CLI's product is this table
    return report


if __name__ == "__main__":
    main()
