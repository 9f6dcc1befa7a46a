"""The exit rule: softmax entropy of an exit's logits against that exit's threshold."""

from __future__ import annotations

import array
import math
from collections.abc import Sequence

import torch
from torch import Tensor


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
    early exits are for.

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
