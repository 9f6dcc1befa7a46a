"""The application's typed state and the dependencies through which routes reach it.

``create_app`` puts one :class:`AppState` on ``app.state.service``; a route asks for
what it needs (``SettingsDep``, ``MetricsDep``, ``ManagerDep``, ``ModelDep``,
``ReadyDep``, ``AdminDep``) and never reads ``app.state`` itself. The dependencies are
cheap (attribute reads), so they may run on every request. All of them are ``async
def`` although none awaits: FastAPI runs a plain ``def`` dependency in anyio's thread
pool, a thread hop (and GIL hand-off) per dependency per request on the hot path.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import AdminDisabled, NotReady, Unauthorized
from service.manager import ModelManager
from service.metrics import Metrics
from service.repository import ServedModel
from service.settings import Settings

logger = logging.getLogger(__name__)

# Model names are folder names: a conservative pattern, checked before any lookup.
MODEL_NAME = Path(description="Model name (its checkpoint folder's name).", max_length=128)


@dataclass
class AppState:
    """Everything long-lived that a request may reach.

    Attributes:
        settings: the server settings.
        metrics: the app's metrics (created with the app, so ``/metrics`` and
            ``/healthz`` answer while models load).
        models: the owner of every model's lifecycle.
        console_history: the web console's recent snapshots
            (``service.routes.console.StatsHistory``), made on first use.
        autotuner: the auto-tuner (``service.autotune.AutoTuner``), made on first use.
    """

    settings: Settings
    metrics: Metrics
    models: ModelManager
    console_history: Any = None
    autotuner: Any = None


def app_state(app: FastAPI) -> AppState:
    """The :class:`AppState` of an app made by ``service.app.create_app``."""
    state: AppState = app.state.service
    return state


async def get_state(request: Request) -> AppState:
    return app_state(request.app)


async def get_settings(request: Request) -> Settings:
    return app_state(request.app).settings


async def get_metrics(request: Request) -> Metrics:
    return app_state(request.app).metrics


async def get_manager(request: Request) -> ModelManager:
    return app_state(request.app).models


async def get_model(request: Request, name: Annotated[str, MODEL_NAME]) -> ServedModel:
    """The loaded model called ``name`` (:meth:`ModelManager.get`: 503 while it loads
    or after it failed to, 404 when there is none)."""
    return app_state(request.app).models.get(name)


async def require_ready(request: Request) -> None:
    """Readiness routes (``/readyz``, ``/v2/health/ready``): 503 saying why, until
    every model is loaded and while any failed to."""
    reason = app_state(request.app).models.not_ready_reason()
    if reason is not None:
        raise NotReady(reason)


_bearer = HTTPBearer(
    auto_error=False, description="The server's BRANCHY_ADMIN_TOKEN.", scheme_name="admin"
)


async def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Admin routes: a bearer token compared in constant time; off without a token."""
    settings = app_state(request.app).settings
    if settings.admin_token is None:
        raise AdminDisabled("admin routes are off: the server has no BRANCHY_ADMIN_TOKEN")
    given = credentials.credentials.encode() if credentials is not None else b""
    expected = settings.admin_token.get_secret_value().encode()
    # compare_digest on bytes: constant time whatever the length or characters sent.
    if credentials is None or not secrets.compare_digest(given, expected):
        # Never log the header: a near-miss token is still a secret.
        logger.warning(
            "admin request %s %s refused: %s",
            request.method,
            request.url.path,
            "missing token" if credentials is None else "wrong token",
        )
        raise Unauthorized("admin routes need 'Authorization: Bearer <token>' with the right token")


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ModelDep = Annotated[ServedModel, Depends(get_model)]
ManagerDep = Annotated[ModelManager, Depends(get_manager)]
StateDep = Annotated[AppState, Depends(get_state)]
ReadyDep = Depends(require_ready)
AdminDep = Depends(require_admin)
