"""The link between the main process and its HTTP front ends (``BRANCHY_HTTP_WORKERS``).

The main process owns the models, their batchers, the metrics and the admin state; each
front end (``service.frontend``) holds one Unix-socket connection to it. Over it the
front end asks for the catalogue of served models (name, engine generation, exits,
classes, input), sends a classify request's decoded images and gets their answers, and
relays the request metrics it measured. The main process's side is :class:`LinkServer`,
the front end's :class:`EngineLink`.

A frame is a 4-byte big-endian length and a pickled tuple. Pickle is safe here: both
ends are this server's own processes, and the socket lies in a folder only the server's
user can enter (``service.workers``).

Messages (``rid``: the front end's request id, echoed in the answer):

* ``("catalog", rid)`` -> ``("catalog", rid, {name: CatalogEntry})``
* ``("classify", rid, name, generation, started, thresholds, k, shape, data)``, where
  ``data`` holds the images' ``(N, H, W, C)`` uint8 pixels (``shape``; normalised here,
  a quarter of the bytes of the network's inputs) and ``started`` is the request's
  ``time.monotonic()`` (one clock for every process of the machine) ->
  ``("ok", rid, rows, class_names, thresholds)`` (``class_names`` None when they are the
  catalogue's), ``("error", rid, status, code, message, headers, error_id)``, or
  ``("stale", rid)`` when the model is not served or not the generation decoded for: the
  front end then forwards the request to the main process, which answers it in full.
* ``("requests", records)``: request metrics, no answer (``service.frontend.MetricsRelay``).

And one message from the main process to its front ends: ``("flush", token)`` before it
renders ``/metrics``, answered with ``("flushed", token, records)``, so that a scrape
counts every request answered before it (the relay otherwise sends every 0.1 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from models.checkpoint import InputSpec
from service import intake
from service.batcher import Classified
from service.deps import AppState
from service.errors import (
    REJECT_REASONS,
    ServiceError,
    count_rejection,
    log_service_error,
    new_error_id,
)
from service.metrics import Metrics
from service.repository import ServedModel

logger = logging.getLogger(__name__)

# The main process's sockets in its private folder (``service.workers``).
APP_SOCKET = "app.sock"  # the full application, over HTTP
LINK_SOCKET = "engine.sock"  # the engine link
_LENGTH = struct.Struct("!I")
# Endpoints and reasons a front end may report: label values stay a fixed set.
_ENDPOINTS = frozenset({"classify", "v2_infer"})
_REASONS = frozenset(REJECT_REASONS.values())


@dataclass(frozen=True)
class CatalogEntry:
    """What a front end needs to take a model's classify requests itself."""

    name: str
    generation: int  # ServedModel.generation: changes with every load and reload
    num_exits: int
    class_names: tuple[str, ...]
    input_spec: InputSpec


class _Framed(asyncio.Protocol):
    """One end of a link connection: frames in, frames out.

    Every complete frame that arrives goes to :meth:`on_message` at once, several per read
    when they come together (no reader task, no await per frame). Frames sent in one turn
    of the event loop leave in one write: the answers of a batch cost one system call
    and wake the other end once, not once per request.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._inbox = bytearray()
        self._outbox: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        inbox = self._inbox
        inbox += data
        at, end = 0, len(inbox)
        while end - at >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(inbox, at)
            body = at + _LENGTH.size
            if end - body < size:
                break
            message = pickle.loads(inbox[body : body + size])
            at = body + size
            try:
                self.on_message(message)
            except Exception:
                error_id = new_error_id()
                logger.exception("engine link: a %r message failed [id %s]", message[0], error_id)
        del inbox[:at]

    def on_message(self, message: tuple[Any, ...]) -> None:
        raise NotImplementedError

    def send(self, message: tuple[Any, ...]) -> None:
        """Queue a frame; it leaves with the others of this turn of the loop. Dropped when
        the other end is gone: nobody waits for it any more."""
        if self.transport is None or self.transport.is_closing():
            return
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._outbox += (_LENGTH.pack(len(data)), data)

    def _flush(self) -> None:
        frames, self._outbox = self._outbox, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(frames))


class _FrontEndConnection(_Framed):
    """The main process's side of one front end's connection."""

    def __init__(self, server: LinkServer) -> None:
        super().__init__()
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)  # the front end went away (restarted, or stopping)
        self.server._connections.discard(self)

    def on_message(self, message: tuple[Any, ...]) -> None:
        self.server._dispatch(message, self)


class _Request:
    """A front end's classify request in flight: answered when its last image is, when
    one fails, or when its wait runs out (a timer, not a task per request)."""

    __slots__ = ("conn", "done", "futures", "k", "left", "model", "rid", "server", "timer")

    def __init__(
        self,
        server: LinkServer,
        conn: _FrontEndConnection,
        model: ServedModel,
        rid: int,
        k: int | None,
        futures: list[asyncio.Future[Classified]],
        wait: float,
    ) -> None:
        self.server, self.conn, self.model, self.rid, self.k = server, conn, model, rid, k
        self.futures, self.left, self.done = futures, len(futures), False
        self.timer = asyncio.get_running_loop().call_later(wait, self._answer, True)
        server._open.add(self)
        for f in futures:
            f.add_done_callback(self._image_done)

    def _image_done(self, future: asyncio.Future[Classified]) -> None:
        self.left -= 1
        failed = future.cancelled() or future.exception() is not None
        if not self.done and (failed or self.left == 0):
            self._answer(False)

    def _answer(self, timed_out: bool) -> None:
        self.done = True
        self.timer.cancel()
        server, model = self.server, self.model
        server._open.discard(self)
        if not server._open:
            server._idle.set()
        reply: tuple[Any, ...]
        try:
            answers = intake.settle(self.futures, server.state.settings, timed_out=timed_out)
            names = answers[0].class_names
            same = names is model.checkpoint.class_names or tuple(names) == tuple(
                model.checkpoint.class_names
            )
            reply = (
                "ok",
                self.rid,
                intake.answer_rows(answers, self.k),
                None if same else tuple(names),
                answers[0].thresholds,
            )
        except Exception as exc:
            reply = server._failure(exc, model.name, self.rid)
        self.conn.send(reply)


class LinkServer:
    """The main process's end: answers every connected front end.

    Args:
        state: the application's state (models, settings, metrics).
        path: the Unix socket to listen on.
    """

    def __init__(self, state: AppState, path: Path) -> None:
        self.state = state
        self.path = path
        self._server: asyncio.Server | None = None
        self._connections: set[_FrontEndConnection] = set()
        self._open: set[_Request] = set()  # classify requests not answered yet
        self._idle = asyncio.Event()
        self._flushes: dict[int, asyncio.Future[None]] = {}
        self._tokens = itertools.count()
        state.metrics.relayed = self.collect

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: _FrontEndConnection(self), path=str(self.path)
        )
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        """Stop listening, and let answers still being computed finish."""
        if self._server is not None:
            self._server.close()
        if self._open:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(intake.COMPUTE_GRACE_S):
                    await self._idle.wait()
        await asyncio.sleep(0)  # the last answers' frames leave

    async def collect(self, timeout_s: float = 1.0) -> None:
        """Have every front end send the request metrics it has not sent yet, and wait
        for them (at most ``timeout_s``: a busy or stuck front end delays no scrape)."""
        waiting = []
        loop = asyncio.get_running_loop()
        for conn in list(self._connections):
            token = next(self._tokens)
            self._flushes[token] = loop.create_future()
            waiting.append(self._flushes[token])
            conn.send(("flush", token))
        if waiting:
            await asyncio.wait(waiting, timeout=timeout_s)
        for future in waiting:
            future.cancel()
        for token in [t for t, f in self._flushes.items() if f.done()]:
            del self._flushes[token]

    def catalog(self) -> dict[str, CatalogEntry]:
        entries = {}
        for name, model in list(self.state.models.models.items()):
            if model.batcher is None:
                continue
            ckpt = model.checkpoint
            entries[name] = CatalogEntry(
                name,
                model.generation,
                model.num_exits,
                tuple(ckpt.class_names),
                ckpt.input_spec,
            )
        return entries

    def _dispatch(self, message: tuple[Any, ...], conn: _FrontEndConnection) -> None:
        kind = message[0]
        if kind == "classify":
            self._classify(message, conn)
        elif kind == "catalog":
            conn.send(("catalog", message[1], self.catalog()))
        elif kind == "requests":
            apply_records(self.state.metrics, message[1])
        elif kind == "flushed":
            apply_records(self.state.metrics, message[2])
            flush = self._flushes.get(message[1])
            if flush is not None and not flush.done():
                flush.set_result(None)
        else:
            logger.warning("engine link: unknown message %r ignored", str(kind)[:40])

    def _classify(self, message: tuple[Any, ...], conn: _FrontEndConnection) -> None:
        _, rid, name, generation, started, thresholds, k, shape, data = message
        model = self.state.models.models.get(name)
        if model is None or model.batcher is None or model.generation != generation:
            conn.send(("stale", rid))
            return
        try:
            pixels = np.frombuffer(data, dtype=np.uint8).reshape(shape)
            futures, wait = intake.submit(
                model,
                intake.pixel_inputs(pixels),
                self.state.settings,
                started=started,
                thresholds=thresholds,
            )
        except Exception as exc:
            conn.send(self._failure(exc, name, rid))
            return
        _Request(self, conn, model, rid, k, futures, wait)

    def _failure(self, exc: Exception, name: str, rid: int) -> tuple[Any, ...]:
        """The ("error", ...) answer for a classify request that failed with ``exc``."""
        if isinstance(exc, ServiceError):
            error_id = log_service_error(exc, "POST", f"/v1/models/{name}/classify")
            count_rejection(self.state.metrics, name, exc.code)
            return ("error", rid, exc.status, exc.code, exc.message, exc.headers, error_id)
        error_id = new_error_id()
        logger.error(
            "engine link: classify for model %r failed [id %s]",
            name,
            error_id,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        return ("error", rid, 500, "internal", "internal server error", {}, error_id)


def apply_records(metrics: Metrics, records: Sequence[tuple[Any, ...]]) -> None:
    """Record request metrics a front end measured. Label values are checked again
    here (a model not served counts as unknown), so the set of series stays bounded."""
    for record in records:
        kind, model = record[0], metrics.model_label(str(record[1]))
        if kind == "duration" and record[2] in _ENDPOINTS:
            metrics.observe_request(model, record[2], float(record[3]))
        elif kind == "count" and record[2] in _ENDPOINTS and 100 <= int(record[3]) <= 599:
            metrics.count_request(model, record[2], int(record[3]))
        elif kind == "reject" and record[2] in _REASONS:
            metrics.reject(model, record[2])


class LinkLost(ConnectionError):
    """The main process closed the link (it stopped or died)."""


class _EngineConnection(_Framed):
    """A front end's side of its connection."""

    def __init__(self, link: EngineLink) -> None:
        super().__init__()
        self.link = link

    def on_message(self, message: tuple[Any, ...]) -> None:
        if message[0] == "flush":
            self.link.on_flush(message[1])
            return
        future = self.link._pending.get(message[1])
        if future is not None and not future.done():
            future.set_result(message)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.link._closed()


class EngineLink:
    """A front end's end of the link: one connection, many requests in flight.

    Args:
        path: the main process's link socket.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lost = asyncio.Event()
        self._conn: _EngineConnection | None = None
        self._pending: dict[int, asyncio.Future[tuple[Any, ...]]] = {}
        self._ids = itertools.count()
        # Called with the token of the main process's ("flush", token) message.
        self.on_flush: Callable[[int], None] = lambda token: None

    async def connect(self, *, timeout_s: float = 30.0) -> None:
        """Connect, retrying while the main process starts.

        Raises:
            LinkLost: no connection within ``timeout_s``.
        """
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                _, self._conn = await loop.create_unix_connection(
                    lambda: _EngineConnection(self), str(self.path)
                )
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise LinkLost(f"no engine link at {self.path} after {timeout_s} s") from None
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        conn = self._conn
        if conn is not None and conn.transport is not None:
            conn._flush()  # what is queued still leaves (the last request metrics)
            conn.transport.close()
            await asyncio.sleep(0)  # connection_lost runs

    def _closed(self) -> None:
        self.lost.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(LinkLost("the engine link closed"))

    async def call(self, kind: str, *args: Any) -> tuple[Any, ...]:
        """Send a request and wait for its answer.

        Raises:
            LinkLost: the main process is gone.
        """
        if self.lost.is_set() or self._conn is None:
            raise LinkLost("the engine link is closed")
        rid = next(self._ids)
        future: asyncio.Future[tuple[Any, ...]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            self._conn.send((kind, rid, *args))
            return await future
        finally:
            self._pending.pop(rid, None)

    def send(self, kind: str, *args: Any) -> None:
        """Send a message that has no answer (request metrics)."""
        if self._conn is not None and not self.lost.is_set():
            self._conn.send((kind, *args))
