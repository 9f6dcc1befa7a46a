"""Running trunk stages and exit heads at inference with less Python overhead.

A tiny network such as B-LeNet spends a large share of its batch-1 time in
``nn.Module.__call__`` and the ``forward`` methods around each ATen call (about 1–2 µs
per layer on a 2-core CPU, against a few µs for the layer's own kernel).
:func:`run_module` walks ``nn.Sequential`` containers itself and calls the functional
form of common leaf layers directly, with exactly the arguments their ``forward`` passes,
so the same kernels run and the results are the same, bit for bit. The one substitution
is 2×2/stride-2 max-pooling of large CPU batches, done by :func:`max_pool_2x2` with the
same bits and several times faster. Anything else (a ResNet block, a
``torch.compile``-wrapped stage, a module with hooks, a subclass) is called as a
module, so its behaviour is untouched.

The walk happens on every call (it is cheap), so replacing a submodule or registering a
hook later takes effect at once: there is no cached plan to go stale.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_mod


def _conv2d(m: nn.Conv2d, h: Tensor) -> Tensor:
    if m.padding_mode != "zeros":  # forward pads first: let the module do it
        return m(h)
    return F.conv2d(h, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)


def _linear(m: nn.Linear, h: Tensor) -> Tensor:
    return F.linear(h, m.weight, m.bias)


def _max_pool2d(m: nn.MaxPool2d, h: Tensor) -> Tensor:
    if m.return_indices:
        return m(h)
    if (
        h.numel() >= _SPLIT_POOL_MIN_NUMEL
        and _pair(m.kernel_size) == (2, 2)
        and _pair(m.stride) == (2, 2)
        and _pair(m.padding) == (0, 0)
        and _pair(m.dilation) == (1, 1)
        and h.dim() == 4
        and min(h.shape[-2:]) >= 2
        and h.dtype == torch.float32
        and h.device.type == "cpu"
        and h.is_contiguous()
        and not (h.requires_grad and torch.is_grad_enabled())
    ):
        return max_pool_2x2(h, ceil_mode=m.ceil_mode)
    return torch.max_pool2d(h, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)


# Below this many input elements the 2-D kernel's lower fixed cost wins. Measured on the
# project's 2-core CPU for LeNet's four pooling shapes: the split version is faster from
# 9k (5x30x30 inputs) to 20k elements (20x11x11), and 2-7x faster at batch 256.
_SPLIT_POOL_MIN_NUMEL = 12_000


def _pair(v: object) -> tuple[object, ...]:
    return tuple(v) if isinstance(v, tuple | list) else (v, v)


def max_pool_2x2(x: Tensor, *, ceil_mode: bool) -> Tensor:
    """``torch.max_pool2d(x, 2, 2, 0, 1, ceil_mode)`` from two 1-D poolings, same bits.

    On CPU, PyTorch's 2-D max-pooling kernel also computes argmax indices and does not
    vectorise over NCHW rows: at batch 256 it costs LeNet more than all its convolutions.
    The 1-D kernel has a fast path without indices when autograd is off. Each window is
    reduced within each of its rows first (left, then right), then across its two rows
    (top, then bottom), with the 2-D kernel's rule (a later value wins only if greater,
    or NaN); that picks the same element as the 2-D kernel's row-major scan, so the
    result is identical to the bit, ties between +0.0 and -0.0 and NaN included. A
    missing last row in ceil mode is padded with -inf, which never wins.

    Args:
        x: ``(N, C, H, W)`` contiguous input; no gradient is tracked through it.
        ceil_mode: round the output size up, as ``nn.MaxPool2d(ceil_mode=...)``.
    """
    n, c, h, w = x.shape
    rows = torch.max_pool1d(x.view(n, c * h, w), 2, 2, 0, 1, ceil_mode)  # (n, c*h, w')
    wo = rows.shape[-1]
    ho = (h + 1) // 2 if ceil_mode else h // 2
    rows = rows.view(n, c, h, wo)
    if 2 * ho > h:
        rows = F.pad(rows, (0, 0, 0, 1), value=-math.inf)
    elif 2 * ho < h:
        rows = rows[:, :, : 2 * ho]
    # each row pair side by side, [row 2i | row 2i+1]; a kernel of 2 with dilation w'
    # compares the two elements of each column
    pairs = rows.reshape(n * c * ho, 1, 2 * wo)
    return torch.max_pool1d(pairs, 2, 1, 0, wo, False).view(n, c, ho, wo)


def _relu(m: nn.ReLU, h: Tensor) -> Tensor:
    return torch.relu_(h) if m.inplace else torch.relu(h)


def _flatten(m: nn.Flatten, h: Tensor) -> Tensor:
    return h.flatten(m.start_dim, m.end_dim)


def _dropout(m: nn.Dropout, h: Tensor) -> Tensor:
    # eval-mode dropout is the identity; in training mode the module draws its mask
    return m(h) if m.training else h


# Exact types only: a subclass may override forward.
_DIRECT: dict[type[nn.Module], Callable[..., Tensor]] = {
    nn.Conv2d: _conv2d,
    nn.Linear: _linear,
    nn.MaxPool2d: _max_pool2d,
    nn.ReLU: _relu,
    nn.Flatten: _flatten,
    nn.Dropout: _dropout,
}


def _has_hooks(m: nn.Module) -> bool:
    # the same test nn.Module._call_impl makes before taking its hook-free fast path
    return bool(
        m._forward_hooks
        or m._forward_pre_hooks
        or m._backward_hooks
        or m._backward_pre_hooks
        or m._compiled_call_impl is not None
    )


def global_hooks_active() -> bool:
    """True when a global module hook is registered (``register_module_forward_hook``
    and friends), or a TorchScript trace is recording: then every module must be called
    through ``nn.Module.__call__``."""
    return bool(
        _module_mod._global_forward_hooks
        or _module_mod._global_forward_pre_hooks
        or _module_mod._global_backward_hooks
        or _module_mod._global_backward_pre_hooks
        or torch._C._get_tracing_state()
    )


def run_module(module: nn.Module, h: Tensor) -> Tensor:
    """``module(h)`` for inference, with the same result and less per-layer overhead.

    Callers check :func:`global_hooks_active` once per batch and call the module
    directly when it is true. Meant for use under ``torch.no_grad`` (the engine's case);
    it is also correct with autograd on, since the same differentiable ops run.

    Args:
        module: a stage or head (any ``nn.Module`` taking and returning one tensor).
        h: its input.

    Returns:
        What ``module(h)`` returns.
    """
    if _has_hooks(module):
        return module(h)
    kind = type(module)
    if kind is nn.Sequential:
        for child in module._modules.values():
            h = run_module(child, h)  # type: ignore[arg-type]
        return h
    direct = _DIRECT.get(kind)
    return module(h) if direct is None else direct(module, h)
