"""Fixtures of the service tests: a tiny checkpoint repository, an in-process client,
and real server processes on free loopback ports.

Reusable by every service test module (see "Test hooks" in docs/service-contract.md):

* ``model_repo`` (session): a folder with freshly initialised ``b-lenet`` (MNIST shape,
  1×28×28) and ``b-alexnet`` (CIFAR shape, 3×32×32) checkpoints, both with calibration
  data, written by ``models.save_checkpoint``. Nothing is downloaded or trained.
* ``make_settings(**overrides)``: ``Settings`` on ``model_repo`` with a private state dir.
* ``app_client`` / ``make_client(**overrides)``: a ``TestClient`` on ``create_app``, lifespan
  run, models loaded (``/readyz`` 200) before the test starts.
* ``start_server(env=..., hooked=False)``: a real ``python -m service`` process (or the
  fault-injection wrapper ``testsupport/hooked_server.py``) on a free port, ready when
  returned, stopped with SIGTERM at teardown. ``server`` is one shared by a module.

The checkpoint factory and the server launcher are ``testsupport.checkpoints`` and
``testsupport.server``, shared with the benchmarks.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from models import InputSpec
from service.app import create_app
from service.preprocess import normalise
from service.settings import Settings
from testsupport.checkpoints import CIFAR, CIFAR_CLASSES, MNIST, write_checkpoint
from testsupport.server import ROOT, ServerProcess, free_port, running_server, server_env

# Re-exported for the test modules (the definitions live in testsupport/).
__all__ = [
    "CIFAR",
    "CIFAR_CLASSES",
    "MNIST",
    "ROOT",
    "TOKEN",
    "ServerProcess",
    "encode",
    "free_port",
    "offline_input",
    "random_pixels",
    "running_server",
    "server_env",
    "write_checkpoint",
]

TOKEN = "test-admin-token-0123"


def encode(array: np.ndarray, fmt: str = "PNG", **options: Any) -> bytes:
    """Encode an ``(H, W)`` or ``(H, W, C)`` uint8 array as image bytes with Pillow."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **options)
    return buf.getvalue()


def random_pixels(spec: InputSpec, count: int, seed: int = 0) -> np.ndarray:
    """``(count, H, W[, C])`` random uint8 images of the spec's size."""
    rng = np.random.default_rng(seed)
    shape = (count, spec.height, spec.width) + ((spec.channels,) if spec.channels > 1 else ())
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def offline_input(pixels: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """What offline evaluation feeds the network for ``(B, H, W[, C])`` uint8 images."""
    t = torch.from_numpy(pixels)
    t = t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2)
    return normalise(t.contiguous(), spec)


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    write_checkpoint(root / "b-lenet", "b-lenet", seed=0)
    write_checkpoint(root / "b-alexnet", "b-alexnet", seed=1)
    return root


@pytest.fixture
def make_settings(model_repo: Path, tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model_repository": model_repo,
            "state_dir": tmp_path / "state",
            "device": "cpu",
            "runtime": "torch",  # the reference; tests/service/test_runtimes.py serves the rest
            "warmup_batches": 1,
            "state_poll_s": 0,
        }
        values.update(overrides)
        return Settings(**values)

    return make


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("the app did not become ready")
        time.sleep(0.01)


@pytest.fixture
def make_client(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., TestClient]]:
    """Factory of in-process clients (lifespan run, models loaded)."""
    with contextlib.ExitStack() as stack:

        def make(**overrides: Any) -> TestClient:
            client = stack.enter_context(TestClient(create_app(make_settings(**overrides))))
            wait_ready(client)
            return client

        yield make


@pytest.fixture
def app_client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(admin_token=TOKEN)


@pytest.fixture
def start_server(model_repo: Path, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory of ready server processes, stopped at teardown."""
    servers: list[ServerProcess] = []

    def start(
        env: dict[str, str] | None = None, *, hooked: bool = False, ready: bool = True
    ) -> ServerProcess:
        server = ServerProcess(
            {**server_env(model_repo, tmp_path), **(env or {})},
            tmp_path / f"server-{len(servers)}.log",
            hooked=hooked,
        )
        servers.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server shared by a test module (admin token ``TOKEN``)."""
    tmp = tmp_path_factory.mktemp("server")
    with running_server(model_repo, tmp, {"BRANCHY_ADMIN_TOKEN": TOKEN}) as proc:
        yield proc
