"""What shadow monitoring costs in served throughput, resolved on a noisy machine.

Servers on the same model, one with ``BRANCHY_SHADOW_RATE=0`` (``off``), one at the rate
under test (default 0.01, the server's default) and one at rate 1 (every early exit
shadowed: an upper bound, large enough to see). They are loaded one at a time (closed
loop, the same images), in many short rounds; within a round each server runs once, in
an order that rotates from round to round, so that other load on a shared machine hits
every server alike and a slow drift cancels. Each round gives a *paired* ratio
``on / off`` of served images/s; the cost is ``1 - median ratio``, with a bootstrap 95 %
interval of the median and a two-sided sign test (how many rounds the shadowed server
was slower). The shadow counters (shadows run and dropped) are read from each server's
``/metrics`` and compared with the early exits it served. Throughput on a shared machine
moves with everyone else's load; so each round also reads each server's own CPU time
(``/proc/<pid>/stat``, every thread, the shadow's included) per served image, and the
share of it the shadow adds, ``1 - cpu_off / cpu_on`` (paired the same way), is what the
shadow costs a CPU-bound server::

    .venv/bin/python benchmarks/shadow_cost.py                  # zoo/b-lenet, rate 0.01
    .venv/bin/python benchmarks/shadow_cost.py --model zoo/b-alexnet --rounds 30

Writes ``benchmarks/results/shadow_cost.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.load import closed_loop, multipart, test_images  # noqa: E402
from models import load_checkpoint  # noqa: E402
from testsupport.procstat import tree_cpu_seconds  # noqa: E402
from testsupport.server import ServerProcess  # noqa: E402
from training.fidelity import cpu_name  # noqa: E402

logger = logging.getLogger("shadow_cost")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "zoo" / "b-lenet")
    p.add_argument("--rate", type=float, default=0.01, help="shadow rate under test")
    p.add_argument("--no-upper", action="store_true", help="skip the rate-1 server")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--images-per-request", type=int, default=16)
    p.add_argument("--seconds", type=float, default=1.5, help="per round and server")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="seeds the bootstrap")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "shadow_cost.json")
    return p


# ---------------------------------------------------------------- statistics


def sign_test(slower: int, n: int) -> float:
    """Two-sided sign-test p-value of ``slower`` rounds of ``n`` (ties dropped before)."""
    if n == 0:
        return 1.0
    k = min(slower, n - slower)
    tail = sum(math.comb(n, j) for j in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap_median(
    values: list[float], *, draws: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of the median."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return meds[int(0.025 * draws)], meds[int(0.975 * draws) - 1]


def paired_cost(on: list[float], off: list[float], seed: int) -> dict[str, Any]:
    """Cost ``1 - median(on/off)`` of paired rounds, its interval and the sign test."""
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    lo, hi = bootstrap_median(ratios, seed=seed)
    slower = sum(r < 1 for r in ratios)
    untied = sum(r != 1 for r in ratios)
    return {
        "ratios": ratios,
        "cost": 1 - statistics.median(ratios),
        "cost_ci95": [1 - hi, 1 - lo],
        "rounds_slower": slower,
        "sign_test_p": sign_test(slower, untied),
    }


# ---------------------------------------------------------------- the servers


def counters(url: str, model: str) -> dict[str, float]:
    """Shadow series of ``model`` from ``/metrics`` (summed over other labels)."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("branchy_shadow") and s.labels.get("model") == model:
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def main(args: argparse.Namespace) -> dict[str, Any]:
    ckpt = load_checkpoint(args.model)
    last = ckpt.model.num_exits - 1
    images, source = test_images(ckpt, 256)
    k = args.images_per_request
    bodies = [multipart(images[i : i + k]) for i in range(0, len(images) - k + 1, k)]
    tmp = Path(tempfile.mkdtemp(prefix="shadow-cost-"))
    repo = tmp / "repo"
    repo.mkdir()
    (repo / args.model.name).symlink_to(args.model.resolve())
    rates = {"off": 0.0, "on": args.rate}
    if not args.no_upper:
        rates["rate1"] = 1.0
    servers = {}
    for label, rate in rates.items():
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
    labels = list(servers)
    speed: dict[str, list[float]] = {label: [] for label in labels}
    cpu_ms: dict[str, list[float]] = {label: [] for label in labels}
    early: dict[str, int] = dict.fromkeys(labels, 0)
    served: dict[str, int] = dict.fromkeys(labels, 0)
    try:
        for s in servers.values():
            s.wait_ready(180)
        for r in range(args.rounds + 1):  # round 0 warms every server up, unmeasured
            order = labels[r % len(labels) :] + labels[: r % len(labels)]
            if r % 2:
                order.reverse()
            for label in order:
                cpu0 = tree_cpu_seconds(servers[label].proc.pid)
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
                early[label] += sum(n for e, n in cell.exits.items() if e < last)
                served[label] += cell.images
                if r:
                    speed[label].append(cell.images / elapsed)
                    # the server's own CPU per image: what other jobs' load barely moves
                    cpu = tree_cpu_seconds(servers[label].proc.pid) - cpu0
                    cpu_ms[label].append(1e3 * cpu / max(cell.images, 1))
        seen = {label: counters(servers[label].url, args.model.name) for label in labels}
    finally:
        for s in servers.values():
            s.stop()
    report: dict[str, Any] = {
        "model": str(args.model),
        "images": source,
        "concurrency": args.concurrency,
        "images_per_request": k,
        "seconds_per_round": args.seconds,
        "rounds": args.rounds,
        "torch_threads": args.torch_threads,
        "cpu": cpu_name(),
        "command": " ".join(["python benchmarks/shadow_cost.py", *sys.argv[1:]]),
        "images_per_s": speed,
        "median_images_per_s": {label: statistics.median(v) for label, v in speed.items()},
        "server_cpu_ms_per_image": cpu_ms,
        "servers": {},
    }
    for label in labels[1:]:
        c = seen[label]
        report["servers"][label] = {
            "rate": rates[label],
            **paired_cost(speed[label], speed["off"], args.seed),
            # CPU per image: the cost is the extra share, 1 - off/on
            "cpu": paired_cost(cpu_ms["off"], cpu_ms[label], args.seed),
            "images_served": served[label],
            "early_exits_served": early[label],
            "shadows_run": c.get("branchy_shadow_total", 0.0),
            "shadows_dropped": c.get("branchy_shadow_dropped_total", 0.0),
        }
    if "rate1" in report["servers"]:
        # the rate-1 cost, scaled by shadows run per served image (an estimate, for when
        # the low rate's own interval is too wide on a noisy machine)
        up = report["servers"]["rate1"]
        per = {
            lb: v["shadows_run"] / max(v["images_served"], 1) for lb, v in report["servers"].items()
        }
        for lb, v in report["servers"].items():
            scale = per[lb] / per["rate1"] if per["rate1"] else float("nan")
            v["scaled_from_rate1"] = {
                "shadows_per_image": per[lb],
                "cost": up["cost"] * scale,
                "cpu_cost": up["cpu"]["cost"] * scale,
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    return report


def render(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']}: {report['rounds']} paired rounds of {report['seconds_per_round']} s "
        f"per server; CPU {report['cpu']}; `{report['command']}`",
        f"off: median {report['median_images_per_s']['off']:,.0f} images/s",
    ]
    for label, s in report["servers"].items():
        lo, hi = s["cost_ci95"]
        lines.append(
            f"rate {s['rate']:g}: median {report['median_images_per_s'][label]:,.0f} images/s; "
            f"cost {100 * s['cost']:+.1f} % (95 % CI {100 * lo:+.1f} to {100 * hi:+.1f} %; "
            f"slower in {s['rounds_slower']} of {len(s['ratios'])} rounds, sign test "
            f"p = {s['sign_test_p']:.3f}); {s['early_exits_served']} early exits served, "
            f"{s['shadows_run']:.0f} shadows run, {s['shadows_dropped']:.0f} dropped"
        )
        c = s["cpu"]
        lo, hi = c["cost_ci95"]
        lines.append(
            f"  server CPU per image: {100 * c['cost']:+.1f} % of it spent on the shadow "
            f"(95 % CI {100 * lo:+.1f} to {100 * hi:+.1f} %; sign test p = {c['sign_test_p']:.3f})"
        )
        if "scaled_from_rate1" in s and s["rate"] != 1:
            e = s["scaled_from_rate1"]
            lines.append(
                f"  scaled from rate 1 by shadows per served image ({e['shadows_per_image']:.4f}): "
                f"throughput cost {100 * e['cost']:+.2f} %, CPU {100 * e['cpu_cost']:+.2f} %"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(get_args_parser().parse_args())
