"""The model repository: finding checkpoints, loading them onto the device, and the
served model that couples a network, its thresholds and its batcher (whose lifecycle
:mod:`service.manager` owns)."""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models import Checkpoint, load_checkpoint
from models.checkpoint import MANIFEST
from models.exits import encode_thresholds
from service.batcher import Batcher, Engine
from service.metrics import Metrics
from service.settings import Settings

logger = logging.getLogger(__name__)


def discover(settings: Settings) -> dict[str, Path]:
    """Model name -> checkpoint folder, for every folder of the repository holding a
    manifest (or only those named in ``settings.models``).

    Raises:
        ValueError: no checkpoint found, or a requested model is not in the repository.
    """
    root = settings.model_repository
    found = {
        p.name: p
        for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()
    }
    if settings.models:
        missing = [m for m in settings.models if m not in found]
        if missing:
            raise ValueError(
                f"model(s) {missing} requested by BRANCHY_MODELS are not in the repository "
                f"{str(root)!r} (it holds: {', '.join(found) or 'nothing'})"
            )
        found = {m: found[m] for m in settings.models}
    if not found:
        raise ValueError(
            f"the model repository {str(root)!r} holds no checkpoint folder "
            f"(a folder with {MANIFEST})"
        )
    return found


def check_runtime_models(settings: Settings, served: Iterable[str]) -> None:
    """Start-up check: every model ``BRANCHY_RUNTIME`` names is served (a typo would
    otherwise leave that model on the default runtime, silently).

    Raises:
        ValueError: naming the models that are not served.
    """
    served = list(served)
    unserved = [m for m in settings.runtime_models() if m not in served]
    if unserved:
        raise ValueError(
            f"model(s) {unserved} named by BRANCHY_RUNTIME are not served (served: "
            f"{', '.join(served) or 'nothing'})"
        )


def load_engine(path: Path, device: torch.device, settings: Settings) -> Engine:
    """Load a checkpoint onto ``device`` and warm it up (blocking; run it in a thread).

    Raises:
        models.CheckpointError: missing or damaged checkpoint.
    """
    start = time.perf_counter()
    checkpoint = load_checkpoint(path, device="cpu")
    checkpoint.model.exit_macs()  # counted (and cached) on the CPU in float32
    engine = Engine(checkpoint, device, **settings.engine_options(path.name))
    engine.warm_up(sorted({1, settings.max_batch_size})[: settings.warmup_batches])
    logger.info(
        "loaded %s (%s, %d exits) on %s, runtime %s %s, in %.2f s",
        path,
        checkpoint.model.name,
        checkpoint.model.num_exits,
        device,
        engine.runtime,
        engine.precision,
        time.perf_counter() - start,
    )
    return engine


# What may not reach a client: absolute paths (two components or more, so that route
# paths such as "/v1" in a message survive), and memory addresses in object reprs.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/'\"<>:,;()\[\]]+/)+[^\s/'\"<>:,;()\[\]]*")
_ADDRESS = re.compile(r"\s*at 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{6,}")


def public_load_error(exc: BaseException, path: Path, name: str) -> str:
    """Why a model could not be loaded, in words a client may read: the checkpoint
    folder is named by its model name, and no other path or memory address remains.

    Args:
        exc: what ``load_engine`` raised.
        path: the model's checkpoint folder.
        name: the model's name.
    """
    text = str(exc).strip() or type(exc).__name__
    for form in {str(path), str(path.resolve())}:
        text = text.replace(form, name)
    text = _ABSOLUTE_PATH.sub(lambda m: m.group().rstrip("/").rsplit("/", 1)[-1], text)
    return _ADDRESS.sub("", text)[:500]


# Engine generations: every load and reload of any model takes the next one, so that an
# HTTP front end can tell whether what it decoded an image for is still what serves.
_GENERATIONS = itertools.count(1)


@dataclass(frozen=True)
class _Current:
    engine: Engine
    thresholds: tuple[float, ...]


class ServedModel:
    """A model being served: its engine and thresholds (swapped together atomically),
    where its thresholds came from, and its batcher, made with it (not yet started).

    Its state changes only through :class:`service.manager.ModelManager`.

    Args:
        name: model name (its checkpoint folder's name).
        path: checkpoint folder.
        engine: the loaded network.
        thresholds: thresholds in force.
        source: where they came from: ``checkpoint``, ``state``, ``admin`` or ``autotune``.
        metrics: where the batcher records queue, batch and exit metrics.
        settings: the batching settings (batch size and delay, queue, early release).
    """

    def __init__(
        self,
        name: str,
        path: Path,
        engine: Engine,
        thresholds: tuple[float, ...],
        *,
        source: str,
        metrics: Metrics,
        settings: Settings,
    ) -> None:
        self.name = name
        self.path = path
        self._current = _Current(engine, thresholds)
        self.threshold_source = source
        self.thresholds_updated_at = time.time()
        self.state_mtime_ns: int | None = None
        self.loaded_at = time.time()
        self.generation = next(_GENERATIONS)
        self.batcher = Batcher(name, self, metrics, **settings.batcher_options())

    def snapshot(self) -> tuple[Engine, tuple[float, ...]]:
        current = self._current  # one reference read: engine and thresholds agree
        return current.engine, current.thresholds

    @property
    def engine(self) -> Engine:
        return self._current.engine

    @property
    def thresholds(self) -> tuple[float, ...]:
        return self._current.thresholds

    @property
    def checkpoint(self) -> Checkpoint:
        return self._current.engine.checkpoint

    @property
    def num_exits(self) -> int:
        return self._current.engine.num_exits

    def set_thresholds(self, thresholds: tuple[float, ...], *, source: str) -> None:
        assert len(thresholds) == self.num_exits - 1
        self._current = _Current(self._current.engine, thresholds)
        self.threshold_source = source
        self.thresholds_updated_at = time.time()

    def replace(self, engine: Engine, thresholds: tuple[float, ...], *, source: str) -> None:
        self._current = _Current(engine, thresholds)
        self.threshold_source = source
        self.thresholds_updated_at = time.time()
        self.loaded_at = time.time()
        self.generation = next(_GENERATIONS)

    def describe(self, *, history: bool = False) -> dict[str, Any]:
        """JSON-able description for ``GET /v1/models/{name}``.

        Args:
            history: keep the checkpoint's per-epoch training history in ``metrics``
                (the admin view); a client of ``/v1`` has no use for it.
        """
        engine, thresholds = self.snapshot()
        ckpt = engine.checkpoint
        metrics = dict(ckpt.metrics)
        if not history:
            metrics.pop("history", None)
        return {
            "name": self.name,
            "architecture": ckpt.model.name,
            "num_exits": engine.num_exits,
            "thresholds": encode_thresholds(thresholds),
            "threshold_source": self.threshold_source,
            "classes": list(ckpt.class_names),
            "input": ckpt.input_spec.to_json(),
            "device": str(engine.device),
            "runtime": engine.runtime,
            "precision": engine.precision,
            "runtime_reason": engine.reason,
            "half_precision": engine.half,
            "exit_macs": ckpt.model.exit_macs(),
            "has_calibration": ckpt.calibration is not None,
            "metrics": metrics,
        }
