"""The web console at ``/``: its page and assets (local only), the live figures it
polls (read from the server's own Prometheus counters), the admin frontier, and the
page itself in a real headless browser against a real server process."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Histogram
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from models import evaluate_thresholds, load_checkpoint
from service.metrics import LATENCY_BUCKETS
from service.routes.console import histogram_quantile
from tests.service.browser import browser, foreign_resources, screenshot  # noqa: F401
from tests.service.conftest import MNIST, TOKEN, ServerProcess, encode, random_pixels
from testsupport.reliability import metric_by, parse_metrics

ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def pngs(count: int, seed: int = 0) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [
        ("images", (f"{i}.png", encode(p), "image/png"))
        for i, p in enumerate(random_pixels(MNIST, count, seed=seed))
    ]


# ----------------------------------------------------------------- the page, offline


def test_page_and_assets_are_local(app_client: TestClient) -> None:
    page = app_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert not re.search(r"https?://", html)
    refs = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert "console/static/console.js" in refs and "console/static/console.css" in refs
    for ref in refs:
        assert "//" not in ref, ref  # relative to the server, never another host
    for name, kind in (("console.js", "javascript"), ("console.css", "text/css")):
        asset = app_client.get(f"/console/static/{name}")
        assert asset.status_code == 200 and kind in asset.headers["content-type"]
        # only the SVG namespace (an identifier, never fetched) looks like a URL
        assert re.findall(r"https?://[^\s\"'`]+", asset.text) in (
            [],
            ["http://www.w3.org/2000/svg"],
        )


def test_unknown_console_files_are_404_with_the_error_body(app_client: TestClient) -> None:
    for name in ("index.html", "..%2Fapp.py", "nothing.js"):
        r = app_client.get(f"/console/static/{name}")
        assert r.status_code == 404
        assert r.json()["error"]["status"] == 404


# ------------------------------------------------------------------- live figures


def test_histogram_quantile_interpolates_like_promql() -> None:
    bounds = [1.0, 2.0, 4.0, math.inf]
    assert histogram_quantile(bounds, [10, 20, 30, 30], 0.5) == pytest.approx(1.5)
    assert histogram_quantile(bounds, [10, 20, 30, 30], 0.25) == pytest.approx(0.75)
    assert histogram_quantile(bounds, [0, 0, 10, 20], 0.99) == 4.0  # rank in +Inf
    assert histogram_quantile(bounds, [0, 0, 0, 0], 0.5) is None


def test_histogram_quantile_lands_in_the_true_quantiles_bucket() -> None:
    registry = CollectorRegistry()
    h = Histogram("x_seconds", "x", buckets=LATENCY_BUCKETS, registry=registry)
    values = np.random.default_rng(0).lognormal(mean=-5, sigma=1.5, size=5000)
    for v in values:
        h.observe(float(v))
    (family,) = list(registry.collect())
    samples = [s for s in family.samples if s.name == "x_seconds_bucket"]
    bounds = [float(s.labels["le"]) for s in samples]
    counts = [s.value for s in samples]
    for q in (0.5, 0.95, 0.99):
        est = histogram_quantile(bounds, counts, q)
        true = float(np.quantile(values, q))
        upper = min(b for b in bounds if b >= true)
        lower = max([0.0] + [b for b in bounds if b < true])
        assert est is not None and lower <= est <= upper, (q, est, true)


def test_stats_follow_the_servers_counters(app_client: TestClient) -> None:
    first = app_client.get("/console/api/stats").json()
    assert set(first["models"]) == {"b-lenet", "b-alexnet"}
    for params in ({"thresholds": "inf"}, {"thresholds": "0"}, {"thresholds": "0"}):
        r = app_client.post("/v1/models/b-lenet/classify", params=params, files=pngs(3))
        assert r.status_code == 200
    stats = app_client.get("/console/api/stats").json()["models"]["b-lenet"]
    exits = metric_by(
        parse_metrics(app_client.get("/metrics").text),
        "branchy_exit_total",
        "exit",
        model="b-lenet",
    )
    assert stats["exit_counts"] == [exits["0"], exits["1"]] == [3, 6]
    assert stats["images_total"] == 9
    assert stats["exit_shares"] == pytest.approx([1 / 3, 2 / 3])
    assert stats["queue_depth"] == 0
    lat = stats["latency_ms"]
    assert lat is not None and 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert stats["mean_batch_size"] == pytest.approx(3.0)  # three batches of the 3 images
    assert app_client.get("/console/api/stats", params={"window": 0}).status_code == 422


# ---------------------------------------------------------------------- frontier


def test_frontier_needs_the_admin_token(app_client: TestClient) -> None:
    assert app_client.get("/admin/models/b-alexnet/frontier").status_code == 401
    wrong = {"Authorization": "Bearer wrong-token-000"}
    assert app_client.get("/admin/models/b-alexnet/frontier", headers=wrong).status_code == 401
    assert app_client.get("/admin/models/nope/frontier", headers=ADMIN).status_code == 404


@pytest.mark.parametrize("name", ["b-lenet", "b-alexnet"])
def test_frontier_is_pareto_and_exact(app_client: TestClient, model_repo: Path, name: str) -> None:
    body = app_client.get(f"/admin/models/{name}/frontier", headers=ADMIN).json()
    ckpt = load_checkpoint(model_repo / name)
    assert ckpt.calibration is not None
    macs = ckpt.model.exit_macs()
    points = body["points"]
    assert len(points) >= 2
    costs = [p["expected_macs"] for p in points]
    accs = [p["accuracy"] for p in points]
    assert costs == sorted(costs) and all(b > a for a, b in itertools.pairwise(accs))
    for p in points:  # each point is what its thresholds do on the calibration data
        exact = evaluate_thresholds(ckpt.calibration, macs, p["thresholds"])
        assert p["accuracy"] == pytest.approx(exact.accuracy)
        assert p["relative_cost"] == pytest.approx(exact.relative_cost)
        assert p["exit_shares"] == pytest.approx(list(exact.exit_shares))
    # the most accurate point is the best any setting reaches: all samples at their best
    assert accs[-1] <= float(ckpt.calibration.correct.any(1).double().mean()) + 1e-9
    state = app_client.get(f"/admin/models/{name}/thresholds", headers=ADMIN).json()
    assert body["current"]["accuracy"] == pytest.approx(state["expected"]["accuracy"])
    assert body["thresholds"] == state["thresholds"]


def test_frontier_of_a_model_without_calibration(make_client: Any, tmp_path: Path) -> None:
    from tests.service.conftest import write_checkpoint

    repo = tmp_path / "repo"
    write_checkpoint(repo / "plain", "b-lenet", calibration=False)
    client = make_client(model_repository=repo, admin_token=TOKEN)
    r = client.get("/admin/models/plain/frontier", headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_calibration"


# ----------------------------------------------------------- in a real browser


def _wait_for(session: Any, xpath: str, timeout: float = 30) -> Any:
    return WebDriverWait(session, timeout).until(
        ec.visibility_of_element_located((By.XPATH, xpath))
    )


def _clickable_other_point(dots: list[Any], current: list[Any]) -> tuple[Any, list[float]]:
    """A frontier dot with other thresholds than ``current`` that no later-drawn dot
    covers (a real click must reach it)."""
    xy = [(float(d.get_attribute("cx")), float(d.get_attribute("cy"))) for d in dots]
    for i in range(len(dots) // 2, len(dots)):
        thresholds = json.loads(dots[i].get_attribute("data-thresholds"))
        if thresholds == pytest.approx([float(t) for t in current]):
            continue
        if all(math.dist(xy[i], xy[j]) > 10 for j in range(i + 1, len(dots))):
            return dots[i], thresholds
    raise AssertionError("no frontier point to click")


def test_console_in_a_headless_browser(
    server: ServerProcess,
    browser: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    base = server.base_url
    browser.get(f"{base}/")
    # the models, with their thresholds and where they came from
    for name in ("b-alexnet", "b-lenet"):
        _wait_for(browser, f"//table[@id='models']//tr[@data-model='{name}']")
    row = browser.find_element(By.XPATH, "//table[@id='models']//tr[@data-model='b-lenet']")
    info = httpx.get(f"{base}/v1/models/b-lenet").json()
    assert row.find_element(By.CLASS_NAME, "source").text == info["threshold_source"]

    # upload an image for b-lenet; the page shows what the server answers
    image = tmp_path / "digit.png"
    image.write_bytes(pngs(1, seed=7)[0][1][1])
    row.click()
    browser.find_element(By.ID, "file-input").send_keys(str(image))
    _wait_for(browser, "//div[@id='result']//span[@id='r-class'][normalize-space()!='']")
    truth = httpx.post(
        f"{base}/v1/models/b-lenet/classify",
        params={"top_k": 10},
        files=[("images", ("digit.png", image.read_bytes(), "image/png"))],
    ).json()["results"][0]
    assert browser.find_element(By.ID, "r-class").text == truth["class_name"]
    exit_line = browser.find_element(By.ID, "r-exit")
    assert exit_line.get_attribute("data-exit") == str(truth["exit"]["index"])
    assert f"entropy {truth['entropy']:.4f}" in browser.find_element(By.ID, "r-entropy").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#r-probs tr")) == 10

    # live figures: the two images (page + check above) reach the counters
    _wait_for(
        browser,
        "//table[@id='live']//tr[@data-model='b-lenet']/td[@class='images-total'][number(.)>=2]",
    )

    # admin: the frontier, then choosing a point sets the thresholds
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "unlock").click()
    _wait_for(browser, "//*[@id='current-point']")
    dots = browser.find_elements(By.CSS_SELECTOR, "#frontier circle.point")
    assert len(dots) >= 2
    screenshot(browser, "console")
    target, wanted = _clickable_other_point(dots, info["thresholds"])
    target.click()
    WebDriverWait(browser, 20).until(
        lambda _: httpx.get(f"{base}/v1/models/b-lenet").json()["threshold_source"] == "admin"
    )
    assert wanted != pytest.approx([float(t) for t in info["thresholds"]])
    after = httpx.get(f"{base}/v1/models/b-lenet").json()
    assert after["thresholds"] == pytest.approx(wanted)
    _wait_for(browser, "//p[@id='admin-msg'][contains(., 'thresholds set to')]")
    _wait_for(
        browser, "//table[@id='models']//tr[@data-model='b-lenet']/td[@class='source'][.='admin']"
    )
    screenshot(browser, "console-after-choice")
    assert foreign_resources(browser, base) == []
    # put the module server's thresholds back
    httpx.put(
        f"{base}/admin/models/b-lenet/thresholds",
        headers=ADMIN,
        json={"thresholds": [float(t) for t in info["thresholds"]]},
    )
