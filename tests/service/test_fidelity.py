"""Risk-controlled thresholds through the admin API of a real server process:
``{"max_disagreement": ε, "confidence": 1 − δ}`` and ``{"max_accuracy_drop": ...}``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

import models
from tests.service.conftest import TOKEN, ServerProcess, running_server, write_checkpoint

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def synthetic_calibration(n: int, *, predictions: bool = True, seed: int = 0):
    """Two exits: entropy at the branch U(0, 2.3); leaving there disagrees with the final
    exit with a probability rising with that entropy; labels agree with the final exit
    on 90 % of the samples."""
    g = torch.Generator().manual_seed(seed)
    e0 = torch.rand(n, generator=g) * 2.3
    entropy = torch.stack([e0, torch.full((n,), 0.05)], 1)
    final = torch.randint(0, 10, (n,), generator=g)
    disagree = torch.rand(n, generator=g) < torch.sigmoid(6 * (e0 - 1.2))
    pred = torch.stack([torch.where(disagree, (final + 1) % 10, final), final], 1)
    labels = torch.where(torch.rand(n, generator=g) < 0.9, final, (final + 3) % 10)
    correct = pred == labels[:, None]
    return models.CalibrationData(entropy, correct, pred if predictions else None)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fidelity-zoo")
    for name, data in (
        ("b-lenet", synthetic_calibration(3000)),
        ("tiny", synthetic_calibration(100, seed=1)),
        ("old", synthetic_calibration(3000, predictions=False, seed=2)),
    ):
        write_checkpoint(root / name, "b-lenet", calibration=False)
        models.save_calibration(root / name, data)
    write_checkpoint(root / "nocalib", "b-lenet", calibration=False)
    return root


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("fidelity-server")
    with running_server(repo, tmp, {"BRANCHY_ADMIN_TOKEN": TOKEN}) as proc:
        yield proc


def put(server: ServerProcess, model: str, body: object) -> httpx.Response:
    return httpx.put(
        f"{server.base_url}/admin/models/{model}/thresholds", json=body, headers=AUTH, timeout=30
    )


@pytest.mark.parametrize(
    ("body", "risk"),
    [
        ({"max_disagreement": 0.02, "confidence": 0.95}, "disagreement"),
        ({"max_accuracy_drop": 0.03, "confidence": 0.9}, "accuracy_drop"),
        ({"max_disagreement": 0.05}, "disagreement"),  # confidence defaults to 0.95
    ],
)
def test_certified_thresholds_are_the_librarys_and_take_effect(
    server: ServerProcess, repo: Path, body: dict, risk: str
) -> None:
    resp = put(server, "b-lenet", body)
    assert resp.status_code == 200, resp.text
    got = resp.json()
    eps = body.get("max_disagreement", body.get("max_accuracy_drop"))
    confidence = body.get("confidence", 0.95)
    ckpt = models.load_checkpoint(repo / "b-lenet")
    want = models.certify_thresholds(
        ckpt.calibration, ckpt.model.exit_macs(), risk=risk, epsilon=eps, delta=1 - confidence
    )
    assert got["thresholds"] == pytest.approx(list(want.point.thresholds))
    cert = got["certificate"]
    assert cert["risk"] == risk and cert["epsilon"] == eps
    assert cert["confidence"] == pytest.approx(confidence)
    assert cert["certified_bound"] == pytest.approx(want.bound)
    assert cert["empirical_risk"] <= cert["certified_bound"] <= eps
    assert cert["tested_samples"] == 3000
    expected = got["expected"]
    assert expected["exit_shares"] == pytest.approx(list(want.point.exit_shares))
    assert expected["relative_cost"] == pytest.approx(want.point.relative_cost)
    assert 0 < expected["exit_shares"][0] < 1  # something leaves early, not everything
    # in force for classification, and shown as an admin change
    detail = httpx.get(f"{server.base_url}/v1/models/b-lenet").json()
    assert detail["thresholds"] == pytest.approx(got["thresholds"])
    assert detail["threshold_source"] == "admin"


def test_nothing_certifiable_is_409_and_leaves_thresholds_alone(server: ServerProcess) -> None:
    before = httpx.get(f"{server.base_url}/v1/models/tiny").json()["thresholds"]
    resp = put(server, "tiny", {"max_disagreement": 0.01, "confidence": 0.95})
    assert resp.status_code == 409, resp.text
    err = resp.json()["error"]
    assert err["code"] == "not_certifiable"
    assert "at least 299 tested samples" in err["message"] and "100 were tested" in err["message"]
    assert httpx.get(f"{server.base_url}/v1/models/tiny").json()["thresholds"] == before
    # a looser budget is certifiable on the same 100 samples
    assert put(server, "tiny", {"max_disagreement": 0.2}).status_code == 200


def test_missing_calibration_or_predictions_is_409(server: ServerProcess) -> None:
    resp = put(server, "old", {"max_disagreement": 0.05})
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "no_predictions"
    assert "--recollect" in resp.json()["error"]["message"]
    # the accuracy drop needs only labels, which old data have
    assert put(server, "old", {"max_accuracy_drop": 0.05}).status_code == 200
    resp = put(server, "nocalib", {"max_accuracy_drop": 0.05})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "no_calibration"


@pytest.mark.parametrize(
    "body",
    [
        {"max_disagreement": 0},
        {"max_disagreement": 1},
        {"max_disagreement": -0.1},
        {"max_disagreement": 1.5},
        {"max_disagreement": "NaN"},
        {"max_disagreement": "abc"},
        {"max_disagreement": None, "confidence": 0.9},
        {"max_disagreement": 0.01, "confidence": 1.0},
        {"max_disagreement": 0.01, "confidence": 0},
        {"max_disagreement": 0.01, "confidence": True},
        {"max_disagreement": 0.01, "max_accuracy_drop": 0.01},
        {"max_disagreement": 0.01, "tolerance": 0.01},
        {"tolerance": 0.01, "confidence": 0.9},
        {"max_disagreement": [0.01]},
    ],
)
def test_bad_risk_bodies_are_422_with_the_error_body(server: ServerProcess, body: dict) -> None:
    resp = put(server, "b-lenet", body)
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["code"] == "validation_error" and err["status"] == 422
    assert "Traceback" not in resp.text and "/work" not in resp.text
