"""Typed results of the server's answers (frozen dataclasses), parsed from its JSON.

Thresholds are floats; the server's ``"inf"`` (JSON has no infinity) becomes
``math.inf``. Unknown fields in an answer are ignored, so a newer server with more
fields still works with this client.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from branchy_client.errors import ProtocolError


def _threshold(value: Any) -> float:
    if isinstance(value, str):
        if value.strip().lower() in ("inf", "+inf", "infinity"):
            return math.inf
        return float(value)
    return float(value)


def thresholds_of(values: Sequence[Any]) -> tuple[float, ...]:
    """Thresholds from an answer's list (numbers or ``"inf"``)."""
    return tuple(_threshold(v) for v in values)


@dataclass(frozen=True)
class TopClass:
    """One of the k most probable classes of an image."""

    class_index: int
    class_name: str
    probability: float


@dataclass(frozen=True)
class Prediction:
    """The answer for one image.

    Attributes:
        index: position of the image in its request.
        filename: the name it was sent under (``None`` for a raw body).
        class_index, class_name: the predicted class.
        confidence: softmax probability of the predicted class at the exit taken.
        entropy: softmax entropy (nats) at the exit taken.
        exit_index: 0-based exit that answered; ``exit_count`` exits in all.
        top_k: the k most probable classes, when the request asked for them.
        queue_wait_ms: time the image waited for its batch.
        inference_ms: compute time of that batch; ``batch_size`` images in it.
    """

    index: int
    filename: str | None
    class_index: int
    class_name: str
    confidence: float
    entropy: float
    exit_index: int
    exit_count: int
    top_k: tuple[TopClass, ...]
    queue_wait_ms: float
    inference_ms: float
    batch_size: int

    @property
    def probabilities(self) -> dict[str, float]:
        """Class name → probability for the ``top_k`` classes (empty without top_k)."""
        return {c.class_name: c.probability for c in self.top_k}

    @property
    def early(self) -> bool:
        """Whether the image left before the final exit."""
        return self.exit_index < self.exit_count - 1


@dataclass(frozen=True)
class Timings:
    """Server-side timings of one request, milliseconds."""

    decode_ms: float
    queue_wait_ms: float
    inference_ms: float
    total_ms: float


@dataclass(frozen=True)
class Classification:
    """The answer to one classify request.

    Attributes:
        model: the model that answered.
        thresholds: the thresholds the request ran with.
        predictions: one per image, in request order.
        timings: the server's timings.
        round_trip_ms: the client's wall time for the request, retries included.
        retries: how many 503 answers were retried before this one.
    """

    model: str
    thresholds: tuple[float, ...]
    predictions: tuple[Prediction, ...]
    timings: Timings
    round_trip_ms: float = 0.0
    retries: int = 0


@dataclass(frozen=True)
class ModelSummary:
    """A model in ``GET /v1/models``."""

    name: str
    architecture: str
    num_exits: int
    ready: bool


@dataclass(frozen=True)
class ModelInfo:
    """One model's description (``GET /v1/models/{name}``).

    Attributes:
        threshold_source: where the thresholds in force came from: ``checkpoint``,
            ``state`` (the state folder) or ``admin``.
        input: the input spec (channels, height, width, mean, std).
        exit_macs: multiply-accumulates to reach and evaluate each exit.
        raw: the whole answer, fields this client does not know included.
    """

    name: str
    architecture: str
    num_exits: int
    thresholds: tuple[float, ...]
    threshold_source: str
    classes: tuple[str, ...]
    input: Mapping[str, Any]
    device: str
    exit_macs: tuple[int, ...]
    has_calibration: bool
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Expected:
    """What thresholds do on the checkpoint's calibration data."""

    accuracy: float
    exit_shares: tuple[float, ...]
    expected_macs: float
    relative_cost: float
    calibration_samples: int


@dataclass(frozen=True)
class ThresholdState:
    """A model's thresholds in force (admin API)."""

    model: str
    thresholds: tuple[float, ...]
    source: str
    updated_at: float
    expected: Expected | None


def _need(body: Mapping[str, Any], what: str) -> Any:
    try:
        return body[what]
    except (KeyError, TypeError):
        raise ProtocolError(f"the server's answer has no {what!r} field") from None


def parse_classification(
    body: Any, *, round_trip_ms: float = 0.0, retries: int = 0
) -> Classification:
    """A :class:`Classification` from a classify answer's JSON."""
    try:
        preds = []
        for r in _need(body, "results"):
            ex = r["exit"]
            preds.append(
                Prediction(
                    index=int(r["index"]),
                    filename=r.get("filename"),
                    class_index=int(r["class_index"]),
                    class_name=str(r["class_name"]),
                    confidence=float(r["confidence"]),
                    entropy=float(r["entropy"]),
                    exit_index=int(ex["index"]),
                    exit_count=int(ex["count"]),
                    top_k=tuple(
                        TopClass(
                            int(t["class_index"]), str(t["class_name"]), float(t["probability"])
                        )
                        for t in (r.get("top_k") or ())
                    ),
                    queue_wait_ms=float(r.get("queue_wait_ms", 0.0)),
                    inference_ms=float(r.get("inference_ms", 0.0)),
                    batch_size=int(r.get("batch_size", 0)),
                )
            )
        t = body.get("timings") or {}
        return Classification(
            model=str(body["model"]),
            thresholds=thresholds_of(body.get("thresholds") or ()),
            predictions=tuple(preds),
            timings=Timings(
                decode_ms=float(t.get("decode_ms", 0.0)),
                queue_wait_ms=float(t.get("queue_wait_ms", 0.0)),
                inference_ms=float(t.get("inference_ms", 0.0)),
                total_ms=float(t.get("total_ms", 0.0)),
            ),
            round_trip_ms=round_trip_ms,
            retries=retries,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"unexpected classify answer: {exc!r}") from None


def parse_models(body: Any) -> list[ModelSummary]:
    """The models of a ``GET /v1/models`` answer."""
    try:
        return [
            ModelSummary(
                name=str(m["name"]),
                architecture=str(m["architecture"]),
                num_exits=int(m["num_exits"]),
                ready=bool(m.get("ready", True)),
            )
            for m in _need(body, "models")
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"unexpected model list: {exc!r}") from None


def parse_model(body: Any) -> ModelInfo:
    """A :class:`ModelInfo` from a ``GET /v1/models/{name}`` answer."""
    try:
        return ModelInfo(
            name=str(body["name"]),
            architecture=str(body["architecture"]),
            num_exits=int(body["num_exits"]),
            thresholds=thresholds_of(body.get("thresholds") or ()),
            threshold_source=str(body.get("threshold_source", "")),
            classes=tuple(str(c) for c in body.get("classes") or ()),
            input=dict(body.get("input") or {}),
            device=str(body.get("device", "")),
            exit_macs=tuple(int(m) for m in body.get("exit_macs") or ()),
            has_calibration=bool(body.get("has_calibration", False)),
            raw=dict(body),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"unexpected model description: {exc!r}") from None


def parse_threshold_state(body: Any) -> ThresholdState:
    """A :class:`ThresholdState` from an admin thresholds answer."""
    try:
        e = body.get("expected")
        expected = (
            None
            if not e
            else Expected(
                accuracy=float(e["accuracy"]),
                exit_shares=tuple(float(s) for s in e["exit_shares"]),
                expected_macs=float(e["expected_macs"]),
                relative_cost=float(e["relative_cost"]),
                calibration_samples=int(e.get("calibration_samples", 0)),
            )
        )
        return ThresholdState(
            model=str(body["model"]),
            thresholds=thresholds_of(body["thresholds"]),
            source=str(body.get("source", "")),
            updated_at=float(body.get("updated_at", 0.0)),
            expected=expected,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"unexpected thresholds answer: {exc!r}") from None
