"""Risk-controlled threshold choice (Learn-then-Test): the binomial pieces against brute
force, and the guarantee itself over many calibration draws of a known distribution."""

from __future__ import annotations

import math

import pytest
import torch

import models
from models.calibration import (
    SINGLE_EXIT_PATH,
    binomial_cdf,
    binomial_upper_bound,
    cheapest_within_risk,
    exit_losses,
    risk_of,
)


def test_binomial_cdf_matches_the_sum_of_the_probability_mass() -> None:
    for n, p in ((10, 0.3), (200, 0.01), (1000, 0.5)):
        for k in (0, 1, n // 10, n // 2, n - 1):
            want = sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k + 1))
            assert binomial_cdf(k, n, p) == pytest.approx(want, rel=1e-9, abs=1e-300)
    assert binomial_cdf(5, 5, 0.7) == 1.0 and binomial_cdf(0, 10, 0.0) == 1.0


def test_clopper_pearson_bound_is_where_the_tail_reaches_delta() -> None:
    # zero losses in n: the bound solves (1 - p)^n = delta
    assert binomial_upper_bound(0, 299, 0.05) == pytest.approx(1 - 0.05 ** (1 / 299), rel=1e-9)
    for k, n in ((3, 100), (40, 5000)):
        b = binomial_upper_bound(k, n, 0.05)
        assert binomial_cdf(k, n, b) == pytest.approx(0.05, rel=1e-6)
        assert b > k / n
    assert binomial_upper_bound(7, 7, 0.05) == 1.0


# ---------------------------------------------------------------- a known distribution
#
# A sample's difficulty u ~ U(0, 1) and a second latent w ~ U(0, 1) fix its entropies:
# exit 0: 2.3 u, exit 1: 2.3 u w, the last exit: 0.1. Leaving at exit i it disagrees
# with the final exit with probability p_i(u), a logistic in u. So the true risk of any
# setting is an integral over (u, w), computed on a fine grid.

P0 = (12.0, 0.35)  # slope and midpoint of exit 0's disagreement probability
P1 = (12.0, 0.55)


def _p(u: torch.Tensor, slope_mid: tuple[float, float]) -> torch.Tensor:
    slope, mid = slope_mid
    return torch.sigmoid(slope * (u - mid))


def draw(n: int, exits: int, gen: torch.Generator) -> models.CalibrationData:
    u, w = torch.rand(n, generator=gen), torch.rand(n, generator=gen)
    ent = [2.3 * u, 2.3 * u * w] if exits == 3 else [2.3 * u]
    probs = [_p(u, P0), _p(u, P1)][: exits - 1]
    entropy = torch.stack([*ent, torch.full_like(u, 0.1)], 1)
    disagree = torch.stack([torch.rand(n, generator=gen) < p for p in probs], 1)
    pred = torch.cat([disagree.long(), torch.zeros(n, 1, dtype=torch.long)], 1)
    return models.CalibrationData(entropy.float(), pred == 0, pred)


def true_risk(thresholds: tuple[float, ...], exits: int) -> float:
    # a midpoint grid over u (and w for three exits): exact to ~1e-5 for these smooth p_i
    if exits == 2:
        u = (torch.arange(20_000, dtype=torch.float64) + 0.5) / 20_000
        return float(torch.where(2.3 * u < thresholds[0], _p(u, P0), 0.0).mean())
    grid = 300
    g = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    u, w = g[:, None].expand(grid, grid).reshape(-1), g[None, :].expand(grid, grid).reshape(-1)
    leave0 = 2.3 * u < thresholds[0]
    leave1 = ~leave0 & (2.3 * u * w < thresholds[1])
    p = torch.where(leave0, _p(u, P0), torch.where(leave1, _p(u, P1), 0.0))
    return float(p.mean())


MACS3, MACS2 = [10, 30, 100], [10, 100]


@pytest.mark.parametrize(("exits", "trials", "n"), [(2, 100, 1500), (3, 30, 2000)])
def test_certified_thresholds_exceed_the_budget_in_at_most_delta_of_calibration_draws(
    exits: int, trials: int, n: int
) -> None:
    eps, delta = 0.05, 0.1
    macs = MACS2 if exits == 2 else MACS3
    gen = torch.Generator().manual_seed(1234 + exits)
    certified_bad = plug_in_bad = 0
    for _ in range(trials):
        data = draw(n, exits, gen)
        seed = int(torch.randint(0, 2**31, (1,), generator=gen))
        cert = models.certify_thresholds(
            data, macs, epsilon=eps, delta=delta, seed=seed, budget=2500
        )
        assert cert.bound <= eps and cert.p_value <= delta
        certified_bad += true_risk(cert.point.thresholds, exits) > eps
        plug, _ = cheapest_within_risk(data, macs, risk="disagreement", epsilon=eps, budget=2500)
        plug_in_bad += true_risk(plug.thresholds, exits) > eps
    # The guarantee: P(violation) <= delta. With `trials` independent draws the count of
    # violations is at most Binomial(trials, delta); allow its 99.9 % quantile.
    allowed = next(k for k in range(trials + 1) if binomial_cdf(k, trials, delta) >= 0.999)
    assert certified_bad <= allowed, (certified_bad, trials)
    # ... and the check has teeth: the plug-in choice on the same draws (cheapest with
    # empirical risk <= eps) breaks the budget about half the time
    assert plug_in_bad >= 0.3 * trials, (plug_in_bad, trials)


@pytest.mark.slow
def test_guarantee_over_many_draws_of_three_exits() -> None:
    eps, delta, trials = 0.03, 0.05, 300
    gen = torch.Generator().manual_seed(99)
    bad = 0
    for _ in range(trials):
        cert = models.certify_thresholds(draw(3000, 3, gen), MACS3, epsilon=eps, delta=delta)
        bad += true_risk(cert.point.thresholds, 3) > eps
    allowed = next(k for k in range(trials + 1) if binomial_cdf(k, trials, delta) >= 0.999)
    assert bad <= allowed


def test_certified_choice_is_cheap_when_data_are_plentiful() -> None:
    # with 20k samples the bound is tight: the certified cost is close to the true optimum
    gen = torch.Generator().manual_seed(5)
    cert = models.certify_thresholds(draw(20_000, 2, gen), MACS2, epsilon=0.05, delta=0.05)
    best = max(t for t in SINGLE_EXIT_PATH if true_risk((t,), 2) <= 0.05)
    assert true_risk(cert.point.thresholds, 2) <= 0.05
    assert cert.point.thresholds[0] >= 0.9 * best


def test_accuracy_drop_risk_bounds_the_measured_drop() -> None:
    gen = torch.Generator().manual_seed(3)
    data = draw(5000, 3, gen)
    # labels: the final exit is right on 90 %; an early exit that disagrees is wrong
    right_final = torch.rand(5000, generator=gen) < 0.9
    correct = (data.prediction == 0) & right_final[:, None]
    labelled = models.CalibrationData(data.entropy, correct, data.prediction)
    cert = models.certify_thresholds(
        labelled, MACS3, risk="accuracy_drop", epsilon=0.02, delta=0.05
    )
    drop = float(correct[:, -1].double().mean()) - cert.point.accuracy
    # on the same samples, the loss rate (final right, early wrong) bounds the drop
    harm = risk_of(labelled, cert.point.thresholds, "accuracy_drop")
    assert 0 < drop <= harm + 1e-12
    assert cert.empirical_risk <= cert.bound <= 0.02 and cert.p_value <= 0.05


def test_too_few_samples_cannot_certify_anything() -> None:
    gen = torch.Generator().manual_seed(0)
    # zero losses in n samples certify eps only when (1 - eps)^n <= delta: n >= 299 here
    with pytest.raises(models.NotCertifiable, match="at least 299 tested samples"):
        models.certify_thresholds(draw(250, 2, gen), MACS2, epsilon=0.01, delta=0.05)
    cert = models.certify_thresholds(draw(400, 2, gen), MACS2, epsilon=0.01, delta=0.05)
    assert cert.tested_samples == 400 and cert.bound <= 0.01


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epsilon": 0.0, "delta": 0.05}, "epsilon"),
        ({"epsilon": 1.0, "delta": 0.05}, "epsilon"),
        ({"epsilon": 0.01, "delta": float("nan")}, "delta"),
        ({"epsilon": 0.01, "delta": 0.05, "risk": "loss"}, "unknown risk"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict, match: str) -> None:
    data = draw(500, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=match):
        models.certify_thresholds(data, MACS2, **kwargs)


def test_disagreement_needs_predictions_and_says_how_to_get_them() -> None:
    data = draw(500, 2, torch.Generator().manual_seed(0))
    old = models.CalibrationData(data.entropy, data.correct)  # an old checkpoint's data
    with pytest.raises(ValueError, match="--recollect"):
        models.certify_thresholds(old, MACS2, epsilon=0.05, delta=0.05)
    # accuracy drop needs only the labels
    models.certify_thresholds(old, MACS2, risk="accuracy_drop", epsilon=0.05, delta=0.05)


def test_an_explicit_path_is_tested_in_order_and_stops_at_the_first_failure() -> None:
    data = draw(3000, 2, torch.Generator().manual_seed(8))
    path = [(0.1,), (0.2,), (5.0,), (0.3,)]  # the third lets everyone leave: fails
    cert = models.certify_thresholds(data, MACS2, epsilon=0.05, delta=0.05, path=path)
    assert cert.passed == 2 and cert.candidates == 4
    assert cert.point.thresholds == (0.2,)
    losses = exit_losses(data, "disagreement")
    assert cert.empirical_risk == pytest.approx(risk_of(data, (0.2,), "disagreement"))
    assert losses[:, -1].sum() == 0
