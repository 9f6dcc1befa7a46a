"""Export a branchy network's segments to ONNX, for the fast CPU runtimes.

Segment ``i`` of a network with E exits is what the engine runs between two exit
decisions: trunk stage ``i`` (minus the leading layers the previous segment already ran),
the leading layers that exit head ``i`` shares with stage ``i + 1`` (run once, for both),
and the rest of head ``i``, followed by the softmax entropy of its logits. Its graph maps
``x`` to ``logits`` ``(B, C)`` and ``entropy`` ``(B,)``, and, for every segment but the
last, ``hidden``: the tensor segment ``i + 1`` starts from.

The graphs are written here, layer by layer, from the modules' own parameters, rather
than by tracing: the layers of our networks are few and plain, and writing them out keeps
control of the forms the runtimes run fast (local response normalisation as ONNX's
``LRN``, batch normalisation folded into the convolution before it, ReLU fused by the
runtime). A module of any other kind raises :class:`ExportError`; the caller then falls
back to the eager engine.

The entropy follows :func:`models.exits.entropy_from_logits` step by step (logits
clipped to finite values, ``log_softmax``, ``log p`` floored at the float32 minimum so
that ``p ln p`` is never ``0 * -inf``, the sum clamped to ``[0, ln C]``), in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from models.branchy import BranchyNet
from models.resnet import BasicBlock

OPSET = 17
_F32_MAX = float(np.finfo(np.float32).max)


class ExportError(ValueError):
    """The network holds a layer this exporter does not know how to write."""


@dataclass
class _Graph:
    """A graph under construction: nodes, weights, and a counter for fresh names."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    weights: list[onnx.TensorProto] = field(default_factory=list)
    count: int = 0
    shape: tuple[int, ...] = ()  # of one sample at the layer being written, batch first

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def const(self, value: Any, stem: str = "c") -> str:
        n = self.name(stem)
        self.weights.append(numpy_helper.from_array(np.ascontiguousarray(value), n))
        return n

    def op(self, kind: str, inputs: list[str], **attrs: Any) -> str:
        out = self.name(kind.lower())
        self.nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out


def _array(t: Any) -> Any:
    return t.detach().to("cpu", torch.float32).numpy().copy()


def _pair(v: Any) -> list[int]:
    return list(v) if isinstance(v, tuple | list) else [v, v]


def _conv(g: _Graph, m: nn.Conv2d, h: str, bn: nn.BatchNorm2d | None = None) -> str:
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise ExportError(f"convolution with padding {m.padding!r}/{m.padding_mode!r}")
    w = _array(m.weight)
    b = _array(m.bias) if m.bias is not None else np.zeros(w.shape[0], np.float32)
    if bn is not None:  # fold y = (conv(x) - mean) / sqrt(var + eps) * gamma + beta
        scale = _array(bn.weight) / np.sqrt(_array(bn.running_var) + bn.eps)
        w = w * scale[:, None, None, None]
        b = (b - _array(bn.running_mean)) * scale + _array(bn.bias)
    ph, pw = _pair(m.padding)
    return g.op(
        "Conv",
        [h, g.const(w.astype(np.float32), "w"), g.const(b.astype(np.float32), "b")],
        kernel_shape=list(w.shape[2:]),
        strides=_pair(m.stride),
        pads=[ph, pw, ph, pw],
        dilations=_pair(m.dilation),
        group=m.groups,
    )


def _batch_norm(g: _Graph, m: nn.BatchNorm2d, h: str) -> str:
    assert m.running_mean is not None and m.running_var is not None
    scale = _array(m.weight) / np.sqrt(_array(m.running_var) + m.eps)
    shift = _array(m.bias) - _array(m.running_mean) * scale
    shape = (1, -1, 1, 1)
    h = g.op("Mul", [h, g.const(scale.reshape(shape).astype(np.float32))])
    return g.op("Add", [h, g.const(shift.reshape(shape).astype(np.float32))])


def _max_pool(g: _Graph, m: nn.MaxPool2d, h: str) -> str:
    if m.return_indices or _pair(m.dilation) != [1, 1]:
        raise ExportError("max-pooling with indices or dilation")
    ph, pw = _pair(m.padding)
    return g.op(
        "MaxPool",
        [h],
        kernel_shape=_pair(m.kernel_size),
        strides=_pair(m.stride),
        pads=[ph, pw, ph, pw],
        ceil_mode=int(m.ceil_mode),
    )


def _lrn(g: _Graph, m: nn.LocalResponseNorm, h: str) -> str:
    """``x / (k + alpha / n * window sum of x²)^beta`` over channel windows, as PyTorch
    computes it (its window: ``n // 2`` channels before, ``(n - 1) // 2`` after).

    Written as a 1×1 convolution of ``x²`` with a banded weight (the window sum, scaled
    by ``alpha / n``, plus ``k`` as the bias), then, for ``beta = 0.75``, division by
    ``sqrt(d) * sqrt(sqrt(d))``. ONNX Runtime's own ``LRN`` kernel took 40 % of
    B-AlexNet's first segment at batch 1 on our CPU; this form runs on its convolution
    kernels. Other ``beta`` use ``Pow``.
    """
    channels = g.shape[1]
    before, after = m.size // 2, (m.size - 1) // 2
    band = np.zeros((channels, channels, 1, 1), np.float32)
    for c in range(channels):
        band[c, max(0, c - before) : min(channels, c + after + 1), 0, 0] = m.alpha / m.size
    squares = g.op("Mul", [h, h])
    bias = np.full(channels, m.k, np.float32)
    d = g.op("Conv", [squares, g.const(band, "w"), g.const(bias, "b")], kernel_shape=[1, 1])
    if m.beta == 0.75:
        root = g.op("Sqrt", [d])
        denominator = g.op("Mul", [root, g.op("Sqrt", [root])])
    else:
        denominator = g.op("Pow", [d, g.const(np.float32(m.beta))])
    return g.op("Div", [h, denominator])


def _linear(g: _Graph, m: nn.Linear, h: str) -> str:
    b = _array(m.bias) if m.bias is not None else np.zeros(m.out_features, np.float32)
    return g.op("Gemm", [h, g.const(_array(m.weight), "w"), g.const(b, "b")], transB=1)


def _flatten(g: _Graph, m: nn.Flatten, h: str) -> str:
    if m.start_dim != 1 or m.end_dim != -1:
        raise ExportError(f"flatten of dims {m.start_dim}..{m.end_dim}")
    return g.op("Flatten", [h], axis=1)


def _basic_block(g: _Graph, m: BasicBlock, h: str) -> str:
    out = g.op("Relu", [_conv(g, m.conv1, h, m.bn1)])
    out = _conv(g, m.conv2, out, m.bn2)
    shortcut = h
    if m.stride != 1 or m.pad:  # option A: subsample, zero-pad the new channels
        s = m.stride
        shortcut = g.op(
            "Slice",
            [
                h,
                g.const(np.array([0, 0], np.int64)),
                g.const(np.array([_I64_MAX, _I64_MAX], np.int64)),
                g.const(np.array([2, 3], np.int64)),
                g.const(np.array([s, s], np.int64)),
            ],
        )
        before, after = m.pad // 2, m.pad - m.pad // 2
        pads = np.array([0, before, 0, 0, 0, after, 0, 0], np.int64)
        shortcut = g.op("Pad", [shortcut, g.const(pads)])
    return g.op("Relu", [g.op("Add", [out, shortcut])])


_I64_MAX = 2**63 - 1


def _layers(module: nn.Module) -> Iterator[nn.Module]:
    # leaf layers in execution order, nested Sequentials flattened
    if type(module) is nn.Sequential:
        for child in module:
            yield from _layers(child)
    else:
        yield module


def _relu(g: _Graph, m: nn.ReLU, h: str) -> str:
    return g.op("Relu", [h])


def _identity(g: _Graph, m: nn.Module, h: str) -> str:
    return h  # dropout at inference


def _global_pool(g: _Graph, m: nn.AdaptiveAvgPool2d, h: str) -> str:
    if _pair(m.output_size) != [1, 1]:
        raise ExportError(f"adaptive average pooling to {m.output_size}")
    return g.op("GlobalAveragePool", [h])


# Exact types only: a subclass may compute something else.
_EMITTERS: dict[type[nn.Module], Callable[[_Graph, Any, str], str]] = {
    nn.Conv2d: _conv,
    nn.BatchNorm2d: _batch_norm,
    nn.ReLU: _relu,
    nn.MaxPool2d: _max_pool,
    nn.LocalResponseNorm: _lrn,
    nn.Linear: _linear,
    nn.Flatten: _flatten,
    nn.Dropout: _identity,
    nn.Identity: _identity,
    nn.AdaptiveAvgPool2d: _global_pool,
    BasicBlock: _basic_block,
}


def _emit(
    g: _Graph, layers: list[nn.Module], h: str, probe: torch.Tensor
) -> tuple[str, torch.Tensor]:
    """Write ``layers`` from value ``h`` on; ``probe`` is one sample of ``h``'s shape (run
    through the layers alongside, for the shapes an emitter needs). Returns the output
    value and the probe after the layers."""
    k = 0
    while k < len(layers):
        m = layers[k]
        kind = type(m)
        if m._forward_hooks or m._forward_pre_hooks:
            raise ExportError(f"layer {kind.__name__} has hooks")
        g.shape = tuple(probe.shape)
        nxt = layers[k + 1] if k + 1 < len(layers) else None
        if kind is nn.Conv2d and isinstance(m, nn.Conv2d) and type(nxt) is nn.BatchNorm2d:
            h = _conv(g, m, h, nxt)  # batch norm folded into the convolution
            with torch.no_grad():
                probe = nxt(m(probe))
            k += 2
            continue
        emit = _EMITTERS.get(kind)
        if emit is None:
            raise ExportError(f"no ONNX form for layer {kind.__name__}")
        h = emit(g, m, h)
        with torch.no_grad():
            probe = m(probe)
        k += 1
    return h, probe


def _entropy(g: _Graph, logits: str, num_classes: int) -> str:
    z = g.op("Clip", [logits, g.const(np.float32(-_F32_MAX)), g.const(np.float32(_F32_MAX))])
    log_p = g.op("LogSoftmax", [z], axis=1)
    log_p = g.op("Max", [log_p, g.const(np.float32(-_F32_MAX))])
    plogp = g.op("Mul", [g.op("Exp", [log_p]), log_p])
    total = g.op("ReduceSum", [plogp, g.const(np.array([1], np.int64))], keepdims=0)
    top = np.float32(math.log(max(num_classes, 1)))
    return g.op("Clip", [g.op("Neg", [total]), g.const(np.float32(0.0)), g.const(top)])


def _rename(g: _Graph, value: str, name: str) -> None:
    # Graph outputs get stable names by renaming the value where it is made and read
    # (an Identity node would cost a copy of the tensor on ONNX Runtime).
    if value == "x":  # a segment that computes nothing before its output
        g.nodes.append(helper.make_node("Identity", [value], [name]))
        return
    for node in g.nodes:
        for k, v in enumerate(node.output):
            if v == value:
                node.output[k] = name
        for k, v in enumerate(node.input):
            if v == value:
                node.input[k] = name


def _segment_layers(net: BranchyNet) -> list[tuple[list[nn.Module], list[nn.Module]]]:
    """Per segment: the trunk layers it runs (shared head prefix included) and the head
    layers after that prefix.

    The shared prefixes are the eager engine's own (:meth:`BranchyNet.shared_prefixes`):
    leading parameter-free leaf layers of a head and the next stage, so counting them
    among the flattened layers gives the same split.
    """
    stages = [list(_layers(s)) for s in net.stages]
    heads = [list(_layers(h)) for h in net.heads]
    out = []
    skip = 0
    for i, prefix in enumerate(net.shared_prefixes()):
        trunk = stages[i][skip:] + heads[i][:prefix]
        out.append((trunk, heads[i][prefix:]))
        skip = prefix
    return out


def export_segments(net: BranchyNet) -> list[onnx.ModelProto]:
    """One ONNX model per segment of ``net`` (see the module docstring).

    Every input and output has a dynamic batch dimension named ``batch``.

    Raises:
        ExportError: a layer has no ONNX form here (the caller falls back to torch).
    """
    models = []
    probe = torch.zeros((1, *net.input_shape))  # one sample, for the shapes
    for i, (trunk, head) in enumerate(_segment_layers(net)):
        in_shape = ["batch", *probe.shape[1:]]
        g = _Graph()
        hidden, probe = _emit(g, trunk, "x", probe)
        logits, _ = _emit(g, head, hidden, probe)
        entropy = _entropy(g, logits, net.num_classes)
        outputs = [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", net.num_classes]),
            helper.make_tensor_value_info("entropy", TensorProto.FLOAT, ["batch"]),
        ]
        _rename(g, logits, "logits")
        _rename(g, entropy, "entropy")
        if i + 1 < net.num_exits:
            _rename(g, hidden, "hidden")
            out_shape = ["batch", *probe.shape[1:]]
            outputs.append(helper.make_tensor_value_info("hidden", TensorProto.FLOAT, out_shape))
        graph = helper.make_graph(
            g.nodes,
            f"{net.name}_segment{i}",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
            outputs,
            initializer=g.weights,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="branchy-serve"
        )
        model.ir_version = 8
        onnx.checker.check_model(model)
        models.append(model)
    return models
