"""Prometheus metrics on a dedicated registry (one per app, so tests can build many apps).

Names and labels are fixed by docs/service-contract.md.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.shadow_metrics import ShadowMetrics

# Latency buckets from 50 µs (a tiny model's batch on a GPU) to 10 s (the default deadline).
LATENCY_BUCKETS = (
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
# Entropy in nats: thresholds of interest run from 1e-4 up to ln(C) (2.30 for 10 classes).
ENTROPY_BUCKETS = (
    1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0,
)  # fmt: skip
UNKNOWN_MODEL = "_unknown"


_MODEL, _MODEL_EXIT = ("model",), ("model", "exit")
_INFO_LABELS = ("model", "device", "architecture", "exits", "runtime", "precision")

# attribute -> kind, metric name, labels, histogram buckets (names fixed by the contract)
_SERIES: dict[
    str, tuple[type[Counter | Gauge | Histogram], str, tuple[str, ...], tuple[float, ...]]
] = {
    "requests": (Counter, "branchy_requests_total", ("model", "endpoint", "code"), ()),
    "request_duration": (
        Histogram,
        "branchy_request_duration_seconds",
        ("model", "endpoint"),
        LATENCY_BUCKETS,
    ),
    "queue_wait": (Histogram, "branchy_queue_wait_seconds", _MODEL, LATENCY_BUCKETS),
    "inference_duration": (
        Histogram,
        "branchy_inference_duration_seconds",
        _MODEL,
        LATENCY_BUCKETS,
    ),
    "batch_size": (Histogram, "branchy_batch_size", _MODEL, BATCH_BUCKETS),
    "exit_entropy": (Histogram, "branchy_exit_entropy", _MODEL_EXIT, ENTROPY_BUCKETS),
    "exits": (Counter, "branchy_exit", _MODEL_EXIT, ()),
    "rejected": (Counter, "branchy_rejected", ("model", "reason"), ()),
    "queue_depth": (Gauge, "branchy_queue_depth", _MODEL, ()),
    "batch_wait_limit": (Gauge, "branchy_batch_wait_limit_seconds", _MODEL, ()),
    "threshold": (Gauge, "branchy_threshold", _MODEL_EXIT, ()),
    "model_info": (Gauge, "branchy_model_info", _INFO_LABELS, ()),
    "load_failed": (Gauge, "branchy_model_load_failed", _MODEL, ()),
}

_HELP = {
    "requests": "Requests answered, by status code.",
    "request_duration": "Time from request start to response start.",
    "queue_wait": "Time an image waited in the queue for its batch.",
    "inference_duration": "Compute time of one batch.",
    "batch_size": "Images per batch run.",
    "exit_entropy": "Entropy (nats) of the answer at the exit taken.",
    "exits": "Images classified, by the exit they took.",
    "rejected": "Requests refused, by reason.",
    "queue_depth": "Images waiting for a batch.",
    "batch_wait_limit": "Longest wait of the oldest queued image for its batch to fill.",
    "threshold": "Entropy threshold in force at each early exit.",
    "model_info": "Loaded model (value 1), with the runtime and precision that serve it.",
    "load_failed": "1 while a model of the repository failed to load and is not served, else 0.",
}


class RequestMetrics(Protocol):
    """What the request middleware records: :class:`Metrics` in the process that owns
    the metrics, a relay to it in an HTTP front end (``service.frontend``)."""

    def model_label(self, name: str | None) -> str: ...

    def reject(self, model: str, reason: str) -> None: ...

    def observe_request(self, model: str, endpoint: str, seconds: float) -> None: ...

    def count_request(self, model: str, endpoint: str, status: int) -> None: ...


class Metrics:
    """Every metric the server exports (one table, :data:`_SERIES`).

    Args:
        registry: where to register; a fresh ``CollectorRegistry`` by default.
    """

    requests: Counter
    request_duration: Histogram
    queue_wait: Histogram
    inference_duration: Histogram
    batch_size: Histogram
    exit_entropy: Histogram
    exits: Counter
    rejected: Counter
    queue_depth: Gauge
    batch_wait_limit: Gauge
    threshold: Gauge
    model_info: Gauge
    load_failed: Gauge

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self._info_labels: dict[str, tuple[str, ...]] = {}
        self._models: set[str] = set()  # loaded models: the only model label values
        for attr, (kind, name, labels, buckets) in _SERIES.items():
            metric: Counter | Gauge | Histogram
            if kind is Histogram:
                metric = Histogram(name, _HELP[attr], labels, buckets=buckets, registry=r)
            else:
                metric = kind(name, _HELP[attr], labels, registry=r)
            setattr(self, attr, metric)
        self.shadow = ShadowMetrics(r)  # exit fidelity (service.shadow)
        # Gathers what HTTP front ends measured and have not sent yet (set by
        # service.engine_link.LinkServer; None in a single process).
        self.relayed: Callable[[], Awaitable[None]] | None = None

    async def gather(self) -> None:
        """Wait for the request metrics that front ends still hold (none without)."""
        if self.relayed is not None:
            await self.relayed()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def reject(self, model: str, reason: str) -> None:
        self.rejected.labels(model, reason).inc()

    def observe_request(self, model: str, endpoint: str, seconds: float) -> None:
        """A measured request's time from its start to its response's start."""
        self.request_duration.labels(model, endpoint).observe(seconds)

    def count_request(self, model: str, endpoint: str, status: int) -> None:
        self.requests.labels(model, endpoint, str(status)).inc()

    def set_load_failed(self, model: str, failed: bool) -> None:
        """``model`` is a checkpoint folder's name (bounded by the repository)."""
        self.load_failed.labels(model).set(1 if failed else 0)

    def set_thresholds(self, model: str, thresholds: Sequence[float]) -> None:
        for i, t in enumerate(thresholds):
            self.threshold.labels(model, str(i)).set(t)

    def set_model_info(
        self,
        model: str,
        *,
        device: str,
        architecture: str,
        exits: int,
        runtime: str = "torch",
        precision: str = "fp32",
    ) -> None:
        # A reload may change the architecture: drop the model's old series first.
        old = self._info_labels.pop(model, None)
        if old is not None:
            self.model_info.remove(*old)
        labels = (model, device, architecture, str(exits), runtime, precision)
        self.model_info.labels(*labels).set(1)
        self._info_labels[model] = labels

    def init_model(self, model: str, num_exits: int) -> None:
        """Create a model's series at zero so that rates and sums exist from the start."""
        self._models.add(model)
        self.queue_depth.labels(model).set(0)
        for i in range(num_exits):
            self.exits.labels(model, str(i))
        for reason in ("queue_full", "deadline_exceeded", "bad_input", "too_large"):
            self.rejected.labels(model, reason)

    def model_label(self, name: str | None) -> str:
        """``name`` when it is a loaded model (one :meth:`init_model` was called for),
        else a fixed placeholder: label values never come from unchecked client input
        (unbounded series would exhaust memory)."""
        return name if name is not None and name in self._models else UNKNOWN_MODEL
