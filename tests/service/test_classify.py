"""/v1 classify: one and many images, multipart and raw, equal to offline early_exit."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import service.app
from models import load_checkpoint
from service.app import create_app
from service.preprocess import normalise
from service.settings import Settings
from tests.service.conftest import (
    CIFAR,
    MNIST,
    ROOT,
    encode,
    offline_input,
    random_pixels,
    wait_ready,
)
from testsupport.multipart import image_files


def _split_threshold(entropy: torch.Tensor) -> float:
    """A threshold in the widest gap between the middle half of sorted entropies, so
    that last-bit differences between batch sizes cannot move an image across it."""
    e = torch.sort(entropy).values.double()
    n = e.numel()
    lo, hi = n // 4, max(n // 4 + 1, 3 * n // 4)
    gaps = e[lo + 1 : hi + 1] - e[lo:hi]
    k = int(gaps.argmax())
    return float((e[lo + k] + e[lo + k + 1]) / 2)


@pytest.mark.parametrize(
    ("name", "spec", "fmt"), [("b-lenet", MNIST, "PNG"), ("b-alexnet", CIFAR, "PNG")]
)
def test_answers_equal_offline_early_exit(
    app_client: TestClient, model_repo: Path, name: str, spec, fmt: str
) -> None:
    pixels = random_pixels(spec, 12, seed=3)
    ckpt = load_checkpoint(model_repo / name)
    x = offline_input(pixels, spec)
    with torch.no_grad():
        first = ckpt.model(x)[0]
    from models import entropy_from_logits

    e0 = entropy_from_logits(first)
    thresholds = [_split_threshold(e0)] + [0.0] * (ckpt.model.num_exits - 2)
    offline = ckpt.model.early_exit(x, thresholds)
    assert 0 < int((offline.exit_index == 0).sum()) < 12, "the threshold should split the images"

    resp = app_client.post(
        f"/v1/models/{name}/classify",
        files=image_files([encode(p, fmt) for p in pixels]),
        params={"thresholds": ",".join(str(t) for t in thresholds), "top_k": 3},
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    results = body["results"]
    assert [r["index"] for r in results] == list(range(12))
    assert [r["class_index"] for r in results] == offline.prediction.tolist()
    assert [r["exit"]["index"] for r in results] == offline.exit_index.tolist()
    assert all(r["exit"]["count"] == ckpt.model.num_exits for r in results)
    np.testing.assert_allclose([r["entropy"] for r in results], offline.entropy.numpy(), atol=1e-4)
    probs = torch.softmax(offline.logits, 1)
    np.testing.assert_allclose(
        [r["confidence"] for r in results], probs.max(1).values.numpy(), atol=1e-5
    )
    for r, p in zip(results, probs, strict=True):
        assert r["class_name"] == ckpt.class_names[r["class_index"]]
        assert [t["class_index"] for t in r["top_k"]] == p.topk(3).indices.tolist()
    assert body["timings"]["total_ms"] > 0


def test_raw_body_single_image(app_client: TestClient, model_repo: Path) -> None:
    pixels = random_pixels(MNIST, 1, seed=5)
    resp = app_client.post(
        "/v1/models/b-lenet/classify",
        content=encode(pixels[0], "PNG"),
        headers={"content-type": "image/png"},
    )
    assert resp.status_code == 200, resp.text
    (result,) = resp.json()["results"]
    ckpt = load_checkpoint(model_repo / "b-lenet")
    offline = ckpt.model.early_exit(offline_input(pixels, MNIST), ckpt.thresholds)
    assert result["class_index"] == int(offline.prediction[0])
    assert result["exit"]["index"] == int(offline.exit_index[0])
    assert result["filename"] is None


def test_jpeg_rgb_to_grey_and_resize(app_client: TestClient) -> None:
    """Any size and colour: converted to the model's channels and resized."""
    rgb = random_pixels(CIFAR, 1, seed=1)[0]  # 32x32x3 for a 28x28 grey model
    resp = app_client.post(
        "/v1/models/b-lenet/classify",
        files=image_files([encode(rgb, "JPEG", quality=90)], "image/jpeg"),
    )
    assert resp.status_code == 200, resp.text
    grey = random_pixels(MNIST, 1, seed=1)[0]
    resp = app_client.post(
        "/v1/models/b-alexnet/classify", content=encode(grey), headers={"content-type": "image/png"}
    )
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(("thresholds", "expected_exit"), [("inf,inf", 0), ("0,0", 2)])
def test_request_thresholds_inf_and_zero(
    app_client: TestClient, thresholds: str, expected_exit: int
) -> None:
    images = [encode(p) for p in random_pixels(CIFAR, 6, seed=2)]
    resp = app_client.post(
        "/v1/models/b-alexnet/classify",
        files=image_files(images),
        params={"thresholds": thresholds},
    )
    assert resp.status_code == 200, resp.text
    assert [r["exit"]["index"] for r in resp.json()["results"]] == [expected_exit] * 6


def test_request_thresholds_validated_and_can_be_disabled(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client()
    image = encode(random_pixels(MNIST, 1)[0])
    for bad in ("1,2", "-1", "nan", "abc"):
        resp = client.post(
            "/v1/models/b-lenet/classify",
            content=image,
            headers={"content-type": "image/png"},
            params={"thresholds": bad},
        )
        assert resp.status_code == 422, (bad, resp.text)
        assert resp.json()["error"]["code"] == "validation_error"
    strict = make_client(allow_request_thresholds=False)
    resp = strict.post(
        "/v1/models/b-lenet/classify",
        content=image,
        headers={"content-type": "image/png"},
        params={"thresholds": "0.5"},
    )
    assert resp.status_code == 422
    assert "per-request thresholds" in resp.json()["error"]["message"]


def test_errors_have_one_shape(app_client: TestClient) -> None:
    image = encode(random_pixels(MNIST, 1)[0])
    cases = [
        (app_client.post("/v1/models/nope/classify", content=image,
                         headers={"content-type": "image/png"}), 404, "model_not_found"),
        (app_client.post("/v1/models/b-lenet/classify", content=b"not an image",
                         headers={"content-type": "image/png"}), 400, "bad_image"),
        (app_client.post("/v1/models/b-lenet/classify", content=b"{}",
                         headers={"content-type": "application/json"}), 415, "unsupported_media_type"),
        (app_client.get("/no/such/route"), 404, "not_found"),
        (app_client.delete("/v1/models"), 405, "method_not_allowed"),
        (app_client.post("/v1/models/b-lenet/classify", content=image,
                         headers={"content-type": "image/png"}, params={"top_k": 0}), 422, "validation_error"),
    ]  # fmt: skip
    for resp, status, code in cases:
        assert resp.status_code == status, resp.text
        error = resp.json()["error"]
        assert error["status"] == status and error["code"] == code and error["message"]
    # the next valid request still works
    ok = app_client.post(
        "/v1/models/b-lenet/classify", content=image, headers={"content-type": "image/png"}
    )
    assert ok.status_code == 200


def test_model_listing_and_description(app_client: TestClient, model_repo: Path) -> None:
    listing = app_client.get("/v1/models").json()["models"]
    assert {m["name"] for m in listing} == {"b-lenet", "b-alexnet"}
    detail = app_client.get("/v1/models/b-alexnet").json()
    ckpt = load_checkpoint(model_repo / "b-alexnet")
    assert detail["num_exits"] == 3
    assert detail["exit_macs"] == ckpt.model.exit_macs()
    assert detail["classes"] == ckpt.class_names
    assert detail["input"]["height"] == 32 and detail["device"] == "cpu"
    assert len(detail["thresholds"]) == 2
    assert app_client.get("/v1/models/nope").status_code == 404


def test_readyz_before_and_after_load(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real = service.app.load_engine

    def slow_load(*args, **kwargs):  # type: ignore[no-untyped-def]
        assert release.wait(30), "the test never released loading"
        return real(*args, **kwargs)

    monkeypatch.setattr(service.app, "load_engine", slow_load)
    with TestClient(create_app(make_settings())) as client:
        assert client.get("/healthz").status_code == 200
        resp = client.get("/readyz")
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "not_ready"
        assert client.get("/v2/health/ready").status_code == 503
        assert client.get("/v2/health/live").status_code == 200
        early = client.post(
            "/v1/models/b-lenet/classify",
            content=encode(random_pixels(MNIST, 1)[0]),
            headers={"content-type": "image/png"},
        )
        assert early.status_code == 503
        release.set()
        wait_ready(client)
        assert client.get("/readyz").json()["models"] == ["b-alexnet", "b-lenet"]


CIFAR_TEST = ROOT.parent / "shared" / "data" / "cifar10" / "test"


@pytest.mark.skipif(not CIFAR_TEST.is_dir(), reason="CIFAR-10 test images not available")
def test_cifar_test_jpegs_get_the_offline_answer(app_client: TestClient, model_repo: Path) -> None:
    """The test set's own JPEG files: decoded by the server as the training code decodes
    them for offline evaluation, so the answers are the same."""
    from training.data import decode_files

    files = sorted(CIFAR_TEST.glob("*/*.jpg"))[::1000]  # one per class
    pixels = decode_files(files)  # (B, 3, 32, 32) uint8, as offline evaluation has them
    ckpt = load_checkpoint(model_repo / "b-alexnet")
    offline = ckpt.model.early_exit(normalise(pixels, CIFAR), [float("inf"), 0.0])
    resp = app_client.post(
        "/v1/models/b-alexnet/classify",
        files=[("images", (f.name, f.read_bytes(), "image/jpeg")) for f in files],
        params={"thresholds": "inf,0"},
    )
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert [r["class_index"] for r in results] == offline.prediction.tolist()
    np.testing.assert_allclose([r["entropy"] for r in results], offline.entropy.numpy(), atol=1e-5)


def test_openapi_describes_every_route(app_client: TestClient) -> None:
    """Every route of the service contract is in the OpenAPI document, and nothing else."""
    doc = app_client.get("/openapi.json").json()
    v2 = "/v2/models/{name}"
    contract = {
        ("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics"),
        ("get", "/v1/models"), ("get", "/v1/models/{name}"), ("post", "/v1/models/{name}/classify"),
        ("get", "/v2"), ("get", "/v2/health/live"), ("get", "/v2/health/ready"),
        ("get", v2), ("get", f"{v2}/ready"), ("post", f"{v2}/infer"),
        ("get", f"{v2}/versions/{{version}}"), ("get", f"{v2}/versions/{{version}}/ready"),
        ("post", f"{v2}/versions/{{version}}/infer"),
        ("get", "/admin/models/{name}/thresholds"), ("put", "/admin/models/{name}/thresholds"),
        ("delete", "/admin/models/{name}/thresholds"), ("get", "/admin/models/{name}"),
        ("post", "/admin/models/{name}/reload"), ("post", "/admin/models/{name}/load"),
        ("get", "/admin/models/{name}/autotune"), ("put", "/admin/models/{name}/autotune"),
    }  # fmt: skip
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == contract
    for method, path in contract:
        op = doc["paths"][path][method]
        assert op["summary"] and "200" in op["responses"], (method, path)
    classify = doc["paths"]["/v1/models/{name}/classify"]["post"]
    assert {"multipart/form-data", "image/png"} <= set(classify["requestBody"]["content"])
    assert doc["components"]["securitySchemes"]["admin"]["scheme"] == "bearer"


def test_bad_image_message_names_the_part_without_internal_reprs(app_client: TestClient) -> None:
    resp = app_client.post(
        "/v1/models/b-lenet/classify",
        content=b"these bytes are no image",
        headers={"Content-Type": "image/png"},
    )
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == "bad_image"
    assert "image 0" in error["message"] and "cannot identify image file" in error["message"]
    assert " at 0x" not in error["message"] and "BytesIO" not in error["message"]
