"""Every bad-input case of issue 5, generated as bytes inside the tests (no binary fixtures).

Two layers:

* byte generators (``jpeg``, ``png``, ``truncated``, ``decompression_bomb`` ...) that
  return encoded images, valid or deliberately broken. PNGs that Pillow would refuse to
  write (16-bit RGB, zero width, a header that lies about its size) are assembled chunk by
  chunk with ``zlib``/``struct``, so a "30000 × 30000" bomb stays a few hundred bytes;
* :func:`bad_requests`: complete HTTP requests (method, path, headers, body) for one
  served model, each with the answer the service must give (issue 5 and
  ``docs/service-contract.md``). The same list drives the HTTP tests and the soak.

Images whose *format* is odd but whose content is fine (palette and RGBA PNG; see
:func:`odd_but_valid_images`) must be accepted and classified: converting channels is the
server's job (issue 4, "Preprocessing").
"""

from __future__ import annotations

import base64
import functools
import io
import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from testsupport.multipart import encode_multipart

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A fixed multipart boundary, so that a case can name a wrong one ("other-...").
BOUNDARY = "branchy-test-boundary"
# PNG colour types (PNG spec, IHDR).
GREY, RGB, PALETTE, GREY_ALPHA, RGBA = 0, 2, 3, 4, 6


# --------------------------------------------------------------------------- valid images


def pixels(height: int, width: int, channels: int, *, seed: int = 0) -> np.ndarray:
    """Deterministic uint8 test pixels ``(H, W, C)``: a smooth pattern plus noise, so that
    JPEG keeps it recognisable and a classifier's answer is not a constant."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = (np.sin(xx / 3.0 + seed) + np.cos(yy / 4.0 - seed)) * 60 + 128
    img = base[..., None] + rng.normal(0, 30, (height, width, channels))
    return np.clip(img, 0, 255).astype(np.uint8)


def to_pil(array: np.ndarray) -> Image.Image:
    """``(H, W, 1|3|4)`` uint8 → a Pillow image of mode L, RGB or RGBA."""
    if array.ndim == 3 and array.shape[2] == 1:
        return Image.fromarray(array[..., 0], mode="L")
    return Image.fromarray(array)


def png(array: np.ndarray) -> bytes:
    """Lossless PNG of ``(H, W, C)`` uint8 pixels."""
    buf = io.BytesIO()
    to_pil(array).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(array: np.ndarray, *, quality: int = 90) -> bytes:
    """Baseline JPEG of ``(H, W, C)`` uint8 pixels (lossy: decode before comparing)."""
    buf = io.BytesIO()
    to_pil(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def image_for(channels: int, height: int, width: int, *, seed: int = 0) -> bytes:
    """A valid PNG of exactly the model's input size, so that the server's answer can be
    compared with offline evaluation of the same pixels without any resize."""
    return png(pixels(height, width, channels, seed=seed))


# --------------------------------------------------------------------------- PNG by hand


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 of type + data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(
    width: int,
    height: int,
    idat: bytes,
    *,
    bit_depth: int = 8,
    colour_type: int = RGB,
    extra_chunks: Sequence[bytes] = (),
) -> bytes:
    """A PNG assembled from chunks, with whatever IHDR we like (even a lying one).

    Args:
        width: IHDR width (0 and 30000 are both allowed here).
        height: IHDR height.
        idat: the (already zlib-compressed) image data.
        bit_depth: IHDR bit depth.
        colour_type: IHDR colour type (0 grey, 2 RGB, 3 palette, 4 grey+alpha, 6 RGBA).
        extra_chunks: chunks placed between IHDR and IDAT (e.g. PLTE).
    """
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", ihdr)
        + b"".join(extra_chunks)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def png16(array: np.ndarray) -> bytes:
    """A 16-bit-per-sample PNG (grey or RGB) of ``(H, W, C)`` uint16 pixels.

    Pillow cannot write 48-bit RGB PNGs, hence by hand: every row starts with filter
    type 0 (None) and holds big-endian samples.
    """
    h, w, c = array.shape
    colour_type = {1: GREY, 3: RGB}[c]
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))
    return raw_png(w, h, zlib.compress(rows), bit_depth=16, colour_type=colour_type)


def decompression_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header declares ``width × height`` RGB pixels.

    Only the first row's data is present: a server must reject it from the header, before
    it allocates the pixels (30000² RGB would be 2.7 GB).
    """
    first_row = b"\x00" + bytes(3 * width)
    return raw_png(width, height, zlib.compress(first_row, 9))


def full_decompression_bomb(width: int = 6000, height: int = 6000) -> bytes:
    """A complete, valid greyscale PNG of ``width × height`` zeros, compressed ~1000:1.

    6000² = 36 M pixels is under Pillow's own bomb limit (89 M) but over the service's
    default ``BRANCHY_MAX_IMAGE_PIXELS`` (16.7 M): only the service's check stops it.
    """
    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + one byte per grey pixel
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    return raw_png(width, height, b"".join(parts), colour_type=GREY)


def zero_sized_png(width: int = 0, height: int = 0) -> bytes:
    """A PNG declaring a zero dimension (forbidden by the PNG spec)."""
    return raw_png(width, height, zlib.compress(b""))


# --------------------------------------------------------------------------- broken images


def truncated(data: bytes, *, keep: float = 0.5) -> bytes:
    """The first ``keep`` share of an encoded image (a download cut short)."""
    return data[: max(1, int(len(data) * keep))]


def corrupted_png(data: bytes) -> bytes:
    """A PNG whose compressed pixel data is damaged (bytes flipped inside IDAT).

    The CRCs are recomputed, so the damage is found only while inflating and unfiltering
    the rows. Note: ``torchvision.io.decode_png`` (0.29) crashes the process with SIGSEGV
    on this input ("bad adaptive filter value"); Pillow raises ``OSError``.
    """
    chunks = _png_chunks(data)
    out = [PNG_SIGNATURE]
    for kind, body in chunks:
        if kind == b"IDAT":
            b = bytearray(zlib.decompress(body))
            # Every row starts with its filter byte; 0..4 are valid, 0xEE is not.
            row_len = len(b) // _png_height(chunks)
            for y in range(0, len(b), row_len):
                b[y] = 0xEE
            body = zlib.compress(bytes(b))
        out.append(png_chunk(kind, body))
    return b"".join(out)


def bad_crc_png(data: bytes) -> bytes:
    """A PNG whose IHDR CRC does not match (one flipped byte in the header)."""
    b = bytearray(data)
    b[8 + 8 + 4] ^= 0xFF  # a byte of the IHDR width field; the stored CRC stays old
    return bytes(b)


def corrupted_jpeg(data: bytes) -> bytes:
    """A JPEG whose entropy-coded scan is damaged just after the start-of-scan header.

    Damage far into the scan is often decoded silently as noise (libjpeg is tolerant);
    a broken SOS header (wrong component count) is an error for every decoder.
    """
    b = bytearray(data)
    sos = b.find(b"\xff\xda")
    if sos < 0:
        raise ValueError("not a baseline JPEG: no SOS marker")
    # SOS: marker, length (2), component count (1) ... -> claim 4 components in a 3-ch scan.
    b[sos + 4] = 4 if b[sos + 4] != 4 else 2
    return bytes(b)


def cmyk_jpeg(array: np.ndarray) -> bytes:
    """A 4-channel CMYK (Adobe) JPEG of the RGB pixels."""
    buf = io.BytesIO()
    to_pil(array).convert("CMYK").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def animated_gif(array: np.ndarray, *, frames: int = 3) -> bytes:
    """An animated GIF: ``frames`` different frames, looping."""
    imgs = [
        to_pil(np.roll(array, 3 * i, axis=1)).convert("RGB").convert("P") for i in range(frames)
    ]
    buf = io.BytesIO()
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=100, loop=0)
    return buf.getvalue()


def palette_png(height: int, width: int, *, seed: int = 0) -> tuple[bytes, np.ndarray]:
    """A palette (colour type 3) PNG and the exact RGB pixels it stands for.

    Returns:
        The PNG bytes and its ``(H, W, 3)`` uint8 RGB expansion.
    """
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, (height, width), dtype=np.uint8)
    img = Image.fromarray(index, mode="P")
    img.putpalette(palette.tobytes())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), palette[index]


def rgba_png(array: np.ndarray) -> bytes:
    """An RGBA PNG of the RGB pixels with an opaque alpha channel, so that any sensible
    conversion (drop alpha, or composite over a background) gives the same RGB."""
    rgb = array if array.shape[2] == 3 else np.repeat(array, 3, axis=2)
    alpha = np.full((*rgb.shape[:2], 1), 255, dtype=np.uint8)
    return png(np.concatenate([rgb, alpha], axis=2))


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG")
    pos, chunks = len(PNG_SIGNATURE), []
    idat = b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        # Pillow may split the pixel data over several IDAT chunks; merge them.
        if kind == b"IDAT":
            idat += body
            continue
        if idat:
            chunks.append((b"IDAT", idat))
            idat = b""
        chunks.append((kind, body))
    return chunks


def _png_height(chunks: list[tuple[bytes, bytes]]) -> int:
    ihdr = dict(chunks)[b"IHDR"]
    return int(struct.unpack(">I", ihdr[4:8])[0])


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Target:
    """The served model and the limits that the bad requests aim at.

    Attributes:
        model: served model name.
        channels: input channels of the model.
        height: input height.
        width: input width.
        num_early_exits: thresholds the model takes (exits - 1).
        max_body_bytes: the server's ``BRANCHY_MAX_BODY_BYTES``.
        max_images: the server's ``BRANCHY_MAX_IMAGES_PER_REQUEST``.
        v2_input: name of the v2 image tensor input.
    """

    model: str
    channels: int
    height: int
    width: int
    num_early_exits: int
    max_body_bytes: int = 16 * 1024 * 1024
    max_images: int = 64
    v2_input: str = "input"


@dataclass(frozen=True)
class HttpRequest:
    """A complete request, as bytes, so that any client (httpx, a raw socket) can send it."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class BadCase:
    """One bad request and the answer the contract requires.

    Attributes:
        name: short id (used as the pytest id).
        request: what to send.
        status: the required HTTP status.
        codes: acceptable ``error.code`` values (one, except where the contract leaves the
            choice between two equally clear codes).
    """

    name: str
    request: HttpRequest
    status: int
    codes: frozenset[str]


def classify_raw(target: Target, data: bytes, ctype: str, query: str = "") -> HttpRequest:
    """A raw-body classify request (one image)."""
    path = f"/v1/models/{target.model}/classify" + (f"?{query}" if query else "")
    return HttpRequest("POST", path, {"content-type": ctype}, data)


def classify_multipart(
    target: Target, images: Sequence[tuple[str, bytes]], query: str = ""
) -> HttpRequest:
    """A multipart classify request: ``images`` are (content type, bytes) pairs."""
    parts = [(f"image{i}", f"img{i}", ctype, data) for i, (ctype, data) in enumerate(images)]
    body, ctype = encode_multipart(parts, boundary=BOUNDARY)
    path = f"/v1/models/{target.model}/classify" + (f"?{query}" if query else "")
    return HttpRequest("POST", path, {"content-type": ctype}, body)


def v2_tensor_body(target: Target, array: np.ndarray) -> dict[str, object]:
    """A valid v2 ``infer`` body: one ``(1, C, H, W)`` UINT8 tensor of ``(H, W, C)`` pixels."""
    chw = np.ascontiguousarray(array.transpose(2, 0, 1))
    return {
        "inputs": [
            {
                "name": target.v2_input,
                "shape": [1, *chw.shape],
                "datatype": "UINT8",
                "data": chw.reshape(-1).tolist(),
            }
        ]
    }


def v2_request(target: Target, body: bytes, *, model: str | None = None) -> HttpRequest:
    path = f"/v2/models/{model or target.model}/infer"
    return HttpRequest("POST", path, {"content-type": "application/json"}, body)


def bad_image_payloads(target: Target) -> dict[str, tuple[str, bytes]]:
    """Image bytes that no server may classify: name → (content type, bytes)."""
    arr = pixels(target.height, target.width, 3)
    good_png, good_jpeg = png(arr), jpeg(arr)
    return {
        "empty": ("image/png", b""),
        "not_an_image": ("image/jpeg", b"this is plain text, not a JPEG\n" * 4),
        "truncated_jpeg": ("image/jpeg", truncated(good_jpeg)),
        "truncated_png": ("image/png", truncated(good_png)),
        "header_only_png": ("image/png", good_png[:33]),
        "corrupted_jpeg": ("image/jpeg", corrupted_jpeg(good_jpeg)),
        "corrupted_png": ("image/png", corrupted_png(good_png)),
        "bad_crc_png": ("image/png", bad_crc_png(good_png)),
        "zero_sized_png": ("image/png", zero_sized_png(0, 0)),
        "zero_width_png": ("image/png", zero_sized_png(0, target.height)),
    }


@functools.cache
def too_large_payloads() -> dict[str, tuple[str, bytes]]:
    """Images over the pixel limit (decompression bombs): rejected from the header."""
    return {
        "bomb_30000x30000": ("image/png", decompression_bomb(30000, 30000)),
        "bomb_full_6000x6000": ("image/png", full_decompression_bomb(6000, 6000)),
    }


def odd_but_valid_images(target: Target) -> dict[str, tuple[str, bytes, np.ndarray]]:
    """Formats the server must convert, with the RGB pixels each one stands for.

    Returns:
        name → (content type, bytes, ``(H, W, 3)`` uint8 reference pixels). Sending the
        reference pixels as an RGB PNG must give the same answer.
    """
    h, w = target.height, target.width
    arr = pixels(h, w, 3, seed=7)
    pal, pal_rgb = palette_png(h, w, seed=7)
    return {
        "palette_png": ("image/png", pal, pal_rgb),
        "rgba_png": ("image/png", rgba_png(arr), arr),
    }


def ambiguous_images(target: Target) -> dict[str, tuple[str, bytes]]:
    """Formats a server may either convert and classify (200) or refuse with a clear 4xx:
    issue 5 lists them as hostile input, issue 4 asks to decode what decodes safely."""
    h, w = target.height, target.width
    arr = pixels(h, w, 3, seed=3)
    wide = (arr.astype(np.uint16) * 257)[..., :1]
    return {
        "animated_gif": ("image/gif", animated_gif(arr)),
        "png_16bit_grey": ("image/png", png16(wide)),
        "png_16bit_rgb": ("image/png", png16(arr.astype(np.uint16) * 257)),
        "cmyk_jpeg": ("image/jpeg", cmyk_jpeg(arr)),
        "one_by_one_png": ("image/png", png(pixels(1, 1, 3))),
    }


def bad_requests(target: Target) -> list[BadCase]:
    """Every request of issue 5's bad-input list that must get a 4xx, for ``target``."""
    cases: list[BadCase] = []

    def add(name: str, request: HttpRequest, status: int, *codes: str) -> None:
        cases.append(BadCase(name, request, status, frozenset(codes)))

    for name, (ctype, data) in bad_image_payloads(target).items():
        add(f"raw_{name}", classify_raw(target, data, ctype), 400, "bad_image")
    for name in ("truncated_png", "corrupted_jpeg", "not_an_image"):
        ctype, data = bad_image_payloads(target)[name]
        good = image_for(target.channels, target.height, target.width)
        # One bad part among good ones fails the whole request, clearly.
        add(
            f"multipart_{name}",
            classify_multipart(target, [("image/png", good), (ctype, data)]),
            400,
            "bad_image",
        )
    for name, (ctype, data) in too_large_payloads().items():
        add(f"raw_{name}", classify_raw(target, data, ctype), 413, "payload_too_large")

    good = image_for(target.channels, target.height, target.width)
    # Body over the limit: a valid PNG padded with a trailing ancillary chunk.
    pad = png_chunk(b"tEXt", b"pad\x00" + b"x" * (target.max_body_bytes + 1024))
    add(
        "raw_body_over_limit",
        classify_raw(target, good[:-12] + pad + good[-12:], "image/png"),
        413,
        "payload_too_large",
    )
    add(
        "multipart_too_many_images",
        classify_multipart(target, [("image/png", good)] * (target.max_images + 1)),
        413,
        "too_many_images",
    )
    add("multipart_no_images", classify_multipart(target, []), 400, "bad_request")

    add(
        "content_type_text", classify_raw(target, good, "text/plain"), 415, "unsupported_media_type"
    )
    add(
        "content_type_json",
        classify_raw(target, b'{"image": 1}', "application/json"),
        415,
        "unsupported_media_type",
    )
    add(
        "content_type_missing",
        HttpRequest("POST", f"/v1/models/{target.model}/classify", {}, good),
        415,
        "unsupported_media_type",
    )

    body, ctype = encode_multipart([("image0", "a.png", "image/png", good)], boundary=BOUNDARY)
    add(
        "multipart_no_boundary",
        classify_raw(target, body, "multipart/form-data"),
        400,
        "bad_request",
    )
    add(
        "multipart_wrong_boundary",
        classify_raw(target, body, ctype.replace("branchy", "other")),
        400,
        "bad_request",
    )
    add(
        "multipart_cut_short",
        classify_raw(target, body[: len(body) // 2], ctype),
        400,
        "bad_request",
    )
    add(
        "multipart_garbage",
        classify_raw(target, b"\x00\xff" * 300, ctype),
        400,
        "bad_request",
    )

    add(
        "unknown_model_classify",
        classify_raw(Target("no-such-model", 1, 1, 1, 1), good, "image/png"),
        404,
        "model_not_found",
    )
    add(
        "dotdot_model_classify",
        HttpRequest(
            "POST", "/v1/models/..%2F..%2Fetc/classify", {"content-type": "image/png"}, good
        ),
        404,
        "model_not_found",
        "not_found",
    )
    add(
        "unknown_model_info", HttpRequest("GET", "/v1/models/no-such-model"), 404, "model_not_found"
    )
    add("unknown_model_v2", HttpRequest("GET", "/v2/models/no-such-model"), 404, "model_not_found")

    n = target.num_early_exits
    for name, value in threshold_cases(n).items():
        add(
            f"thresholds_{name}",
            classify_raw(target, good, "image/png", f"thresholds={value}"),
            422,
            "validation_error",
        )
    add(
        "top_k_negative",
        classify_raw(target, good, "image/png", "top_k=-1"),
        422,
        "validation_error",
    )
    add(
        "top_k_text", classify_raw(target, good, "image/png", "top_k=many"), 422, "validation_error"
    )

    arr = pixels(target.height, target.width, target.channels)
    valid = v2_tensor_body(target, arr)
    for name, raw in v2_bad_bodies(target, valid).items():
        add(f"v2_{name}", v2_request(target, raw), 400, "bad_request")
    for name, (raw, headers, status, code) in v2_protocol_cases(target).items():
        add(
            f"v2_{name}",
            HttpRequest("POST", f"/v2/models/{target.model}/infer", headers, raw),
            status,
            code,
        )
    add(
        "v2_unknown_model",
        v2_request(target, json.dumps(valid).encode(), model="no-such-model"),
        404,
        "model_not_found",
    )
    return cases


def threshold_cases(num_early_exits: int) -> dict[str, str]:
    """Invalid ``thresholds`` values (comma-separated, as in the query string)."""
    ok = ["0.5"] * num_early_exits
    cases = {
        "too_many": ",".join([*ok, "0.5"]),
        "negative": ",".join(["-0.1", *ok[1:]]),
        "nan": ",".join(["nan", *ok[1:]]),
        "infinite_negative": ",".join(["-inf", *ok[1:]]),
        "non_numeric": ",".join(["abc", *ok[1:]]),
    }
    # With one early exit "too few" is the empty string, which reads as "not given".
    if num_early_exits > 1:
        cases["too_few"] = ",".join(ok[:-1])
    return cases


def invalid_admin_thresholds(num_early_exits: int) -> dict[str, object]:
    """Invalid JSON values for the admin ``thresholds`` list (PUT body)."""
    ok = [0.5] * num_early_exits
    return {
        "too_few": ok[:-1],
        "too_many": [*ok, 0.5],
        "negative": [-0.1, *ok[1:]],
        "nan_string": ["nan", *ok[1:]],
        "non_numeric": ["abc", *ok[1:]],
        "not_a_list": "0.5",
    }


def v2_bad_bodies(target: Target, valid: dict[str, object]) -> dict[str, bytes]:
    """Malformed v2 ``infer`` bodies derived from a valid one."""
    inp = dict(valid["inputs"][0])  # type: ignore[index]
    data = list(inp["data"])

    def with_input(**changes: object) -> bytes:
        return json.dumps({"inputs": [{**inp, **changes}]}).encode()

    nan_data = [float(v) for v in data]
    nan_data[0] = float("nan")
    inf_data = [float(v) for v in data]
    inf_data[0] = float("inf")
    return {
        "malformed_json": b'{"inputs": [{"name": "input", "shape": [1,',
        "not_an_object": b"[1, 2, 3]",
        "no_inputs": b"{}",
        "empty_inputs": b'{"inputs": []}',
        "shape_mismatch": with_input(shape=[1, target.channels, target.height + 1, target.width]),
        "shape_negative": with_input(shape=[1, target.channels, -target.height, target.width]),
        "shape_wrong_rank": with_input(shape=[len(data)]),
        "data_too_short": with_input(data=data[:-1]),
        "datatype_unknown": with_input(datatype="COMPLEX128"),
        "datatype_string_data": with_input(data=["a"] * len(data)),
        "uint8_out_of_range": with_input(data=[300] * len(data)),
        # Python's json writes NaN/Infinity literals (not strict JSON): the server's
        # parser may accept them, so the data check must still refuse them.
        "fp32_nan": json.dumps(
            {"inputs": [{**inp, "datatype": "FP32", "data": nan_data}]}
        ).encode(),
        "fp32_inf": json.dumps(
            {"inputs": [{**inp, "datatype": "FP32", "data": inf_data}]}
        ).encode(),
    }


def v2_protocol_cases(target: Target) -> dict[str, tuple[bytes, dict[str, str], int, str]]:
    """v2 requests broken in the encoded-image (BYTES) input, the binary tensor extension
    (a JSON header of ``Inference-Header-Content-Length`` bytes, then raw tensor bytes),
    the outputs and the parameters: name -> (body, headers, status, code)."""
    json_h = {"content-type": "application/json"}
    good = image_for(target.channels, target.height, target.width)
    chw = (target.channels, target.height, target.width)
    size = target.channels * target.height * target.width
    image_input: dict[str, object] = {"name": "image", "shape": [1], "datatype": "BYTES"}

    def as_json(*inputs: dict[str, object], **extra: object) -> bytes:
        return json.dumps({"inputs": list(inputs), **extra}).encode()

    def binary(
        header: Mapping[str, object], blob: bytes, length: object = None
    ) -> tuple[bytes, dict[str, str]]:
        head = json.dumps(header).encode()
        n = len(head) if length is None else length
        return head + blob, {
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(n),
        }

    tensor: dict[str, object] = {
        "name": "x",
        "shape": [1, *chw],
        "datatype": "UINT8",
        "parameters": {"binary_data_size": size},
    }
    pixels_blob = bytes(size)
    b64 = base64.b64encode(good).decode()
    cases: dict[str, tuple[bytes, dict[str, str], int, str]] = {
        "bytes_not_base64": (
            as_json({**image_input, "data": ["!!not base64"]}),
            json_h,
            400,
            "bad_request",
        ),
        "bytes_not_an_image": (
            as_json({**image_input, "data": [base64.b64encode(b"hi").decode()]}),
            json_h,
            400,
            "bad_image",
        ),
        "bytes_number": (as_json({**image_input, "data": [5]}), json_h, 400, "bad_request"),
        "bytes_too_many": (
            as_json({**image_input, "shape": [10**12], "data": [b64]}),
            json_h,
            413,
            "too_many_images",
        ),
        "shape_overflow": (
            as_json({"name": "x", "shape": [2**62, 2**62, 1, 1], "datatype": "UINT8", "data": [0]}),
            json_h,
            400,
            "bad_request",
        ),
        "two_inputs": (
            as_json({**image_input, "data": [b64]}, {**image_input, "data": [b64]}),
            json_h,
            400,
            "bad_request",
        ),
        "unknown_output": (
            as_json({**image_input, "data": [b64]}, outputs=[{"name": "NOPE"}]),
            json_h,
            400,
            "bad_request",
        ),
        "thresholds_parameter_nan": (
            as_json({**image_input, "data": [b64]}, parameters={"thresholds": "nan"}),
            json_h,
            400,
            "bad_request",
        ),
    }
    for name, (body, headers) in {
        "binary_header_length_past_the_body": binary(tensor, pixels_blob, 10**9),
        "binary_header_length_negative": binary(tensor, pixels_blob, -5),
        "binary_header_length_text": binary(tensor, pixels_blob, "abc"),
        "binary_data_cut_short": binary(tensor, pixels_blob[: size // 2]),
        "binary_size_negative": binary(
            {**tensor, "parameters": {"binary_data_size": -1}}, pixels_blob
        ),
        "binary_header_not_json": (
            b"{{{{" + pixels_blob,
            {"content-type": "application/octet-stream", "inference-header-content-length": "4"},
        ),
        "binary_bytes_length_past_the_data": binary(
            {**image_input, "parameters": {"binary_data_size": 20}},
            struct.pack("<I", 10**9) + b"x" * 16,
        ),
    }.items():
        cases[name] = (body, headers, 400, "bad_request")
    return cases


def valid_request(target: Target, *, seed: int = 0) -> HttpRequest:
    """A valid raw-PNG classify request, used to prove the server still serves."""
    return classify_raw(
        target, image_for(target.channels, target.height, target.width, seed=seed), "image/png"
    )
