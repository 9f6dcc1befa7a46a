"""The evaluation's PNG figures, drawn from a finished report (``training.report``).

Each figure is one function that draws on its axes; :func:`write_plots` makes the figure,
saves and closes it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

Report = dict[str, Any]


def threshold_exit_share(report: Report, axes: Any) -> None:
    """The seed's figure: first-exit threshold vs the share leaving there."""
    (ax,) = axes
    curve = report["first_exit_curve"]
    ax.semilogx(
        [r["threshold"] for r in curve], [100 * r["exit0_share"] for r in curve], "o-", ms=3
    )
    ax.set_xlabel("first-exit entropy threshold T1")
    ax.set_ylabel("samples leaving at exit 1 (%)")
    ax.set_title(f"{report['branchy']['name']}: T1 vs exit share (later early exits off)")
    ax.grid(alpha=0.3)


def accuracy_vs_cost(report: Report, axes: Any) -> None:
    """Sweep points, the frontier, the chosen point and the baseline's accuracy."""
    (ax,) = axes
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


def entropy_hist(report: Report, axes: Any) -> None:
    """Per exit, the entropies of right and wrong answers (log counts)."""
    for ax, e in zip(axes, report["branchy"]["entropy"], strict=True):
        edges = e["bin_edges"]
        width = edges[1] - edges[0]
        ax.bar(edges[:-1], e["hist_correct"], width=width, align="edge", alpha=0.6, label="right")
        ax.bar(edges[:-1], e["hist_wrong"], width=width, align="edge", alpha=0.6, label="wrong")
        ax.set_yscale("log")
        ax.set_title(f"exit {e['exit']}")
        ax.set_xlabel("entropy (nats)")
    axes[0].legend(fontsize=7)


def ablation(report: Report, axes: Any) -> None:
    """Test accuracy against the number of extra conv layers in B-AlexNet's first branch."""
    (ax,) = axes
    ab = sorted(report["ablation"], key=lambda r: r["b1_extra_convs"])
    k = [r["b1_extra_convs"] for r in ab]
    ax.plot(k, [100 * r["accuracy"] for r in ab], "o-", label="calibrated thresholds")
    ax.plot(k, [100 * r["exit_accuracy"][-1] for r in ab], "s--", label="final exit")
    ax.set_xlabel("extra conv layers in B1")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def write_plots(report: Report, out: Path) -> list[str]:
    """Draw every figure the report has data for into ``out``; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exits = len(report["branchy"]["entropy"])
    # (file name, panels, figure size, drawer)
    figures: list[tuple[str, int, tuple[float, float], Callable[[Report, Any], None]]] = [
        ("threshold_exit_share.png", 1, (5, 3.5), threshold_exit_share),
        ("accuracy_vs_cost.png", 1, (5, 3.5), accuracy_vs_cost),
        ("entropy_hist.png", exits, (3.2 * exits, 3), entropy_hist),
    ]
    if report["ablation"]:
        figures.append(("ablation.png", 1, (5, 3.5), ablation))
    names = []
    for name, panels, size, draw in figures:
        fig, axes = plt.subplots(1, panels, figsize=size, squeeze=False)
        draw(report, list(axes[0]))
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        names.append(name)
    return names
