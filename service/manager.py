"""The one owner of every served model's lifecycle: :class:`ModelManager`.

Load (at start-up, and a folder added or repaired later), threshold changes, their
persistence in the state folder and the pick-up of another replica's changes, reload,
models that failed to load, the per-model metrics that follow from all of these, and
stopping. Routes and the lifespan call it; nothing else changes a model's state.

A model that failed to load stays in :attr:`ModelManager.failed` (name -> why, in words
without paths) until a later load succeeds: ``/readyz`` answers 503 naming it,
``/v1/models`` lists it, ``branchy_model_load_failed`` is 1 for it, and the log holds the
full error.

Changes to one model are serialised by its lock (:meth:`ModelManager.lock`): the admin
routes, the state-folder poller and the auto-tuner take it, so a threshold change and a
reload never interleave.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from models.devices import resolve_device
from service.batcher import Engine
from service.errors import Conflict, ModelNotFound, NotReady, ReloadFailed
from service.metrics import Metrics
from service.repository import (
    ServedModel,
    check_runtime_models,
    discover,
    load_engine,
    public_load_error,
)
from service.settings import Settings
from service.state import (
    SavedThresholds,
    clean_stale_temporaries,
    delete_thresholds,
    file_mtime_ns,
    load_thresholds,
    save_thresholds,
)

logger = logging.getLogger(__name__)

Loader = Callable[[Path, torch.device, Settings], Engine]
# Called with a model just brought into service and its saved state (or None), and with
# a model whose state file another replica changed: the shadow monitor and the
# auto-tuner hook in here (service.app), so the manager imports neither.
StartHook = Callable[[ServedModel, SavedThresholds | None], object]
FollowHook = Callable[[ServedModel, SavedThresholds], object]


class ModelManager:
    """Every model of the repository: served, failed or still loading.

    Args:
        settings: the server settings (repository, device, state folder, batching).
        metrics: where the per-model series live.
        loader: what loads a checkpoint folder onto the device (blocking; run in a
            thread). ``service.app`` passes one that looks ``load_engine`` up at call
            time: the seam tests wrap to hold loading.
    """

    def __init__(self, settings: Settings, metrics: Metrics, *, loader: Loader = load_engine):
        self.settings = settings
        self.metrics = metrics
        self.loader = loader
        self.device = torch.device("cpu")  # resolved by start()
        self.models: dict[str, ServedModel] = {}
        self.failed: dict[str, str] = {}
        self.expected: set[str] = set()
        self.locks: dict[str, asyncio.Lock] = {}
        self.ready = False  # True once the start-up loading is over
        self.on_start: list[StartHook] = []
        self.on_follow: list[FollowHook] = []

    # ------------------------------------------------------------------ lookups

    def lock(self, name: str) -> asyncio.Lock:
        """The lock that serialises changes to model ``name``."""
        return self.locks.setdefault(name, asyncio.Lock())

    def get(self, name: str) -> ServedModel:
        """The loaded model called ``name``: looked up in the loaded set, never on disk.

        Raises:
            NotReady: it failed to load, or is still loading.
            ModelNotFound: no such model.
        """
        model = self.models.get(name)
        if model is not None:
            return model
        if name in self.failed:
            raise NotReady(f"model {name!r} failed to load and is not served: {self.failed[name]}")
        if name in self.expected:
            raise NotReady(f"model {name!r} is still loading")
        raise ModelNotFound(f"no model named {name[:128]!r}; models: {self._known()}")

    def not_ready_reason(self) -> str | None:
        """Why ``/readyz`` is 503 (None when ready): still loading, or models that failed."""
        if not self.ready:
            return "models are still loading"
        if self.failed:
            names = ", ".join(sorted(self.failed))
            return (
                f"model(s) failed to load and are not served: {names} (see GET /v1/models; "
                "after fixing the folder: POST /admin/models/<name>/load)"
            )
        return None

    def _known(self) -> str:
        return ", ".join(sorted(self.models)) or "none loaded yet"

    # ------------------------------------------------------------------ start and stop

    async def start(self) -> dict[str, Path]:
        """Find the repository's checkpoint folders and the device (start-up fails
        clearly on an empty repository or a device this machine lacks), and remove the
        temporaries a killed writer left in the state folder.

        Returns:
            Model name -> checkpoint folder, to hand to :meth:`load_all`.
        """
        paths = discover(self.settings)
        check_runtime_models(self.settings, paths)
        self.device = resolve_device(self.settings.device)
        self.expected.update(paths)
        for name in paths:
            self.lock(name)
        await asyncio.to_thread(clean_stale_temporaries, self.settings.state_dir)
        logger.info(
            "serving %d model(s) from %s on %s: %s",
            len(paths),
            self.settings.model_repository,
            self.device,
            ", ".join(paths),
        )
        return paths

    async def load_all(self, paths: dict[str, Path]) -> None:
        """Load every folder; one bad checkpoint does not stop the others (it is
        recorded in :attr:`failed`). Ready afterwards, whatever failed."""
        for name, path in paths.items():
            try:
                await self.load(name, path)
            except Exception:  # recorded by load
                continue
        self.ready = True  # loading is over; /readyz still names any failed model
        if self.failed:
            logger.error(
                "not ready: model(s) %s failed to load (fix the folder, then POST "
                "/admin/models/<name>/load)",
                ", ".join(sorted(self.failed)),
            )
        else:
            logger.info("ready: %s", ", ".join(self.models))

    async def stop(self) -> None:
        """Not ready any more; every batcher finishes what is queued, then stops."""
        self.ready = False
        for model in self.models.values():
            await model.batcher.stop()

    # ------------------------------------------------------------------ loading

    async def load(self, name: str, path: Path) -> ServedModel:
        """Load ``path``, restore its saved thresholds, start its batcher and serve it as
        ``name``; a failure is recorded (see the module docstring) and re-raised.

        Raises:
            Exception: whatever loading the checkpoint raised.
        """
        try:
            engine = await asyncio.to_thread(self.loader, path, self.device, self.settings)
        except Exception as exc:
            self.failed[name] = public_load_error(exc, path, name)
            self.metrics.set_load_failed(name, True)
            logger.error("cannot load model %r from %s (not served): %s", name, path, exc)
            raise
        saved = await self._saved(name, engine.num_exits)
        thresholds, source = tuple(engine.checkpoint.thresholds), "checkpoint"
        if saved is not None:
            thresholds, source = saved.thresholds, saved.source or "state"
            logger.info(
                "model %r: thresholds %s restored from the state folder", name, list(thresholds)
            )
        served = ServedModel(
            name,
            path,
            engine,
            thresholds,
            source=source,
            metrics=self.metrics,
            settings=self.settings,
        )
        served.state_mtime_ns = saved.mtime_ns if saved else None
        served.batcher.start()
        for hook in self.on_start:
            hook(served, saved)
        self._export(served, device=str(self.device))
        self.lock(name)
        self.models[name] = served
        self.failed.pop(name, None)
        self.metrics.set_load_failed(name, False)
        return served

    async def load_new(self, name: str) -> ServedModel:
        """Load a checkpoint folder added or repaired after start (admin ``load``).

        Raises:
            Conflict: already served.
            ModelNotFound: the repository has no folder of that name.
            ReloadFailed: the checkpoint cannot be loaded (recorded in :attr:`failed`).
        """
        if name in self.models:
            raise Conflict(f"model {name!r} is already served; POST .../reload to re-read it")
        path = (await asyncio.to_thread(self._repository)).get(name)
        if path is None:
            within = " among BRANCHY_MODELS" if self.settings.models else ""
            raise ModelNotFound(
                f"the model repository has no checkpoint folder named {name[:128]!r}{within}"
            )
        async with self.lock(name):
            if name in self.models:
                raise Conflict(f"model {name!r} is already served; POST .../reload to re-read it")
            self.expected.add(name)
            try:
                model = await self.load(name, path)
            except Exception:  # recorded by load: /readyz and /v1/models show it
                raise ReloadFailed(
                    f"loading model {name!r} failed: {self.failed.get(name, 'see the log')}"
                ) from None
        logger.info("model %r loaded (admin)", name)
        return model

    async def reload(self, name: str) -> ServedModel:
        """Re-read a served model's checkpoint from disk and swap it in (with the saved
        thresholds, else the new checkpoint's); a model that failed to load is loaded
        for the first time. On failure the old model keeps serving.

        Raises:
            ModelNotFound: no such model.
            ReloadFailed: the checkpoint cannot be loaded; nothing changed.
        """
        model = self.models.get(name)
        if model is None:
            if name in self.failed:  # repaired since: load it for the first time
                return await self.load_new(name)
            raise ModelNotFound(f"no model named {name[:128]!r}; models: {self._known()}")
        async with self.lock(model.name):
            try:
                engine = await asyncio.to_thread(
                    self.loader, model.path, self.device, self.settings
                )
            except Exception as exc:  # any failure leaves the old model in place
                logger.error(
                    "model %r: reload from %s failed, old model keeps serving: %s",
                    model.name,
                    model.path,
                    exc,
                )
                why = public_load_error(exc, model.path, model.name)
                raise ReloadFailed(
                    f"reload of model {model.name!r} failed; the previous version keeps "
                    f"serving: {why}"
                ) from None
            saved = await self._saved(model.name, engine.num_exits)
            if saved is not None:
                thresholds, source = saved.thresholds, "state"
            else:
                thresholds, source = tuple(engine.checkpoint.thresholds), "checkpoint"
            model.replace(engine, thresholds, source=source)
            self._export(model, device=str(engine.device))
            logger.info(
                "model %r reloaded from %s (thresholds %s from %s)",
                model.name,
                model.path,
                list(thresholds),
                source,
            )
        return model

    def _repository(self) -> dict[str, Path]:
        try:
            return dict(discover(self.settings))
        except ValueError:  # an empty repository, or a BRANCHY_MODELS folder gone
            return {}

    def _export(self, model: ServedModel, *, device: str) -> None:
        """The model's series: zeroed counters, thresholds and its info line."""
        engine, thresholds = model.snapshot()
        self.metrics.init_model(model.name, engine.num_exits)
        self.metrics.set_thresholds(model.name, thresholds)
        self.metrics.set_model_info(
            model.name,
            device=device,
            architecture=engine.checkpoint.model.name,
            exits=engine.num_exits,
            runtime=engine.runtime,
            precision=engine.precision,
        )

    # ------------------------------------------------------------------ thresholds

    async def apply_thresholds(
        self,
        model: ServedModel,
        thresholds: tuple[float, ...],
        *,
        source: str,
        autotune: bool | None = None,
    ) -> None:
        """Put validated thresholds in force: persisted first (if the disk write fails,
        nothing changes and the error reaches the caller), then served and exported.
        The caller holds :meth:`lock` for the model.

        Args:
            model: the served model.
            thresholds: one per early exit (``models.exits.check_thresholds``).
            source: who set them (``admin``, ``autotune``), recorded in the file.
            autotune: the model's auto-tuning switch, recorded in the file.
        """
        mtime = await asyncio.to_thread(
            save_thresholds,
            self.settings.state_dir,
            model.name,
            thresholds,
            source=source,
            autotune=autotune,
        )
        model.state_mtime_ns = mtime
        model.set_thresholds(thresholds, source=source)
        self.metrics.set_thresholds(model.name, thresholds)

    async def reset_thresholds(self, model: ServedModel) -> tuple[float, ...]:
        """Forget the saved thresholds: the checkpoint's own apply again.

        Returns:
            The thresholds before.
        """
        async with self.lock(model.name):
            await asyncio.to_thread(delete_thresholds, self.settings.state_dir, model.name)
            old = model.thresholds
            model.state_mtime_ns = None
            self._back_to_checkpoint(model)
            return old

    def _back_to_checkpoint(self, model: ServedModel) -> tuple[float, ...]:
        own = tuple(model.checkpoint.thresholds)
        model.set_thresholds(own, source="checkpoint")
        self.metrics.set_thresholds(model.name, own)
        return own

    async def reread_state(self, model: ServedModel) -> bool:
        """Apply a model's state file if it changed since last seen (another replica
        sharing the state folder wrote it); True when the thresholds changed."""
        state_dir = self.settings.state_dir
        mtime = await asyncio.to_thread(file_mtime_ns, state_dir, model.name)
        if mtime is None and model.state_mtime_ns is not None:
            # The file we applied is gone: another replica went back to the checkpoint's
            # thresholds (admin DELETE).
            async with self.lock(model.name):
                model.state_mtime_ns = None
                if tuple(model.checkpoint.thresholds) == model.thresholds:
                    return False
                own = self._back_to_checkpoint(model)
                logger.info(
                    "model %r: thresholds back to the checkpoint's %s (state file removed)",
                    model.name,
                    list(own),
                )
                return True
        if mtime is None or mtime == model.state_mtime_ns:
            return False
        async with self.lock(model.name):
            saved = await self._saved(model.name, model.num_exits)
            model.state_mtime_ns = mtime  # a damaged file is reported once, not every poll
            if saved is not None:
                for hook in self.on_follow:
                    hook(model, saved)
            if saved is None or saved.thresholds == model.thresholds:
                return False
            old = model.thresholds
            model.set_thresholds(saved.thresholds, source=saved.source or "state")
            self.metrics.set_thresholds(model.name, saved.thresholds)
            logger.info(
                "model %r: thresholds %s -> %s (changed in the state folder)",
                model.name,
                list(old),
                list(saved.thresholds),
            )
            return True

    async def poll_state(self) -> None:
        """Every ``state_poll_s`` seconds, :meth:`reread_state` of every model (runs
        until cancelled; returns at once when polling is off)."""
        if self.settings.state_poll_s <= 0:
            return
        while True:
            await asyncio.sleep(self.settings.state_poll_s)
            for name, model in list(self.models.items()):
                try:
                    await self.reread_state(model)
                except Exception:  # keep polling whatever one file does
                    logger.exception("polling the threshold state of %r failed", name)

    async def _saved(self, name: str, num_exits: int) -> SavedThresholds | None:
        return await asyncio.to_thread(load_thresholds, self.settings.state_dir, name, num_exits)
