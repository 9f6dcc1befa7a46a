"""Check risk-controlled thresholds on the test split: the guarantee and its price.

For each branchy checkpoint: thresholds certified on its validation calibration data
(``models.certify_thresholds``: risk ≤ ε with confidence 1 − δ), then measured on the
test split, beside two references computed with the same risk and ε:

* *plug-in*: the cheapest thresholds whose risk on the validation data is ≤ ε (no
  guarantee; it shows what certifying costs and what it protects against);
* *oracle*: the cheapest thresholds whose risk on the test split itself is ≤ ε (it
  has seen the test answers; no rule can beat it on that split).

The goal of issue 12: certified thresholds at ε = 1 % disagreement, δ = 5 % keep the
test-split disagreement ≤ ε and save at least 90 % of the compute the oracle saves::

    BRANCHY_DATA_DIR=../shared/data python -m training.fidelity \\
        --checkpoint zoo/b-lenet zoo/b-alexnet --epsilon 0.01 --confidence 0.95 \\
        --out reports/fidelity

Writes ``fidelity.json`` and ``fidelity.md`` to ``--out``. Only reads the network and the
test split; no checkpoint changes.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from pathlib import Path
from typing import Any

import torch

import models
from models.calibration import RISKS, cheapest_within_risk, risk_of
from training import data as data_mod
from training.evaluate import _calibration_on
from training.train import git_commit, machine_info

log = logging.getLogger("training.fidelity")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, nargs="+", required=True)
    p.add_argument("--risk", choices=RISKS, default="disagreement")
    p.add_argument("--epsilon", type=float, default=0.01, help="risk budget (fraction)")
    p.add_argument("--confidence", type=float, default=0.95, help="1 - delta")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=Path("cache"))
    p.add_argument("--out", type=Path, required=True)
    return p


def measure(
    ckpt: models.Checkpoint, args: argparse.Namespace, test: models.CalibrationData
) -> dict[str, Any]:
    """Certified, plug-in and oracle choices and what they do on ``test``."""
    if ckpt.calibration is None:
        raise ValueError(f"{ckpt.path}: no calibration data")
    macs = ckpt.model.exit_macs()
    delta = 1.0 - args.confidence
    cert = models.certify_thresholds(
        ckpt.calibration, macs, risk=args.risk, epsilon=args.epsilon, delta=delta
    )
    plug, _ = cheapest_within_risk(ckpt.calibration, macs, risk=args.risk, epsilon=args.epsilon)
    oracle, _ = cheapest_within_risk(test, macs, risk=args.risk, epsilon=args.epsilon)

    def on_test(point: models.OperatingPoint) -> dict[str, Any]:
        t = models.evaluate_thresholds(test, macs, point.thresholds)
        return {
            "thresholds": list(point.thresholds),
            "test_risk": risk_of(test, point.thresholds, args.risk),
            "test_accuracy": t.accuracy,
            "test_exit_shares": list(t.exit_shares),
            "test_compute_saved": 1.0 - t.relative_cost,
        }

    row: dict[str, Any] = {
        "checkpoint": str(ckpt.path),
        "architecture": ckpt.model.name,
        "validation_samples": ckpt.calibration.num_samples,
        "test_samples": test.num_samples,
        "certified": {**on_test(cert.point), "validation": cert.to_json()},
        "plug_in": on_test(plug),
        "oracle": on_test(oracle),
        "checkpoint_default": on_test(
            models.evaluate_thresholds(ckpt.calibration, macs, ckpt.thresholds)
        ),
    }
    c, o = row["certified"], row["oracle"]
    row["within_budget"] = c["test_risk"] <= args.epsilon
    row["saved_vs_oracle"] = (
        c["test_compute_saved"] / o["test_compute_saved"] if o["test_compute_saved"] > 0 else None
    )
    row["goal_met"] = bool(
        row["within_budget"]
        and row["saved_vs_oracle"] is not None
        and row["saved_vs_oracle"] >= 0.9
    )
    return row


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def render(report: dict[str, Any]) -> str:
    eps, risk = report["epsilon"], report["risk"]
    lines = [
        f"# Risk-controlled thresholds on the test split ({risk} ≤ {100 * eps:g} %, "
        f"confidence {report['confidence']:g})",
        "",
        f"Command: `{report['command']}`; CPU: {report['cpu']} "
        f"({report['machine']['cpu_count']} cores, shared machine); git {report['git_commit']}.",
        "",
        "| Network | Rule | Thresholds | Test risk (%) | Test accuracy (%) | Compute saved (%) |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        for key, label in (
            ("certified", "certified (LTT)"),
            ("plug_in", "plug-in (validation)"),
            ("oracle", "oracle (test)"),
            ("checkpoint_default", "checkpoint default"),
        ):
            p = r[key]
            lines.append(
                f"| {r['architecture']} | {label} | "
                f"{', '.join(f'{t:.4g}' for t in p['thresholds'])} | {100 * p['test_risk']:.2f} | "
                f"{100 * p['test_accuracy']:.2f} | {100 * p['test_compute_saved']:.1f} |"
            )
    lines += ["", "| Network | Certified bound (%) | Test risk ≤ ε | Saved / oracle's | Goal |"]
    lines += ["|---|---|---|---|---|"]
    for r in report["rows"]:
        v = r["certified"]["validation"]
        ratio = "-" if r["saved_vs_oracle"] is None else f"{r['saved_vs_oracle']:.3f}"
        lines.append(
            f"| {r['architecture']} | {100 * v['certified_bound']:.2f} (on "
            f"{v['tested_samples']} validation samples) | {r['within_budget']} | {ratio} | "
            f"{'met' if r['goal_met'] else 'not met'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rows = []
    for path in args.checkpoint:
        ckpt = models.load_checkpoint(path)
        name = ckpt.provenance.get("dataset")
        if not name:
            raise ValueError(f"{path}: no dataset recorded in the provenance")
        split, _ = data_mod.load_test_split(
            str(name), args.data_dir or data_mod.default_data_dir(), cache_dir=args.cache_dir
        )
        spec = ckpt.input_spec
        x = data_mod.normalize(split.images, torch.tensor(spec.mean), torch.tensor(spec.std))
        test = _calibration_on(ckpt.model, x, split.labels)
        row = measure(ckpt, args, test)
        log.info(
            "%s: certified %s test %s %.3f%%, saved %.1f%% (oracle %.1f%%)",
            path,
            row["certified"]["thresholds"],
            args.risk,
            100 * row["certified"]["test_risk"],
            100 * row["certified"]["test_compute_saved"],
            100 * row["oracle"]["test_compute_saved"],
        )
        rows.append(row)
    report = {
        "risk": args.risk,
        "epsilon": args.epsilon,
        "confidence": args.confidence,
        "command": " ".join(["python -m training.fidelity", *(argv or sys.argv[1:])]),
        "git_commit": git_commit(),
        "machine": machine_info(),
        "cpu": cpu_name(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "fidelity.md").write_text(render(report))
    return report


if __name__ == "__main__":
    main()
