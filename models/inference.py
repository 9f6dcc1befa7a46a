"""Running trunk stages and exit heads at inference with less overhead.

A tiny network such as B-LeNet spends a large share of its batch-1 time in
``nn.Module.__call__`` and the ``forward`` methods around each ATen call (about 1–2 µs
per layer on a 2-core CPU, against a few µs for the layer's own kernel).
:func:`run_module` walks ``nn.Sequential`` containers itself and calls the functional
form of common leaf layers directly, with exactly the arguments their ``forward`` passes,
so the same kernels run and the results are the same, bit for bit. Three substitutions
make large CPU batches cheaper and still give the same bits:

- max-pooling with square windows (2×2 in LeNet, 3×3/stride 2 in AlexNet) is done by
  :func:`max_pool_split` from two 1-D poolings, several times faster;
- a ReLU whose input was made inside the walk (a convolution's output, say) runs in
  place, saving a fresh allocation as large as the activation (on a 2-core CPU a
  33 MB ``relu`` costs 18x a ``relu_``, mostly page faults);
- local response normalisation sums its windows of squares by slice additions instead
  of PyTorch's slow ``avg_pool3d`` call, in the same order, and reuses its temporaries.

Anything else (a ResNet block, a ``torch.compile``-wrapped stage, a module with hooks, a
subclass) is called as a module, so its behaviour is untouched. A tensor the caller
passed in is never modified.

The walk happens on every call (it is cheap), so replacing a submodule or registering a
hook later takes effect at once: there is no cached plan to go stale.

Why each part stays (issue 10, item 7). The fast CPU path is ONNX Runtime / OpenVINO
now, so this module is only for the torch executor: the reference, training and CUDA.
Each part was switched off in turn and ``early_exit`` timed against the engine on the
zoo nets, every call paired with the engine's on the same real test image or batch
(``.venv/bin/python benchmarks/eager_parts.py --rounds 20 --images 20``; AMD EPYC, 2
cores, AVX2, 1 thread, torch 2.14.1, machine shared with other jobs; the engine against
itself stayed within ±2 % at batch 1 and ±6 % at batch 256; figures in
``reports/eager-parts.md``). Rule: keep a part that saves at least 5 % on some zoo net
at batch 1 or 256, beyond that noise. Slowdown without it:

- the walk (and the private hook checks it needs, :func:`global_hooks_active`,
  ``_has_hooks``): LeNet 9 %, B-LeNet 6 % at batch 1 (≈ 0 at batch 256): kept;
- split max-pooling: 16–42 % at batch 256 on all four nets: kept (at batch 1 it cost
  B-LeNet 6 % on its 4,500-element first pooling, hence the 5,000-element threshold);
- in-place ReLU: B-AlexNet 12 %, AlexNet 10 % at batch 256 (nothing on LeNet): kept;
- LRN by slice additions: B-AlexNet 12 % at batch 1 and 19 % at 256, AlexNet 7 % and
  17 %: kept;
- shared prefixes (:func:`shared_prefix`, :func:`run_stage`): B-AlexNet 11 % at batch
  256 (nothing on B-LeNet): kept.

(``models.exits.entropy_of_one`` and ``thresholds_for_one``, the batch-of-one paths of
the engine, were measured the same way: B-LeNet 5 % and 22 % at batch 1; both kept.)
"""

from __future__ import annotations

import itertools
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
    kernel, stride = _side(m.kernel_size), _side(m.stride)
    if (
        kernel is not None
        and stride is not None
        and h.numel() >= _SPLIT_POOL_MIN_NUMEL
        and _side(m.padding) == 0
        and _side(m.dilation) == 1
        and h.dim() == 4
        and min(h.shape[-2:]) >= kernel
        and h.dtype == torch.float32
        and h.device.type == "cpu"
        and h.is_contiguous()
        and not (h.requires_grad and torch.is_grad_enabled())
    ):
        return max_pool_split(h, kernel, stride, ceil_mode=m.ceil_mode)
    return torch.max_pool2d(h, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)


# Below this many input elements the 2-D kernel's lower fixed cost wins. In the whole
# engine at batch 1 (benchmarks/eager_parts.py, reports/eager-parts.md) splitting B-LeNet's
# first pooling (5x30x30 = 4,500 elements) made it about 6 % slower than the 2-D kernel,
# while AlexNet's (16,384 and more) gained; LeNet's other poolings are below 3,000.
_SPLIT_POOL_MIN_NUMEL = 5_000


def _side(v: object) -> int | None:
    # the side of a square window (or the step, padding...) given as an int or a pair
    a, b = v if isinstance(v, tuple | list) else (v, v)
    return a if isinstance(a, int) and a == b else None


def pooled_size(size: int, kernel: int, stride: int, *, ceil_mode: bool) -> int:
    """Output length of a max-pooling without padding, by PyTorch's rule: in ceil mode
    the last window must still start inside the input."""
    out = (size - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size:
        out -= 1
    return out


def max_pool_split(x: Tensor, kernel: int, stride: int, *, ceil_mode: bool) -> Tensor:
    """``torch.max_pool2d(x, kernel, stride, 0, 1, ceil_mode)`` from two 1-D poolings,
    with the same bits.

    On CPU, PyTorch's 2-D max-pooling kernel also computes argmax indices and does not
    vectorise over NCHW rows: at batch 256 it costs LeNet more than all its convolutions
    and AlexNet as much as its first convolution. The 1-D kernel has a fast path without
    indices when autograd is off. Each window is reduced within each of its rows first
    (left to right), then across its rows (top to bottom), with the 2-D kernel's rule (a
    later value wins only if greater, or NaN); that picks the same element as the 2-D
    kernel's row-major scan, so the result is identical to the bit, ties between +0.0 and
    -0.0 and NaN included. Rows a ceil-mode window reaches beyond the input are padded
    with -inf, which never wins.

    Args:
        x: ``(N, C, H, W)`` contiguous input, ``H, W >= kernel``; no gradient is tracked.
        kernel: side of the square window.
        stride: step between windows, the same along both axes.
        ceil_mode: round the output size up, as ``nn.MaxPool2d(ceil_mode=...)``.
    """
    n, c, h, w = x.shape
    rows = torch.max_pool1d(x.view(n, c * h, w), kernel, stride, 0, 1, ceil_mode)
    wo = rows.shape[-1]
    ho = pooled_size(h, kernel, stride, ceil_mode=ceil_mode)
    reach = stride * (ho - 1) + kernel  # input rows the windows cover
    rows = rows.view(n, c, h, wo)
    if reach > h:
        rows = F.pad(rows, (0, 0, 0, reach - h), value=-math.inf)
    elif reach < h:
        rows = rows[:, :, :reach]
    if kernel == stride:
        # windows do not overlap: each window's rows side by side, [row 0 | row 1 | ...];
        # a kernel of `kernel` with dilation wo compares the rows of each column
        windows = rows.reshape(n * c * ho, 1, kernel * wo)
        return torch.max_pool1d(windows, kernel, 1, 0, wo, False).view(n, c, ho, wo)
    # overlapping (or gapped) windows: reduce every run of `kernel` consecutive rows the
    # same way, then keep the runs that start a window
    runs = torch.max_pool1d(rows.reshape(n * c, 1, reach * wo), kernel, 1, 0, wo, False)
    return runs.view(n, c, reach - kernel + 1, wo)[:, :, ::stride].contiguous()


def _local_response_norm(m: nn.LocalResponseNorm, h: Tensor) -> Tensor:
    """``F.local_response_norm`` with the same bits, 2-4x faster on a CPU.

    PyTorch averages the squares over each window of channels with ``avg_pool3d``, whose
    CPU kernel is slow for a (size, 1, 1) window, then makes four more activation-sized
    temporaries. Here the window sums are slice additions over the zero-padded squares,
    in the kernel's order (first channel of the window first), divided by ``size`` as
    the kernel does, and the rest reuses one tensor in place. Falls back for odd cases.
    """
    size = m.size
    if h.dim() != 4 or size < 2 or h.numel() == 0 or h.requires_grad:
        return F.local_response_norm(h, size, m.alpha, m.beta, m.k)
    c = h.shape[1]
    squares = F.pad(h.mul(h), (0, 0, 0, 0, size // 2, (size - 1) // 2))
    div = squares[:, 0:c] + squares[:, 1 : c + 1]
    for j in range(2, size):
        div.add_(squares[:, j : c + j])
    div.div_(size).mul_(m.alpha).add_(m.k).pow_(m.beta)
    return torch.div(h, div, out=div)


def _flatten(m: nn.Flatten, h: Tensor) -> Tensor:
    return h.flatten(m.start_dim, m.end_dim)


def _dropout(m: nn.Dropout, h: Tensor) -> Tensor:
    # eval-mode dropout is the identity; in training mode the module draws its mask
    return m(h) if m.training else h


# Exact types only: a subclass may override forward. The flag says whether the output
# is always a tensor of its own (True) or may share the input's memory (False: a view,
# the input itself).
_DIRECT: dict[type[nn.Module], tuple[Callable[..., Tensor], bool]] = {
    nn.Conv2d: (_conv2d, True),
    nn.Linear: (_linear, True),
    nn.MaxPool2d: (_max_pool2d, True),
    nn.LocalResponseNorm: (_local_response_norm, True),
    nn.Flatten: (_flatten, False),
    nn.Dropout: (_dropout, False),
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


def run_module(
    module: nn.Module, h: Tensor, *, start: int = 0, stop: int | None = None, owned: bool = False
) -> Tensor:
    """``module(h)`` for inference, with the same result and less per-layer overhead.

    Callers check :func:`global_hooks_active` once per batch and call the module
    directly when it is true. Meant for use under ``torch.no_grad`` (the engine's case);
    it is also correct with autograd on, since the same differentiable ops run.

    Args:
        module: a stage or head (any ``nn.Module`` taking and returning one tensor).
        h: its input.
        start, stop: run only the children ``start:stop`` of an ``nn.Sequential`` (the
            engine runs a head's first layers once when the next stage begins with the
            same ones, see :func:`shared_prefix`).
        owned: ``h`` is the caller's to overwrite (nobody else will read it), so a ReLU
            may run in place on it. Never set this for a tensor someone else holds.

    Returns:
        What ``module(h)`` (or the slice of it) returns.
    """
    return run_owned(module, h, start=start, stop=stop, owned=owned)[0]


def run_owned(
    module: nn.Module, h: Tensor, *, start: int = 0, stop: int | None = None, owned: bool = False
) -> tuple[Tensor, bool]:
    """:func:`run_module`, also saying whether the output is a tensor the walk made (so
    the caller may hand it on as ``owned``) rather than the input or a view of it."""
    if start or stop is not None:
        if type(module) is not nn.Sequential:
            raise TypeError(f"only an nn.Sequential can be run in part, not {type(module)}")
        for child in itertools.islice(module._modules.values(), start, stop):
            h, owned = _walk(child, h, owned)
        return h, owned
    return _walk(module, h, owned)


def _walk(module: nn.Module, h: Tensor, owned: bool) -> tuple[Tensor, bool]:
    if _has_hooks(module):
        return module(h), False
    kind = type(module)
    if kind is nn.Sequential:
        for child in module._modules.values():
            h, owned = _walk(child, h, owned)  # type: ignore[arg-type]
        return h, owned
    if kind is nn.ReLU:
        if module.inplace or (owned and not h.requires_grad):
            return torch.relu_(h), owned
        return torch.relu(h), True
    direct = _DIRECT.get(kind)
    if direct is None:
        return module(h), False
    fn, fresh = direct
    return fn(module, h), fresh or owned


def run_stage(
    stage: nn.Module, head: nn.Module, h: Tensor, *, skip: int, prefix: int, owned: bool
) -> tuple[Tensor, bool]:
    """One trunk step of the engine: ``stage`` without its first ``skip`` layers (run
    already, as the previous head's shared prefix), then the first ``prefix`` layers of
    ``head``, which the next stage shares (:func:`shared_prefix`). Both the head's rest
    (``run_module(head, out, start=prefix)``) and the next stage read the output.

    Returns:
        The output and whether it is the caller's to overwrite, as :func:`run_owned`.
    """
    h, owned = run_owned(stage, h, start=skip, owned=owned)
    if prefix:
        h, owned = run_owned(head, h, stop=prefix, owned=owned)
    return h, owned


# Parameter-free layers whose output depends only on their input and these settings.
_SHAREABLE: dict[type[nn.Module], tuple[str, ...]] = {
    nn.ReLU: ("inplace",),
    nn.MaxPool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    nn.LocalResponseNorm: ("size", "alpha", "beta", "k"),
}


def shared_prefix(head: nn.Module, next_stage: nn.Module) -> int:
    """How many leading layers an exit head and the following trunk stage have in
    common, so that the engine can run them once for both.

    B-AlexNet's first branch and its next trunk stage both begin with ReLU, max-pooling
    and LRN on the same tensor; B-LeNet's with max-pooling and ReLU. Layers count as
    common when both are of the same parameter-free type (ReLU, max-pooling, LRN) with
    the same settings and without hooks.

    Returns:
        The length of the common prefix; 0 unless both are plain ``nn.Sequential``.
    """
    if type(head) is not nn.Sequential or type(next_stage) is not nn.Sequential:
        return 0
    if _has_hooks(head) or _has_hooks(next_stage):
        return 0
    k = 0
    for a, b in zip(head._modules.values(), next_stage._modules.values(), strict=False):
        kind = type(a)
        settings = _SHAREABLE.get(kind)
        if settings is None or kind is not type(b) or _has_hooks(a) or _has_hooks(b):
            break
        if kind is nn.MaxPool2d and (a.return_indices or b.return_indices):
            break  # a (values, indices) pair is not what the next layer takes
        if a is not b and any(getattr(a, n) != getattr(b, n) for n in settings):
            break
        k += 1
    return k
