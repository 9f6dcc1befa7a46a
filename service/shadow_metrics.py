"""The shadow monitor's metrics (``service.shadow``), part of every app's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class ShadowMetrics:
    """The shadow's metrics, on the app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.total = Counter(
            "branchy_shadow",
            "Early-exited images re-run to the final exit, by exit and agreement.",
            ["model", "exit", "agree"],
            registry=registry,
        )
        self.dropped = Counter(
            "branchy_shadow_dropped",
            "Sampled early-exited images not re-run (shadow queue full: model busy).",
            ["model"],
            registry=registry,
        )
        self.disagreement = Gauge(
            "branchy_shadow_disagreement",
            "Share of the sampled window whose answer differs from the final exit's.",
            ["model"],
            registry=registry,
        )
        self.upper = Gauge(
            "branchy_shadow_disagreement_upper",
            "Clopper-Pearson upper confidence bound of that share.",
            ["model"],
            registry=registry,
        )
        self.samples = Gauge(
            "branchy_shadow_window_samples",
            "Sampled images in the disagreement window.",
            ["model"],
            registry=registry,
        )
        self.budget = Gauge(
            "branchy_shadow_budget",
            "Disagreement budget the alert compares with (BRANCHY_SHADOW_BUDGET).",
            ["model"],
            registry=registry,
        )
