"""A real ``python -m service`` process on a free loopback port, for the benchmarks.

``load.py`` and ``gpu/`` (``benchmarks.gpu.service``) both measure the server as users run
it, in its own process; this is the one place that starts, watches and stops it. (The
tests have their own fixture, ``tests/service/conftest.py``, which benchmarks do not
import.)
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """``python -m service`` with ``env`` on top of this process's environment.

    Inherited ``BRANCHY_*`` variables are dropped, so only ``env`` configures the server;
    the repository root is put on ``PYTHONPATH``. Output goes to ``log_path``.

    Args:
        env: ``BRANCHY_*`` settings (host, port and state polling are set here), and any
            other variable the server process needs.
        log_path: the server's stdout and stderr.
        name: for messages.
    """

    def __init__(self, env: Mapping[str, str], *, log_path: Path, name: str = "server") -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full = {k: v for k, v in os.environ.items() if not k.startswith("BRANCHY_")}
        full["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT)] + ([full["PYTHONPATH"]] if full.get("PYTHONPATH") else [])
        )
        full.update(BRANCHY_HOST="127.0.0.1", BRANCHY_PORT=str(self.port), BRANCHY_STATE_POLL_S="0")
        full.update(env)
        self.env = {k: v for k, v in full.items() if k.startswith("BRANCHY_")}
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service"],
            cwd=ROOT,
            env=full,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.ready_s: float | None = None
        self.exit_code: int | None = None

    def wait_ready(self, timeout: float) -> float:
        """Seconds from start to ``/readyz`` 200; raises on exit, load failure, timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            log = self.log()
            if "cannot load model" in log or "no model could be loaded" in log:
                raise RuntimeError(f"server {self.name} failed to load:\n{self.log_tail()}")
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2.0)
            try:
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    self.ready_s = time.monotonic() - self.started
                    return self.ready_s
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
            time.sleep(0.2)
        raise TimeoutError(
            f"server {self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}"
        )

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in time (exit code then None)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                self._log.close()
                return None
        if not self._log.closed:
            self._log.close()
        self.exit_code = self.proc.returncode
        return self.exit_code
