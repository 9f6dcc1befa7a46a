"""The evaluation report: every measured number as one JSON-able dict
(:func:`build_report`, ``report.json``) and its Markdown table (:func:`render_markdown`,
``report.md``).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from typing import Any

import torch

import models
from models import OperatingPoint
from training import timing
from training.measure import NetResult, entropy_summary, fine_grid, first_exit_curve
from training.provenance import git_commit, machine_info, software_versions


def build_report(
    branchy: NetResult,
    baseline: NetResult | None,
    val_point: OperatingPoint | None,
    sweeps: dict[str, list[OperatingPoint]],
    ablation: list[dict],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """All numbers as one JSON-able dict."""

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
        "versions": software_versions(),
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
