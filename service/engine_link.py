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
from typing import Any

import numpy as np

from models.checkpoint import InputSpec
from service import intake
from service.deps import AppState
from service.errors import (
    REJECT_REASONS,
    ServiceError,
    count_rejection,
    log_service_error,
    new_error_id,
)
from service.metrics import Metrics

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


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next message, or None at the end of the stream."""
    try:
        head = await reader.readexactly(_LENGTH.size)
        (size,) = _LENGTH.unpack(head)
        return pickle.loads(await reader.readexactly(size))
    except asyncio.IncompleteReadError:
        return None


def write_frame(writer: asyncio.StreamWriter, message: tuple[Any, ...]) -> None:
    if writer.is_closing():
        return  # the other end is gone: nobody waits for this answer any more
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.writelines((_LENGTH.pack(len(data)), data))


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
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._flushes: dict[int, asyncio.Future[None]] = {}
        self._tokens = itertools.count()
        state.metrics.relayed = self.collect

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        """Stop listening, and let answers still being computed finish."""
        if self._server is not None:
            self._server.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=intake.COMPUTE_GRACE_S)

    async def collect(self, timeout_s: float = 1.0) -> None:
        """Have every front end send the request metrics it has not sent yet, and wait
        for them (at most ``timeout_s``: a busy or stuck front end delays no scrape)."""
        waiting = []
        loop = asyncio.get_running_loop()
        for writer in list(self._writers):
            token = next(self._tokens)
            self._flushes[token] = loop.create_future()
            waiting.append(self._flushes[token])
            write_frame(writer, ("flush", token))
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

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while (message := await read_frame(reader)) is not None:
                kind = message[0]
                if kind == "classify":
                    task = asyncio.create_task(self._classify(message, writer))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                elif kind == "catalog":
                    write_frame(writer, ("catalog", message[1], self.catalog()))
                elif kind == "requests":
                    apply_records(self.state.metrics, message[1])
                elif kind == "flushed":
                    apply_records(self.state.metrics, message[2])
                    flush = self._flushes.get(message[1])
                    if flush is not None and not flush.done():
                        flush.set_result(None)
                else:
                    logger.warning("engine link: unknown message %r ignored", str(kind)[:40])
        except (ConnectionError, OSError):
            pass  # the front end went away (it is restarted, or the server stops)
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _classify(self, message: tuple[Any, ...], writer: asyncio.StreamWriter) -> None:
        _, rid, name, generation, started, thresholds, k, shape, data = message
        reply: tuple[Any, ...]
        model = self.state.models.models.get(name)
        if model is None or model.batcher is None or model.generation != generation:
            write_frame(writer, ("stale", rid))
            return
        try:
            pixels = np.frombuffer(data, dtype=np.uint8).reshape(shape)
            inputs = intake.pixel_inputs(pixels)
            answers = await intake.classify(
                model, inputs, self.state.settings, started=started, thresholds=thresholds
            )
            names = answers[0].class_names
            same = names is model.checkpoint.class_names or tuple(names) == tuple(
                model.checkpoint.class_names
            )
            reply = (
                "ok",
                rid,
                intake.answer_rows(answers, k),
                None if same else tuple(names),
                answers[0].thresholds,
            )
        except ServiceError as exc:
            error_id = log_service_error(exc, "POST", f"/v1/models/{name}/classify")
            count_rejection(self.state.metrics, name, exc.code)
            reply = ("error", rid, exc.status, exc.code, exc.message, exc.headers, error_id)
        except Exception:
            error_id = new_error_id()
            logger.exception("engine link: classify for model %r failed [id %s]", name, error_id)
            reply = ("error", rid, 500, "internal", "internal server error", {}, error_id)
        write_frame(writer, reply)


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


class EngineLink:
    """A front end's end of the link: one connection, many requests in flight.

    Args:
        path: the main process's link socket.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lost = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[tuple[Any, ...]]] = {}
        self._ids = itertools.count()
        # Called with the token of the main process's ("flush", token) message.
        self.on_flush: Callable[[int], None] = lambda token: None

    async def connect(self, *, timeout_s: float = 30.0) -> None:
        """Connect, retrying while the main process starts.

        Raises:
            LinkLost: no connection within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reader, self._writer = await asyncio.open_unix_connection(str(self.path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise LinkLost(f"no engine link at {self.path} after {timeout_s} s") from None
                await asyncio.sleep(0.05)
        self._reader_task = asyncio.create_task(self._read(reader), name="engine-link")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task

    async def call(self, kind: str, *args: Any) -> tuple[Any, ...]:
        """Send a request and wait for its answer.

        Raises:
            LinkLost: the main process is gone.
        """
        if self.lost.is_set() or self._writer is None:
            raise LinkLost("the engine link is closed")
        rid = next(self._ids)
        future: asyncio.Future[tuple[Any, ...]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            write_frame(self._writer, (kind, rid, *args))
            return await future
        finally:
            self._pending.pop(rid, None)

    def send(self, kind: str, *args: Any) -> None:
        """Send a message that has no answer (request metrics)."""
        if self._writer is not None and not self.lost.is_set():
            write_frame(self._writer, (kind, *args))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while (message := await read_frame(reader)) is not None:
                if message[0] == "flush":
                    self.on_flush(message[1])
                    continue
                future = self._pending.get(message[1])
                if future is not None and not future.done():
                    future.set_result(message)
        except (ConnectionError, OSError):
            pass
        finally:
            self.lost.set()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(LinkLost("the engine link closed"))
