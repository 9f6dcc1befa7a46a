"""Dynamic batching: one batcher per model, a bounded queue of images, batches cut at
the max batch size or when the oldest image has waited the max delay, and the model run
in a worker thread so that the event loop never blocks on compute.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, overload

import torch
from torch import Tensor

from models import BranchyNet, Checkpoint, EarlyExitEngine, ExitResult, load_engine
from models.engine import Forwarded, Release, TorchExecutor
from service.errors import (
    DeadlineExceeded,
    InternalError,
    ModelChanged,
    QueueFull,
    ShuttingDown,
    new_error_id,
)
from service.metrics import Metrics

logger = logging.getLogger(__name__)


def run_model(
    engine: EarlyExitEngine, x: Tensor, thresholds: Tensor, release: Release | None = None
) -> ExitResult:
    """Run one (sub-)batch through the early-exit engine.

    A module-level function on purpose: it is the single seam through which the test
    hook (``tests/service/hooked_server.py``) injects faults into a real server process.
    """
    return engine.early_exit(x, thresholds, release=release)


def split_on_oom(
    run: Callable[..., ExitResult],
    x: Tensor,
    thresholds: Tensor,
    release: Release | None = None,
) -> ExitResult:
    """Run ``run(x, thresholds)`` (``run(x, thresholds, release)`` when ``release`` is
    given); on a CUDA out-of-memory error run the two halves of the batch instead,
    recursively, down to single images.

    Args:
        run: the batch function.
        x: ``(B, ...)`` input.
        thresholds: ``(B, E-1)`` per-sample thresholds, split along with ``x``.
        release: early answers, with positions in ``x`` (a half's positions are shifted
            back). A failed attempt may have released some samples already: the
            receiver ignores a sample it has seen.

    Returns:
        The results of the whole batch in input order.

    Raises:
        torch.cuda.OutOfMemoryError: a single image does not fit.
    """
    try:
        return run(x, thresholds) if release is None else run(x, thresholds, release)
    except torch.cuda.OutOfMemoryError:
        if x.shape[0] <= 1:
            raise
    # Split only after leaving the except block: while it is active, the exception's
    # traceback keeps the failed attempt's frames, and so its GPU tensors, alive, and
    # empty_cache() could not give their memory back.
    if x.is_cuda:
        torch.cuda.empty_cache()
    n = x.shape[0]
    half = n // 2
    logger.warning("out of memory on a batch of %d; splitting it into %d + %d", n, half, n - half)
    a = split_on_oom(run, x[:half], thresholds[:half], release)
    b = split_on_oom(run, x[half:], thresholds[half:], _shifted(release, half))
    return ExitResult(
        torch.cat([a.logits, b.logits]),
        torch.cat([a.exit_index, b.exit_index]),
        torch.cat([a.entropy, b.entropy]),
    )


def _shifted(release: Release | None, offset: int) -> Release | None:
    if release is None:
        return None
    inner = release

    def shifted(rows: Tensor, exit_index: int, logits: Tensor, entropy: Tensor) -> None:
        inner(rows + offset, exit_index, logits, entropy)

    return shifted


@dataclass(frozen=True)
class BatchOutput:
    """A batch's answers on the CPU: probabilities ``(B, C)``, exit ``(B,)``, entropy ``(B,)``."""

    probabilities: Tensor
    exit_index: Tensor
    entropy: Tensor


class Engine:
    """A checkpoint's network ready to run CPU batches, on the runtime chosen for it.

    On the CPU the network runs on ``models.load_engine``'s executor (``runtime`` and
    ``precision``: ``auto`` picks the fastest that agrees with the eager engine); on CUDA
    on the eager engine, optionally in float16 and compiled.

    Args:
        checkpoint: the loaded checkpoint (its model is moved to ``device``).
        device: where to compute.
        runtime: ``auto``, ``torch``, ``onnxruntime`` or ``openvino`` (CPU only).
        precision: ``auto``, ``fp32`` or ``bf16`` (CPU only).
        threads: intra-op threads of the CPU runtimes (default: torch's).
        half_precision: run in float16 (only honoured on CUDA).
        compile: wrap stages and heads in ``torch.compile`` (only honoured on CUDA).
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: torch.device,
        *,
        runtime: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
        half_precision: bool = False,
        compile: bool = False,
    ) -> None:
        self.checkpoint = checkpoint
        self.device = device
        self.half = half_precision and device.type == "cuda"
        self._pinned_buffer: Tensor | None = None
        if device.type == "cuda":
            model = checkpoint.model.to(device).eval()
            if self.half:
                model.half()
            if compile:
                for i, stage in enumerate(model.stages):
                    model.stages[i] = torch.compile(stage, dynamic=True)  # type: ignore[assignment]
                for i, head in enumerate(model.heads):
                    model.heads[i] = torch.compile(head, dynamic=True)  # type: ignore[assignment]
            why = "the CPU runtimes do not run on CUDA" + ("; float16" if self.half else "")
            self.runner = EarlyExitEngine(checkpoint, TorchExecutor(model), why)
        else:
            self.runner = load_engine(
                checkpoint, runtime=runtime, precision=precision, device=device, threads=threads
            )
        self.model: BranchyNet = checkpoint.model  # the eager network (reference)
        # What a batch costs whatever its size, measured by warm_up (None until then).
        self.batch_overhead_s: float | None = None

    num_exits = Forwarded("runner", int, "Exits of the network.")
    runtime = Forwarded("runner", str, "The runtime that serves (see ``load_engine``).")
    reason = Forwarded("runner", str, "Why that runtime and precision serve.")

    @property
    def precision(self) -> str:
        return "fp16" if self.half else self.runner.precision

    def _pinned(self, shape: torch.Size) -> Tensor:
        n = shape[0]
        if self._pinned_buffer is None or self._pinned_buffer.shape[0] < n:
            self._pinned_buffer = torch.empty(shape, dtype=torch.float32).pin_memory()
        return self._pinned_buffer[:n]

    @overload
    def run(self, x: Tensor, thresholds: Tensor, release: None = None) -> BatchOutput: ...

    @overload
    def run(self, x: Tensor, thresholds: Tensor, release: Release) -> None: ...

    def run(
        self, x: Tensor, thresholds: Tensor, release: Release | None = None
    ) -> BatchOutput | None:
        """Classify a CPU batch.

        Args:
            x: ``(B, C, H, W)`` float32 normalised input on the CPU.
            thresholds: ``(B, E-1)`` float32 per-sample thresholds.
            release: called with the samples leaving at each exit as soon as it is
                decided (see ``models.engine.early_exit``).

        Returns:
            The whole batch's answers; None when ``release`` is given: every answer went
            to it already, and the serving hot path would only throw a second copy away.
        """
        with torch.inference_mode():
            if self.device.type == "cuda":
                # Staged through a reused page-locked buffer so the copy to the GPU runs
                # asynchronously; the buffer is free again by the next batch, because
                # each batch ends by copying its results back (a synchronisation).
                staged = self._pinned(x.shape)
                staged.copy_(x)
                x = staged.to(self.device, non_blocking=True)
                thresholds = thresholds.to(self.device, non_blocking=True)
            if self.half:
                x = x.half()
            runner = self.runner
            result = split_on_oom(
                lambda xb, tb, rel=None: run_model(runner, xb, tb, rel), x, thresholds, release
            )
            if release is not None:
                return None
            probs = torch.softmax(result.logits.float(), dim=1)
            return BatchOutput(probs.cpu(), result.exit_index.cpu(), result.entropy.float().cpu())

    def warm_up(self, batch_sizes: Sequence[int], repeats: int = 3) -> None:
        """Run zero batches through every stage (thresholds 0: nobody leaves early).

        With two batch sizes or more, each size is then timed ``repeats`` times (the
        fastest counts: it is the cost without interference) and a line through the
        smallest and the largest gives :attr:`batch_overhead_s`, what a batch costs
        whatever its size (runtime calls, stage hand-offs, the answers' bookkeeping).
        """
        c, h, w = self.checkpoint.input_spec.shape
        sizes = sorted(set(batch_sizes))
        best: dict[int, float] = {}
        for b in sizes:
            x = torch.zeros((b, c, h, w), dtype=torch.float32)
            t = torch.zeros((b, self.num_exits - 1))
            self.run(x, t)  # the first run allocates (and on CUDA compiles)
            for _ in range(repeats if len(sizes) > 1 else 0):
                start = time.perf_counter()
                self.run(x, t)  # ends with a copy to the host: synchronised on CUDA
                best[b] = min(best.get(b, math.inf), time.perf_counter() - start)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if len(best) >= 2:
            small, large = min(best), max(best)
            per_image = (best[large] - best[small]) / (large - small)
            self.batch_overhead_s = max(0.0, best[small] - small * per_image)


class AnswerSink(Protocol):
    """Sees every batch's answers after they are computed (the shadow monitor)."""

    def offer(self, engine: Engine, x: Tensor, answers: Sequence[tuple[int, Classified]]) -> None:
        """``answers``: (row of ``x``, the answer) pairs of one batch."""
        ...


class ModelSource(Protocol):
    """What a batcher reads once per batch: the engine and the thresholds in force."""

    def snapshot(self) -> tuple[Engine, tuple[float, ...]]:
        """The engine and thresholds in force, read together (one atomic reference)."""
        ...


@dataclass(frozen=True)
class Classified:
    """One image's answer."""

    class_index: int
    confidence: float
    entropy: float
    exit_index: int
    probabilities: Tensor
    queue_wait_s: float
    inference_s: float
    batch_size: int
    thresholds: tuple[float, ...]
    class_names: Sequence[str]  # of the engine that answered (a reload may follow)
    finite: bool = True  # entropy and every probability finite (checked per batch)


@dataclass(eq=False)
class _Item:
    x: Tensor
    thresholds: tuple[float, ...] | None
    future: asyncio.Future[Classified]
    enqueued: float
    deadline: float
    # The engine in force when the image was queued, and its thresholds then: a reload
    # that changes the input shape or the exits must not strand queued images, so they
    # run on the engine they were decoded for (see Batcher._compute).
    engine: Engine
    shared_at_submit: tuple[float, ...]
    wait_s: float = field(default=0.0)


@dataclass(eq=False)
class _Computed:
    """Rows of a batch the network has answered, as the batch thread hands them to the
    event loop; their :class:`Classified` answers are built by the thread when it has
    time (``answers``), else by the loop (``Batcher._finish``). Every tensor is the
    batch thread's own copy: the runtime may reuse its buffers."""

    engine: Engine
    x: Tensor  # the batch's network input (the shadow monitor samples rows of it)
    batch: list[_Item]
    per_sample: list[tuple[float, ...]]  # each image's thresholds, in batch order
    rows: list[int]  # positions in the batch, in the order of the tensors below
    exits: list[int]
    probabilities: Tensor  # (len(rows), C)
    entropy: Tensor  # (len(rows),)
    elapsed: float  # seconds from the network's start to these rows' answers
    answers: list[tuple[_Item, Classified]] | None = None  # built already


def _batch_input(engine: Engine, batch: Sequence[_Item]) -> Tensor:
    """The batch's network input: its images stacked, uint8 pixels normalised (all at
    once when every image came as pixels, the serving path's case)."""
    xs = [item.x for item in batch]
    spec = engine.checkpoint.input_spec
    if all(x.dtype == torch.uint8 for x in xs):
        return spec.normalise(torch.stack(xs))
    return torch.stack([spec.normalise(x) if x.dtype == torch.uint8 else x for x in xs])


class Batcher:
    """Per-model dynamic batcher.

    Args:
        name: model name (metric label).
        source: gives the engine and the thresholds, read once per batch.
        metrics: where to record queue, batch and exit metrics.
        max_batch_size: images per batch at most.
        max_delay_s: longest time the oldest queued image waits for the batch to fill.
        max_queue: images waiting at most; a request that does not fit is refused whole.
        early_release: answer each image as soon as its exit is decided, not at the end
            of its batch.
        adaptive_delay: an idle engine waits for a batch to fill at most the engine's
            per-batch fixed cost (``Engine.batch_overhead_s``, measured at warm-up), when
            that is shorter than ``max_delay_s``. Waiting can save at most one batch's
            fixed cost (the images that would have come into it run in the next batch
            instead), while the engine idles all the time it waits; so waiting longer
            than that fixed cost cannot pay. Waiting up to it, then running, is the
            ski-rental rule: never more than twice the idle time of the best wait in
            hindsight.
    """

    shadow: AnswerSink | None = None  # set by service.shadow.attach

    def __init__(
        self,
        name: str,
        source: ModelSource,
        metrics: Metrics,
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        early_release: bool = True,
        adaptive_delay: bool = False,
    ) -> None:
        self.name = name
        self.adaptive_delay = adaptive_delay
        self._wait_limit_shown: float | None = None
        self.early_release = early_release
        self.source = source
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._items: collections.deque[_Item] = collections.deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        # One thread per model: batches of one model run one at a time, in order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")

    @property
    def depth(self) -> int:
        return len(self._items)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name=f"batcher-{self.name}"
            )

    async def stop(self) -> None:
        """Refuse new work, finish every queued image, then stop the worker thread."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await self._task
            finally:
                self._task = None
        self._executor.shutdown(wait=True)

    def submit(
        self,
        xs: Sequence[Tensor],
        *,
        deadline: float,
        thresholds: Sequence[float] | None = None,
    ) -> list[asyncio.Future[Classified]]:
        """Queue a request's images; all of them or none.

        Args:
            xs: ``(C, H, W)`` float32 network inputs, or uint8 pixels that are normalised
                with the rest of their batch (``InputSpec.normalise``, one operation
                per batch rather than per request).
            deadline: ``time.monotonic()`` after which queued images are dropped.
            thresholds: this request's own thresholds (else the model's at batch time).

        Raises:
            QueueFull: the images do not fit in the queue.
            ShuttingDown: the server is stopping.
        """
        if self._closing or self._task is None:
            raise ShuttingDown(f"model {self.name!r} is not accepting requests (shutting down)")
        if len(self._items) + len(xs) > self.max_queue:
            raise QueueFull(
                f"the queue of model {self.name!r} is full ({len(self._items)} of "
                f"{self.max_queue} images waiting); retry later"
            )
        engine, shared = self.source.snapshot()
        shape = tuple(engine.checkpoint.input_spec.shape)
        t = None if thresholds is None else tuple(float(v) for v in thresholds)
        if any(tuple(x.shape) != shape for x in xs) or (
            t is not None and len(t) != engine.num_exits - 1
        ):
            raise ModelChanged(
                f"model {self.name!r} was reloaded with a different input shape or number "
                "of exits while this request was being decoded; retry"
            )
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures = []
        for x in xs:
            fut: asyncio.Future[Classified] = loop.create_future()
            self._items.append(_Item(x, t, fut, now, deadline, engine, shared))
            futures.append(fut)
        self.metrics.queue_depth.labels(self.name).set(len(self._items))
        self._wakeup.set()
        return futures

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        self.wait_limit()  # exported from the start, not only once a batch runs
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            # The worker thread runs this batch and every batch due after it; answers
            # reach the futures through _finish, scheduled on this loop by the thread
            # before the executor's own completion.
            try:
                await loop.run_in_executor(self._executor, self._work, batch, loop)
            except Exception:  # the thread's own bookkeeping (a batch's failure stays its own)
                logger.exception("the batch thread of model %r failed; it goes on", self.name)

    def _work(self, batch: list[_Item], loop: asyncio.AbstractEventLoop) -> None:
        """Run ``batch``, then each next batch for as long as one is due (full, or its
        oldest image has waited its limit), in the worker thread.

        Taking the next batch here, not back on the event loop, keeps the engine busy:
        each hop between the loop and this thread waits for the GIL while the loop
        answers requests, and the engine idled through both hops of every batch (it
        computed 90 % of the time under 16-image load, 95-97 % with this:
        ``benchmarks/serving.py``'s engine-busy column). For the same reason a batch's
        answers go to the loop only once the next batch's input is ready, just before
        the network runs (and releases the GIL): the loop's answering then overlaps the
        network instead of delaying it. When batches fill (or a full batch waits), the
        engine is the bottleneck, and the answers themselves (an object and two
        histogram observations per image: 0.3 ms for 64 images, about 1 % of AlexNet's
        network, ``benchmarks/batch_glue.py``) are built on the loop too
        (:meth:`_finish`), so that this thread does little but run networks: 16-image
        requests served 1.00-1.10x faster in three A/Bs
        (``reports/serving/answers-on-loop-ab/``), more than that 1 % alone. Otherwise
        this thread builds them, and the loop, which every request's round trip goes
        through, only hands them out.
        """
        computed: list[_Computed] = []  # the previous batch's, not yet handed over

        def hand_over() -> None:
            if computed:
                loop.call_soon_threadsafe(self._finish, computed.copy())
                computed.clear()

        try:
            while batch:
                try:
                    computed.extend(self._compute(batch, loop, hand_over))
                except Exception as exc:  # one bad batch must not stop the batcher
                    hand_over()
                    loop.call_soon_threadsafe(self._fail, batch, exc)
                batch = self._take(loop) if self._due() else []
        finally:
            hand_over()

    def _fail(self, batch: list[_Item], exc: Exception) -> None:
        # on the event loop
        error_id = new_error_id()
        logger.error(
            "batch of %d image(s) of model %r failed [id %s]: %r",
            len(batch),
            self.name,
            error_id,
            exc,
            exc_info=exc,
        )
        err = InternalError(
            f"inference failed for a batch of model {self.name!r} (error id {error_id})",
            error_id=error_id,
        )
        for item in batch:  # images released before the failure keep their answer
            if not item.future.done():
                item.future.set_exception(err)

    def _due(self) -> bool:
        """Whether a batch should start now, without waiting: the queue fills a batch,
        the oldest image has waited its limit, or the batcher is stopping."""
        limit = self.wait_limit()  # also keeps its gauge current under full batches
        items = self._items
        if not items:
            return False
        return (
            len(items) >= self.max_batch_size
            or self._closing
            or items[0].enqueued + limit <= time.monotonic()
        )

    def _finish(self, computed: list[_Computed]) -> None:
        """On the event loop: the answers of rows the batch thread computed, built and
        delivered. A failure to build them fails their batch's unanswered images (an
        internal error), not the batcher."""
        for done in computed:
            try:
                answers = done.answers if done.answers is not None else self._answers(done)
            except Exception as exc:
                self._fail(done.batch, exc)
                continue
            for item, out in answers:
                if not item.future.done():
                    item.future.set_result(out)

    def wait_limit(self) -> float:
        """How long the oldest queued image waits for its batch to fill (the engine is
        idle meanwhile): ``max_delay_s``, or with ``adaptive_delay`` the engine's
        per-batch fixed cost when that is shorter. Exported as
        ``branchy_batch_wait_limit_seconds``."""
        limit = self.max_delay_s
        if self.adaptive_delay:
            overhead = getattr(self.source.snapshot()[0], "batch_overhead_s", None)
            if overhead is not None:
                limit = min(limit, overhead)
        if limit != self._wait_limit_shown:
            self._wait_limit_shown = limit
            self.metrics.batch_wait_limit.labels(self.name).set(limit)
        return limit

    async def _next_batch(self) -> list[_Item] | None:
        while True:
            while not self._items:
                if self._closing:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
            # Wait until the batch is full or the oldest image has waited long enough.
            limit = self.wait_limit()
            while len(self._items) < self.max_batch_size and not self._closing:
                remaining = self._items[0].enqueued + limit - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take(asyncio.get_running_loop())
            if batch:
                return batch

    def _take(self, loop: asyncio.AbstractEventLoop) -> list[_Item]:
        """Pop up to a batch of live items; drop expired and abandoned ones before compute.

        Runs on the event loop or in the worker thread (the deque's appends and pops are
        atomic); futures are completed on the loop."""
        now = time.monotonic()
        batch: list[_Item] = []
        expired: list[_Item] = []
        while self._items and len(batch) < self.max_batch_size:
            item = self._items.popleft()
            if item.future.done():  # the request gave up (timeout or disconnect)
                continue
            if now > item.deadline:
                expired.append(item)
                continue
            item.wait_s = now - item.enqueued
            batch.append(item)
        if expired:
            loop.call_soon_threadsafe(self._expire, expired)
            logger.warning(
                "dropped %d expired image(s) of model %r before compute", len(expired), self.name
            )
        self.metrics.queue_depth.labels(self.name).set(len(self._items))
        return batch

    def _expire(self, items: list[_Item]) -> None:
        # on the event loop
        for item in items:
            if not item.future.done():
                item.future.set_exception(
                    DeadlineExceeded(
                        f"the request's deadline passed while it waited in the queue of "
                        f"model {self.name!r}; it was not run"
                    )
                )

    def _compute(
        self,
        batch: list[_Item],
        loop: asyncio.AbstractEventLoop,
        before_run: Callable[[], None],
    ) -> list[_Computed]:
        # Runs in the worker thread. Engine and thresholds are read once: the whole batch
        # sees one model and one threshold setting even while an admin changes them.
        # Images queued before a reload run on the engine they were decoded for, with the
        # thresholds in force then (in practice a batch has one group).
        # With early release each exit's rows go to the loop as soon as it is decided;
        # without, the whole batch's are returned. before_run is called when a group's
        # input is ready, just before its network runs.
        held: list[_Computed] = []

        full = self.max_batch_size

        def deliver(done: _Computed) -> None:
            if len(done.batch) < full and len(self._items) < full:
                # The engine is not the bottleneck (this batch did not fill, and no full
                # batch waits): the answers are built here, and the loop, which every
                # request's round trip goes through, only hands them out.
                done.answers = self._answers(done)
            if self.early_release:
                loop.call_soon_threadsafe(self._finish, [done])
            else:
                held.append(done)

        engine, shared = self.source.snapshot()
        groups: dict[int, list[_Item]] = {}
        for item in batch:
            groups.setdefault(id(item.engine), []).append(item)
        for items in groups.values():
            run_on = items[0].engine
            default = shared if run_on is engine else items[0].shared_at_submit
            self._run_group(run_on, default, items, deliver, before_run)
        return held

    def _run_group(
        self,
        engine: Engine,
        shared: tuple[float, ...],
        batch: list[_Item],
        deliver: Callable[[_Computed], None],
        before_run: Callable[[], None],
    ) -> None:
        n, e = len(batch), engine.num_exits - 1
        per_sample = [item.thresholds if item.thresholds is not None else shared for item in batch]
        t = torch.tensor(per_sample, dtype=torch.float32).reshape(n, e)
        x = _batch_input(engine, batch)
        before_run()
        start = time.perf_counter()
        if self.early_release:
            answered = [False] * n  # an out-of-memory retry may release a sample twice

            def release(rows: Tensor, exit_index: int, logits: Tensor, entropy: Tensor) -> None:
                positions = rows.tolist()
                keep = [k for k, r in enumerate(positions) if not answered[r]]
                fresh = [positions[k] for k in keep]
                for r in fresh:
                    answered[r] = True
                if len(keep) < len(positions):
                    logits, entropy = logits[keep], entropy[keep]
                deliver(
                    _Computed(
                        engine, x, batch, per_sample, fresh, [exit_index] * len(fresh),
                        torch.softmax(logits.float(), dim=1).cpu(),
                        entropy.float().cpu().clone(), time.perf_counter() - start,
                    )
                )  # fmt: skip

            engine.run(x, t, release)
        else:
            # Answered together at the end: one softmax and one conversion per batch,
            # not one per exit taken.
            out = engine.run(x, t)
            deliver(
                _Computed(
                    engine, x, batch, per_sample, list(range(n)), out.exit_index.tolist(),
                    out.probabilities, out.entropy.clone(), time.perf_counter() - start,
                )
            )  # fmt: skip
        self.metrics.inference_duration.labels(self.name).observe(time.perf_counter() - start)
        self.metrics.batch_size.labels(self.name).observe(n)

    def _answers(self, done: _Computed) -> list[tuple[_Item, Classified]]:
        """The answers of ``done``'s rows, with their metrics, offered to the shadow
        monitor (on the batch thread, or on the event loop when batches fill: see
        :meth:`_work`). Tensors become Python lists in one call each and metric children
        are resolved once per exit, not per image."""
        engine, x, batch, per_sample = done.engine, done.x, done.batch, done.per_sample
        rows, exits, probs, entropy = done.rows, done.exits, done.probabilities, done.entropy
        elapsed = done.elapsed
        m, name = self.metrics, self.name
        conf, cls = probs.max(dim=1)
        finite = (probs.isfinite().all(dim=1) & entropy.isfinite()).tolist()
        entropies, confs, classes = entropy.tolist(), conf.tolist(), cls.tolist()
        names = engine.checkpoint.class_names
        wait_h = m.queue_wait.labels(name)
        entropy_h: dict[int, Any] = {}
        counts: collections.Counter[int] = collections.Counter()
        answers = []
        for k, r in enumerate(rows):
            item, ent, ex = batch[r], entropies[k], exits[k]
            if ex not in entropy_h:
                entropy_h[ex] = m.exit_entropy.labels(name, str(ex))
            counts[ex] += 1
            wait_h.observe(item.wait_s)
            entropy_h[ex].observe(ent if math.isfinite(ent) else 0.0)
            answers.append(
                (
                    item,
                    Classified(
                        class_index=classes[k],
                        confidence=confs[k],
                        entropy=ent,
                        exit_index=ex,
                        probabilities=probs[k],
                        queue_wait_s=item.wait_s,
                        inference_s=elapsed,
                        batch_size=len(batch),
                        thresholds=per_sample[r],
                        class_names=names,
                        finite=finite[k],
                    ),
                )
            )
        for ex, count in counts.items():
            m.exits.labels(name, str(ex)).inc(count)
        if self.shadow is not None:  # cheap: samples and queues, never computes here
            self.shadow.offer(
                engine, x, [(r, out) for r, (_, out) in zip(rows, answers, strict=True)]
            )
        return answers
