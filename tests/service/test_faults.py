"""Faults and security (issue 5), against a real server process with the fault-injection
seam (``testsupport/hooked_server.py``):

* an exception inside one batch fails only that batch's requests (500 + error id, in the
  body and the log); concurrent requests in other batches and the next batch succeed;
* an out-of-memory error on a large batch is answered by splitting it (same answers as
  without the fault); an image that does not fit even alone fails clearly, and only it;
* reload with a missing or damaged checkpoint -- bad JSON, unknown format version, weights
  of another architecture, truncated weights, a pickle posing as weights -- answers 409
  and the old model keeps serving the same answers; the pickle is never unpickled;
* thresholds survive a real restart; damaged state files are reported and ignored;
* the admin token never reaches the log; model names are looked up in the loaded set,
  never used as paths (a checkpoint next to the repository cannot be reached).
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from service.state import state_file
from tests.service.conftest import TOKEN, ServerProcess
from testsupport import badimages as bad
from testsupport.reliability import (
    OfflineReference,
    assert_error,
    make_checkpoint,
    metric_total,
    parse_metrics,
)

AUTH = {"authorization": f"Bearer {TOKEN}"}
LENET = bad.Target("b-lenet", 1, 28, 28, 1)
TIMEOUT = httpx.Timeout(30.0)


class Faulty:
    """The module's hooked server, its private repository and its fault file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.repo = root / "repository"
        self.fault = root / "fault"
        self.state = root / "state"
        make_checkpoint(self.repo / "b-lenet", seed=0)
        # A valid checkpoint NEXT TO the repository: reachable only if a name were a path.
        make_checkpoint(root / "outside", seed=1)
        (self.repo / "notes").mkdir()  # a folder without a manifest is not a model
        self.server: ServerProcess | None = None

    def env(self) -> dict[str, str]:
        return {
            "BRANCHY_MODEL_REPOSITORY": str(self.repo),
            "BRANCHY_STATE_DIR": str(self.state),
            "BRANCHY_DEVICE": "cpu",
            "BRANCHY_WARMUP_BATCHES": "1",
            "BRANCHY_ADMIN_TOKEN": TOKEN,
            "BRANCHY_TEST_FAULT_FILE": str(self.fault),
            # Concurrent requests within 50 ms share a batch.
            "BRANCHY_MAX_BATCH_DELAY_MS": "50",
            "BRANCHY_STATE_POLL_S": "0",
            "OMP_NUM_THREADS": "1",  # two cores shared by the test process and the server
        }

    def start(self, log_name: str) -> ServerProcess:
        self.server = ServerProcess(self.env(), self.root / log_name, hooked=True)
        self.server.wait_ready()
        return self.server

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.base_url


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faulty]:
    f = Faulty(tmp_path_factory.mktemp("faults"))
    f.start("server-0.log")
    try:
        yield f
    finally:
        f.fault.unlink(missing_ok=True)
        if f.server is not None:
            f.server.stop()


@pytest.fixture
def client(faulty: Faulty) -> Iterator[httpx.Client]:
    faulty.fault.unlink(missing_ok=True)
    with httpx.Client(base_url=faulty.url, timeout=TIMEOUT) as c:
        yield c
    faulty.fault.unlink(missing_ok=True)


def classify(client: httpx.Client, pixels: list[np.ndarray]) -> httpx.Response:
    req = bad.classify_multipart(LENET, [("image/png", bad.png(p)) for p in pixels])
    return client.request(req.method, req.path, headers=req.headers, content=req.body)


def answers(resp: httpx.Response) -> list[tuple[int, int, float]]:
    assert resp.status_code == 200, resp.text
    return [(r["class_index"], r["exit"]["index"], r["entropy"]) for r in resp.json()["results"]]


def assert_same_answers(
    got: list[tuple[int, int, float]], want: list[tuple[int, int, float]], what: str = ""
) -> None:
    """Same classes and exits; entropies equal up to float noise."""
    assert [(c, e) for c, e, _ in got] == [(c, e) for c, e, _ in want], what
    np.testing.assert_allclose([h for *_, h in got], [h for *_, h in want], atol=1e-5)


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    return [bad.pixels(28, 28, 1, seed=seed + i) for i in range(n)]


# --------------------------------------------------------------------------- batch faults


def test_an_exception_fails_only_its_batch(faulty: Faulty, client: httpx.Client) -> None:
    before = parse_metrics(client.get("/metrics").text)
    faulty.fault.write_text("raise")  # one shot: the next batch raises, later ones do not
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(classify, client, images(1, seed=s)) for s in range(6)]
        responses = [f.result(timeout=30) for f in futures]
    failed = [r for r in responses if r.status_code != 200]
    assert failed, "the armed fault must fail one batch"
    ids = set()
    for r in failed:
        err = assert_error(r, 500, "internal")
        ids.add(err["id"])
        assert "injected" not in err["message"]  # internals stay in the log, not the answer
    # One batch failed, so one error id, shared by that batch's requests -- and only them.
    assert len(ids) == 1, ids
    for r in responses:
        if r.status_code == 200:
            assert len(answers(r)) == 1
    log = faulty.server.log() if faulty.server else ""
    (error_id,) = ids
    assert error_id in log and "injected fault" in log
    # The next batch works, and the failure was counted as a 500 of the classify endpoint.
    assert len(answers(classify(client, images(3, seed=40)))) == 3
    after = parse_metrics(client.get("/metrics").text)
    labels = {"model": "b-lenet", "endpoint": "classify", "code": "500"}
    grew = metric_total(after, "branchy_requests_total", **labels) - metric_total(
        before, "branchy_requests_total", **labels
    )
    assert grew == len(failed)


def test_out_of_memory_is_answered_by_splitting_the_batch(
    faulty: Faulty, client: httpx.Client
) -> None:
    pixels = images(8, seed=100)
    want = answers(classify(client, pixels))
    faulty.fault.write_text("oom 1")  # every (sub-)batch of 2+ images runs out of memory
    assert_same_answers(answers(classify(client, pixels)), want)
    assert "splitting" in (faulty.server.log() if faulty.server else "")

    # Not even one image fits: that request fails clearly, the server lives on.
    faulty.fault.write_text("oom 0")
    assert_error(classify(client, images(2, seed=7)), 500, "internal")
    faulty.fault.unlink()
    assert_same_answers(answers(classify(client, pixels)), want)


# --------------------------------------------------------------------------- reload


def _pickle_exploit(marker: Path) -> bytes:
    """A pickle that creates ``marker`` when loaded with ``pickle.load``/``torch.load``."""

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (open, (str(marker), "w"))

    return pickle.dumps(Exploit())


def test_reload_with_a_damaged_or_missing_checkpoint_keeps_the_old_model(
    faulty: Faulty, client: httpx.Client
) -> None:
    ckpt = faulty.repo / "b-lenet"
    pristine = faulty.root / "pristine"
    shutil.copytree(ckpt, pristine, dirs_exist_ok=True)
    other = make_checkpoint(faulty.root / "other-arch", architecture="b-alexnet")
    marker = faulty.root / "UNPICKLED"
    pixels = images(6, seed=200)
    want = answers(classify(client, pixels))

    manifest = json.loads((pristine / "manifest.json").read_text())
    damages: dict[str, Callable[[], object]] = {
        "manifest_not_json": lambda: (ckpt / "manifest.json").write_text("{broken"),
        "manifest_future_version": lambda: (ckpt / "manifest.json").write_text(
            json.dumps({**manifest, "format_version": 99})
        ),
        "manifest_missing": lambda: (ckpt / "manifest.json").unlink(),
        "weights_missing": lambda: (ckpt / "model.safetensors").unlink(),
        "weights_truncated": lambda: (ckpt / "model.safetensors").write_bytes(
            (pristine / "model.safetensors").read_bytes()[:1000]
        ),
        "weights_of_another_architecture": lambda: shutil.copy(
            other / "model.safetensors", ckpt / "model.safetensors"
        ),
        "weights_are_a_pickle": lambda: [
            (ckpt / name).write_bytes(_pickle_exploit(marker))
            for name in ("model.safetensors", "model.pt", "pytorch_model.bin")
        ],
        "folder_missing": lambda: shutil.rmtree(ckpt),
    }
    for name, damage in damages.items():
        damage()
        resp = client.post("/admin/models/b-lenet/reload", headers=AUTH)
        err = assert_error(resp, 409, "reload_failed")
        assert "keeps serving" in err["message"], (name, err)
        assert_same_answers(answers(classify(client, pixels)), want, name)
        # Restore the pristine checkpoint for the next damage.
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.copytree(pristine, ckpt)
    assert not marker.exists(), "a checkpoint was unpickled"

    # A good new checkpoint does replace the model: answers now follow its weights.
    shutil.rmtree(ckpt)
    make_checkpoint(ckpt, seed=5)
    resp = client.post("/admin/models/b-lenet/reload", headers=AUTH)
    assert resp.status_code == 200, resp.text
    ref = OfflineReference(ckpt)
    thresholds = [float(t) for t in resp.json()["thresholds"]]
    classes, exits = ref.early_exit(np.stack(pixels), thresholds)
    got = answers(classify(client, pixels))
    assert [(c, e) for c, e, _ in got] == list(zip(classes, exits, strict=True))
    # Put the original back for the other tests.
    shutil.rmtree(ckpt)
    shutil.copytree(pristine, ckpt)
    assert client.post("/admin/models/b-lenet/reload", headers=AUTH).status_code == 200


# --------------------------------------------------------------------------- state


@pytest.mark.slow  # a second server start; tests/service/test_admin.py restarts in-process
def test_thresholds_survive_a_real_restart(faulty: Faulty, client: httpx.Client) -> None:
    put = client.put("/admin/models/b-lenet/thresholds", headers=AUTH, json={"thresholds": [0.123]})
    assert put.status_code == 200, put.text
    assert faulty.server is not None
    assert faulty.server.stop() == 0
    faulty.start("server-1.log")
    with httpx.Client(base_url=faulty.url, timeout=TIMEOUT) as c:
        state = c.get("/admin/models/b-lenet/thresholds", headers=AUTH).json()
        assert state["thresholds"] == [0.123] and state["source"] == "admin"
        samples = parse_metrics(c.get("/metrics").text)
        assert metric_total(samples, "branchy_threshold", model="b-lenet", exit="0") == 0.123
        assert c.put(
            "/admin/models/b-lenet/thresholds", headers=AUTH, json={"thresholds": [0.0]}
        ).is_success


STATE_DAMAGE = {
    "empty": b"",
    "not_an_object": b"[0.5]",
    "nan": b'{"thresholds": [NaN]}',
    "string_number": b'{"thresholds": ["abc"]}',
    "huge_list": json.dumps({"thresholds": [0.5] * 100_000}).encode(),
    "not_utf8": bytes(range(256)) * 4,
    "directory": None,
}


@pytest.mark.parametrize("damage", list(STATE_DAMAGE))
def test_damaged_state_file_is_reported_and_ignored(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    settings = make_settings(admin_token=TOKEN, models=["b-lenet"])
    path = state_file(settings.state_dir, "b-lenet")
    path.parent.mkdir(parents=True, exist_ok=True)
    content = STATE_DAMAGE[damage]
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    caplog.set_level(logging.INFO)
    with TestClient(create_app(settings)) as client:
        # Start-up completes: ready within seconds, not never.
        deadline = time.monotonic() + 2  # an in-process start takes ~0.1 s
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, f"never ready:\n{caplog.text[-2000:]}"
            time.sleep(0.02)
        state = client.get("/admin/models/b-lenet/thresholds", headers=AUTH).json()
        assert state["source"] == "checkpoint", state
        assert "state" in caplog.text and "ignored" in caplog.text, caplog.text[-2000:]
        resp = client.post(
            "/v1/models/b-lenet/classify",
            content=bad.png(images(1)[0]),
            headers={"content-type": "image/png"},
        )
        assert resp.status_code == 200, resp.text


# --------------------------------------------------------------------------- security


def test_admin_token_never_reaches_the_log(faulty: Faulty, client: httpx.Client) -> None:
    near_miss = TOKEN[:-1] + ("x" if TOKEN[-1] != "x" else "y")
    url = "/admin/models/b-lenet/thresholds"
    assert client.get(url, headers=AUTH).status_code == 200
    for headers in (
        {"authorization": f"Bearer {near_miss}"},
        {"authorization": TOKEN},  # no scheme
        {"authorization": f"Basic {TOKEN}"},
        {"authorization": f"Bearer {TOKEN} {TOKEN}"},
        {},
    ):
        for resp in (
            client.get(url, headers=headers),
            client.put(url, headers=headers, json={"thresholds": [0.1]}),
            client.post("/admin/models/b-lenet/reload", headers=headers),
        ):
            err = assert_error(resp, 401, "unauthorized")
            assert TOKEN not in err["message"]
            assert resp.headers.get("www-authenticate", "").lower().startswith("bearer")
    assert client.get(url, headers=AUTH).json()["thresholds"] != [0.1]
    log = faulty.server.log() if faulty.server else ""
    assert "refused" in log  # the refusals are logged ...
    assert TOKEN not in log and near_miss not in log  # ... without the secrets


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/..%2Foutside",
        "/v1/models/..%2Foutside/classify",
        "/v1/models/..%2F..%2F..%2Fetc%2Fpasswd",
        "/v1/models/%2E%2E/classify",
        "/v1/models/notes/classify",
        "/v1/models/{}/classify".format("a" * 5000),
        "/v2/models/..%2Foutside",
        "/v2/models/..%2Foutside/infer",
        "/admin/models/..%2Foutside/reload",
        "/admin/models/..%2Foutside/thresholds",
        "/admin/models/notes/reload",
    ],
)
def test_model_names_are_looked_up_never_used_as_paths(
    faulty: Faulty, client: httpx.Client, path: str
) -> None:
    method = "GET" if path.count("/") == 3 or path.endswith("thresholds") else "POST"
    body = bad.image_for(1, 28, 28) if "classify" in path else b"{}"
    ctype = "image/png" if "classify" in path else "application/json"
    resp = client.request(method, path, headers={**AUTH, "content-type": ctype}, content=body)
    assert resp.status_code in (404, 422), (path, resp.status_code, resp.text[:300])
    if resp.status_code == 404:
        assert_error(resp, 404, ("model_not_found", "not_found"))
    listed = [m["name"] for m in client.get("/v1/models").json()["models"]]
    assert listed == ["b-lenet"], listed


def test_admin_routes_are_off_without_a_token(make_client: Callable[..., TestClient]) -> None:
    client = make_client(models=["b-lenet"])  # no BRANCHY_ADMIN_TOKEN
    for headers in ({}, AUTH, {"authorization": "Bearer "}):
        for resp in (
            client.get("/admin/models/b-lenet/thresholds", headers=headers),
            client.put(
                "/admin/models/b-lenet/thresholds", headers=headers, json={"thresholds": [9.0]}
            ),
            client.post("/admin/models/b-lenet/reload", headers=headers),
        ):
            assert resp.status_code == 403, resp.text
            assert resp.json()["error"]["code"] == "admin_disabled"
    # Nothing changed behind the refusals.
    resp = client.post(
        "/v1/models/b-lenet/classify",
        content=bad.image_for(1, 28, 28),
        headers={"content-type": "image/png"},
    )
    assert resp.json()["thresholds"] != [9.0]


def test_admin_token_is_compared_in_constant_time(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every admin request, right or wrong, goes through ``secrets.compare_digest``."""
    import secrets

    seen: list[tuple[bytes | str, bytes | str]] = []
    real = secrets.compare_digest

    def spy(a: bytes | str, b: bytes | str) -> bool:
        seen.append((a, b))
        return real(a, b)  # type: ignore[arg-type]

    monkeypatch.setattr(secrets, "compare_digest", spy)
    client = make_client(admin_token=TOKEN, models=["b-lenet"])
    url = "/admin/models/b-lenet/thresholds"
    assert client.get(url, headers=AUTH).status_code == 200
    assert client.get(url, headers={"authorization": "Bearer short"}).status_code == 401
    assert client.get(url, headers={"authorization": f"Bearer {TOKEN}x"}).status_code == 401
    assert len(seen) >= 3
