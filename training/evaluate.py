"""Evaluate a branchy checkpoint against its baseline on the test split and write a report.

Example::

    python -m training.evaluate --checkpoint zoo/b-lenet --baseline zoo/lenet \\
        --out reports/b-lenet

Writes ``report.md`` (the seed's table plus throughput, FLOP-ideal and time-ideal gains),
``report.json`` (every number, the machine and versions) and PNG plots. Thresholds are
the checkpoint's (chosen on the validation split at training time) unless
``--tolerance`` or ``--target-accuracy`` re-chooses them from the checkpoint's
calibration data; the test split only measures.

This module is the job's command line and recipe; the work is in ``training.measure``
(timing and counting), ``training.report`` (report.json, report.md) and
``training.plots`` (the figures).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import models
from models.devices import resolve_device
from training import data as data_mod
from training.measure import ablation_rows, choose, fine_grid, load_inputs, measure_all
from training.plots import write_plots
from training.report import build_report, render_markdown

log = logging.getLogger("training.evaluate")


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


def cli(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``branchy-evaluate``): errors in the inputs end with one clear
    line, exit status 2."""
    try:
        main(get_args_parser().parse_args(argv))
    except (data_mod.DatasetError, ValueError, FileNotFoundError, models.CheckpointError) as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
