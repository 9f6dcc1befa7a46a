"""Overload and time (issue 5): a full queue answers 503 + Retry-After at once and counts
it; a request whose deadline passes while queued is dropped before compute and answered
504; in-flight requests are bounded; SIGTERM under load finishes every accepted request.

Every test runs a real server process. Orderings are observed, not timed: the queue is
filled and ``branchy_queue_depth`` read back before the request that must be refused,
and the refusal must arrive while the queued requests are still waiting.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.service.conftest import ServerProcess, running_server
from testsupport import badimages as bad
from testsupport.reliability import assert_error, metric_total, parse_metrics

LENET = bad.Target("b-lenet", 1, 28, 28, 1)
TIMEOUT = httpx.Timeout(30.0)


def post_image(base_url: str, seed: int = 0, images: int = 1) -> httpx.Response:
    """One classify request on its own connection (as independent clients would)."""
    pngs = [("image/png", bad.image_for(1, 28, 28, seed=seed + i)) for i in range(images)]
    req = bad.classify_multipart(LENET, pngs) if images > 1 else bad.valid_request(LENET, seed=seed)
    with httpx.Client(base_url=base_url, timeout=TIMEOUT) as c:
        return c.request(req.method, req.path, headers=req.headers, content=req.body)


def metrics(base_url: str) -> dict:
    return parse_metrics(httpx.get(f"{base_url}/metrics", timeout=10).text)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def established(pid: int) -> int:
    """TCP connections the server holds open (its HTTP front ends' included)."""
    main = psutil.Process(pid)
    return sum(
        c.status == "ESTABLISHED"
        for p in (main, *main.children(recursive=True))
        for c in p.net_connections(kind="tcp")
    )


def growth(before: dict, after: dict) -> Callable[..., float]:
    """``delta(name, **labels)``: how much a metric grew from one scrape to the next."""

    def delta(name: str, **labels: str) -> float:
        return metric_total(after, name, **labels) - metric_total(before, name, **labels)

    return delta


def queue_depth(base_url: str) -> float:
    return metric_total(metrics(base_url), "branchy_queue_depth", model="b-lenet")


@pytest.fixture(scope="module")
def held_server(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server whose admitted images wait 1 s for their batch (a long batch delay), with
    a queue of 4 images, at most 6 requests in flight and a 3 s request timeout."""
    env = {
        "BRANCHY_MODELS": "b-lenet",
        "BRANCHY_MAX_QUEUE": "4",
        "BRANCHY_MAX_BATCH_DELAY_MS": "1000",
        "BRANCHY_MAX_CONCURRENT_REQUESTS": "6",
        "BRANCHY_REQUEST_TIMEOUT_S": "3",
    }
    with running_server(model_repo, tmp_path_factory.mktemp("held"), env) as proc:
        yield proc


def test_full_queue_answers_503_with_retry_after_at_once(held_server: ServerProcess) -> None:
    url = held_server.base_url
    before = metrics(url)
    with ThreadPoolExecutor(8) as pool:
        admitted = [pool.submit(post_image, url, seed) for seed in range(4)]
        wait_for(lambda: queue_depth(url) == 4, "4 queued images")

        refused = post_image(url, seed=9)
        still_waiting = sum(not f.done() for f in admitted)
        err = assert_error(refused, 503, "queue_full")
        assert "full" in err["message"]
        assert int(refused.headers["retry-after"]) >= 1
        # "At once": refused while the admitted requests are still queued, not after.
        assert still_waiting == 4
        # A request's images are admitted all or none: 2 images do not fit in 0 places.
        assert_error(post_image(url, seed=20, images=2), 503, "queue_full")

        for f in admitted:
            resp = f.result(timeout=30)
            assert resp.status_code == 200, resp.text
    delta = growth(before, metrics(url))

    assert delta("branchy_rejected_total", model="b-lenet", reason="queue_full") == 2
    assert delta("branchy_requests_total", model="b-lenet", endpoint="classify", code="503") == 2
    # Refused images never reached the network.
    assert delta("branchy_exit_total", model="b-lenet") == 4
    # And once the queue drained the server serves again.
    assert post_image(url, seed=30).status_code == 200


def test_in_flight_requests_are_bounded(held_server: ServerProcess) -> None:
    """However many clients connect, at most N requests hold bodies and decoded images;
    more are refused at once with 503, so memory stays bounded. Slow uploads (a client
    trickling its body) hold their slot and are the worst case."""
    url = held_server.base_url
    release = threading.Event()
    png = bad.image_for(1, 28, 28, seed=3)

    def trickle() -> Iterator[bytes]:
        yield png[:10]
        release.wait(30)
        yield png[10:]

    def slow_upload() -> httpx.Response:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
            return c.post(
                "/v1/models/b-lenet/classify",
                content=trickle(),
                headers={"content-type": "image/png"},
            )

    with ThreadPoolExecutor(6) as pool:
        slow = [pool.submit(slow_upload) for _ in range(6)]
        refused: list[httpx.Response] = []
        # The uploads are in flight once the server holds their 6 connections.
        wait_for(lambda: established(held_server.proc.pid) >= 6, "6 connections")

        def probe_refused() -> bool:
            resp = post_image(url, seed=len(refused))
            refused.append(resp)
            return resp.status_code == 503

        wait_for(probe_refused, "a request to be refused while 6 uploads are in flight")
        err = assert_error(refused[-1], 503, "queue_full")
        assert "retry-after" in refused[-1].headers
        assert "in progress" in err["message"], err
        release.set()
        slow_codes = []
        for f in slow:
            resp = f.result(timeout=30)
            slow_codes.append(resp.status_code)
            if resp.status_code != 200:  # 6 uploads, 4 queue places: the rest are told so
                assert_error(resp, 503, "queue_full")
        assert slow_codes.count(200) >= 4, slow_codes
    assert post_image(url, seed=99).status_code == 200


def test_stalled_uploads_do_not_hold_slots_past_the_request_timeout(
    held_server: ServerProcess,
) -> None:
    """6 clients send headers and 10 bytes of a 1000-byte body, then go silent. They fill
    the 6 slots for a while, but not forever: once the 3 s request timeout has passed
    they are cut off with 408 and other clients are served again."""
    url = held_server.base_url
    head = (
        b"POST /v1/models/b-lenet/classify HTTP/1.1\r\nHost: test\r\n"
        b"Content-Type: image/png\r\nContent-Length: 1000\r\n\r\n" + b"\x89PNG\r\n\x1a\n\0\0"
    )
    stalled = []
    try:
        for _ in range(6):
            sock = socket.create_connection(("127.0.0.1", held_server.port))
            sock.sendall(head)
            stalled.append(sock)
        wait_for(lambda: post_image(url, seed=1).status_code == 503, "the slots to fill")
        time.sleep(4.5)  # 1.5 x the request timeout
        resp = post_image(url, seed=2)
        assert resp.status_code == 200, resp.text
        for sock in stalled:
            sock.settimeout(5)
            status_line = sock.recv(4096).split(b"\r\n", 1)[0]
            assert b" 408 " in status_line, status_line
    finally:
        for sock in stalled:
            sock.close()


#: Starts a hooked b-lenet server with an environment on top; gives it and its fault file.
HookedStart = Callable[[dict[str, str]], tuple[ServerProcess, Path]]


@pytest.fixture
def hooked_lenet(start_server: Callable[..., ServerProcess], tmp_path: Path) -> HookedStart:
    """Starts a ready b-lenet server whose batches obey a fault file
    (``testsupport/hooked_server.py``; no file: no fault), with the given environment on
    top, and gives the server and the path of its fault file."""
    fault = tmp_path / "fault"

    def start(env: dict[str, str]) -> tuple[ServerProcess, Path]:
        server = start_server(
            {"BRANCHY_MODELS": "b-lenet", "BRANCHY_TEST_FAULT_FILE": str(fault), **env},
            hooked=True,
        )
        return server, fault

    return start


def test_deadline_passing_in_the_queue_drops_the_request_before_compute(
    hooked_lenet: HookedStart,
) -> None:
    server, fault = hooked_lenet(
        {"BRANCHY_MAX_BATCH_SIZE": "1", "BRANCHY_REQUEST_TIMEOUT_S": "0.3"}
    )
    url = server.base_url
    before = metrics(url)
    fault.write_text("sleep 0.8")  # every batch is slow from now on
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post_image, url, 0)
        time.sleep(0.2)  # let the first request reach its (slow) batch
        second = pool.submit(post_image, url, 1)
        # Whichever image runs first computes for 0.8 s; the other one's 0.3 s deadline
        # passes meanwhile, in the queue (batches hold one image).
        answers = [first.result(timeout=30), second.result(timeout=30)]
    fault.unlink()
    answers.sort(key=lambda r: r.status_code)
    done, late = answers
    assert_error(late, 504, "deadline_exceeded")
    assert late.json()["error"]["id"]  # a 5xx: the id lets an operator find the log line
    # A batch that started before its deadline is finished, never cut in the middle.
    assert done.status_code == 200, done.text
    delta = growth(before, metrics(url))

    assert delta("branchy_rejected_total", model="b-lenet", reason="deadline_exceeded") == 1
    assert delta("branchy_requests_total", model="b-lenet", endpoint="classify", code="504") == 1
    # Dropped before compute: one image classified, one batch run.
    assert delta("branchy_exit_total", model="b-lenet") == 1
    assert delta("branchy_batch_size_count", model="b-lenet") == 1
    assert "expired" in server.log() or "deadline" in server.log()
    assert post_image(url, seed=5).status_code == 200


def _classify_ok(resp: httpx.Response, images: int = 1) -> bool:
    """A complete, valid answer (the JSON parses and holds every image's class)."""
    if resp.status_code != 200:
        return False
    results = resp.json()["results"]
    return len(results) == images and all(0 <= r["class_index"] < 10 for r in results)


def test_sigterm_under_load_finishes_every_accepted_request(hooked_lenet: HookedStart) -> None:
    server, fault = hooked_lenet(
        {"BRANCHY_MAX_BATCH_SIZE": "4", "BRANCHY_GRACEFUL_SHUTDOWN_S": "30"}
    )
    url = server.base_url
    fault.write_text("sleep 0.25")  # 12 queued images take ~0.75 s to drain
    stop = threading.Event()
    late: list[object] = []

    def keep_sending() -> None:
        # New clients keep arriving during the shutdown: each gets a complete answer, a
        # clear 503, or a refused connection -- never a cut-off response or another 5xx.
        seed = 1000
        while not stop.is_set():
            try:
                late.append(post_image(url, seed))
            except httpx.TransportError as exc:
                late.append(exc)
            seed += 1
            time.sleep(0.02)

    with ThreadPoolExecutor(12) as pool:
        accepted = [pool.submit(post_image, url, seed) for seed in range(12)]
        # Accepted = in the server's queue (or its batch), seen through the metrics.
        wait_for(lambda: queue_depth(url) >= 6, "requests to queue up")
        sender = threading.Thread(target=keep_sending, daemon=True)
        sender.start()
        time.sleep(0.05)
        server.proc.send_signal(15)  # SIGTERM
        status = server.proc.wait(60)
        stop.set()
        sender.join(30)
        answers = [f.result(timeout=30) for f in accepted]

    bad_answers = [(a.status_code, a.text[:200]) for a in answers if not _classify_ok(a)]
    assert not bad_answers, f"accepted requests not completed: {bad_answers}"
    for item in late:
        if isinstance(item, httpx.Response):
            if item.status_code != 200:
                assert_error(item, 503, ("shutting_down", "not_ready"))
            else:
                assert _classify_ok(item)
        else:
            assert isinstance(item, httpx.ConnectError | httpx.RemoteProtocolError), repr(item)
            if isinstance(item, httpx.RemoteProtocolError):
                assert "without sending" in str(item), repr(item)  # not a half answer
    log = server.log()
    assert "Traceback" not in log, log[-3000:]
    # Drained and stopped cleanly: exit status 0, not "killed by SIGTERM".
    assert status == 0, f"exit status {status}:\n{log[-2000:]}"
