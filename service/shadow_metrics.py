"""The shadow monitor's metrics (``service.shadow``), part of every app's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

_PER_MODEL = ("model",)

# attribute -> kind, metric name, labels
_SERIES: dict[str, tuple[type[Counter] | type[Gauge], str, tuple[str, ...]]] = {
    "total": (Counter, "branchy_shadow", ("model", "exit", "agree")),
    "dropped": (Counter, "branchy_shadow_dropped", _PER_MODEL),
    "disagreement": (Gauge, "branchy_shadow_disagreement", _PER_MODEL),
    "upper": (Gauge, "branchy_shadow_disagreement_upper", _PER_MODEL),
    "samples": (Gauge, "branchy_shadow_window_samples", _PER_MODEL),
    "budget": (Gauge, "branchy_shadow_budget", _PER_MODEL),
    "queued": (Gauge, "branchy_shadow_queue_depth", _PER_MODEL),
}

_HELP = {
    "total": "Early-exited images re-run to the final exit, by exit and agreement.",
    "dropped": "Sampled early-exited images not re-run (shadow queue full: model busy).",
    "disagreement": "Share of the sampled window whose answer differs from the final exit's.",
    "upper": "Clopper-Pearson upper confidence bound of that share.",
    "samples": "Sampled images in the disagreement window.",
    "budget": "Disagreement budget the alert compares with (BRANCHY_SHADOW_BUDGET).",
    "queued": "Shadows waiting to be re-run (BRANCHY_SHADOW_QUEUE at most).",
}


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
        for attr, (kind, name, labels) in _SERIES.items():
            setattr(self, attr, kind(name, _HELP[attr], list(labels), registry=registry))
