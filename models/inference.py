"""Running trunk stages and exit heads at inference with less Python overhead.

A tiny network such as B-LeNet spends a large share of its batch-1 time in
``nn.Module.__call__`` and the ``forward`` methods around each ATen call (about 1–2 µs
per layer on a 2-core CPU, against a few µs for the layer's own kernel).
:func:`run_module` walks ``nn.Sequential`` containers itself and calls the functional
form of common leaf layers directly, with exactly the arguments their ``forward`` passes,
so the same kernels run and the results are the same, bit for bit. Anything else (a
ResNet block, a ``torch.compile``-wrapped stage, a module with hooks, a subclass) is
called as a module, so its behaviour is untouched.

The walk happens on every call (it is cheap), so replacing a submodule or registering a
hook later takes effect at once: there is no cached plan to go stale.
"""

from __future__ import annotations

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
    return torch.max_pool2d(h, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)


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
