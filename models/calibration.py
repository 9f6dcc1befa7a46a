"""Choosing exit thresholds from validation data, without re-running the model.

Calibration data are, for N validation samples and E exits, the entropy of every exit's
softmax and whether every exit's argmax is right. Given thresholds, the exit each sample
takes follows from the entropies alone, so accuracy, exit shares and expected cost of any
setting can be computed exactly and quickly. :func:`choose_thresholds` searches for the
cheapest setting that keeps accuracy within a tolerance of the final exit's (or above an
absolute target).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# The threshold grid of the original BranchyNet experiments (per early exit).
ORIGINAL_GRID: tuple[float, ...] = (
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.075,
    0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 3.0, 5.0, 10.0,
)  # fmt: skip


@dataclass(frozen=True)
class CalibrationData:
    """Per-sample, per-exit entropy ``(N, E)`` float32 and correctness ``(N, E)`` bool."""

    entropy: Tensor
    correct: Tensor

    def __post_init__(self) -> None:
        if self.entropy.dim() != 2 or self.entropy.shape != self.correct.shape:
            raise ValueError(
                f"entropy and correct must both be (N, E); got {tuple(self.entropy.shape)} "
                f"and {tuple(self.correct.shape)}"
            )
        if self.entropy.shape[0] == 0 or self.entropy.shape[1] == 0:
            raise ValueError("calibration data must hold at least one sample and one exit")
        if not torch.isfinite(self.entropy).all():
            raise ValueError("calibration entropies must be finite")

    @property
    def num_samples(self) -> int:
        return int(self.entropy.shape[0])

    @property
    def num_exits(self) -> int:
        return int(self.entropy.shape[1])

    def summary(self) -> dict[str, object]:
        """Small JSON-able description (sizes and per-exit accuracy)."""
        return {
            "num_samples": self.num_samples,
            "num_exits": self.num_exits,
            "exit_accuracy": [round(a, 6) for a in self.correct.float().mean(0).tolist()],
        }


@dataclass(frozen=True)
class OperatingPoint:
    """What one threshold setting does on the calibration (or test) data."""

    thresholds: tuple[float, ...]
    accuracy: float
    exit_shares: tuple[float, ...]
    expected_macs: float
    relative_cost: float  # expected MACs / MACs of the final exit

    def to_json(self) -> dict[str, object]:
        return {
            "thresholds": [t if math.isfinite(t) else "inf" for t in self.thresholds],
            "accuracy": self.accuracy,
            "exit_shares": list(self.exit_shares),
            "expected_macs": self.expected_macs,
            "relative_cost": self.relative_cost,
        }

    def describe(self) -> str:
        """One line for logs: thresholds, accuracy and exit shares in %, relative cost."""
        return (
            f"thresholds {[round(t, 6) for t in self.thresholds]}, accuracy "
            f"{100 * self.accuracy:.2f}%, exit shares "
            f"{[round(100 * s, 2) for s in self.exit_shares]}, relative cost "
            f"{self.relative_cost:.3f}"
        )


def exits_taken(entropy: Tensor, thresholds: Tensor) -> Tensor:
    """Exit index per sample for each threshold setting.

    Args:
        entropy: ``(N, E)`` per-exit entropies.
        thresholds: ``(M, E-1)`` settings.

    Returns:
        ``(M, N)`` int64: the first exit ``i < E-1`` with ``entropy < T_i``, else ``E-1``.
    """
    e = entropy.shape[1]
    leave = entropy[None, :, : e - 1] < thresholds[:, None, :]  # (M, N, E-1)
    idx = torch.arange(e - 1, device=entropy.device).expand_as(leave)
    return (
        torch.where(leave, idx, e - 1).amin(dim=2)
        if e > 1
        else torch.zeros((thresholds.shape[0], entropy.shape[0]), dtype=torch.int64)
    )


def evaluate_many(
    data: CalibrationData, exit_macs: Sequence[int], thresholds: Tensor, *, chunk: int = 256
) -> tuple[Tensor, Tensor, Tensor]:
    """Accuracy ``(M,)``, exit shares ``(M, E)`` and expected MACs ``(M,)`` of M settings."""
    macs = torch.tensor(list(exit_macs), dtype=torch.float64)
    accs, shares, costs = [], [], []
    for start in range(0, thresholds.shape[0], chunk):
        taken = exits_taken(data.entropy, thresholds[start : start + chunk])  # (m, N)
        right = data.correct.gather(1, taken.T).T  # (m, N)
        accs.append(right.double().mean(1))
        counts = torch.nn.functional.one_hot(taken, data.num_exits).double().mean(1)  # (m, E)
        shares.append(counts)
        costs.append(counts @ macs)
    return torch.cat(accs), torch.cat(shares), torch.cat(costs)


def evaluate_thresholds(
    data: CalibrationData, exit_macs: Sequence[int], thresholds: Sequence[float]
) -> OperatingPoint:
    """Accuracy, exit shares and expected cost of one threshold setting."""
    _check(data, exit_macs, thresholds)
    t = torch.tensor([list(thresholds)], dtype=torch.float32)
    acc, shares, cost = evaluate_many(data, exit_macs, t)
    return _point(thresholds, acc[0], shares[0], cost[0], exit_macs)


def sweep(
    data: CalibrationData,
    exit_macs: Sequence[int],
    grid: Iterable[float] = ORIGINAL_GRID,
) -> list[OperatingPoint]:
    """Every combination of ``grid`` values over the early exits (Cartesian product)."""
    values = sorted(set(float(g) for g in grid))
    grids = [values] * (data.num_exits - 1)
    acc, shares, cost = evaluate_grid(data, exit_macs, grids)
    combos = list(itertools.product(values, repeat=data.num_exits - 1))
    acc, shares, cost = acc.reshape(-1), shares.reshape(-1, data.num_exits), cost.reshape(-1)
    return [_point(combo, acc[k], shares[k], cost[k], exit_macs) for k, combo in enumerate(combos)]


def evaluate_grid(
    data: CalibrationData, exit_macs: Sequence[int], grids: Sequence[Sequence[float]]
) -> tuple[Tensor, Tensor, Tensor]:
    """Accuracy, exit shares and expected MACs of every setting in the Cartesian product
    of ``grids`` (one ascending list of thresholds per early exit), exactly.

    Evaluating each setting on every sample costs O(settings × N). Instead, with sorted
    candidates, sample n leaves at exit i under setting (c_0, ..., c_{E-2}) iff
    ``c_i >= r_i(n)`` and ``c_j < r_j(n)`` for every j < i, where ``r_i(n)`` counts the
    candidates ``<= entropy_i(n)`` (strict ``<`` of the exit rule). So one histogram of
    the samples over (r_0, ..., r_{E-2}) and cumulative sums along each axis give every
    setting's counts at once: O(N + settings × E) time and memory.

    Returns:
        ``acc`` of shape ``(K_0, ..., K_{E-2})``, ``shares`` of shape ``(K_0, ..., E)``,
        ``cost`` like ``acc``.
    """
    early = data.num_exits - 1
    if len(grids) != early:
        raise ValueError(f"need {early} threshold grid(s); got {len(grids)}")
    cands = [torch.tensor(list(g), dtype=torch.float32) for g in grids]
    for i, c in enumerate(cands):
        if c.numel() == 0 or (c.numel() > 1 and not bool((c[1:] > c[:-1]).all())):
            raise ValueError(f"grid {i} must be non-empty and strictly ascending")
    sizes = [c.numel() for c in cands]
    # r_i(n): how many candidates of exit i are <= the sample's entropy there
    ranks = [
        torch.searchsorted(c, data.entropy[:, i].contiguous(), right=True)
        for i, c in enumerate(cands)
    ]
    flat = torch.zeros(data.num_samples, dtype=torch.int64)
    for r, k in zip(ranks, sizes, strict=True):
        flat = flat * (k + 1) + r
    n = float(data.num_samples)
    ones = torch.ones(data.num_samples, dtype=torch.float64)
    shares, right = [], []
    for i in range(data.num_exits):
        shares.append(_grid_sum(flat, sizes, ones, i) / n)
        right.append(_grid_sum(flat, sizes, data.correct[:, i].double(), i))
    share = torch.stack(shares, dim=-1)  # (K_0, ..., E)
    acc = torch.stack(right, dim=-1).sum(-1) / n  # counts are exact integers until here
    cost = share @ torch.tensor([float(m) for m in exit_macs], dtype=torch.float64)
    return acc, share, cost


def _grid_sum(flat: Tensor, sizes: list[int], weight: Tensor, exit_: int) -> Tensor:
    """For every setting c: sum of ``weight`` over the samples leaving at ``exit_``,
    i.e. with ``r_j > c_j`` for j < exit_ and ``r_exit <= c_exit`` (none for the last)."""
    shape = [k + 1 for k in sizes]
    h = torch.bincount(flat, weights=weight, minlength=math.prod(shape)).reshape(shape)
    for d, k in enumerate(sizes):
        if d < exit_:  # still in flight: r_d > c_d, a strict suffix sum
            h = h.flip(d).cumsum(d).flip(d).narrow(d, 1, k)
        elif d == exit_:  # leaves here: r_d <= c_d, a prefix sum
            h = h.cumsum(d).narrow(d, 0, k)
        else:  # later exits do not matter
            h = h.sum(d, keepdim=True).expand(*h.shape[:d], k, *h.shape[d + 1 :])
    return h


def pareto_frontier(points: Iterable[OperatingPoint]) -> list[OperatingPoint]:
    """Points no other point beats on both cost and accuracy, cheapest first."""
    ordered = sorted(points, key=lambda p: (p.expected_macs, -p.accuracy))
    frontier: list[OperatingPoint] = []
    best = -1.0
    for p in ordered:
        if p.accuracy > best:
            frontier.append(p)
            best = p.accuracy
    return frontier


def candidate_thresholds(entropy: Tensor, max_candidates: int) -> list[float]:
    """Thresholds worth trying at one exit, ascending: 0 (nobody leaves) and one cut just
    above each distinct entropy (each admits one more group of samples), thinned to
    ``max_candidates`` evenly over the distribution when there are more.

    A cut sits midway to the next distinct entropy, computed in float32 as the engine
    compares, and never on an entropy itself (strict ``<`` would not admit it).
    """
    u = torch.unique(entropy.float())  # sorted
    above = torch.cat([u[1:], u[-1:] + 1.0])
    cuts = torch.maximum((u + above) / 2, torch.nextafter(u, torch.full_like(u, math.inf)))
    if cuts.numel() > max_candidates - 1:
        pick = torch.linspace(0, cuts.numel() - 1, max_candidates - 1).round().long().unique()
        cuts = cuts[pick]
    return [0.0, *cuts.tolist()]


def choose_thresholds(
    data: CalibrationData,
    exit_macs: Sequence[int],
    *,
    tolerance: float | None = 0.005,
    target: float | None = None,
    budget: int = 40_000,
) -> OperatingPoint:
    """The cheapest thresholds whose accuracy on ``data`` meets the constraint.

    Exactly one of ``tolerance`` (accuracy may fall at most this much, as a fraction,
    below the final exit's own accuracy; default 0.5 percentage points) and ``target``
    (absolute accuracy, a fraction) applies; ``target`` wins when given. Ties in cost go
    to the more accurate setting, then to the smaller thresholds. The search is exact
    over the samples' own entropy values when the candidates fit in ``budget`` settings
    and otherwise uses evenly spaced quantiles of them.

    Raises:
        ValueError: a bad constraint, or no setting reaches ``target``.
    """
    _check(data, exit_macs, [0.0] * (data.num_exits - 1))
    if target is None:
        if tolerance is None or not 0 <= tolerance <= 1 or math.isnan(tolerance):
            raise ValueError(f"tolerance must be a fraction in [0, 1]; got {tolerance}")
        final_acc = float(data.correct[:, -1].double().mean())
        goal = final_acc - tolerance
    else:
        if not 0 <= target <= 1 or math.isnan(target):
            raise ValueError(f"target accuracy must be a fraction in [0, 1]; got {target}")
        goal = target
    early = data.num_exits - 1
    if early == 0:
        point = evaluate_thresholds(data, exit_macs, [])
        if point.accuracy < goal - 1e-12:
            raise ValueError(f"accuracy {point.accuracy:.4f} is below the target {goal:.4f}")
        return point

    per_exit = max(2, int(budget ** (1.0 / early)))
    cands = [candidate_thresholds(data.entropy[:, i], per_exit) for i in range(early)]
    acc, shares, cost = evaluate_grid(data, exit_macs, cands)
    acc, shares, cost = acc.reshape(-1), shares.reshape(-1, data.num_exits), cost.reshape(-1)
    combos = torch.tensor(list(itertools.product(*cands)), dtype=torch.float64)
    feasible = acc >= goal - 1e-12
    if not feasible.any():
        raise ValueError(
            f"no thresholds reach accuracy {goal:.4f}; the best is {float(acc.max()):.4f}"
        )
    # lexicographic: cheapest, then most accurate, then smallest thresholds
    order = sorted(
        feasible.nonzero().squeeze(1).tolist(),
        key=lambda k: (round(float(cost[k]), 6), -float(acc[k]), combos[k].tolist()),
    )
    k = order[0]
    return _point(combos[k].tolist(), acc[k], shares[k], cost[k], exit_macs)


def _point(
    thresholds: Sequence[float],
    acc: Tensor,
    shares: Tensor,
    cost: Tensor,
    exit_macs: Sequence[int],
) -> OperatingPoint:
    return OperatingPoint(
        thresholds=tuple(float(t) for t in thresholds),
        accuracy=float(acc),
        exit_shares=tuple(float(s) for s in shares),
        expected_macs=float(cost),
        relative_cost=float(cost) / float(exit_macs[-1]),
    )


def _check(data: CalibrationData, exit_macs: Sequence[int], thresholds: Sequence[float]) -> None:
    if len(exit_macs) != data.num_exits:
        raise ValueError(f"need {data.num_exits} exit MAC counts; got {len(exit_macs)}")
    if len(thresholds) != data.num_exits - 1:
        raise ValueError(
            f"need {data.num_exits - 1} threshold(s) for {data.num_exits} exits; "
            f"got {len(thresholds)}"
        )
