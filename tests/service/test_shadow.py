"""Shadow monitoring on a real server process: sampled early exits re-run to the final
exit off the request path, counted, windowed, and dropped (counted) when the queue is full."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import httpx
import pytest
import torch

import models
from tests.service.conftest import MNIST, encode, random_pixels, running_server
from testsupport.reliability import metric_total, parse_metrics


def _files(count: int, seed: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [
        ("images", (f"i{i}.png", encode(p), "image/png"))
        for i, p in enumerate(random_pixels(MNIST, count, seed=seed))
    ]


def _classify(base: str, count: int, seed: int, thresholds: str) -> list[dict]:
    resp = httpx.post(
        f"{base}/v1/models/b-lenet/classify",
        files=_files(count, seed),
        params={"thresholds": thresholds},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["results"]


def _settled(base: str, timeout: float = 30.0) -> dict:
    """Metrics once every early exit is accounted for (shadowed or dropped)."""
    deadline = time.monotonic() + timeout
    while True:
        m = parse_metrics(httpx.get(f"{base}/metrics", timeout=10).text)
        early = metric_total(m, "branchy_exit_total", model="b-lenet", exit="0")
        shadows = metric_total(m, "branchy_shadow_total", model="b-lenet")
        dropped = metric_total(m, "branchy_shadow_dropped_total", model="b-lenet")
        if early > 0 and shadows + dropped == early:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"early {early}, shadows {shadows}, dropped {dropped}")
        time.sleep(0.05)


def test_rate_one_shadows_every_early_exit_and_the_window_adds_up(
    model_repo: Path, tmp_path: Path
) -> None:
    env = {"BRANCHY_SHADOW_RATE": "1", "BRANCHY_SHADOW_WINDOW": "1000"}
    with running_server(model_repo, tmp_path, env) as server:
        early = _classify(server.base_url, 24, 1, "1000")  # entropy < 1000: all leave at 0
        final = _classify(server.base_url, 8, 2, "0")  # nobody leaves early
        assert {r["exit"]["index"] for r in early} == {0}
        assert {r["exit"]["index"] for r in final} == {1}
        m = _settled(server.base_url)
        shadows = metric_total(m, "branchy_shadow_total", model="b-lenet")
        dropped = metric_total(m, "branchy_shadow_dropped_total", model="b-lenet")
        assert shadows + dropped == 24 and dropped == 0  # an idle server drops nothing
        # the shadow's verdict is the offline final exit's on the same images
        ckpt = models.load_checkpoint(model_repo / "b-lenet")
        from tests.service.conftest import offline_input

        x = offline_input(random_pixels(MNIST, 24, seed=1), MNIST)
        with torch.no_grad():
            final_pred = ckpt.model(x)[-1].argmax(1).tolist()
        disagree = sum(r["class_index"] != f for r, f in zip(early, final_pred, strict=True))
        assert metric_total(m, "branchy_shadow_total", model="b-lenet", agree="false") == disagree
        assert metric_total(m, "branchy_shadow_total", model="b-lenet", exit="0") == 24
        # window: the 24 shadowed plus the 8 that took the final exit (agree by definition)
        n = metric_total(m, "branchy_shadow_window_samples", model="b-lenet")
        share = metric_total(m, "branchy_shadow_disagreement", model="b-lenet")
        upper = metric_total(m, "branchy_shadow_disagreement_upper", model="b-lenet")
        assert n == 32 and share == pytest.approx(disagree / 32)
        assert share <= upper <= 1
        assert metric_total(m, "branchy_shadow_budget", model="b-lenet") == 0.01
        assert metric_total(m, "branchy_shadow_queue_depth", model="b-lenet") == 0  # all run


def test_a_full_shadow_queue_drops_and_counts_and_requests_still_succeed(
    model_repo: Path, tmp_path: Path
) -> None:
    env = {"BRANCHY_SHADOW_RATE": "1", "BRANCHY_SHADOW_QUEUE": "2"}
    with running_server(model_repo, tmp_path, env) as server:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            jobs = [pool.submit(_classify, server.base_url, 16, seed, "1000") for seed in range(24)]
            results = [j.result() for j in jobs]
        assert sum(len(r) for r in results) == 24 * 16
        m = _settled(server.base_url)
        dropped = metric_total(m, "branchy_shadow_dropped_total", model="b-lenet")
        shadows = metric_total(m, "branchy_shadow_total", model="b-lenet")
        assert dropped > 0 and shadows > 0 and shadows + dropped == 24 * 16


def test_rate_zero_turns_the_shadow_off(model_repo: Path, tmp_path: Path) -> None:
    with running_server(model_repo, tmp_path, {"BRANCHY_SHADOW_RATE": "0"}) as server:
        _classify(server.base_url, 8, 3, "1000")
        m = parse_metrics(httpx.get(f"{server.base_url}/metrics", timeout=10).text)
        shadow_series = [k for k in m if k[0].startswith("branchy_shadow")]
        assert shadow_series == []  # the families exist, no model has a shadow
        resp = httpx.get(f"{server.base_url}/readyz", timeout=10)
        assert resp.status_code == 200


@pytest.mark.parametrize("value", ["1.5", "abc"])
def test_a_bad_shadow_rate_stops_start_up_with_a_clear_message(
    model_repo: Path, tmp_path: Path, value: str
) -> None:
    import os
    import subprocess
    import sys

    from tests.service.conftest import ROOT, server_env

    env = {**os.environ, **server_env(model_repo, tmp_path), "BRANCHY_SHADOW_RATE": value}
    proc = subprocess.run(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, timeout=60
    )
    assert proc.returncode != 0
    assert b"BRANCHY_SHADOW_RATE" in proc.stderr + proc.stdout
