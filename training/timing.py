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

import torch
from torch import Tensor

from models import BranchyNet


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
    model: BranchyNet, x: Tensor, thresholds: Sequence[float], *, warmup: int = 50
) -> LatencyResult:
    """Time every sample of ``x`` (already normalised, on the model's device) alone.

    Args:
        model: the network, in eval mode.
        x: ``(N, C, H, W)`` inputs.
        thresholds: one per early exit.
        warmup: untimed calls first (allocator, oneDNN primitive caches, CUDA kernels).

    Returns:
        One latency, exit and prediction per sample, in order.
    """
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
