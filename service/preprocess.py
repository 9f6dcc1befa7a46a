"""Image bytes -> the normalised tensor a checkpoint's network expects.

Decoding runs in worker threads (optionally, ``BRANCHY_INLINE_DECODE_PIXELS``, a request
of a few tiny images on the event loop).
Untrusted bytes are checked in steps that each fail with a clear
``BadImage``/``PayloadTooLarge`` before the next, more expensive, step: format from the header, then the declared size against the pixel
limit and a JPEG's scan count against the scan limit (:func:`open_image`), and only then
the pixel data (:func:`load_pixels`).
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageFile
from torch import Tensor

from models import InputSpec
from service.errors import BadImage, PayloadTooLarge

logger = logging.getLogger(__name__)

# Formats whose Pillow decoders are mature; everything else (PSD, ICO, EPS which calls
# Ghostscript, ...) is refused before decoding.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM"})


def open_image(
    data: bytes, *, max_pixels: int, max_jpeg_scans: int = 0, label: str = "image"
) -> Image.Image:
    """Read an encoded image's header and refuse what is unsafe, without decoding pixels.

    Args:
        data: the encoded file.
        max_pixels: largest width × height accepted.
        max_jpeg_scans: most scans a JPEG may have (0 = no limit). Each scan of a
            progressive JPEG is a pass over all its pixels, so a small file repeating
            scans costs seconds to decode whatever its size.
        label: how to name the image in error messages.

    Returns:
        The opened, not yet decoded, single-frame image.

    Raises:
        BadImage: empty, not an image, unsupported format, animated.
        PayloadTooLarge: more pixels than ``max_pixels``, more scans than allowed.
    """
    if not data:
        raise BadImage(f"{label} is empty")
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # pragma: no cover - a process-wide setting
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay off")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns (or raises) from MAX_IMAGE_PIXELS, a process
            # global; ours below uses the configured limit instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS))
    except Image.DecompressionBombError as exc:
        # Pillow's own guard (far above ours) fired while reading the header.
        raise PayloadTooLarge(
            f"{label} declares more pixels than the limit of {max_pixels}: {_why(exc)}"
        ) from None
    except Exception as exc:  # any failure to parse untrusted bytes is a bad image
        raise BadImage(f"{label} is not a decodable image (JPEG, PNG, ...): {_why(exc)}") from None
    width, height = img.size
    if width < 1 or height < 1:
        raise BadImage(f"{label} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"{label} is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    frames = int(getattr(img, "n_frames", 1))
    if frames > 1:
        raise BadImage(f"{label} is animated ({frames} frames); send a single frame")
    if max_jpeg_scans and img.format == "JPEG":
        # Start-of-scan markers: in entropy-coded data 0xFF is always followed by 0x00
        # or a restart marker, so FF DA only occurs as a marker (an embedded thumbnail's
        # scans count too, which only errs on the side of refusing).
        scans = data.count(b"\xff\xda")
        if scans > max_jpeg_scans:
            raise PayloadTooLarge(
                f"{label} is a JPEG of {scans} scans; the limit is {max_jpeg_scans} "
                "(ordinary progressive JPEGs have about 10)"
            )
    return img


def load_pixels(img: Image.Image, *, label: str = "image") -> Image.Image:
    """Decode the pixels of an image from :func:`open_image` (the expensive step).

    Raises:
        BadImage: truncated or corrupt.
        PayloadTooLarge: Pillow's own pixel guard fired.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Image.DecompressionBombError:
        raise PayloadTooLarge(f"{label} declares too many pixels") from None
    except Exception as exc:  # truncated/corrupt data fails in many ways
        raise BadImage(f"{label} is truncated or corrupt: {_why(exc)}") from None
    return img


def decode_image(
    data: bytes, *, max_pixels: int, max_jpeg_scans: int = 0, label: str = "image"
) -> Image.Image:
    """Decode encoded image bytes, refusing anything unsafe or malformed.

    Args:
        data: the encoded file.
        max_pixels: largest width × height accepted; checked from the header, before
            any pixel is decoded, so a decompression bomb costs nothing.
        max_jpeg_scans: most scans of a JPEG (0 = no limit), counted before decoding.
        label: how to name the image in error messages (e.g. ``"image 2 ('cat.png')"``).

    Returns:
        The fully decoded single-frame image.

    Raises:
        BadImage: empty, not an image, unsupported format, animated, truncated or corrupt.
        PayloadTooLarge: more pixels than ``max_pixels``, more scans than allowed.
    """
    img = open_image(data, max_pixels=max_pixels, max_jpeg_scans=max_jpeg_scans, label=label)
    return load_pixels(img, label=label)


def to_array(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """Convert channels (grey <-> RGB, alpha and palettes dropped, 16-bit scaled to 8)
    and resize to the spec's size.

    Returns:
        ``(H, W, C)`` uint8 pixels (read-only).
    """
    img = _to_8bit(img)
    mode = "L" if spec.channels == 1 else "RGB"
    if img.mode != mode:
        if img.mode == "P" or img.mode.endswith("A") or img.mode == "PA":
            img = img.convert("RGBA")
        img = img.convert(mode)
    if img.size != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] != spec.channels:
        # Only for specs with other channel counts than 1 and 3 (none in the zoo).
        raise BadImage(f"cannot convert a {img.mode} image to {spec.channels} channels")
    return arr


def to_checked_array(img: Image.Image, spec: InputSpec, *, label: str = "image") -> np.ndarray:
    """A decoded image -> ``(H, W, C)`` uint8 pixels of the spec's size (closes ``img``).

    Raises:
        BadImage: the image's mode cannot be converted.
    """
    try:
        return to_array(img, spec)
    except BadImage:
        raise
    except Exception as exc:  # odd modes of untrusted files
        raise BadImage(f"{label} cannot be converted: {_why(exc)}") from None
    finally:
        img.close()


def network_inputs(pixels: Sequence[np.ndarray] | np.ndarray, spec: InputSpec) -> list[Tensor]:
    """Images' ``(H, W, C)`` uint8 pixels (a sequence, or one ``(N, H, W, C)`` array)
    -> their ``(C, H, W)`` float32 network inputs, normalised together (one tensor
    operation per request, not per image)."""
    batch = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(0, 3, 1, 2).contiguous()
    return list(normalise(batch, spec))


def pixel_inputs(pixels: Sequence[np.ndarray] | np.ndarray) -> list[Tensor]:
    """Images' ``(H, W, C)`` uint8 pixels (a sequence, or one ``(N, H, W, C)`` array)
    -> ``(C, H, W)`` uint8 tensors for :meth:`service.batcher.Batcher.submit`, which
    normalises a whole batch in one operation: on the serving path that costs the event
    loop three tensor operations per request instead of eight (about 0.1 ms of GIL time
    for a single 32 x 32 image, measured with py-spy)."""
    batch = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(0, 3, 1, 2)
    return list(batch.unbind(0))


def normalise(pixels: Tensor, spec: InputSpec) -> Tensor:
    """:meth:`models.InputSpec.normalise`: ``(x / 255 - mean) / std`` per channel.

    Args:
        pixels: ``(C, H, W)`` or ``(B, C, H, W)`` uint8.
    """
    return spec.normalise(pixels)


def preprocess(
    data: bytes,
    spec: InputSpec,
    *,
    max_pixels: int,
    max_jpeg_scans: int = 0,
    label: str = "image",
) -> Tensor:
    """Encoded bytes -> ``(C, H, W)`` float32 network input."""
    img = decode_image(data, max_pixels=max_pixels, max_jpeg_scans=max_jpeg_scans, label=label)
    return to_input(img, spec, label=label)


def to_input(img: Image.Image, spec: InputSpec, *, label: str = "image") -> Tensor:
    """A decoded image -> ``(C, H, W)`` float32 network input (closes ``img``)."""
    return network_inputs([to_checked_array(img, spec, label=label)], spec)[0]


def _to_8bit(img: Image.Image) -> Image.Image:
    # 16-bit grey PNGs open as I;16* or I (32-bit int); Pillow's convert("L") clips them
    # at 255 instead of scaling, which would turn most images white.
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.int64)
        top = 65535 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        scaled = np.clip(arr, 0, top) * 255 // top
        return Image.fromarray(scaled.astype(np.uint8))
    if img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if img.mode == "1":
        return img.convert("L")
    return img


def _why(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    # Pillow names the buffer by its repr ("<_io.BytesIO object at 0x7f...>"): noise to a
    # client, and it leaks addresses.
    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", text) or type(exc).__name__
    return text[:200]
