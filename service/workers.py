"""The main process of a server with HTTP front ends (``BRANCHY_HTTP_WORKERS`` = N > 0).

It binds the public port once, serves the full application on a private Unix socket
(``app.sock``) with the engine link beside it (``engine.sock``, ``service.engine_link``),
and keeps N front-end processes (``service.frontend``) running, each accepting on the
inherited public socket. The sockets lie in a fresh folder only this user may enter.

Stopping (SIGTERM or Ctrl-C): the front ends are told first; each stops accepting and
finishes its accepted requests, which still reach the main process; once they have
exited (or ``graceful_shutdown_s`` has passed), the main process stops as a
single-process server does: it finishes what it was asked, drains the batchers, exits.
A front end that dies while the server runs is started again.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

import uvicorn

from service.app import create_app
from service.engine_link import APP_SOCKET, LINK_SOCKET
from service.settings import Settings

logger = logging.getLogger(__name__)

# A front end that dies is started again, but not more often than this.
_RESTART_GAP_S = 1.0


def bind(host: str, port: int) -> socket.socket:
    """The public listening socket, inheritable by the front ends."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Supervisor(uvicorn.Server):
    """Uvicorn serving the application on the private socket, plus the front ends."""

    def __init__(
        self, config: uvicorn.Config, settings: Settings, listener: socket.socket, folder: Path
    ) -> None:
        super().__init__(config)
        self.settings = settings
        self.listener = listener
        self.folder = folder
        self.front_ends: list[subprocess.Popen[bytes] | None] = [None] * settings.http_workers
        self._started_at = [0.0] * settings.http_workers
        self._stopping = False

    def _spawn(self, index: int) -> None:
        fd = self.listener.fileno()
        command = [sys.executable, "-m", "service.frontend", "--fd", str(fd)]
        command += ["--dir", str(self.folder), "--workers", str(len(self.front_ends))]
        self.front_ends[index] = subprocess.Popen(command, pass_fds=(fd,))
        self._started_at[index] = time.monotonic()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)  # the lifespan has started the engine link
        for i in range(len(self.front_ends)):
            self._spawn(i)
        host, port = self.listener.getsockname()[:2]
        logger.info("%d HTTP front ends serving http://%s:%d", len(self.front_ends), host, port)

    async def on_tick(self, counter: int) -> bool:
        if not self._stopping:
            for i, process in enumerate(self.front_ends):
                code = None if process is None else process.poll()
                gap = time.monotonic() - self._started_at[i]
                if code is not None and gap > _RESTART_GAP_S:
                    logger.error("HTTP front end %d exited with status %s; restarting it", i, code)
                    self._spawn(i)
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._stopping:
            super().handle_exit(sig, frame)  # a second Ctrl-C: force
            return
        self._captured_signals.append(sig)
        self._stopping = True
        threading.Thread(target=self._stop_front_ends, name="stop-front-ends").start()

    def _stop_front_ends(self) -> None:
        """Let every front end finish its requests, then stop the main process."""
        # Closed here first, so that once the front ends close theirs no connection
        # waits in the listen queue of a socket that nobody will accept from again.
        self.listener.close()
        running = [p for p in self.front_ends if p is not None and p.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.graceful_shutdown_s + 5.0
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("an HTTP front end did not stop in time; killed")
                process.kill()
                process.wait()
        self.should_exit = True


def serve(settings: Settings) -> None:
    """Run the server with ``settings.http_workers`` front ends until stopped."""
    folder = Path(tempfile.mkdtemp(prefix="branchy-serve-"))  # mode 0700
    listener = bind(settings.host, settings.port)
    try:
        app = create_app(settings, link_socket=folder / LINK_SOCKET)
        config = uvicorn.Config(
            app,
            uds=str(folder / APP_SOCKET),
            **settings.uvicorn_options(),
            access_log=False,  # the front ends log every request, forwarded ones too
        )
        server = Supervisor(config, settings, listener, folder)
        try:
            server.run()
        finally:
            for process in server.front_ends:
                if process is not None and process.poll() is None:
                    process.kill()
                    process.wait()
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            shutil.rmtree(folder)
