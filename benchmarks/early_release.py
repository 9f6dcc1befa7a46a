"""Early release under load: request latency with and without answering each image as
soon as its exit is decided (``BRANCHY_EARLY_RELEASE``).

Two servers on the same checkpoint, one with early release and one without, take turns
(interleaved rounds) under the same closed-loop load of single-image requests (real
CIFAR-10 test JPEGs or MNIST digits, ``--concurrency`` client threads). Per server: p50
and p99 request latency overall and per exit taken, throughput, and exit shares.

    .venv/bin/python benchmarks/early_release.py                  # zoo/b-alexnet
    .venv/bin/python benchmarks/early_release.py --model-dir zoo/b-lenet --seconds 5

Prints a Markdown table and writes ``benchmarks/results/early_release.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.load import multipart, test_images  # noqa: E402
from benchmarks.runtimes import cpu_info  # noqa: E402
from models import load_checkpoint  # noqa: E402
from testsupport.server import ServerProcess  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=ROOT / "zoo" / "b-alexnet")
    p.add_argument("--runtime", default="auto", help="BRANCHY_RUNTIME of both servers")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-batch-delay-ms", type=float, default=2.0)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "early_release.json"
    )
    return p


def load_round(
    port: int, model: str, bodies: list[tuple[bytes, str]], concurrency: int, seconds: float
) -> list[tuple[float, int]]:
    """(latency, exit) of every single-image request answered 200 in ``seconds``."""
    out: list[tuple[float, int]] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.perf_counter() < stop_at:
            body, ctype = bodies[k % len(bodies)]
            k += concurrency
            t0 = time.perf_counter()
            conn.request("POST", f"/v1/models/{model}/classify", body=body,
                         headers={"Content-Type": ctype})  # fmt: skip
            resp = conn.getresponse()
            data = resp.read()
            if resp.status == 200:
                exit_index = json.loads(data)["results"][0]["exit"]["index"]
                with lock:
                    out.append((time.perf_counter() - t0, exit_index))
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return 1e3 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarise(samples: list[tuple[float, int]], seconds: float, num_exits: int) -> dict[str, Any]:
    lat = [s for s, _ in samples]
    per_exit = {
        str(i): {
            "requests": sum(1 for _, e in samples if e == i),
            "p50_ms": quantile([s for s, e in samples if e == i], 0.50),
            "p99_ms": quantile([s for s, e in samples if e == i], 0.99),
        }
        for i in range(num_exits)
    }
    return {
        "requests": len(lat),
        "images_per_s": len(lat) / seconds,
        "p50_ms": quantile(lat, 0.50),
        "p99_ms": quantile(lat, 0.99),
        "mean_ms": 1e3 * statistics.fmean(lat) if lat else float("nan"),
        "per_exit": per_exit,
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    ckpt = load_checkpoint(args.model_dir)
    images, source = test_images(ckpt, args.images)
    bodies = [multipart([img]) for img in images]
    tmp = Path(tempfile.mkdtemp(prefix="branchy-early-"))
    repo = tmp / "repo"
    repo.mkdir()
    name = args.model_dir.name
    (repo / name).symlink_to(args.model_dir.resolve())
    servers = {}
    for mode in ("on", "off"):
        env = {
            "BRANCHY_MODEL_REPOSITORY": str(repo),
            "BRANCHY_STATE_DIR": str(tmp / f"state-{mode}"),
            "BRANCHY_RUNTIME": args.runtime,
            "BRANCHY_EARLY_RELEASE": "1" if mode == "on" else "0",
            "BRANCHY_MAX_BATCH_SIZE": str(args.max_batch_size),
            "BRANCHY_MAX_BATCH_DELAY_MS": str(args.max_batch_delay_ms),
            "BRANCHY_TORCH_THREADS": str(args.torch_threads),
            "BRANCHY_LOG_LEVEL": "WARNING",
            "BRANCHY_STATE_POLL_S": "0",  # one server: nothing to poll for
        }
        servers[mode] = ServerProcess(
            env, log_path=tmp / f"server-{mode}.log", name=mode, strict=True
        )
    samples: dict[str, list[tuple[float, int]]] = {"on": [], "off": []}
    runtime = {}
    try:
        for mode, server in servers.items():
            server.wait_ready(120)
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            conn.request("GET", f"/v1/models/{name}")
            runtime[mode] = json.loads(conn.getresponse().read())["runtime"]
            conn.close()
            load_round(server.port, name, bodies, args.concurrency, 1.0)  # warm-up
        for r in range(args.rounds):
            order = ("on", "off") if r % 2 == 0 else ("off", "on")
            for mode in order:
                samples[mode] += load_round(
                    servers[mode].port, name, bodies, args.concurrency, args.seconds
                )
    finally:
        for server in servers.values():
            server.stop()
    seconds = args.seconds * args.rounds
    report: dict[str, Any] = {
        "model": name,
        "images": source,
        "runtime": runtime,
        "concurrency": args.concurrency,
        "seconds_per_round": args.seconds,
        "rounds": args.rounds,
        "max_batch_size": args.max_batch_size,
        "max_batch_delay_ms": args.max_batch_delay_ms,
        "machine": {"cpu": cpu_info(), "python": platform.python_version()},
        "early_release": {
            m: summarise(s, seconds, ckpt.model.num_exits) for m, s in samples.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return report


def _cpu_text(cpu: dict[str, Any]) -> str:
    flags = [f for f, on in cpu["flags"].items() if on]
    return f"{cpu['model']} ({', '.join(flags) or 'no AVX-512/AMX'})"


def table(report: dict[str, Any]) -> str:
    er = report["early_release"]
    exits = sorted(er["on"]["per_exit"], key=int)
    head = "| early release | img/s | p50 ms | p99 ms | " + " | ".join(
        f"exit {e} p50 / p99 ms" for e in exits
    )
    lines = [
        f"{report['model']} on {report['runtime']['on']}, single-image requests, concurrency "
        f"{report['concurrency']}, {report['rounds']} x {report['seconds_per_round']} s per "
        f"server; {_cpu_text(report['machine']['cpu'])}",
        "",
        head + " |",
        "|" + "---|" * (4 + len(exits)),
    ]
    for mode in ("on", "off"):
        s = er[mode]
        cells = [
            f"{s['per_exit'][e]['p50_ms']:.1f} / {s['per_exit'][e]['p99_ms']:.1f}" for e in exits
        ]
        lines.append(
            f"| {mode} | {s['images_per_s']:,.0f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
