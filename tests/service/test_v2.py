"""Open Inference Protocol v2 through the official ``tritonclient.http`` client, against
a real server process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from models import load_checkpoint
from tests.service.conftest import CIFAR, MNIST, ServerProcess, encode, offline_input, random_pixels


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=30)


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("b-lenet")
    assert client.get_server_metadata()["name"] == "branchy-serve"
    meta = client.get_model_metadata("b-alexnet")
    assert meta["name"] == "b-alexnet"
    assert {i["datatype"] for i in meta["inputs"]} == {"UINT8", "FP32", "BYTES"}
    assert [o["name"] for o in meta["outputs"]] == ["CLASS", "PROBABILITIES", "EXIT", "ENTROPY"]
    assert meta["inputs"][0]["shape"] == [-1, 3, 32, 32]
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("no-such-model")


def _offline(model_repo: Path, name: str, x: torch.Tensor, thresholds: list[float]):  # type: ignore[no-untyped-def]
    ckpt = load_checkpoint(model_repo / name)
    return ckpt.model.early_exit(x, thresholds)


def test_uint8_binary_equals_offline(
    client: triton.InferenceServerClient, model_repo: Path
) -> None:
    pixels = random_pixels(CIFAR, 5, seed=11)
    chw = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
    inp = triton.InferInput("IMAGE", list(chw.shape), "UINT8")
    inp.set_data_from_numpy(chw)  # binary tensor extension (the client's default)
    result = client.infer("b-alexnet", [inp], parameters={"thresholds": "inf,0"})
    offline = _offline(model_repo, "b-alexnet", offline_input(pixels, CIFAR), [float("inf"), 0.0])
    assert result.as_numpy("CLASS").tolist() == offline.prediction.tolist()
    assert result.as_numpy("EXIT").tolist() == [0] * 5
    np.testing.assert_allclose(result.as_numpy("ENTROPY"), offline.entropy.numpy(), atol=1e-4)
    probs = result.as_numpy("PROBABILITIES")
    assert probs.shape == (5, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, torch.softmax(offline.logits, 1).numpy(), atol=1e-5)


def test_fp32_json_equals_offline(client: triton.InferenceServerClient, model_repo: Path) -> None:
    pixels = random_pixels(MNIST, 3, seed=12)
    x = offline_input(pixels, MNIST)
    inp = triton.InferInput("INPUT", list(x.shape), "FP32")
    inp.set_data_from_numpy(x.numpy(), binary_data=False)
    outputs = [triton.InferRequestedOutput(n, binary_data=False) for n in ("CLASS", "EXIT")]
    result = client.infer("b-lenet", [inp], outputs=outputs, request_id="req-7")
    offline = _offline(model_repo, "b-lenet", x, [0.0])
    assert result.get_response()["id"] == "req-7"
    assert result.as_numpy("CLASS").tolist() == offline.prediction.tolist()
    assert result.as_numpy("EXIT").tolist() == offline.exit_index.tolist()
    assert result.as_numpy("ENTROPY") is None  # not requested


def test_bytes_encoded_images(client: triton.InferenceServerClient, model_repo: Path) -> None:
    pixels = random_pixels(MNIST, 4, seed=13)
    data = np.array([encode(p) for p in pixels], dtype=np.object_)
    inp = triton.InferInput("IMAGE_BYTES", [4], "BYTES")
    inp.set_data_from_numpy(data)
    result = client.infer("b-lenet", [inp])
    offline = _offline(model_repo, "b-lenet", offline_input(pixels, MNIST), [0.0])
    assert result.as_numpy("CLASS").tolist() == offline.prediction.tolist()


@pytest.mark.parametrize(
    ("shape", "dtype", "value"),
    [
        ([1, 1, 28, 28], "FP32", np.nan),  # NaN data
        ([1, 1, 28, 28], "FP32", np.inf),
        ([1, 3, 28, 28], "UINT8", 0),  # wrong shape
        ([1, 1, 28, 28], "INT32", 0),  # unsupported datatype
    ],
)
def test_bad_tensors_are_400(
    client: triton.InferenceServerClient, shape: list[int], dtype: str, value: float
) -> None:
    np_dtype = {"FP32": np.float32, "UINT8": np.uint8, "INT32": np.int32}[dtype]
    inp = triton.InferInput("INPUT", shape, dtype)
    inp.set_data_from_numpy(np.full(shape, value, dtype=np_dtype))
    with pytest.raises(InferenceServerException) as err:
        client.infer("b-lenet", [inp])
    assert err.value.status() == "400"
    # the server keeps serving
    ok = triton.InferInput("INPUT", [1, 1, 28, 28], "FP32")
    ok.set_data_from_numpy(np.zeros((1, 1, 28, 28), dtype=np.float32))
    assert client.infer("b-lenet", [ok]).as_numpy("CLASS").shape == (1,)
