"""Bounded JSON parsing for request bodies.

``json.loads`` on untrusted bytes reaches Python's own limits before any validation can
look at the result: arrays nested about a thousand deep raise ``RecursionError``,
integers of more than 4300 digits raise ``ValueError`` from ``int()``, and integers too
large for a float overflow later wherever they are converted. :func:`parse_json` checks
the text first, in a few C-speed passes (regular expressions and numpy, no Python loop
over the bytes), for its nesting depth, the length of its number literals and the
number of values it holds, and only then parses it; a body over any bound is a
:class:`~service.errors.BadRequest` naming the bound, never a 500.

Strings are blanked before brackets and numbers are counted, so neither a ``"[[["``
inside a string nor a long base64 text counts. The pre-scan and the parser agree on
where strings are for every valid document; on an invalid one the parser stops at the
first error, and the scan can only over-count there (an unterminated string is left in),
so no body passes the scan and then recurses deeper than ``max_depth``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import BadRequest

# A JSON string (RFC 8259), written as an unrolled loop so the engine never backtracks.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


@dataclass(frozen=True)
class JsonLimits:
    """Bounds of one JSON document.

    Attributes:
        max_depth: most nested arrays and objects (``[[1]]`` is 2 deep).
        max_number_chars: longest number literal, sign and exponent included; 40 holds
            every float64 written in full and integers up to 10^39.
        max_values: most values (numbers, strings, ``true``/``false``/``null``, arrays,
            objects) in the document.
    """

    max_depth: int = 32
    max_number_chars: int = 40
    max_values: int = 1_000_000


def parse_json(body: bytes, limits: JsonLimits, *, what: str = "the request body") -> Any:
    """Parse ``body`` as one UTF-8 JSON document within ``limits``.

    ``NaN``, ``Infinity`` and numbers that overflow a float (``1e999``) are refused:
    they are not JSON (RFC 8259), although Python's parser takes them.

    Args:
        body: the raw bytes.
        limits: the bounds to enforce before parsing.
        what: how to name the document in error messages.

    Returns:
        The parsed value (dicts, lists, str, int, float, bool, None).

    Raises:
        BadRequest: not UTF-8, not JSON, or over a bound.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{what} is not UTF-8 text") from None
    _check_bounds(body, limits, what)
    try:
        return json.loads(
            text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=int
        )
    except _NotJson as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None
    except (RecursionError, ValueError) as exc:  # pragma: no cover - the scan prevents these
        raise BadRequest(f"{what} is not valid JSON: {type(exc).__name__}") from None


class _NotJson(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(f"the number {text[:40]} is out of range of a float")
    return value


# Bytes a JSON number literal is made of.
_NUMBER_BYTES = np.zeros(256, dtype=bool)
_NUMBER_BYTES[list(b"-+0123456789.eE")] = True


def _check_bounds(body: bytes, limits: JsonLimits, what: str) -> None:
    bare = _STRING.sub(b'""', body) if b'"' in body else body
    arr = np.frombuffer(bare, dtype=np.uint8)
    # Depth: a running sum over the brackets only (few, even in a large numeric body).
    brackets = np.flatnonzero(
        (arr == ord("[")) | (arr == ord("{")) | (arr == ord("]")) | (arr == ord("}"))
    )
    kinds = arr[brackets]
    opens = (kinds == ord("[")) | (kinds == ord("{"))
    depth = int(np.cumsum(np.where(opens, 1, -1)).max(initial=0))
    if depth > limits.max_depth:
        raise BadRequest(
            f"{what} nests arrays/objects {depth} deep; the limit is {limits.max_depth}"
        )
    # Every value but the first is preceded by a comma or a colon-separated key (a string
    # already counted), so commas + containers + 1 bounds the number of values.
    values = int(np.count_nonzero(arr == ord(","))) + int(np.count_nonzero(opens)) + 1
    if values > limits.max_values:
        raise BadRequest(f"{what} holds about {values} values; the limit is {limits.max_values}")
    # Longest run of number bytes: where the mask switches on and off.
    mask = np.concatenate(([False], _NUMBER_BYTES[arr], [False]))
    edges = np.flatnonzero(mask[1:] != mask[:-1])
    longest = int((edges[1::2] - edges[::2]).max(initial=0))
    if longest > limits.max_number_chars:
        raise BadRequest(
            f"{what} holds a number literal of {longest} characters; the limit is "
            f"{limits.max_number_chars}"
        )
