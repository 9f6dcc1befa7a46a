"""An HTTP front-end process (``BRANCHY_HTTP_WORKERS`` > 0; started by ``service.workers``).

One Python process cannot keep a 2-core machine busy with single-image requests: its
event loop spends about a millisecond of GIL time on each (HTTP, multipart, routing,
decoding) and the model waits (docs/serving-performance.md). So with front ends, the
main process keeps the models, their batchers, metrics and admin state, and N front-end
processes share the public port. A front end takes the common request itself: a
well-formed ``POST /v1/models/{name}/classify`` for a served model. It parses the body
with a lean multipart reader, decodes the images and sends the network inputs to the
main process's batcher over the engine link (``service.engine_link``), then writes the
answer. Everything else (other routes, malformed or refused requests, a model that is
loading or was just reloaded) it forwards unchanged to the main process, whose full
application answers exactly as a single-process server would: one implementation of
every error, and of every admin and monitoring route.

Limits act here first (``service.app.LimitsMiddleware``: body size, body deadline, and
``max_concurrent_requests`` split between the front ends); request metrics are measured
here and relayed to the main process, which exports them with all the others.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import re
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qsl

import httpx
import numpy as np
import torch
import uvicorn
from python_multipart.multipart import parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

from service import intake
from service.app import LimitsMiddleware
from service.engine_link import APP_SOCKET, LINK_SOCKET, CatalogEntry, EngineLink, LinkLost
from service.errors import (
    _HTTP_CODES,
    CLIENT_CLOSED_REQUEST,
    DeadlineExceeded,
    ServiceError,
    ShuttingDown,
    count_rejection,
    error_body,
    is_v2_path,
)
from service.metrics import UNKNOWN_MODEL
from service.settings import Settings

logger = logging.getLogger(__name__)

_CLASSIFY = re.compile(r"^/v1/models/([^/]+)/classify$")
_MODEL_PATH = re.compile(r"^/v[12]/models/([^/]+)")
_TOP_K = re.compile(r"^[1-9][0-9]{0,3}$")
# Headers that belong to one connection, not to the message (RFC 9110 7.6.1), and
# Content-Length, which httpx sets for a forwarded body (a forwarded answer keeps its own:
# its raw bytes are passed on unchanged).
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
# A front end decodes images of up to this many pixels (64 x 64) on its event loop
# unless BRANCHY_INLINE_DECODE_PIXELS says otherwise: unlike a single-process server's
# loop, it has no model to share the GIL with, and the thread hop measured slower
# (docs/serving-performance.md).
INLINE_DECODE_PIXELS = 4096
CATALOG_REFRESH_S = 0.5
METRICS_FLUSH_S = 0.1


class MetricsRelay:
    """The request metrics of this front end, sent to the main process in batches
    (:func:`service.engine_link.apply_records`), which exports them."""

    def __init__(self, link: EngineLink, models: Callable[[], dict[str, CatalogEntry]]) -> None:
        self.link = link
        self.models = models
        self.records: list[tuple[Any, ...]] = []

    def model_label(self, name: str | None) -> str:
        return name if name is not None and name in self.models() else UNKNOWN_MODEL

    def reject(self, model: str, reason: str) -> None:
        self.records.append(("reject", model, reason))

    def observe_request(self, model: str, endpoint: str, seconds: float) -> None:
        self.records.append(("duration", model, endpoint, seconds))

    def count_request(self, model: str, endpoint: str, status: int) -> None:
        self.records.append(("count", model, endpoint, status))

    def flush(self) -> None:
        if self.records:
            records, self.records = self.records, []
            self.link.send("requests", records)

    def flush_for(self, token: int) -> None:
        """Answer the main process's ("flush", token): everything not yet sent."""
        records, self.records = self.records, []
        self.link.send("flushed", token, records)


def parse_multipart(
    body: bytes, content_type: bytes, max_parts: int
) -> list[tuple[str | None, bytes]] | None:
    """The file parts of a multipart/form-data body in its plain form, as Starlette
    would read them, or None for anything else (no boundary, a preamble, a part that is
    not a file, more than ``max_parts`` parts, an unusual header or ending): the main
    process then reads the request and says exactly what is wrong with it.

    Uses python-multipart's own header parser, so the boundary and every part's name and
    file name are read as Starlette reads them.
    """
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    charset = params.get(b"charset", b"utf-8").lower()
    if (
        not boundary
        or charset not in (b"utf-8", b"utf8")
        or set(params) - {b"boundary", b"charset"}
    ):
        return None
    delimiter = b"--" + boundary
    if not body.startswith(delimiter + b"\r\n"):
        return None
    separator = b"\r\n" + delimiter
    parts: list[tuple[str | None, bytes]] = []
    at = len(delimiter) + 2
    while True:
        end = body.find(separator, at)
        if end < 0 or len(parts) == max_parts:
            return None
        head_end = body.find(b"\r\n\r\n", at, end)
        if head_end < 0:
            return None
        filename = _file_part_name(body[at:head_end])
        if filename is None:
            return None
        parts.append((filename, body[head_end + 4 : end]))
        after = end + len(separator)
        tail = body[after : after + 2]
        if tail == b"--":
            return parts if body[after + 2 :] in (b"", b"\r\n") else None
        if tail != b"\r\n":
            return None
        at = after + 2


def _file_part_name(head: bytes) -> str | None:
    """A part's file name from its headers (only Content-Disposition and Content-Type
    are expected); None when the part is no plain file part."""
    filename = None
    for line in head.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        key = name.strip().lower()
        if not colon or name != name.rstrip() or line[:1] in (b" ", b"\t"):
            return None
        if key == b"content-disposition":
            if filename is not None:
                return None
            kind, options = parse_options_header(value.strip())
            if kind != b"form-data" or b"name" not in options or b"filename" not in options:
                return None
            raw = options[b"filename"]
            try:
                filename = raw.decode("utf-8")
            except UnicodeDecodeError:
                filename = raw.decode("latin-1")  # as Starlette decodes it
        elif key != b"content-type":
            return None
    return filename


class _Refused(Exception):
    """The request is not for the fast path: forward it to the main process."""


class FrontEnd:
    """The front end's ASGI application (wrapped in the limits middleware by
    :func:`create_frontend`).

    Args:
        settings: the server settings (the same environment as the main process's).
        link: the engine link to the main process.
        app_socket: the main process's private HTTP socket.
        on_lost: called when the main process goes away (stops this front end).
    """

    def __init__(
        self,
        settings: Settings,
        link: EngineLink,
        app_socket: Path,
        *,
        on_lost: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.link = link
        self.app_socket = app_socket
        self.on_lost = on_lost
        self.catalog: dict[str, CatalogEntry] = {}
        self.relay = MetricsRelay(link, lambda: self.catalog)
        link.on_flush = self.relay.flush_for
        self._refresh = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._proxy: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    # ---------------------------------------------------------------- lifecycle

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        try:
            await self.start()
        except Exception as exc:
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        await self.stop()
        await send({"type": "lifespan.shutdown.complete"})

    async def start(self) -> None:
        await self.link.connect()
        self._proxy = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(self.app_socket)),
            base_url="http://branchy-serve",
            # The main process answers by the request's deadline; beyond that (and a
            # batch's grace) it is not answering at all.
            timeout=httpx.Timeout(self.settings.request_timeout_s + 2 * intake.COMPUTE_GRACE_S),
            # An idle connection is dropped here well before the main process would
            # close it (BRANCHY_KEEP_ALIVE_S): reusing one that the other side is
            # closing fails the forwarded request.
            limits=httpx.Limits(
                max_connections=None,
                max_keepalive_connections=64,
                keepalive_expiry=self.settings.keep_alive_s / 2,
            ),
        )
        await self._load_catalog()
        self._tasks = [
            asyncio.create_task(self._keep_catalog(), name="catalog"),
            asyncio.create_task(self._flush_metrics(), name="metrics"),
            asyncio.create_task(self._watch_link(), name="watch-link"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.relay.flush()
        if self._proxy is not None:
            await self._proxy.aclose()
        await self.link.close()

    async def _load_catalog(self) -> None:
        reply = await self.link.call("catalog")
        self.catalog = reply[2]

    async def _keep_catalog(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CATALOG_REFRESH_S):
                    await self._refresh.wait()
            self._refresh.clear()
            with contextlib.suppress(LinkLost):
                await self._load_catalog()

    async def _flush_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_FLUSH_S)
            self.relay.flush()

    async def _watch_link(self) -> None:
        await self.link.lost.wait()
        logger.error("the main process closed the engine link; this front end stops")
        self.on_lost()

    # ---------------------------------------------------------------- requests

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.monotonic()
        path = scope["path"]
        try:
            body = await _read_body(receive)
        except StarletteHTTPException as exc:  # 413 over the limit, 408 stalled upload
            code = _HTTP_CODES.get(exc.status_code, "bad_request")
            self._count_rejection(path, code)
            await _send_error(send, exc.status_code, code, str(exc.detail), path=path)
            return
        except _ClientGone:
            logger.info(
                "%s %s: the client went away before its request was read (counted as %d)",
                scope["method"],
                path,
                CLIENT_CLOSED_REQUEST,
            )
            self._count_rejection(path, "client_disconnect")
            await send({"type": "http.response.start", "status": CLIENT_CLOSED_REQUEST})
            await send({"type": "http.response.body", "body": b""})
            return
        match = _CLASSIFY.match(path) if scope["method"] == "POST" else None
        if match is not None:
            try:
                await self._classify(match.group(1), scope, body, send, started)
                return
            except _Refused:
                pass
        await self._forward(scope, body, send)

    def _count_rejection(self, path: str, code: str) -> None:
        m = _MODEL_PATH.match(path)
        count_rejection(self.relay, m.group(1) if m else None, code)

    async def _classify(
        self, name: str, scope: Scope, body: bytes, send: Send, started: float
    ) -> None:
        settings = self.settings
        entry = self.catalog.get(name)
        if entry is None:
            raise _Refused
        top_k, text = _query(scope["query_string"])
        try:
            own = intake.parse_thresholds(text, entry.num_exits, settings)
        except ServiceError:
            raise _Refused from None
        content_type = _header(scope, b"content-type")
        media = content_type.split(b";")[0].strip().lower()
        limit = settings.max_images_per_request
        if media == b"multipart/form-data":
            images = parse_multipart(body, content_type, limit)
            if images is None:
                raise _Refused
        elif media.startswith(b"image/") and body:
            images = [(None, body)]
        else:
            raise _Refused
        t0 = time.perf_counter()
        try:
            inputs = await intake.decode(images, entry.input_spec, settings, started=started)
        except DeadlineExceeded as exc:
            self._count_rejection(scope["path"], exc.code)
            await _send_service_error(send, exc, path=scope["path"])
            return
        except ServiceError:
            raise _Refused from None  # a bad image: the main process says what is wrong
        decode_s = time.perf_counter() - t0
        x = np.stack(inputs)  # uint8 pixels: the main process normalises them
        k = None if top_k is None else min(top_k, len(entry.class_names))
        try:
            async with asyncio.timeout(
                max(0.0, started + settings.request_timeout_s - time.monotonic())
                + 2 * intake.COMPUTE_GRACE_S
            ):
                reply = await self.link.call(
                    "classify",
                    name,
                    entry.generation,
                    started,
                    own,
                    k,
                    tuple(x.shape),
                    x.tobytes(),
                )
        except TimeoutError:
            late = DeadlineExceeded(
                f"no answer within the request timeout of {settings.request_timeout_s} s"
            )
            await _send_service_error(send, late, path=scope["path"])
            return
        except LinkLost:
            down = ShuttingDown("the server is stopping; retry")
            await _send_service_error(send, down, path=scope["path"])
            return
        kind = reply[0]
        if kind == "stale":  # not served, or reloaded since this front end looked
            self.catalog.pop(name, None)
            self._refresh.set()
            raise _Refused
        if kind == "error":
            _, _, status, code, message, headers, error_id = reply
            await _send_error(
                send, status, code, message, path=scope["path"], headers=headers, error_id=error_id
            )
            return
        _, _, rows, names, thresholds = reply
        payload = intake.classify_body(
            name,
            rows,
            [filename for filename, _ in images],
            entry.class_names if names is None else names,
            thresholds,
            decode_s=decode_s,
            started=started,
        )
        await _send_json(send, 200, payload)

    async def _forward(self, scope: Scope, body: bytes, send: Send) -> None:
        """Forward the request to the main process and stream its answer back."""
        assert self._proxy is not None
        logger.debug("forwarding %s %s to the main process", scope["method"], scope["path"])
        url = scope.get("raw_path") or scope["path"].encode()
        if scope["query_string"]:
            url += b"?" + scope["query_string"]
        headers = [(k, v) for k, v in scope["headers"] if k not in _HOP_BY_HOP]
        request = self._proxy.build_request(
            scope["method"], url.decode("latin-1"), headers=headers, content=body
        )
        try:
            response = await self._proxy.send(request, stream=True)
        except httpx.HTTPError:
            logger.warning("the main process did not answer a forwarded request")
            down = ShuttingDown("the server is not answering; retry")
            await _send_service_error(send, down, path=scope["path"])
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (k, v)
                        for k, v in response.headers.raw
                        if k.lower() not in _HOP_BY_HOP or k.lower() == b"content-length"
                    ],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


class _ClientGone(Exception):
    """The client disconnected before its request body arrived."""


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _query(query_string: bytes) -> tuple[int | None, str | None]:
    """``top_k`` and ``thresholds`` of a classify request in their plain form; anything
    else (repeated, out of range, not a plain number) is left to the main process,
    whose validation error names it."""
    top_k: int | None = None
    text: str | None = None
    seen = set()
    for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if key not in ("top_k", "thresholds"):
            continue
        if key in seen:
            raise _Refused
        seen.add(key)
        if key == "top_k":
            if not _TOP_K.match(value) or int(value) > intake.MAX_TOP_K:
                raise _Refused
            top_k = int(value)
        else:
            if len(value) > intake.MAX_THRESHOLDS_TEXT:
                raise _Refused
            text = value
    return top_k, text


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return b""


async def _send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-length", str(len(body)).encode()),
                (b"content-type", b"application/json"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _send_error(
    send: Send,
    status: int,
    code: str,
    message: str,
    *,
    path: str,
    headers: dict[str, str] | None = None,
    error_id: str | None = None,
) -> None:
    body = json.dumps(error_body(status, code, message, error_id, v2=is_v2_path(path))).encode()
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await _send_json(send, status, body, extra)


async def _send_service_error(send: Send, exc: ServiceError, *, path: str) -> None:
    await _send_error(send, exc.status, exc.code, exc.message, path=path, headers=exc.headers)


def create_frontend(
    settings: Settings,
    link: EngineLink,
    app_socket: Path,
    *,
    workers: int = 1,
    on_lost: Callable[[], None] = lambda: None,
) -> tuple[FrontEnd, LimitsMiddleware]:
    """A front end and the ASGI application to serve (it, behind the limits middleware).

    Args:
        settings: the server settings.
        link: the engine link.
        app_socket: the main process's private HTTP socket.
        workers: how many front ends share the port (they split
            ``max_concurrent_requests``).

    Unless set, ``inline_decode_pixels`` is :data:`INLINE_DECODE_PIXELS` in a front end.
        on_lost: called when the main process goes away.
    """
    update: dict[str, Any] = {
        "max_concurrent_requests": max(1, math.ceil(settings.max_concurrent_requests / workers))
    }
    if "inline_decode_pixels" not in settings.model_fields_set:
        update["inline_decode_pixels"] = INLINE_DECODE_PIXELS
    own = settings.model_copy(update=update)
    front = FrontEnd(own, link, app_socket, on_lost=on_lost)
    return front, LimitsMiddleware(front, settings=own, metrics=front.relay)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> None:
    """``python -m service.frontend --fd N --dir D --workers W`` (``service.workers``
    starts it with the listening socket inherited as file descriptor N)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="the listening socket")
    parser.add_argument("--dir", type=Path, required=True, help="the main process's sockets")
    parser.add_argument("--workers", type=int, default=1, help="front ends sharing the port")
    args = parser.parse_args(argv)
    # SIGTERM from the main process: uvicorn drains, then re-raises it to this handler
    signal.signal(signal.SIGTERM, _exit_cleanly)
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per forwarded request
    torch.set_num_threads(1)  # decoding only: the main process runs the network
    server: uvicorn.Server | None = None

    def lost() -> None:
        if server is not None:
            server.should_exit = True

    _, app = create_frontend(
        settings,
        EngineLink(args.dir / LINK_SOCKET),
        args.dir / APP_SOCKET,
        workers=args.workers,
        on_lost=lost,
    )
    config = uvicorn.Config(app, **settings.uvicorn_options())
    server = uvicorn.Server(config)
    listener = socket.socket(fileno=args.fd)
    server.run(sockets=[listener])


if __name__ == "__main__":
    main()
