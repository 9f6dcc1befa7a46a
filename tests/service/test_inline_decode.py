"""``BRANCHY_INLINE_DECODE_PIXELS``: small requests are decoded on the event loop, the
rest in a worker thread; both paths give the same answers and the same errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from tests.service.conftest import CIFAR, encode, random_pixels

URL = "/v1/models/b-alexnet/classify"


def _classify(client: TestClient, images: list[bytes]) -> list[dict[str, Any]]:
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    resp = client.post(URL, files=files, params={"top_k": 10})
    assert resp.status_code == 200, resp.text
    results: list[dict[str, Any]] = resp.json()["results"]
    return [{k: r[k] for k in ("class_index", "confidence", "entropy", "exit", "top_k")}
            for r in results]  # fmt: skip


def test_inline_and_threaded_decoding_answer_alike(
    make_client: Callable[..., TestClient],
) -> None:
    pixels = random_pixels(CIFAR, 8, seed=3)
    small = [encode(p) for p in pixels[:2]]  # 2 x 1024 px: inline with a 4096 px budget
    many = [encode(p) for p in pixels]  # 8192 px: over the budget, a thread
    # 1000x1000 px compressing to a few KiB: small file, but too many pixels for inline
    flat = encode(np.full((1000, 1000, 3), 128, dtype=np.uint8))
    assert len(flat) < 4 * 4096
    inline, threaded = make_client(inline_decode_pixels=4096), make_client()
    for images in (small, many, [flat], [*small, flat]):
        assert _classify(inline, images) == _classify(threaded, images)


def test_inline_decoding_refuses_bad_images_like_the_thread(
    make_client: Callable[..., TestClient],
) -> None:
    good = encode(random_pixels(CIFAR, 1)[0])
    for client in (make_client(inline_decode_pixels=4096), make_client()):
        for body in (b"no image at all", good[: len(good) // 2]):
            resp = client.post(URL, content=body, headers={"content-type": "image/png"})
            assert resp.status_code == 400, resp.text
            error = resp.json()["error"]
            assert error["code"] == "bad_image" and "image 0" in error["message"]
            assert "Traceback" not in resp.text and " at 0x" not in resp.text
        # the server goes on answering on the same event loop
        ok = client.post(URL, content=good, headers={"content-type": "image/png"})
        assert ok.status_code == 200
