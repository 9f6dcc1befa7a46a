"""Check ``latency_b1``: batch-1 served latency, sequential single-image requests."""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

from benchmarks.gpu.common import MODEL, fail
from benchmarks.gpu.reference import Images
from benchmarks.gpu.serving import Http, Server


def check_latency(
    result: dict[str, Any], server: Server, images: Images, args: argparse.Namespace
) -> None:
    """Batch-1 served latency: sequential single-image raw-body requests."""
    conn = Http(server.port)
    lat, errors = [], 0
    try:
        for i in range(5):  # warm the connection and the batch-1 path
            conn.request("POST", f"/v1/models/{MODEL}/classify", images.data[i], "image/jpeg")
        for i in range(args.latency_requests):
            data = images.data[i % len(images.data)]
            t0 = time.perf_counter()
            status, _ = conn.request("POST", f"/v1/models/{MODEL}/classify", data, "image/jpeg")
            lat.append(time.perf_counter() - t0)
            errors += status != 200
    finally:
        conn.close()
    lat.sort()
    result.update(
        requests=len(lat),
        errors=errors,
        p50_ms=round(1e3 * statistics.median(lat), 3),
        p99_ms=round(1e3 * lat[min(len(lat) - 1, math.ceil(0.99 * len(lat)) - 1)], 3),
        mean_ms=round(1e3 * statistics.fmean(lat), 3),
    )
    if errors:
        fail(result, f"{errors} failed request(s)")
