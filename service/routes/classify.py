"""``/v1``: list and describe models, classify images (multipart or a raw image body)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import intake
from service.deps import ManagerDep, ModelDep, SettingsDep
from service.errors import (
    BadRequest,
    TooManyImages,
    UnsupportedMediaType,
)
from service.schemas import (
    ClassifyResponse,
    FailedModel,
    ModelDetail,
    ModelList,
    ModelSummary,
)
from service.settings import Settings

router = APIRouter(prefix="/v1", tags=["classify"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Bad image or malformed request."},
    404: {"description": "Unknown model."},
    413: {"description": "Body, image count or pixel count over the limit."},
    415: {"description": "Not multipart/form-data or image/*."},
    422: {"description": "Invalid query parameters (thresholds, top_k)."},
    503: {"description": "Queue full (Retry-After) or not ready."},
    504: {"description": "Deadline passed while queued."},
}
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                        }
                    },
                }
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.get("/models", summary="The loaded models")
async def list_models(manager: ManagerDep) -> ModelList:
    served = manager.models
    return ModelList(
        models=[
            ModelSummary(
                name=name,
                architecture=m.checkpoint.model.name,
                num_exits=m.num_exits,
                ready=m.batcher is not None,
            )
            for name, m in sorted(served.items())
        ],
        failed=[FailedModel(name=name, error=why) for name, why in sorted(manager.failed.items())],
    )


@router.get(
    "/models/{name}",
    summary="A model: exits, thresholds, classes, input, MACs",
    responses={404: _ERRORS[404]},
)
async def describe_model(model: ModelDep) -> ModelDetail:
    return ModelDetail(**model.describe())


@router.post(
    "/models/{name}/classify",
    response_model=ClassifyResponse,
    summary="Classify one or more images",
    description=(
        "Send images as parts of a multipart/form-data body (any part name; each part a "
        "file), or one image as a raw body with an image/* content type. JPEG, PNG, BMP, "
        "GIF (one frame), WebP, TIFF; grey/RGB/palette/alpha/16-bit are converted and "
        "resized to the model's input and normalised with its statistics."
    ),
    responses=_ERRORS,
    openapi_extra=_BODY,
)
async def classify_images(
    request: Request,
    model: ModelDep,
    settings: SettingsDep,
    top_k: Annotated[
        int | None, Query(ge=1, le=intake.MAX_TOP_K, description="Return the k best classes.")
    ] = None,
    thresholds: Annotated[
        str | None,
        Query(
            max_length=intake.MAX_THRESHOLDS_TEXT,
            description="This request's thresholds, comma-separated (inf allowed).",
        ),
    ] = None,
) -> Response:
    started = time.monotonic()
    own = intake.parse_thresholds(thresholds, model.num_exits, settings)
    images = await _read_images(request, settings)
    t0 = time.perf_counter()
    spec = model.checkpoint.input_spec
    inputs = intake.pixel_inputs(await intake.decode(images, spec, settings, started=started))
    decode_s = time.perf_counter() - t0
    answers = await intake.classify(model, inputs, settings, started=started, thresholds=own)

    names = answers[0].class_names  # the answering engine's, even after a reload
    k = None if top_k is None else min(top_k, len(names))
    return Response(
        intake.classify_body(
            model.name,
            intake.answer_rows(answers, k),
            [filename for filename, _ in images],
            names,
            answers[0].thresholds,
            decode_s=decode_s,
            started=started,
        ),
        media_type="application/json",
    )


async def _read_images(request: Request, settings: Settings) -> list[tuple[str | None, bytes]]:
    """The request's encoded images: every file part of a multipart body, or the body."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = settings.max_images_per_request
    if media == "multipart/form-data":
        try:
            form = await request.form(
                max_files=limit + 1, max_fields=limit + 16, max_part_size=settings.max_body_bytes
            )
        except StarletteHTTPException as exc:
            if exc.status_code != 400:  # 413 too large, 408 stalled upload: as they are
                raise
            if "too many files" in str(exc.detail).lower():
                raise TooManyImages(f"more than {limit} images in one request") from None
            raise BadRequest(f"malformed multipart body: {exc.detail}") from None
        try:
            parts = [
                (value.filename, await value.read())
                for _, value in form.multi_items()
                if isinstance(value, UploadFile)
            ]
        finally:
            await form.close()
        if not parts:
            raise BadRequest("the multipart body has no file parts; send each image as a file part")
    elif media.startswith("image/"):
        parts = [(None, await request.body())]
    elif media == "":
        raise UnsupportedMediaType(
            "missing Content-Type; send multipart/form-data or an image/* body"
        )
    else:
        raise UnsupportedMediaType(
            f"unsupported Content-Type {media[:100]!r}; send multipart/form-data or image/*"
        )
    if len(parts) > limit:
        raise TooManyImages(f"{len(parts)} images in one request; the limit is {limit}")
    return parts
