"""Closed-loop load generator for the inference server, with the in-process upper bound.

For one model it measures, in one run and on one machine:

* served: N client connections, each sending its next request as soon as the previous one is
  answered (closed loop), with 1 and with 16 images per request, under two threshold
  settings: the calibrated ones and 0 (no early exit). Throughput, p50/p95/p99 latency,
  errors and exit shares per cell.
* in-process: the same network on the same images, already decoded, through
  ``BranchyNet.early_exit`` in batches of the server's max batch size: the upper bound
  of what serving could reach.

It then reports served/in-process throughput and the early-exit gain (calibrated vs 0)
served and in-process. By default it starts the server itself (``python -m service``,
loopback, a fresh state folder, an admin token to switch thresholds) and stops it.

    .venv/bin/python benchmarks/load.py                       # zoo/b-alexnet, 10 s per cell
    .venv/bin/python benchmarks/load.py --duration 3 --concurrency 4
    .venv/bin/python benchmarks/load.py --url http://127.0.0.1:8000 --admin-token ...

Writes ``benchmarks/results/load.json`` (``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import logging
import os
import platform
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import Checkpoint, choose_thresholds, load_checkpoint  # noqa: E402
from models.calibration import exit_outputs  # noqa: E402
from models.exits import leaves  # noqa: E402
from service.preprocess import preprocess  # noqa: E402
from testsupport.checkpoints import write_checkpoint  # noqa: E402
from testsupport.multipart import encode_multipart, image_parts  # noqa: E402
from testsupport.server import ServerProcess  # noqa: E402

logger = logging.getLogger("load")
CIFAR_TEST = ROOT.parent / "shared" / "data" / "cifar10" / "test"
MNIST_TEST = ROOT.parent / "shared" / "data" / "mnist"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("model and server")
    g.add_argument(
        "--model-dir",
        type=Path,
        default=ROOT / "zoo" / "b-alexnet",
        help="checkpoint folder (default zoo/b-alexnet)",
    )
    g.add_argument(
        "--fresh",
        metavar="ARCH",
        default=None,
        help="benchmark a freshly initialised network of this architecture (e.g. "
        "b-alexnet) instead of --model-dir, when no trained checkpoint exists",
    )
    g.add_argument("--url", default=None, help="use a running server instead of starting one")
    g.add_argument("--admin-token", default=None, help="admin token of --url's server")
    g.add_argument("--max-batch-size", type=int, default=64)
    g.add_argument("--max-batch-delay-ms", type=float, default=2.0)
    g.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="intra-op threads, server and in-process alike (0: torch's default)",
    )
    g = p.add_argument_group("load")
    g.add_argument("--concurrency", type=int, default=8, help="client threads (closed loop)")
    g.add_argument("--images-per-request", type=int, nargs="+", default=[1, 16])
    g.add_argument("--duration", type=float, default=10.0, help="measured seconds per cell")
    g.add_argument("--rounds", type=int, default=3, help="interleaved rounds the time is split in")
    g.add_argument(
        "--max-requests", type=int, default=100_000, help="requests per cell and round at most"
    )
    g.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load first")
    g.add_argument("--images", type=int, default=512, help="distinct test images to cycle")
    g.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="accuracy tolerance for the calibrated thresholds when the checkpoint's own are all 0",
    )
    g.add_argument(
        "--untrained-shares",
        type=float,
        nargs="+",
        default=[0.5165, 0.4656],
        help="for an untrained checkpoint: share of images leaving at each early "
        "exit (default: the seed's B-AlexNet, 51.65%% and 46.56%%)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "load.json")
    return p


# --------------------------------------------------------------------------- images


def test_images(ckpt: Checkpoint, count: int) -> tuple[list[bytes], str]:
    """Encoded test images for the checkpoint's input: CIFAR-10 test JPEGs for RGB
    models, MNIST test digits (as PNG) for grey ones, random PNGs otherwise."""
    spec = ckpt.input_spec
    if spec.channels == 3 and CIFAR_TEST.is_dir():
        files = sorted(CIFAR_TEST.glob("*/*.jpg"))
        rng = np.random.default_rng(0)
        pick = rng.choice(len(files), size=min(count, len(files)), replace=False)
        return [files[i].read_bytes() for i in sorted(pick)], f"CIFAR-10 test JPEGs ({CIFAR_TEST})"
    from PIL import Image

    def png(arr: np.ndarray) -> bytes:
        import io

        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()

    mnist = MNIST_TEST / "t10k-images-idx3-ubyte.gz"
    if spec.channels == 1 and mnist.is_file():
        import gzip

        raw = gzip.decompress(mnist.read_bytes())
        arr = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)[:count]
        return [png(a) for a in arr], f"MNIST test digits as PNG ({mnist})"
    rng = np.random.default_rng(0)
    shape = (spec.height, spec.width) + ((spec.channels,) if spec.channels > 1 else ())
    return [png(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(count)], "random PNGs"


def multipart(images: list[bytes]) -> tuple[bytes, str]:
    """One classify request's body holding ``images`` (form field ``images``)."""
    names = [f"{i}.img" for i in range(len(images))]
    return encode_multipart(image_parts(images, ctype="application/octet-stream", names=names))


def fresh_checkpoint(arch: str) -> Path:
    """A freshly initialised checkpoint (seed 0) in a temporary folder named ``arch``."""
    folder = Path(tempfile.mkdtemp(prefix="branchy-fresh-")) / arch
    names = [str(i) for i in range(10)]
    return write_checkpoint(folder, arch, seed=0, calibration=False, class_names=names)


# --------------------------------------------------------------------------- thresholds


def calibrated_thresholds(
    ckpt: Checkpoint, images: list[bytes], tolerance: float, shares: list[float]
) -> tuple[list[float], str]:
    """The checkpoint's own thresholds when non-zero; else chosen from its calibration
    data for ``tolerance``; for an untrained checkpoint (no metrics), thresholds that
    send the share ``shares[i]`` of the benchmark images out at early exit ``i``. The
    cost of a batch depends only on the architecture and how many images leave where,
    so this measures serving faithfully; it says nothing about accuracy."""
    if any(t > 0 for t in ckpt.thresholds):
        return list(ckpt.thresholds), "the checkpoint's"
    if ckpt.calibration is not None and ckpt.metrics:
        point = choose_thresholds(ckpt.calibration, ckpt.model.exit_macs(), tolerance=tolerance)
        return list(point.thresholds), f"chosen on the calibration data for tolerance {tolerance}"
    xs = torch.stack([preprocess(b, ckpt.input_spec, max_pixels=1 << 24) for b in images])
    entropy, _ = exit_outputs(ckpt.model, xs)
    thresholds, alive, left = [], torch.ones(len(xs), dtype=torch.bool), 1.0
    for i in range(ckpt.model.num_exits - 1):
        share = shares[i] if i < len(shares) else 0.5 * left
        q = min(1.0, share / left) if left > 0 else 0.0
        t = float(torch.quantile(entropy[alive, i].double(), q)) if alive.any() else 0.0
        thresholds.append(t)
        alive &= ~leaves(entropy[:, i], t)
        left -= share
    return thresholds, (
        f"untrained network: entropy quantiles of the benchmark images for exit shares {shares}"
    )


# --------------------------------------------------------------------------- in-process


def in_process(
    ckpt: Checkpoint,
    images: list[bytes],
    thresholds: list[float],
    *,
    batch_size: int,
    seconds: float,
) -> dict[str, Any]:
    """Images per second of ``early_exit`` on decoded inputs, batches of ``batch_size``."""
    xs = torch.stack([preprocess(b, ckpt.input_spec, max_pixels=1 << 24) for b in images])
    reps = -(-batch_size * 4 // len(xs))
    xs = xs.repeat(max(reps, 1), 1, 1, 1)
    model = ckpt.model.eval()
    exits = torch.zeros(model.num_exits, dtype=torch.int64)
    with torch.inference_mode():
        model.early_exit(xs[:batch_size], thresholds)  # warm-up
        done, start, k = 0, time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            lo = (k * batch_size) % (len(xs) - batch_size + 1)
            r = model.early_exit(xs[lo : lo + batch_size], thresholds)
            exits += torch.bincount(r.exit_index, minlength=model.num_exits)
            done += batch_size
            k += 1
        elapsed = time.perf_counter() - start
    shares = (exits.double() / exits.sum()).tolist()
    return {
        "images_per_s": done / elapsed,
        "images": done,
        "seconds": elapsed,
        "exit_shares": shares,
    }


# --------------------------------------------------------------------------- served


@dataclass
class Cell:
    """Measurements of one (thresholds, images per request) cell."""

    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    exits: dict[int, int] = field(default_factory=dict)
    images: int = 0


def closed_loop(
    url: str,
    model: str,
    bodies: list[tuple[bytes, str]],
    *,
    concurrency: int,
    seconds: float,
    max_requests: int,
) -> tuple[Cell, float]:
    """``concurrency`` keep-alive connections, each sending its next request as soon as
    the last is answered (closed loop), all driven by one asyncio loop on this thread.

    One loop, not a thread per connection: the client shares the server's cores, and 32
    Python threads taking turns at one GIL (``http.client``) cost about 0.45 ms of CPU per
    request, a quarter of a 2-core machine at 550 requests/s, taken from whichever
    server is being measured. Requests are built once; an answer is read by its
    Content-Length (or chunked), and its JSON parsed to count images and exits.
    """
    return asyncio.run(_closed_loop(url, model, bodies, concurrency, seconds, max_requests))


async def _closed_loop(
    url: str,
    model: str,
    bodies: list[tuple[bytes, str]],
    concurrency: int,
    seconds: float,
    max_requests: int,
) -> tuple[Cell, float]:
    parsed = urllib.parse.urlsplit(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    path = f"/v1/models/{model}/classify"
    requests = [
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1")
        + body
        for body, ctype in bodies
    ]
    cell = Cell()
    sent = [0]
    stop_at = time.perf_counter() + seconds

    async def worker(seed: int) -> None:
        reader = writer = None
        k = seed
        while time.perf_counter() < stop_at and sent[0] < max_requests:
            sent[0] += 1
            request = requests[k % len(requests)]
            k += concurrency
            t0 = time.perf_counter()
            status: int | str  # the HTTP status, or the name of the transport error
            try:
                async with asyncio.timeout(60):
                    if writer is None:
                        reader, writer = await asyncio.open_connection(host, port)
                    assert reader is not None
                    writer.write(request)
                    status, data, keep = await _read_response(reader)
                if not keep:
                    writer.close()
                    writer = None
            except (OSError, EOFError, ValueError, TimeoutError, asyncio.LimitOverrunError) as exc:
                if writer is not None:
                    writer.close()
                    writer = None
                status, data = type(exc).__name__, b""
            dt = time.perf_counter() - t0
            if status == 200:
                cell.latencies.append(dt)
                results = json.loads(data)["results"]
                cell.images += len(results)
                for r in results:
                    e = r["exit"]["index"]
                    cell.exits[e] = cell.exits.get(e, 0) + 1
            else:
                cell.errors[str(status)] = cell.errors.get(str(status), 0) + 1
        if writer is not None:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return cell, time.perf_counter() - start


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """One HTTP/1.1 answer: status, body, and whether the connection stays open.

    Raises:
        EOFError: the server closed the connection (asyncio.IncompleteReadError).
        ValueError: not an HTTP answer.
    """
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    if not version.startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP answer: {lines[0][:40]!r}")
    status = int(rest[:3])
    length, chunked, keep = 0, False, version == b"HTTP/1.1"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = value == b"chunked"
        elif name == b"connection":
            keep = value != b"close"
    if not chunked:
        return status, await reader.readexactly(length), keep
    chunks = []
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)
    await reader.readuntil(b"\r\n")  # no trailers expected: the empty line
    return status, b"".join(chunks), keep


def summarise(cell: Cell, elapsed: float, num_exits: int) -> dict[str, Any]:
    lat = sorted(cell.latencies)

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3 if lat else float("nan")

    total = sum(cell.exits.values()) or 1
    return {
        "requests": len(lat),
        "images": cell.images,
        "seconds": elapsed,
        "requests_per_s": len(lat) / elapsed,
        "images_per_s": cell.images / elapsed,
        "p50_ms": q(0.50),
        "p95_ms": q(0.95),
        "p99_ms": q(0.99),
        "mean_ms": statistics.fmean(lat) * 1e3 if lat else float("nan"),
        "errors": sum(cell.errors.values()),
        "errors_by_status": cell.errors,
        "exit_shares": [cell.exits.get(i, 0) / total for i in range(num_exits)],
    }


def summarise_rounds(parts: list[tuple[Cell, float]], num_exits: int) -> dict[str, Any]:
    """:func:`summarise` of one cell measured over several rounds: ``parts`` holds each
    round's ``(cell, elapsed seconds)``; their requests, errors, exits and seconds add up."""
    merged = Cell()
    for cell, _ in parts:
        merged.latencies += cell.latencies
        merged.images += cell.images
        for k, v in cell.errors.items():
            merged.errors[k] = merged.errors.get(k, 0) + v
        for e, v in cell.exits.items():
            merged.exits[e] = merged.exits.get(e, 0) + v
    return summarise(merged, sum(s for _, s in parts), num_exits)


class SpawnedServer(ServerProcess):
    """``python -m service`` on a free loopback port, serving one checkpoint."""

    def __init__(
        self, model_dir: Path, args: argparse.Namespace, env: dict[str, str] | None = None
    ) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="branchy-load-"))
        repo = self.tmp / "repo"
        repo.mkdir()
        (repo / model_dir.name).symlink_to(model_dir.resolve())
        self.token = secrets.token_hex(16)
        settings = {
            "BRANCHY_MODEL_REPOSITORY": str(repo),
            "BRANCHY_STATE_DIR": str(self.tmp / "state"),
            "BRANCHY_ADMIN_TOKEN": self.token,
            "BRANCHY_MAX_BATCH_SIZE": str(args.max_batch_size),
            "BRANCHY_MAX_BATCH_DELAY_MS": str(args.max_batch_delay_ms),
            "BRANCHY_LOG_LEVEL": "WARNING",
            "BRANCHY_STATE_POLL_S": "0",  # one server: nothing to poll for
        }
        if args.torch_threads:
            settings["BRANCHY_TORCH_THREADS"] = str(args.torch_threads)
        super().__init__(
            settings | (env or {}), log_path=self.tmp / "server.log", name="load", strict=True
        )

    def stop(self, timeout: float = 60.0) -> int | None:
        try:
            return super().stop(timeout)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _request(
    url: str, method: str, path: str, body: Any = None, token: str | None = None
) -> tuple[int, Any]:
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else None
    finally:
        conn.close()


# --------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    model_dir = args.model_dir
    if args.fresh:
        model_dir = fresh_checkpoint(args.fresh)
    if not (model_dir / "manifest.json").is_file():
        raise SystemExit(
            f"{model_dir} is not a checkpoint folder (no manifest.json); train one, or "
            "measure an untrained network with --fresh b-alexnet"
        )
    ckpt = load_checkpoint(model_dir)
    name = model_dir.name
    images, source = test_images(ckpt, args.images)
    calibrated, how = calibrated_thresholds(ckpt, images, args.tolerance, args.untrained_shares)
    settings = {"calibrated": calibrated, "none": [0.0] * (ckpt.model.num_exits - 1)}
    logger.info(
        "model %s (%s), %d images: %s; calibrated thresholds %s (%s)",
        name,
        ckpt.model.name,
        len(images),
        source,
        calibrated,
        how,
    )

    report: dict[str, Any] = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
        },
        "model": {
            "fresh": bool(args.fresh),
            "name": name,
            "architecture": ckpt.model.name,
            "dir": str(model_dir),
            "trained": bool(ckpt.metrics),
        },
        "images": source,
        "thresholds": {"calibrated": calibrated, "calibrated_how": how},
        "settings": {
            k: getattr(args, k)
            for k in (
                "concurrency",
                "duration",
                "max_requests",
                "rounds",
                "max_batch_size",
                "max_batch_delay_ms",
                "images_per_request",
            )
        },
        "in_process": {},
        "served": {},
    }

    server = None
    url, token = args.url, args.admin_token
    if url is None:
        server = SpawnedServer(model_dir, args)
        url, token = server.url, server.token
    cells: dict[tuple[str, int], list[tuple[Cell, float]]] = {}
    bound: dict[str, list[dict[str, Any]]] = {label: [] for label in settings}
    try:
        if server is not None:
            server.wait_ready(120)
        bodies = {
            n: [
                multipart([images[(k * n + j) % len(images)] for j in range(n)])
                for k in range(max(1, len(images) // n))
            ]
            for n in args.images_per_request
        }
        # Rounds interleave every cell and the in-process bound, so that a machine whose
        # load drifts (shared cores) affects all of them alike; each gets its share of
        # every round.
        slice_s = args.duration / args.rounds
        for rnd in range(args.rounds):
            for label, thresholds in settings.items():
                status, body = _request(
                    url,
                    "PUT",
                    f"/admin/models/{name}/thresholds",
                    {"thresholds": thresholds},
                    token,
                )
                if status != 200:
                    raise SystemExit(f"cannot set thresholds ({status}): {body}")
                for n in args.images_per_request:
                    if rnd == 0:
                        closed_loop(
                            url,
                            name,
                            bodies[n],
                            concurrency=args.concurrency,
                            seconds=args.warmup,
                            max_requests=args.max_requests,
                        )
                    cells.setdefault((label, n), []).append(
                        closed_loop(
                            url,
                            name,
                            bodies[n],
                            concurrency=args.concurrency,
                            seconds=slice_s,
                            max_requests=args.max_requests,
                        )
                    )
                # the server is idle now: the bound gets the machine as the server had it
                bound[label].append(
                    in_process(
                        ckpt,
                        images,
                        thresholds,
                        batch_size=args.max_batch_size,
                        seconds=max(1.0, slice_s / 2),
                    )
                )
            logger.info("round %d/%d done", rnd + 1, args.rounds)
    finally:
        if server is not None:
            server.stop()

    for (label, n), parts in cells.items():
        row = summarise_rounds(parts, ckpt.model.num_exits)
        report["served"].setdefault(label, {})[str(n)] = row
    for label, rows in bound.items():
        images_done = sum(r["images"] for r in rows)
        seconds = sum(r["seconds"] for r in rows)
        shares = np.mean([r["exit_shares"] for r in rows], axis=0).tolist()
        report["in_process"][label] = {
            "images_per_s": images_done / seconds,
            "images": images_done,
            "seconds": seconds,
            "exit_shares": shares,
        }

    report["ratios"] = ratios(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"\nwritten {args.out}")
    return report


def ratios(report: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ip = report["in_process"]
    ip_gain = ip["calibrated"]["images_per_s"] / ip["none"]["images_per_s"]
    out["in_process_gain"] = ip_gain
    for n, row in report["served"]["calibrated"].items():
        served_gain = row["images_per_s"] / report["served"]["none"][n]["images_per_s"]
        out[n] = {
            "served_over_in_process_calibrated": row["images_per_s"]
            / ip["calibrated"]["images_per_s"],
            "served_over_in_process_none": report["served"]["none"][n]["images_per_s"]
            / ip["none"]["images_per_s"],
            "served_gain": served_gain,
            "gain_ratio": served_gain / ip_gain,
        }
    return out


def table(report: dict[str, Any]) -> str:
    lines = [
        "| thresholds | img/req | img/s | req/s | p50 ms | p95 ms | p99 ms | errors | exit shares % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, cells in report["served"].items():
        for n, row in cells.items():
            shares = ", ".join(f"{100 * s:.1f}" for s in row["exit_shares"])
            lines.append(
                f"| {label} | {n} | {row['images_per_s']:.0f} | {row['requests_per_s']:.0f} | "
                f"{row['p50_ms']:.1f} | {row['p95_ms']:.1f} | {row['p99_ms']:.1f} | "
                f"{row['errors']} | {shares} |"
            )
    for label, row in report["in_process"].items():
        shares = ", ".join(f"{100 * s:.1f}" for s in row["exit_shares"])
        lines.append(
            f"| {label} (in-process, batch {report['settings']['max_batch_size']}) | - | "
            f"{row['images_per_s']:.0f} | - | - | - | - | - | {shares} |"
        )
    r = report["ratios"]
    lines.append("")
    lines.append(f"In-process early-exit gain (calibrated / none): {r['in_process_gain']:.2f}x")
    for n in report["served"]["calibrated"]:
        x = r[n]
        lines.append(
            f"{n} img/req: served / in-process throughput {100 * x['served_over_in_process_calibrated']:.0f}% "
            f"(calibrated), {100 * x['served_over_in_process_none']:.0f}% (none); served gain "
            f"{x['served_gain']:.2f}x = {100 * x['gain_ratio']:.0f}% of the in-process gain"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
