"""Whole-path timing of the early-exit engine: input tensor on the device to predicted
class on the host, branch heads, entropies and exit decisions included.

On CUDA the copy of the prediction to the host synchronises the device, so every
measured interval covers all the work it launched.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from models import BranchyNet, ExitResult
from models.inference import run_module, run_stage


class EarlyExiting(Protocol):
    """What batch-1 timing needs: a network or an engine with ``early_exit``."""

    def early_exit(self, x: Tensor, thresholds: Sequence[float]) -> ExitResult: ...


@dataclass(frozen=True)
class LatencyResult:
    """Per-sample batch-1 latencies (seconds) and the exit each sample took."""

    seconds: list[float]
    exits: list[int]
    predictions: list[int]

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.seconds)

    @property
    def mean_ms(self) -> float:
        return 1e3 * statistics.fmean(self.seconds)

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.seconds)
        return 1e3 * ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def latency_batch1(
    model: EarlyExiting, x: Tensor, thresholds: Sequence[float], *, warmup: int = 50
) -> LatencyResult:
    """Time every sample of ``x`` (already normalised, on the model's device) alone.

    Args:
        model: the network (put in eval mode), or an engine that runs it
            (``models.EarlyExitEngine``): anything with ``early_exit(x, thresholds)``.
        x: ``(N, C, H, W)`` inputs.
        thresholds: one per early exit.
        warmup: untimed calls first (allocator, oneDNN primitive caches, CUDA kernels).

    Returns:
        One latency, exit and prediction per sample, in order.
    """
    if isinstance(model, torch.nn.Module):
        model.eval()
    thr = list(thresholds)
    for i in range(min(warmup, x.shape[0])):
        model.early_exit(x[i : i + 1], thr).prediction.cpu()
    _sync(x.device)
    seconds, exits, preds = [], [], []
    clock = time.perf_counter
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        t0 = clock()
        result = model.early_exit(xi, thr)
        pred = result.prediction.cpu()  # the host needs the answer: syncs on CUDA
        t1 = clock()
        seconds.append(t1 - t0)
        exits.append(int(result.exit_index[0]))
        preds.append(int(pred[0]))
    return LatencyResult(seconds, exits, preds)


@torch.no_grad()
def throughput(
    model: BranchyNet,
    x: Tensor,
    thresholds: Sequence[float],
    *,
    batch_size: int = 256,
    repeats: int = 3,
) -> float:
    """Images per second classifying all of ``x`` in batches; the best of ``repeats``.

    Each repeat runs the whole set once, batch by batch, bringing each batch's
    predictions to the host. The best repeat, not the median, because on a shared
    machine other jobs only ever slow a repeat down.
    """
    model.eval()
    thr = list(thresholds)
    model.early_exit(x[:batch_size], thr).prediction.cpu()  # warm-up
    rates = []
    for _ in range(repeats):
        _sync(x.device)
        t0 = time.perf_counter()
        for start in range(0, x.shape[0], batch_size):
            model.early_exit(x[start : start + batch_size], thr).prediction.cpu()
        _sync(x.device)
        rates.append(x.shape[0] / (time.perf_counter() - t0))
    return max(rates)


@dataclass(frozen=True)
class SegmentTimes:
    """Seconds per image of each trunk stage and each exit head, each timed on its own.

    ``stages[i]`` and ``heads[i]`` are per image at the batch size they were timed with;
    they exclude everything the early-exit engine adds around them (entropies, exit
    decisions, compaction, copying results out).
    """

    stages: list[float]
    heads: list[float]

    @staticmethod
    def best(runs: Sequence[SegmentTimes]) -> SegmentTimes:
        """Segment by segment, the fastest of several runs (other jobs only slow a run)."""
        return SegmentTimes(
            [min(t) for t in zip(*(r.stages for r in runs), strict=True)],
            [min(t) for t in zip(*(r.heads for r in runs), strict=True)],
        )


def predicted_seconds_per_image(segments: SegmentTimes, exit_shares: Sequence[float]) -> float:
    """Time per image of the early-exit engine if its bookkeeping cost nothing.

    A sample leaving at exit ``k`` pays stages ``0..k`` and heads ``0..k`` at their
    measured per-image cost, and nothing else. For a plain network (one exit, share 1)
    this is its stage plus its head.

    Args:
        segments: per-image stage and head times.
        exit_shares: fraction of the samples leaving at each exit (sums to 1).

    Raises:
        ValueError: a share per exit is not given.
    """
    if len(exit_shares) != len(segments.stages):
        raise ValueError(
            f"need one exit share per exit ({len(segments.stages)}); got {len(exit_shares)}"
        )
    reached, total = 0.0, 0.0
    for stage, head, share in zip(segments.stages, segments.heads, exit_shares, strict=True):
        reached += stage + head
        total += share * reached
    return total


@torch.no_grad()
def segment_times(
    model: BranchyNet, x: Tensor, *, batch_size: int = 256, repeats: int = 1
) -> SegmentTimes:
    """Per-image time of every stage and head on all of ``x``, in batches, no early exit.

    Every batch runs through every stage and head (as ``model(x)`` does for training),
    each segment timed alone with the device synchronised before and after it, and run
    the way the engine runs it: layers a head shares with the next stage
    (:meth:`BranchyNet.shared_prefixes`) run once and count as the stage's, since every
    sample reaching that exit pays for them. Per segment, the best of ``repeats``
    passes.

    Args:
        model: the network, in eval mode.
        x: ``(N, C, H, W)`` normalised inputs on the model's device.
        batch_size: images per batch, as in :func:`throughput`.
        repeats: passes over ``x``.
    """
    model.eval()
    run_module(model.heads[0], run_module(model.stages[0], x[:batch_size]))  # warm-up
    shared = model.shared_prefixes()
    last = model.num_exits - 1
    clock = time.perf_counter
    runs = []
    for _ in range(repeats):
        stages = [0.0] * model.num_exits
        heads = [0.0] * model.num_exits
        for start in range(0, x.shape[0], batch_size):
            h, owned, skip = x[start : start + batch_size], False, 0
            for i, (stage, head) in enumerate(zip(model.stages, model.heads, strict=True)):
                _sync(x.device)
                t0 = clock()
                h, owned = run_stage(stage, head, h, skip=skip, prefix=shared[i], owned=owned)
                skip = shared[i]
                _sync(x.device)
                t1 = clock()
                run_module(head, h, start=skip, owned=owned and i == last)
                _sync(x.device)
                stages[i] += t1 - t0
                heads[i] += clock() - t1
        n = x.shape[0]
        runs.append(SegmentTimes([t / n for t in stages], [t / n for t in heads]))
    return SegmentTimes.best(runs)
