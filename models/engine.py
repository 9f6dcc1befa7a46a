"""The early-exit algorithm, written once, over interchangeable executors.

An *executor* runs one segment of a network on a batch: trunk stage ``i`` and exit head
``i``, giving the state the next segment starts from, the head's logits and their
entropy. :func:`early_exit` owns everything else: the exit rule (a sample leaves at exit
``i`` when its entropy is strictly below its threshold ``T_i``; ``0`` lets nobody leave,
``inf`` everybody), per-sample thresholds, compaction of the batch after every exit, and
putting the answers back in input order. So every executor gives the same
:class:`ExitResult` contract, and differs only in how it computes a segment:

- :class:`TorchExecutor` (here): the network's own modules, eagerly, on any device. The
  reference, and what training uses.
- ``OnnxRuntimeExecutor`` and ``OpenVinoExecutor`` (:mod:`models.runtimes`): the segments
  exported to ONNX, on the CPU.

The state handed from one segment to the next is the executor's own (a tensor, a NumPy
array, ...); the algorithm only asks the executor to keep some of its rows
(:meth:`Executor.take`). Logits and entropies come back as float32 torch tensors on the
executor's device, or as NumPy arrays: those become tensors (without a copy) only where
the algorithm needs one, so that a batch of one, whose whole answer may take 30 µs on a
fast runtime, does not pay a few µs per conversion at every exit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeGuard, TypeVar, overload, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from models.exits import (
    entropy_from_logits,
    entropy_of_one,
    leaves,
    threshold_matrix,
    thresholds_for_one,
)
from models.inference import global_hooks_active, run_module, run_owned, run_stage


@dataclass(frozen=True)
class ExitResult:
    """What an early-exit engine answers for a batch of B samples.

    Attributes:
        logits: ``(B, C)`` float32 logits of the exit each sample took.
        exit_index: ``(B,)`` int64, 0-based index of that exit.
        entropy: ``(B,)`` float32 entropy (nats) of the softmax at that exit.
    """

    logits: Tensor
    exit_index: Tensor
    entropy: Tensor

    @property
    def prediction(self) -> Tensor:
        """``(B,)`` int64 predicted class."""
        return self.logits.argmax(dim=1)

    def to(self, device: torch.device | str) -> ExitResult:
        return ExitResult(
            self.logits.to(device), self.exit_index.to(device), self.entropy.to(device)
        )


class Executor(Protocol):
    """Runs the segments of one network. Not safe to call from two threads at once."""

    @property
    def runtime(self) -> str:
        """``"torch"``, ``"onnxruntime"`` or ``"openvino"``."""
        ...

    @property
    def precision(self) -> str:
        """``"fp32"``, ``"bf16"`` or ``"fp16"``."""
        ...

    @property
    def num_exits(self) -> int: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def begin(self, x: Tensor) -> Any:
        """The state segment 0 starts from, for the caller's input ``x`` (never modified)."""
        ...

    def segment(self, i: int, state: Any, *, one: bool) -> tuple[Any, Array, Array]:
        """Run segment ``i``: the next segment's state (``None`` after the last), and
        ``(b, C)`` logits and ``(b,)`` entropies, float32 tensors or NumPy arrays.
        ``one`` says the batch holds one sample (an executor may take a cheaper path)."""
        ...

    def take(self, state: Any, rows: Tensor) -> Any:
        """The state of only the samples ``rows`` (int64 indices, in order)."""
        ...


Array = Tensor | np.ndarray
_T = TypeVar("_T")


def _tensor(a: Array) -> Tensor:
    return a if isinstance(a, Tensor) else torch.from_numpy(a)


# Called with (input positions, exit index, logits, entropies) of the samples that have
# just left, as soon as their exit is decided (the service answers them at once).
Release = Callable[[Tensor, int, Tensor, Tensor], None]

# Per-exit thresholds: ``num_exits - 1`` floats, or a ``(B, num_exits - 1)`` tensor.
Thresholds = Sequence[float] | Tensor


@runtime_checkable
class DecidesExits(Protocol):
    """An executor that runs the whole exit rule itself (e.g. on the device, as
    :class:`models.captured.CapturedExecutor`), under :func:`early_exit`'s contract."""

    def decide(self, x: Tensor, thresholds: Thresholds, release: Release | None) -> ExitResult:
        """:func:`early_exit` on this executor, its own way."""
        ...


class Forwarded(Generic[_T]):
    """A read-only attribute that is the same-named attribute of one of the owner's
    attributes (``Forwarded("executor", int, doc)`` on ``num_exits`` reads
    ``self.executor.num_exits``): for wrappers that expose what they wrap."""

    def __init__(self, to: str, kind: type[_T], doc: str) -> None:
        self.to, self.kind, self.__doc__ = to, kind, doc
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Forwarded[_T]: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> _T: ...

    def __get__(self, obj: object | None, owner: type | None = None) -> _T | Forwarded[_T]:
        if obj is None:
            return self
        value: _T = getattr(getattr(obj, self.to), self.name)
        return value


def _plain_numbers(values: object) -> TypeGuard[Sequence[float]]:
    # a flat list/tuple of Python numbers: the batch-of-one path needs no tensor
    return isinstance(values, list | tuple) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    )


class EarlyExits:
    """The ``early_exit`` method of everything that classifies through an
    :class:`Executor` (:class:`~models.branchy.BranchyNet` on the eager engine,
    :class:`~models.runtimes.EarlyExitEngine` on the runtime chosen for it): one
    signature, one contract, here."""

    def _executor(self) -> Executor:
        """What runs the segments (each class says)."""
        raise NotImplementedError

    def early_exit(
        self,
        x: Tensor,
        thresholds: Sequence[float] | Tensor = (),
        *,
        release: Release | None = None,
    ) -> ExitResult:
        """Classify a batch, letting each sample leave at the first confident exit.

        At early exit ``i`` a sample whose entropy is strictly below its threshold
        ``T_i`` leaves with that exit's logits; only the samples still in flight run the
        following stages (the batch is compacted after every exit). The last exit
        answers for everything that reaches it.

        Args:
            x: ``(B, C, H, W)`` input batch, on the model's device.
            thresholds: ``num_exits - 1`` floats, or a ``(B, num_exits - 1)`` tensor of
                per-sample thresholds. ``0`` lets nobody leave at that exit, ``inf``
                everybody.
            release: called once per exit with the samples that left there (input
                positions, exit, logits, entropies), before the next stage runs.

        Returns:
            The exit taken, its logits and entropy, per sample, in input order.
        """
        executor = self._executor()
        if isinstance(executor, DecidesExits):
            return executor.decide(x, thresholds, release)
        return early_exit(executor, x, thresholds, release=release)


def early_exit(
    executor: Executor,
    x: Tensor,
    thresholds: Sequence[float] | Tensor = (),
    *,
    release: Release | None = None,
) -> ExitResult:
    """Classify a batch, letting each sample leave at the first confident exit.

    At early exit ``i`` a sample whose entropy is strictly below its threshold ``T_i``
    leaves with that exit's logits; only the samples still in flight run the following
    segments. The last exit answers for everything that reaches it.

    Args:
        executor: runs the segments.
        x: ``(B, C, H, W)`` normalised float32 input, on the executor's device.
        thresholds: ``num_exits - 1`` floats, or a ``(B, num_exits - 1)`` tensor of
            per-sample thresholds.
        release: called once per exit with the samples that left there (input positions,
            exit, logits, entropies), before the next segment runs.

    Returns:
        The exit taken, its logits and entropy, per sample, in input order.

    Raises:
        ValueError: wrong number or shape of thresholds, or a NaN threshold.
    """
    if torch.is_grad_enabled() and executor.runtime == "torch":
        # (other executors' tensors come from NumPy: nothing for autograd to record)
        with torch.no_grad():
            return _early_exit(executor, x, thresholds, release)
    return _early_exit(executor, x, thresholds, release)  # the caller disabled autograd


def _early_exit(
    executor: Executor,
    x: Tensor,
    thresholds: Sequence[float] | Tensor,
    release: Release | None,
) -> ExitResult:
    n = x.shape[0]
    last = executor.num_exits - 1
    if n == 1 and _plain_numbers(thresholds):
        one = thresholds_for_one(thresholds, num_early_exits=last)
        return _early_exit_one(executor, x, one, release)
    t = threshold_matrix(thresholds, batch_size=n, num_early_exits=last, device=x.device)
    if n == 1:
        return _early_exit_one(executor, x, t[0].tolist(), release)

    device = executor.device
    logits = torch.empty((n, executor.num_classes), dtype=torch.float32, device=device)
    exit_index = torch.full((n,), last, dtype=torch.int64, device=device)
    entropy = torch.empty((n,), dtype=torch.float32, device=device)
    if n == 0:
        return ExitResult(logits, exit_index, entropy)
    # `alive` maps rows of the compacted batch back to input positions.
    alive = torch.arange(n, device=device)
    state = executor.begin(x)
    for i in range(executor.num_exits):
        state, za, ea = executor.segment(i, state, one=False)
        z, e = _tensor(za), _tensor(ea)
        if i == last:
            logits[alive] = z
            entropy[alive] = e
            if release is not None:
                release(alive, i, z, e)
            break
        leave = leaves(e, t[:, i])
        rows = leave.nonzero().squeeze(1)  # one host sync per exit, inherent
        if rows.numel():
            dst = alive[rows]
            logits[dst] = z[rows]
            entropy[dst] = e[rows]
            exit_index[dst] = i
            if release is not None:
                release(dst, i, z[rows], e[rows])
            if rows.numel() == alive.numel():
                break  # everybody left
            stay = (~leave).nonzero().squeeze(1)
            state, alive, t = executor.take(state, stay), alive[stay], t[stay]
    return ExitResult(logits, exit_index, entropy)


def _early_exit_one(
    executor: Executor, x: Tensor, thresholds: list[float], release: Release | None
) -> ExitResult:
    # Batch of one: no compaction bookkeeping, one scalar decision per exit.
    last = executor.num_exits - 1
    state = executor.begin(x)
    for i in range(executor.num_exits):
        state, za, ea = executor.segment(i, state, one=True)
        # on a GPU the last exit needs no decision, so no sync on its value
        if i < last and not leaves(float(ea[0]), thresholds[i]):
            continue  # not confident enough: on to the next segment
        z, e = _tensor(za), _tensor(ea)
        if e.is_cpu:  # torch.full costs 2-5 µs, this 1-2
            index = torch.from_numpy(np.array([i], dtype=np.int64))
        else:
            index = torch.full((1,), i, dtype=torch.int64, device=e.device)
        if release is not None:
            release(torch.zeros(1, dtype=torch.int64, device=e.device), i, z, e)
        return ExitResult(z, index, e)
    raise AssertionError("unreachable: the last exit always answers")


@dataclass
class _TorchState:
    h: Tensor
    owned: bool  # h was made by the engine: a ReLU may overwrite it
    skip: int  # leading layers of this stage run already (the last head's shared prefix)
    shared: list[int]  # per exit, layers its head shares with the next stage
    hooked: bool  # global hooks: every module through nn.Module.__call__


class TorchExecutor:
    """The network's own modules, run eagerly on the device its parameters live on.

    Layers that a head shares with the next stage (:func:`models.inference.shared_prefix`)
    run once; ReLUs run in place on tensors the engine made. Results equal the plain
    module calls bit for bit. What each of these parts saves is measured by
    ``benchmarks/eager_parts.py`` (``reports/eager-parts.md``).

    Args:
        net: a :class:`models.BranchyNet` in eval mode.
    """

    runtime = "torch"

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.num_exits: int = net.num_exits  # type: ignore[assignment]
        self.num_classes: int = net.num_classes  # type: ignore[assignment]
        self._stages = list(net.stages._modules.values())  # type: ignore[union-attr]
        self._heads = list(net.heads._modules.values())  # type: ignore[union-attr]

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def precision(self) -> str:
        dtype = next(self.net.parameters()).dtype
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")

    def begin(self, x: Tensor) -> _TorchState:
        hooked = global_hooks_active()
        # (for one sample, finding shared prefixes costs more than they save)
        one = hooked or x.shape[0] == 1
        shared = [0] * self.num_exits if one else self.net.shared_prefixes()  # type: ignore[operator]
        return _TorchState(x, False, 0, shared, hooked)

    def segment(self, i: int, state: _TorchState, *, one: bool) -> tuple[Any, Tensor, Tensor]:
        stage, head = self._stages[i], self._heads[i]
        last = i == self.num_exits - 1
        if state.hooked:
            h = stage(state.h)
            z = head(h).float()
            state.h, state.owned = h, False
        elif one:
            # batch of one: the whole head from the stage's output, no shared prefix
            h, owned = run_owned(stage, state.h, owned=state.owned)
            z = run_module(head, h, owned=owned and last).float()
            state.h, state.owned = h, owned
        else:
            prefix = state.shared[i]
            h, owned = run_stage(stage, head, state.h, skip=state.skip, prefix=prefix,
                                 owned=state.owned)  # fmt: skip
            z = run_module(head, h, start=prefix, owned=owned and last).float()  # (b, C)
            state.h, state.owned, state.skip = h, owned, prefix
        if one and not (last and not z.is_cpu):
            e, _ = entropy_of_one(z)
        else:
            e = entropy_from_logits(z)
        return (None if last else state), z, e

    def take(self, state: _TorchState, rows: Tensor) -> _TorchState:
        state.h, state.owned = state.h[rows], True
        return state
