"""Property-based fuzzing (issue 5).

* Hypothesis on the image-decoding path (``service.preprocess.preprocess``): whatever the
  bytes, the answer is either a finite ``(C, H, W)`` float32 tensor of the model's input
  shape, or the service's own 4xx error (``BadImage`` 400, ``PayloadTooLarge`` 413) --
  never another exception. Inputs: arbitrary bytes; valid images of every format and
  Pillow mode the server admits, then truncated or with bytes flipped; hand-made PNGs
  whose header says anything at all.
* Schemathesis against the OpenAPI document of a real server process: bounded here (a
  few seconds); ``benchmarks/fuzz.py`` runs the long version.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from models import InputSpec
from service.errors import BadImage, PayloadTooLarge, ServiceError
from service.preprocess import preprocess
from tests.service.conftest import TOKEN, ServerProcess
from testsupport import badimages as bad
from testsupport.reliability import fuzz_openapi

GREY_SPEC = InputSpec(channels=1, height=28, width=28, mean=(0.1307,), std=(0.3081,))
RGB_SPEC = InputSpec(
    channels=3, height=32, width=32, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26)
)
MAX_PIXELS = 1 << 20  # smaller than the default, so headers near the limit stay cheap
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same inputs every run: CI failures reproduce
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# (format, Pillow modes it can store) -- the formats the server admits.
FORMATS = {
    "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"],
    "JPEG": ["L", "RGB", "CMYK"],
    "GIF": ["L", "P"],
    "BMP": ["1", "L", "P", "RGB"],
    # (LAB TIFFs are left out: the server refuses them for grey models, a clear 400.)
    "TIFF": ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "F", "YCbCr"],
    "WEBP": ["RGB", "RGBA"],
    "PPM": ["L", "RGB"],
}


def check_preprocess(data: bytes, spec: InputSpec) -> None:
    """The property: a right tensor, or the service's bad-image / too-large error."""
    try:
        x = preprocess(data, spec, max_pixels=MAX_PIXELS)
    except (BadImage, PayloadTooLarge) as exc:
        assert 400 <= exc.status < 500 and exc.message, exc
        return
    except ServiceError as exc:  # pragma: no cover - a failure message, not a path
        pytest.fail(f"unexpected service error {exc.code} {exc.status}: {exc}")
    assert isinstance(x, torch.Tensor)
    assert x.dtype == torch.float32
    assert tuple(x.shape) == spec.shape, (tuple(x.shape), spec.shape)
    assert bool(torch.isfinite(x).all())


@st.composite
def encoded_images(draw: st.DrawFn) -> bytes:
    """A valid image of any admitted format and mode, of any small size."""
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(FORMATS[fmt]))
    w = draw(st.integers(1, 40))
    h = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    rgb = Image.fromarray(bad.pixels(h, w, 3, seed=seed))
    if mode in ("I;16", "I"):
        arr = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        img = Image.fromarray(arr.astype(np.uint16)).convert(mode)
    elif mode == "F":
        img = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.float32) * 1.5)
    else:
        img = rgb.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@st.composite
def damaged_images(draw: st.DrawFn) -> bytes:
    """A valid image, then cut short, with bytes overwritten, or with bytes inserted."""
    data = bytearray(draw(encoded_images()))
    how = draw(st.sampled_from(["truncate", "flip", "insert", "flip_many"]))
    if how == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if how == "insert":
        at = draw(st.integers(0, len(data)))
        return bytes(data[:at]) + draw(st.binary(min_size=1, max_size=64)) + bytes(data[at:])
    flips = 1 if how == "flip" else draw(st.integers(2, 32))
    for _ in range(flips):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    return bytes(data)


@st.composite
def lying_pngs(draw: st.DrawFn) -> bytes:
    """A PNG whose IHDR may declare any size, depth and colour type, over little data."""
    width = draw(st.one_of(st.integers(0, 64), st.integers(0, 2**31 - 1)))
    height = draw(st.one_of(st.integers(0, 64), st.integers(0, 2**31 - 1)))
    depth = draw(st.sampled_from([1, 2, 4, 8, 16, 3, 0, 255]))
    ctype = draw(st.sampled_from([0, 2, 3, 4, 6, 1, 7]))
    raw = draw(st.binary(max_size=512))
    extra = []
    if ctype == 3 and draw(st.booleans()):
        extra.append(bad.png_chunk(b"PLTE", bytes(range(48))))
    idat = zlib.compress(raw) if draw(st.booleans()) else raw
    return bad.raw_png(width, height, idat, bit_depth=depth, colour_type=ctype, extra_chunks=extra)


@FUZZ
@given(data=st.binary(max_size=2048), rgb=st.booleans())
def test_preprocess_arbitrary_bytes(data: bytes, rgb: bool) -> None:
    check_preprocess(data, RGB_SPEC if rgb else GREY_SPEC)


@FUZZ
@given(data=encoded_images(), rgb=st.booleans())
def test_preprocess_every_admitted_format_and_mode_decodes(data: bytes, rgb: bool) -> None:
    spec = RGB_SPEC if rgb else GREY_SPEC
    # Valid files must be accepted, not merely "not crash".
    x = preprocess(data, spec, max_pixels=MAX_PIXELS)
    assert tuple(x.shape) == spec.shape and bool(torch.isfinite(x).all())


@FUZZ
@given(data=damaged_images(), rgb=st.booleans())
def test_preprocess_damaged_images(data: bytes, rgb: bool) -> None:
    check_preprocess(data, RGB_SPEC if rgb else GREY_SPEC)


@FUZZ
@given(data=lying_pngs(), rgb=st.booleans())
def test_preprocess_pngs_with_any_header(data: bytes, rgb: bool) -> None:
    check_preprocess(data, RGB_SPEC if rgb else GREY_SPEC)


def test_preprocess_pixel_limit_is_checked_before_decoding() -> None:
    # 30000 x 30000 declared in 167 bytes: refused from the header (413), not decoded.
    with pytest.raises(PayloadTooLarge):
        preprocess(bad.decompression_bomb(), GREY_SPEC, max_pixels=MAX_PIXELS)
    # Just over the limit, a complete and valid image: still refused.
    side = int(MAX_PIXELS**0.5) + 1
    with pytest.raises(PayloadTooLarge):
        preprocess(bad.full_decompression_bomb(side, side), GREY_SPEC, max_pixels=MAX_PIXELS)
    # Just under it: decoded and resized.
    small = bad.full_decompression_bomb(side - 2, side - 2)
    assert tuple(preprocess(small, GREY_SPEC, max_pixels=MAX_PIXELS).shape) == (1, 28, 28)


def test_png_chunk_helper_writes_valid_crcs() -> None:
    # The generators above are only as good as their PNGs: a hand-made valid PNG decodes.
    rows = b"".join(b"\x00" + bytes([y * 10] * 3 * 4) for y in range(3))
    data = bad.raw_png(4, 3, zlib.compress(rows))
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.size == (4, 3) and img.getpixel((0, 2)) == (20, 20, 20)
    assert struct.unpack(">I", data[16:20])[0] == 4


# --------------------------------------------------------------------------- schemathesis


def test_schemathesis_against_the_openapi_document(
    start_server: Callable[..., ServerProcess],
) -> None:
    """Bounded: a few examples per operation, mode and name choice (a few seconds).
    ``python benchmarks/fuzz.py`` runs 200 of each."""
    server = start_server({"BRANCHY_ADMIN_TOKEN": TOKEN})
    report = fuzz_openapi(
        server.base_url,
        max_examples=2,
        seed=0,
        token=TOKEN,
        model="b-lenet",
        timeout_s=30,
        # Routes that take input; the parameterless ones are covered by the long run.
        include=lambda label: "{" in label,
    )
    assert not report.failures, json.dumps(report.failures[:5], indent=1)
    # Every route of the document was exercised, and both kinds of answers were seen.
    for route in (
        "POST /v1/models/{name}/classify",
        "POST /v2/models/{name}/infer",
        "PUT /admin/models/{name}/thresholds",
        "POST /admin/models/{name}/reload",
    ):
        assert route in report.operations, report.operations
    assert report.cases >= 2 * len(report.operations)
    assert len(report.operations) >= 10, report.operations
    assert any(s.startswith("2") for s in report.statuses), report.statuses
    assert any(s.startswith("4") for s in report.statuses), report.statuses
    assert server.proc.poll() is None, "the server died"
    assert "Traceback" not in server.log(), server.log()[-3000:]
