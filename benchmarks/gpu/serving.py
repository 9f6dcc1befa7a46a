"""Talking to a real ``python -m service`` process: connections, bodies, metrics."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

from benchmarks.gpu.common import MODEL, REQUEST_TIMEOUT_S
from benchmarks.gpu.reference import Images
from testsupport.multipart import encode_multipart, image_parts
from testsupport.server import ServerProcess


class Http:
    """One keep-alive loopback connection, every call with a timeout."""

    def __init__(self, port: int, timeout: float = REQUEST_TIMEOUT_S) -> None:
        self.port, self.timeout = port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, body: bytes | None = None, ctype: str | None = None
    ) -> tuple[int, bytes]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        headers = {"Content-Type": ctype} if ctype else {}
        try:
            self.conn.request(method, path, body=body, headers=headers)
            resp = self.conn.getresponse()
            data = resp.read()
        except Exception:
            self.close()
            raise
        if resp.getheader("connection", "").lower() == "close":
            self.close()
        return resp.status, data

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def multipart(names: list[str], data: list[bytes]) -> tuple[bytes, str]:
    return encode_multipart(image_parts(data, ctype="image/jpeg", names=names))


class Server(ServerProcess):
    """A real ``python -m service`` process serving only ``b-alexnet`` on loopback."""

    def __init__(self, name: str, args: argparse.Namespace, extra: dict[str, str]) -> None:
        self.state_dir = Path(tempfile.mkdtemp(prefix=f"gpucheck-state-{name}-"))
        env = {
            "BRANCHY_MODEL_REPOSITORY": str(args.zoo.resolve()),
            "BRANCHY_MODELS": MODEL,
            "BRANCHY_DEVICE": args.device,
            "BRANCHY_STATE_DIR": str(self.state_dir),
            "BRANCHY_MAX_BATCH_SIZE": str(args.max_batch_size),
            "BRANCHY_GRACEFUL_SHUTDOWN_S": "10",
            "BRANCHY_LOG_LEVEL": "INFO",
            "BRANCHY_STATE_POLL_S": "0",  # one server: nothing to poll for
        }
        if args.device == "cpu":
            if "OMP_NUM_THREADS" not in os.environ:  # a small shared machine
                env["OMP_NUM_THREADS"] = "1"
            env["BRANCHY_TORCH_THREADS"] = "1"
        env.update(extra)
        super().__init__(env, log_path=args.out / f"server-{name}.log", name=name, strict=True)

    def stop(self, timeout: float = 20.0) -> int | None:
        try:
            return super().stop(timeout)
        finally:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def exit_counts(port: int) -> dict[str, float]:
    """``branchy_exit_total{model=b-alexnet}`` per exit label."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = Http(port)
    status, body = conn.request("GET", "/metrics")
    conn.close()
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == "branchy_exit_total" and s.labels.get("model") == MODEL:
                counts[s.labels["exit"]] = counts.get(s.labels["exit"], 0.0) + s.value
    return counts


def classify_all(port: int, images: Images, per_request: int, clients: int) -> list[dict]:
    """Every image's served answer (in input order), several images per request."""
    n = len(images.data)
    chunks = [list(range(i, min(i + per_request, n))) for i in range(0, n, per_request)]
    answers: list[dict | None] = [None] * n
    errors: list[str] = []

    def client(mine: list[list[int]]) -> None:
        conn = Http(port)
        try:
            for idx in mine:
                body, ctype = multipart(
                    [images.names[i] for i in idx], [images.data[i] for i in idx]
                )
                status, data = conn.request("POST", f"/v1/models/{MODEL}/classify", body, ctype)
                if status != 200:
                    errors.append(f"{status}: {data[:300]!r}")
                    continue
                for i, r in zip(idx, json.loads(data)["results"], strict=True):
                    answers[i] = r
        except Exception as exc:
            errors.append(repr(exc))
        finally:
            conn.close()

    threads = [
        threading.Thread(target=client, args=(chunks[k::clients],), daemon=True)
        for k in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S * (len(chunks) // clients + 2))
    if errors or any(a is None for a in answers):
        missing = sum(a is None for a in answers)
        raise RuntimeError(f"{len(errors)} failed request(s), {missing} missing: {errors[:5]}")
    return [a for a in answers if a is not None]
