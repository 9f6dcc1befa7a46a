"""The evaluation's PNG figures, drawn from a finished report (``training.report``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
