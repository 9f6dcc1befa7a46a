"""Dynamic batching, metrics consistency, and the batcher's robustness mechanisms:
queue bound, deadline drop, a failing batch, out-of-memory splitting, request limits."""

from __future__ import annotations

import asyncio
import struct
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import service.batcher
from models import build_model, load_checkpoint
from service.batcher import Batcher, Classified, Engine, split_on_oom
from service.errors import ModelChanged
from service.metrics import Metrics
from service.preprocess import pixel_inputs
from service.settings import Settings
from tests.service.conftest import CIFAR, MNIST, TOKEN, encode, offline_input, random_pixels

PNG = {"content-type": "image/png"}


def _samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _total(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def _files(pixels) -> list:
    return [("images", (f"{i}.png", encode(p), "image/png")) for i, p in enumerate(pixels)]


def test_concurrent_requests_share_batches_and_metrics_add_up(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_batch_delay_ms=30, max_batch_size=32)
    pixels = random_pixels(MNIST, 40, seed=9)
    sizes = [1, 2, 3, 4] * 4  # 16 requests, 40 images

    def send(k: int) -> list[dict]:
        start = sum(sizes[:k])
        resp = client.post(
            "/v1/models/b-lenet/classify", files=_files(pixels[start : start + sizes[k]])
        )
        assert resp.status_code == 200, resp.text
        return resp.json()["results"]

    with ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(send, range(len(sizes))) for r in rs]
    assert len(results) == 40
    assert max(r["batch_size"] for r in results) > 1

    s = _samples(client)
    m = {"model": "b-lenet"}
    batches = _total(s, "branchy_batch_size_count", **m)
    images = _total(s, "branchy_batch_size_sum", **m)
    assert images == 40 and batches < 40, (batches, images)
    assert _total(s, "branchy_batch_size_bucket", le="1.0", **m) < batches  # some batch > 1
    # one exit count per classified image, one request count per request
    assert _total(s, "branchy_exit_total", **m) == 40
    exits = [r["exit"]["index"] for r in results]
    for e in (0, 1):
        assert _total(s, "branchy_exit_total", exit=str(e), **m) == exits.count(e)
    assert _total(s, "branchy_requests_total", code="200", endpoint="classify", **m) == 16
    assert _total(s, "branchy_request_duration_seconds_count", endpoint="classify", **m) == 16
    assert _total(s, "branchy_queue_wait_seconds_count", **m) == 40
    assert _total(s, "branchy_inference_duration_seconds_count", **m) == batches
    assert _total(s, "branchy_exit_entropy_count", **m) == 40
    assert _total(s, "branchy_queue_depth", **m) == 0
    assert _total(s, "branchy_model_info", model="b-lenet", architecture="b-lenet", exits="2") == 1
    assert _total(s, "branchy_threshold", exit="0", **m) == 0.0


def test_per_request_thresholds_in_one_shared_batch(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_batch_delay_ms=200, max_batch_size=64)
    images = _files(random_pixels(CIFAR, 3, seed=4))

    def send(thresholds: str | None) -> list[dict]:
        params = {"thresholds": thresholds} if thresholds else {}
        resp = client.post("/v1/models/b-alexnet/classify", files=images, params=params)
        assert resp.status_code == 200, resp.text
        return resp.json()["results"]

    with ThreadPoolExecutor(3) as pool:
        everyone, nobody, default = pool.map(send, ["inf,inf", "0,0", None])
    assert [r["exit"]["index"] for r in everyone] == [0, 0, 0]
    assert [r["exit"]["index"] for r in nobody] == [2, 2, 2]
    assert [r["exit"]["index"] for r in default] == [2, 2, 2]  # checkpoint thresholds are 0
    assert max(r["batch_size"] for r in everyone + nobody + default) > 3  # requests were mixed


def test_split_on_oom_answers_like_the_whole_batch() -> None:
    torch.manual_seed(0)
    model = build_model("b-lenet").eval()
    x = torch.randn(13, 1, 28, 28)
    t = torch.full((13, 1), 2.29)
    sizes: list[int] = []

    def fragile(xb: torch.Tensor, tb: torch.Tensor):  # type: ignore[no-untyped-def]
        sizes.append(xb.shape[0])
        if xb.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("injected")
        return model.early_exit(xb, tb)

    whole = model.early_exit(x, t)
    split = split_on_oom(fragile, x, t)
    assert torch.equal(split.exit_index, whole.exit_index)
    assert torch.allclose(split.logits, whole.logits, atol=1e-5)
    assert torch.allclose(split.entropy, whole.entropy, atol=1e-5)
    assert (
        sizes[0] == 13 and max(s for s in sizes[1:]) <= 7 and sum(s for s in sizes if s <= 3) == 13
    )

    def hopeless(xb: torch.Tensor, tb: torch.Tensor):  # type: ignore[no-untyped-def]
        raise torch.cuda.OutOfMemoryError("injected")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        split_on_oom(hopeless, x[:2], t[:2])


def test_oom_inside_the_server_is_answered_by_splitting(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = service.batcher.run_model

    def oom_above_two(model, x, t, *rest):  # type: ignore[no-untyped-def]
        if x.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("injected")
        return real(model, x, t, *rest)

    monkeypatch.setattr(service.batcher, "run_model", oom_above_two)
    client = make_client()
    resp = client.post("/v1/models/b-lenet/classify", files=_files(random_pixels(MNIST, 9)))
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["results"]) == 9


def test_a_failing_batch_fails_only_its_requests(
    make_client: Callable[..., TestClient],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = service.batcher.run_model
    calls = {"n": 0}

    def fail_first(model, x, t, *rest):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return real(model, x, t, *rest)

    client = make_client()
    monkeypatch.setattr(service.batcher, "run_model", fail_first)
    image = encode(random_pixels(MNIST, 1)[0])
    bad = client.post("/v1/models/b-lenet/classify", content=image, headers=PNG)
    assert bad.status_code == 500
    error = bad.json()["error"]
    assert error["code"] == "internal" and len(error["id"]) >= 8
    assert error["id"] in caplog.text and "injected fault" in caplog.text
    good = client.post("/v1/models/b-lenet/classify", content=image, headers=PNG)
    assert good.status_code == 200, good.text


def _slow(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    real = service.batcher.run_model

    def slow(model, x, t, *rest):  # type: ignore[no-untyped-def]
        time.sleep(seconds)
        return real(model, x, t, *rest)

    monkeypatch.setattr(service.batcher, "run_model", slow)


def test_full_queue_answers_503_at_once(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    _slow(monkeypatch, 0.3)
    client = make_client(max_queue=4, max_batch_size=1, max_batch_delay_ms=0)
    pixels = random_pixels(MNIST, 3)

    def send(_: int) -> tuple[int, float, dict]:
        start = time.monotonic()
        resp = client.post("/v1/models/b-lenet/classify", files=_files(pixels))
        return resp.status_code, time.monotonic() - start, resp

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, range(4)))
    codes = [a[0] for a in answers]
    assert 200 in codes and 503 in codes, codes
    for status, seconds, resp in answers:
        if status == 503:
            assert resp.headers["retry-after"] == "1"
            assert resp.json()["error"]["code"] == "queue_full"
            assert seconds < 0.3  # refused at once, not after waiting
    s = _samples(client)
    assert _total(s, "branchy_rejected_total", model="b-lenet", reason="queue_full") == codes.count(
        503
    )


def test_expired_requests_are_dropped_before_compute(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    _slow(monkeypatch, 0.4)
    client = make_client(request_timeout_s=0.2, max_batch_size=1, max_batch_delay_ms=0)
    image = encode(random_pixels(MNIST, 1)[0])
    calls_before = _total(_samples(client), "branchy_batch_size_count", model="b-lenet")

    def send(_: int) -> int:
        return client.post("/v1/models/b-lenet/classify", content=image, headers=PNG).status_code

    with ThreadPoolExecutor(3) as pool:
        codes = list(pool.map(send, range(3)))
    assert codes.count(504) >= 1, codes
    s = _samples(client)
    dropped = _total(s, "branchy_rejected_total", model="b-lenet", reason="deadline_exceeded")
    assert dropped == codes.count(504)
    ran = _total(s, "branchy_batch_size_count", model="b-lenet") - calls_before
    assert ran == codes.count(200) + 0  # the dropped images never reached the model


def test_request_limits(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_body_bytes=20_000, max_images_per_request=3, max_image_pixels=32 * 32)
    small = encode(random_pixels(MNIST, 1)[0])
    resp = client.post("/v1/models/b-lenet/classify", files=_files(random_pixels(MNIST, 4)))
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "too_many_images"
    resp = client.post("/v1/models/b-lenet/classify", content=small + b"\0" * 30_000, headers=PNG)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"

    def chunks():  # streamed, no Content-Length: the limit applies while reading
        yield small
        for _ in range(10):
            yield b"\0" * 5000

    resp = client.post("/v1/models/b-lenet/classify", content=chunks(), headers=PNG)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"
    # The admin routes check the token before reading a body (403 here: admin is off),
    # and apply the same limit to the body once they read it.
    resp = client.put("/admin/models/b-lenet/thresholds", content=chunks(),
                      headers={"content-type": "application/json"})  # fmt: skip
    assert resp.status_code == 403
    admin = make_client(max_body_bytes=20_000, admin_token=TOKEN)
    resp = admin.put("/admin/models/b-lenet/thresholds", content=chunks(),
                     headers={"content-type": "application/json",
                              "authorization": f"Bearer {TOKEN}"})  # fmt: skip
    assert resp.status_code == 413
    big = encode(random_pixels(CIFAR, 1)[0].repeat(2, 0))  # 64x32 > 32*32 pixels
    resp = client.post("/v1/models/b-lenet/classify", content=big, headers=PNG)
    assert resp.status_code == 413 and "pixels" in resp.json()["error"]["message"]
    assert client.post("/v1/models/b-lenet/classify", content=small, headers=PNG).status_code == 200
    s = _samples(client)
    assert _total(s, "branchy_rejected_total", reason="too_large") == 4
    too_large = _total(_samples(admin), "branchy_rejected_total", reason="too_large")
    assert too_large == 1


def _png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares ``width`` × ``height`` 1-bit pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + width // 8) * 16)  # a few rows of zeros
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_from_its_header(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    bomb = _png_declaring(30000, 30000)  # 900 M pixels in a few kB
    assert len(bomb) < 10_000
    start = time.monotonic()
    resp = client.post("/v1/models/b-lenet/classify", content=bomb, headers=PNG)
    assert resp.status_code == 413, resp.text
    assert "pixels" in resp.json()["error"]["message"]
    assert time.monotonic() - start < 5  # refused from the header, no 900 M-pixel decode
    ok = client.post("/v1/models/b-lenet/classify", content=encode(random_pixels(MNIST, 1)[0]),
                     headers=PNG)  # fmt: skip
    assert ok.status_code == 200


class _Swappable:
    """A ModelSource whose engine a test replaces, as an admin reload does."""

    def __init__(self, engine: Engine, thresholds: tuple[float, ...]) -> None:
        self.current = (engine, thresholds)

    def snapshot(self) -> tuple[Engine, tuple[float, ...]]:
        return self.current


def test_images_queued_before_a_reload_that_changes_the_model_run_on_their_engine(
    model_repo: Path,
) -> None:
    """A reload to a net with another input shape and exit count strands no queued image."""
    lenet = Engine(load_checkpoint(model_repo / "b-lenet"), torch.device("cpu"))
    alexnet = Engine(load_checkpoint(model_repo / "b-alexnet"), torch.device("cpu"))
    source = _Swappable(lenet, (0.5,))
    x_old = offline_input(random_pixels(MNIST, 6, seed=3), MNIST)
    x_new = offline_input(random_pixels(CIFAR, 2, seed=4), CIFAR)

    async def scenario() -> tuple[list[Classified], list[Classified]]:
        batcher = Batcher("m", source, Metrics(), max_batch_size=64, max_delay_s=0.2, max_queue=64)
        batcher.start()
        old = batcher.submit(list(x_old[:3]), deadline=time.monotonic() + 30)
        old += batcher.submit(list(x_old[3:]), deadline=time.monotonic() + 30, thresholds=[0.0])
        source.current = (alexnet, (0.1, 0.2))  # the reload, while those six wait
        with pytest.raises(ModelChanged):  # decoded for the old model, queued after
            batcher.submit(list(x_old[:1]), deadline=time.monotonic() + 30)
        new = batcher.submit(list(x_new), deadline=time.monotonic() + 30)
        answers = await asyncio.gather(*old), await asyncio.gather(*new)
        await batcher.stop()
        return answers

    old, new = asyncio.run(scenario())
    want_old = lenet.run(x_old, torch.tensor([[0.5]] * 3 + [[0.0]] * 3))
    assert [a.exit_index for a in old] == want_old.exit_index.tolist()
    assert [a.class_index for a in old] == want_old.probabilities.argmax(1).tolist()
    assert [a.thresholds for a in old] == [(0.5,)] * 3 + [(0.0,)] * 3
    assert all(a.class_names == lenet.checkpoint.class_names for a in old)
    want_new = alexnet.run(x_new, torch.tensor([[0.1, 0.2]] * 2))
    assert [a.exit_index for a in new] == want_new.exit_index.tolist()
    assert all(a.class_names == alexnet.checkpoint.class_names for a in new)


def test_pixels_are_normalised_with_their_batch_exactly_as_offline(model_repo: Path) -> None:
    """uint8 pixels (what the routes and the engine link queue), float inputs and a mix
    of both in one batch: the same answers, bit for bit, as the offline input."""
    engine = Engine(load_checkpoint(model_repo / "b-alexnet"), torch.device("cpu"))
    source = _Swappable(engine, (0.1, 0.2))
    pixels = random_pixels(CIFAR, 6, seed=5)
    x = offline_input(pixels, CIFAR)
    as_pixels = pixel_inputs(pixels)
    assert all(p.dtype == torch.uint8 and tuple(p.shape) == CIFAR.shape for p in as_pixels)

    async def scenario(*requests: list[torch.Tensor]) -> list[Classified]:
        batcher = Batcher("m", source, Metrics(), max_batch_size=64, max_delay_s=0.2, max_queue=64)
        batcher.start()
        futures = [f for r in requests for f in batcher.submit(r, deadline=time.monotonic() + 30)]
        answers = list(await asyncio.gather(*futures))
        await batcher.stop()
        return answers

    want = engine.run(x, torch.tensor([[0.1, 0.2]] * 6))
    for requests in ([as_pixels], [list(x)], [as_pixels[:3], list(x[3:])]):
        got = asyncio.run(scenario(*requests))
        assert len({a.batch_size for a in got}) == 1  # one batch
        assert [a.exit_index for a in got] == want.exit_index.tolist()
        assert torch.equal(torch.stack([a.probabilities for a in got]), want.probabilities)


def test_warm_up_measures_what_a_batch_costs_whatever_its_size(model_repo: Path) -> None:
    engine = Engine(load_checkpoint(model_repo / "b-alexnet"), torch.device("cpu"))
    engine.warm_up([1])  # one size: nothing to draw a line through
    assert engine.batch_overhead_s is None
    engine.warm_up([1, 32])
    overhead = engine.batch_overhead_s
    assert overhead is not None
    # non-negative, and below what a batch of one costs all told
    start = time.perf_counter()
    engine.run(torch.zeros((1, *CIFAR.shape)), torch.zeros((1, 2)))
    assert 0.0 <= overhead <= 5 * (time.perf_counter() - start) + 1e-3


def _first_wait(engine: Engine, *, max_delay_s: float, adaptive: bool) -> tuple[float, float]:
    """(queue wait of a lone image, the exported wait limit) on a batcher that starts idle."""
    source = _Swappable(engine, (0.1, 0.2))
    metrics = Metrics()

    async def scenario() -> Classified:
        batcher = Batcher(
            "m",
            source,
            metrics,
            max_batch_size=64,
            max_delay_s=max_delay_s,
            max_queue=64,
            adaptive_delay=adaptive,
        )
        batcher.start()
        pixels = pixel_inputs(random_pixels(CIFAR, 1, seed=6))
        (future,) = batcher.submit(pixels, deadline=time.monotonic() + 60)
        answer = await future
        await batcher.stop()
        return answer

    answer = asyncio.run(scenario())
    limit = metrics.registry.get_sample_value("branchy_batch_wait_limit_seconds", {"model": "m"})
    assert limit is not None
    return answer.queue_wait_s, limit


def test_an_idle_engine_waits_for_a_batch_no_longer_than_a_batch_costs(model_repo: Path) -> None:
    """With the adaptive delay a lone image waits at most the engine's fixed cost per
    batch, not the whole max delay; without it (or with no measured cost) the max delay."""
    engine = Engine(load_checkpoint(model_repo / "b-alexnet"), torch.device("cpu"))
    assert _first_wait(engine, max_delay_s=0.3, adaptive=True) >= (0.3, 0.3)  # not measured
    engine.warm_up([1, 16])
    overhead = engine.batch_overhead_s
    assert overhead is not None and overhead < 0.1
    wait, limit = _first_wait(engine, max_delay_s=3.0, adaptive=True)
    assert limit == overhead
    assert wait < 1.0  # far below the 3 s max delay (the overhead plus scheduling)
    wait, limit = _first_wait(engine, max_delay_s=0.3, adaptive=False)
    assert limit == 0.3 and wait >= 0.3
    # a max delay shorter than the fixed cost stays the limit
    assert _first_wait(engine, max_delay_s=0.0, adaptive=True)[1] == 0.0


def test_adaptive_batch_delay_setting_reaches_the_batcher(
    make_settings: Callable[..., Settings],
) -> None:
    assert make_settings().batcher_options()["adaptive_delay"] is True
    off = make_settings(adaptive_batch_delay=False)
    assert off.batcher_options()["adaptive_delay"] is False


@pytest.mark.parametrize("full", [True, False], ids=["full-on-loop", "partial-in-thread"])
def test_a_batch_whose_answers_fail_to_build_fails_alone(model_repo: Path, full: bool) -> None:
    """An error while a computed batch is answered (here the shadow monitor's sampling)
    fails that batch's requests with an internal error (500 with an error id), and the
    next batch is answered: whether the answers are built on the event loop (full
    batches) or in the batch thread (batches that did not fill)."""
    engine = Engine(load_checkpoint(model_repo / "b-alexnet"), torch.device("cpu"))
    source = _Swappable(engine, (0.1, 0.2))
    offers = []

    class Sink:
        def offer(self, engine: Engine, x: torch.Tensor, answers: list) -> None:
            offers.append(len(answers))
            if len(offers) == 1:
                raise RuntimeError("the shadow broke")

    pixels = pixel_inputs(random_pixels(CIFAR, 8, seed=7))

    async def scenario() -> tuple[list[BaseException | Classified], list[Classified]]:
        batcher = Batcher("m", source, Metrics(), max_batch_size=4 if full else 8,
                          max_delay_s=0.0, max_queue=64)  # fmt: skip
        batcher.shadow = Sink()
        batcher.start()
        first = batcher.submit(pixels[:4], deadline=time.monotonic() + 30)
        failed = await asyncio.gather(*first, return_exceptions=True)
        second = batcher.submit(pixels[4:], deadline=time.monotonic() + 30)
        answered = list(await asyncio.gather(*second))
        await batcher.stop()
        return failed, answered

    failed, answered = asyncio.run(scenario())
    assert all(isinstance(f, service.batcher.InternalError) for f in failed), failed
    assert [a.batch_size for a in answered] == [4] * 4 and offers == [4, 4]


@pytest.mark.parametrize("early_release", [True, False])
def test_full_batches_are_answered_on_the_event_loop_and_the_same(
    model_repo: Path, early_release: bool
) -> None:
    """When batches fill, the engine is the bottleneck and the batch thread leaves
    building the answers to the event loop; when they do not, the thread builds them.
    Either way every image gets the engine's answer for it, in its place."""
    engine = Engine(load_checkpoint(model_repo / "b-alexnet"), torch.device("cpu"))
    thresholds = (0.3, 0.6)
    builders: list[str] = []

    class Sink:  # sees every batch's answers where they are built
        def offer(self, engine: Engine, x: torch.Tensor, answers: list) -> None:
            builders.append(threading.current_thread().name)

    pixels = pixel_inputs(random_pixels(CIFAR, 16, seed=11))
    x = torch.stack([engine.checkpoint.input_spec.normalise(p) for p in pixels])
    want = engine.run(x, torch.tensor([thresholds] * 16))

    async def scenario(max_batch_size: int) -> list[Classified]:
        batcher = Batcher("m", _Swappable(engine, thresholds), Metrics(),
                          max_batch_size=max_batch_size, max_delay_s=0.0, max_queue=64,
                          early_release=early_release)  # fmt: skip
        batcher.shadow = Sink()
        batcher.start()
        answers = []
        for k in range(0, 16, 4):  # one request at a time: batches of 4
            futures = batcher.submit(pixels[k : k + 4], deadline=time.monotonic() + 30)
            answers += await asyncio.gather(*futures)
        await batcher.stop()
        return answers

    for max_batch_size, where in ((4, "MainThread"), (8, "batch-m")):
        builders.clear()
        answers = asyncio.run(scenario(max_batch_size))
        assert builders and all(b.startswith(where) for b in builders), (max_batch_size, builders)
        assert [a.exit_index for a in answers] == want.exit_index.tolist()
        assert [a.class_index for a in answers] == want.probabilities.argmax(1).tolist()
        got = torch.stack([a.probabilities for a in answers])
        torch.testing.assert_close(got, want.probabilities, rtol=1e-5, atol=1e-6)
        assert all(a.batch_size == 4 for a in answers)


def test_due_batches_run_back_to_back_while_the_event_loop_is_busy(model_repo: Path) -> None:
    """Once a batch is running, every batch already due after it (here: full) starts in
    the worker thread without a trip through the event loop, so an event loop busy
    answering requests does not idle the engine; each batch's answers still arrive."""
    engine = Engine(load_checkpoint(model_repo / "b-alexnet"), torch.device("cpu"))
    started: list[float] = []
    run = engine.run

    def timed_run(*args, **kwargs):  # the real engine, its start times recorded
        started.append(time.monotonic())
        return run(*args, **kwargs)

    engine.run = timed_run  # type: ignore[method-assign]
    pixels = pixel_inputs(random_pixels(CIFAR, 12, seed=8))

    async def scenario() -> tuple[float, list[Classified]]:
        batcher = Batcher("m", _Swappable(engine, (0.1, 0.2)), Metrics(), max_batch_size=4,
                          max_delay_s=0.0, max_queue=64, early_release=False)  # fmt: skip
        batcher.start()
        futures = batcher.submit(pixels, deadline=time.monotonic() + 60)
        while batcher.depth == 12:  # until the first batch is taken
            await asyncio.sleep(0)
        time.sleep(2.0)  # the event loop is busy (blocked) for 2 s
        busy_until = time.monotonic()
        answers = list(await asyncio.gather(*futures))
        await batcher.stop()
        return busy_until, answers

    busy_until, answers = asyncio.run(scenario())
    assert len(started) == 3 and all(t < busy_until for t in started), (started, busy_until)
    assert [a.batch_size for a in answers] == [4] * 12


def test_a_failure_between_batches_loses_no_answer_and_the_batcher_goes_on(
    model_repo: Path,
) -> None:
    """If the batch thread's own bookkeeping fails after a batch (here: deciding whether
    the next batch is due), that batch's answers still arrive and later requests are
    served."""
    engine = Engine(load_checkpoint(model_repo / "b-alexnet"), torch.device("cpu"))

    class Flaky(Batcher):
        broke = False

        def _due(self) -> bool:
            if not self.broke:
                self.broke = True
                raise RuntimeError("bookkeeping broke")
            return super()._due()

    pixels = pixel_inputs(random_pixels(CIFAR, 8, seed=9))

    async def scenario() -> tuple[list[Classified], list[Classified]]:
        batcher = Flaky("m", _Swappable(engine, (0.1, 0.2)), Metrics(), max_batch_size=4,
                        max_delay_s=0.0, max_queue=64, early_release=False)  # fmt: skip
        batcher.start()
        first = await asyncio.gather(*batcher.submit(pixels[:4], deadline=time.monotonic() + 30))
        later = await asyncio.gather(*batcher.submit(pixels[4:], deadline=time.monotonic() + 30))
        await batcher.stop()
        return list(first), list(later)

    first, later = asyncio.run(scenario())
    assert [a.batch_size for a in first + later] == [4] * 8
