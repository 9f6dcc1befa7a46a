"""Shadow monitoring: is an early exit still answering as the final exit would?

A fraction ``BRANCHY_SHADOW_RATE`` of served images is sampled. A sampled image that
left early is queued to run on to the final exit, off the request path: a bounded queue
per model, drained by one low-priority thread (``nice`` 19 on Linux) that runs small
batches through the network's plain forward (``engine.model``, every exit, the eager
reference network) and only while the model's batcher has nothing queued. When the queue
is full the shadow is dropped and counted, so shadows never hold up requests. A sampled
image that took the final exit agrees by definition and needs no work.

Each model keeps a window of the last ``BRANCHY_SHADOW_WINDOW`` sampled images (early
and final alike, drops excluded), so the share of disagreements in it estimates the
*overall* disagreement risk under the thresholds in force, the quantity that
``models.certify_thresholds`` bounds; its Clopper–Pearson upper bound at
``BRANCHY_SHADOW_CONFIDENCE`` is exported beside it. The bound is valid when sampling
(and dropping) is independent of whether an image disagrees.

Metrics: ``branchy_shadow_total{model,exit,agree}``, ``branchy_shadow_dropped_total{model}``,
``branchy_shadow_disagreement{model}``, ``branchy_shadow_disagreement_upper{model}``,
``branchy_shadow_window_samples{model}``, ``branchy_shadow_budget{model}`` (the budget the
alert rule compares with, ``BRANCHY_SHADOW_BUDGET``), ``branchy_shadow_queue_depth{model}``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from models import entropy_from_logits
from models.calibration import binomial_upper_bound
from service.batcher import Classified, Engine
from service.deps import app_state
from service.settings import Settings
from service.shadow_metrics import ShadowMetrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Job:
    engine: Engine
    x: Tensor
    exit_index: int
    class_index: int
    queued_at: float = field(default_factory=time.monotonic)


# How long the worker gathers shadows into one forward pass before it runs fewer than a
# batch. One pass has a fixed cost (module calls, entropies, the window's gauges) of about
# a millisecond of GIL time, which the request path pays: at the default rate (1 %) a
# pass per shadow cost B-LeNet's server ~5-9 % of its throughput, a pass per half second
# a fraction of that (benchmarks/shadow_cost.py, docs/fidelity.md).
GATHER_S = 0.5


@dataclass(frozen=True)
class WindowRow:
    """One sampled image: the exit it took, whether it agreed with the final exit, and
    (when it was re-run) every exit's entropy and prediction."""

    exit_index: int
    agree: bool
    entropy: Tensor | None = None
    prediction: Tensor | None = None


@dataclass(frozen=True)
class ShadowConfig:
    """How one model's shadow samples, queues and estimates.

    Args:
        rate: share of served images sampled, in [0, 1].
        capacity: shadows waiting at most; beyond that they are dropped.
        window: sampled images kept for the disagreement estimate.
        confidence: level of the upper bound.
        budget: exported as ``branchy_shadow_budget`` for the alert rule.
        batch_size: shadows per forward pass at most (small, so a request that arrives
            meanwhile waits little for the CPU).
    """

    rate: float
    capacity: int = 256
    window: int = 2000
    confidence: float = 0.95
    budget: float = 0.01
    batch_size: int = 16

    @classmethod
    def from_settings(cls, settings: Settings) -> ShadowConfig:
        """The ``BRANCHY_SHADOW_*`` settings."""
        return cls(
            rate=settings.shadow_rate,
            capacity=settings.shadow_queue,
            window=settings.shadow_window,
            confidence=settings.shadow_confidence,
            budget=settings.shadow_budget,
        )


class ShadowMonitor:
    """One model's shadow.

    Args:
        name: model name (metric label).
        metrics: the shadow metrics.
        config: rate, queue, window and bound settings.
        busy: true while the model has requests waiting; the worker does not start a
            shadow batch then.
        seed: seeds the sampling (tests).
    """

    def __init__(
        self,
        name: str,
        metrics: ShadowMetrics,
        config: ShadowConfig,
        *,
        busy: Callable[[], bool],
        seed: int | None = None,
    ) -> None:
        self.name, self.metrics, self.config, self.busy = name, metrics, config, busy
        self._rng = random.Random(seed)
        self._jobs: collections.deque[_Job] = collections.deque()
        self._rows: collections.deque[WindowRow] = collections.deque(maxlen=config.window)
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._closing = False
        self._dirty = False  # window rows not yet in the gauges (exported by the worker)
        self._thread: threading.Thread | None = None
        # also re-run sampled images that took the final exit (their every-exit entropies
        # make the window a calibration sample; service.autotune switches it on)
        self.collect_all = False
        metrics.budget.labels(name).set(config.budget)
        metrics.dropped.labels(name)
        metrics.queued.labels(name).set(0)
        self._export()

    # ---------------------------------------------------------------- request side

    def offer(self, engine: Engine, x: Tensor, answers: Sequence[tuple[int, Classified]]) -> None:
        """Sample a batch's answers, (row of the batch's input ``x``, answer) pairs
        (called where a batch's answers are built, the batch thread or the event loop:
        cheap, never blocks; only sampled rows are copied)."""
        if self.config.rate <= 0 or self._closing:
            return
        last = engine.num_exits - 1
        dropped = 0
        with self._lock:
            queued_before = len(self._jobs)
            for row, out in answers:
                if self.config.rate < 1 and self._rng.random() >= self.config.rate:
                    continue
                if out.exit_index >= last:
                    if self.collect_all and len(self._jobs) < self.config.capacity:
                        # auto-tuning needs every exit's entropy of these too
                        self._jobs.append(
                            _Job(engine, x[row].clone(), out.exit_index, out.class_index)
                        )
                    else:
                        self._rows.append(WindowRow(out.exit_index, True))
                        self._dirty = True
                elif len(self._jobs) >= self.config.capacity:
                    dropped += 1
                else:
                    # a copy: a row is a view of its whole batch, which it would keep alive
                    self._jobs.append(_Job(engine, x[row].clone(), out.exit_index, out.class_index))
            if len(self._jobs) > queued_before or self._dirty:
                self._wakeup.notify()  # the worker re-checks its batch (not on every call)
            queued = len(self._jobs)
        self.metrics.queued.labels(self.name).set(queued)
        if dropped:
            self.metrics.dropped.labels(self.name).inc(dropped)

    # ---------------------------------------------------------------- worker

    def start(self) -> None:
        if self.config.rate > 0 and self._thread is None:
            self._thread = threading.Thread(
                target=self._work, name=f"shadow-{self.name}", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; shadows still queued are counted as dropped."""
        with self._lock:
            self._closing = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            left = len(self._jobs)
            self._jobs.clear()
        self.metrics.queued.labels(self.name).set(0)
        if left:
            self.metrics.dropped.labels(self.name).inc(left)

    def _work(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux: per-thread niceness
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while True:
            with self._lock:
                while not self._closing:
                    if self._jobs:  # run a full batch, or what the oldest gathered so far
                        if len(self._jobs) >= self.config.batch_size:
                            break
                        wait = self._jobs[0].queued_at + GATHER_S - time.monotonic()
                        if wait <= 0:
                            break
                        self._wakeup.wait(wait)
                    elif self._dirty:
                        break
                    else:
                        self._wakeup.wait()
                if self._closing:
                    return
                only_rows = not self._jobs
                self._dirty = False
            if only_rows:
                self._export()
                continue
            pause = 0.002
            while self.busy() and not self._closing:
                # requests first; the bounded queue drops meanwhile. Back off: each wake-up
                # takes the GIL from the request path (polling every 2 ms cost B-LeNet's
                # server about 9 % CPU per image under load at rate 0.01)
                time.sleep(pause)
                pause = min(2 * pause, 0.05)
            with self._lock:
                jobs = [
                    self._jobs.popleft()
                    for _ in range(min(self.config.batch_size, len(self._jobs)))
                ]
            try:
                self._run(jobs)
            except Exception:  # a failed shadow must never take the server down
                logger.exception("shadow batch of model %r failed; dropped", self.name)
                self.metrics.dropped.labels(self.name).inc(len(jobs))
            with self._lock:
                queued = len(self._jobs)
            self.metrics.queued.labels(self.name).set(queued)  # after the batch's rows

    def _run(self, jobs: list[_Job]) -> None:
        groups: dict[int, list[_Job]] = {}
        for job in jobs:
            groups.setdefault(id(job.engine), []).append(job)
        rows = []
        for group in groups.values():
            model = group[0].engine.model  # the plain network: every exit, eager
            param = next(model.parameters())
            with torch.inference_mode():
                x = torch.stack([j.x for j in group]).to(param.device, param.dtype)
                outs = [z.float() for z in model(x)]
                entropy = torch.stack([entropy_from_logits(z) for z in outs], 1).cpu()
                pred = torch.stack([z.argmax(1) for z in outs], 1).cpu()
            last = group[0].engine.num_exits - 1
            for k, job in enumerate(group):
                if job.exit_index >= last:  # collected for auto-tuning: agrees by definition
                    rows.append(WindowRow(job.exit_index, True, entropy[k], pred[k]))
                    continue
                agree = job.class_index == int(pred[k, -1])
                self.metrics.total.labels(
                    self.name, str(job.exit_index), "true" if agree else "false"
                ).inc()
                rows.append(WindowRow(job.exit_index, agree, entropy[k], pred[k]))
        with self._lock:
            self._rows.extend(rows)
        self._export()

    # ---------------------------------------------------------------- window

    def window(self) -> list[WindowRow]:
        with self._lock:
            return list(self._rows)

    def calibration_window(self) -> tuple[Tensor, Tensor] | None:
        """Every-exit entropies ``(n, E)`` and predictions ``(n, E)`` of the window's
        re-run images (None when there are none)."""
        rows = [r for r in self.window() if r.entropy is not None and r.prediction is not None]
        if not rows:
            return None
        widths = {int(r.entropy.shape[0]) for r in rows if r.entropy is not None}
        if len(widths) != 1:  # a reload changed the exits: keep the newest shape only
            e = int(rows[-1].entropy.shape[0]) if rows[-1].entropy is not None else 0
            rows = [r for r in rows if r.entropy is not None and r.entropy.shape[0] == e]
        entropy = torch.stack([r.entropy for r in rows if r.entropy is not None])
        pred = torch.stack([r.prediction for r in rows if r.prediction is not None])
        return entropy, pred

    def clear_window(self) -> None:
        """Forget the window (after the thresholds change, its rows describe old ones)."""
        with self._lock:
            self._rows.clear()
        self._export()

    def estimate(self) -> tuple[int, int, float, float]:
        """Samples, disagreements, their share and its upper confidence bound."""
        with self._lock:
            n = len(self._rows)
            k = sum(not r.agree for r in self._rows)
        if n == 0:
            return 0, 0, 0.0, 1.0
        return n, k, k / n, binomial_upper_bound(k, n, 1.0 - self.config.confidence)

    def _export(self) -> None:
        n, _, share, upper = self.estimate()
        self.metrics.samples.labels(self.name).set(n)
        self.metrics.disagreement.labels(self.name).set(share)
        self.metrics.upper.labels(self.name).set(upper)


def attach(app: Any, served: Any) -> ShadowMonitor | None:
    """Give a served model a shadow (when the rate is above 0) and start it."""
    state = app_state(app)
    settings = state.settings
    if settings.shadow_rate <= 0 or served.batcher is None:
        return None
    batcher = served.batcher
    monitor = ShadowMonitor(
        served.name,
        state.metrics.shadow,
        ShadowConfig.from_settings(settings),
        busy=lambda: batcher.depth > 0,
    )
    batcher.shadow = monitor
    monitor.start()
    return monitor


def stop_all(app: Any) -> None:
    for served in app_state(app).models.models.values():
        monitor = getattr(served.batcher, "shadow", None)
        if monitor is not None:
            monitor.stop()
