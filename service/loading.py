"""Bringing a checkpoint folder into service, and keeping failures to do so visible.

Used at start-up for every folder of the repository and by the admin ``load`` route for
a folder added or repaired after start. A model that failed to load is kept in
``app.state.failed`` (name -> why, in words without paths) until a later load succeeds:
``/readyz`` answers 503 naming it, ``/v1/models`` lists it, ``branchy_model_load_failed``
is 1 for it, and the log holds the full error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from service import autotune, shadow
from service.batcher import Batcher, Engine
from service.metrics import Metrics
from service.repository import ServedModel, load_engine, public_load_error
from service.settings import Settings
from service.state import load_thresholds

logger = logging.getLogger(__name__)


async def start_model(
    app: FastAPI,
    name: str,
    path: Path,
    device: Any,
    *,
    loader: Callable[[Path, Any, Settings], Engine] = load_engine,
) -> ServedModel:
    """Load ``path`` onto ``device``, restore its saved thresholds, start its batcher and
    serve it as ``name``; a failure is recorded (see the module docstring) and re-raised.

    Args:
        app: the application (its ``state`` gains the model or the failure).
        name: the model's name.
        path: its checkpoint folder.
        device: where to run it.
        loader: what loads the checkpoint (``service.app`` passes its ``load_engine``,
            the seam tests wrap to hold loading).

    Raises:
        Exception: whatever loading the checkpoint raised.
    """
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    try:
        engine = await asyncio.to_thread(loader, path, device, settings)
    except Exception as exc:
        app.state.failed[name] = public_load_error(exc, path, name)
        metrics.set_load_failed(name, True)
        logger.error("cannot load model %r from %s (not served): %s", name, path, exc)
        raise
    thresholds = tuple(engine.checkpoint.thresholds)
    source = "checkpoint"
    saved = await asyncio.to_thread(load_thresholds, settings.state_dir, name, engine.num_exits)
    if saved is not None:
        thresholds, source = saved.thresholds, saved.source or "state"
        logger.info(
            "model %r: thresholds %s restored from the state folder", name, list(thresholds)
        )
    served = ServedModel(name, path, engine, thresholds, source=source)
    served.state_mtime_ns = saved.mtime_ns if saved else None
    served.batcher = Batcher(
        name,
        served,
        metrics,
        max_batch_size=settings.max_batch_size,
        max_delay_s=settings.max_batch_delay_s,
        max_queue=settings.max_queue,
        early_release=settings.early_release,
    )
    served.batcher.start()
    shadow.attach(app, served)
    autotune.tuner(app).register(served, saved)
    ckpt = engine.checkpoint
    metrics.init_model(name, engine.num_exits)
    metrics.set_thresholds(name, thresholds)
    metrics.set_model_info(
        name,
        device=str(device),
        architecture=ckpt.model.name,
        exits=engine.num_exits,
        runtime=engine.runtime,
        precision=engine.precision,
    )
    app.state.admin_locks.setdefault(name, asyncio.Lock())
    app.state.models[name] = served
    app.state.failed.pop(name, None)
    metrics.set_load_failed(name, False)
    return served


def not_ready_reason(app: FastAPI) -> str | None:
    """Why ``/readyz`` is 503 (None when ready): still loading, or models that failed."""
    if not app.state.ready:
        return "models are still loading"
    failed: dict[str, str] = app.state.failed
    if failed:
        names = ", ".join(sorted(failed))
        return (
            f"model(s) failed to load and are not served: {names} (see GET /v1/models; "
            "after fixing the folder: POST /admin/models/<name>/load)"
        )
    return None
