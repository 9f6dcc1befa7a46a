"""The errors a client call can raise; every one is a :class:`BranchyError`.

Server answers that are errors become a :class:`ServerError` subclass chosen by HTTP
status, carrying the server's machine-readable ``code``, its ``message`` and, on 5xx
answers, the ``error_id`` the server also logged.
"""

from __future__ import annotations


class BranchyError(Exception):
    """Base class of every error this package raises. ``str(err)`` is one clear line."""


class ConnectionFailed(BranchyError):
    """The server could not be reached (nothing listening, DNS, network)."""


class RequestTimeout(BranchyError):
    """No answer within the client's timeout."""


class ImageReadError(BranchyError):
    """A local image file could not be read; ``path`` names it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ProtocolError(BranchyError):
    """The server answered something this client does not understand."""


class ServerError(BranchyError):
    """An error answer from the server.

    Attributes:
        status: HTTP status code.
        code: the server's error code (``queue_full``, ``model_not_found``, ...).
        message: the server's explanation.
        error_id: the id of a 5xx answer, also in the server's log.
        retry_after: seconds from ``Retry-After``, when the server sent one.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        error_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        text = f"{message} (HTTP {status} {code}"
        text += f", error id {error_id})" if error_id else ")"
        super().__init__(text)
        self.status = status
        self.code = code
        self.message = message
        self.error_id = error_id
        self.retry_after = retry_after


class BadRequest(ServerError):
    """400: a malformed request or an image the server cannot decode."""


class Unauthorized(ServerError):
    """401: the admin token is missing or wrong."""


class AdminDisabled(ServerError):
    """403: the server has no admin token, so its admin routes are off."""


class NotFound(ServerError):
    """404: no such model (or route)."""


class Conflict(ServerError):
    """409: the request conflicts with the model's state (e.g. no calibration data)."""


class PayloadTooLarge(ServerError):
    """413: body, image count or pixel count over the server's limits."""


class UnsupportedMediaType(ServerError):
    """415: the body is neither multipart/form-data nor an image."""


class InvalidRequest(ServerError):
    """422: invalid parameters (thresholds, top_k, ...)."""


class Overloaded(ServerError):
    """503: queue full or not ready, still so after the client's retries."""


class DeadlineExceeded(ServerError):
    """504 (or 408): the server's deadline passed before the request was answered."""


class InternalServerError(ServerError):
    """500: the server failed; ``error_id`` finds the log line."""


_BY_STATUS: dict[int, type[ServerError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: AdminDisabled,
    404: NotFound,
    408: DeadlineExceeded,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: InvalidRequest,
    429: Overloaded,
    500: InternalServerError,
    503: Overloaded,
    504: DeadlineExceeded,
}


def error_class(status: int) -> type[ServerError]:
    """The :class:`ServerError` subclass for an HTTP status (``ServerError`` if none)."""
    return _BY_STATUS.get(status, ServerError)
