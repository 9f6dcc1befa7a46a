"""Shared steps of the classify and v2 routes: thresholds from a request, decoding (in a
worker thread, or on the loop for tiny images when configured), and submitting to a
model's batcher with the request's deadline."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image
from torch import Tensor

from models.checkpoint import InputSpec
from models.exits import check_thresholds, encode_thresholds
from service.batcher import Classified
from service.errors import (
    DeadlineExceeded,
    NonFiniteOutput,
    NotReady,
    PayloadTooLarge,
    ValidationFailed,
)
from service.preprocess import load_pixels, open_image, to_checked_array
from service.preprocess import network_inputs as network_inputs  # for the routes
from service.preprocess import pixel_inputs as pixel_inputs  # for the routes
from service.repository import ServedModel
from service.schemas import ClassifyResponse, ExitInfo, ImageResult, Timings, TopK
from service.settings import Settings

# Bounds of a classify request's query: ``top_k`` at most, and the length of its
# ``thresholds`` text (the route's validation; an HTTP front end leaves anything beyond
# them to it).
MAX_TOP_K = 1000
MAX_THRESHOLDS_TEXT = 2000

# Extra time a request waits beyond its deadline for a batch already computing: images
# are dropped before compute once the deadline passes, never in the middle of it.
COMPUTE_GRACE_S = 5.0


def parse_thresholds(
    text: str | None, num_exits: int, settings: Settings
) -> tuple[float, ...] | None:
    """A request's own thresholds from comma-separated text (``inf`` allowed: everyone
    leaves at that exit).

    Raises:
        ValidationFailed: not allowed by the settings, wrong count, not numbers, NaN, < 0.
    """
    if text is None or text.strip() == "":
        return None
    if not settings.allow_request_thresholds:
        raise ValidationFailed("this server does not accept per-request thresholds")
    values = [v.strip() for v in text.split(",")]
    try:
        return check_thresholds(values, num_exits)
    except ValueError as exc:
        raise ValidationFailed(f"invalid thresholds {text[:100]!r}: {exc}") from None


def _open_checked(
    images: Sequence[tuple[str | None, bytes]], settings: Settings
) -> tuple[list[str], list[Image.Image], int]:
    """Every image's header opened and checked (format, pixels, JPEG scans, and the
    pixels of all images together against ``max_request_pixels``), nothing decoded.

    Returns:
        The images' labels for messages, the opened images (the caller closes them) and
        their pixels together.
    """
    labels = [
        f"image {i}" + (f" ({filename[:64]!r})" if filename else "")
        for i, (filename, _) in enumerate(images)
    ]
    opened: list[Image.Image] = []
    try:
        total = 0
        for label, (_, data) in zip(labels, images, strict=True):
            img = open_image(
                data,
                max_pixels=settings.max_image_pixels,
                max_jpeg_scans=settings.max_jpeg_scans,
                label=label,
            )
            opened.append(img)
            total += img.size[0] * img.size[1]
        if total > settings.max_request_pixels:
            raise PayloadTooLarge(
                f"the request's {len(images)} images hold {total} pixels together; the "
                f"limit per request is {settings.max_request_pixels}"
            )
    except BaseException:
        for img in opened:
            img.close()
        raise
    return labels, opened, total


def decode_many(
    images: Sequence[tuple[str | None, bytes]],
    spec: InputSpec,
    settings: Settings,
    *,
    deadline: float = math.inf,
    stop: threading.Event | None = None,
) -> list[np.ndarray]:
    """Decode a request's images to ``(H, W, C)`` uint8 pixels of the model's input size
    (blocking; run it in a thread; :func:`network_inputs` makes the network's inputs).

    Every header is read and checked first (format, pixels, JPEG scans, and the pixels of
    all images together against ``max_request_pixels``), so nothing is decoded for a
    request that would be refused; then the images are decoded one by one, and the work
    stops before the next image once ``deadline`` (``time.monotonic()``) has passed or
    ``stop`` is set.

    Raises:
        BadImage, PayloadTooLarge: from the checks.
        DeadlineExceeded: the deadline passed (or ``stop`` was set) before the end.
    """
    labels, opened, _ = _open_checked(images, settings)
    return _decode_opened(labels, opened, spec, settings, deadline=deadline, stop=stop)


def _decode_opened(
    labels: list[str],
    opened: list[Image.Image],
    spec: InputSpec,
    settings: Settings,
    *,
    deadline: float = math.inf,
    stop: threading.Event | None = None,
) -> list[np.ndarray]:
    """Images opened and checked by :func:`_open_checked` decoded one by one into pixels
    (stopping before the next image past ``deadline`` or once ``stop`` is set), then
    closed."""
    try:
        out = []
        for label, img in zip(labels, opened, strict=True):
            if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                raise DeadlineExceeded(
                    f"decoding the images did not finish within the request timeout of "
                    f"{settings.request_timeout_s} s"
                )
            out.append(to_checked_array(load_pixels(img, label=label), spec, label=label))
        return out
    finally:
        for img in opened:
            img.close()


def _decode_inline(
    images: Sequence[tuple[str | None, bytes]], spec: InputSpec, settings: Settings
) -> list[np.ndarray] | None:
    """The request's pixels decoded here, on the event loop, when its images are small
    enough (``inline_decode_pixels``, 0 by default: off) to skip a worker thread's hop;
    None when they are not (decode them in a thread).

    The encoded size is checked first, so that no large file's header (a progressive
    JPEG's scans are counted by reading it) is parsed on the loop.
    """
    budget = settings.inline_decode_pixels
    # 4 bytes per pixel: above any sane encoding of an image that small
    if budget <= 0 or sum(len(data) for _, data in images) > 4 * budget:
        return None
    labels, opened, total = _open_checked(images, settings)
    if total > budget:
        for img in opened:
            img.close()
        return None
    return _decode_opened(labels, opened, spec, settings)


async def decode(
    images: Sequence[tuple[str | None, bytes]],
    spec: InputSpec,
    settings: Settings,
    *,
    started: float | None = None,
) -> list[np.ndarray]:
    """Decode the request's images to ``(H, W, C)`` uint8 pixels of the model's input
    size (:func:`network_inputs` makes the network's inputs): on the event loop when
    they are small (at most ``inline_decode_pixels`` pixels together), else in a worker
    thread, answering by the request's deadline at the latest.

    Args:
        images: (filename, bytes) of each image.
        spec: the input the model expects.
        settings: limits and the request timeout.
        started: ``time.monotonic()`` when the request arrived (default: now).

    Raises:
        BadImage, PayloadTooLarge: from the checks (see :func:`decode_many`).
        DeadlineExceeded: the deadline passed while decoding; the worker thread stops
            before its next image, so the request holds it no longer than one image.
    """
    inline = _decode_inline(images, spec, settings)
    if inline is not None:
        return inline
    deadline = (time.monotonic() if started is None else started) + settings.request_timeout_s
    stop = threading.Event()
    work = asyncio.ensure_future(
        asyncio.to_thread(decode_many, images, spec, settings, deadline=deadline, stop=stop)
    )
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            return await asyncio.shield(work)
    except TimeoutError:
        raise DeadlineExceeded(
            f"decoding the images did not finish within the request timeout of "
            f"{settings.request_timeout_s} s"
        ) from None
    finally:
        if not work.done():
            stop.set()  # also when the client went away: stop before the next image
            work.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Future[list[np.ndarray]]) -> None:
    if not task.cancelled():
        task.exception()  # abandoned work: its outcome is no longer anyone's answer


def submit(
    model: ServedModel,
    inputs: Sequence[Tensor],
    settings: Settings,
    *,
    started: float,
    thresholds: tuple[float, ...] | None = None,
) -> tuple[list[asyncio.Future[Classified]], float]:
    """Queue ``inputs`` on the model's batcher: the first half of :func:`classify`, for
    callers that wait without a coroutine (``service.engine_link``).

    Returns:
        The images' futures, and how long from now to wait for them at most (the
        request's deadline plus :data:`COMPUTE_GRACE_S`, for a batch already computing);
        then :func:`settle` them.

    Raises:
        NotReady, QueueFull, ShuttingDown, ModelChanged: from the batcher.
    """
    if model.batcher is None:
        raise NotReady(f"model {model.name!r} is not ready")
    deadline = started + settings.request_timeout_s
    futures = model.batcher.submit(inputs, deadline=deadline, thresholds=thresholds)
    return futures, max(0.0, deadline - time.monotonic()) + COMPUTE_GRACE_S


def abandon(futures: Sequence[asyncio.Future[Classified]]) -> None:
    """Cancel the images not answered yet (the batcher skips them) and mark the failed
    ones' errors retrieved: one failure already answers the whole request."""
    for f in futures:
        if not f.done():
            f.cancel()
        elif not f.cancelled():
            f.exception()


def settle(
    futures: Sequence[asyncio.Future[Classified]], settings: Settings, *, timed_out: bool
) -> list[Classified]:
    """A request's answers once every image is answered, one failed, or the wait of
    :func:`submit` ran out (``timed_out``).

    Raises:
        DeadlineExceeded: the wait ran out.
        NonFiniteOutput: an answer is NaN or infinite.
        Any image's failure (QueueFull, ShuttingDown, DeadlineExceeded, InternalError
        from the batcher), the first one in image order.
    """
    abandon(futures)
    if timed_out:
        raise DeadlineExceeded(
            f"no answer within the request timeout of {settings.request_timeout_s} s"
        )
    for f in futures:
        if not f.cancelled() and (error := f.exception()) is not None:
            raise error
    answers = [f.result() for f in futures]
    # finite: computed once per batch exit by the batcher
    not_finite = [i for i, a in enumerate(answers) if not a.finite]
    if not_finite:
        shown = ", ".join(str(i) for i in not_finite[:10])
        raise NonFiniteOutput(
            f"the network's output for image(s) {shown} is not finite (NaN or infinite "
            "logits): the input values are too large for float32 arithmetic"
        )
    return answers


async def classify(
    model: ServedModel,
    inputs: Sequence[Tensor],
    settings: Settings,
    *,
    started: float,
    thresholds: tuple[float, ...] | None = None,
) -> list[Classified]:
    """Queue ``inputs`` on the model's batcher and wait for their answers.

    Args:
        model: the served model.
        inputs: ``(C, H, W)`` float32 network inputs, or uint8 pixels
            (:func:`pixel_inputs`; the batcher normalises them a batch at a time).
        settings: limits and the request timeout.
        started: ``time.monotonic()`` when the request arrived (the deadline counts from it).
        thresholds: the request's own thresholds.

    Raises:
        What :func:`submit` and :func:`settle` raise.
    """
    futures, wait = submit(model, inputs, settings, started=started, thresholds=thresholds)
    timed_out = False
    try:
        # asyncio.timeout, not wait_for, and a lone future awaited as it is: no extra
        # task per request on the hot path
        async with asyncio.timeout(wait):
            await (futures[0] if len(futures) == 1 else asyncio.gather(*futures))
    except TimeoutError:
        timed_out = True
    except Exception:  # an image failed: settle raises its error
        pass
    except BaseException:  # cancelled: the client went away
        abandon(futures)
        raise
    return settle(futures, settings, timed_out=timed_out)


# One image's answer as a response needs it: class index, confidence, entropy, exit
# taken, number of exits, queue wait (s), inference (s), batch size, and the top-k
# (class index, probability) pairs when asked for. Plain values: the engine process
# sends these to its HTTP front ends (service.engine_link).
Row = tuple[int, float, float, int, int, float, float, int, list[tuple[int, float]] | None]


def answer_rows(answers: Sequence[Classified], k: int | None) -> list[Row]:
    """The rows of a request's answers, with the ``k`` best classes of each when ``k``
    is given."""
    rows: list[Row] = []
    for a in answers:
        best = None
        if k is not None:
            p, c = a.probabilities.topk(k)
            best = list(zip(c.tolist(), p.tolist(), strict=True))
        rows.append(
            (
                a.class_index,
                a.confidence,
                a.entropy,
                a.exit_index,
                len(a.thresholds) + 1,
                a.queue_wait_s,
                a.inference_s,
                a.batch_size,
                best,
            )
        )
    return rows


def classify_body(
    model: str,
    rows: Sequence[Row],
    filenames: Sequence[str | None],
    class_names: Sequence[str],
    thresholds: Sequence[float],
    *,
    decode_s: float,
    started: float,
) -> bytes:
    """The JSON body of a classify answer (``ClassifyResponse``), serialised once.

    Args:
        model: the model's name.
        rows: one :data:`Row` per image, in request order.
        filenames: each image's file name (None for a raw body).
        class_names: of the engine that answered.
        thresholds: the thresholds the first image was classified with.
        decode_s: time spent decoding the request's images.
        started: ``time.monotonic()`` when the request arrived.
    """
    results = [
        ImageResult(
            index=i,
            filename=filename,
            class_index=ci,
            class_name=class_names[ci],
            confidence=confidence,
            entropy=entropy,
            exit=ExitInfo(index=exit_index, count=exits),
            top_k=None
            if best is None
            else [
                TopK(class_index=int(c), class_name=class_names[int(c)], probability=float(p))
                for c, p in best
            ],
            queue_wait_ms=wait * 1e3,
            inference_ms=inference * 1e3,
            batch_size=batch,
        )
        for i, (
            (ci, confidence, entropy, exit_index, exits, wait, inference, batch, best),
            filename,
        ) in enumerate(zip(rows, filenames, strict=True))
    ]
    body = ClassifyResponse(
        model=model,
        thresholds=encode_thresholds(thresholds),
        results=results,
        timings=Timings(
            decode_ms=decode_s * 1e3,
            queue_wait_ms=max(r[5] for r in rows) * 1e3,
            inference_ms=max(r[6] for r in rows) * 1e3,
            total_ms=(time.monotonic() - started) * 1e3,
        ),
    )
    # Serialised here (pydantic-core) instead of validated again by FastAPI: this is the
    # hot path, and many images may share one answer.
    return body.model_dump_json().encode()
