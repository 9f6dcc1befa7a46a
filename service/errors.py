"""Domain errors and the one JSON error shape every error response has.

Body: ``{"error": {"status": 503, "code": "queue_full", "message": "...", "id": "..."}}``;
``id`` is present on 5xx answers and is logged with the failure, so an operator can find
the log line a client reports.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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
}


class ServiceError(Exception):
    """An error with an HTTP status and a stable machine-readable code."""

    status = 500
    code = "internal"

    def __init__(
        self, message: str, *, headers: dict[str, str] | None = None, error_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.error_id = error_id


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class BadImage(ServiceError):
    status, code = 400, "bad_image"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class AdminDisabled(ServiceError):
    status, code = 403, "admin_disabled"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class ModelNotFound(ServiceError):
    status, code = 404, "model_not_found"


class Conflict(ServiceError):
    """The request is well formed but the model's state does not allow it."""

    status, code = 409, "conflict"


class ReloadFailed(Conflict):
    code = "reload_failed"


class NoCalibration(Conflict):
    code = "no_calibration"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class TooManyImages(ServiceError):
    status, code = 413, "too_many_images"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class ValidationFailed(ServiceError):
    status, code = 422, "validation_error"


class QueueFull(ServiceError):
    status, code = 503, "queue_full"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class NotReady(ServiceError):
    status, code = 503, "not_ready"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class ModelChanged(NotReady):
    """A reload changed the model's input shape or exits between decoding and queueing."""

    code = "model_changed"


class ShuttingDown(NotReady):
    """The server stopped accepting work (SIGTERM); the client should retry elsewhere."""

    code = "shutting_down"


class DeadlineExceeded(ServiceError):
    status, code = 504, "deadline_exceeded"


class InternalError(ServiceError):
    status, code = 500, "internal"


def new_error_id() -> str:
    return uuid.uuid4().hex[:16]


def error_body(
    status: int, code: str, message: str, error_id: str | None = None, **extra: Any
) -> dict[str, Any]:
    """The error shape shared by every route, middleware and handler."""
    error: dict[str, Any] = {"status": status, "code": code, "message": message}
    if status >= 500:
        error["id"] = error_id or new_error_id()
    error.update(extra)
    return {"error": error}


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    error_id: str | None = None,
    **extra: Any,
) -> JSONResponse:
    return JSONResponse(
        error_body(status, code, message, error_id, **extra), status_code=status, headers=headers
    )


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


def install_error_handlers(app: FastAPI) -> None:
    """Route every error, ours and the framework's, to the one JSON shape."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        error_id = exc.error_id
        if exc.status >= 500:
            error_id = error_id or new_error_id()
            # 500s are failures to investigate; 503/504 are load shedding, expected in
            # bursts, so they are logged quietly (still with the id the client sees).
            level = logging.ERROR if exc.status == 500 else logging.INFO
            if exc.code == "not_ready":
                level = logging.DEBUG
            logger.log(
                level,
                "%s %s -> %d %s [id %s]: %s",
                request.method,
                request.url.path,
                exc.status,
                exc.code,
                error_id,
                exc.message,
            )
        _count_rejection(request, exc.code)
        return error_response(
            exc.status, exc.code, exc.message, headers=exc.headers, error_id=error_id
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
        return error_response(exc.status_code, code, message, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        summary = "; ".join(f"{'.'.join(d['loc'])}: {d['msg']}" for d in details[:5])
        _count_rejection(request, "validation_error")
        return error_response(
            422, "validation_error", f"invalid request: {summary}", details=details
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        error_id = new_error_id()
        logger.exception(
            "unhandled error in %s %s [id %s]", request.method, request.url.path, error_id
        )
        return error_response(500, "internal", "internal server error", error_id=error_id)


def _count_rejection(request: Request, code: str) -> None:
    reason = REJECT_REASONS.get(code)
    metrics = getattr(request.app.state, "metrics", None)
    if reason is None or metrics is None:
        return
    name = request.path_params.get("name") if request.path_params else None
    metrics.reject(metrics.model_label(request.app, name), reason)
