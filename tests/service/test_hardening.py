"""Hardening (issue 11): what an independent attack corpus and a first-time user found,
by class, each against a real server process (``tests/service/conftest.py``'s launcher).

Every malformed request must be a 4xx in the contract's shape (the Open Inference
Protocol's under ``/v2``), never a 5xx, a hang or a traceback in the log; a client's own
fault (a disconnect, a cut-off body) is never counted as a server error.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.service.conftest import (
    CIFAR,
    MNIST,
    ROOT,
    TOKEN,
    ServerProcess,
    encode,
    random_pixels,
    running_server,
    write_checkpoint,
)
from testsupport import badimages as bad
from testsupport.multipart import encode_multipart
from testsupport.procstat import tree_cpu_seconds
from testsupport.reliability import (
    assert_error,
    metric_total,
    parse_metrics,
)

AUTH = {"authorization": f"Bearer {TOKEN}"}
ADMIN = "/admin/models/b-alexnet/thresholds"
INFER = "/v2/models/b-alexnet/infer"
ALEXNET = bad.Target("b-alexnet", 3, 32, 32, 2, max_body_bytes=16 << 20, max_images=64)


def strict_json(text: str | bytes) -> object:
    """``json.loads`` that refuses NaN/Infinity literals, as every other parser does."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module", params=["0", "1"], ids=["one-process", "front-end"])
def srv(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ServerProcess]:
    """One real server for the module's ordinary cases (admin token ``TOKEN``): a single
    process, then one with an HTTP front end (``BRANCHY_HTTP_WORKERS=1``)."""
    env = {
        "BRANCHY_ADMIN_TOKEN": TOKEN,
        "BRANCHY_REQUEST_TIMEOUT_S": "3",
        "BRANCHY_HTTP_WORKERS": request.param,
    }
    with running_server(model_repo, tmp_path_factory.mktemp("hardening"), env) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(srv: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.base_url, timeout=30) as c:
        yield c


def assert_healthy(client: httpx.Client, server: ServerProcess, since: int = 0) -> None:
    """Alive, serving the next valid request, and no traceback in the log written after
    offset ``since`` (what the test itself caused)."""
    assert server.proc.poll() is None, server.log()[-3000:]
    req = bad.valid_request(ALEXNET, seed=3)
    resp = client.request(req.method, req.path, headers=req.headers, content=req.body)
    assert resp.status_code == 200, resp.text
    log = server.log()[since:]
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]


def v2_body(**tensor: object) -> bytes:
    pixels = random_pixels(CIFAR, 1)[0].transpose(2, 0, 1)
    base: dict[str, object] = {
        "name": "IMAGE",
        "shape": [1, 3, 32, 32],
        "datatype": "UINT8",
        "data": pixels.reshape(-1).tolist(),
    }
    return json.dumps({"inputs": [{**base, **tensor}]}).encode()


def deep(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


# --------------------------------------------------------------------- 1: bounded JSON


def v2_with_first_value(literal: bytes, **tensor: object) -> bytes:
    """A v2 body whose first ``data`` value is the raw JSON text ``literal``."""
    pixels = random_pixels(CIFAR, 1)[0].transpose(2, 0, 1).reshape(-1).tolist()
    body = v2_body(data=["FIRST", *pixels[1:]], **tensor)
    return body.replace(b'"FIRST"', literal, 1)


V2_OVERFLOWS = {
    "body_nested_5000": ('{"inputs": ' + deep(5000) + "}").encode(),
    "data_nested_2000": v2_body(data=json.loads(deep(900))).replace(
        deep(900).encode(), deep(2000).encode()
    ),
    "parameters_nested_3000": ('{"inputs": [], "parameters": {"p": ' + deep(3000) + "}}").encode(),
    "data_integer_too_large_for_a_float": v2_with_first_value(b"9" * 400),
    "shape_integer_of_5000_digits": v2_body().replace(
        b"[1, 3, 32, 32]", b"[1" + b"0" * 5000 + b", 3, 32, 32]"
    ),
    "data_nan_literal": v2_with_first_value(b"NaN", datatype="FP32"),
    "data_float_overflow_1e999": v2_with_first_value(b"1e999", datatype="FP32"),
    "not_utf8": b'{"inputs": ["\xff\xfe"]}',
}


ADMIN_OVERFLOWS = {
    "integer_of_400_digits": b'{"thresholds": [' + b"9" * 400 + b", 1.0]}",
    "tolerance_of_5000_digits": b'{"tolerance": ' + b"1" * 5000 + b"}",
    "nested_3000": ('{"thresholds": ' + deep(3000) + "}").encode(),
    "infinity_literal": b'{"tolerance": Infinity}',
}

JSON_TYPE = {"content-type": "application/json"}
# (method, path, headers, body, status, code): the v2 bodies are a 400, the admin ones a 422.
PARSER_LIMIT_CASES = [
    *(
        pytest.param("POST", INFER, JSON_TYPE, body, 400, "bad_request", id=f"v2-{name}")
        for name, body in sorted(V2_OVERFLOWS.items())
    ),
    *(
        pytest.param(
            "PUT", ADMIN, {**AUTH, **JSON_TYPE}, body, 422, "validation_error", id=f"admin-{name}"
        )
        for name, body in sorted(ADMIN_OVERFLOWS.items())
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "code"), PARSER_LIMIT_CASES
)
def test_json_past_the_parsers_limits_is_refused_and_changes_nothing(
    client: httpx.Client,
    srv: ServerProcess,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    status: int,
    code: str,
) -> None:
    mark = len(srv.log())
    before = client.get(ADMIN, headers=AUTH).json()["thresholds"]
    resp = client.request(method, path, content=body, headers=headers)
    err = assert_error(resp, status, code)
    if path == INFER:
        assert isinstance(resp.json()["error"], str)  # the v2 protocol's error body
    assert "Traceback" not in err["message"]
    assert client.get(ADMIN, headers=AUTH).json()["thresholds"] == before
    assert_healthy(client, srv, mark)


# ------------------------------------------------------------- 4: answers are JSON


def test_fp32_input_whose_logits_overflow_is_refused_not_answered_with_nan(
    client: httpx.Client, srv: ServerProcess
) -> None:
    mark = len(srv.log())
    huge = np.full((1, 3, 32, 32), 3e38, dtype=np.float32)
    for binary in (False, True):
        body = {
            "inputs": [
                {"name": "INPUT", "shape": [1, 3, 32, 32], "datatype": "FP32",
                 "data": huge.reshape(-1).tolist()}
            ],
            "parameters": {"binary_data_output": binary},
        }  # fmt: skip
        resp = client.post(INFER, content=json.dumps(body).encode())
        err = assert_error(resp, 400, "non_finite_output")
        strict_json(resp.content)
        assert "not finite" in err["message"]
    # Finite ordinary input is still answered, with strict JSON.
    ok = client.post(INFER, content=v2_body())
    assert ok.status_code == 200, ok.text
    strict_json(ok.content)
    samples = parse_metrics(client.get("/metrics").text)
    assert metric_total(samples, "branchy_requests_total", code="500") == 0
    assert_healthy(client, srv, mark)


# ------------------------------------------------- 3: client aborts are not 5xx


def _raw(server: ServerProcess, data: bytes, *, read: bool = False) -> bytes:
    """Send ``data`` on a fresh connection, then close it (after reading the answer when
    ``read``)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(data)
        if not read:
            return b""
        try:
            return s.recv(65536)
        except OSError:
            return b""


def _wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_client_aborts_are_counted_as_499_not_500(client: httpx.Client, srv: ServerProcess) -> None:
    mark = len(srv.log())
    before = parse_metrics(client.get("/metrics").text)
    path = "/v1/models/b-alexnet/classify"
    png = encode(random_pixels(CIFAR, 1)[0])
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\n"
    # A malformed chunked body (the chunk size is not hex).
    _raw(
        srv,
        (head + "Content-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
        + b"zz\r\nabc\r\n",
        read=True,
    )
    # A body cut short, then the connection closed.
    _raw(
        srv,
        (head + f"Content-Type: image/png\r\nContent-Length: {len(png) + 500}\r\n\r\n").encode()
        + png,
    )
    # A multipart upload abandoned half-way.
    parts, ctype = encode_multipart([("a", "a.png", "image/png", png)] * 3)
    _raw(
        srv,
        (head + f"Content-Type: {ctype}\r\n"
         f"Content-Length: {len(parts)}\r\n\r\n").encode() + parts[: len(parts) // 2],
    )  # fmt: skip
    for v2_path in (INFER,):
        body = v2_body()
        _raw(
            srv,
            (f"POST {v2_path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n").encode()
            + body[:100],
        )

    def counted() -> bool:
        now = parse_metrics(client.get("/metrics").text)
        return (
            metric_total(now, "branchy_requests_total", code="499")
            - metric_total(before, "branchy_requests_total", code="499")
            >= 4
        )

    _wait_for(counted)
    after = parse_metrics(client.get("/metrics").text)
    assert metric_total(after, "branchy_requests_total", code="500") == metric_total(
        before, "branchy_requests_total", code="500"
    )
    assert (
        metric_total(after, "branchy_rejected_total", reason="client_disconnect")
        - metric_total(before, "branchy_rejected_total", reason="client_disconnect")
        >= 4
    )
    log = srv.log()[mark:]
    assert "ClientDisconnect" not in log and "went away" in log
    assert_healthy(client, srv, mark)


def test_alert_rules_on_server_errors_cannot_match_client_aborts() -> None:
    """Every rule of deploy/prometheus that selects ``branchy_requests_total`` by code
    selects only 5xx codes, so the 499 of a client abort can never make it fire."""
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())
    matchers = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            expr = rule["expr"]
            if "branchy_requests_total" in expr:
                matchers += re.findall(r'code\s*(=~|=|!=|!~)\s*"([^"]*)"', expr)
    assert matchers, "no rule selects requests by code"
    for op, value in matchers:
        if op == "=":
            assert value != "499" and value.startswith("5"), value
        elif op == "=~":
            assert not re.fullmatch(value, "499"), value
        else:  # a negative matcher would let 499 through
            pytest.fail(f"rule selects code {op} {value!r}")


# ----------------------------------------------- 5: v2 errors as the protocol says


def test_tritonclient_shows_v2_errors_with_their_message(srv: ServerProcess) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    tc = triton.InferenceServerClient(url=f"127.0.0.1:{srv.port}", network_timeout=30)
    x = triton.InferInput("IMAGE", [100, 3, 32, 32], "UINT8")
    x.set_data_from_numpy(np.zeros((100, 3, 32, 32), dtype=np.uint8))
    with pytest.raises(InferenceServerException) as info:
        tc.infer("b-alexnet", [x])
    text = str(info.value)
    assert "100 images in one request" in text and "limit is 64" in text, text
    with pytest.raises(InferenceServerException) as info:
        tc.get_model_metadata("no-such-model")
    assert "no model named" in str(info.value)


def test_v2_errors_carry_the_message_as_a_string_and_the_code_beside_it(
    client: httpx.Client, srv: ServerProcess
) -> None:
    for resp in (
        client.post(INFER, content=b"{not json"),
        client.get("/v2/models/no-such-model"),
    ):
        body = resp.json()
        assert isinstance(body["error"], str) and body["error"], body
        assert body["status"] == resp.status_code and isinstance(body["code"], str), body
    # The middleware's own 413 (from Content-Length, before any body is read) too.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {64 << 20}\r\n\r\n".encode()
        )
        answer = s.recv(65536)  # the body never comes: answered after a short drain
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            answer += s.recv(65536)
    assert b" 413 " in answer.split(b"\r\n", 1)[0], answer[:200]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert isinstance(body["error"], str) and body["code"] == "payload_too_large", body
    # /v1 keeps its own shape.
    body = client.get("/v1/models/no-such-model").json()
    assert isinstance(body["error"], dict) and body["error"]["code"] == "model_not_found"


# ----------------------------------------------------- 7, 8: redirects and HEAD


def test_no_redirect_is_built_from_the_host_header(client: httpx.Client) -> None:
    for path in ("/v1/models/", "/v2/models/b-lenet/", "/readyz/"):
        resp = client.get(path, headers={"host": "evil.example"}, follow_redirects=False)
        assert resp.status_code == 404, (path, resp.status_code, resp.headers)
        assert "location" not in resp.headers
        assert "evil.example" not in resp.text


def test_head_on_probes_and_metrics(client: httpx.Client) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        resp = client.head(path)
        assert resp.status_code == 200, (path, resp.status_code)
        assert resp.content == b""
        get = client.get(path)
        assert get.headers["content-type"] == resp.headers["content-type"]


# ------------------------------------------- 9, 10, 18: admin and v2 field types


@pytest.mark.parametrize(
    "body",
    [
        {"tolerance": True},
        {"target": False},
        {"tolerance": "0.01"},
        {"thresholds": [True, 1.0]},
        {"thresholds": ["0.5", "0.5"]},
        {"thresholds": [None, 0.5]},
    ],
    ids=["tolerance_true", "target_false", "tolerance_text", "threshold_true",
         "threshold_text", "threshold_null"],
)  # fmt: skip
def test_admin_fields_have_strict_types(client: httpx.Client, body: dict) -> None:
    before = client.get(ADMIN, headers=AUTH).json()
    resp = client.put(ADMIN, json=body, headers=AUTH)
    assert_error(resp, 422, "validation_error")
    assert client.get(ADMIN, headers=AUTH).json()["thresholds"] == before["thresholds"]


V2_STRICT = {
    "shape_of_booleans": {"shape": [True, 3, 32, 32]},
    "shape_of_text": {"shape": ["1", "3", "32", "32"]},
    "data_of_booleans": {"data": [True] * (3 * 32 * 32)},
    "name_a_number": {"name": 5},
}


@pytest.mark.parametrize("name", sorted(V2_STRICT))
def test_v2_fields_have_strict_types(client: httpx.Client, name: str) -> None:
    assert_error(client.post(INFER, content=v2_body(**V2_STRICT[name])), 400, "bad_request")


def test_v2_binary_data_output_must_be_a_boolean(client: httpx.Client) -> None:
    body = json.loads(v2_body())
    body["parameters"] = {"binary_data_output": "yes"}
    resp = client.post(INFER, content=json.dumps(body).encode())
    err = assert_error(resp, 400, "bad_request")
    assert "binary_data_output" in err["message"]


def test_inf_thresholds_round_trip_through_the_admin_api(client: httpx.Client) -> None:
    put = client.put(ADMIN, json={"thresholds": ["inf", 0.5]}, headers=AUTH)
    assert put.status_code == 200, put.text
    got = client.get(ADMIN, headers=AUTH).json()
    assert got["thresholds"] == ["inf", 0.5]
    # What GET answers can be PUT back as it is.
    again = client.put(ADMIN, json={"thresholds": got["thresholds"]}, headers=AUTH)
    assert again.status_code == 200 and again.json()["thresholds"] == ["inf", 0.5]
    # ...and the schema says what "inf" means.
    doc = client.get("/openapi.json").text
    assert "every sample leaves at this exit" in doc
    assert client.delete(ADMIN, headers=AUTH).status_code == 200


def test_threshold_messages_say_what_is_wrong(client: httpx.Client) -> None:
    url = "/v1/models/b-alexnet/classify"
    png = {"content-type": "image/png"}
    image = encode(random_pixels(CIFAR, 1)[0])
    err = assert_error(client.post(url, params={"thresholds": "abc"}, content=image, headers=png),
                       422, "validation_error")  # fmt: skip
    assert "must be a number" in err["message"] and "expected 2" not in err["message"]
    err = assert_error(client.post(url, params={"thresholds": "0.5"}, content=image, headers=png),
                       422, "validation_error")  # fmt: skip
    assert "expected 2 threshold(s)" in err["message"]


def test_admin_put_takes_json_whatever_the_declared_content_type(client: httpx.Client) -> None:
    # What `curl -d '{"thresholds": [...]}'` sends.
    form = {**AUTH, "content-type": "application/x-www-form-urlencoded"}
    resp = client.put(ADMIN, content=b'{"thresholds": [0.25, 0.5]}', headers=form)
    assert resp.status_code == 200, resp.text
    assert resp.json()["thresholds"] == [0.25, 0.5]
    # A real form body gets a 422 that says what to send.
    err = assert_error(client.put(ADMIN, content=b"thresholds=0.25", headers=form),
                       422, "validation_error")  # fmt: skip
    assert "JSON object" in err["message"] and "Content-Type" in err["message"]
    assert client.delete(ADMIN, headers=AUTH).status_code == 200


# ------------------------------------------------- 15, 16: reset, model view


def test_delete_goes_back_to_the_checkpoints_thresholds(
    client: httpx.Client, srv: ServerProcess
) -> None:
    own = client.get("/v1/models/b-alexnet").json()["thresholds"]
    assert client.put(ADMIN, json={"thresholds": [0.7, 0.9]}, headers=AUTH).status_code == 200
    state_dir = Path(srv.log_path).parent / "state"
    assert (state_dir / "b-alexnet.thresholds.json").exists()
    resp = client.delete(ADMIN, headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert resp.json()["thresholds"] == own and resp.json()["source"] == "checkpoint"
    assert not (state_dir / "b-alexnet.thresholds.json").exists()
    detail = client.get("/v1/models/b-alexnet").json()
    assert detail["thresholds"] == own and detail["threshold_source"] == "checkpoint"
    samples = parse_metrics(client.get("/metrics").text)
    assert [metric_total(samples, "branchy_threshold", model="b-alexnet", exit=str(i))
            for i in range(2)] == own  # fmt: skip
    assert client.delete(ADMIN, headers={}).status_code == 401


def test_model_view_without_training_history(model_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    history = [{"epoch": e, "loss": 1.0 / e} for e in range(1, 200)]
    torch.manual_seed(0)
    from models import build_model, save_checkpoint

    save_checkpoint(repo / "b-lenet", build_model("b-lenet"), class_names=list("0123456789"),
                    input_spec=MNIST, metrics={"epochs": 199, "history": history})  # fmt: skip
    with (
        running_server(repo, tmp_path, {"BRANCHY_ADMIN_TOKEN": TOKEN}) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as c,
    ):
        public = c.get("/v1/models/b-lenet").json()
        assert public["metrics"] == {"epochs": 199}
        admin = c.get("/admin/models/b-lenet", headers=AUTH)
        assert admin.status_code == 200, admin.text
        assert admin.json()["metrics"]["history"] == history
        assert c.get("/admin/models/b-lenet").status_code == 401


# ------------------------------------------------ 11, 13: failed models, paths


def test_a_broken_folder_is_visible_and_can_be_loaded_once_repaired(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_checkpoint(repo / "b-lenet", "b-lenet")
    broken = write_checkpoint(repo / "broken", "b-lenet", seed=3)
    (broken / "model.safetensors").write_bytes(b"not weights")
    with (
        running_server_not_ready(repo, tmp_path) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as c,
    ):
        ready = c.get("/readyz")
        err = assert_error(ready, 503, "not_ready")
        assert "broken" in err["message"]
        listing = c.get("/v1/models").json()
        assert [m["name"] for m in listing["models"]] == ["b-lenet"]
        (failed,) = listing["failed"]
        assert failed["name"] == "broken" and failed["error"]
        assert str(tmp_path) not in failed["error"] and "/" not in failed["error"]
        samples = parse_metrics(c.get("/metrics").text)
        assert metric_total(samples, "branchy_model_load_failed", model="broken") == 1
        assert metric_total(samples, "branchy_model_load_failed", model="b-lenet") == 0
        assert "cannot load model 'broken'" in server.log()
        assert_error(c.get("/v1/models/broken"), 503, "not_ready")
        # The good model is served meanwhile.
        png = {"content-type": "image/png"}
        image = encode(random_pixels(MNIST, 1)[0])
        assert c.post("/v1/models/b-lenet/classify", content=image, headers=png).status_code == 200

        # Still broken: load answers 409 without a path.
        resp = c.post("/admin/models/broken/load", headers=AUTH)
        err = assert_error(resp, 409, "reload_failed")
        assert str(tmp_path) not in err["message"] and "/tmp" not in err["message"]

        # Repaired: reload (or load) brings it in, and readiness follows.
        write_checkpoint(repo / "broken", "b-lenet", seed=3)
        resp = c.post("/admin/models/broken/reload", headers=AUTH)
        assert resp.status_code == 200, resp.text
        assert c.get("/readyz").status_code == 200
        assert c.get("/v1/models").json()["failed"] == []
        samples = parse_metrics(c.get("/metrics").text)
        assert metric_total(samples, "branchy_model_load_failed", model="broken") == 0
        assert c.post("/v1/models/broken/classify", content=image, headers=png).status_code == 200

        # A folder added after start.
        write_checkpoint(repo / "late", "b-alexnet", seed=4)
        resp = c.post("/admin/models/late/load", headers=AUTH)
        assert resp.status_code == 200 and resp.json()["num_exits"] == 3, resp.text
        assert "late" in c.get("/readyz").json()["models"]
        assert_error(c.post("/admin/models/late/load", headers=AUTH), 409, "conflict")
        assert_error(
            c.post("/admin/models/nothing-here/load", headers=AUTH), 404, "model_not_found"
        )
        assert_error(
            c.post("/admin/models/..%2Foutside/load", headers=AUTH),
            404,
            {"model_not_found", "not_found"},
        )
        assert "Traceback" not in server.log()


class running_server_not_ready:
    """A real server that is expected to stay not ready: waits until its models are
    listed (loading over) instead of until ``/readyz`` is 200."""

    def __init__(self, repo: Path, tmp: Path) -> None:
        from tests.service.conftest import server_env

        env = {**server_env(repo, tmp), "BRANCHY_ADMIN_TOKEN": TOKEN}
        self.server = ServerProcess(env, tmp / "server.log")

    def __enter__(self) -> ServerProcess:
        deadline = time.monotonic() + 90
        while True:
            assert self.server.proc.poll() is None, self.server.log()
            try:
                listing = httpx.get(f"{self.server.base_url}/v1/models", timeout=2).json()
                if listing.get("failed") and listing.get("models"):
                    return self.server
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, self.server.log()
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


def test_reload_failures_carry_no_path(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    ckpt = write_checkpoint(repo / "b-lenet", "b-lenet")
    with (
        running_server(repo, tmp_path, {"BRANCHY_ADMIN_TOKEN": TOKEN}) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as c,
    ):
        manifest = (ckpt / "manifest.json").read_bytes()
        for damage in ("weights", "manifest_json", "manifest_gone", "folder_gone"):
            if damage == "weights":
                (ckpt / "model.safetensors").write_bytes(b"garbage")
            elif damage == "manifest_json":
                (ckpt / "manifest.json").write_text("{not json")
            elif damage == "manifest_gone":
                (ckpt / "manifest.json").unlink()
            else:
                shutil.rmtree(ckpt)
            err = assert_error(c.post("/admin/models/b-lenet/reload", headers=AUTH),
                                   409, "reload_failed")  # fmt: skip
            message = err["message"]
            assert str(tmp_path) not in message and not re.search(r"/\w+/", message), message
            assert not re.search(r"0x[0-9a-f]{6,}", message), message
            if damage != "folder_gone":
                write_checkpoint(repo / "b-lenet", "b-lenet")
                (ckpt / "manifest.json").write_bytes(manifest)
        assert server.log().count("reload from") == 4  # the log keeps the full story


# ------------------------------------------------------ 12, 14: start-up


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_exits_2_with_one_message(model_repo: Path, tmp_path: Path) -> None:
    from tests.service.conftest import server_env

    server = ServerProcess({**server_env(model_repo, tmp_path), "BRANCHY_DEVICE": "cuda"},
                           tmp_path / "server.log")  # fmt: skip
    assert server.proc.wait(60) == 2
    log = server.log()
    server.stop()
    assert "BRANCHY_DEVICE" in log and "CUDA is not available" in log, log
    assert "Traceback" not in log and len(log.strip().splitlines()) <= 3, log


def test_stale_temporaries_are_removed_at_start(model_repo: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    stale = state / ".b-lenet.thresholds.json.k2j4h1"
    stale.write_text('{"thresholds": [0.')  # what a kill -9 mid-write leaves
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = state / ".b-alexnet.thresholds.json.a8d7f6"  # another replica writing now
    fresh.write_text("{")
    keep = state / "notes.txt"
    keep.write_text("not ours")
    with running_server(model_repo, tmp_path) as server:
        assert not stale.exists() and fresh.exists() and keep.exists()
        assert "stale temporary" in server.log()


# ------------------------------------------------------- 6, 2: time bounds


@pytest.fixture(scope="module")
def slow_srv(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with a 1 s request timeout and room for many pixels per request, so
    that decoding, not a pre-decode check, is what the deadline has to stop."""
    env = {
        "BRANCHY_REQUEST_TIMEOUT_S": "1",
        "BRANCHY_MAX_REQUEST_PIXELS": str(64 * 2048 * 2048),
        "BRANCHY_TORCH_THREADS": "1",
    }
    with running_server(model_repo, tmp_path_factory.mktemp("slow"), env) as proc:
        yield proc


def test_stalled_multipart_upload_is_a_408(slow_srv: ServerProcess) -> None:
    png = encode(random_pixels(CIFAR, 1)[0])
    parts, ctype = encode_multipart([("a", "a.png", "image/png", png)] * 2)
    head = (
        "POST /v1/models/b-alexnet/classify HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(parts)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", slow_srv.port), timeout=10) as s:
        s.sendall(head + parts[: len(parts) // 2])
        answer = s.recv(65536)  # then nothing more is sent
        while not answer.rstrip().endswith(b"}"):
            answer += s.recv(65536)
    status_line = answer.partition(b"\r\n")[0]
    assert b" 408 " in status_line, answer[:300]
    assert b'"request_timeout"' in answer


def _lossless_webp(side: int) -> bytes:
    arr = np.zeros((side, side, 3), np.uint8)
    arr[::7] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "WEBP", lossless=True)
    return buf.getvalue()


def test_the_deadline_stops_decoding(slow_srv: ServerProcess) -> None:
    """Forty 2048² lossless WebPs (a few hundred bytes each, 80 ms to a third of a
    second of decoding each, so seconds in all even on a quiet CPU: twelve, about 1 s
    there, sometimes finished inside the deadline): the answer is 504 by the 1 s
    deadline, and the decoding stops there instead of running on for seconds."""
    webp = _lossless_webp(2048)
    files = [("images", (f"{i}.webp", webp, "image/webp")) for i in range(40)]
    with httpx.Client(base_url=slow_srv.base_url, timeout=30) as c:
        start = time.monotonic()
        resp = c.post("/v1/models/b-alexnet/classify", files=files)
        elapsed = time.monotonic() - start
        assert_error(resp, 504, "deadline_exceeded")
        assert "decoding" in resp.json()["error"]["message"]
        assert elapsed < 3.0, elapsed
        # After the answer, the decode worker finishes at most its current image.
        time.sleep(0.8)
        cpu = tree_cpu_seconds(slow_srv.proc.pid)
        time.sleep(2.0)
        assert tree_cpu_seconds(slow_srv.proc.pid) - cpu < 0.5
        ok = c.post("/v1/models/b-alexnet/classify", content=encode(random_pixels(CIFAR, 1)[0]),
                    headers={"content-type": "image/png"})  # fmt: skip
        assert ok.status_code == 200, ok.text


def test_absurd_decoding_work_is_refused_before_decoding(client: httpx.Client) -> None:
    # A small progressive JPEG whose last scan is repeated 300 times.
    buf = io.BytesIO()
    Image.fromarray(random_pixels(CIFAR, 1)[0]).resize((256, 256)).save(
        buf, "JPEG", progressive=True
    )
    data = buf.getvalue()
    last = data.rfind(b"\xff\xda")
    scans = data[:-2] + data[last:-2] * 300 + b"\xff\xd9"
    start = time.monotonic()
    resp = client.post("/v1/models/b-alexnet/classify", content=scans,
                       headers={"content-type": "image/jpeg"})  # fmt: skip
    err = assert_error(resp, 413, "payload_too_large")
    assert "scans" in err["message"]
    ordinary = client.post("/v1/models/b-alexnet/classify", content=data,
                           headers={"content-type": "image/jpeg"})  # fmt: skip
    assert ordinary.status_code == 200, ordinary.text
    # 64 lossless 4096² WebPs (about 66 kB in all): refused from their headers.
    webp = _lossless_webp(4096)
    files = [("images", (f"{i}.webp", webp, "image/webp")) for i in range(64)]
    resp = client.post("/v1/models/b-alexnet/classify", files=files)
    err = assert_error(resp, 413, "payload_too_large")
    assert "pixels together" in err["message"]
    # The same through v2 BYTES.
    body = {"inputs": [{"name": "B", "shape": [64], "datatype": "BYTES",
                        "data": [base64.b64encode(webp).decode()] * 64}]}  # fmt: skip
    assert_error(client.post(INFER, content=json.dumps(body).encode()), 413, "payload_too_large")
    assert time.monotonic() - start < 10


def test_json_body_bounds_cost_less_than_the_parse_they_guard() -> None:
    """The bounds are checked in C-speed passes (regular expressions, numpy): on a large
    JSON tensor they cost less than ``json.loads`` itself."""
    from service.jsonbody import JsonLimits, parse_json

    body = json.dumps({"data": [1.5] * 2_000_000, "s": "x" * 2_000_000}).encode()
    # Interleaved, best of five each: a shared machine's stalls hit single timings.
    plain, bounded = math.inf, math.inf
    for _ in range(5):
        start = time.perf_counter()
        json.loads(body)
        plain = min(plain, time.perf_counter() - start)
        start = time.perf_counter()
        parsed = parse_json(body, JsonLimits(max_values=3_000_000))
        bounded = min(bounded, time.perf_counter() - start)
    assert len(parsed["data"]) == 2_000_000 and math.isclose(parsed["data"][0], 1.5)
    assert bounded < 2.5 * plain, (bounded, plain)
