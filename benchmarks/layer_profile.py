"""Where a branchy net and its baseline spend their time, layer by layer, on real inputs.

The FLOP-ideal gain assumes a layer's time is proportional to its multiply-adds (conv and
linear only). This benchmark checks that assumption: it runs every leaf layer of every
stage and head the way the early-exit engine does (``models.inference``: the same
kernels, a head's leading layers shared with the next stage run once), times each alone
at one batch size, and prints per layer its MACs, time per image and MAC rate. From the
per-layer times it derives what the gain could be under three assumptions:

- FLOP-ideal: time proportional to MACs (what the report's FLOP-ideal gain assumes);
- time-ideal: each layer costs what it was measured to cost, and the engine's own work
  (entropies, decisions, compaction) costs nothing;
- ideal convolutions: every conv and linear layer runs at the fastest MAC rate measured
  in either net, and every other layer (pooling, ReLU, LRN) costs what it was measured to.

If the third is below 80% of the FLOP-ideal gain, no engine can reach that goal with
these kernels: the layers without MACs alone forbid it.

    .venv/bin/python benchmarks/layer_profile.py --pair zoo/b-lenet:zoo/lenet \\
        --onednn off --out benchmarks/results/layers-lenet.json

Exit shares come from the branchy checkpoint's own thresholds on the first
``--samples`` test images (the test split of the dataset it was trained on). A layer's
time per image is the median over the full batches of a pass (at batch 1, over
samples), and the best of ``--repeats`` passes, the nets alternating. Prints a table
and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from models.inference import run_owned  # noqa: E402
from models.macs import module_macs  # noqa: E402
from training import data as data_mod  # noqa: E402
from training.provenance import git_commit, machine_info  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", default="zoo/b-lenet:zoo/lenet",
                   help="BRANCHY_DIR:BASELINE_DIR checkpoints")  # fmt: skip
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--samples", type=int, default=2560, help="test images used")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--onednn", choices=("on", "off"), default="off")
    p.add_argument("--repeats", type=int, default=5,
                   help="passes per net, alternating the nets; per layer, the best pass counts")  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "layers.json")
    return p


@dataclass
class Layer:
    """One leaf layer as the engine runs it: where it sits and what it costs per image."""

    segment: str  # "stage 0", "head 1", ...
    name: str
    shape: tuple[int, ...]  # output shape of one image
    macs: int
    seconds: float = float("inf")  # per image, best pass

    @property
    def has_macs(self) -> bool:
        return self.macs > 0


def _leaves(module: nn.Module, start: int, stop: int | None) -> list[nn.Module]:
    """The layers the engine runs one by one (children of a Sequential, else the module)."""
    if type(module) is not nn.Sequential:
        return [module]
    out: list[nn.Module] = []
    for child in list(module.children())[start:stop]:
        out += _leaves(child, 0, None)
    return out


def plan(net: models.BranchyNet) -> list[tuple[str, list[nn.Module]]]:
    """The engine's segments in order (stage 0, head 0, stage 1, ...), each with the leaf
    layers it runs. A head's leading layers that the next stage shares run once and
    belong to the stage, as in the engine and ``training.timing.segment_times``."""
    shared = net.shared_prefixes()
    segments: list[tuple[str, list[nn.Module]]] = []
    skip = 0
    for i, (stage, head) in enumerate(zip(net.stages, net.heads, strict=True)):
        segments.append((f"stage {i}", _leaves(stage, skip, None) + _leaves(head, 0, shared[i])))
        skip = shared[i]
        segments.append((f"head {i}", _leaves(head, skip, None)))
    return segments


@torch.no_grad()
def profile(net: models.BranchyNet, x: Tensor, batch_size: int, repeats: int) -> list[Layer]:
    """Time every layer of ``plan(net)`` alone, per image, on ``x`` in batches; every
    sample runs every segment."""
    if x.shape[0] < batch_size:
        raise ValueError(f"need at least one full batch of {batch_size}; got {x.shape[0]} inputs")
    net.eval()
    segments = plan(net)
    last = f"head {net.num_exits - 1}"

    def walk(h: Tensor, clocked: list[float] | None) -> list[tuple[str, nn.Module, Tensor]]:
        seen = []
        trunk, owned = h, False
        for segment, mods in segments:
            is_stage = segment.startswith("stage")
            h, own = (trunk, owned) if is_stage else (trunk, segment == last and owned)
            for m in mods:
                t0 = time.perf_counter()
                h, own = run_owned(m, h, owned=own)
                if clocked is not None:
                    clocked.append(time.perf_counter() - t0)
                seen.append((segment, m, h))
            if is_stage:
                trunk, owned = h, own
        return seen

    layers = []
    for segment, m, out in walk(x[:1], None):
        layers.append(Layer(segment, type(m).__name__, tuple(out.shape[1:]), 0))
    # MACs per layer of one image, counted by the same hooks as the report's
    trunk = x[:1]
    k = 0
    for segment, mods in segments:
        h = trunk
        for m in mods:
            layers[k].macs, h = module_macs(m, h)
            k += 1
        if segment.startswith("stage"):
            trunk = h
    walk(x[:batch_size], [])  # warm-up: allocator, kernels' first calls
    for _ in range(repeats):
        per_batch: list[list[float]] = [[] for _ in layers]  # per layer: s/image, each full batch
        for start in range(0, x.shape[0] - batch_size + 1, batch_size):
            clocked: list[float] = []
            walk(x[start : start + batch_size], clocked)
            for times, t in zip(per_batch, clocked, strict=True):
                times.append(t / batch_size)
        # the median batch: at batch 1 a single preempted sample would skew a mean
        for layer, times in zip(layers, per_batch, strict=True):
            layer.seconds = min(layer.seconds, statistics.median(times))
    return layers


def gains(branchy: list[Layer], baseline: list[Layer], shares: list[float]) -> dict[str, float]:
    """The gain under each assumption (see the module docstring)."""
    rates = [lay.macs / lay.seconds for lay in branchy + baseline if lay.has_macs]
    best = max(rates)

    def exit_costs(layers: list[Layer], cost: Any) -> list[float]:
        # a sample leaving at exit k pays stages 0..k and heads 0..k
        totals, reached, k = [], 0.0, 0
        while any(lay.segment == f"stage {k}" for lay in layers):
            reached += sum(cost(lay) for lay in layers if lay.segment == f"stage {k}")
            reached += sum(cost(lay) for lay in layers if lay.segment == f"head {k}")
            totals.append(reached)
            k += 1
        return totals

    def gain(cost: Any) -> float:
        base = exit_costs(baseline, cost)[-1]
        return base / sum(s * c for s, c in zip(shares, exit_costs(branchy, cost), strict=True))

    return {
        "flop_ideal_gain": gain(lambda lay: float(lay.macs)),
        "time_ideal_gain": gain(lambda lay: lay.seconds),
        "ideal_conv_gain": gain(lambda lay: lay.macs / best if lay.has_macs else lay.seconds),
        "best_mac_rate_gmacs": best / 1e9,
    }


def main() -> None:
    args = get_args_parser().parse_args()
    b_dir, base_dir = (Path(p) for p in args.pair.split(":"))
    branchy = models.load_checkpoint(b_dir)
    baseline = models.load_checkpoint(base_dir)
    test, _ = data_mod.load_test_split(
        branchy.provenance["dataset"], args.data_dir or data_mod.default_data_dir()
    )
    spec = branchy.input_spec
    x = data_mod.normalize(
        test.images[: args.samples], torch.tensor(spec.mean), torch.tensor(spec.std)
    )
    torch.set_num_threads(args.threads)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=args.onednn == "on"):
        exits = torch.cat(
            [branchy.model.early_exit(c, branchy.thresholds).exit_index for c in x.split(512)]
        )
        shares = (
            torch.bincount(exits, minlength=branchy.model.num_exits).double() / len(exits)
        ).tolist()
        # one pass at a time, alternating the nets, so that a change in machine load hits
        # both alike; per layer the best pass counts
        passes: dict[str, list[list[Layer]]] = {branchy.model.name: [], baseline.model.name: []}
        for r in range(args.repeats):
            for ckpt in (branchy, baseline) if r % 2 == 0 else (baseline, branchy):
                passes[ckpt.model.name].append(profile(ckpt.model, x, args.batch_size, 1))
        layers = {name: [min(group, key=lambda lay: lay.seconds) for group in zip(*runs, strict=True)]
                  for name, runs in passes.items()}  # fmt: skip
    result_gains = gains(layers[branchy.model.name], layers[baseline.model.name], shares)

    out = sys.stdout
    out.write(
        f"batch {args.batch_size}, {args.threads} thread(s), oneDNN {args.onednn}, "
        f"{x.shape[0]} test images; best of {args.repeats} passes per layer\n\n"
    )
    header = f"{'net':<10} {'segment':<8} {'layer':<18} {'output':<14} {'MACs':>9} {'µs/img':>8} {'GMAC/s':>7}"
    out.write(header + "\n" + "-" * len(header) + "\n")
    for name, rows in layers.items():
        for lay in rows:
            rate = f"{lay.macs / lay.seconds / 1e9:7.1f}" if lay.has_macs else " " * 7
            out.write(
                f"{name:<10} {lay.segment:<8} {lay.name:<18} {'x'.join(map(str, lay.shape)):<14} "
                f"{lay.macs:>9} {lay.seconds * 1e6:>8.2f} {rate}\n"
            )
        mac_free = sum(lay.seconds for lay in rows if not lay.has_macs)
        total = sum(lay.seconds for lay in rows)
        out.write(
            f"{name:<10} all layers {total * 1e6:.2f} µs/img, of which layers without MACs "
            f"{mac_free * 1e6:.2f} ({100 * mac_free / total:.0f}%)\n\n"
        )
    out.write(f"exit shares {', '.join(f'{100 * s:.2f}%' for s in shares)}\n")
    f = result_gains["flop_ideal_gain"]
    for key, label in (
        ("flop_ideal_gain", "FLOP-ideal gain (time proportional to MACs)"),
        ("time_ideal_gain", "time-ideal gain (measured layers, free bookkeeping)"),
        ("ideal_conv_gain", "gain with every conv/linear at the best MAC rate"),
    ):
        g = result_gains[key]
        out.write(f"{label:<55} {g:5.2f}x  ({100 * g / f:.0f}% of FLOP-ideal)\n")

    report: dict[str, Any] = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "benchmarks/layer_profile.py", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "machine": machine_info(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "batch_size": args.batch_size,
        "threads": args.threads,
        "onednn": args.onednn,
        "samples": int(x.shape[0]),
        "exit_shares": shares,
        "gains": result_gains,
        "layers": {
            name: [
                {
                    "segment": lay.segment,
                    "layer": lay.name,
                    "output": list(lay.shape),
                    "macs": lay.macs,
                    "us_per_image": lay.seconds * 1e6,
                }
                for lay in rows
            ]
            for name, rows in layers.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    out.write(f"\nwrote {args.out}\n")


if __name__ == "__main__":
    main()
