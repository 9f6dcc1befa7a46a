"""``branchy_client.Client`` and ``AsyncClient`` against a real server process: typed
answers equal to the server's own JSON, per-request thresholds, the admin calls, 503
retries honouring ``Retry-After``, and a typed error for every failure."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import branchy_client as bc
from tests.client.images import write_pngs
from tests.service.conftest import TOKEN, ServerProcess, free_port, running_server
from testsupport.reliability import metric_total, parse_metrics


def test_importing_the_client_imports_neither_torch_nor_the_server() -> None:
    code = (
        "import sys, branchy_client, branchy_client.cli; "
        "bad = [m for m in ('torch', 'numpy', 'service', 'models', 'fastapi') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_models_and_model_description(server: ServerProcess) -> None:
    with bc.Client(server.base_url) as client:
        names = {m.name: m for m in client.models()}
        assert set(names) == {"b-lenet", "b-alexnet"}
        assert names["b-alexnet"].num_exits == 3 and names["b-alexnet"].ready
        info = client.model("b-lenet")
    raw = httpx.get(f"{server.base_url}/v1/models/b-lenet").json()
    assert info.name == "b-lenet" and info.num_exits == 2
    assert info.classes == tuple(raw["classes"])
    assert info.thresholds == tuple(float(t) for t in raw["thresholds"])
    assert info.threshold_source == raw["threshold_source"]
    assert info.exit_macs == tuple(raw["exit_macs"]) and info.has_calibration
    assert info.input["height"] == 28


def test_classify_paths_and_bytes_equal_the_servers_json(
    server: ServerProcess, tmp_path: Path
) -> None:
    paths = write_pngs(tmp_path, 3)
    with bc.Client(server.base_url) as client:
        answer = client.classify(
            "b-lenet", [paths[0], str(paths[1]), paths[2].read_bytes()], top_k=3
        )
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]
    raw = httpx.post(
        f"{server.base_url}/v1/models/b-lenet/classify", params={"top_k": 3}, files=files
    ).json()
    assert answer.model == "b-lenet" and len(answer.predictions) == 3
    for p, r in zip(answer.predictions, raw["results"], strict=True):
        assert (p.class_index, p.class_name, p.exit_index) == (
            r["class_index"],
            r["class_name"],
            r["exit"]["index"],
        )
        assert p.confidence == pytest.approx(r["confidence"], abs=1e-6)
        assert p.entropy == pytest.approx(r["entropy"], abs=1e-6)
        assert p.exit_count == 2 and len(p.top_k) == 3
        assert p.top_k[0].class_name == p.class_name
        assert p.probabilities[p.class_name] == pytest.approx(p.confidence, abs=1e-6)
    assert [p.filename for p in answer.predictions] == ["0.png", "1.png", "image-2"]
    assert answer.timings.total_ms > 0 and answer.round_trip_ms >= answer.timings.total_ms * 0.5
    assert answer.retries == 0


def test_request_thresholds_decide_the_exit(server: ServerProcess, tmp_path: Path) -> None:
    paths = write_pngs(tmp_path, 4)
    with bc.Client(server.base_url) as client:
        everyone_early = client.classify("b-lenet", paths, thresholds=[math.inf])
        nobody_early = client.classify("b-lenet", paths, thresholds=[0.0])
    assert everyone_early.thresholds == (math.inf,)
    assert [p.exit_index for p in everyone_early.predictions] == [0] * 4
    assert [p.exit_index for p in nobody_early.predictions] == [1] * 4
    assert not any(p.early for p in nobody_early.predictions)


def test_async_client_gives_the_sync_answers(server: ServerProcess, tmp_path: Path) -> None:
    paths = write_pngs(tmp_path, 6, size=32, channels=3)

    async def run() -> list[bc.Classification]:
        async with bc.AsyncClient(server.base_url) as client:
            assert await client.ready()
            assert {m.name for m in await client.models()} == {"b-lenet", "b-alexnet"}
            assert (await client.model("b-alexnet")).num_exits == 3
            return list(
                await asyncio.gather(*(client.classify("b-alexnet", [p], top_k=2) for p in paths))
            )

    answers = asyncio.run(run())
    with bc.Client(server.base_url) as client:
        together = client.classify("b-alexnet", paths, top_k=2)
    for a, p in zip(answers, together.predictions, strict=True):
        (q,) = a.predictions
        assert (q.class_index, q.exit_index) == (p.class_index, p.exit_index)
        assert q.entropy == pytest.approx(p.entropy, abs=1e-5)


def test_admin_calls_read_and_set_thresholds(server: ServerProcess) -> None:
    with bc.Client(server.base_url, admin_token=TOKEN) as client:
        before = client.get_thresholds("b-lenet")
        assert before.model == "b-lenet" and len(before.thresholds) == 1
        assert before.expected is not None and before.expected.calibration_samples == 200
        state = client.set_thresholds("b-lenet", [0.25])
        assert state.thresholds == (0.25,) and state.source == "admin"
        assert client.model("b-lenet").thresholds == (0.25,)
        chosen = client.set_thresholds("b-lenet", tolerance=0.05)
        assert chosen.expected is not None
        final = client.model("b-lenet")
        assert final.thresholds == chosen.thresholds and final.threshold_source == "admin"
        client.set_thresholds("b-lenet", before.thresholds)


def test_every_failure_is_a_typed_error(server: ServerProcess, tmp_path: Path) -> None:
    with bc.Client(server.base_url) as client:
        with pytest.raises(bc.NotFound) as nf:
            client.classify("no-such-model", [b"x"])
        assert nf.value.code == "model_not_found" and nf.value.status == 404
        assert "b-lenet" in str(nf.value)  # the server's message names the models
        with pytest.raises(bc.BadRequest) as bad:
            client.classify("b-lenet", [b"this is not an image"])
        assert bad.value.status == 400
        with pytest.raises(bc.InvalidRequest):
            client.classify("b-lenet", [write_pngs(tmp_path, 1)[0]], thresholds=[1.0, 2.0])
        with pytest.raises(bc.ImageReadError) as unreadable:
            client.classify("b-lenet", [tmp_path / "missing.png"])
        assert unreadable.value.path.endswith("missing.png")
        with pytest.raises(bc.ImageReadError):
            client.classify("b-lenet", [tmp_path])  # a folder
        with pytest.raises(bc.AdminTokenMissing):
            client.get_thresholds("b-lenet")
        with pytest.raises(ValueError):
            client.set_thresholds("b-lenet", [0.1], tolerance=0.1)
    wrong = bc.Client(server.base_url, admin_token="wrong-token-123")
    with wrong as client, pytest.raises(bc.Unauthorized):
        client.get_thresholds("b-lenet")
    nobody = bc.Client(f"http://127.0.0.1:{free_port()}")
    with nobody as client, pytest.raises(bc.ConnectionFailed, match="cannot reach the server"):
        client.models()
    # every one of them is a BranchyError with a one-line message
    assert issubclass(bc.ServerError, bc.BranchyError)
    assert "\n" not in str(nf.value)


@pytest.fixture(scope="module")
def held_server(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Admitted images wait 1.5 s for their batch, and 4 fill the queue: a request made
    while the queue is full gets 503 with ``Retry-After: 1``."""
    env = {
        "BRANCHY_MODELS": "b-lenet",
        "BRANCHY_MAX_QUEUE": "4",
        "BRANCHY_MAX_BATCH_DELAY_MS": "1500",
    }
    with running_server(model_repo, tmp_path_factory.mktemp("held"), env) as proc:
        yield proc


def _fill_queue(server: ServerProcess, paths: list[Path]) -> threading.Thread:
    """Queue four images in a background request; returns once they are queued."""

    def post() -> None:
        with bc.Client(server.base_url, retries=0) as c:
            c.classify("b-lenet", paths)

    thread = threading.Thread(target=post)
    thread.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = parse_metrics(httpx.get(f"{server.base_url}/metrics").text)
        if metric_total(m, "branchy_queue_depth", model="b-lenet") == 4:
            return thread
        time.sleep(0.02)
    raise AssertionError("the queue did not fill")


def test_503_is_retried_after_retry_after(held_server: ServerProcess, tmp_path: Path) -> None:
    paths = write_pngs(tmp_path, 5)
    filler = _fill_queue(held_server, paths[:4])
    start = time.monotonic()
    with bc.Client(held_server.base_url, retries=5) as client:
        answer = client.classify("b-lenet", [paths[4]])
    waited = time.monotonic() - start
    filler.join(30)
    assert answer.retries >= 1 and len(answer.predictions) == 1
    assert waited >= 0.9 * answer.retries  # each retry waited Retry-After (1 s)
    m = parse_metrics(httpx.get(f"{held_server.base_url}/metrics").text)
    assert metric_total(m, "branchy_rejected_total", model="b-lenet", reason="queue_full") >= 1


def test_503_without_retries_left_raises_overloaded(
    held_server: ServerProcess, tmp_path: Path
) -> None:
    paths = write_pngs(tmp_path, 5)
    filler = _fill_queue(held_server, paths[:4])
    with bc.Client(held_server.base_url, retries=0) as client, pytest.raises(bc.Overloaded) as err:
        client.classify("b-lenet", [paths[4]])
    filler.join(30)
    assert err.value.status == 503 and err.value.code == "queue_full"
    assert err.value.retry_after == 1.0


def test_async_client_retries_too(held_server: ServerProcess, tmp_path: Path) -> None:
    paths = write_pngs(tmp_path, 5)
    filler = _fill_queue(held_server, paths[:4])

    async def run() -> bc.Classification:
        async with bc.AsyncClient(held_server.base_url, retries=5) as client:
            return await client.classify("b-lenet", [paths[4]])

    answer = asyncio.run(run())
    filler.join(30)
    assert answer.retries >= 1 and len(answer.predictions) == 1
