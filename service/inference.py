"""Shared steps of the classify and v2 routes: thresholds from a request, decoding off
the event loop, and submitting to a model's batcher with the request's deadline."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence

from torch import Tensor

from service.batcher import Classified
from service.errors import DeadlineExceeded, NotReady, ValidationFailed
from service.preprocess import preprocess
from service.repository import ServedModel
from service.settings import Settings
from service.state import check_thresholds

# Extra time a request waits beyond its deadline for a batch already computing: images
# are dropped before compute once the deadline passes, never in the middle of it.
COMPUTE_GRACE_S = 5.0


def parse_thresholds(
    text: str | None, model: ServedModel, settings: Settings
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
        return check_thresholds(values, model.num_exits)
    except ValueError as exc:
        raise ValidationFailed(f"invalid thresholds {text[:100]!r}: {exc}") from None


def decode_many(
    images: Sequence[tuple[str | None, bytes]], model: ServedModel, max_pixels: int
) -> list[Tensor]:
    """Decode and preprocess a request's images (blocking; run it in a thread)."""
    spec = model.checkpoint.input_spec
    out = []
    for i, (filename, data) in enumerate(images):
        label = f"image {i}" + (f" ({filename[:64]!r})" if filename else "")
        out.append(preprocess(data, spec, max_pixels=max_pixels, label=label))
    return out


async def decode(
    images: Sequence[tuple[str | None, bytes]], model: ServedModel, settings: Settings
) -> list[Tensor]:
    return await asyncio.to_thread(decode_many, images, model, settings.max_image_pixels)


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
        inputs: ``(C, H, W)`` float32 network inputs.
        settings: limits and the request timeout.
        started: ``time.monotonic()`` when the request arrived (the deadline counts from it).
        thresholds: the request's own thresholds.

    Raises:
        QueueFull, ShuttingDown, DeadlineExceeded, InternalError: from the batcher.
    """
    if model.batcher is None:
        raise NotReady(f"model {model.name!r} is not ready")
    deadline = started + settings.request_timeout_s
    futures = model.batcher.submit(inputs, deadline=deadline, thresholds=thresholds)
    wait = max(0.0, deadline - time.monotonic()) + COMPUTE_GRACE_S
    try:
        return list(await asyncio.wait_for(asyncio.gather(*futures), timeout=wait))
    except TimeoutError:
        raise DeadlineExceeded(
            f"no answer within the request timeout of {settings.request_timeout_s} s"
        ) from None
    finally:
        for f in futures:
            if not f.done():
                f.cancel()  # the batcher skips abandoned images
            elif not f.cancelled():
                f.exception()  # mark retrieved: one failure already answers the request


def encode_thresholds(thresholds: Sequence[float]) -> list[float | str]:
    return [t if math.isfinite(t) else "inf" for t in thresholds]
