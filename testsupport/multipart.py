"""The one ``multipart/form-data`` encoder of the tests and benchmarks.

Written by hand rather than through an HTTP client so that the benchmarks send exactly
the bytes they time and the bad-input cases can break a body on purpose.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

# (form field, file name, content type, data)
Part = tuple[str, str, str, bytes]


def encode_multipart(parts: Sequence[Part], *, boundary: str | None = None) -> tuple[bytes, str]:
    """Encode ``parts`` as a ``multipart/form-data`` body.

    Args:
        parts: (field, filename, content type, data) of each file.
        boundary: the boundary (default: a random one).

    Returns:
        The body and the matching ``Content-Type`` header value.
    """
    boundary = boundary or "branchy-" + secrets.token_hex(8)
    chunks: list[bytes] = []
    for field, filename, ctype, data in parts:
        chunks.append(
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n".encode()
        )
        chunks += [data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def image_parts(
    images: Sequence[bytes],
    *,
    ctype: str = "image/png",
    names: Sequence[str] | None = None,
    field: str = "images",
) -> list[Part]:
    """Parts for a classify request: every image under the form field ``images``
    (file names ``img0.png``, ``img1.png`` ... unless ``names`` are given)."""
    names = names if names is not None else [f"img{i}.png" for i in range(len(images))]
    return [(field, name, ctype, data) for name, data in zip(names, images, strict=True)]


def image_files(
    images: Sequence[bytes], ctype: str = "image/png"
) -> list[tuple[str, tuple[str, bytes, str]]]:
    """The same parts in the ``files=`` form of httpx (which then encodes them)."""
    return [(field, (name, data, c)) for field, name, c, data in image_parts(images, ctype=ctype)]
