"""The server on the fast CPU runtimes: answers over HTTP equal
``models.load_engine(...).early_exit`` on the same runtime, the choice is visible, a
missing runtime falls back to torch with a log line, and early release answers an image
before its batch's later stages finish."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import models
from service.batcher import Batcher, BatchOutput, Classified
from service.metrics import Metrics
from tests.service.conftest import CIFAR, MNIST, encode, offline_input, random_pixels
from testsupport.multipart import image_files


def _spread(ckpt: models.Checkpoint, x: torch.Tensor) -> list[float]:
    # per early exit, the median entropy: the batch splits across the exits
    with torch.no_grad():
        outs = ckpt.model(x)
    return [float(models.entropy_from_logits(z).median()) for z in outs[:-1]]


def _served_equals_engine(base_url: str, model_repo: Path, runtime: str | None) -> None:
    """Each model's HTTP answers equal its engine's on ``runtime`` (None: on the one the
    server says it picked for that model; auto picks per model, by timing)."""
    for name, spec in (("b-lenet", MNIST), ("b-alexnet", CIFAR)):
        info = httpx.get(f"{base_url}/v1/models/{name}").json()
        served_on = info["runtime"] if runtime is None else runtime
        assert info["runtime"] == served_on and info["precision"] == "fp32"
        assert info["runtime_reason"]
        engine = models.load_engine(model_repo / name, runtime=served_on)
        assert engine.runtime == served_on
        pixels = random_pixels(spec, 16, seed=5)
        x = offline_input(pixels, spec)
        thresholds = _spread(engine.checkpoint, x)
        want = engine.early_exit(x, thresholds)
        resp = httpx.post(
            f"{base_url}/v1/models/{name}/classify",
            files=image_files([encode(p) for p in pixels]),
            params={"thresholds": ",".join(repr(t) for t in thresholds)},
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        results = resp.json()["results"]
        assert [r["exit"]["index"] for r in results] == want.exit_index.tolist()
        assert [r["class_index"] for r in results] == want.prediction.tolist()
        np.testing.assert_allclose([r["entropy"] for r in results], want.entropy, atol=1e-5)
        probs = torch.softmax(want.logits, 1).max(1).values
        np.testing.assert_allclose([r["confidence"] for r in results], probs, atol=1e-5)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_http_answers_equal_the_engine_on_the_same_runtime(
    start_server: Callable[..., object], model_repo: Path, runtime: str
) -> None:
    server = start_server({"BRANCHY_RUNTIME": runtime})
    _served_equals_engine(server.base_url, model_repo, runtime)  # type: ignore[attr-defined]


def test_each_model_serves_the_runtime_named_for_it(
    start_server: Callable[..., object], model_repo: Path
) -> None:
    """``BRANCHY_RUNTIME=model=runtime,...,default``: a model named gets its runtime, the
    others the default, and each answers like its engine on that runtime."""
    server = start_server({"BRANCHY_RUNTIME": "b-lenet=onnxruntime, OpenVINO"})
    base_url = server.base_url  # type: ignore[attr-defined]
    runtimes = {
        name: httpx.get(f"{base_url}/v1/models/{name}").json()["runtime"]
        for name in ("b-lenet", "b-alexnet")
    }
    assert runtimes == {"b-lenet": "onnxruntime", "b-alexnet": "openvino"}
    _served_equals_engine(base_url, model_repo, None)


def test_auto_serves_an_agreeing_runtime_and_says_which(
    start_server: Callable[..., object], model_repo: Path
) -> None:
    server = start_server({"BRANCHY_RUNTIME": "auto"})
    base = server.base_url  # type: ignore[attr-defined]
    info = httpx.get(f"{base}/v1/models/b-alexnet").json()
    assert info["runtime"] in ("torch", "onnxruntime", "openvino")
    assert "fastest" in info["runtime_reason"]
    families = {
        f.name: f for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)
    }
    labels = [s.labels for s in families["branchy_model_info"].samples]
    assert {(lab["model"], lab["runtime"], lab["precision"]) for lab in labels} >= {
        ("b-alexnet", info["runtime"], "fp32")
    }
    assert f"runtime {info['runtime']} fp32" in server.log()  # type: ignore[attr-defined]
    _served_equals_engine(base, model_repo, None)


def test_a_missing_runtime_falls_back_to_torch_and_says_so(
    start_server: Callable[..., object], model_repo: Path, tmp_path: Path
) -> None:
    # a module that fails to import stands in for a runtime that is not installed
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "openvino.py").write_text("raise ImportError('openvino is broken here')\n")
    server = start_server({"BRANCHY_RUNTIME": "openvino", "PYTHONPATH": str(shadow)})
    base = server.base_url  # type: ignore[attr-defined]
    info = httpx.get(f"{base}/v1/models/b-lenet").json()
    assert info["runtime"] == "torch"
    assert "openvino is not installed" in info["runtime_reason"]
    assert "falling back to torch" in server.log()  # type: ignore[attr-defined]
    _served_equals_engine(base, model_repo, "torch")


class _SlowSecondExit:
    """An engine whose batch answers row 0 at exit 0 at once and the rest at exit 1
    after ``delay`` seconds (the later stages), through ``release`` when given one, else
    all together at the end."""

    def __init__(self, engine: object, delay: float) -> None:
        self.inner = engine
        self.delay = delay
        self.checkpoint = engine.checkpoint  # type: ignore[attr-defined]
        self.num_exits = 2

    def run(self, x: torch.Tensor, t: torch.Tensor, release: object = None) -> BatchOutput:
        n = x.shape[0]
        logits = torch.zeros((n, 10))
        entropy = torch.zeros(n)
        if release is None:
            time.sleep(self.delay)
        else:
            assert callable(release)
            release(torch.tensor([0]), 0, logits[:1], entropy[:1])
            time.sleep(self.delay)
            release(torch.arange(1, n), 1, logits[1:], entropy[1:])
        return BatchOutput(torch.softmax(logits, 1), torch.tensor([0] + [1] * (n - 1)), entropy)


@pytest.mark.parametrize("early", [True, False])
def test_early_release_answers_before_the_batch_finishes(model_repo: Path, early: bool) -> None:
    from service.batcher import Engine

    engine = _SlowSecondExit(
        Engine(
            models.load_checkpoint(model_repo / "b-lenet"), torch.device("cpu"), runtime="torch"
        ),
        delay=0.5,
    )

    class Source:
        def snapshot(self) -> tuple[object, tuple[float, ...]]:
            return engine, (0.5,)

    x = offline_input(random_pixels(MNIST, 3), MNIST)

    async def scenario() -> tuple[list[float], list[Classified]]:
        batcher = Batcher("m", Source(), Metrics(), max_batch_size=8, max_delay_s=0.05,  # type: ignore[arg-type]
                          max_queue=8, early_release=early)  # fmt: skip
        batcher.start()
        start = time.monotonic()
        futures = batcher.submit(list(x), deadline=start + 30)
        done_at: list[float] = []
        for f in futures:
            f.add_done_callback(lambda _: done_at.append(time.monotonic() - start))
        answers = await asyncio.gather(*futures)
        await batcher.stop()
        return done_at, list(answers)

    done_at, answers = asyncio.run(scenario())
    assert [a.exit_index for a in answers] == [0, 1, 1]
    first, rest = min(done_at), max(done_at)
    if early:
        assert rest - first >= 0.4, done_at  # exit 0 answered before the slow stage ended
        assert answers[0].inference_s < 0.25 < answers[1].inference_s
    else:
        assert rest - first < 0.1, done_at  # everything answered with the batch
        assert all(a.inference_s >= 0.4 for a in answers)  # the whole batch's time
