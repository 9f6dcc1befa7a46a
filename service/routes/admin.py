"""Admin API behind a bearer token: read and set thresholds, reload a checkpoint."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import APIRouter, Request

from models import choose_thresholds, evaluate_thresholds
from service import autotune
from service.deps import AdminDep, ModelDep, SettingsDep
from service.errors import NoCalibration, ReloadFailed, ValidationFailed
from service.fidelity import certify_for, wants_certificate
from service.inference import encode_thresholds
from service.repository import ServedModel, load_engine
from service.schemas import Expected, ReloadResponse, ThresholdState, ThresholdUpdate
from service.state import check_thresholds, load_thresholds, save_thresholds

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or wrong bearer token."},
    403: {"description": "Admin routes are off (no token configured)."},
    404: {"description": "Unknown model."},
}


@router.get("/models/{name}/thresholds", summary="Thresholds in force", responses=_ERRORS)
async def get_thresholds(model: ModelDep) -> ThresholdState:
    return _state(model, await asyncio.to_thread(_expected, model, model.thresholds))


@router.put(
    "/models/{name}/thresholds",
    summary="Set thresholds explicitly, or choose them for an accuracy tolerance/target "
    "or a certified risk budget",
    responses={
        **_ERRORS,
        400: {"description": "A body that cannot be parsed (e.g. a malformed form body)."},
        409: {
            "description": "No calibration data in the checkpoint (tolerance/target), or "
            "nothing can be certified for max_disagreement/max_accuracy_drop."
        },
        422: {"description": "Invalid thresholds or unreachable target."},
    },
)
async def put_thresholds(
    request: Request, model: ModelDep, settings: SettingsDep, body: ThresholdUpdate
) -> ThresholdState:
    certificate = None
    async with request.app.state.admin_locks[model.name]:
        if body.thresholds is not None:
            try:
                new = check_thresholds(body.thresholds, model.num_exits, allow_inf=False)
            except ValueError as exc:
                raise ValidationFailed(f"invalid thresholds: {exc}") from None
            how = "explicit"
        elif wants_certificate(body):
            new, certificate = await asyncio.to_thread(certify_for, model, body)
            how = f"certified {certificate.risk} <= {certificate.epsilon:g}"
        else:
            new, how = await asyncio.to_thread(_choose, model, body.tolerance, body.target)
        old = model.thresholds
        # Persist first: if the disk write fails, nothing changes and the client learns it.
        mtime = await asyncio.to_thread(
            save_thresholds, settings.state_dir, model.name, new, source="admin", autotune=False
        )
        model.state_mtime_ns = mtime
        model.set_thresholds(new, source="admin")
        await autotune.tuner(request.app).pin(request.app, model)  # explicit: pinned
        request.app.state.metrics.set_thresholds(model.name, new)
        logger.info(
            "model %r: thresholds %s -> %s (admin, %s)", model.name, list(old), list(new), how
        )
        state = _state(model, await asyncio.to_thread(_expected, model, new))
        state.certificate = certificate
        return state


@router.post(
    "/models/{name}/reload",
    summary="Reload the model's checkpoint from disk; on failure the old model keeps serving",
    responses={**_ERRORS, 409: {"description": "Missing or damaged checkpoint; nothing changed."}},
)
async def reload_model(request: Request, model: ModelDep, settings: SettingsDep) -> ReloadResponse:
    start = time.perf_counter()
    async with request.app.state.admin_locks[model.name]:
        try:
            engine = await asyncio.to_thread(
                load_engine, model.path, request.app.state.device, settings
            )
        except Exception as exc:  # any failure leaves the old model in place
            logger.error(
                "model %r: reload from %s failed, old model keeps serving: %s",
                model.name,
                model.path,
                exc,
            )
            raise ReloadFailed(
                f"reload of model {model.name!r} failed; the previous version keeps serving: {exc}"
            ) from None
        saved = await asyncio.to_thread(
            load_thresholds, settings.state_dir, model.name, engine.num_exits
        )
        if saved is not None:
            thresholds, source = saved.thresholds, "state"
        else:
            thresholds, source = tuple(engine.checkpoint.thresholds), "checkpoint"
        model.replace(engine, thresholds, source=source)
        metrics = request.app.state.metrics
        metrics.init_model(model.name, engine.num_exits)
        metrics.set_thresholds(model.name, thresholds)
        metrics.set_model_info(
            model.name,
            device=str(engine.device),
            architecture=engine.checkpoint.model.name,
            exits=engine.num_exits,
        )
        logger.info(
            "model %r reloaded from %s (thresholds %s from %s)",
            model.name,
            model.path,
            list(thresholds),
            source,
        )
    return ReloadResponse(
        model=model.name,
        architecture=engine.checkpoint.model.name,
        num_exits=engine.num_exits,
        thresholds=encode_thresholds(thresholds),
        threshold_source=source,
        seconds=time.perf_counter() - start,
    )


def _choose(
    model: ServedModel, tolerance: float | None, target: float | None
) -> tuple[tuple[float, ...], str]:
    ckpt = model.checkpoint
    if ckpt.calibration is None:
        raise NoCalibration(
            f"model {model.name!r} has no calibration data in its checkpoint; "
            "set explicit thresholds instead"
        )
    try:
        point = choose_thresholds(
            ckpt.calibration, ckpt.model.exit_macs(), tolerance=tolerance, target=target
        )
    except ValueError as exc:
        raise ValidationFailed(str(exc)) from None
    how = f"tolerance {tolerance}" if target is None else f"target {target}"
    return point.thresholds, how


def _expected(model: ServedModel, thresholds: tuple[float, ...]) -> Expected | None:
    ckpt = model.checkpoint
    if ckpt.calibration is None:
        return None
    point = evaluate_thresholds(ckpt.calibration, ckpt.model.exit_macs(), thresholds)
    return Expected(
        accuracy=point.accuracy,
        exit_shares=list(point.exit_shares),
        expected_macs=point.expected_macs,
        relative_cost=point.relative_cost,
        calibration_samples=ckpt.calibration.num_samples,
    )


def _state(model: ServedModel, expected: Expected | None) -> ThresholdState:
    return ThresholdState(
        model=model.name,
        thresholds=encode_thresholds(model.thresholds),
        source=model.threshold_source,
        updated_at=model.thresholds_updated_at,
        expected=expected,
    )
