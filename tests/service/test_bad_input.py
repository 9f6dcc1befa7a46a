"""Bad input (issue 5): every case a clear 4xx with the contract's JSON error body, the
next valid request succeeds, nothing 5xx, nothing hangs, no worker dies.

All cases go to one real server process (``python -m service``), so a crash in a decoder
(a segfault would take pytest down with an in-process app) shows up as a dead process
and failing requests, and the server's log can be searched for unhandled errors.
The cases themselves are generated in ``testsupport/badimages.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.conftest import TOKEN, ServerProcess, running_server
from testsupport import badimages as bad
from testsupport.reliability import (
    assert_error,
    error_of,
    metric_total,
    parse_metrics,
)

TIMEOUT = httpx.Timeout(30.0)  # "nothing hangs": a case that takes longer fails
MAX_BODY = 2 * 1024 * 1024  # small limits keep the over-limit cases cheap to send
MAX_IMAGES = 8
ALEXNET = bad.Target("b-alexnet", 3, 32, 32, 2, max_body_bytes=MAX_BODY, max_images=MAX_IMAGES)
LENET = bad.Target("b-lenet", 1, 28, 28, 1, max_body_bytes=MAX_BODY, max_images=MAX_IMAGES)
CASES = bad.bad_requests(ALEXNET)


@pytest.fixture(scope="module", params=["0", "1"], ids=["one-process", "front-end"])
def limited_server(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ServerProcess]:
    """One real server for the module, with small body and image-count limits: a single
    process, then one with an HTTP front end (``BRANCHY_HTTP_WORKERS=1``), whose answers
    to every case must be the same."""
    env = {
        "BRANCHY_ADMIN_TOKEN": TOKEN,
        "BRANCHY_MAX_BODY_BYTES": str(MAX_BODY),
        "BRANCHY_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
        "BRANCHY_HTTP_WORKERS": request.param,
    }
    with running_server(model_repo, tmp_path_factory.mktemp("bad-input"), env) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(limited_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=limited_server.base_url, timeout=TIMEOUT) as c:
        yield c


def send(client: httpx.Client, req: bad.HttpRequest) -> httpx.Response:
    return client.request(req.method, req.path, headers=req.headers, content=req.body)


def classify(client: httpx.Client, target: bad.Target, data: bytes, ctype: str) -> dict:
    resp = send(client, bad.classify_raw(target, data, ctype))
    assert resp.status_code == 200, resp.text
    (result,) = resp.json()["results"]
    return result


def assert_still_serving(client: httpx.Client, server: ServerProcess) -> None:
    """The next valid request succeeds and the process is the same, still alive."""
    assert server.proc.poll() is None, f"server died:\n{server.log()[-3000:]}"
    resp = send(client, bad.valid_request(ALEXNET, seed=11))
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["results"]) == 1


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_request_gets_clear_4xx_and_server_keeps_serving(
    client: httpx.Client, limited_server: ServerProcess, case: bad.BadCase
) -> None:
    resp = send(client, case.request)
    assert_error(resp, case.status, case.codes)
    assert_still_serving(client, limited_server)


def test_many_bad_requests_in_a_row_then_valid_ones(
    client: httpx.Client, limited_server: ServerProcess
) -> None:
    """All cases back to back on one connection, then valid requests: no state leaks
    from a failed request into the next (half-read bodies, stuck queue slots)."""
    for case in CASES:
        resp = send(client, case.request)
        assert resp.status_code == case.status, (case.name, resp.text[:200])
    for seed in range(3):
        resp = send(client, bad.valid_request(ALEXNET, seed=seed))
        assert resp.status_code == 200, resp.text
    samples = parse_metrics(client.get("/metrics").text)
    assert metric_total(samples, "branchy_queue_depth") == 0


def test_no_unhandled_error_in_the_server_log(
    client: httpx.Client, limited_server: ServerProcess
) -> None:
    # Runs after the parametrised cases (module order): none of them reached the catch-all
    # handler or killed anything.
    for case in CASES[:5]:
        send(client, case.request)
    log = limited_server.log()
    assert "Traceback" not in log, log[-4000:]
    assert "unhandled error" not in log
    assert limited_server.proc.poll() is None


def test_bad_input_is_counted_as_rejection(client: httpx.Client) -> None:
    before = parse_metrics(client.get("/metrics").text)
    by_name = {c.name: c for c in CASES}
    send(client, by_name["raw_truncated_png"].request)
    send(client, by_name["raw_bomb_30000x30000"].request)
    after = parse_metrics(client.get("/metrics").text)

    def delta(reason: str) -> float:
        name = "branchy_rejected_total"
        return metric_total(after, name, model="b-alexnet", reason=reason) - metric_total(
            before, name, model="b-alexnet", reason=reason
        )

    assert delta("bad_input") == 1
    assert delta("too_large") == 1


def test_unknown_model_never_becomes_a_metric_label(client: httpx.Client) -> None:
    # Label values from client input would let anyone grow the metric set without bound.
    for i in range(3):
        send(client, bad.classify_raw(bad.Target(f"made-up-{i}", 3, 32, 32, 2), b"x", "image/png"))
    text = client.get("/metrics").text
    assert "made-up-" not in text


@pytest.mark.parametrize("target", [LENET, ALEXNET], ids=["grey_model", "rgb_model"])
def test_palette_and_rgba_png_are_converted_and_classified(
    client: httpx.Client, target: bad.Target
) -> None:
    for name, (ctype, data, reference) in bad.odd_but_valid_images(target).items():
        got = classify(client, target, data, ctype)
        want = classify(client, target, bad.png(reference), "image/png")
        assert (got["class_index"], got["exit"]["index"]) == (
            want["class_index"],
            want["exit"]["index"],
        ), name
        assert got["entropy"] == pytest.approx(want["entropy"], abs=1e-5), name


@pytest.mark.parametrize("target", [LENET, ALEXNET], ids=["grey_model", "rgb_model"])
def test_16_bit_png_is_scaled_not_clipped(client: httpx.Client, target: bad.Target) -> None:
    # v * 257 in 16 bits is v in 8 bits: the same answer as the 8-bit PNG of v.
    arr = bad.pixels(target.height, target.width, 3, seed=5)
    for wide in (arr[..., :1], arr):
        got = classify(client, target, bad.png16(wide.astype(np.uint16) * 257), "image/png")
        want = classify(client, target, bad.png(wide), "image/png")
        assert got["class_index"] == want["class_index"]
        assert got["entropy"] == pytest.approx(want["entropy"], abs=1e-5)


def test_cmyk_jpeg_and_1x1_image_are_classified(client: httpx.Client) -> None:
    amb = bad.ambiguous_images(ALEXNET)
    for name in ("cmyk_jpeg", "one_by_one_png"):
        ctype, data = amb[name]
        result = classify(client, ALEXNET, data, ctype)
        assert 0 <= result["class_index"] < 10, name


def test_animated_gif_is_refused_clearly(client: httpx.Client) -> None:
    ctype, data = bad.ambiguous_images(ALEXNET)["animated_gif"]
    err = assert_error(send(client, bad.classify_raw(ALEXNET, data, ctype)), 400, "bad_image")
    assert "animated" in err["message"]


def test_single_frame_gif_is_classified(client: httpx.Client) -> None:
    arr = bad.pixels(32, 32, 3, seed=2)
    data = bad.animated_gif(arr, frames=1)
    assert 0 <= classify(client, ALEXNET, data, "image/gif")["class_index"] < 10


def test_error_message_names_the_bad_part(client: httpx.Client) -> None:
    good = bad.image_for(3, 32, 32)
    ctype, broken = bad.bad_image_payloads(ALEXNET)["truncated_png"]
    req = bad.classify_multipart(ALEXNET, [("image/png", good), (ctype, broken)])
    err = error_of(send(client, req))
    assert err["code"] == "bad_image"
    # A client sending many images needs to know which one is broken (0-based index).
    assert "image 1" in err["message"], err


@pytest.fixture
def admin(client: httpx.Client) -> Callable[..., httpx.Response]:
    def call(
        method: str, path: str, *, headers: dict[str, str] | None = None, **kwargs: object
    ) -> httpx.Response:
        headers = {**(headers or {}), "authorization": f"Bearer {TOKEN}"}
        return client.request(method, f"/admin/models/{path}", headers=headers, **kwargs)  # type: ignore[arg-type]

    return call


@pytest.mark.parametrize("name", sorted(bad.invalid_admin_thresholds(2)))
def test_admin_rejects_invalid_thresholds_and_keeps_the_old_ones(
    admin: Callable[..., httpx.Response], name: str
) -> None:
    before = admin("GET", "b-alexnet/thresholds")
    assert before.status_code == 200, before.text
    value = bad.invalid_admin_thresholds(2)[name]
    resp = admin("PUT", "b-alexnet/thresholds", json={"thresholds": value})
    assert_error(resp, 422, "validation_error")
    after = admin("GET", "b-alexnet/thresholds")
    assert after.json()["thresholds"] == before.json()["thresholds"]


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'{"thresholds": [1e999, 0.5]}',
        b'{"thresholds": [NaN, 0.5]}',
        b'{"thresholds": [Infinity, 0.5]}',
        b'{"thresholds": [0.5, 0.5], "tolerance": 0.01}',
        b'{"tolerance": -1}',
        b'{"target": 2.0}',
    ],
    ids=["not_json", "not_object", "overflow", "nan", "inf", "both", "bad_tol", "bad_target"],
)
def test_admin_rejects_malformed_bodies(admin: Callable[..., httpx.Response], body: bytes) -> None:
    resp = admin(
        "PUT", "b-alexnet/thresholds", content=body, headers={"content-type": "application/json"}
    )
    assert 400 <= resp.status_code < 500, resp.text
    assert resp.status_code in (400, 422), resp.text
    error_of(resp)


def test_streamed_body_over_the_limit_is_refused(
    client: httpx.Client, limited_server: ServerProcess
) -> None:
    """No Content-Length (chunked upload): the limit is enforced while reading."""

    def chunks() -> Iterator[bytes]:
        good = bad.image_for(3, 32, 32)
        yield good
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"\0" * 65536

    resp = client.post(
        "/v1/models/b-alexnet/classify", content=chunks(), headers={"content-type": "image/png"}
    )
    assert_error(resp, 413, "payload_too_large")
    assert_still_serving(client, limited_server)
