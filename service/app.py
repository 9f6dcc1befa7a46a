"""The FastAPI application: ``create_app(settings)``, its lifespan and middleware."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__, autotune, shadow
from service.batcher import Batcher
from service.errors import error_body, install_error_handlers
from service.metrics import UNKNOWN_MODEL, Metrics
from service.repository import ServedModel, discover, load_engine, resolve_device
from service.routes import admin, classify, health, v2
from service.settings import Settings
from service.state import file_mtime_ns, load_thresholds

logger = logging.getLogger(__name__)

# Endpoints measured by branchy_requests_total / branchy_request_duration_seconds.
_MEASURED = (
    (re.compile(r"^/v1/models/([^/]+)/classify$"), "classify"),
    (re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/infer$"), "v2_infer"),
)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the application. Nothing heavy happens here: models load in the lifespan.

    Args:
        settings: server settings (default: read from the environment).
    """
    settings = settings or Settings()
    app = FastAPI(
        title="branchy-serve",
        version=__version__,
        summary="Early-exit (BranchyNet) image classification with dynamic batching.",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    # Created here, not in the lifespan, so /metrics and /healthz answer while loading.
    app.state.metrics = Metrics()
    app.state.models = {}
    app.state.expected_models = set()
    app.state.ready = False
    app.state.admin_locks = {}
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(classify.router)
    app.include_router(v2.router)
    app.include_router(admin.router)
    app.include_router(autotune.router)
    app.add_middleware(LimitsMiddleware, settings=settings, app_ref=app)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    paths = discover(settings)  # raises on an empty repository: start-up fails clearly
    device = resolve_device(settings.device)
    app.state.device = device
    app.state.expected_models = set(paths)
    app.state.admin_locks = {name: asyncio.Lock() for name in paths}
    logger.info(
        "serving %d model(s) from %s on %s: %s",
        len(paths),
        settings.model_repository,
        device,
        ", ".join(paths),
    )
    loader = asyncio.create_task(_load_all(app, paths, device), name="load-models")
    poller = asyncio.create_task(_poll_state(app), name="poll-state")
    tuning = autotune.running(app)
    await tuning.__aenter__()
    try:
        yield
    finally:
        # Uvicorn has already finished every accepted request when this runs (SIGTERM:
        # stop accepting, drain connections, then lifespan shutdown); the batchers
        # still finish anything queued before they stop.
        app.state.ready = False
        for task in (loader, poller):
            task.cancel()
        for task in (loader, poller):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await tuning.__aexit__(None, None, None)
        served: dict[str, ServedModel] = app.state.models
        for model in served.values():
            if model.batcher is not None:
                await model.batcher.stop()
        await asyncio.to_thread(shadow.stop_all, app)
        logger.info("stopped")


async def _load_all(app: FastAPI, paths: dict[str, Any], device: Any) -> None:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    failed = []
    for name, path in paths.items():
        try:
            engine = await asyncio.to_thread(load_engine, path, device, settings)
        except Exception as exc:  # one bad checkpoint must not stop the others
            logger.error("cannot load model %r from %s (not served): %s", name, path, exc)
            failed.append(name)
            continue
        thresholds = tuple(engine.checkpoint.thresholds)
        source = "checkpoint"
        saved = await asyncio.to_thread(load_thresholds, settings.state_dir, name, engine.num_exits)
        if saved is not None:
            thresholds, source = saved.thresholds, saved.source or "state"
            logger.info(
                "model %r: thresholds %s restored from the state folder", name, list(thresholds)
            )
        served = ServedModel(name, path, engine, thresholds, source=source)
        served.state_mtime_ns = saved.mtime_ns if saved else None
        served.batcher = Batcher(
            name,
            served,
            metrics,
            max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_batch_delay_s,
            max_queue=settings.max_queue,
        )
        served.batcher.start()
        shadow.attach(app, served)
        autotune.tuner(app).register(served, saved)
        ckpt = engine.checkpoint
        metrics.init_model(name, engine.num_exits)
        metrics.set_thresholds(name, thresholds)
        metrics.set_model_info(
            name, device=str(device), architecture=ckpt.model.name, exits=engine.num_exits
        )
        app.state.models[name] = served
    app.state.expected_models = set(app.state.models)
    if app.state.models:
        app.state.ready = True
        logger.info("ready: %s", ", ".join(app.state.models))
    else:
        logger.error("no model could be loaded (%s); the server stays not ready", failed)


async def _poll_state(app: FastAPI) -> None:
    """Pick up threshold files written by another replica sharing the state folder."""
    settings: Settings = app.state.settings
    if settings.state_poll_s <= 0:
        return
    while True:
        await asyncio.sleep(settings.state_poll_s)
        for name, served in list(app.state.models.items()):
            try:
                await reread_state(app, served)
            except Exception:  # keep polling whatever one file does
                logger.exception("polling the threshold state of %r failed", name)


async def reread_state(app: FastAPI, served: ServedModel) -> bool:
    """Apply a model's state file if it changed since last seen; True when applied."""
    settings: Settings = app.state.settings
    mtime = await asyncio.to_thread(file_mtime_ns, settings.state_dir, served.name)
    if mtime is None or mtime == served.state_mtime_ns:
        return False
    async with app.state.admin_locks[served.name]:
        saved = await asyncio.to_thread(
            load_thresholds, settings.state_dir, served.name, served.num_exits
        )
        served.state_mtime_ns = mtime  # a damaged file is reported once, not every poll
        if saved is not None:
            autotune.tuner(app).follow(served, saved)
        if saved is None or saved.thresholds == served.thresholds:
            return False
        old = served.thresholds
        served.set_thresholds(saved.thresholds, source=saved.source or "state")
        app.state.metrics.set_thresholds(served.name, saved.thresholds)
        logger.info(
            "model %r: thresholds %s -> %s (changed in the state folder)",
            served.name,
            list(old),
            list(saved.thresholds),
        )
        return True


class LimitsMiddleware:
    """Request limits that must act before the body is read, and request metrics.

    * A body larger than ``max_body_bytes`` is refused with 413: at once when
      ``Content-Length`` says so, otherwise as soon as the streamed bytes pass the limit.
    * At most ``max_concurrent_requests`` image requests are in progress; beyond that
      503 + ``Retry-After`` at once, so memory stays bounded however many clients come.
    * ``branchy_requests_total`` and ``branchy_request_duration_seconds`` for the
      classify and v2 infer endpoints.
    """

    def __init__(self, app: ASGIApp, *, settings: Settings, app_ref: FastAPI) -> None:
        self.app = app
        self.settings = settings
        self.app_ref = app_ref
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics: Metrics = self.app_ref.state.metrics
        endpoint, model = self._endpoint(scope["path"])
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if endpoint is not None:
                    metrics.request_duration.labels(model, endpoint).observe(
                        time.perf_counter() - start
                    )
            await send(message)

        declared = _content_length(scope)
        limit = self.settings.max_body_bytes
        if declared is not None and declared > limit:
            metrics.reject(model, "too_large")
            await _send_error(
                send_wrapper,
                413,
                "payload_too_large",
                f"request body of {declared} bytes exceeds the limit of {limit}",
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
                message = await asyncio.wait_for(receive(), timeout=max(remaining, 1e-3))
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
                return endpoint, Metrics.model_label(self.app_ref, m.group(1))
        return None, UNKNOWN_MODEL

    @staticmethod
    def _count(metrics: Metrics, endpoint: str | None, model: str, status: int) -> None:
        if endpoint is not None:
            metrics.requests.labels(model, endpoint, str(status)).inc()


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
) -> None:
    body = json.dumps(error_body(status, code, message)).encode()
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
