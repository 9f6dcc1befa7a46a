"""The shadow monitor's metrics (``service.shadow``), part of every app's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

_PER_MODEL = ("model",)

# attribute, kind, metric name, labels, help
_SERIES: tuple[tuple[str, type[Counter] | type[Gauge], str, tuple[str, ...], str], ...] = (
    ("total", Counter, "branchy_shadow", ("model", "exit", "agree"),
     "Early-exited images re-run to the final exit, by exit and agreement."),
    ("dropped", Counter, "branchy_shadow_dropped", _PER_MODEL,
     "Sampled early-exited images not re-run (shadow queue full: model busy)."),
    ("disagreement", Gauge, "branchy_shadow_disagreement", _PER_MODEL,
     "Share of the sampled window whose answer differs from the final exit's."),
    ("upper", Gauge, "branchy_shadow_disagreement_upper", _PER_MODEL,
     "Clopper-Pearson upper confidence bound of that share."),
    ("samples", Gauge, "branchy_shadow_window_samples", _PER_MODEL,
     "Sampled images in the disagreement window."),
    ("budget", Gauge, "branchy_shadow_budget", _PER_MODEL,
     "Disagreement budget the alert compares with (BRANCHY_SHADOW_BUDGET)."),
    ("queued", Gauge, "branchy_shadow_queue_depth", _PER_MODEL,
     "Shadows waiting to be re-run (BRANCHY_SHADOW_QUEUE at most)."),
)  # fmt: skip


class ShadowMetrics:
    """The shadow's metrics, on the app's registry (one table, :data:`_SERIES`)."""

    total: Counter
    dropped: Counter
    disagreement: Gauge
    upper: Gauge
    samples: Gauge
    budget: Gauge
    queued: Gauge

    def __init__(self, registry: CollectorRegistry) -> None:
        for attr, kind, name, labels, doc in _SERIES:
            setattr(self, attr, kind(name, doc, list(labels), registry=registry))
