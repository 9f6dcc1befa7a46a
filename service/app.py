"""The FastAPI application: ``create_app(settings)``, its lifespan and middleware."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__, autotune, shadow
from service.batcher import Engine
from service.deps import AppState, app_state
from service.engine_link import LinkServer
from service.errors import error_body, install_error_handlers, is_v2_path
from service.manager import ModelManager
from service.metrics import UNKNOWN_MODEL, Metrics, RequestMetrics
from service.repository import load_engine
from service.routes import admin, classify, console, docs, health, v2
from service.settings import Settings

logger = logging.getLogger(__name__)

# Endpoints measured by branchy_requests_total / branchy_request_duration_seconds.
_MEASURED = (
    (re.compile(r"^/v1/models/([^/]+)/classify$"), "classify"),
    (re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/infer$"), "v2_infer"),
)


def create_app(settings: Settings | None = None, *, link_socket: Path | None = None) -> FastAPI:
    """Build the application. Nothing heavy happens here: models load in the lifespan.

    Args:
        settings: server settings (default: read from the environment).
        link_socket: serve HTTP front ends (``service.workers``): listen for their
            engine link on this Unix socket, and leave the request metrics to them.
    """
    settings = settings or Settings()
    app = FastAPI(
        title="branchy-serve",
        version=__version__,
        summary="Early-exit (BranchyNet) image classification with dynamic batching.",
        lifespan=_lifespan,
        # No slash redirects: Starlette builds them from the client's Host header, so
        # any client could make the server answer with a redirect to a host it names.
        redirect_slashes=False,
        docs_url=None,  # /docs: routes/docs.py, with local assets (no CDN); no /redoc
        redoc_url=None,
    )
    # Created here, not in the lifespan, so /metrics and /healthz answer while loading.
    metrics = Metrics()
    manager = ModelManager(settings, metrics, loader=_load_engine)
    manager.on_start.append(lambda served, _saved: shadow.attach(app, served))
    manager.on_start.append(lambda served, saved: autotune.tuner(app).register(served, saved))
    manager.on_follow.append(lambda served, saved: autotune.tuner(app).follow(served, saved))
    app.state.service = AppState(settings=settings, metrics=metrics, models=manager)
    app.state.link_socket = link_socket
    install_error_handlers(app, metrics)
    app.include_router(health.router)
    app.include_router(classify.router)
    app.include_router(v2.router)
    app.include_router(admin.router)
    app.include_router(console.router)
    docs.install(app)
    app.include_router(autotune.router)
    app.add_middleware(
        LimitsMiddleware, settings=settings, metrics=metrics, measure=link_socket is None
    )
    return app


def _load_engine(path: Path, device: torch.device, settings: Settings) -> Engine:
    # load_engine looked up here, at call time: the seam tests wrap to hold loading.
    return load_engine(path, device, settings)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    manager = app_state(app).models
    paths = await manager.start()  # raises on an empty repository: start-up fails clearly
    loader = asyncio.create_task(manager.load_all(paths), name="load-models")
    poller = asyncio.create_task(manager.poll_state(), name="poll-state")
    tuning = autotune.running(app)
    await tuning.__aenter__()
    link = None
    if app.state.link_socket is not None:
        link = LinkServer(app_state(app), app.state.link_socket)
        await link.start()
    try:
        yield
    finally:
        # Uvicorn has already finished every accepted request when this runs (SIGTERM:
        # stop accepting, drain connections, then lifespan shutdown); the batchers
        # still finish anything queued before they stop.
        manager.ready = False
        for task in (loader, poller):
            task.cancel()
        for task in (loader, poller):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await tuning.__aexit__(None, None, None)
        if link is not None:
            await link.stop()  # the front ends have stopped: only late answers remain
        await manager.stop()
        await asyncio.to_thread(shadow.stop_all, app)
        logger.info("stopped")


class LimitsMiddleware:
    """Request limits that must act before the body is read, and request metrics.

    * A body larger than ``max_body_bytes`` is refused with 413: at once when
      ``Content-Length`` says so, otherwise as soon as the streamed bytes pass the limit.
    * At most ``max_concurrent_requests`` image requests are in progress; beyond that
      503 + ``Retry-After`` at once, so memory stays bounded however many clients come.
    * ``branchy_requests_total`` and ``branchy_request_duration_seconds`` for the
      classify and v2 infer endpoints (unless ``measure`` is off: behind HTTP front
      ends, which measure the requests themselves).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: Settings,
        metrics: RequestMetrics,
        measure: bool = True,
    ) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.measure = measure
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.metrics
        endpoint, model = self._endpoint(scope["path"])
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if endpoint is not None and self.measure:
                    metrics.observe_request(model, endpoint, time.perf_counter() - start)
            await send(message)

        declared = _content_length(scope)
        limit = self.settings.max_body_bytes
        v2_shape = is_v2_path(scope["path"])
        if declared is not None and declared > limit:
            metrics.reject(model, "too_large")
            # Read (and drop) what the client is still sending before answering: closing
            # a connection with unread data makes the kernel reset it, and the client
            # would see a transport error instead of the 413. Not when the client waits
            # for "100 Continue" (reading would ask it to send), nor for a body so large
            # that it would be cut off anyway.
            if not _expects_continue(scope) and declared <= 2 * limit:
                await _drain(receive, max_bytes=2 * limit, max_s=_DRAIN_S)
            await _send_error(
                send_wrapper,
                413,
                "payload_too_large",
                f"request body of {declared} bytes exceeds the limit of {limit}",
                v2=v2_shape,
            )
            self._count(metrics, endpoint, model, status[0])
            return
        if endpoint is not None and self.inflight >= self.settings.max_concurrent_requests:
            metrics.reject(model, "queue_full")
            await _send_error(
                send_wrapper,
                503,
                "queue_full",
                "too many requests in progress; retry later",
                headers=[(b"retry-after", b"1")],
                v2=v2_shape,
            )
            self._count(metrics, endpoint, model, status[0])
            return

        received = 0
        body_done = False
        timeout = self.settings.request_timeout_s
        body_deadline = time.monotonic() + timeout

        async def receive_limited() -> Message:
            # The body must arrive within the request timeout: a client that stalls
            # mid-upload (slowloris) would otherwise hold its in-flight slot forever.
            nonlocal received, body_done
            if body_done:
                return await receive()
            remaining = body_deadline - time.monotonic()
            try:
                # asyncio.timeout, not wait_for: no task per body chunk on the hot path
                async with asyncio.timeout(max(remaining, 1e-3)):
                    message = await receive()
            except TimeoutError:
                raise StarletteHTTPException(
                    408,
                    f"the request body did not arrive within the request timeout of {timeout} s",
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if message.get("more_body", False):
                        body_done = True  # drained here: later reads see the end
                        await _drain(receive, max_bytes=limit, max_s=_DRAIN_S)
                    # An HTTPException (413), not a domain error: FastAPI passes those
                    # through its body parsing unchanged, so JSON routes answer 413 too.
                    raise StarletteHTTPException(
                        413, f"request body exceeds the limit of {limit} bytes"
                    )
            return message

        if endpoint is not None:
            self.inflight += 1
        try:
            await self.app(scope, receive_limited, send_wrapper)
        finally:
            if endpoint is not None:
                self.inflight -= 1
            self._count(metrics, endpoint, model, status[0])

    def _endpoint(self, path: str) -> tuple[str | None, str]:
        for pattern, endpoint in _MEASURED:
            m = pattern.match(path)
            if m:
                return endpoint, self.metrics.model_label(m.group(1))
        return None, UNKNOWN_MODEL

    def _count(
        self, metrics: RequestMetrics, endpoint: str | None, model: str, status: int
    ) -> None:
        if endpoint is not None and self.measure:
            metrics.count_request(model, endpoint, status)


# How long an over-limit body is read and dropped before the 413 (see ``_drain``).
_DRAIN_S = 2.0


async def _drain(receive: Receive, *, max_bytes: int, max_s: float) -> None:
    """Read and discard the rest of a request body: at most ``max_bytes``, for at most
    ``max_s`` seconds (a client sending more, or slower, is then cut off)."""
    deadline = time.monotonic() + max_s
    seen = 0
    while seen <= max_bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), timeout=remaining)
        except TimeoutError:
            return
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _expects_continue(scope: Scope) -> bool:
    return any(
        key == b"expect" and value.lower() == b"100-continue" for key, value in scope["headers"]
    )


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_error(
    send: Send,
    status: int,
    code: str,
    message: str,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    v2: bool = False,
) -> None:
    body = json.dumps(error_body(status, code, message, v2=v2)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
