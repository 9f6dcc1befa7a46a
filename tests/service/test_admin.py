"""Admin API: bearer-token auth, thresholds (explicit or by accuracy), persistence in the
state folder across restarts and replicas, reload keeping the old model on failure."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.state import state_file
from tests.service.conftest import CIFAR, MNIST, TOKEN, encode, random_pixels, write_checkpoint

AUTH = {"authorization": f"Bearer {TOKEN}"}
URL = "/admin/models/b-alexnet/thresholds"


def _classify_exits(client: TestClient, model: str = "b-alexnet", n: int = 4) -> list[int]:
    spec = MNIST if model == "b-lenet" else CIFAR
    pixels = random_pixels(spec, n)
    images = [("images", (f"{i}.png", encode(p), "image/png")) for i, p in enumerate(pixels)]
    resp = client.post(f"/v1/models/{model}/classify", files=images)
    assert resp.status_code == 200, resp.text
    return [r["exit"]["index"] for r in resp.json()["results"]]


def test_admin_needs_the_token(app_client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for headers in ({}, {"authorization": "Bearer wrong-token-123"}, {"authorization": TOKEN}):
        for resp in (
            app_client.get(URL, headers=headers),
            app_client.put(URL, headers=headers, json={"thresholds": [1, 1]}),
            app_client.post("/admin/models/b-alexnet/reload", headers=headers),
            app_client.get("/admin/models/unknown-model/thresholds", headers=headers),
        ):
            assert resp.status_code == 401, resp.text
            assert resp.json()["error"]["code"] == "unauthorized"
            assert resp.headers["www-authenticate"] == "Bearer"
    assert app_client.get(URL, headers=AUTH).status_code == 200
    assert TOKEN not in caplog.text and "wrong-token-123" not in caplog.text


def test_admin_off_without_a_token(make_client: Callable[..., TestClient]) -> None:
    client = make_client()  # no admin_token
    for headers in ({}, AUTH):
        resp = client.get(URL, headers=headers)
        assert resp.status_code == 403
        assert resp.json()["error"]["code"] == "admin_disabled"


def test_explicit_thresholds_apply_persist_and_show_in_metrics(
    app_client: TestClient, make_settings
) -> None:
    before = app_client.get(URL, headers=AUTH).json()
    assert before["source"] == "checkpoint" and before["thresholds"] == [0.0, 0.0]
    assert _classify_exits(app_client) == [2, 2, 2, 2]

    resp = app_client.put(URL, headers=AUTH, json={"thresholds": [1000.0, 0.0]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["thresholds"] == [1000.0, 0.0] and body["source"] == "admin"
    assert math.isclose(sum(body["expected"]["exit_shares"]), 1.0)
    assert body["expected"]["exit_shares"][0] == 1.0  # entropy <= ln 10 < 1000
    assert _classify_exits(app_client) == [0, 0, 0, 0]
    assert app_client.get("/v1/models/b-alexnet").json()["thresholds"] == [1000.0, 0.0]

    metrics = app_client.get("/metrics").text
    assert 'branchy_threshold{exit="0",model="b-alexnet"} 1000.0' in metrics

    saved = json.loads(state_file(make_settings().state_dir, "b-alexnet").read_text())
    assert saved["thresholds"] == [1000.0, 0.0]


@pytest.mark.parametrize(
    "body",
    [
        {"thresholds": [1.0]},  # wrong count
        {"thresholds": [1.0, 2.0, 3.0]},
        {"thresholds": [-0.1, 1.0]},  # negative
        {"thresholds": ["nan", 1.0]},  # NaN
        {"thresholds": ["abc", 1.0]},  # not a number
        {"thresholds": [True, 1.0]},
        {"thresholds": "0.1,0.2"},
        {},  # nothing
        {"thresholds": [1.0, 1.0], "tolerance": 0.01},  # two at once
        {"tolerance": 1.5},
        {"target": -0.1},
        {"bogus": 1},
    ],
)
def test_invalid_thresholds_are_422(app_client: TestClient, body: dict) -> None:
    resp = app_client.put(URL, headers=AUTH, json=body)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["code"] == "validation_error"
    assert app_client.get(URL, headers=AUTH).json()["thresholds"] == [0.0, 0.0]


def test_malformed_json_is_422(app_client: TestClient) -> None:
    resp = app_client.put(
        URL, headers={**AUTH, "content-type": "application/json"}, content=b"{not json"
    )
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "validation_error"


def test_thresholds_chosen_by_tolerance_and_target(app_client: TestClient) -> None:
    resp = app_client.put(URL, headers=AUTH, json={"tolerance": 0.05})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    expected = body["expected"]
    final = app_client.get("/v1/models/b-alexnet").json()
    assert final["threshold_source"] == "admin"
    assert len(body["thresholds"]) == 2
    # within the tolerance of the final exit's calibration accuracy (0.8 by construction)
    assert expected["accuracy"] >= 0.8 - 0.05 - 1e-9
    assert expected["relative_cost"] <= 1.0
    assert math.isclose(sum(expected["exit_shares"]), 1.0)

    resp = app_client.put(URL, headers=AUTH, json={"target": 0.999})
    assert resp.status_code == 422
    assert "no thresholds reach" in resp.json()["error"]["message"]


def test_tolerance_without_calibration_data_is_409(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    write_checkpoint(repo / "plain", "b-lenet", calibration=False)
    client = make_client(model_repository=repo, admin_token=TOKEN)
    resp = client.put("/admin/models/plain/thresholds", headers=AUTH, json={"tolerance": 0.01})
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "no_calibration"
    assert "calibration" in resp.json()["error"]["message"]
    # explicit thresholds still work, with no expectation to report
    resp = client.put("/admin/models/plain/thresholds", headers=AUTH, json={"thresholds": [0.5]})
    assert resp.status_code == 200 and resp.json()["expected"] is None


def test_thresholds_survive_a_restart_and_a_damaged_state_file_is_ignored(
    make_client: Callable[..., TestClient], make_settings, caplog: pytest.LogCaptureFixture
) -> None:
    first = make_client(admin_token=TOKEN)
    assert first.put(URL, headers=AUTH, json={"thresholds": [0.25, 0.5]}).status_code == 200
    second = make_client(admin_token=TOKEN)  # a new app on the same state folder
    state = second.get(URL, headers=AUTH).json()
    assert state["thresholds"] == [0.25, 0.5] and state["source"] == "admin"

    path = state_file(make_settings().state_dir, "b-alexnet")
    damages = [
        b"{not json",
        b"\xff\xfe not utf-8",
        json.dumps({"thresholds": [1.0]}).encode(),
        json.dumps({"thresholds": [-1, 2]}).encode(),
    ]
    for damage in damages:
        path.write_bytes(damage)
        caplog.clear()
        third = make_client(admin_token=TOKEN)
        assert third.get(URL, headers=AUTH).json()["thresholds"] == [0.0, 0.0]
        assert "damaged threshold state" in caplog.text
        assert third.get("/readyz").status_code == 200


def test_replicas_pick_up_threshold_changes(make_client: Callable[..., TestClient]) -> None:
    """Two apps share a state folder; a change through one reaches the other by polling."""
    a = make_client(admin_token=TOKEN, state_poll_s=0.05)
    b = make_client(admin_token=TOKEN, state_poll_s=0.05)
    assert a.put(URL, headers=AUTH, json={"thresholds": [1000.0, 0.0]}).status_code == 200
    deadline = time.monotonic() + 10
    while b.get(URL, headers=AUTH).json()["thresholds"] != [1000.0, 0.0]:
        assert time.monotonic() < deadline, "replica b never saw the change"
        time.sleep(0.05)
    assert b.get(URL, headers=AUTH).json()["source"] == "admin"
    assert _classify_exits(b) == [0, 0, 0, 0]


def test_reload_failure_keeps_the_old_model(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    ckpt = write_checkpoint(repo / "b-lenet", "b-lenet")
    client = make_client(model_repository=repo, admin_token=TOKEN)
    reload_url = "/admin/models/b-lenet/reload"
    ok = client.post(reload_url, headers=AUTH)
    assert ok.status_code == 200, ok.text
    assert ok.json()["num_exits"] == 2

    image = encode(random_pixels(MNIST, 1)[0])
    before = client.post("/v1/models/b-lenet/classify", content=image,
                         headers={"content-type": "image/png"}).json()  # fmt: skip
    (ckpt / "model.safetensors").write_bytes(b"garbage")  # damaged
    resp = client.post(reload_url, headers=AUTH)
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "reload_failed"
    assert "keeps serving" in resp.json()["error"]["message"]
    (ckpt / "model.safetensors").unlink()  # missing
    assert client.post(reload_url, headers=AUTH).status_code == 409
    after = client.post("/v1/models/b-lenet/classify", content=image,
                        headers={"content-type": "image/png"})  # fmt: skip
    assert after.status_code == 200
    assert after.json()["results"][0]["class_index"] == before["results"][0]["class_index"]


def test_model_names_are_not_paths(app_client: TestClient) -> None:
    for name in ("..", "..%2F..%2Fetc", "%2E%2E", "b-lenet%2F..%2Fb-lenet"):
        resp = app_client.get(f"/admin/models/{name}/thresholds", headers=AUTH)
        assert resp.status_code == 404, (name, resp.text)
