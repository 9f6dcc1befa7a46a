"""Thresholds under drift: fixed, auto-tuned (the server's rule), and a greedy tuner.

An offline replay of what the server's auto-tuning does (``service/autotune.py``), on a
stream that drifts: the test split in windows, each window's images with Gaussian pixel
noise of a growing standard deviation. Per window and policy it measures the *true*
disagreement with the final exit (every image of the window run through every exit) and
the compute saved. Policies, each starting from the thresholds certified on the
validation split:

* ``fixed``: never changes;
* ``autotune``: the server's rule: certified (``models.certify_thresholds``, ε, δ) on a
  shadow sample (``--shadow-rate`` of the previous window), candidates clipped to
  ``--max-step`` nats of the thresholds in force, hysteresis ``--hysteresis``, and a
  step down by the cap when nothing can be certified;
* ``greedy`` (Apparate-style, same budget): the cheapest thresholds whose disagreement on
  the same shadow sample is ≤ ε (``models.calibration.cheapest_within_risk``), within the
  same cap; no confidence margin.

It replays the server's rule offline rather than driving a server, so that a run takes
seconds on a CPU; the network, the rule and the statistics are the same code. ::

    BRANCHY_DATA_DIR=../shared/data python benchmarks/drift.py --checkpoint zoo/b-lenet \\
        --out reports/drift

Writes ``drift-<model>.json``, ``drift-<model>.md`` and ``drift-<model>.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from models.calibration import (  # noqa: E402
    binomial_upper_bound,
    cheapest_within_risk,
    risk_of,
)
from training import data as data_mod  # noqa: E402
from training.fidelity import cpu_name  # noqa: E402
from training.measure import calibration_on as _calibration_on  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / "zoo" / "b-lenet")
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--window-size", type=int, default=1000)
    p.add_argument("--max-noise", type=float, default=0.5, help="pixel noise std at the end")
    p.add_argument("--epsilon", type=float, default=0.01)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--shadow-rate", type=float, default=0.5)
    p.add_argument("--max-step", type=float, default=0.25)
    p.add_argument("--hysteresis", type=float, default=0.05)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=Path("cache"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "drift")
    return p


def windows(ckpt: models.Checkpoint, args: argparse.Namespace) -> list[models.CalibrationData]:
    """Every-exit entropies and predictions of each window's noisy images."""
    name = str(ckpt.provenance.get("dataset"))
    split, _ = data_mod.load_test_split(
        name, args.data_dir or data_mod.default_data_dir(), cache_dir=args.cache_dir
    )
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(split), generator=g)
    spec = ckpt.input_spec
    mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
    out = []
    for w in range(args.windows):
        idx = order[(w * args.window_size + torch.arange(args.window_size)) % len(split)]
        noise = args.max_noise * w / max(args.windows - 1, 1)
        pixels = split.images[idx].float() / 255
        pixels = (pixels + noise * torch.randn(pixels.shape, generator=g)).clamp(0, 1) * 255
        x = data_mod.normalize(pixels, mean, std)
        out.append(_calibration_on(ckpt.model, x, split.labels[idx]))
    return out


def label_free(d: models.CalibrationData) -> models.CalibrationData:
    assert d.prediction is not None
    return models.CalibrationData(d.entropy, d.prediction == d.prediction[:, -1:], d.prediction)


def autotune_step(
    sample: models.CalibrationData,
    cur: tuple[float, ...],
    macs: list[int],
    args: argparse.Namespace,
) -> tuple[float, ...]:
    """The rule of ``service.autotune.AutoTuner._propose`` on one shadow sample."""
    delta = 1 - args.confidence
    bounds = [(max(0.0, t - args.max_step), t + args.max_step) for t in cur]
    n = sample.num_samples
    cur_bound = binomial_upper_bound(round(risk_of(sample, cur, "disagreement") * n), n, delta)
    cur_cost = models.evaluate_thresholds(sample, macs, cur).relative_cost
    try:
        cert = models.certify_thresholds(
            sample, macs, epsilon=args.epsilon, delta=delta, bounds=bounds
        )
    except models.NotCertifiable:
        return tuple(lo for lo, _ in bounds)
    change = abs(cert.point.relative_cost - cur_cost) / max(cur_cost, 1e-12)
    if cur_bound <= args.epsilon and change <= args.hysteresis:
        return cur
    return cert.point.thresholds


def greedy_step(
    sample: models.CalibrationData,
    cur: tuple[float, ...],
    macs: list[int],
    args: argparse.Namespace,
) -> tuple[float, ...]:
    point, _ = cheapest_within_risk(sample, macs, risk="disagreement", epsilon=args.epsilon)
    return tuple(
        min(max(t, c - args.max_step), c + args.max_step)
        for t, c in zip(point.thresholds, cur, strict=True)
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    ckpt = models.load_checkpoint(args.checkpoint)
    assert ckpt.calibration is not None
    macs = ckpt.model.exit_macs()
    start = models.certify_thresholds(
        ckpt.calibration, macs, epsilon=args.epsilon, delta=1 - args.confidence
    ).point.thresholds
    stream = [label_free(d) for d in windows(ckpt, args)]
    g = torch.Generator().manual_seed(args.seed + 1)
    policies = {"fixed": start, "autotune": start, "greedy": start}
    rows = []
    for w, data in enumerate(stream):
        row: dict[str, Any] = {"window": w, "noise": args.max_noise * w / max(args.windows - 1, 1)}
        for name, t in policies.items():
            row[name] = {
                "thresholds": list(t),
                "true_disagreement": risk_of(data, t, "disagreement"),
                "compute_saved": 1 - models.evaluate_thresholds(data, macs, t).relative_cost,
            }
        rows.append(row)
        # what the shadow saw of this window decides the next window's thresholds
        keep = torch.rand(data.num_samples, generator=g) < args.shadow_rate
        sample = data.subset(keep.nonzero().squeeze(1))
        policies["autotune"] = autotune_step(sample, policies["autotune"], macs, args)
        policies["greedy"] = greedy_step(sample, policies["greedy"], macs, args)
    limit = args.epsilon + 0.005
    summary = {
        name: {
            "violations": sum(r[name]["true_disagreement"] > limit for r in rows[1:]),
            "mean_compute_saved": sum(r[name]["compute_saved"] for r in rows) / len(rows),
        }
        for name in policies
    }
    report = {
        "checkpoint": str(args.checkpoint),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cpu": cpu_name(),
        "command": " ".join(["python benchmarks/drift.py", *sys.argv[1:]]),
        "violation_limit": limit,
        "rows": rows,
        "summary": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"drift-{ckpt.model.name}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(render(report))
    plot(report, args.out / f"{stem}.png")
    print(render(report))
    return report


def render(report: dict[str, Any]) -> str:
    a = report["args"]
    lines = [
        f"# Drift: {report['checkpoint']} (ε = {100 * a['epsilon']:g} %, confidence "
        f"{a['confidence']}, shadow rate {a['shadow_rate']})",
        "",
        f"`{report['command']}`; CPU {report['cpu']} (2 cores, shared). True disagreement (%) / compute saved (%) per window; a "
        f"violation is a window after the first above {100 * report['violation_limit']:.1f} %.",
        "",
        "| Window | Noise | fixed | autotune | greedy |",
        "|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        cells = [
            f"{100 * r[p]['true_disagreement']:.2f} / {100 * r[p]['compute_saved']:.1f}"
            for p in ("fixed", "autotune", "greedy")
        ]
        lines.append(f"| {r['window']} | {r['noise']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "| Policy | Violations | Mean compute saved (%) |", "|---|---|---|"]
    for p, s in report["summary"].items():
        lines.append(f"| {p} | {s['violations']} | {100 * s['mean_compute_saved']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    w = [r["window"] for r in report["rows"]]
    for p in ("fixed", "autotune", "greedy"):
        a1.plot(w, [100 * r[p]["true_disagreement"] for r in report["rows"]], "o-", label=p)
        a2.plot(w, [100 * r[p]["compute_saved"] for r in report["rows"]], "o-", label=p)
    a1.axhline(100 * report["args"]["epsilon"], color="k", ls="--", lw=1, label="budget ε")
    a1.set(xlabel="window (noise grows)", ylabel="true disagreement (%)")
    a2.set(xlabel="window (noise grows)", ylabel="compute saved (%)")
    a1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
