"""Check ``throughput``: served images/s under closed-loop load against in-process
``early_exit`` and the service's ``Engine.run`` on the same device."""

from __future__ import annotations

import argparse
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.gpu.common import MODEL, REQUEST_TIMEOUT_S, fail
from benchmarks.gpu.reference import Images, Reference
from benchmarks.gpu.serving import Http, Server, multipart
from models import load_checkpoint


def check_throughput(
    result: dict[str, Any], server: Server, ref: Reference, images: Images, args: argparse.Namespace
) -> None:
    """Served images/s under closed-loop load against in-process early_exit."""
    device = torch.device(args.device)
    k = args.per_request
    bodies = [
        multipart(images.names[i : i + k], images.data[i : i + k])
        for i in range(0, len(images.data) - k + 1, k)
    ]
    done = [0] * args.clients
    errors: list[str] = []
    stop_at = time.monotonic() + args.seconds

    def client(c: int) -> None:
        conn = Http(server.port)
        j = c
        try:
            while time.monotonic() < stop_at:
                body, ctype = bodies[j % len(bodies)]
                status, data = conn.request("POST", f"/v1/models/{MODEL}/classify", body, ctype)
                if status == 200:
                    done[c] += k
                else:
                    errors.append(f"{status}: {data[:200]!r}")
                j += args.clients
        except Exception as exc:
            errors.append(repr(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(args.clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.seconds + REQUEST_TIMEOUT_S)
    elapsed = time.monotonic() - start
    served = sum(done) / elapsed
    result.update(
        served_images_per_s=round(served, 1),
        served_seconds=round(elapsed, 2),
        clients=args.clients,
        images_per_request=k,
        max_batch_size=args.max_batch_size,
        load_errors=len(errors),
        load_error_samples=errors[:5],
    )

    # In-process: the same images at batch 256, same device, synchronised.
    ckpt = load_checkpoint(args.zoo / MODEL, device="cpu")
    model = ckpt.model.to(device).eval()
    reps = math.ceil(256 / ref.x.shape[0])
    x_cpu = ref.x.repeat(reps, 1, 1, 1) if reps > 1 else ref.x
    batches_cpu = [b for b in x_cpu.split(256) if b.shape[0] == 256]
    batches = [b.to(device) for b in batches_cpu]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    seconds = min(args.seconds, 2.0)

    def rate(step: Callable[[int], object]) -> float:
        for i in range(3):
            step(i)
        sync()
        count, i, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            step(i)
            count += 256
            i += 1
        sync()
        return count / (time.perf_counter() - t0)

    with torch.inference_mode():
        inproc = rate(lambda i: model.early_exit(batches[i % len(batches)], ckpt.thresholds))
    import service.batcher as batcher

    engine = batcher.Engine(load_checkpoint(args.zoo / MODEL, device="cpu"), device)
    thr = torch.tensor(ckpt.thresholds, dtype=torch.float32).expand(256, len(ckpt.thresholds))
    engine_rate = rate(lambda i: engine.run(batches_cpu[i % len(batches_cpu)], thr))
    result.update(
        inprocess_early_exit_images_per_s=round(inproc, 1),
        inprocess_engine_run_images_per_s=round(engine_rate, 1),
        served_over_inprocess=round(served / inproc, 3),
        served_over_engine_run=round(served / engine_rate, 3),
    )
    if errors or served <= 0:
        fail(result, f"{len(errors)} failed load request(s), {served:.1f} images/s")
