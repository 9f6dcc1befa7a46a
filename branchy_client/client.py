"""``Client`` (blocking) and ``AsyncClient`` (asyncio) for a branchy-serve server.

Both have the same methods and behaviour; the request building, retry policy and error
mapping are shared, only the transport differs. Answers 503 (queue full, not ready) and
429 are retried up to ``retries`` times, each after the server's ``Retry-After`` (capped
by ``max_retry_wait``; exponential back-off from 0.25 s when the header is missing).
Everything else that is not a success raises a :class:`~branchy_client.errors.ServerError`
subclass at once; an unreachable server raises
:class:`~branchy_client.errors.ConnectionFailed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx

from branchy_client.errors import (
    BranchyError,
    ConnectionFailed,
    ImageReadError,
    ProtocolError,
    RequestTimeout,
    ServerError,
    error_class,
)
from branchy_client.results import (
    Classification,
    ModelInfo,
    ModelSummary,
    ThresholdState,
    parse_classification,
    parse_model,
    parse_models,
    parse_threshold_state,
)

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "BRANCHY_URL"
TOKEN_ENV = "BRANCHY_ADMIN_TOKEN"

#: An image to classify: a file path, encoded bytes, or ``(filename, bytes)``.
ImageInput = str | os.PathLike[str] | bytes | tuple[str | None, bytes]

_RETRIED = (429, 503)


class AdminTokenMissing(BranchyError):
    """An admin call without an admin token; nothing was sent."""


def read_image(image: ImageInput) -> tuple[str | None, bytes]:
    """``(filename, encoded bytes)`` of an image input; paths are read from disk.

    Raises:
        ImageReadError: the file is missing, unreadable, a folder, or empty.
    """
    if isinstance(image, bytes):
        return None, image
    if isinstance(image, tuple):
        name, data = image
        return name, bytes(data)
    path = Path(image)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(str(path), "no such file") from None
    except IsADirectoryError:
        raise ImageReadError(str(path), "is a folder, not an image file") from None
    except PermissionError:
        raise ImageReadError(str(path), "permission denied") from None
    except OSError as exc:
        raise ImageReadError(str(path), exc.strerror or str(exc)) from None
    if not data:
        raise ImageReadError(str(path), "empty file")
    return path.name, data


def format_thresholds(thresholds: Sequence[float]) -> str:
    """Thresholds as the ``thresholds`` query parameter wants them (``inf`` allowed)."""
    return ",".join("inf" if math.isinf(t) and t > 0 else repr(float(t)) for t in thresholds)


@dataclass
class _Call:
    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    json: Any = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    admin: bool = False


@dataclass
class _Attempt:
    """One try of a call: the driver waits ``wait`` seconds, sends ``request`` and puts
    the answer in ``response``; :meth:`_Base._attempts` decides whether another follows."""

    request: dict[str, Any]
    number: int = 0
    wait: float = 0.0
    response: httpx.Response | None = None


def _error_from(response: httpx.Response) -> ServerError:
    status = response.status_code
    code, message, error_id = f"http_{status}", "", None
    try:
        body = response.json()
        err = body["error"]
        code = str(err.get("code") or code)
        message = str(err.get("message") or "")
        error_id = err.get("id")
    except (ValueError, KeyError, TypeError, AttributeError):
        message = response.text.strip()[:200]
    return error_class(status)(
        status,
        code,
        message or response.reason_phrase or "error",
        error_id=error_id,
        retry_after=_retry_after(response),
    )


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: rare for this server; fall back to back-off
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class _Base:
    """Settings and the transport-independent half of both clients."""

    def __init__(
        self,
        url: str | None = None,
        *,
        admin_token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        max_retry_wait: float = 30.0,
    ) -> None:
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        if "://" not in self.url:
            self.url = "http://" + self.url
        self.admin_token = admin_token
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.max_retry_wait = max_retry_wait

    # -------------------------------------------------------------- requests

    def _classify_call(
        self,
        model: str,
        images: Sequence[tuple[str | None, bytes]],
        thresholds: Sequence[float] | None,
        top_k: int | None,
    ) -> _Call:
        if not images:
            raise ValueError("classify needs at least one image")
        params = {}
        if thresholds is not None:
            params["thresholds"] = format_thresholds(thresholds)
        if top_k is not None:
            params["top_k"] = str(int(top_k))
        files = [
            ("images", (name or f"image-{i}", data, "application/octet-stream"))
            for i, (name, data) in enumerate(images)
        ]
        return _Call("POST", f"/v1/models/{quote(model, safe='')}/classify", params, files=files)

    @staticmethod
    def _models_call() -> _Call:
        return _Call("GET", "/v1/models")

    @staticmethod
    def _model_call(name: str) -> _Call:
        return _Call("GET", f"/v1/models/{quote(name, safe='')}")

    @staticmethod
    def _get_thresholds_call(model: str) -> _Call:
        return _Call("GET", f"/admin/models/{quote(model, safe='')}/thresholds", admin=True)

    def _set_thresholds_call(
        self,
        model: str,
        thresholds: Sequence[float] | None,
        tolerance: float | None,
        target: float | None,
    ) -> _Call:
        return _Call(
            "PUT",
            f"/admin/models/{quote(model, safe='')}/thresholds",
            json=self._thresholds_body(thresholds, tolerance, target),
            admin=True,
        )

    @staticmethod
    def _thresholds_body(
        thresholds: Sequence[float] | None, tolerance: float | None, target: float | None
    ) -> dict[str, Any]:
        given = {
            k: v
            for k, v in (("thresholds", thresholds), ("tolerance", tolerance), ("target", target))
            if v is not None
        }
        if len(given) != 1:
            raise ValueError("give exactly one of thresholds, tolerance, target")
        if thresholds is not None:
            given["thresholds"] = [float(t) for t in thresholds]
        return given

    def _headers(self, call: _Call) -> dict[str, str]:
        if not call.admin:
            return {}
        if not self.admin_token:
            raise AdminTokenMissing(
                f"this is an admin call and needs the server's admin token "
                f"(set {TOKEN_ENV} or pass admin_token=)"
            )
        return {"Authorization": f"Bearer {self.admin_token}"}

    def _attempts(self, call: _Call) -> Iterator[_Attempt]:
        """The tries of ``call`` (the retry policy of the module docstring, without I/O):
        each is yielded for the driver to send; after it, another follows only when the
        answer is retried."""
        headers = self._headers(call)
        request = {
            "method": call.method,
            "url": call.path,
            "params": call.params or None,
            "json": call.json,
            "files": call.files,
            "headers": headers,
        }
        attempt = _Attempt(request)
        while True:
            yield attempt
            assert attempt.response is not None, "the driver sends every attempt"
            wait = self._delay(attempt.response, attempt.number)
            if wait is None:
                return
            attempt = _Attempt(request, number=attempt.number + 1, wait=wait)

    @contextlib.contextmanager
    def _transport_errors(self) -> Iterator[None]:
        """httpx's transport failures as this package's errors."""
        try:
            yield
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None

    @staticmethod
    def _answer(attempt: _Attempt) -> tuple[httpx.Response, int]:
        """The last attempt's answer and how many retries came before it."""
        assert attempt.response is not None
        return attempt.response, attempt.number

    def _classification(self, answer: tuple[httpx.Response, int], start: float) -> Classification:
        response, retries = answer
        body = self._json(response)
        ms = (time.perf_counter() - start) * 1e3
        return parse_classification(body, round_trip_ms=ms, retries=retries)

    def _delay(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying ``response``, or ``None``: do not retry."""
        if response.status_code not in _RETRIED or attempt >= self.retries:
            return None
        wait = _retry_after(response)
        if wait is None:
            wait = 0.25 * 2**attempt
        return min(wait, self.max_retry_wait)

    def _transport_error(self, exc: httpx.HTTPError) -> BranchyError:
        if isinstance(exc, httpx.TimeoutException):
            return RequestTimeout(f"no answer from {self.url} within {self.timeout:g} s")
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, httpx.ConnectError):
            if "refused" in reason.lower():
                reason = "connection refused: is the server running?"
            return ConnectionFailed(f"cannot reach the server at {self.url} ({reason})")
        return ConnectionFailed(f"request to {self.url} failed ({reason})")

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise _error_from(response)
        try:
            return response.json()
        except ValueError:
            raise ProtocolError(
                f"the server answered HTTP {response.status_code} with a body that is not JSON"
            ) from None


class Client(_Base):
    """A blocking client.

    Args:
        url: the server (default ``$BRANCHY_URL`` or ``http://127.0.0.1:8000``).
        admin_token: bearer token of the admin routes (thresholds).
        timeout: seconds for each attempt of a request.
        retries: how often a 503/429 answer is retried.
        max_retry_wait: longest wait between attempts, whatever ``Retry-After`` says.
        transport: an ``httpx`` transport (e.g. ``httpx.WSGITransport``) instead of TCP.

    Use it as a context manager, or call :meth:`close`::

        with Client("http://127.0.0.1:8000") as client:
            answer = client.classify("b-alexnet", ["cat.jpg", "ship.png"], top_k=3)
            for p in answer.predictions:
                print(p.filename, p.class_name, p.confidence, p.exit_index, p.entropy)
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        admin_token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        max_retry_wait: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(
            url,
            admin_token=admin_token,
            timeout=timeout,
            retries=retries,
            max_retry_wait=max_retry_wait,
        )
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _send(self, call: _Call) -> tuple[httpx.Response, int]:
        for attempt in self._attempts(call):
            if attempt.wait:
                time.sleep(attempt.wait)
            with self._transport_errors():
                attempt.response = self._http.request(**attempt.request)
        return self._answer(attempt)

    def _get_json(self, call: _Call) -> Any:
        return self._json(self._send(call)[0])

    def ready(self) -> bool:
        """Whether the server answers ``/readyz`` with 200 (models loaded and warm)."""
        with self._transport_errors():
            return self._http.get("/readyz").status_code == 200

    def models(self) -> list[ModelSummary]:
        """The models the server serves."""
        return parse_models(self._get_json(self._models_call()))

    def model(self, name: str) -> ModelInfo:
        """One model's exits, thresholds (and their source), classes and input."""
        return parse_model(self._get_json(self._model_call(name)))

    def classify(
        self,
        model: str,
        images: Sequence[ImageInput],
        *,
        thresholds: Sequence[float] | None = None,
        top_k: int | None = None,
    ) -> Classification:
        """Classify images in one request.

        Args:
            model: the model's name.
            images: paths, bytes or ``(filename, bytes)`` pairs; at most the server's
                per-request limit (64 by default).
            thresholds: this request's thresholds, one per early exit (``math.inf``:
                everyone leaves there; 0: nobody).
            top_k: also return the k most probable classes of each image.

        Raises:
            ImageReadError: a path could not be read (nothing was sent).
            ServerError: the server refused the request (e.g. ``BadRequest`` for an
                image it cannot decode, ``NotFound`` for an unknown model).
        """
        call = self._classify_call(model, [read_image(i) for i in images], thresholds, top_k)
        start = time.perf_counter()
        return self._classification(self._send(call), start)

    def get_thresholds(self, model: str) -> ThresholdState:
        """The thresholds in force and what they do on the calibration data (admin)."""
        return parse_threshold_state(self._get_json(self._get_thresholds_call(model)))

    def set_thresholds(
        self,
        model: str,
        thresholds: Sequence[float] | None = None,
        *,
        tolerance: float | None = None,
        target: float | None = None,
    ) -> ThresholdState:
        """Set thresholds explicitly, or let the server choose them for an accuracy
        ``tolerance`` (fraction below the final exit) or ``target`` (admin)."""
        call = self._set_thresholds_call(model, thresholds, tolerance, target)
        return parse_threshold_state(self._get_json(call))


class AsyncClient(_Base):
    """The asyncio twin of :class:`Client`: the same arguments and methods, awaited.

    ::

        async with AsyncClient("http://127.0.0.1:8000") as client:
            answers = await asyncio.gather(
                *(client.classify("b-lenet", [path]) for path in paths)
            )
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        admin_token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        max_retry_wait: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 100,
    ) -> None:
        super().__init__(
            url,
            admin_token=admin_token,
            timeout=timeout,
            retries=retries,
            max_retry_wait=max_retry_wait,
        )
        limits = httpx.Limits(max_connections=max_connections)
        self._http = httpx.AsyncClient(
            base_url=self.url, timeout=timeout, transport=transport, limits=limits
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def _send(self, call: _Call) -> tuple[httpx.Response, int]:
        for attempt in self._attempts(call):
            if attempt.wait:
                await asyncio.sleep(attempt.wait)
            with self._transport_errors():
                attempt.response = await self._http.request(**attempt.request)
        return self._answer(attempt)

    async def _get_json(self, call: _Call) -> Any:
        return self._json((await self._send(call))[0])

    async def ready(self) -> bool:
        """Whether the server answers ``/readyz`` with 200."""
        with self._transport_errors():
            return (await self._http.get("/readyz")).status_code == 200

    async def models(self) -> list[ModelSummary]:
        """The models the server serves."""
        return parse_models(await self._get_json(self._models_call()))

    async def model(self, name: str) -> ModelInfo:
        """One model's exits, thresholds (and their source), classes and input."""
        return parse_model(await self._get_json(self._model_call(name)))

    async def classify(
        self,
        model: str,
        images: Sequence[ImageInput],
        *,
        thresholds: Sequence[float] | None = None,
        top_k: int | None = None,
    ) -> Classification:
        """Classify images in one request; see :meth:`Client.classify`."""
        read = await asyncio.to_thread(lambda: [read_image(i) for i in images])
        call = self._classify_call(model, read, thresholds, top_k)
        start = time.perf_counter()
        return self._classification(await self._send(call), start)

    async def get_thresholds(self, model: str) -> ThresholdState:
        """The thresholds in force (admin)."""
        return parse_threshold_state(await self._get_json(self._get_thresholds_call(model)))

    async def set_thresholds(
        self,
        model: str,
        thresholds: Sequence[float] | None = None,
        *,
        tolerance: float | None = None,
        target: float | None = None,
    ) -> ThresholdState:
        """Set thresholds, or have them chosen for a tolerance/target (admin)."""
        call = self._set_thresholds_call(model, thresholds, tolerance, target)
        return parse_threshold_state(await self._get_json(call))
