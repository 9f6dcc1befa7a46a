"""Open Inference Protocol v2 (KServe / Triton REST), including Triton's binary tensor
extension, which the official ``tritonclient.http`` uses by default.

Inputs: one tensor per request, any name, told apart by datatype:

* ``UINT8`` ``[B, C, H, W]`` (or ``[C, H, W]``): raw pixels at the model's input size;
  the server normalises them with the checkpoint's statistics.
* ``FP32`` ``[B, C, H, W]`` (or ``[C, H, W]``): the already normalised network input,
  exactly what ``BranchyNet.early_exit`` takes offline.
* ``BYTES`` ``[B]`` (or ``[B, 1]``): encoded images (JPEG, PNG, ...), decoded like
  ``/v1/.../classify`` does; in JSON (non-binary) form each element is base64 text.

Outputs: ``CLASS`` INT64 ``[B]``, ``PROBABILITIES`` FP32 ``[B, classes]``, ``EXIT``
INT64 ``[B]`` (0-based exit index), ``ENTROPY`` FP32 ``[B]``. Request parameter
``thresholds`` (comma-separated text) sets this request's thresholds.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service import __version__, intake
from service.batcher import Classified
from service.deps import ModelDep, ReadyDep, SettingsDep
from service.errors import BadRequest, TooManyImages, ValidationFailed
from service.jsonbody import JsonLimits, parse_json
from service.preprocess import normalise
from service.repository import ServedModel
from service.settings import Settings

router = APIRouter(prefix="/v2", tags=["v2"])

HEADER_LENGTH = "inference-header-content-length"
OUTPUTS = ("CLASS", "PROBABILITIES", "EXIT", "ENTROPY")
_DTYPES = {"UINT8": np.uint8, "FP32": np.float32, "INT64": np.int64}
_VERSION = Annotated[str, Path(max_length=32, description="Model version (only '1' exists).")]


class _Tensor(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    name: str = Field(max_length=256)
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=8)
    datatype: str = Field(max_length=16)
    parameters: dict[str, Any] | None = None
    data: Any = None


class _Output(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    name: str = Field(max_length=256)
    parameters: dict[str, Any] | None = None


class _InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    id: str | None = Field(default=None, max_length=256)
    inputs: list[_Tensor] = Field(min_length=1, max_length=16)
    outputs: list[_Output] | None = Field(default=None, max_length=16)
    parameters: dict[str, Any] | None = None


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "branchy-serve", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="Server liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get(
    "/health/ready",
    summary="Server readiness (503 until models are loaded)",
    responses={503: {"description": "Not ready."}},
    dependencies=[ReadyDep],
)
async def ready() -> dict[str, bool]:
    return {"ready": True}


_VERSIONED_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "No such model version (only '1' exists)."},
    404: {"description": "Unknown model."},
}


def _metadata(model: ServedModel) -> dict[str, Any]:
    c, h, w = model.checkpoint.input_spec.shape
    classes = len(model.checkpoint.class_names)
    return {
        "name": model.name,
        "versions": ["1"],
        "platform": "pytorch_branchy",
        "inputs": [
            {"name": "IMAGE", "datatype": "UINT8", "shape": [-1, c, h, w]},
            {"name": "INPUT", "datatype": "FP32", "shape": [-1, c, h, w]},
            {"name": "IMAGE_BYTES", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": "CLASS", "datatype": "INT64", "shape": [-1]},
            {"name": "PROBABILITIES", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "EXIT", "datatype": "INT64", "shape": [-1]},
            {"name": "ENTROPY", "datatype": "FP32", "shape": [-1]},
        ],
    }


_ModelGet = Callable[[ServedModel], Awaitable[dict[str, Any]]]


def _model_get(suffix: str, summary: str) -> Callable[[_ModelGet], _ModelGet]:
    """Register ``handler(model)`` as ``GET /models/{name}<suffix>`` and as its versioned
    twin ``GET /models/{name}/versions/{version}<suffix>`` (400 for any version but '1',
    after the model is looked up, so an unknown model is a 404 either way)."""

    def register(handler: _ModelGet) -> _ModelGet:
        async def versioned(model: ModelDep, version: _VERSION) -> dict[str, Any]:
            _check_version(version)
            return await handler(model)

        router.add_api_route(
            f"/models/{{name}}{suffix}",
            handler,
            methods=["GET"],
            summary=summary,
            responses={404: {"description": "Unknown model."}},
        )
        router.add_api_route(
            f"/models/{{name}}/versions/{{version}}{suffix}",
            versioned,
            methods=["GET"],
            summary=f"{summary} (versioned)",
            responses=_VERSIONED_ERRORS,
            name=f"{handler.__name__}_versioned",
        )
        return handler

    return register


@_model_get("", "Model metadata")
async def model_metadata(model: ModelDep) -> dict[str, Any]:
    return _metadata(model)


@_model_get("/ready", "Model readiness")
async def model_ready(model: ModelDep) -> dict[str, Any]:
    return {"name": model.name, "ready": model.batcher is not None}


_INFER_DOC: dict[str, Any] = {
    "responses": {
        400: {
            "description": "Malformed request, wrong shape or datatype, NaN/Inf data, bad image."
        },
        404: {"description": "Unknown model."},
        413: {"description": "Too many images or body too large."},
        503: {"description": "Queue full (Retry-After) or not ready."},
        504: {"description": "Deadline passed while queued."},
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["inputs"],
                        "properties": {
                            "id": {"type": "string"},
                            "inputs": {"type": "array", "items": {"type": "object"}},
                            "outputs": {"type": "array", "items": {"type": "object"}},
                            "parameters": {"type": "object"},
                        },
                    }
                }
            },
        }
    },
}


@router.post("/models/{name}/infer", summary="Inference (v2 protocol)", **_INFER_DOC)
async def infer(request: Request, model: ModelDep, settings: SettingsDep) -> Response:
    return await _infer(request, model, settings)


@router.post(
    "/models/{name}/versions/{version}/infer", summary="Inference (v2, versioned)", **_INFER_DOC
)
async def infer_versioned(
    request: Request, model: ModelDep, settings: SettingsDep, version: _VERSION
) -> Response:
    _check_version(version)
    return await _infer(request, model, settings)


def _check_version(version: str) -> None:
    if version != "1":
        raise BadRequest(f"model version {version[:32]!r} does not exist; only version '1'")


async def _infer(request: Request, model: ModelDep, settings: Settings) -> Response:
    started = time.monotonic()
    body = await request.body()
    # Enough values for the largest tensor this model can take, and some for the rest.
    limits = JsonLimits(
        max_depth=16,
        max_values=settings.max_images_per_request * math.prod(model.checkpoint.input_spec.shape)
        + 4096,
    )
    # JSON of up to the body limit and tensor conversion are CPU work: off the event loop.
    req, binary = await asyncio.to_thread(
        _parse_body, body, request.headers.get(HEADER_LENGTH), limits
    )
    if len(req.inputs) != 1:
        raise BadRequest(f"expected exactly one input tensor; got {len(req.inputs)}")
    params = req.parameters or {}
    text = params.get("thresholds")
    if text is not None and not isinstance(text, str):
        raise BadRequest("parameter 'thresholds' must be a comma-separated string")
    try:
        own = intake.parse_thresholds(text, model.num_exits, settings)
    except ValidationFailed as exc:  # v2 answers every protocol error with 400
        raise BadRequest(exc.message) from None
    wanted = _requested_outputs(req, params)
    inputs = await _inputs(req.inputs[0], binary, model, settings, started)
    answers = await intake.classify(model, inputs, settings, started=started, thresholds=own)
    return _respond(req, model, answers, wanted)


def _parse_body(
    body: bytes, header_length: str | None, limits: JsonLimits
) -> tuple[_InferRequest, bytes]:
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequest("Inference-Header-Content-Length must be an integer") from None
        if not 0 < n <= len(body):
            raise BadRequest(f"Inference-Header-Content-Length {n} does not fit the body")
        head, binary = body[:n], body[n:]
    else:
        head, binary = body, b""
    raw = parse_json(head, limits, what="the inference request")
    try:
        return _InferRequest.model_validate(raw), binary
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise BadRequest(f"malformed inference request: {errors}") from None


def _requested_outputs(req: _InferRequest, params: dict[str, Any]) -> dict[str, bool]:
    """Output name -> binary? (all outputs when none are named)."""
    default_binary = _flag(params, "binary_data_output", False)
    if not req.outputs:
        return dict.fromkeys(OUTPUTS, default_binary)
    wanted = {}
    for out in req.outputs:
        if out.name not in OUTPUTS:
            raise BadRequest(f"unknown output {out.name[:64]!r}; outputs: {', '.join(OUTPUTS)}")
        wanted[out.name] = _flag(out.parameters or {}, "binary_data", default_binary)
    return wanted


def _flag(params: dict[str, Any], name: str, default: bool) -> bool:
    value = params.get(name, default)
    if not isinstance(value, bool):
        raise BadRequest(f"parameter {name!r} must be true or false; got {str(value)[:40]!r}")
    return value


async def _inputs(
    tensor: _Tensor, binary: bytes, model: ServedModel, settings: Settings, started: float
) -> list[torch.Tensor]:
    raw = _tensor_bytes(tensor, binary)
    dtype = tensor.datatype.upper()
    shape = tensor.shape
    spec = model.checkpoint.input_spec
    if dtype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise BadRequest(f"BYTES input must have shape [B] or [B, 1]; got {shape}")
        count = shape[0]
        _check_count(count, settings)
        images = _bytes_elements(tensor, raw, count)
        pixels = await intake.decode([(None, b) for b in images], spec, settings, started=started)
        return intake.pixel_inputs(pixels)
    if dtype not in ("UINT8", "FP32"):
        raise BadRequest(
            f"input datatype must be UINT8, FP32 or BYTES; got {tensor.datatype[:16]!r}"
        )
    if len(shape) == 3:
        shape = [1, *shape]
    if len(shape) != 4 or tuple(shape[1:]) != spec.shape:
        raise BadRequest(
            f"{dtype} input must have shape [B, {spec.channels}, {spec.height}, {spec.width}] "
            f"for model {model.name!r}; got {tensor.shape}"
        )
    _check_count(shape[0], settings)
    return await asyncio.to_thread(_tensor_inputs, tensor, raw, dtype, shape, model)


def _tensor_inputs(
    tensor: _Tensor, raw: bytes | None, dtype: str, shape: list[int], model: ServedModel
) -> list[torch.Tensor]:
    spec = model.checkpoint.input_spec
    n = math.prod(shape)
    array = _numeric(tensor, raw, dtype, n)
    if dtype == "UINT8":
        pixels = torch.from_numpy(array.reshape(shape).copy())
        x = normalise(pixels, spec)
    else:
        if not np.isfinite(array).all():
            raise BadRequest("FP32 input contains NaN or infinite values")
        x = torch.from_numpy(array.reshape(shape).astype(np.float32, copy=True))
    return list(x.unbind(0))


def _check_count(count: int, settings: Settings) -> None:
    if count < 1:
        raise BadRequest("the input holds no image")
    if count > settings.max_images_per_request:
        raise TooManyImages(
            f"{count} images in one request; the limit is {settings.max_images_per_request}"
        )


def _tensor_bytes(tensor: _Tensor, binary: bytes) -> bytes | None:
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        if tensor.data is None:
            raise BadRequest(f"input {tensor.name[:64]!r} has neither data nor binary_data_size")
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0 or size != len(binary):
        raise BadRequest(
            f"binary_data_size {size!r} of input {tensor.name[:64]!r} does not match the "
            f"{len(binary)} binary bytes after the JSON header"
        )
    return binary


def _numeric(tensor: _Tensor, raw: bytes | None, dtype: str, n: int) -> np.ndarray:
    np_dtype = _DTYPES[dtype]
    if raw is not None:
        itemsize = np.dtype(np_dtype).itemsize
        if len(raw) != n * itemsize:
            raise BadRequest(f"binary data holds {len(raw)} bytes; shape needs {n * itemsize}")
        return np.frombuffer(raw, dtype=np.dtype(np_dtype).newbyteorder("<")).astype(np_dtype)
    flat = _flat(tensor.data) if isinstance(tensor.data, list) else [tensor.data]
    # Strict: JSON true/false are not numbers (numpy would take them as 1 and 0).
    if not all(type(v) is int or type(v) is float for v in flat):
        raise BadRequest(f"data of input {tensor.name[:64]!r} is not a list of numbers")
    try:
        values = np.asarray(flat, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        raise BadRequest(f"data of input {tensor.name[:64]!r} is not a list of numbers") from None
    if values.size != n:
        raise BadRequest(f"data holds {values.size} values; shape {tensor.shape} needs {n}")
    if dtype == "UINT8":
        if (
            not np.isfinite(values).all()
            or (values != np.round(values)).any()
            or (values.min(initial=0) < 0 or values.max(initial=0) > 255)
        ):
            raise BadRequest("UINT8 data must be integers in [0, 255]")
        return values.astype(np.uint8)
    return values.astype(np.float32)


def _bytes_elements(tensor: _Tensor, raw: bytes | None, count: int) -> list[bytes]:
    if raw is not None:
        out, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise BadRequest("truncated BYTES element length in binary data")
            (size,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            if pos + size > len(raw):
                raise BadRequest("truncated BYTES element in binary data")
            out.append(raw[pos : pos + size])
            pos += size
    else:
        data = tensor.data
        if not isinstance(data, list) or not all(isinstance(d, str) for d in _flat(data)):
            raise BadRequest("BYTES data in JSON must be a list of base64 strings")
        try:
            out = [base64.b64decode(d, validate=True) for d in _flat(data)]
        except (binascii.Error, ValueError):
            raise BadRequest("BYTES data in JSON must be base64 text") from None
    if len(out) != count:
        raise BadRequest(f"BYTES input holds {len(out)} element(s); shape says {count}")
    return out


def _flat(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    for d in data:
        out.extend(_flat(d) if isinstance(d, list) else [d])
    return out


def _respond(
    req: _InferRequest, model: ServedModel, answers: list[Classified], wanted: dict[str, bool]
) -> Response:
    b = len(answers)
    arrays: dict[str, np.ndarray] = {
        "CLASS": np.array([a.class_index for a in answers], dtype=np.int64),
        "PROBABILITIES": torch.stack([a.probabilities for a in answers]).numpy().astype(np.float32),
        "EXIT": np.array([a.exit_index for a in answers], dtype=np.int64),
        "ENTROPY": np.array([a.entropy for a in answers], dtype=np.float32),
    }
    dtypes = {"CLASS": "INT64", "PROBABILITIES": "FP32", "EXIT": "INT64", "ENTROPY": "FP32"}
    outputs, blobs = [], []
    for name, as_binary in wanted.items():
        arr = arrays[name]
        out: dict[str, Any] = {"name": name, "datatype": dtypes[name], "shape": list(arr.shape)}
        if as_binary:
            blob = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = arr.reshape(-1).tolist()
        outputs.append(out)
    resp: dict[str, Any] = {"model_name": model.name, "model_version": "1", "outputs": outputs}
    if req.id is not None:
        resp["id"] = req.id
    # allow_nan=False: an answer is always valid JSON (non-finite outputs were refused).
    head = json.dumps(resp, allow_nan=False).encode()
    assert b == arrays["CLASS"].shape[0]
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
