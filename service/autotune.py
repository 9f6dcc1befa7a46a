"""Opt-in auto-tuning of thresholds from the shadow window (``BRANCHY_AUTOTUNE``, and
per model through ``PUT /admin/models/{name}/autotune``).

Every ``BRANCHY_AUTOTUNE_INTERVAL_S`` seconds, for each model with auto-tuning on, the
shadow window (``service.shadow``: sampled served images re-run through every exit) is a
fresh calibration sample of current traffic. From it ``models.certify_thresholds``
re-chooses the cheapest thresholds with disagreement certified ≤ ``BRANCHY_SHADOW_BUDGET``
at ``BRANCHY_SHADOW_CONFIDENCE``, with a bounded pace:

* **minimum samples**: fewer than ``BRANCHY_AUTOTUNE_MIN_SAMPLES`` re-run images in the
  window: keep the thresholds and say so (admin GET ``.../autotune`` ``status``), unless
  the window already shows that the thresholds in force break the budget (below);
* **cap per step, upwards only**: candidates are clipped to at most
  ``BRANCHY_AUTOTUNE_MAX_STEP`` nats above the thresholds in force, and may go down to 0
  (the box depends only on the thresholds in force, so it is fixed before the window is
  looked at and the certificate still holds). The cap paces the risky direction; moving
  back towards "no early exit" is never held back by it, so a tuner that drifted into a
  violation can leave it in one pass instead of one cap per pass;
* **alarm**: when the window's disagreements under the thresholds in force are
  significant evidence that their risk exceeds the budget (the one-sided binomial test
  ``P(Binomial(n, ε) >= k) <= δ``; needs few samples when the breach is large), the pass
  acts at once: it certifies new thresholds if the window is large enough, and otherwise
  steps every threshold down by the cap (not certified; the next alarm needs new evidence,
  since the window is cleared after each change);
* **hysteresis**: while the thresholds in force are still certified on the window, a new
  choice is applied only if it changes the expected cost by more than
  ``BRANCHY_AUTOTUNE_HYSTERESIS`` (relative);
* after each change the window is cleared, so every step is certified on images served
  under the thresholds before it and never re-uses a sample.

When the window is large enough but nothing in the box can be certified, the thresholds
in force are kept while their own bound on the window is within the budget, and
otherwise step down by the cap towards 0 (no early exit, which never disagrees) and the status says
it is not certified. Each change is logged with its
evidence and persisted in the state folder with source ``autotune`` (replicas follow);
an explicit admin PUT of thresholds pins them and switches auto-tuning off for that model
until it is switched on again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from models import CalibrationData, NotCertifiable, certify_thresholds, evaluate_thresholds
from models.calibration import binomial_cdf, binomial_upper_bound, risk_of
from models.exits import encode_thresholds
from service.deps import AdminDep, ModelDep, SettingsDep, app_state
from service.repository import ServedModel
from service.schemas import Threshold
from service.settings import Settings
from service.state import SavedThresholds, save_thresholds

logger = logging.getLogger(__name__)


def breach_p_value(losses: int, n: int, epsilon: float) -> float:
    """Exact p-value of the null "risk <= ε" after ``losses`` in ``n`` samples.

    The mirror of :func:`models.calibration.binomial_p_value`: many losses are unlikely
    under the null, ``P(Binomial(n, ε) >= losses)``. At most δ means the window is
    significant evidence (at level δ) that the thresholds in force break the budget.
    """
    if losses <= 0:
        return 1.0
    return max(0.0, 1.0 - binomial_cdf(losses - 1, n, epsilon))


class AutotuneUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: StrictBool = Field(description="Switch auto-tuning of this model on or off.")


class AutotuneState(BaseModel):
    model: str
    enabled: bool
    status: str = Field(description="What the last auto-tuning pass did, or why not.")
    window_samples: int = Field(description="Re-run images in the shadow window.")
    min_samples: int
    thresholds: list[Threshold]
    source: str
    last_change: dict[str, Any] | None = None


class AutoTuner:
    """Per-model auto-tuning switches, the last status, and the periodic pass."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.enabled: dict[str, bool] = {}
        self.status: dict[str, str] = {}
        self.last_change: dict[str, dict[str, Any]] = {}

    def register(self, served: ServedModel, saved: SavedThresholds | None) -> None:
        on = self.settings.autotune
        if saved is not None and saved.autotune is not None:
            on = saved.autotune  # the state folder remembers an admin's switch
        self._switch(served, on)

    def _switch(self, served: ServedModel, on: bool) -> None:
        self.enabled[served.name] = on
        shadow = getattr(served.batcher, "shadow", None)
        if shadow is not None:
            shadow.collect_all = on
        if on and shadow is None:
            self.status[served.name] = (
                "auto-tuning needs shadow monitoring (BRANCHY_SHADOW_RATE > 0)"
            )
        else:
            self.status.setdefault(served.name, "waiting for the first pass" if on else "off")
            if not on:
                self.status[served.name] = "off"

    def follow(self, served: ServedModel, saved: SavedThresholds) -> None:
        """Another replica changed the state file: follow its switch."""
        if saved.autotune is not None and saved.autotune != self.enabled.get(served.name):
            self._switch(served, saved.autotune)

    async def run(self, app: Any) -> None:
        while True:
            await asyncio.sleep(self.settings.autotune_interval_s)
            for served in list(app_state(app).models.models.values()):
                if not self.enabled.get(served.name):
                    continue
                try:
                    await self.step(app, served)
                except Exception:  # one model's failure must not stop the others
                    logger.exception("auto-tuning model %r failed", served.name)

    async def step(self, app: Any, served: ServedModel) -> bool:
        """One pass for one model; True when the thresholds changed."""
        proposal = await asyncio.to_thread(self._propose, served)
        if proposal is None:
            return False
        new, evidence = proposal
        async with app_state(app).models.lock(served.name):
            if not self.enabled.get(served.name):  # pinned meanwhile
                return False
            old = served.thresholds
            mtime = await asyncio.to_thread(
                save_thresholds,
                self.settings.state_dir,
                served.name,
                new,
                source="autotune",
                autotune=True,
            )
            served.state_mtime_ns = mtime
            served.set_thresholds(new, source="autotune")
            app_state(app).metrics.set_thresholds(served.name, new)
        shadow = getattr(served.batcher, "shadow", None)
        if shadow is not None:
            shadow.clear_window()
        self.last_change[served.name] = {"at": time.time(), "from": list(old), **evidence}
        logger.info(
            "model %r: thresholds %s -> %s (autotune: %s)",
            served.name,
            list(old),
            list(new),
            evidence,
        )
        return True

    def _propose(self, served: ServedModel) -> tuple[tuple[float, ...], dict[str, Any]] | None:
        s, name = self.settings, served.name
        shadow = getattr(served.batcher, "shadow", None)
        if shadow is None:
            self.status[name] = "auto-tuning needs shadow monitoring (BRANCHY_SHADOW_RATE > 0)"
            return None
        window = shadow.calibration_window()
        n = 0 if window is None else int(window[0].shape[0])
        if window is None:
            self.status[name] = (
                f"keeping the thresholds: 0 of the {s.autotune_min_samples} re-run samples "
                "needed to certify anything"
            )
            return None
        entropy, pred = window
        if entropy.shape[1] != served.num_exits:
            return None
        data = CalibrationData(entropy.float(), pred == pred[:, -1:], pred)
        cur, delta = served.thresholds, 1.0 - s.shadow_confidence
        cur_losses = round(risk_of(data, cur, "disagreement") * n)
        breached = breach_p_value(cur_losses, n, s.shadow_budget) <= delta
        step = s.autotune_max_step
        down = tuple(max(0.0, t - step) for t in cur)
        if n < s.autotune_min_samples:
            if breached and down != cur:
                self.status[name] = (
                    f"alarm: {cur_losses} of {n} samples disagree, beyond the budget "
                    f"{s.shadow_budget:g} at confidence {s.shadow_confidence:g}; too few to "
                    "certify, stepped down by the cap, not certified"
                )
                return down, {"samples": n, "certified": False, "alarm": True}
            self.status[name] = (
                f"keeping the thresholds: {n} of the {s.autotune_min_samples} re-run samples "
                "needed to certify anything"
            )
            return None
        macs = served.checkpoint.model.exit_macs()
        bounds = [(0.0, t + step) for t in cur]
        cur_bound = binomial_upper_bound(cur_losses, n, delta)
        cur_cost = evaluate_thresholds(data, macs, cur).relative_cost
        try:
            cert = certify_thresholds(
                data, macs, risk="disagreement", epsilon=s.shadow_budget, delta=delta, bounds=bounds
            )
        except NotCertifiable:
            if cur_bound <= s.shadow_budget:
                # with several exits a small window's split can fail the path's first
                # setting while the thresholds in force still pass: keep them
                self.status[name] = (
                    f"keeping the thresholds: nothing new certifiable on {n} samples, but "
                    f"those in force stay within the budget (disagreement <= {cur_bound:.4f})"
                )
                return None
            if down == cur:
                self.status[name] = f"nothing certifiable on {n} samples; thresholds already 0"
                return None
            self.status[name] = (
                f"nothing certifiable on {n} samples (in force: disagreement "
                f"<= {cur_bound:.4f}); stepped down by the cap, not certified"
            )
            return down, {"samples": n, "certified": False, "bound_in_force": cur_bound}
        new = cert.point.thresholds
        change = abs(cert.point.relative_cost - cur_cost) / max(cur_cost, 1e-12)
        if new == cur or (cur_bound <= s.shadow_budget and change <= s.autotune_hysteresis):
            self.status[name] = (
                f"keeping the thresholds: certified on {n} samples (disagreement <= "
                f"{cur_bound:.4f}); the best certified step changes the cost by "
                f"{100 * change:.1f}% (hysteresis {100 * s.autotune_hysteresis:g}%)"
            )
            return None
        self.status[name] = (
            f"changed on {n} samples: disagreement certified <= {cert.bound:.4f} "
            f"(empirical {cert.empirical_risk:.4f}), relative cost {cur_cost:.3f} -> "
            f"{cert.point.relative_cost:.3f}"
        )
        return new, {
            "samples": n,
            "certified": True,
            "bound": cert.bound,
            "empirical_risk": cert.empirical_risk,
            "relative_cost": cert.point.relative_cost,
            "bound_in_force": cur_bound,
        }

    async def pin(self, app: Any, served: ServedModel) -> None:
        """An explicit admin change: auto-tuning off for this model until re-enabled."""
        if self.enabled.get(served.name):
            logger.info("model %r: auto-tuning off (thresholds pinned by an admin)", served.name)
        self._switch(served, False)
        shadow = getattr(served.batcher, "shadow", None)
        if shadow is not None:
            shadow.clear_window()  # its rows were served under the old thresholds

    def state(self, served: ServedModel) -> AutotuneState:
        shadow = getattr(served.batcher, "shadow", None)
        window = None if shadow is None else shadow.calibration_window()
        return AutotuneState(
            model=served.name,
            enabled=bool(self.enabled.get(served.name)),
            status=self.status.get(served.name, "off"),
            window_samples=0 if window is None else int(window[0].shape[0]),
            min_samples=self.settings.autotune_min_samples,
            thresholds=encode_thresholds(served.thresholds),
            source=served.threshold_source,
            last_change=self.last_change.get(served.name),
        )


def tuner(app: Any) -> AutoTuner:
    """The app's auto-tuner (made on first use, kept on its :class:`AppState`)."""
    state = app_state(app)
    if state.autotuner is None:
        state.autotuner = AutoTuner(state.settings)
    t: AutoTuner = state.autotuner
    return t


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


@router.get("/models/{name}/autotune", summary="Auto-tuning switch and status")
async def get_autotune(request: Request, model: ModelDep) -> AutotuneState:
    return tuner(request.app).state(model)


@router.put("/models/{name}/autotune", summary="Switch auto-tuning of one model on or off")
async def put_autotune(
    request: Request, model: ModelDep, settings: SettingsDep, body: AutotuneUpdate
) -> AutotuneState:
    t = tuner(request.app)
    async with app_state(request.app).models.lock(model.name):
        source = model.threshold_source if model.threshold_source in ("admin", "autotune") else None
        mtime = await asyncio.to_thread(
            save_thresholds,
            settings.state_dir,
            model.name,
            model.thresholds,
            source=source,
            autotune=body.enabled,
        )
        model.state_mtime_ns = mtime
        t._switch(model, body.enabled)
    logger.info("model %r: auto-tuning %s (admin)", model.name, "on" if body.enabled else "off")
    return t.state(model)


@contextlib.asynccontextmanager
async def running(app: Any) -> Any:
    """The periodic pass as a task, cancelled on exit."""
    task = asyncio.create_task(tuner(app).run(app), name="autotune")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
