"""Typed dependencies: the long-lived objects on ``app.state``, reached per request.

All of them are ``async def`` although none awaits: FastAPI runs a plain ``def``
dependency in anyio's thread pool, a thread hop (and GIL hand-off) per dependency per
request on the hot path; these only read ``app.state`` and never block.
"""

from __future__ import annotations

import logging
import secrets
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import AdminDisabled, ModelNotFound, NotReady, Unauthorized
from service.metrics import Metrics
from service.repository import ServedModel
from service.settings import Settings

logger = logging.getLogger(__name__)

# Model names are folder names: a conservative pattern, checked before any lookup.
MODEL_NAME = Path(description="Model name (its checkpoint folder's name).", max_length=128)


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def get_model(request: Request, name: Annotated[str, MODEL_NAME]) -> ServedModel:
    """The loaded model called ``name``: looked up in the loaded set, never on disk."""
    served: dict[str, ServedModel] = request.app.state.models
    model = served.get(name)
    if model is not None:
        return model
    failed: dict[str, str] = getattr(request.app.state, "failed", {})
    if name in failed:
        raise NotReady(f"model {name!r} failed to load and is not served: {failed[name]}")
    if name in request.app.state.expected_models:
        raise NotReady(f"model {name!r} is still loading")
    known = ", ".join(sorted(served)) or "none loaded yet"
    raise ModelNotFound(f"no model named {name[:128]!r}; models: {known}")


_bearer = HTTPBearer(
    auto_error=False, description="The server's BRANCHY_ADMIN_TOKEN.", scheme_name="admin"
)


async def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Admin routes: a bearer token compared in constant time; off without a token."""
    settings: Settings = request.app.state.settings
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
AdminDep = Depends(require_admin)
