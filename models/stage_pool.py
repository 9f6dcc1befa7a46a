"""Stage-level batching: the samples that continue past an exit wait for company.

In a batch of 16, say 10 samples leave at the first exit; the second segment then runs
on 6, and the third on 2. On a GPU that is a launch-bound kernel at a tiny size; with
buckets (:mod:`models.captured`) it is a bucket of 8 or 2. :class:`StagePool` keeps a
queue per segment: each submitted batch runs its first segment at once, and the
samples that continue join the next segment's queue, with those of earlier batches.
A segment runs when its queue holds ``target`` samples (a full bucket), or when its
oldest sample has waited ``max_delay_s``, the way the request batcher cuts batches
(DVABatch and DREX re-batch at every stage the same way).

Each batch's answers are those :func:`models.engine.early_exit` gives it (per-sample
thresholds travel with the samples), in input order, available from
:meth:`StagePool.pop_finished` once its last sample has answered.

The pool is synchronous and single-threaded: it runs segments inside :meth:`submit`,
:meth:`run_due` and :meth:`flush`. A caller such as the service's batcher would call
``submit`` for every batch it cuts, ``run_due`` when its queue is idle (a timer of
``max_delay_s``), and answer each request from ``pop_finished``. (Not wired into the
service yet.)

The executor must be able to join the states of several batches; today that is
:class:`models.captured.CapturedExecutor` (on the CPU it runs eagerly).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from models.captured import CapturedExecutor, CapturedState
from models.engine import ExitResult
from models.exits import threshold_matrix


@dataclass
class _Waiting:
    """Samples of one batch waiting for segment ``i``."""

    state: CapturedState
    ticket: Tensor  # (k,) int64 ticket of each sample's batch, on the host
    position: Tensor  # (k,) int64 row in that batch, on the host
    thresholds: Tensor  # (k, num_exits - 1)
    since: float  # when the batch was submitted


@dataclass
class _Open:
    """A submitted batch whose answers are not all in yet."""

    logits: Tensor
    exit_index: Tensor
    entropy: Tensor
    missing: int


class StagePool:
    """Re-batches the samples continuing past each exit across consecutive batches.

    Args:
        executor: runs the segments; its states must join (see the module docstring).
        thresholds: the default thresholds (``num_exits - 1`` floats) for batches
            submitted without their own.
        target: the segment batch size to wait for (e.g. the largest bucket).
        max_delay_s: the longest a sample waits in a queue before its segment runs
            anyway.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        executor: CapturedExecutor,
        thresholds: Sequence[float] = (),
        *,
        target: int = 256,
        max_delay_s: float = 0.002,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if target < 1:
            raise ValueError(f"target must be at least 1; got {target}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must not be negative; got {max_delay_s}")
        self.executor = executor
        self.thresholds = list(thresholds)
        self.target, self.max_delay_s, self.clock = target, max_delay_s, clock
        self._queues: list[deque[_Waiting]] = [deque() for _ in range(executor.num_exits)]
        self._open: dict[int, _Open] = {}
        self._finished: dict[int, ExitResult] = {}
        self._next_ticket = 0
        self.segment_runs = [0] * executor.num_exits  # how often each segment ran
        self.segment_samples = [0] * executor.num_exits  # and on how many samples

    @property
    def waiting(self) -> int:
        """Samples queued for a later segment."""
        return sum(w.state.n for q in self._queues for w in q)

    def submit(self, x: Tensor, thresholds: Sequence[float] | Tensor | None = None) -> int:
        """Run the first segment of a batch now; queue the samples that continue.

        Args:
            x: ``(B, C, H, W)`` normalised input on the executor's device.
            thresholds: as for :func:`models.engine.early_exit` (default: the pool's).

        Returns:
            The batch's ticket, the key of its answers in :meth:`pop_finished`.

        Raises:
            ValueError: wrong number or shape of thresholds, or a NaN threshold.
        """
        ex = self.executor
        n, device = x.shape[0], ex.device
        t = threshold_matrix(
            self.thresholds if thresholds is None else thresholds,
            batch_size=n, num_early_exits=ex.num_exits - 1, device=device,
        )  # fmt: skip
        ticket = self._next_ticket
        self._next_ticket += 1
        self._open[ticket] = _Open(
            torch.empty((n, ex.num_classes), dtype=torch.float32, device=device),
            torch.full((n,), ex.num_exits - 1, dtype=torch.int64, device=device),
            torch.empty((n,), dtype=torch.float32, device=device),
            n,
        )
        if n == 0:
            self._close(ticket)
            return ticket
        # Bookkeeping stays on the host, so that sorting answers out by batch needs no
        # device synchronisation beyond the one mask per exit.
        tickets = torch.full((n,), ticket, dtype=torch.int64)
        positions = torch.arange(n)
        self._queues[0].append(_Waiting(ex.begin(x), tickets, positions, t, self.clock()))
        self._run(0, self._queues[0], limit=n)  # the whole batch, as its batcher cut it
        self.run_due()
        return ticket

    def run_due(self) -> None:
        """Run every segment whose queue is full or has waited ``max_delay_s``."""
        for i in range(1, self.executor.num_exits):
            q = self._queues[i]
            while q and (
                sum(w.state.n for w in q) >= self.target
                or self.clock() - q[0].since >= self.max_delay_s
            ):
                self._run(i, q, limit=self.target)

    def flush(self) -> None:
        """Run everything still queued, segment by segment."""
        for i in range(self.executor.num_exits):
            while self._queues[i]:
                self._run(i, self._queues[i], limit=self.target)

    def pop_finished(self) -> dict[int, ExitResult]:
        """The answers of every batch completed since the last call, by ticket."""
        done, self._finished = self._finished, {}
        return done

    def _run(self, i: int, q: deque[_Waiting], *, limit: int) -> None:
        # Take up to `limit` samples from the front (splitting a batch if needed).
        taken: list[_Waiting] = []
        count = 0
        while q and count < limit:
            w = q[0]
            room = limit - count
            if w.state.n <= room:
                taken.append(q.popleft())
                count += w.state.n
            else:
                head = torch.arange(room, device=w.thresholds.device)
                rest = torch.arange(room, w.state.n, device=w.thresholds.device)
                taken.append(_Waiting(self.executor.take(w.state, head), w.ticket[:room],
                                      w.position[:room], w.thresholds[:room], w.since))  # fmt: skip
                q[0] = _Waiting(self.executor.take(w.state, rest), w.ticket[room:],
                                w.position[room:], w.thresholds[room:], w.since)  # fmt: skip
                count += room
        ex = self.executor
        state = ex.join([w.state for w in taken])
        ticket = torch.cat([w.ticket for w in taken])
        position = torch.cat([w.position for w in taken])
        t = torch.cat([w.thresholds for w in taken])
        since = min(w.since for w in taken)
        self.segment_runs[i] += 1
        self.segment_samples[i] += state.n
        nxt, z, e = ex.segment(i, state, one=False)
        if nxt is None:  # the last exit answers for everybody
            self._answer(ticket, position, i, z, e)
            return
        leave = (e < t[:, i]).cpu()  # the one device-to-host copy of this exit
        rows, stay = leave.nonzero().squeeze(1), (~leave).nonzero().squeeze(1)
        if rows.numel():
            r = rows.to(z.device, non_blocking=True)
            self._answer(ticket[rows], position[rows], i, z[r], e[r])
        if stay.numel():
            s = stay.to(t.device, non_blocking=True)
            # take() copies the rows: on CUDA `nxt` is a graph's static output, which
            # the next replay of that graph overwrites while these samples wait
            nxt = ex.take(nxt, s)
            self._queues[i + 1].append(_Waiting(nxt, ticket[stay], position[stay], t[s], since))

    def _answer(self, ticket: Tensor, position: Tensor, i: int, z: Tensor, e: Tensor) -> None:
        # ticket, position: host tensors; z, e: on the device
        for tk in ticket.unique().tolist():
            mine = (ticket == tk).nonzero().squeeze(1)
            o = self._open[tk]
            p = position[mine].to(z.device, non_blocking=True)
            m = mine.to(z.device, non_blocking=True)
            o.logits[p], o.entropy[p], o.exit_index[p] = z[m], e[m], i
            o.missing -= int(mine.numel())
            if o.missing == 0:
                self._close(tk)

    def _close(self, ticket: int) -> None:
        o = self._open.pop(ticket)
        self._finished[ticket] = ExitResult(o.logits, o.exit_index, o.entropy)
