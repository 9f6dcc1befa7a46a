"""The exit rule and everything about thresholds, in one place.

* The rule: at early exit ``i`` a sample leaves when the entropy of that exit's softmax
  is *strictly* below the exit's threshold, ``entropy < T_i`` (:func:`leaves`). So ``0``
  lets nobody leave there and ``inf`` everybody; the last exit always answers.
* Valid thresholds (:func:`check_thresholds`): one per early exit, each a number ``>= 0``
  or ``inf``, never NaN. The same rule for every way in: a request's own ``thresholds``
  query, the admin API, the state folder and checkpoints. ``inf`` is allowed everywhere,
  because "everyone leaves here" is a setting an operator may want.
* Their JSON form (:func:`encode_thresholds`): JSON has no infinity, so ``inf`` is
  written as the string ``"inf"`` and read back by :func:`check_thresholds`.
"""

from __future__ import annotations

import array
import math
from collections.abc import Sequence
from typing import Any, Literal, overload

import torch
from torch import Tensor


@overload
def leaves(entropy: float, threshold: float) -> bool: ...


@overload
def leaves(entropy: Tensor, threshold: Tensor | float) -> Tensor: ...


def leaves(entropy: float | Tensor, threshold: Tensor | float) -> bool | Tensor:
    """The exit rule: does a sample with this ``entropy`` leave at an exit with this
    ``threshold``? Strictly below: ``0`` keeps everyone, ``inf`` lets everyone go.

    Args:
        entropy: a float, or a tensor of entropies (elementwise).
        threshold: a float, or a tensor broadcastable against ``entropy``.
    """
    return entropy < threshold


def check_thresholds(values: Any, num_exits: int) -> tuple[float, ...]:
    """Validate thresholds for a model with ``num_exits`` exits (the module docstring's
    rule): a list of numbers (or numeric strings such as ``"0.5"`` and ``"inf"``, the
    JSON and query-string forms), each ``>= 0`` and not NaN, one per early exit.

    Returns:
        The thresholds as floats.

    Raises:
        ValueError: not a list, not numbers, NaN, negative, or the wrong count.
    """
    if not isinstance(values, list | tuple):
        raise ValueError(f"thresholds must be a list of numbers; got {type(values).__name__}")
    # Each value first, then the count: "abc" is not a number, whatever the count.
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | float | str):
            raise ValueError(f"threshold {i} must be a number; got {v!r}")
        try:
            f = float(v)
        except (ValueError, OverflowError):
            shown = v[:40] if isinstance(v, str) else v
            raise ValueError(f"threshold {i} must be a number (or inf); got {shown!r}") from None
        if math.isnan(f):
            raise ValueError(f"threshold {i} is NaN")
        if f < 0:
            raise ValueError(f"threshold {i} must be >= 0; got {f}")
        out.append(f)
    if len(values) != num_exits - 1:
        raise ValueError(
            f"expected {num_exits - 1} threshold(s), one per early exit of this "
            f"{num_exits}-exit model; got {len(values)}"
        )
    return tuple(out)


def encode_threshold(t: float) -> float | Literal["inf"]:
    """JSON has no infinity: +inf ("everyone leaves here") is written as ``"inf"``."""
    return float(t) if math.isfinite(t) else "inf"


def encode_thresholds(thresholds: Sequence[float]) -> list[float | Literal["inf"]]:
    """:func:`encode_threshold` of each: the JSON form of a threshold setting."""
    return [encode_threshold(t) for t in thresholds]


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy, in nats, of ``softmax(logits)`` along the last dimension.

    Computed in float32 from ``log_softmax`` so that it is finite for extreme logits
    (±1e30, ±inf) and for half-precision inputs: a class whose probability underflows to
    zero contributes 0 (the limit of ``p ln p``), never ``0 * -inf = NaN``.

    Args:
        logits: ``(..., C)`` logits, any floating dtype.

    Returns:
        ``(...)`` float32 entropies in ``[0, ln C]``.
    """
    z = logits.float()
    finfo = torch.finfo(z.dtype)
    # ±inf logits would make log_softmax compute inf - inf; the largest finite values
    # give the same probabilities without NaN. NaN logits (a broken model) count as 0.
    z = torch.nan_to_num(z, nan=0.0, posinf=finfo.max, neginf=finfo.min)
    log_p = torch.log_softmax(z, dim=-1)
    top = math.log(max(z.shape[-1], 1))
    if log_p.requires_grad:  # autograd needs log_p as log_softmax left it
        log_p = log_p.clamp_min(finfo.min)
        return (-(log_p.exp() * log_p).sum(dim=-1)).clamp(min=0.0, max=top)
    # The same ops, in place on tensors made here: at batch 1 the allocations cost
    # about as much as the arithmetic. Same kernels, so the same values.
    log_p.clamp_min_(finfo.min)
    return log_p.exp().mul_(log_p).sum(dim=-1).neg_().clamp_(min=0.0, max=top)


# Logits whose spread stays below this cannot overflow ``z - max(z)`` in float32
# (largest finite value about 3.4e38), so log_softmax gives no -inf.
_SAFE_SPREAD = 1e38


def entropy_of_one(logits: Tensor) -> tuple[Tensor, float]:
    """:func:`entropy_from_logits` of one row, and the same value as a Python float.

    For the batch-of-one engine path, where the decision needs the value on the host
    anyway. The result is the same, bit for bit: the guards of
    :func:`entropy_from_logits` (``nan_to_num``, the floor on ``log_p`` and the final
    clamp to ``[0, ln C]``) each cost a tensor operation, and they are run only when
    this row needs them, which Python can tell cheaply from the ten-odd logits and
    the result: finite logits whose spread cannot overflow need neither of the first
    two, and a value strictly inside ``(0, ln C)`` needs no clamp. It saves B-LeNet's
    batch-1 ``early_exit`` about 5 % (``benchmarks/eager_parts.py``,
    ``reports/eager-parts.md``).

    Args:
        logits: ``(1, C)`` logits.

    Returns:
        The ``(1,)`` float32 entropy and its value.
    """
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.shape[0] != 1:
        h = entropy_from_logits(logits)
        return h, h.item()
    values = logits.tolist()[0]
    if not all(map(math.isfinite, values)) or max(values) - min(values) >= _SAFE_SPREAD:
        h = entropy_from_logits(logits)
        return h, h.item()
    log_p = torch.log_softmax(logits, dim=-1)
    h = log_p.exp().mul_(log_p).sum(dim=-1).neg_()
    value = h.item()
    top = math.log(max(len(values), 1))
    if 0.0 < value < top:  # clamp(0, ln C) would change nothing
        return h, value
    h.clamp_(min=0.0, max=top)
    return h, h.item()


def threshold_matrix(
    thresholds: Sequence[float] | Tensor,
    *,
    batch_size: int,
    num_early_exits: int,
    device: torch.device,
) -> Tensor:
    """Normalise thresholds to a ``(B, num_early_exits)`` float32 tensor.

    Args:
        thresholds: ``num_early_exits`` floats shared by the batch, a 1-D tensor of the
            same length, or a ``(B, num_early_exits)`` tensor of per-sample thresholds.
        batch_size: B.
        num_early_exits: the number of exits before the final one.
        device: where the result lives.

    Raises:
        ValueError: wrong count or shape, or a NaN threshold.
    """
    t = torch.as_tensor(thresholds, dtype=torch.float32)
    if t.dim() == 1:
        if t.shape[0] != num_early_exits:
            raise ValueError(
                f"expected {num_early_exits} threshold(s), one per early exit; got {t.shape[0]}"
            )
        t = t.unsqueeze(0).expand(batch_size, num_early_exits)
    elif t.dim() == 2:
        if tuple(t.shape) != (batch_size, num_early_exits):
            raise ValueError(
                f"per-sample thresholds must have shape ({batch_size}, {num_early_exits}); "
                f"got {tuple(t.shape)}"
            )
    else:
        raise ValueError(f"thresholds must be 1-D or 2-D; got shape {tuple(t.shape)}")
    if torch.isnan(t).any():
        raise ValueError("thresholds must not be NaN")
    return t.to(device)


def thresholds_for_one(thresholds: Sequence[float], *, num_early_exits: int) -> list[float]:
    """:func:`threshold_matrix` for a batch of one given as plain numbers.

    Same checks and the same float32 rounding, but without building a tensor: on a CPU
    that costs more than a tiny network's whole exit head, and batch-1 latency is what
    early exits are for (B-LeNet's batch-1 ``early_exit`` takes about 22 % longer on the
    tensor path: ``benchmarks/eager_parts.py``, ``reports/eager-parts.md``).

    Raises:
        ValueError: wrong count, or a NaN threshold.
    """
    if len(thresholds) != num_early_exits:
        raise ValueError(
            f"expected {num_early_exits} threshold(s), one per early exit; got {len(thresholds)}"
        )
    values = array.array("f", thresholds).tolist()  # float32 rounding, as in the tensor path
    if any(math.isnan(v) for v in values):
        raise ValueError("thresholds must not be NaN")
    return values
