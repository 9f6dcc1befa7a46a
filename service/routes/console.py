"""The web console at ``/``: one page and its script and style (package data in
``service/console/``), the live figures it polls, and the accuracy-vs-cost frontier it
draws for operators.

* ``GET /``: the page. It uses only the server's own routes (relative URLs) and no
  external assets, so it works offline and behind a path prefix.
* ``GET /console/static/{name}``: ``console.js`` and ``console.css`` (a fixed list; no
  path from the request reaches the file system).
* ``GET /console/api/stats``: per model, from the server's own Prometheus counters:
  exit shares, images and requests per second, request latency percentiles, queue
  depth and mean batch size over the last ``window`` seconds (default 10).
* ``GET /admin/models/{name}/frontier`` (admin token): the Pareto frontier of accuracy
  against expected cost on the checkpoint's calibration data, and the point of the
  thresholds in force.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, HTMLResponse

from models import evaluate_thresholds
from models.calibration import CalibrationData, candidate_thresholds, evaluate_grid
from models.exits import encode_thresholds
from service.deps import AdminDep, AppState, ModelDep, StateDep
from service.errors import NoCalibration, NotFound
from service.metrics import Metrics

ASSETS = Path(__file__).resolve().parent.parent / "console"
_STATIC = {"console.js": "text/javascript", "console.css": "text/css"}
#: Threshold settings tried per frontier (spread over the early exits).
FRONTIER_BUDGET = 20_000
#: Frontier points returned at most (evenly thinned by cost when there are more).
FRONTIER_MAX_POINTS = 200
# Snapshots of the counters kept for windows: one per second at most, two minutes.
_HISTORY = 120

# The console's routes are not in the OpenAPI document: they serve the page, and the
# document stays the service contract (docs/service-contract.md). docs/api.md lists them.
router = APIRouter(tags=["console"], include_in_schema=False)
admin_router = APIRouter(
    prefix="/admin", tags=["admin"], dependencies=[AdminDep], include_in_schema=False
)


@router.get("/", response_class=HTMLResponse)
async def console_page() -> FileResponse:
    return FileResponse(ASSETS / "index.html", media_type="text/html")


@router.get("/console/static/{name}")
async def console_asset(name: str) -> FileResponse:
    media = _STATIC.get(name)
    if media is None:
        raise NotFound(f"no console file named {name[:64]!r}")
    return FileResponse(ASSETS / name, media_type=media)


# ------------------------------------------------------------------------- stats


@dataclass
class ModelCounters:
    """One model's cumulative counters at one moment."""

    exits: list[float] = field(default_factory=list)
    requests: float = 0.0
    latency_bounds: list[float] = field(default_factory=list)  # bucket upper bounds
    latency_cumulative: list[float] = field(default_factory=list)  # cumulative counts
    batches: float = 0.0
    batch_images: float = 0.0
    queue_depth: float = 0.0


@dataclass
class Snapshot:
    time: float
    models: dict[str, ModelCounters]


def snapshot(metrics: Metrics, models: Sequence[str]) -> Snapshot:
    """The counters the console shows, read from the server's Prometheus registry.

    Request latency sums the histograms of every measured endpoint (classify, v2 infer).
    """
    out = {name: ModelCounters() for name in models}
    buckets: dict[str, dict[float, float]] = {name: {} for name in models}
    for family in metrics.registry.collect():
        for s in family.samples:
            m = out.get(s.labels.get("model", ""))
            if m is None:
                continue
            name = s.name
            if name == "branchy_exit_total":
                i = int(s.labels["exit"])
                m.exits.extend([0.0] * (i + 1 - len(m.exits)))
                m.exits[i] += s.value
            elif name == "branchy_requests_total":
                m.requests += s.value
            elif name == "branchy_request_duration_seconds_bucket":
                le = float(s.labels["le"])
                b = buckets[s.labels["model"]]
                b[le] = b.get(le, 0.0) + s.value
            elif name == "branchy_batch_size_count":
                m.batches += s.value
            elif name == "branchy_batch_size_sum":
                m.batch_images += s.value
            elif name == "branchy_queue_depth":
                m.queue_depth = s.value
    for name, b in buckets.items():
        bounds = sorted(b)
        out[name].latency_bounds = bounds
        out[name].latency_cumulative = [b[le] for le in bounds]
    return Snapshot(time.monotonic(), out)


def histogram_quantile(
    bounds: Sequence[float], cumulative: Sequence[float], q: float
) -> float | None:
    """The ``q`` quantile of a Prometheus histogram, as PromQL's ``histogram_quantile``
    estimates it: linear interpolation inside the bucket holding the rank.

    Args:
        bounds: ascending bucket upper bounds, the last ``+inf``.
        cumulative: observations ``<=`` each bound.
        q: the quantile, in [0, 1].

    Returns:
        The estimate, or ``None`` without observations. A rank in the ``+inf`` bucket
        gives the largest finite bound (the histogram cannot say more).
    """
    if not bounds or not cumulative or cumulative[-1] <= 0:
        return None
    rank = q * cumulative[-1]
    below, lower = 0.0, 0.0
    for le, count in zip(bounds, cumulative, strict=True):
        if count >= rank and count > below:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / (count - below)
        below, lower = count, (le if math.isfinite(le) else lower)
    return lower


def window_stats(old: Snapshot, new: Snapshot) -> dict[str, Any]:
    """Rates, shares and latency percentiles between two snapshots (``old`` may be
    ``new`` itself: then rates are ``None`` and shares are since start)."""
    dt = new.time - old.time
    models: dict[str, Any] = {}
    for name, now in new.models.items():
        before = old.models.get(name, ModelCounters())
        exits_d = [n - (before.exits[i] if i < len(before.exits) else 0.0)
                   for i, n in enumerate(now.exits)]  # fmt: skip
        total = sum(now.exits)
        recent = sum(exits_d)
        basis = exits_d if dt > 0 and recent > 0 else now.exits
        count = sum(basis)
        lat_d = now.latency_cumulative
        if dt > 0 and before.latency_bounds == now.latency_bounds:
            lat_d = [
                a - b
                for a, b in zip(now.latency_cumulative, before.latency_cumulative, strict=True)
            ]
        if not lat_d or lat_d[-1] <= 0:  # nothing in the window: the whole run
            lat_d = now.latency_cumulative
        latency = None
        if lat_d and lat_d[-1] > 0:
            latency = {
                f"p{int(100 * q)}": 1e3 * v
                for q in (0.5, 0.95, 0.99)
                if (v := histogram_quantile(now.latency_bounds, lat_d, q)) is not None
            }
        batches = now.batches - (before.batches if dt > 0 else 0.0)
        images = now.batch_images - (before.batch_images if dt > 0 else 0.0)
        if batches <= 0:
            batches, images = now.batches, now.batch_images
        models[name] = {
            "exit_counts": now.exits,
            "exit_shares": [c / count if count else 0.0 for c in basis],
            "images_total": total,
            "images_per_s": recent / dt if dt > 0 else None,
            "requests_per_s": (now.requests - before.requests) / dt if dt > 0 else None,
            "latency_ms": latency,
            "queue_depth": now.queue_depth,
            "mean_batch_size": images / batches if batches > 0 else None,
        }
    return {"window_s": dt if dt > 0 else None, "models": models}


class StatsHistory:
    """Recent snapshots, so that every poll can be answered over a window."""

    def __init__(self) -> None:
        self._snapshots: deque[Snapshot] = deque(maxlen=_HISTORY)
        self._lock = threading.Lock()

    def stats(self, current: Snapshot, window: float) -> dict[str, Any]:
        with self._lock:
            if not self._snapshots or current.time - self._snapshots[-1].time >= 1.0:
                self._snapshots.append(current)
            cutoff = current.time - window
            older = [s for s in self._snapshots if s.time <= cutoff]
            base = older[-1] if older else self._snapshots[0]
        return window_stats(base, current)


def _history(state: AppState) -> StatsHistory:
    history: StatsHistory | None = state.console_history
    if history is None:
        history = state.console_history = StatsHistory()
    return history


@router.get(
    "/console/api/stats",
    summary="Live figures per model over a recent window (what the console at / shows)",
)
async def console_stats(
    state: StateDep,
    window: Annotated[float, Query(gt=0, le=120, description="Seconds to average over.")] = 10.0,
) -> dict[str, Any]:
    current = snapshot(state.metrics, sorted(state.models.models))
    return _history(state).stats(current, window)


# ---------------------------------------------------------------------- frontier


def frontier(
    data: CalibrationData, exit_macs: Sequence[int], *, budget: int = FRONTIER_BUDGET
) -> list[dict[str, Any]]:
    """Points of the accuracy-vs-cost Pareto frontier on ``data``, cheapest first.

    Candidate thresholds per early exit are the cuts between the samples' own entropies
    (thinned to fit ``budget`` settings); every combination is evaluated exactly, and
    a setting is kept when no cheaper one is as accurate.
    """
    early = data.num_exits - 1
    if early == 0:
        return [evaluate_thresholds(data, exit_macs, []).to_json()]
    per_exit = max(2, int(budget ** (1.0 / early)))
    cands = [candidate_thresholds(data.entropy[:, i], per_exit) for i in range(early)]
    acc, shares, cost = evaluate_grid(data, exit_macs, cands)
    acc, cost = acc.reshape(-1), cost.reshape(-1)
    shares = shares.reshape(-1, data.num_exits)
    # cheapest first, then most accurate; keep each strict accuracy improvement
    order = sorted(range(acc.numel()), key=lambda k: (float(cost[k]), -float(acc[k])))
    best, keep = -1.0, []
    for k in order:
        a = float(acc[k])
        if a > best + 1e-12:
            keep.append(k)
            best = a
    if len(keep) > FRONTIER_MAX_POINTS:
        pick = torch.linspace(0, len(keep) - 1, FRONTIER_MAX_POINTS).round().long().unique()
        keep = [keep[int(i)] for i in pick]
    sizes = [len(c) for c in cands]
    final = float(exit_macs[-1])
    points = []
    for k in keep:
        idx = _unravel(k, sizes)
        thresholds = [cands[i][j] for i, j in enumerate(idx)]
        points.append(
            {
                "thresholds": thresholds,
                "accuracy": float(acc[k]),
                "exit_shares": [float(s) for s in shares[k]],
                "expected_macs": float(cost[k]),
                "relative_cost": float(cost[k]) / final,
            }
        )
    return points


def _unravel(flat: int, sizes: Sequence[int]) -> list[int]:
    idx = []
    for size in reversed(sizes):
        idx.append(flat % size)
        flat //= size
    return idx[::-1]


@admin_router.get(
    "/models/{name}/frontier",
    summary="Accuracy-vs-cost frontier on the calibration data, and the point in force",
    responses={
        401: {"description": "Missing or wrong bearer token."},
        403: {"description": "Admin routes are off (no token configured)."},
        404: {"description": "Unknown model."},
        409: {"description": "No calibration data in the checkpoint."},
    },
)
async def model_frontier(model: ModelDep) -> dict[str, Any]:
    ckpt = model.checkpoint
    calibration = ckpt.calibration
    if calibration is None:
        raise NoCalibration(
            f"model {model.name!r} has no calibration data in its checkpoint: no frontier"
        )
    macs = ckpt.model.exit_macs()
    thresholds = model.thresholds

    def compute() -> tuple[list[dict[str, Any]], dict[str, object]]:
        current = evaluate_thresholds(calibration, macs, thresholds).to_json()
        return frontier(calibration, macs), current

    points, current = await asyncio.to_thread(compute)
    return {
        "model": model.name,
        "calibration_samples": calibration.num_samples,
        "thresholds": encode_thresholds(thresholds),
        "threshold_source": model.threshold_source,
        "current": current,
        "points": points,
    }


router.include_router(admin_router)
