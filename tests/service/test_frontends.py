"""HTTP front ends (``BRANCHY_HTTP_WORKERS``, issue 17): a real server whose main process
keeps the models and whose front-end processes take classify requests.

What must hold: the front ends' own answers are the main application's answers (the
same body, field for field, as the forwarded path), the engine's thresholds apply to
them, request metrics are counted once, a reload or a dead front end loses nothing, and
SIGTERM drains every accepted request. The bad-input suite (test_bad_input.py) runs
against such a server as well.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartParser

from service.frontend import parse_multipart
from tests.service.conftest import TOKEN, ServerProcess, running_server
from testsupport import badimages as bad
from testsupport.multipart import encode_multipart, image_parts
from testsupport.reliability import metric_total, parse_metrics

TIMEOUT = httpx.Timeout(30.0)
ALEXNET = bad.Target("b-alexnet", 3, 32, 32, 2)
ADMIN = {"authorization": f"Bearer {TOKEN}"}


# ---------------------------------------------------------------- the lean multipart reader


def _starlette_files(body: bytes, content_type: str) -> list[tuple[str | None, bytes]]:
    async def parse() -> list[tuple[str | None, bytes]]:
        async def stream():  # type: ignore[no-untyped-def]
            yield body

        form = await MultiPartParser(Headers({"content-type": content_type}), stream()).parse()
        return [
            (v.filename, await v.read()) for _, v in form.multi_items() if isinstance(v, UploadFile)
        ]

    return asyncio.run(parse())


@pytest.mark.parametrize(
    "names",
    [["a.png"], ["x.jpg", "y y.jpg", "z.png"], ["ünïcode.png", ""], ["dash--boundary.png"]],
)
def test_multipart_reader_reads_what_starlette_reads(names: list[str]) -> None:
    images = [bad.image_for(3, 8, 8, seed=i) + b"\r\n--not-the-boundary" for i in range(len(names))]
    body, ctype = encode_multipart(image_parts(images, names=names))
    ours = parse_multipart(body, ctype.encode(), 64)
    assert ours == _starlette_files(body, ctype)
    assert [data for _, data in ours or []] == images


def _body(boundary: str = "b0undary") -> tuple[bytes, str]:
    return encode_multipart(image_parts([b"one", b"two"]), boundary=boundary)


@pytest.mark.parametrize(
    "change",
    [
        "preamble",
        "field_part",
        "no_final_boundary",
        "garbage_after_end",
        "extra_header",
        "folded_header",
        "no_boundary",
        "other_charset",
        "too_many_parts",
    ],
)
def test_multipart_reader_leaves_unusual_bodies_to_the_main_app(change: str) -> None:
    """Anything but the plain form is forwarded (None), where Starlette's own parser
    and the route's checks answer it."""
    body, ctype = _body()
    limit = 64
    if change == "preamble":
        body = b"hello\r\n" + body
    elif change == "field_part":
        body = body.replace(b'; filename="img1.png"', b"")
    elif change == "no_final_boundary":
        body = body[: body.rindex(b"--b0undary--")]
    elif change == "garbage_after_end":
        body += b"trailing"
    elif change == "extra_header":
        body = body.replace(b"Content-Type: image/png", b"Content-Transfer-Encoding: base64", 1)
    elif change == "folded_header":
        body = body.replace(b"Content-Type: image/png", b"Content-Type:\r\n image/png", 1)
    elif change == "no_boundary":
        ctype = "multipart/form-data"
    elif change == "other_charset":
        ctype += "; charset=latin-1"
    elif change == "too_many_parts":
        limit = 1
    assert parse_multipart(body, ctype.encode(), limit) is None


# ---------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def served(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {
        "BRANCHY_ADMIN_TOKEN": TOKEN,
        "BRANCHY_HTTP_WORKERS": "2",
        "BRANCHY_LOG_LEVEL": "DEBUG",  # the front ends log each forwarded request
        "BRANCHY_MAX_IMAGES_PER_REQUEST": "8",
    }
    with running_server(model_repo, tmp_path_factory.mktemp("front-ends"), env) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(served: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.base_url, timeout=TIMEOUT) as c:
        yield c


def _front_ends(server: ServerProcess) -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process(server.pid).children()
        if "service.frontend" in " ".join(p.cmdline())
    ]


def _multipart(seed: int, count: int = 3) -> tuple[bytes, str]:
    images = [bad.image_for(3, 32, 32, seed=seed + i) for i in range(count)]
    return encode_multipart(image_parts(images))


def _classify(client: httpx.Client, query: str = "", seed: int = 0) -> httpx.Response:
    body, ctype = _multipart(seed)
    return client.post(
        f"/v1/models/b-alexnet/classify{query}", content=body, headers={"content-type": ctype}
    )


def _forwarded_classify_lines(server: ServerProcess) -> int:
    return server.log().count("forwarding POST /v1/models/b-alexnet/classify")


_PER_RUN = ("queue_wait_ms", "inference_ms", "batch_size")


def _comparable(answer: dict) -> dict:
    """An answer without what differs from run to run (timings, batching)."""
    results = [{k: v for k, v in r.items() if k not in _PER_RUN} for r in answer["results"]]
    return {**{k: v for k, v in answer.items() if k != "timings"}, "results": results}


def test_the_front_ends_answer_as_the_main_application_does(
    client: httpx.Client, served: ServerProcess
) -> None:
    assert len(_front_ends(served)) == 2
    before = _forwarded_classify_lines(served)
    own = _classify(client, "?top_k=3")
    assert own.status_code == 200, own.text
    assert _forwarded_classify_lines(served) == before  # answered by a front end itself
    # "03" is a valid top_k for the main application, not in the front end's plain form:
    # this one is forwarded and answered by the full application.
    forwarded = _classify(client, "?top_k=03")
    assert forwarded.status_code == 200, forwarded.text
    assert _forwarded_classify_lines(served) == before + 1
    assert _comparable(own.json()) == _comparable(forwarded.json())
    assert set(own.json()["timings"]) == set(forwarded.json()["timings"])
    assert own.headers["content-type"] == forwarded.headers["content-type"]


def test_raw_image_body_and_request_thresholds_on_the_fast_path(
    client: httpx.Client, served: ServerProcess
) -> None:
    before = _forwarded_classify_lines(served)
    raw = bad.valid_request(ALEXNET, seed=3)
    resp = client.post(raw.path + "?thresholds=inf,inf", content=raw.body, headers=raw.headers)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["thresholds"] == ["inf", "inf"]
    assert answer["results"][0]["exit"]["index"] == 0  # everyone leaves at the first exit
    assert answer["results"][0]["filename"] is None
    assert _forwarded_classify_lines(served) == before


def test_admin_thresholds_apply_to_the_front_ends_answers(client: httpx.Client) -> None:
    resp = client.put(
        "/admin/models/b-alexnet/thresholds", json={"thresholds": [0.0, 0.0]}, headers=ADMIN
    )
    assert resp.status_code == 200, resp.text
    try:
        answer = _classify(client, seed=20).json()
        assert answer["thresholds"] == [0.0, 0.0]
        assert {r["exit"]["index"] for r in answer["results"]} == {2}  # nobody leaves early
    finally:
        client.delete("/admin/models/b-alexnet/thresholds", headers=ADMIN)


def test_request_metrics_are_counted_once_and_seen_by_the_next_scrape(client: httpx.Client) -> None:
    def counts() -> tuple[float, float]:
        samples = parse_metrics(client.get("/metrics").text)
        requests = metric_total(
            samples, "branchy_requests_total", model="b-alexnet", endpoint="classify", code="200"
        )
        return requests, metric_total(samples, "branchy_exit_total", model="b-alexnet")

    requests0, images0 = counts()
    for seed in range(5):
        assert _classify(client, seed=seed).status_code == 200
    # At once: a scrape first gathers what the front ends have not reported yet.
    assert counts() == (requests0 + 5, images0 + 15)
    time.sleep(0.3)  # anything counted twice would have arrived by now
    assert counts() == (requests0 + 5, images0 + 15)


def test_errors_are_the_main_applications(client: httpx.Client) -> None:
    body, ctype = encode_multipart(image_parts([bad.image_for(3, 32, 32)] * 9))
    too_many = client.post(
        "/v1/models/b-alexnet/classify", content=body, headers={"content-type": ctype}
    )
    assert too_many.status_code == 413
    assert too_many.json()["error"]["code"] == "too_many_images"
    unknown = client.post(
        "/v1/models/nope/classify", content=b"x", headers={"content-type": "image/png"}
    )
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    broken = client.post(
        "/v1/models/b-alexnet/classify", content=b"junk", headers={"content-type": "image/png"}
    )
    assert broken.status_code == 400
    assert broken.json()["error"]["code"] == "bad_image"


def test_a_reload_loses_no_request(client: httpx.Client) -> None:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        load = [pool.submit(_classify, client, "", seed) for seed in range(40)]
        reload = client.post("/admin/models/b-alexnet/reload", headers=ADMIN)
        statuses = [f.result().status_code for f in load]
    assert reload.status_code == 200, reload.text
    assert statuses == [200] * 40
    assert _classify(client, seed=99).status_code == 200


def test_a_dead_front_end_is_replaced(client: httpx.Client, served: ServerProcess) -> None:
    victim = _front_ends(served)[0]
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    deadline = time.monotonic() + 30
    while len(_front_ends(served)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(_front_ends(served)) == 2
    # The new front end serves once it has started; the other one served meanwhile.
    ok = 0
    while ok < 10 and time.monotonic() < deadline:
        try:
            with httpx.Client(base_url=served.base_url, timeout=TIMEOUT) as fresh:
                ok += _classify(fresh, seed=ok).status_code == 200
        except httpx.TransportError:
            time.sleep(0.1)
    assert ok == 10
    assert served.alive()


def test_sigterm_drains_accepted_requests_and_stops_every_process(
    model_repo: Path, tmp_path: Path
) -> None:
    # A long batch delay holds the requests in the queue until SIGTERM arrives.
    env = {"BRANCHY_HTTP_WORKERS": "2", "BRANCHY_MAX_BATCH_DELAY_MS": "1500"}
    with running_server(model_repo, tmp_path, env) as server:
        children = _front_ends(server)
        assert len(children) == 2

        def one(seed: int) -> int:
            with httpx.Client(base_url=server.base_url, timeout=TIMEOUT) as c:
                return _classify(c, seed=seed).status_code

        def queued() -> float:
            text = httpx.get(f"{server.base_url}/metrics", timeout=TIMEOUT).text
            return metric_total(parse_metrics(text), "branchy_queue_depth", model="b-alexnet")

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, seed) for seed in range(8)]
            deadline = time.monotonic() + 10
            while queued() < 8 * 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(server.pid, signal.SIGTERM)  # every request accepted and queued
            statuses = [f.result() for f in futures]
        assert server.proc.wait(60) == 0
    assert statuses == [200] * 8
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in children)


def test_forwarded_answers_keep_their_framing(client: httpx.Client) -> None:
    listed = client.get("/v1/models")
    assert listed.status_code == 200
    assert int(listed.headers["content-length"]) == len(listed.content)
    assert "transfer-encoding" not in listed.headers
    head = client.head("/healthz")
    assert head.status_code == 200 and head.content == b""
