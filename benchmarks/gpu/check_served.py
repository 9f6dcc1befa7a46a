"""Check ``serve_*``: one server variant's answers against the offline reference, and
its exit metrics counted exactly."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from benchmarks.gpu.common import MODEL, Skip, fail
from benchmarks.gpu.reference import Images, Reference, agreement
from benchmarks.gpu.serving import Http, Server, classify_all, exit_counts


def check_served(
    result: dict[str, Any],
    server: Server | None,
    ref: Reference,
    images: Images,
    args: argparse.Namespace,
    *,
    ready_timeout: float,
    min_pct: float,
    criterion: str,
    start_error: str | None = None,
) -> None:
    """Correctness of one server variant against the offline reference, and metrics."""
    if server is None:
        if start_error:
            raise RuntimeError(f"the server process did not start: {start_error}")
        raise Skip("CUDA-only option; the settings ignore it on the CPU")
    result["env"] = server.env
    result["ready_s"] = round(server.wait_ready(ready_timeout), 2)
    conn = Http(server.port)
    status, body = conn.request("GET", f"/v1/models/{MODEL}")
    conn.close()
    if status != 200:
        raise RuntimeError(f"GET /v1/models/{MODEL} answered {status}: {body[:300]!r}")
    described = json.loads(body)
    result["described"] = {k: described.get(k) for k in ("device", "half_precision", "thresholds")}
    before = exit_counts(server.port)
    start = time.perf_counter()
    answers = classify_all(server.port, images, per_request=16, clients=4)
    result["classify_s"] = round(time.perf_counter() - start, 3)
    after = exit_counts(server.port)

    cls = [a["class_index"] for a in answers]
    ex = [a["exit"]["index"] for a in answers]
    ent = [float(a["entropy"]) for a in answers]
    result.update(agreement(ref, cls, ex, ent, args.tie_tol))
    result["accuracy_pct"] = (
        100.0 * sum(c == y for c, y in zip(cls, images.labels, strict=True)) / len(cls)
    )
    result["reference_accuracy_pct"] = 100.0 * float(
        (ref.cls == torch.tensor(images.labels)).float().mean()
    )
    result["exit_shares_pct"] = {
        str(e): round(100.0 * ex.count(e) / len(ex), 2) for e in sorted(set(ex))
    }

    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    served_per_exit = {str(e): float(ex.count(e)) for e in set(ex)}
    result["metrics_exit_delta"] = delta
    metrics_ok = sum(delta.values()) == len(answers) and all(
        delta.get(k, 0.0) == v for k, v in served_per_exit.items()
    )
    result["metrics_exact"] = metrics_ok
    if not metrics_ok:
        fail(result, f"branchy_exit_total grew by {delta}, answers per exit {served_per_exit}")
    pct = result[criterion]
    result["criterion"] = f"{criterion} >= {min_pct}"
    if pct < min_pct:
        fail(result, f"{criterion} {pct:.2f} % < {min_pct} %")
    if (
        server.env.get("BRANCHY_HALF_PRECISION") == "1"
        and described.get("half_precision") is not True
    ):
        fail(result, "the model does not report half_precision: true")
