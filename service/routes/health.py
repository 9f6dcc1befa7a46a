"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.deps import ManagerDep, MetricsDep, ReadyDep

router = APIRouter(tags=["health"])


# HEAD too (load balancers and probes use it; the server sends no body for HEAD), kept
# out of the OpenAPI document, where it would repeat the GET operation.
@router.head("/healthz", include_in_schema=False)
@router.get("/healthz", summary="Liveness: 200 as soon as the process serves")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.head("/readyz", include_in_schema=False)
@router.get(
    "/readyz",
    summary="Readiness: 200 once every model is loaded and warmed up, else 503",
    responses={503: {"description": "Still loading, a model failed to load, or shutting down."}},
    dependencies=[ReadyDep],
)
async def readyz(manager: ManagerDep) -> dict[str, object]:
    return {"status": "ready", "models": sorted(manager.models)}


@router.head("/metrics", include_in_schema=False)
@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    response_class=Response,
    responses={200: {"description": "Prometheus text format.", "content": {"text/plain": {}}}},
)
async def metrics(m: MetricsDep) -> Response:
    await m.gather()  # requests the HTTP front ends answered and have not reported yet
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)
