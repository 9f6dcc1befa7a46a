"""Branchy vs baseline, whole path, side by side: batch-1 latency and batch-256 throughput.

For every (branchy, baseline) pair in the zoo and every CPU setting asked for (thread
count x oneDNN on/off), both networks are timed in the same run, alternating, on the same
test images, with the branchy net's own default thresholds. The path timed is the
service's: a normalised input tensor on the device -> ``BranchyNet.early_exit`` (trunk,
branch heads, entropies, exit decisions, compaction) -> predicted class on the host.

    .venv/bin/python benchmarks/bench_models.py                # zoo pairs, all settings
    .venv/bin/python benchmarks/bench_models.py --pairs b-lenet:lenet --threads 1

Prints a table and writes JSON to ``benchmarks/results/models.json``. The FLOP-ideal
gain is baseline MACs / expected MACs of the branchy net given the exit shares observed
on the same images; the throughput gain should reach at least 80% of it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from training import data as data_mod  # noqa: E402
from training import timing  # noqa: E402
from training.provenance import git_commit, machine_info  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", type=Path, default=ROOT / "zoo")
    p.add_argument("--pairs", default="b-lenet:lenet,b-alexnet:alexnet",
                   help="comma list of branchy:baseline checkpoint names in --zoo")  # fmt: skip
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--threads", default="1,2", help="CPU thread counts to try")
    p.add_argument("--mkldnn", default="on,off", help="oneDNN settings to try")
    p.add_argument("--latency-samples", type=int, default=2000,
                   help="test images timed one by one (the first N)")  # fmt: skip
    p.add_argument("--throughput-samples", type=int, default=None,
                   help="test images per throughput pass (default: all)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "models.json")
    return p


def bench_pair(
    branchy: models.Checkpoint,
    baseline: models.Checkpoint,
    x: torch.Tensor,
    args: argparse.Namespace,
    threads: int,
    mkldnn: bool,
) -> dict[str, Any]:
    thr = list(branchy.thresholds)
    n = min(args.latency_samples, x.shape[0])
    torch.set_num_threads(threads)
    flags = torch.backends.mkldnn.flags(enabled=mkldnn) if x.device.type == "cpu" else None
    with flags or contextlib.nullcontext():
        # alternate halves so that drift in machine load hits both nets alike
        half = n // 2
        lat_b = timing.latency_batch1(branchy.model, x[:half], thr)
        lat_base = timing.latency_batch1(baseline.model, x[:half], [])
        lat_base2 = timing.latency_batch1(baseline.model, x[half:n], [])
        lat_b2 = timing.latency_batch1(branchy.model, x[half:n], thr)
        xt = x[: args.throughput_samples or x.shape[0]]
        tput_base, tput_b = 0.0, 0.0
        for r in range(args.repeats):  # interleaved, best pass of each
            for which in (0, 1) if r % 2 == 0 else (1, 0):
                if which == 0:
                    rate = timing.throughput(
                        baseline.model, xt, [], batch_size=args.batch_size, repeats=1
                    )
                    tput_base = max(tput_base, rate)
                else:
                    rate = timing.throughput(
                        branchy.model, xt, thr, batch_size=args.batch_size, repeats=1
                    )
                    tput_b = max(tput_b, rate)
    b_lat = timing.LatencyResult(lat_b.seconds + lat_b2.seconds, lat_b.exits + lat_b2.exits, [])
    base_lat = timing.LatencyResult(lat_base.seconds + lat_base2.seconds, [], [])
    with torch.no_grad():
        exits = torch.cat(
            [branchy.model.early_exit(c, thr).exit_index.cpu() for c in xt.split(1024)]
        )
    shares = torch.bincount(exits, minlength=branchy.model.num_exits).double() / xt.shape[0]
    macs = torch.tensor(branchy.model.exit_macs(), dtype=torch.float64)
    flop_ideal = baseline.model.exit_macs()[-1] / float((shares * macs).sum())
    b1 = torch.bincount(torch.tensor(b_lat.exits), minlength=branchy.model.num_exits).double()
    flop_ideal_b1 = baseline.model.exit_macs()[-1] / float((b1 / b1.sum() * macs).sum())
    return {
        "threads": threads,
        "mkldnn": mkldnn,
        "baseline_ms": base_lat.median_ms,
        "branchy_ms": b_lat.median_ms,
        "latency_gain": base_lat.median_ms / b_lat.median_ms,
        "flop_ideal_gain_latency_samples": flop_ideal_b1,
        "baseline_img_s": tput_base,
        "branchy_img_s": tput_b,
        "throughput_gain": tput_b / tput_base,
        "flop_ideal_gain": flop_ideal,
        "throughput_vs_ideal": (tput_b / tput_base) / flop_ideal,
        "exit_shares": shares.tolist(),
        "latency_samples": n,
    }


def main() -> None:
    args = get_args_parser().parse_args()
    device = torch.device(args.device)
    data_dir = args.data_dir or data_mod.default_data_dir()
    default_threads = torch.get_num_threads()
    rows = []
    for pair in args.pairs.split(","):
        b_name, base_name = pair.split(":")
        if not (args.zoo / b_name).is_dir() or not (args.zoo / base_name).is_dir():
            sys.stderr.write(f"skipping {pair}: not in {args.zoo}\n")
            continue
        branchy = models.load_checkpoint(args.zoo / b_name, device=device)
        baseline = models.load_checkpoint(args.zoo / base_name, device=device)
        test, _ = data_mod.load_test_split(branchy.provenance["dataset"], data_dir)
        spec = branchy.input_spec
        x = data_mod.normalize(
            test.images.to(device),
            torch.tensor(spec.mean, device=device),
            torch.tensor(spec.std, device=device),
        )
        for threads in [int(t) for t in args.threads.split(",")]:
            for mk in args.mkldnn.split(","):
                row = bench_pair(branchy, baseline, x, args, threads, mk == "on")
                row["pair"] = pair
                rows.append(row)
                sys.stdout.write(_row(row) + "\n")
                sys.stdout.flush()
    torch.set_num_threads(default_threads)
    header = (
        f"{'pair':<20} {'thr':>3} {'onednn':>6} {'base ms':>8} {'branchy ms':>10} "
        f"{'gain':>6} {'ideal':>6} {'base img/s':>10} {'br img/s':>9} {'tput gain':>9} "
        f"{'/ideal':>6}"
    )
    sys.stdout.write("\n" + header + "\n" + "-" * len(header) + "\n")
    for row in rows:
        sys.stdout.write(_row(row) + "\n")
    result = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "benchmarks/bench_models.py", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "device": str(device),
        "machine": machine_info(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    sys.stdout.write(f"\nwrote {args.out}\n")


def _row(r: dict[str, Any]) -> str:
    return (
        f"{r['pair']:<20} {r['threads']:>3} {'on' if r['mkldnn'] else 'off':>6} "
        f"{r['baseline_ms']:>8.3f} {r['branchy_ms']:>10.3f} {r['latency_gain']:>5.2f}x "
        f"{r['flop_ideal_gain_latency_samples']:>5.2f}x {r['baseline_img_s']:>10.0f} "
        f"{r['branchy_img_s']:>9.0f} {r['throughput_gain']:>8.2f}x "
        f"{r['throughput_vs_ideal']:>6.2f}"
    )


if __name__ == "__main__":
    main()
