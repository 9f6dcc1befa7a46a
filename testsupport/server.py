"""The one launcher of real server processes, for the tests and the benchmarks.

:class:`ServerProcess` runs ``python -m service`` (or the fault-injection wrapper
``testsupport/hooked_server.py``) in a child process on a free loopback port, with its
output in a log file. One environment rule for every caller:

* inherited ``BRANCHY_*`` variables are dropped, so only ``env`` configures the server (a
  setting exported in the developer's shell never leaks into a test or a measurement);
* host and port are set here (``127.0.0.1``, a free port); ``env`` can set anything else;
* the repository root is put first on ``PYTHONPATH`` and is the working directory, so the
  server runs this checkout's code whether or not it is installed.

:func:`server_env` is the configuration every *test* server starts from (tiny
repository, private state folder, CPU, eager engine, one intra-op thread).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOOKED_SERVER = ROOT / "testsupport" / "hooked_server.py"
# What the service logs when a model of the repository does not load (service/loading.py).
LOAD_FAILURES = ("cannot load model", "no model could be loaded")


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_environment(env: Mapping[str, str], port: int) -> dict[str, str]:
    """The full environment of a server process on ``port`` configured by ``env``
    (the rule of the module docstring)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("BRANCHY_")}
    full["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([full["PYTHONPATH"]] if full.get("PYTHONPATH") else [])
    )
    full.update(BRANCHY_HOST="127.0.0.1", BRANCHY_PORT=str(port), PYTHONUNBUFFERED="1")
    full.update(env)
    return full


class ServerProcess:
    """A real server process on a free loopback port, started on construction.

    Args:
        env: ``BRANCHY_*`` settings and any other variable the process needs, over the
            environment rule of this module.
        log_path: where the process's stdout and stderr go.
        hooked: run ``testsupport/hooked_server.py`` (fault injection) instead of
            ``python -m service``.
        name: for messages.
        strict: :meth:`wait_ready` raises as soon as the log reports a model that did not
            load (the benchmarks: measuring a server that lacks a model is wrong; some
            tests want exactly such a server, so the default is off).

    Attributes:
        port, url (also ``base_url``): where it listens.
        env: the ``BRANCHY_*`` variables the process was given (for reports).
        ready_s: seconds from start to ready, once :meth:`wait_ready` returned.
        exit_code: the exit status after :meth:`stop` (None when it had to be killed).
    """

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        *,
        hooked: bool = False,
        name: str = "server",
        strict: bool = False,
    ) -> None:
        self.name = name
        self.strict = strict
        self.port = free_port()
        self.url = self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full = server_environment(env, self.port)
        self.env = {k: v for k, v in full.items() if k.startswith("BRANCHY_")}
        args = [str(HOOKED_SERVER)] if hooked else ["-m", "service"]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=full, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.ready_s: float | None = None
        self.exit_code: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = 90.0) -> float:
        """Wait until ``/readyz`` answers 200.

        Returns:
            Seconds from start to ready.

        Raises:
            RuntimeError: the process exited (or, ``strict``, a model did not load).
            TimeoutError: not ready within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self.strict and any(s in self.log() for s in LOAD_FAILURES):
                raise RuntimeError(f"{self.name} failed to load a model:\n{self.log_tail()}")
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
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log(self) -> str:
        """Everything the process has written so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then wait; SIGKILL only if it does not exit in time.

        Returns:
            The exit status, or None when it had to be killed.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                self._log.close()
                return None
        self._log.close()
        self.exit_code = self.proc.returncode
        return self.exit_code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def __enter__(self) -> ServerProcess:
        """Wait until ready (the process already runs); stopped on exit."""
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def server_env(model_repo: Path, tmp: Path) -> dict[str, str]:
    """The settings every test server starts from: the tiny repository, a fresh state
    folder, the CPU and its eager reference engine (tests/service/test_runtimes.py serves
    the other runtimes), one warm-up batch, one intra-op thread (two cores are shared by
    the test process and the server) unless the caller's environment says otherwise."""
    return {
        "BRANCHY_MODEL_REPOSITORY": str(model_repo),
        "BRANCHY_STATE_DIR": str(tmp / "state"),
        "BRANCHY_DEVICE": "cpu",
        "BRANCHY_RUNTIME": "torch",
        "BRANCHY_WARMUP_BATCHES": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }


@contextlib.contextmanager
def running_server(
    model_repo: Path, tmp: Path, env: Mapping[str, str] | None = None
) -> Iterator[ServerProcess]:
    """A ready real server on ``model_repo`` with ``env`` over :func:`server_env`,
    logging to ``tmp/server.log``; stopped on exit."""
    with ServerProcess({**server_env(model_repo, tmp), **(env or {})}, tmp / "server.log") as proc:
        yield proc
