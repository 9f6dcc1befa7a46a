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
  fault-injection wrapper ``tests/service/hooked_server.py``) on a free port, ready when
  returned, stopped with SIGTERM at teardown. ``server`` is one shared by a module.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from models import CalibrationData, InputSpec, build_model, save_checkpoint
from service.app import create_app
from service.preprocess import normalise
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
MNIST = InputSpec(channels=1, height=28, width=28, mean=(0.1307,), std=(0.3081,))
CIFAR = InputSpec(
    channels=3, height=32, width=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)
)
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"]  # fmt: skip
TOKEN = "test-admin-token-0123"


def write_checkpoint(
    path: Path, arch: str, *, seed: int = 0, calibration: bool = True, samples: int = 200
) -> Path:
    """A freshly initialised checkpoint of ``arch`` (``b-lenet`` or ``b-alexnet``).

    Calibration data are the network's own entropies on random images with labels that
    agree with the final exit for 80% of them, so accuracy-driven threshold choices have
    something to trade.
    """
    torch.manual_seed(seed)
    model = build_model(arch).eval()
    spec = MNIST if model.input_shape[0] == 1 else CIFAR
    classes = [str(i) for i in range(10)] if spec is MNIST else CIFAR_CLASSES
    calib = None
    if calibration:
        g = torch.Generator().manual_seed(seed)
        x = normalise(
            torch.randint(0, 256, (samples, *spec.shape), generator=g, dtype=torch.uint8), spec
        )
        with torch.no_grad():
            outs = model(x)
        from models import entropy_from_logits

        entropy = torch.stack([entropy_from_logits(z) for z in outs], dim=1)
        labels = outs[-1].argmax(1)
        flip = torch.rand(samples, generator=g) < 0.2
        labels = torch.where(flip, (labels + 1) % 10, labels)
        correct = torch.stack([z.argmax(1) == labels for z in outs], dim=1)
        calib = CalibrationData(entropy=entropy, correct=correct)
    return save_checkpoint(path, model, class_names=classes, input_spec=spec, calibration=calib)


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


class ServerProcess:
    """A real server process on a free loopback port.

    Args:
        env: ``BRANCHY_*`` settings (merged over the current environment).
        log_path: where the process's stdout and stderr go.
        hooked: start ``tests/service/hooked_server.py`` (fault injection) instead of
            ``python -m service``.
    """

    def __init__(self, env: dict[str, str], log_path: Path, *, hooked: bool = False) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full = {**os.environ, **env, "BRANCHY_HOST": "127.0.0.1", "BRANCHY_PORT": str(self.port)}
        # Two cores are shared by the test process and the server.
        full.setdefault("OMP_NUM_THREADS", "1")
        args = (
            [sys.executable, str(ROOT / "tests" / "service" / "hooked_server.py")]
            if hooked
            else [sys.executable, "-m", "service"]
        )
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env=full, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; SIGKILL only if it does not exit in time (a test failure)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def server_env(model_repo: Path, tmp: Path) -> dict[str, str]:
    """The settings every test server starts from: the tiny repository, a fresh state
    folder, the CPU and its eager reference engine (tests/service/test_runtimes.py serves
    the other runtimes), one warm-up batch."""
    return {
        "BRANCHY_MODEL_REPOSITORY": str(model_repo),
        "BRANCHY_STATE_DIR": str(tmp / "state"),
        "BRANCHY_DEVICE": "cpu",
        "BRANCHY_RUNTIME": "torch",
        "BRANCHY_WARMUP_BATCHES": "1",
    }


@contextlib.contextmanager
def running_server(
    model_repo: Path, tmp: Path, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """A ready real server on ``model_repo`` with ``env`` over :func:`server_env`,
    logging to ``tmp/server.log``; stopped on exit."""
    proc = ServerProcess({**server_env(model_repo, tmp), **(env or {})}, tmp / "server.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


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
