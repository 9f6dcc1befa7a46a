"""Admin API behind a bearer token: read, set and reset thresholds, reload a checkpoint,
load a checkpoint folder added or repaired after start.

Bodies are read as JSON whatever their declared ``Content-Type`` (``curl -d`` sends
``application/x-www-form-urlencoded``), parsed with bounds (``service.jsonbody``) and
validated with strict types: ``true`` is not a number, nor is ``"0.5"``. A new body kind
is a new field of ``ThresholdUpdate`` (or a new schema read with :func:`read_body`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError

from models import choose_thresholds, evaluate_thresholds
from models.exits import check_thresholds, encode_thresholds
from service import autotune
from service.deps import MODEL_NAME, AdminDep, ManagerDep, ModelDep
from service.errors import BadRequest, NoCalibration, ValidationFailed
from service.fidelity import certify_for, wants_certificate
from service.jsonbody import JsonLimits, parse_json
from service.repository import ServedModel
from service.schemas import (
    AdminModelDetail,
    Expected,
    ReloadResponse,
    ThresholdState,
    ThresholdUpdate,
)

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])

# Admin bodies are small objects: a few fields, a list of one value per early exit.
ADMIN_JSON = JsonLimits(max_depth=8, max_number_chars=40, max_values=10_000)
_Body = TypeVar("_Body", bound=BaseModel)


async def read_body(request: Request, schema: type[_Body]) -> _Body:
    """The request's JSON body (any declared content type) validated as ``schema``.

    Raises:
        ValidationFailed: empty, not JSON, over the bounds of ``ADMIN_JSON``, or JSON
            that ``schema`` does not accept (422, saying what to send).
    """
    raw = await request.body()
    hint = 'send a JSON object, e.g. {"thresholds": [0.05, 1.0]} (any Content-Type)'
    if not raw.strip():
        raise ValidationFailed(f"the request body is empty; {hint}")
    try:
        data = parse_json(raw, ADMIN_JSON)
    except BadRequest as exc:
        raise ValidationFailed(f"{exc.message}; {hint}") from None
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise ValidationFailed(f"invalid request body: {errors}") from None


def _body_doc(schema: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema.model_json_schema()}},
        }
    }


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or wrong bearer token."},
    403: {"description": "Admin routes are off (no token configured)."},
    404: {"description": "Unknown model."},
}


@router.get("/models/{name}/thresholds", summary="Thresholds in force", responses=_ERRORS)
async def get_thresholds(model: ModelDep) -> ThresholdState:
    return _state(model, await asyncio.to_thread(_expected, model, model.thresholds))


@router.get(
    "/models/{name}",
    summary="A model as /v1 describes it, with the checkpoint's training history",
    responses=_ERRORS,
)
async def describe_model(model: ModelDep) -> AdminModelDetail:
    return AdminModelDetail(**model.describe(history=True), loaded_at=model.loaded_at)


@router.put(
    "/models/{name}/thresholds",
    summary="Set thresholds explicitly, or choose them for an accuracy tolerance/target "
    "or a certified risk budget",
    responses={
        **_ERRORS,
        409: {
            "description": "No calibration data in the checkpoint (tolerance/target), or "
            "nothing can be certified for max_disagreement/max_accuracy_drop."
        },
        422: {"description": "Not JSON, over the JSON bounds, invalid values, unreachable target."},
    },
    openapi_extra=_body_doc(ThresholdUpdate),
)
async def put_thresholds(request: Request, model: ModelDep, manager: ManagerDep) -> ThresholdState:
    body = await read_body(request, ThresholdUpdate)
    certificate = None
    async with manager.lock(model.name):
        if body.thresholds is not None:
            try:
                new = check_thresholds(body.thresholds, model.num_exits)
            except ValueError as exc:
                raise ValidationFailed(f"invalid thresholds: {exc}") from None
            how = "explicit"
        elif wants_certificate(body):
            new, certificate = await asyncio.to_thread(certify_for, model, body)
            how = f"certified {certificate.risk} <= {certificate.epsilon:g}"
        else:
            new, how = await asyncio.to_thread(_choose, model, body.tolerance, body.target)
        old = model.thresholds
        # Persisted first: if the disk write fails, nothing changes and the client learns it.
        await manager.apply_thresholds(model, new, source="admin", autotune=False)
        await autotune.tuner(request.app).pin(request.app, model)  # explicit: pinned
        logger.info(
            "model %r: thresholds %s -> %s (admin, %s)", model.name, list(old), list(new), how
        )
        state = _state(model, await asyncio.to_thread(_expected, model, new))
        state.certificate = certificate
        return state


@router.delete(
    "/models/{name}/thresholds",
    summary="Go back to the checkpoint's own thresholds (forgets the saved ones)",
    responses=_ERRORS,
)
async def reset_thresholds(model: ModelDep, manager: ManagerDep) -> ThresholdState:
    old = await manager.reset_thresholds(model)
    own = tuple(model.checkpoint.thresholds)
    logger.info(
        "model %r: thresholds %s -> %s (admin: back to the checkpoint's)",
        model.name,
        list(old),
        list(own),
    )
    return _state(model, await asyncio.to_thread(_expected, model, own))


_LOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    404: {"description": "No checkpoint folder of that name in the model repository."},
    409: {"description": "Already served, or the checkpoint cannot be loaded."},
}


@router.post(
    "/models/{name}/load",
    summary="Load a checkpoint folder added or repaired after start",
    responses=_LOAD_ERRORS,
)
async def load_model(name: Annotated[str, MODEL_NAME], manager: ManagerDep) -> ReloadResponse:
    start = time.perf_counter()
    return _reloaded(await manager.load_new(name), start)


@router.post(
    "/models/{name}/reload",
    summary="Reload the model's checkpoint from disk; on failure the old model keeps serving",
    responses={**_ERRORS, 409: {"description": "Missing or damaged checkpoint; nothing changed."}},
)
async def reload_model(name: Annotated[str, MODEL_NAME], manager: ManagerDep) -> ReloadResponse:
    start = time.perf_counter()
    return _reloaded(await manager.reload(name), start)


def _reloaded(model: ServedModel, start: float) -> ReloadResponse:
    return ReloadResponse(
        model=model.name,
        architecture=model.checkpoint.model.name,
        num_exits=model.num_exits,
        thresholds=encode_thresholds(model.thresholds),
        threshold_source=model.threshold_source,
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
