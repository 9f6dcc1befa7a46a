"""What shadow monitoring costs in served throughput.

Two servers on the same model, one with ``BRANCHY_SHADOW_RATE=0`` and one with the rate
under test (default 0.01, the server's default), loaded in turn (closed loop, the same
images, interleaved rounds so that other load on a shared machine hits both alike; the
idle one only waits). Prints served images/s of each, the relative cost, and how many
shadows the second one ran and dropped::

    .venv/bin/python benchmarks/shadow_cost.py                  # zoo/b-lenet, rate 0.01
    .venv/bin/python benchmarks/shadow_cost.py --rate 1 --model zoo/b-alexnet

Writes ``benchmarks/results/shadow_cost.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.load import closed_loop, multipart, test_images  # noqa: E402
from models import load_checkpoint  # noqa: E402
from testsupport.server import ServerProcess  # noqa: E402
from training.fidelity import cpu_name  # noqa: E402

logger = logging.getLogger("shadow_cost")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "zoo" / "b-lenet")
    p.add_argument("--rate", type=float, default=0.01, help="shadow rate under test")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--images-per-request", type=int, default=16)
    p.add_argument("--seconds", type=float, default=4.0, help="per round and server")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "shadow_cost.json")
    return p


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    ckpt = load_checkpoint(args.model)
    images, source = test_images(ckpt, 256)
    k = args.images_per_request
    bodies = [multipart(images[i : i + k]) for i in range(0, len(images) - k + 1, k)]
    tmp = Path(tempfile.mkdtemp(prefix="shadow-cost-"))
    repo = tmp / "repo"
    repo.mkdir()
    (repo / args.model.name).symlink_to(args.model.resolve())
    servers = {}
    for label, rate in (("off", 0.0), ("on", args.rate)):
        env = {
            "BRANCHY_MODEL_REPOSITORY": str(repo),
            "BRANCHY_STATE_DIR": str(tmp / f"state-{label}"),
            "BRANCHY_DEVICE": "cpu",
            "BRANCHY_TORCH_THREADS": str(args.torch_threads),
            "BRANCHY_SHADOW_RATE": str(rate),
            "BRANCHY_LOG_LEVEL": "WARNING",
            "BRANCHY_STATE_POLL_S": "0",  # one server: nothing to poll for
        }
        servers[label] = ServerProcess(env, log_path=tmp / f"{label}.log", name=label, strict=True)
    try:
        for s in servers.values():
            s.wait_ready(120)
        rates: dict[str, list[float]] = {"off": [], "on": []}
        for r in range(args.rounds + 1):  # round 0 warms both up, unmeasured
            order = ["off", "on"] if r % 2 == 0 else ["on", "off"]
            for label in order:
                cell, elapsed = closed_loop(
                    servers[label].url,
                    args.model.name,
                    bodies,
                    concurrency=args.concurrency,
                    seconds=args.seconds if r else 1.0,
                    max_requests=10**9,
                )
                if cell.errors:
                    raise RuntimeError(f"{label}: errors {cell.errors}")
                if r:
                    rates[label].append(cell.images / elapsed)
        on = servers["on"].url
        report = {
            "model": str(args.model),
            "rate": args.rate,
            "images": source,
            "concurrency": args.concurrency,
            "images_per_request": k,
            "seconds_per_round": args.seconds,
            "rounds": args.rounds,
            "cpu": cpu_name(),
            "images_per_s": {label: rates[label] for label in rates},
            "median_images_per_s": {label: statistics.median(v) for label, v in rates.items()},
            "shadows_run": _metric(on, "branchy_shadow_total"),
            "shadows_dropped": _metric(on, "branchy_shadow_dropped_total"),
        }
        off_m, on_m = report["median_images_per_s"]["off"], report["median_images_per_s"]["on"]
        report["cost"] = 1.0 - on_m / off_m
    finally:
        for s in servers.values():
            s.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{args.model.name}, shadow rate {args.rate}: {off_m:,.0f} img/s without, {on_m:,.0f} "
        f"with ({100 * report['cost']:+.1f}% cost; {report['shadows_run']:.0f} shadows run, "
        f"{report['shadows_dropped']:.0f} dropped); per round: {rates}; CPU {report['cpu']}"
    )
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(get_args_parser().parse_args())
