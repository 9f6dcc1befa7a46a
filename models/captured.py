"""Early exit with each segment run at bucketed batch sizes, captured as CUDA graphs.

On a GPU the eager engine loses to the plain network for CIFAR-sized nets (docs/gpu.md):
every layer is a kernel launch of a few µs, and every exit decision waits for the
device. :class:`CapturedExecutor` makes each *segment* (trunk stage ``i``, exit head
``i``, the head's softmax entropy and the exit decision ``entropy < threshold`` as a
boolean mask) one CUDA graph, replayed with a single launch. A graph has fixed shapes,
so a segment is captured once per *bucket* (batch sizes 1, 2, 4, ... 256 by default)
and a batch of ``k`` samples runs padded to the smallest bucket that holds it, the way
vLLM pads decode batches to its captured sizes. Data-dependent shapes (``nonzero``,
boolean indexing) cannot be captured, so the samples that leave are picked on the
host from one small device-to-host copy of the mask per exit (``k`` bytes), which also
sizes the next bucket.

The same code runs on the CPU without capture: the same buckets, the same static input
buffers filled and padded the same way, the same segment function, eagerly. So the
bucketing, padding and masking are tested on any machine (``tests/models/
test_captured.py``); only the capture itself needs a GPU (``scripts/gpu_session.sh``).

Answers follow :func:`models.engine.early_exit` (same exit rule, same layers: the
segment function *is* :class:`models.engine.TorchExecutor`'s segment). They can differ
from it only by the float rounding of kernels chosen for another batch size, which can
move a sample whose entropy is within that rounding of a threshold.

Padded rows: on the CPU they are zeros; in a captured buffer they hold whatever the
last batch left there (finite values of earlier inputs). Every layer of these networks
in eval mode treats rows independently, so padded rows never change real rows, and
their outputs are never read.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.engine import (
    EarlyExits,
    ExitResult,
    Forwarded,
    Release,
    Thresholds,
    TorchExecutor,
    _TorchState,
)
from models.exits import threshold_matrix

DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# (next segment's input, logits, entropy, leave mask), all with a bucket's rows
Outputs = tuple[Tensor, Tensor, Tensor, Tensor]


@dataclass
class CapturedState:
    """What one segment hands the next: the first ``n`` rows of ``h`` are real samples
    (``h`` may hold more: a bucket's padding, or a captured graph's static output)."""

    h: Tensor
    n: int


class _Segment:
    """One segment at one bucket size: static input buffers and the function over them,
    captured as a CUDA graph when ``capture`` is set, else run eagerly.

    The caller writes the first ``k`` rows of :attr:`x` and :attr:`t`, then calls
    :meth:`run`. On CUDA the outputs are the graph's static tensors, overwritten by the
    next replay: read or copy them before running this segment again.
    """

    def __init__(
        self,
        fn: Callable[[Tensor, Tensor], Outputs],
        x: Tensor,
        t: Tensor,
        *,
        capture: bool,
    ) -> None:
        self.fn = fn
        self.x, self.t = x, t
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Outputs | None = None
        if capture:
            self._capture()

    def _capture(self) -> None:
        # Warm up on a side stream first (cuDNN picks its algorithms, lazy
        # initialisation happens outside the capture), as torch.cuda.graphs' docs do.
        stream = torch.cuda.Stream(device=self.x.device)
        stream.wait_stream(torch.cuda.current_stream(self.x.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.fn(self.x, self.t)
        torch.cuda.current_stream(self.x.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.fn(self.x, self.t)

    def run(self) -> Outputs:
        if self.graph is None:
            return self.fn(self.x, self.t)
        self.graph.replay()
        assert self.out is not None
        return self.out


class CapturedExecutor(EarlyExits):
    """Runs a network's segments at bucketed batch sizes; CUDA graphs on a GPU.

    Implements :class:`models.engine.Executor` (so :func:`models.engine.early_exit` runs
    over it), and has its own :meth:`early_exit`, which decides the exits inside each
    segment and copies one mask per exit to the host. Graphs are captured on first use
    of each (segment, bucket, input shape), or up front by :meth:`warm`.

    Args:
        net: a :class:`models.BranchyNet` in eval mode, on its device.
        buckets: the batch sizes segments run at, ascending. A batch larger than the
            largest runs eagerly at its own size (never captured: one graph per size
            would hold memory for every size ever seen).
        capture: capture CUDA graphs (default: when the network is on CUDA). ``False``
            on CUDA runs the same buckets eagerly, for comparison.
    """

    runtime = "captured"

    def __init__(
        self,
        net: nn.Module,
        *,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        capture: bool | None = None,
    ) -> None:
        if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"buckets must be distinct positive sizes, ascending; got {buckets}")
        self.net = net
        self._torch = TorchExecutor(net)
        self.num_exits = self._torch.num_exits
        self.num_classes = self._torch.num_classes
        self.buckets = tuple(buckets)
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the network is on {self.device}")
        # Layers a head shares with the next stage run once (as in TorchExecutor); the
        # next stage then skips them.
        self._shared: list[int] = net.shared_prefixes()  # type: ignore[operator]
        self._skip = [0, *self._shared[:-1]]
        self._segments: dict[tuple[int, int, tuple[int, ...], torch.dtype], _Segment] = {}

    device = Forwarded("_torch", torch.device, "Where the segments run.")
    precision = Forwarded("_torch", str, "``fp32`` (or the torch executor's).")

    @property
    def captured(self) -> int:
        """How many (segment, bucket, input shape) graphs exist (0 when not capturing)."""
        return sum(s.graph is not None for s in self._segments.values())

    def bucket(self, k: int) -> int:
        """The batch size ``k`` samples run at: the smallest bucket ``>= k``, or ``k``."""
        j = bisect.bisect_left(self.buckets, k)
        return self.buckets[j] if j < len(self.buckets) else k

    # ----------------------------------------------------------------- one segment

    def _fn(self, i: int) -> Callable[[Tensor, Tensor], Outputs]:
        last = i == self.num_exits - 1

        def segment(x: Tensor, t: Tensor) -> Outputs:
            # owned=False: never write into the static input buffer x
            state = _TorchState(x, False, self._skip[i], self._shared, False)
            _, z, e = self._torch.segment(i, state, one=False)  # (b, C), (b,)
            leave = torch.zeros_like(e, dtype=torch.bool) if last else e < t
            return state.h, z, e, leave

        return segment

    def _segment(self, i: int, k: int, like: Tensor) -> _Segment:
        b = self.bucket(k)
        key = (i, b, tuple(like.shape[1:]), like.dtype)
        seg = self._segments.get(key)
        if seg is None:
            # Normal tensors even when first called under inference_mode: a buffer made
            # there could not be written by a later call outside it.
            with torch.inference_mode(False), torch.no_grad():
                x = torch.zeros((b, *like.shape[1:]), dtype=like.dtype, device=like.device)
                t = torch.zeros((b,), dtype=torch.float32, device=like.device)
                seg = _Segment(self._fn(i), x, t, capture=self.capture and b in self.buckets)
            if b in self.buckets:  # (an oversized batch's buffers are not kept)
                self._segments[key] = seg
        return seg

    def _run(self, i: int, h: Tensor, k: int, t: Tensor | None) -> Outputs:
        """Segment ``i`` on the first ``k`` rows of ``h`` (thresholds ``t``, ``(k,)``),
        padded to their bucket; outputs keep the bucket's rows."""
        seg = self._segment(i, k, h)
        seg.x[:k].copy_(h[:k])
        if t is not None:
            seg.t[:k].copy_(t)
        if self.capture:
            return seg.run()
        seg.x[k:].zero_()  # a fresh zero padding on every eager call
        with torch.no_grad():
            return seg.run()

    def warm(self, input_shape: Sequence[int], *, dtype: torch.dtype | None = None) -> None:
        """Build (on CUDA: capture) every segment at every bucket for inputs of
        ``input_shape`` (``(C, H, W)``), so that no request pays for a capture."""
        dtype = dtype or next(self.net.parameters()).dtype
        for b in self.buckets:
            h = torch.zeros((b, *input_shape), dtype=dtype, device=self.device)
            t = torch.zeros((b,), dtype=torch.float32, device=self.device)
            for i in range(self.num_exits):
                h = self._run(i, h, b, t)[0]
        if self.capture:
            torch.cuda.synchronize(self.device)

    # ----------------------------------------------------------------- Executor

    def begin(self, x: Tensor) -> CapturedState:
        return CapturedState(x, x.shape[0])

    def segment(self, i: int, state: CapturedState, *, one: bool) -> tuple[
        CapturedState | None, Tensor, Tensor
    ]:  # fmt: skip
        h, z, e, _ = self._run(i, state.h, state.n, None)
        n = state.n
        # clones: a graph's outputs are overwritten by its next replay
        z, e = z[:n].clone(), e[:n].clone()
        return (None if i == self.num_exits - 1 else CapturedState(h, n)), z, e

    def take(self, state: CapturedState, rows: Tensor) -> CapturedState:
        return CapturedState(state.h[rows], rows.numel())

    def join(self, states: Sequence[CapturedState]) -> CapturedState:
        """One state holding the samples of ``states``, in order (for
        :class:`models.stage_pool.StagePool`)."""
        if len(states) == 1:
            return states[0]
        return CapturedState(torch.cat([s.h[: s.n] for s in states]), sum(s.n for s in states))

    # ----------------------------------------------------------------- early exit

    def _executor(self) -> CapturedExecutor:
        return self  # early_exit (from EarlyExits) then calls decide

    def decide(self, x: Tensor, thresholds: Thresholds, release: Release | None) -> ExitResult:
        """:func:`models.engine.early_exit`'s contract, deciding exits inside the
        segments: one ``k``-byte mask copied to the host per early exit.

        Args:
            x: ``(B, C, H, W)`` normalised input on the executor's device.
            thresholds: ``num_exits - 1`` floats, or ``(B, num_exits - 1)`` per sample.
            release: as in :func:`models.engine.early_exit`.

        Raises:
            ValueError: wrong number or shape of thresholds, or a NaN threshold.
        """
        n, last, device = x.shape[0], self.num_exits - 1, self.device
        t = threshold_matrix(thresholds, batch_size=n, num_early_exits=last, device=device)
        logits = torch.empty((n, self.num_classes), dtype=torch.float32, device=device)
        exit_index = torch.full((n,), last, dtype=torch.int64, device=device)
        entropy = torch.empty((n,), dtype=torch.float32, device=device)
        if n == 0:
            return ExitResult(logits, exit_index, entropy)
        alive = torch.arange(n, device=device)  # rows of the running batch -> input rows
        h, k = x, n
        for i in range(self.num_exits):
            out, z, e, leave = self._run(i, h, k, t[:, i] if i < last else None)
            z, e = z[:k], e[:k]
            if i == last:
                logits[alive], entropy[alive] = z, e
                if release is not None:
                    release(alive, i, z.clone(), e.clone())
                break
            mask = leave[:k].cpu()  # the one device-to-host copy of this exit
            rows = mask.nonzero().squeeze(1)
            if rows.numel():
                r = rows.to(device, non_blocking=True)
                dst = alive[r]
                logits[dst], entropy[dst], exit_index[dst] = z[r], e[r], i
                if release is not None:
                    release(dst, i, z[r], e[r])
                if rows.numel() == k:
                    break  # everybody left
                stay = (~mask).nonzero().squeeze(1).to(device, non_blocking=True)
                h, alive, t, k = out[stay], alive[stay], t[stay], int(stay.numel())
            else:
                h = out
        return ExitResult(logits, exit_index, entropy)
