"""Opt-in auto-tuning on real server processes: too few samples keeps the thresholds,
a certified change is applied and persisted with source ``autotune``, a restart keeps
it, and an explicit admin PUT pins the thresholds until auto-tuning is switched back on."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.conftest import MNIST, ROOT, TOKEN, encode, random_pixels, running_server

AUTH = {"Authorization": f"Bearer {TOKEN}"}
ENV = {
    "BRANCHY_ADMIN_TOKEN": TOKEN,
    "BRANCHY_SHADOW_RATE": "1",
    "BRANCHY_SHADOW_BUDGET": "0.3",
    "BRANCHY_AUTOTUNE": "true",
    "BRANCHY_AUTOTUNE_INTERVAL_S": "0.2",
    "BRANCHY_AUTOTUNE_MIN_SAMPLES": "100",
    "BRANCHY_AUTOTUNE_MAX_STEP": "5",
    "BRANCHY_AUTOTUNE_HYSTERESIS": "0.01",
}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    # the trained B-LeNet: its exits agree often enough on stroke-like noise for a 30 %
    # budget to be certifiable with a few hundred samples
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "zoo" / "b-lenet", root / "b-lenet")
    return root


def _send(base: str, requests: int, seed: int) -> None:
    for r in range(requests):
        px = (random_pixels(MNIST, 16, seed=seed * 1000 + r) > 200).astype(np.uint8) * 255
        files = [("images", (f"{i}.png", encode(p), "image/png")) for i, p in enumerate(px)]
        resp = httpx.post(f"{base}/v1/models/b-lenet/classify", files=files, timeout=30)
        assert resp.status_code == 200, resp.text


def _autotune(base: str) -> dict:
    return httpx.get(f"{base}/admin/models/b-lenet/autotune", headers=AUTH, timeout=10).json()


def _wait(base: str, ok, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = _autotune(base)
        if ok(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(state)
        time.sleep(0.1)


def _quiet(base: str) -> dict:
    """The autotune state once it has not changed for a second (shadows drained)."""
    last = _autotune(base)
    for _ in range(60):
        time.sleep(1.0)
        now = _autotune(base)
        if (
            now["thresholds"] == last["thresholds"]
            and now["window_samples"] == last["window_samples"]
        ):
            return now
        last = now
    raise AssertionError(last)


def test_autotune_changes_persists_and_is_pinned_by_an_admin(repo: Path, tmp_path: Path) -> None:
    state_file = tmp_path / "state" / "b-lenet.thresholds.json"
    with running_server(repo, tmp_path, ENV) as server:
        base = server.base_url
        start = _autotune(base)
        assert start["enabled"] is True and start["source"] == "checkpoint"
        time.sleep(0.5)
        assert "keeping the thresholds" in _autotune(base)["status"]  # 0 of 100 samples
        _send(base, 16, seed=1)
        _wait(base, lambda s: s["source"] == "autotune")
        changed = _quiet(base)
        evidence = changed["last_change"]
        assert evidence["certified"] is True and evidence["bound"] <= 0.3
        assert evidence["samples"] >= 100
        detail = httpx.get(f"{base}/v1/models/b-lenet").json()
        assert detail["threshold_source"] == "autotune"
        assert detail["thresholds"] == changed["thresholds"]
        saved = json.loads(state_file.read_text())
        assert saved["source"] == "autotune" and saved["autotune"] is True
        assert saved["thresholds"] == changed["thresholds"]

    # a restart on the same state folder keeps the tuned thresholds and their source
    with running_server(repo, tmp_path, ENV) as server:
        base = server.base_url
        again = _autotune(base)
        assert again["source"] == "autotune" and again["thresholds"] == changed["thresholds"]
        assert again["enabled"] is True
        # an explicit PUT pins: auto-tuning stops until switched on again
        resp = httpx.put(
            f"{base}/admin/models/b-lenet/thresholds",
            json={"thresholds": [0.05]},
            headers=AUTH,
            timeout=30,
        )
        assert resp.status_code == 200 and resp.json()["source"] == "admin"
        assert _autotune(base)["enabled"] is False
        _send(base, 16, seed=2)
        time.sleep(1.0)
        pinned = _autotune(base)
        assert pinned["thresholds"] == [0.05] and pinned["source"] == "admin"
        assert json.loads(state_file.read_text())["autotune"] is False

    with running_server(repo, tmp_path, ENV) as server:
        base = server.base_url
        assert _autotune(base)["enabled"] is False  # the pin survives a restart
        resp = httpx.put(
            f"{base}/admin/models/b-lenet/autotune", json={"enabled": True}, headers=AUTH
        )
        assert resp.status_code == 200 and resp.json()["enabled"] is True
        _send(base, 16, seed=3)
        _wait(base, lambda s: s["source"] == "autotune")
        for bad in ({"enabled": "yes"}, {"enabled": 1}, {}, {"enabled": True, "x": 1}):
            resp = httpx.put(f"{base}/admin/models/b-lenet/autotune", json=bad, headers=AUTH)
            assert resp.status_code == 422 and resp.json()["error"]["code"] == "validation_error"

    # a damaged state file is ignored as before: checkpoint thresholds, default switch
    state_file.write_bytes(b"{not json")
    with running_server(repo, tmp_path, ENV) as server:
        state = _autotune(server.base_url)
        assert state["source"] == "checkpoint" and state["enabled"] is True


def test_a_breach_steps_down_before_enough_samples_to_certify(repo: Path, tmp_path: Path) -> None:
    # a 1 % budget on stroke-like noise, which the early exit answers differently far more
    # often; certifying would need 100,000 samples, but the breach is evident much sooner
    env = {
        **ENV,
        "BRANCHY_SHADOW_BUDGET": "0.01",
        "BRANCHY_AUTOTUNE_MIN_SAMPLES": "100000",
        "BRANCHY_AUTOTUNE_MAX_STEP": "0.25",
    }
    with running_server(repo, tmp_path, env) as server:
        base = server.base_url
        start = _autotune(base)["thresholds"][0]
        _send(base, 8, seed=4)
        state = _wait(base, lambda s: s["source"] == "autotune")
        evidence = state["last_change"]
        assert evidence["certified"] is False and evidence["alarm"] is True
        assert evidence["samples"] < 100000
        assert "alarm" in state["status"] or "keeping" in state["status"]
        # one step is the cap down (not certified, so never more), and never below 0
        before, after = evidence["from"][0], state["thresholds"][0]
        assert after == pytest.approx(max(0.0, before - 0.25))
        assert after < start
