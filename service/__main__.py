"""``python -m service`` / ``branchy-serve``: read settings, start uvicorn."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

import torch
import uvicorn
from pydantic import ValidationError

from models.devices import resolve_device
from service import workers
from service.app import create_app
from service.repository import check_runtime_models, discover
from service.settings import Settings

logger = logging.getLogger("service")


def load_settings() -> Settings:
    """Settings from the environment; invalid ones end the process with a clear message."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = [
            f"  BRANCHY_{'_'.join(str(p) for p in e['loc']).upper() or '(settings)'}: {e['msg']}"
            for e in exc.errors()
        ]
        logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
        logger.error("invalid settings, not starting:\n%s", "\n".join(lines))
        sys.exit(2)


def check_environment(settings: Settings) -> None:
    """Settings that are valid on their own but not on this machine (``cuda`` without a
    GPU, a repository without checkpoints, a ``BRANCHY_MODELS`` entry not in it) end the
    process with status 2 and one message, like an invalid setting, not a traceback."""
    try:
        resolve_device(settings.device)
    except ValueError as exc:
        _fail(f"  BRANCHY_DEVICE: {exc} (use BRANCHY_DEVICE=auto or cpu on this machine)")
    try:
        check_runtime_models(settings, discover(settings))
    except (ValueError, OSError) as exc:
        _fail(f"  BRANCHY_MODEL_REPOSITORY / BRANCHY_MODELS / BRANCHY_RUNTIME: {exc}")


def _fail(line: str) -> None:
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    logger.error("invalid settings, not starting:\n%s", line)
    sys.exit(2)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main() -> None:
    """Start the server with settings from ``BRANCHY_*`` environment variables."""
    # Uvicorn handles SIGTERM itself (graceful drain) and afterwards re-raises it to the
    # handler that was installed before it. A drained SIGTERM is an orderly stop that an
    # orchestrator asked for, so that handler ends the process with status 0.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    settings = load_settings()
    check_environment(settings)
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)  # process-wide, hence here
    if settings.http_workers:
        workers.serve(settings)  # HTTP front-end processes feeding this one
        return
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        **settings.uvicorn_options(),
    )


if __name__ == "__main__":
    main()
