"""Domain errors and the JSON error shapes every error response has.

Body: ``{"error": {"status": 503, "code": "queue_full", "message": "...", "id": "..."}}``;
``id`` is present on 5xx answers and is logged with the failure, so an operator can find
the log line a client reports.

Under ``/v2`` the body follows the Open Inference Protocol instead, whose clients (the
official ``tritonclient`` among them) read ``error`` as a string:
``{"error": "...", "code": "queue_full", "status": 503, "id": "..."}``.

A client that goes away before its request is read (a cut-off or malformed body, a
disconnect mid-upload) is not a server error: it is answered (to nobody) and counted with
status 499, the de-facto code for "client closed request", and logged without a traceback.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

if TYPE_CHECKING:
    from service.metrics import Metrics, RequestMetrics

logger = logging.getLogger(__name__)

# Rejection reasons of ``branchy_rejected_total`` by error code.
REJECT_REASONS = {
    "bad_request": "bad_input",
    "bad_image": "bad_input",
    "unsupported_media_type": "bad_input",
    "validation_error": "bad_input",
    "payload_too_large": "too_large",
    "too_many_images": "too_large",
    "unauthorized": "unauthorized",
    "queue_full": "queue_full",
    "deadline_exceeded": "deadline_exceeded",
    "request_timeout": "deadline_exceeded",
    "shutting_down": "shutting_down",
    "non_finite_output": "bad_input",
    "client_disconnect": "client_disconnect",
}

# Status of a request whose client went away before it was answered (nginx's 499).
CLIENT_CLOSED_REQUEST = 499


class ServiceError(Exception):
    """An error with an HTTP status and a stable machine-readable code.

    A subclass names both in its class line, ``class QueueFull(ServiceError,
    status=503, code="queue_full")`` (either may be inherited), and the headers every
    answer of its kind carries in ``headers``.
    """

    status = 500
    code = "internal"
    headers_always: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, *, status: int | None = None, code: str | None = None) -> None:
        super().__init_subclass__()
        cls.status = status if status is not None else cls.status
        cls.code = code if code is not None else cls.code

    def __init__(
        self, message: str, *, headers: dict[str, str] | None = None, error_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = {**self.headers_always, **(headers or {})}
        self.error_id = error_id


# 4xx: the client can fix the request.
class BadRequest(ServiceError, status=400, code="bad_request"): ...


class BadImage(ServiceError, status=400, code="bad_image"): ...


class NonFiniteOutput(BadRequest, code="non_finite_output"):
    """The network's output for an input is not finite (NaN/inf logits): the input's
    values are too large for float32 arithmetic. A 4xx: JSON cannot carry the answer."""


class Unauthorized(ServiceError, status=401, code="unauthorized"):
    headers_always: ClassVar[dict[str, str]] = {"WWW-Authenticate": "Bearer"}


class AdminDisabled(ServiceError, status=403, code="admin_disabled"): ...


class NotFound(ServiceError, status=404, code="not_found"): ...


class ModelNotFound(ServiceError, status=404, code="model_not_found"): ...


class Conflict(ServiceError, status=409, code="conflict"):
    """The request is well formed but the model's state does not allow it."""


class ReloadFailed(Conflict, code="reload_failed"): ...


class NoCalibration(Conflict, code="no_calibration"): ...


class PayloadTooLarge(ServiceError, status=413, code="payload_too_large"): ...


class TooManyImages(ServiceError, status=413, code="too_many_images"): ...


class UnsupportedMediaType(ServiceError, status=415, code="unsupported_media_type"): ...


class ValidationFailed(ServiceError, status=422, code="validation_error"): ...


# 5xx: the server cannot answer now (503: retry, after Retry-After seconds).
class NotReady(ServiceError, status=503, code="not_ready"):
    headers_always: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class QueueFull(ServiceError, status=503, code="queue_full"):
    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class ModelChanged(NotReady, code="model_changed"):
    """A reload changed the model's input shape or exits between decoding and queueing."""


class ShuttingDown(NotReady, code="shutting_down"):
    """The server stopped accepting work (SIGTERM); the client should retry elsewhere."""


class DeadlineExceeded(ServiceError, status=504, code="deadline_exceeded"): ...


class InternalError(ServiceError, status=500, code="internal"): ...


def new_error_id() -> str:
    return uuid.uuid4().hex[:16]


def is_v2_path(path: str) -> bool:
    """Whether ``path`` is an Open Inference Protocol route (its own error shape)."""
    return path == "/v2" or path.startswith("/v2/")


def error_body(
    status: int,
    code: str,
    message: str,
    error_id: str | None = None,
    *,
    v2: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """The error shape shared by every route, middleware and handler.

    Args:
        status: the HTTP status.
        code: the stable machine-readable code.
        message: the human sentence.
        error_id: the id logged with a 5xx (a new one when not given).
        v2: the Open Inference Protocol shape (``error`` is the message string).
        extra: more fields (e.g. ``details`` of a validation error).
    """
    error: dict[str, Any] = {"status": status, "code": code, "message": message}
    if status >= 500:
        error["id"] = error_id or new_error_id()
    error.update(extra)
    if v2:
        return {"error": message, **{k: v for k, v in error.items() if k != "message"}}
    return {"error": error}


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    error_id: str | None = None,
    v2: bool = False,
    **extra: Any,
) -> JSONResponse:
    return JSONResponse(
        error_body(status, code, message, error_id, v2=v2, **extra),
        status_code=status,
        headers=headers,
    )


def log_service_error(exc: ServiceError, method: str, path: str) -> str | None:
    """Log an error answer as every route does; the id its body carries (5xx only).

    500s are failures to investigate, logged as errors; 503/504 are load shedding,
    expected in bursts, so they are logged quietly (still with the id the client sees).
    """
    if exc.status < 500:
        return exc.error_id
    error_id = exc.error_id or new_error_id()
    level = logging.ERROR if exc.status == 500 else logging.INFO
    if exc.code == "not_ready":
        level = logging.DEBUG
    logger.log(
        level,
        "%s %s -> %d %s [id %s]: %s",
        method,
        path,
        exc.status,
        exc.code,
        error_id,
        exc.message,
    )
    return error_id


def count_rejection(metrics: RequestMetrics, name: str | None, code: str) -> None:
    """Count an error answer of model ``name`` in ``branchy_rejected_total`` (codes
    that are no rejection, such as ``not_found``, are not counted)."""
    reason = REJECT_REASONS.get(code)
    if reason is not None:
        metrics.reject(metrics.model_label(name), reason)


# Statuses Starlette and FastAPI raise themselves (routing, body parsing) -> our codes.
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    503: "not_ready",
}


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Route every error, ours and the framework's, to the one JSON shape, counting
    rejections in ``metrics``."""

    def _count_rejection(request: Request, code: str) -> None:
        name = request.path_params.get("name") if request.path_params else None
        count_rejection(metrics, name, code)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        error_id = log_service_error(exc, request.method, request.url.path)
        _count_rejection(request, exc.code)
        return error_response(
            exc.status,
            exc.code,
            exc.message,
            headers=exc.headers,
            error_id=error_id,
            v2=is_v2_path(request.url.path),
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(
            exc.status_code, "bad_request" if exc.status_code < 500 else "internal"
        )
        message = str(exc.detail) if exc.detail else "error"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        _count_rejection(request, code)
        return error_response(
            exc.status_code, code, message, headers=exc.headers, v2=is_v2_path(request.url.path)
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        summary = "; ".join(f"{'.'.join(d['loc'])}: {d['msg']}" for d in details[:5])
        _count_rejection(request, "validation_error")
        return error_response(
            422,
            "validation_error",
            f"invalid request: {summary}",
            v2=is_v2_path(request.url.path),
            details=details,
        )

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client's fault (it closed the connection, or sent a body the HTTP parser
        # refused, which uvicorn reports as a disconnect): no traceback, not a 5xx.
        logger.info(
            "%s %s: the client went away before its request was read (counted as %d)",
            request.method,
            request.url.path,
            CLIENT_CLOSED_REQUEST,
        )
        _count_rejection(request, "client_disconnect")
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        error_id = new_error_id()
        logger.exception(
            "unhandled error in %s %s [id %s]", request.method, request.url.path, error_id
        )
        return error_response(
            500,
            "internal",
            "internal server error",
            error_id=error_id,
            v2=is_v2_path(request.url.path),
        )
