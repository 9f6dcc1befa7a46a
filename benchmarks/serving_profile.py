"""Where a served request's time goes: py-spy on a real server under closed-loop load.

It starts ``python -m service`` on one checkpoint (default zoo/b-alexnet, the default
runtime and the default HTTP front end), drives it with ``benchmarks/load.py``'s
closed-loop client at the given shape and concurrency, and samples every process of the
server (the main process, which runs the batcher and the network, and each HTTP front
end) with its own ``py-spy record --gil`` (only the thread holding the GIL is sampled:
the GIL and the cores are what a process's event loop, decode work and batch thread
compete for). Each process's raw stacks are grouped into the steps of a request (HTTP
parsing and writes, middleware, routing, multipart, decode, the engine link, the batch
thread, JSON, ...) and reported as shares of its samples, with the GIL-held share of
wall time (how busy that process's Python is) and the server's own batch-size and
inference-time metrics. ``--http-workers 0`` profiles the single-process server.

py-spy needs ptrace (root, or ``kernel.yama.ptrace_scope=0``); install it with the
``bench`` extra. Writes ``reports/serving/profile-<model>-<n>img-c<c>.json`` (``--out-dir``).

    .venv/bin/python benchmarks/serving_profile.py --model-dir zoo/b-alexnet --images-per-request 1 --concurrency 32
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.load import SpawnedServer, closed_loop, multipart, summarise, test_images  # noqa: E402
from benchmarks.runtimes import cpu_info  # noqa: E402
from benchmarks.serving import batch_totals  # noqa: E402
from models import load_checkpoint  # noqa: E402
from testsupport.procstat import tree_pids  # noqa: E402

# (step, substrings of a frame that put a stack in it), first match from the leaf up wins
STEPS: list[tuple[str, tuple[str, ...]]] = [
    ("batch thread: network (runtime)", ("models/runtimes.py", "models/engine.py")),
    (
        "batcher: answers, taking batches (release, metrics)",
        ("Batcher._compute", "Batcher._run_group", "Batcher._work", "Batcher._take"),
    ),
    ("decode (Pillow, normalise)", ("decode_many", "_decode_inline", "service/preprocess.py")),
    ("multipart parsing", ("MultiPartParser", "formparsers", "multipart/", "parse_multipart")),
    ("response JSON (pydantic)", ("model_dump_json", "ClassifyResponse", "classify_body")),
    ("engine link (frames, pickling, answers)", ("service/engine_link.py",)),
    ("front end: request handling", ("service/frontend.py",)),
    ("route handler (classify/v2)", ("classify_images", "service/routes/", "service/intake.py")),
    ("FastAPI dependencies", ("solve_dependencies", "service/deps.py")),
    (
        "thread hand-offs (to_thread, futures)",
        ("to_thread", "run_in_executor", "threading.py", "concurrent/futures"),
    ),
    ("HTTP write (transport.write)", ("RequestResponseCycle.send",)),
    ("middleware (limits, metrics)", ("LimitsMiddleware", "middleware", "prometheus_client")),
    ("FastAPI/Starlette routing", ("fastapi/", "starlette/")),
    ("HTTP parsing (uvicorn)", ("httptools_impl", "h11_impl", "data_received")),
    ("event loop (asyncio/uvloop)", ("asyncio/", "uvloop", "run_forever", "_run_once")),
]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=ROOT / "zoo" / "b-alexnet")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=8.0, help="sampled seconds")
    p.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-batch-delay-ms", type=float, default=2.0)
    p.add_argument("--http-workers", type=int, default=1, help="BRANCHY_HTTP_WORKERS")
    p.add_argument("--out-dir", type=Path, default=ROOT / "reports" / "serving")
    return p


def step_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):  # the innermost recognised frame names the step
        for step, marks in STEPS:
            if any(m in frame for m in marks):
                return step
    return "other"


def group(raw: str) -> tuple[int, dict[str, int]]:
    """Samples and samples per step of py-spy's raw (collapsed) output."""
    total, steps = 0, collections.Counter[str]()
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        steps[step_of(stack)] += int(count)
    return total, dict(steps.most_common())


def main(args: argparse.Namespace) -> dict[str, Any]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("py-spy is not installed: pip install -e '.[bench]'")
    ckpt = load_checkpoint(args.model_dir)
    images, source = test_images(ckpt, 256)
    n, c = args.images_per_request, args.concurrency
    bodies = [
        multipart([images[(k * n + j) % len(images)] for j in range(n)])
        for k in range(max(1, len(images) // n))
    ]
    server = SpawnedServer(args.model_dir, argparse.Namespace(
        max_batch_size=args.max_batch_size, max_batch_delay_ms=args.max_batch_delay_ms,
        torch_threads=args.torch_threads),
        {"BRANCHY_HTTP_WORKERS": str(args.http_workers)})  # fmt: skip
    spy_dir = Path(tempfile.mkdtemp(prefix="branchy-spy-"))
    name = args.model_dir.name
    records: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
    try:
        server.wait_ready(300)
        closed_loop(server.url, name, bodies, concurrency=c, seconds=1.5, max_requests=10**7)
        before = batch_totals(server.url).get(name, (0.0,) * 3)
        for k, pid in enumerate(tree_pids(server.proc.pid)):
            label = "main" if k == 0 else f"front end {k}"
            raw_path = spy_dir / f"{pid}.txt"
            record = subprocess.Popen(
                [spy, "record", "--gil", "--nonblocking", "-r", str(args.rate), "-d",
                 str(max(1, int(args.seconds))), "-f", "raw", "-o", str(raw_path),
                 "-p", str(pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            records.append((label, raw_path, record))
        cell, elapsed = closed_loop(
            server.url, name, bodies, concurrency=c, seconds=args.seconds, max_requests=10**7
        )
        errors = [record.communicate(timeout=60)[1] for _, _, record in records]
        after = batch_totals(server.url).get(name, (0.0,) * 3)
        info = json.loads(_get(server.url, f"/v1/models/{name}"))
    finally:
        server.stop()
    load = summarise(cell, elapsed, ckpt.model.num_exits)
    processes = {}
    for (label, raw_path, _), err in zip(records, errors, strict=True):
        if not raw_path.is_file():
            raise SystemExit(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")
        total, steps = group(raw_path.read_text())
        processes[label] = {
            "gil_samples": total,
            "gil_held_share": total / (args.rate * elapsed),
            "gil_ms_per_request": 1e3 * total / args.rate / max(1, load["requests"]),
            "steps": {k: v / total for k, v in steps.items()} if total else {},
        }
    ran_images, batches, inference_s = (a - b for a, b in zip(after, before, strict=True))
    report = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "cpu": cpu_info(),
        "cpus": os.cpu_count(),
        "load_average_at_end": list(os.getloadavg()),
        "model": name,
        "runtime": info.get("runtime"),
        "images": source,
        "images_per_request": n,
        "concurrency": c,
        "http_workers": args.http_workers,
        "load": {k: load[k] for k in ("images_per_s", "requests_per_s", "p50_ms", "p99_ms", "errors")},
        "processes": processes,
        "mean_batch_size": ran_images / max(1.0, batches),
        "mean_inference_ms": 1e3 * inference_s / max(1.0, batches),
    }  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    mode = "" if args.http_workers == 1 else f"-w{args.http_workers}"
    out = args.out_dir / f"profile-{name}-{n}img-c{c}{mode}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{name} ({report['runtime']}), {n} image(s)/request, c={c}, "
        f"{args.http_workers} front end(s): {load['images_per_s']:.0f} img/s, "
        f"p50 {load['p50_ms']:.1f} ms; batches of {report['mean_batch_size']:.1f} "
        f"taking {report['mean_inference_ms']:.1f} ms"
    )
    for label, proc in processes.items():
        print(
            f"{label}: GIL held {100 * proc['gil_held_share']:.0f} % of the time, "
            f"{proc['gil_ms_per_request']:.2f} ms per request"
        )
        for step, share in proc["steps"].items():
            print(f"  {100 * share:5.1f} %  {step}")
    print(f"written {out}")
    return report


def _get(url: str, path: str) -> str:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", path)
    return conn.getresponse().read().decode()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
