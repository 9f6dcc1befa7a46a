"""``python -m models``: parameter and per-exit MAC counts of the paper's networks.

The README's architecture table is this command's output (a test keeps them equal).
"""

from __future__ import annotations

import argparse
import sys

from models.registry import build_model, list_models

PAPER = ["lenet", "b-lenet", "alexnet", "b-alexnet", "resnet110", "b-resnet110"]


def table(names: list[str]) -> str:
    """A Markdown table: network, exits, parameters, MACs to reach each exit."""
    lines = [
        "| Network | Exits | Parameters | MACs per exit (cumulative, one sample) |",
        "|---|---|---|---|",
    ]
    for name in names:
        net = build_model(name)
        params = sum(p.numel() for p in net.parameters())
        macs = ", ".join(f"{m / 1e6:.3f} M" for m in net.exit_macs())
        lines.append(f"| {name} | {net.num_exits} | {params:,} | {macs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--all", action="store_true", help="every registered model")
    args = parser.parse_args(argv)
    sys.stdout.write(table(list_models() if args.all else PAPER) + "\n")


if __name__ == "__main__":
    main()
