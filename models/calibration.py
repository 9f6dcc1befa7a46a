"""Choosing exit thresholds from validation data, without re-running the model.

Calibration data are, for N validation samples and E exits, the entropy of every exit's
softmax, whether every exit's argmax is right and (since the risk-controlled choice)
every exit's argmax itself. Given thresholds, the exit each sample takes follows from the
entropies alone, so accuracy, exit shares, expected cost and risk of any setting can be
computed exactly and quickly.

Two ways to choose:

* :func:`choose_thresholds`: the cheapest setting whose accuracy *on the calibration
  data* stays within a tolerance of the final exit's (or above an absolute target). No
  statement about unseen data.
* :func:`certify_thresholds`: the cheapest setting whose risk (disagreement with the
  final exit, or accuracy drop against it) is certified at most ε with confidence 1 − δ
  on unseen data from the same distribution (Learn-then-Test with fixed-sequence testing
  and exact binomial p-values).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from models.exits import encode_thresholds, entropy_from_logits, leaves

# The threshold grid of the original BranchyNet experiments (per early exit).
ORIGINAL_GRID: tuple[float, ...] = (
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.075,
    0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 3.0, 5.0, 10.0,
)  # fmt: skip


@dataclass(frozen=True)
class CalibrationData:
    """Per-sample, per-exit entropy ``(N, E)`` float32, correctness ``(N, E)`` bool and
    predicted class ``(N, E)`` int64.

    ``prediction`` is optional: checkpoints written before it was collected have none, and
    then only the risks that need labels alone (accuracy, accuracy drop) can be computed.
    """

    entropy: Tensor
    correct: Tensor
    prediction: Tensor | None = None

    def __post_init__(self) -> None:
        if self.entropy.dim() != 2 or self.entropy.shape != self.correct.shape:
            raise ValueError(
                f"entropy and correct must both be (N, E); got {tuple(self.entropy.shape)} "
                f"and {tuple(self.correct.shape)}"
            )
        if self.prediction is not None and (
            self.prediction.shape != self.entropy.shape
            or self.prediction.dtype.is_floating_point
            or self.prediction.dtype == torch.bool
        ):
            raise ValueError(
                f"prediction must be an integer (N, E) tensor like entropy "
                f"{tuple(self.entropy.shape)}; got {self.prediction.dtype} "
                f"{tuple(self.prediction.shape)}"
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
        out: dict[str, object] = {
            "num_samples": self.num_samples,
            "num_exits": self.num_exits,
            "exit_accuracy": [round(a, 6) for a in self.correct.float().mean(0).tolist()],
            "has_predictions": self.prediction is not None,
        }
        if self.prediction is not None:
            agree = self.prediction == self.prediction[:, -1:]
            out["exit_agreement"] = [round(a, 6) for a in agree.float().mean(0).tolist()]
        return out

    def subset(self, index: Tensor) -> CalibrationData:
        """The samples at ``index`` (1-D int64), in that order."""
        return CalibrationData(
            self.entropy[index],
            self.correct[index],
            None if self.prediction is None else self.prediction[index],
        )


def _fields(obj: object, *, skip: tuple[str, ...] = ()) -> dict[str, object]:
    """A dataclass's fields by name, in order (shallow: values as they are)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj) if f.name not in skip}  # type: ignore[arg-type]


@torch.no_grad()
def exit_outputs(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Every exit's entropy and predicted class for one batch, nobody leaving early.

    Args:
        model: a :class:`~models.branchy.BranchyNet` (its ``forward`` gives every
            exit's logits).
        x: ``(B, C, H, W)`` normalised inputs on the model's device.

    Returns:
        ``(B, E)`` float32 entropies and ``(B, E)`` int64 predictions, on ``x``'s device.
    """
    outs = [z.float() for z in model(x)]
    entropy = torch.stack([entropy_from_logits(z) for z in outs], 1)
    prediction = torch.stack([z.argmax(1) for z in outs], 1)
    return entropy, prediction


def collect_calibration(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]
) -> CalibrationData:
    """Calibration data of ``model`` on labelled batches: the one way training,
    evaluation and benchmarks measure every exit.

    The model runs in eval mode (its mode is restored after), without autograd.

    Args:
        model: a :class:`~models.branchy.BranchyNet`.
        batches: ``(x, labels)`` pairs: ``(B, C, H, W)`` normalised inputs on the
            model's device and ``(B,)`` class indices (any device).

    Returns:
        The entropies, correctness and predictions of all batches, in order, on the CPU.
    """
    was_training = model.training
    model.eval()
    entropies, corrects, predictions = [], [], []
    try:
        for x, labels in batches:
            entropy, prediction = exit_outputs(model, x)
            entropies.append(entropy.cpu())
            predictions.append(prediction.cpu())
            corrects.append((prediction == labels.to(prediction.device)[:, None]).cpu())
    finally:
        model.train(was_training)
    return CalibrationData(torch.cat(entropies), torch.cat(corrects), torch.cat(predictions))


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
            **_fields(self),
            "thresholds": encode_thresholds(self.thresholds),
            "exit_shares": list(self.exit_shares),
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
    taken = torch.full(
        (thresholds.shape[0], entropy.shape[0]), e - 1, dtype=torch.int64, device=entropy.device
    )
    # from the last early exit back to the first, so the earliest exit that admits wins
    for i in range(e - 2, -1, -1):
        leave = leaves(entropy[None, :, i], thresholds[:, i : i + 1])  # (M, N)
        taken = torch.where(leave, torch.full_like(taken, i), taken)
    return taken


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


# ---------------------------------------------------------------------------- risk control
#
# Learn-then-Test (Angelopoulos, Bates, Candès, Jordan, Lei 2021) turns threshold choice
# into multiple testing. For each candidate setting λ the null hypothesis is
# "risk(λ) > ε"; an exact binomial tail gives a valid p-value from the number of losses
# among n calibration samples; fixed-sequence testing walks candidates from conservative
# to aggressive in an order fixed before the tested samples are looked at, rejecting
# while p ≤ δ and stopping at the first failure. That controls the family-wise error at
# δ without any correction for the number of candidates, so every rejected setting,
# and in particular the cheapest, has risk ≤ ε with probability ≥ 1 − δ.

RISKS: tuple[str, ...] = ("disagreement", "accuracy_drop")

# The fixed, data-independent path of a one-early-exit model: 0 (nobody leaves) and a
# geometric grid from 1e-6 to 20 nats (beyond ln C for any C below 4e8, so the last
# candidates let everybody leave), ascending, i.e. from conservative to aggressive.
SINGLE_EXIT_PATH: tuple[float, ...] = tuple(
    [0.0, *torch.logspace(-6, math.log10(20.0), 2000, dtype=torch.float64).tolist()]
)


class NotCertifiable(ValueError):
    """No setting that lets any sample leave early could be certified (e.g. too few
    calibration samples for that ε and δ)."""


@dataclass(frozen=True)
class CertifiedPoint:
    """A risk-controlled choice and the evidence behind it.

    Attributes:
        point: what the thresholds do on all the calibration data.
        risk: ``disagreement`` or ``accuracy_drop``.
        epsilon: the risk budget ε.
        delta: the allowed error probability δ (confidence ``1 - delta``).
        bound: Clopper–Pearson upper confidence bound, at level ``1 - delta``, of the
            chosen setting's risk from the tested samples (≤ ε by construction).
        empirical_risk: the chosen setting's loss rate on the tested samples.
        p_value: its binomial p-value for "risk > ε" (≤ δ).
        tested_samples: calibration samples used for testing (the rest chose the path).
        path_samples: calibration samples used to choose the path (0 for one early exit).
        candidates: settings on the path; ``passed`` of them were certified in sequence.
    """

    point: OperatingPoint
    risk: str
    epsilon: float
    delta: float
    bound: float
    empirical_risk: float
    p_value: float
    tested_samples: int
    path_samples: int
    candidates: int
    passed: int

    def to_json(self) -> dict[str, object]:
        out = {**self.point.to_json(), **_fields(self, skip=("point", "delta", "bound"))}
        # in JSON: the confidence 1 - delta, and the bound named for what it bounds
        return {**out, "confidence": 1.0 - self.delta, "certified_bound": self.bound}

    def describe(self) -> str:
        return (
            f"{self.point.describe()}; {self.risk} {100 * self.empirical_risk:.2f}% on "
            f"{self.tested_samples} samples, certified <= {100 * self.bound:.2f}% "
            f"(budget {100 * self.epsilon:.2f}%) with confidence {1 - self.delta:.3f}"
        )


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, p)``, summed exactly in log space."""
    if n < 0 or k < 0:
        raise ValueError(f"need n >= 0 and k >= 0; got n={n}, k={k}")
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    base = math.lgamma(n + 1)
    terms = [
        base - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * lp + (n - j) * lq
        for j in range(k + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


def binomial_p_value(losses: int, n: int, epsilon: float) -> float:
    """Exact p-value of the null "risk > ε" after ``losses`` in ``n`` samples.

    Under the null (risk exactly ε at worst), few losses are unlikely:
    ``P(Binomial(n, ε) <= losses)``. Valid for a {0, 1} loss of i.i.d. samples.
    """
    return binomial_cdf(losses, n, epsilon)


@functools.lru_cache(maxsize=65536)
def binomial_upper_bound(losses: int, n: int, delta: float) -> float:
    """Clopper–Pearson upper bound: the largest rate ``p`` with
    ``P(Binomial(n, p) <= losses) >= delta`` (one-sided, level ``1 - delta``).

    A setting's p-value is ≤ δ exactly when this bound is ≤ ε. Memoised: the shadow
    monitor asks again after every re-run batch, mostly for the same ``(losses, n)``
    of a full window, and one bisection costs milliseconds of GIL time at ``n`` in the
    thousands (which the request path pays).
    """
    if n <= 0:
        return 1.0
    if losses >= n:
        return 1.0
    lo, hi = losses / n, 1.0
    for _ in range(100):  # bisection to ~1e-30: the CDF decreases in p
        mid = (lo + hi) / 2
        if binomial_cdf(losses, n, mid) >= delta:
            lo = mid
        else:
            hi = mid
    return lo


def exit_losses(data: CalibrationData, risk: str) -> Tensor:
    """``(N, E)`` bool: the loss a sample incurs if it leaves at each exit (0 at the last).

    ``disagreement``: that exit's predicted class differs from the final exit's (needs
    ``data.prediction``; no labels). ``accuracy_drop``: the final exit is right and that
    exit is wrong. The mean of the second bounds the accuracy drop from above (the drop
    also subtracts samples an early exit gets right and the final exit wrong), so a
    certificate on it is a certificate on the drop.

    Raises:
        ValueError: unknown risk, or ``disagreement`` without predictions.
    """
    if risk == "disagreement":
        if data.prediction is None:
            raise ValueError(
                "the calibration data hold no per-exit predictions (a checkpoint written "
                "before they were collected); the disagreement risk needs them: re-collect "
                "them with `python -m training.calibrate --checkpoint DIR --recollect`, "
                "or use the accuracy_drop risk"
            )
        return data.prediction != data.prediction[:, -1:]
    if risk == "accuracy_drop":
        return data.correct[:, -1:] & ~data.correct
    raise ValueError(f"unknown risk {risk!r}; known: {', '.join(RISKS)}")


def risk_of(data: CalibrationData, thresholds: Sequence[float], risk: str) -> float:
    """The loss rate of one setting on ``data`` (e.g. a test split's)."""
    _check(data, [1] * data.num_exits, thresholds)
    taken = exits_taken(data.entropy, torch.tensor([list(thresholds)], dtype=torch.float32))[0]
    loss = exit_losses(data, risk).gather(1, taken[:, None])[:, 0]
    return float(loss.double().mean())


def _loss_grid(
    data: CalibrationData, exit_macs: Sequence[int], risk: str, budget: int
) -> tuple[Tensor, Tensor, list[tuple[float, ...]]]:
    """Loss rate and expected MACs of every setting of the exact candidate grid (about
    ``budget`` settings), flat, with the settings in the same (product) order."""
    early = data.num_exits - 1
    per_exit = max(2, int(budget ** (1.0 / early)))
    cands = [candidate_thresholds(data.entropy[:, i], per_exit) for i in range(early)]
    # evaluate_grid sums ``correct`` over the samples at the exit each takes: with the
    # loss matrix in its place it sums the losses
    as_loss = CalibrationData(data.entropy, exit_losses(data, risk))
    loss, _, cost = evaluate_grid(as_loss, exit_macs, cands)
    return loss.reshape(-1), cost.reshape(-1), list(itertools.product(*cands))


def risk_path(
    data: CalibrationData, exit_macs: Sequence[int], risk: str, *, budget: int = 40_000
) -> list[tuple[float, ...]]:
    """Candidate settings from conservative to aggressive, chosen on ``data``.

    The Pareto frontier of (empirical risk, expected cost) over the same exact grid as
    :func:`choose_thresholds`: settings sorted by risk, each strictly cheaper than every
    less risky one. Starts at all-zero thresholds (nobody leaves early).
    """
    loss, cost, combos = _loss_grid(data, exit_macs, risk, budget)
    # sort by risk, then cost (stable sorts, last key first); keep each setting strictly
    # cheaper than every less risky one
    order = torch.sort(cost, stable=True).indices
    order = order[torch.sort(loss[order], stable=True).indices]
    sorted_cost = cost[order]
    best_before = torch.cat(
        [torch.tensor([math.inf], dtype=torch.float64), sorted_cost.cummin(0).values[:-1]]
    )
    keep = order[sorted_cost < best_before - 1e-9].tolist()
    path: list[tuple[float, ...]] = [tuple(float(t) for t in combos[k]) for k in keep]
    return path


def cheapest_within_risk(
    data: CalibrationData,
    exit_macs: Sequence[int],
    *,
    risk: str,
    epsilon: float,
    budget: int = 40_000,
) -> tuple[OperatingPoint, float]:
    """The cheapest setting whose loss rate *on ``data``* is at most ``epsilon``, and
    that rate. No guarantee on other data: this is the plug-in choice (and, on a test
    split, the oracle that :func:`certify_thresholds` is compared with).
    """
    _check(data, exit_macs, [0.0] * (data.num_exits - 1))
    early = data.num_exits - 1
    if early == 0:
        return evaluate_thresholds(data, exit_macs, []), 0.0
    loss, cost, combos = _loss_grid(data, exit_macs, risk, budget)
    # cheapest, then least risky, then the smallest thresholds (product order) among the
    # settings within the budget (all-zero always is)
    ok = (loss <= epsilon + 1e-12).nonzero().squeeze(1)
    rounded = (cost[ok] * 1e6).round()
    order = torch.sort(loss[ok], stable=True).indices
    order = order[torch.sort(rounded[order], stable=True).indices]
    k = int(ok[order[0]])
    return evaluate_thresholds(data, exit_macs, combos[k]), float(loss[k])


def path_losses(data: CalibrationData, path: Sequence[Sequence[float]], *, risk: str) -> list[int]:
    """Loss count on ``data`` of every setting on ``path``."""
    if not path:
        return []
    losses_at = exit_losses(data, risk)
    early = data.num_exits - 1
    if early == 1:
        # one early exit: with thresholds sorted, one exact grid pass counts them all
        values = [float(t[0]) for t in path]
        grid = sorted(set(values))
        as_loss = CalibrationData(data.entropy, losses_at)
        rate = evaluate_grid(as_loss, [1] * data.num_exits, [grid])[0]
        counts = (rate * data.num_samples).round().long().tolist()
        at = dict(zip(grid, counts, strict=True))
        return [int(at[v]) for v in values]
    out: list[int] = []
    for start in range(0, len(path), 256):
        chunk = torch.tensor([list(t) for t in path[start : start + 256]], dtype=torch.float32)
        taken = exits_taken(data.entropy, chunk.reshape(-1, early))  # (m, N)
        out.extend(int(c) for c in losses_at.gather(1, taken.T).sum(0).tolist())
    return out


def fixed_sequence_test(
    data: CalibrationData,
    path: Sequence[Sequence[float]],
    *,
    risk: str,
    epsilon: float,
    delta: float,
) -> tuple[int, list[int]]:
    """Test ``path`` in order on ``data``: how many settings passed before the first
    failure, and every setting's loss count."""
    counts = path_losses(data, path, risk=risk)
    passed = 0
    for c in counts:
        if binomial_p_value(c, data.num_samples, epsilon) > delta:
            break
        passed += 1
    return passed, counts


def _path_shares(data: CalibrationData, path: Sequence[Sequence[float]]) -> list[list[float]]:
    """Exit shares of every setting on ``path`` (fast for one early exit)."""
    early = data.num_exits - 1
    if early == 1:
        values = [float(t[0]) for t in path]
        grid = sorted(set(values))
        share = evaluate_grid(data, [1] * data.num_exits, [grid])[1]
        at = dict(zip(grid, share.tolist(), strict=True))
        return [at[v] for v in values]
    out: list[list[float]] = []
    for start in range(0, len(path), 256):
        chunk = torch.tensor([list(t) for t in path[start : start + 256]], dtype=torch.float32)
        taken = exits_taken(data.entropy, chunk.reshape(-1, early))
        counts = torch.nn.functional.one_hot(taken, data.num_exits).double().mean(1)
        out.extend(counts.tolist())
    return out


def certify_thresholds(
    data: CalibrationData,
    exit_macs: Sequence[int],
    *,
    risk: str = "disagreement",
    epsilon: float,
    delta: float,
    path_fraction: float = 0.3,
    seed: int = 0,
    path: Sequence[Sequence[float]] | None = None,
    budget: int = 40_000,
    bounds: Sequence[tuple[float, float]] | None = None,
) -> CertifiedPoint:
    """The cheapest thresholds whose risk is certified ≤ ``epsilon`` with confidence
    ``1 - delta``.

    **Guarantee.** If the tested calibration samples and the samples served later are
    independent draws from one distribution (exchangeable), then with probability at
    least ``1 - delta`` over the calibration sample, the returned thresholds' risk on
    served samples (the expected loss rate) is at most ``epsilon``. The risk is
    ``disagreement`` (the answer differs from the one the final exit would give;
    label-free) or ``accuracy_drop`` (accuracy lost against always running to the final
    exit, bounded by the share the final exit gets right and the early exit wrong). It
    is a statement about the long-run rate, not about any one batch or window, and says
    nothing once traffic drifts away from the calibration distribution (watch it with the
    server's shadow monitoring).

    **Procedure** (Learn-then-Test with fixed-sequence testing). The candidate settings
    form a path from conservative to aggressive, fixed before the tested samples are
    seen: for one early exit, the data-independent grid :data:`SINGLE_EXIT_PATH`
    (ascending thresholds; every calibration sample tests); for more, the Pareto
    frontier of (risk, cost) on a seeded ``path_fraction`` of the samples
    (:func:`risk_path`, "Pareto testing"), the other samples testing. Each setting's
    null "risk > ε" gets the exact binomial p-value ``P(Binomial(n, ε) <= losses)``;
    the walk certifies settings while ``p <= delta`` and stops at the first failure.
    Of the certified settings the one with the lowest expected cost on all the
    calibration data is returned. The all-zero setting (nobody leaves early) has risk 0
    by definition and does not count as certified.

    Args:
        data: calibration samples (the validation split, or a shadow window).
        exit_macs: MACs to reach and evaluate each exit (the cost).
        risk: ``disagreement`` or ``accuracy_drop``.
        epsilon: the risk budget, in (0, 1).
        delta: the error probability, in (0, 1); confidence is ``1 - delta``.
        path_fraction: share of the samples that choose the path (more than one early
            exit only), in (0, 1).
        seed: seeds the split between path and test samples.
        path: an explicit candidate sequence instead (then every sample tests); it must
            not depend on ``data``.
        budget: settings of the grid the path is chosen from (more than one early exit).
        bounds: ``(low, high)`` per early exit: every candidate is clipped into this box
            before testing (a bounded step from the thresholds in force; the clipping is
            fixed before the tested samples are seen, so the guarantee is unchanged).

    Raises:
        NotCertifiable: not even the first setting that lets samples leave early passes.
        ValueError: bad ε, δ, fraction or risk; ``disagreement`` without predictions.
    """
    for label, v in (("epsilon", epsilon), ("delta", delta), ("path_fraction", path_fraction)):
        if not isinstance(v, int | float) or math.isnan(v) or not 0 < v < 1:
            raise ValueError(f"{label} must be in (0, 1); got {v!r}")
    _check(data, exit_macs, [0.0] * (data.num_exits - 1))
    exit_losses(data, risk)  # fail early on a risk the data cannot support
    early = data.num_exits - 1
    if early == 0:
        raise NotCertifiable("a model with one exit has no early exit to certify")
    test, path_n = data, 0
    if path is not None:
        candidates = [tuple(float(t) for t in p) for p in path]
        for c in candidates:
            _check(data, exit_macs, c)
    elif early == 1:
        candidates = [(t,) for t in SINGLE_EXIT_PATH]
    else:
        perm = torch.randperm(data.num_samples, generator=torch.Generator().manual_seed(seed))
        path_n = round(path_fraction * data.num_samples)
        if path_n < 1 or path_n >= data.num_samples:
            raise NotCertifiable(
                f"{data.num_samples} calibration sample(s) cannot be split into path and test "
                "samples"
            )
        candidates = risk_path(data.subset(perm[:path_n]), exit_macs, risk, budget=budget)
        test = data.subset(perm[path_n:])
    if bounds is not None:
        if len(bounds) != early:
            raise ValueError(f"need {early} (low, high) bound(s); got {len(bounds)}")
        clipped = [
            tuple(min(max(t, lo), hi) for t, (lo, hi) in zip(c, bounds, strict=True))
            for c in candidates
        ]
        candidates = [c for k, c in enumerate(clipped) if k == 0 or c != clipped[k - 1]]
    # the trivial start (all zero: nobody leaves early, risk 0) is not a certificate
    candidates = [c for c in candidates if any(t > 0 for t in c)]
    passed, counts = fixed_sequence_test(test, candidates, risk=risk, epsilon=epsilon, delta=delta)
    n = test.num_samples
    if passed == 0:
        need = math.ceil(math.log(delta) / math.log1p(-epsilon))
        raise NotCertifiable(
            f"no thresholds can be certified: {risk} <= {epsilon:g} with confidence "
            f"{1 - delta:g} needs at least {need} tested samples even with no loss at all; "
            f"{n} were tested" + (f" and the first candidate lost {counts[0]}" if counts else "")
        )
    # cheapest on all calibration data; ties to the more conservative (earlier) setting
    macs = torch.tensor([float(m) for m in exit_macs], dtype=torch.float64)
    cost = [
        float(torch.tensor(shares, dtype=torch.float64) @ macs)
        for shares in _path_shares(data, candidates[:passed])
    ]
    k = min(range(passed), key=lambda j: (round(cost[j], 6), j))
    return CertifiedPoint(
        point=evaluate_thresholds(data, exit_macs, candidates[k]),
        risk=risk,
        epsilon=float(epsilon),
        delta=float(delta),
        bound=binomial_upper_bound(counts[k], n, delta),
        empirical_risk=counts[k] / n,
        p_value=binomial_p_value(counts[k], n, epsilon),
        tested_samples=n,
        path_samples=path_n,
        candidates=len(candidates),
        passed=passed,
    )
