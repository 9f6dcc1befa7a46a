"""Threshold choice from validation entropies, checked on hand-made cases."""

import itertools
import math

import pytest
import torch

import models
from models.calibration import candidate_thresholds, evaluate_grid, evaluate_many

MACS = [10, 30, 100]


def data(rows: list[tuple[float, float, float, int, int, int]]) -> models.CalibrationData:
    t = torch.tensor(rows, dtype=torch.float32)
    return models.CalibrationData(entropy=t[:, :3], correct=t[:, 3:].bool())


# Six samples. Exit 0 is right on the four confident ones, exit 1 on five, the last on all.
CASE = data(
    [
        (0.1, 0.1, 0.1, 1, 1, 1),
        (0.2, 0.1, 0.1, 1, 1, 1),
        (0.3, 0.2, 0.1, 1, 1, 1),
        (0.4, 0.2, 0.1, 1, 1, 1),
        (1.5, 0.3, 0.1, 0, 1, 1),
        (2.0, 1.2, 0.1, 0, 0, 1),
    ]
)


def brute_force(d: models.CalibrationData, goal: float) -> tuple[float, float]:
    """Cheapest cost reachable with accuracy >= goal, over a dense threshold grid."""
    grid = [0.0, *[x / 20 for x in range(1, 60)], math.inf]
    best = (math.inf, 0.0)
    for t in itertools.product(grid, repeat=2):
        p = models.evaluate_thresholds(d, MACS, list(t))
        if p.accuracy >= goal - 1e-12 and (p.expected_macs, -p.accuracy) < (best[0], -best[1]):
            best = (p.expected_macs, p.accuracy)
    return best


def test_exact_accuracy_and_cost_of_a_setting() -> None:
    p = models.evaluate_thresholds(CASE, MACS, [0.35, 0.25])
    # samples 0-2 leave at exit 0, sample 3 (0.4 >= 0.35) at exit 1 (0.2 < 0.25),
    # samples 4, 5 at the last exit
    assert p.exit_shares == pytest.approx((3 / 6, 1 / 6, 2 / 6))
    assert p.accuracy == 1.0
    assert p.expected_macs == pytest.approx((3 * 10 + 30 + 2 * 100) / 6)
    assert p.relative_cost == pytest.approx(p.expected_macs / 100)


def test_zero_tolerance_picks_cheapest_lossless_setting() -> None:
    p = models.choose_thresholds(CASE, MACS, tolerance=0.0)
    assert p.accuracy == 1.0
    # best possible: 4 leave at exit 0, sample 4 at exit 1 (0.3), sample 5 at the end
    assert p.exit_shares == pytest.approx((4 / 6, 1 / 6, 1 / 6))
    assert p.expected_macs == pytest.approx(brute_force(CASE, 1.0)[0])
    # thresholds sit between entropies, not on them
    assert 0.4 < p.thresholds[0] < 1.5 and 0.3 < p.thresholds[1] < 1.2


def test_tolerance_allows_cheaper_setting() -> None:
    p = models.choose_thresholds(CASE, MACS, tolerance=0.2)  # 1/6 error allowed
    assert p.accuracy == pytest.approx(5 / 6)
    assert p.expected_macs == pytest.approx(brute_force(CASE, 1 - 0.2)[0])
    assert p.expected_macs < models.choose_thresholds(CASE, MACS, tolerance=0.0).expected_macs


def test_absolute_target_and_unreachable_target() -> None:
    p = models.choose_thresholds(CASE, MACS, target=0.5)
    assert p.accuracy >= 0.5
    assert p.expected_macs == pytest.approx(brute_force(CASE, 0.5)[0])
    d = data([(0.1, 0.1, 0.1, 0, 0, 0), (0.1, 0.1, 0.1, 1, 1, 1)])
    with pytest.raises(ValueError, match="no thresholds reach"):
        models.choose_thresholds(d, MACS, target=0.9)
    with pytest.raises(ValueError, match="fraction"):
        models.choose_thresholds(d, MACS, tolerance=5.0)


def test_random_case_matches_brute_force() -> None:
    torch.manual_seed(3)
    n = 40
    e = torch.rand(n, 3) * 2
    # confident samples are more often right
    correct = torch.rand(n, 3) > e / 2.5
    correct[:, 2] = torch.rand(n) > 0.1
    d = models.CalibrationData(entropy=e, correct=correct)
    p = models.choose_thresholds(d, MACS, tolerance=0.05)
    goal = float(correct[:, 2].float().mean()) - 0.05
    # exhaustive over every cut between this data's own entropies
    c0 = candidate_thresholds(e[:, 0], 10_000)
    c1 = candidate_thresholds(e[:, 1], 10_000)
    combos = torch.tensor(list(itertools.product(c0, c1)))
    acc, _, cost = evaluate_many(d, MACS, combos)
    best = float(cost[acc >= goal - 1e-12].min())
    assert p.accuracy >= goal - 1e-12
    assert p.expected_macs == pytest.approx(best)


def test_single_exit_model() -> None:
    d = models.CalibrationData(entropy=torch.rand(5, 1), correct=torch.ones(5, 1).bool())
    p = models.choose_thresholds(d, [7])
    assert p.thresholds == () and p.exit_shares == (1.0,) and p.expected_macs == 7


def test_sweep_and_frontier() -> None:
    points = models.sweep(CASE, MACS, grid=[0.0, 0.25, 0.5, 5.0])
    assert len(points) == 16
    frontier = models.pareto_frontier(points)
    costs = [p.expected_macs for p in frontier]
    accs = [p.accuracy for p in frontier]
    assert costs == sorted(costs) and accs == sorted(accs)
    for f in frontier:  # no setting is as cheap and more accurate
        assert not any(
            q.expected_macs <= f.expected_macs and q.accuracy > f.accuracy for q in points
        )
    # and every point off the frontier is dominated by one on it
    for p in points:
        assert any(
            f.expected_macs <= p.expected_macs and f.accuracy >= p.accuracy for f in frontier
        )


def test_calibration_data_validation() -> None:
    with pytest.raises(ValueError, match="\\(N, E\\)"):
        models.CalibrationData(entropy=torch.zeros(3, 2), correct=torch.zeros(3, 3).bool())
    with pytest.raises(ValueError, match="finite"):
        models.CalibrationData(
            entropy=torch.tensor([[math.nan, 0.0]]), correct=torch.zeros(1, 2).bool()
        )


@pytest.mark.parametrize("exits", [2, 3, 4])
def test_grid_evaluation_equals_per_setting_evaluation(exits: int) -> None:
    """The histogram shortcut of evaluate_grid against evaluating each setting on every
    sample, with entropies that sit exactly on grid values (ties must not leave)."""
    torch.manual_seed(exits)
    grid = [0.0, 0.25, 0.5, 1.0, 2.0]
    e = torch.tensor(grid)[torch.randint(0, 5, (300, exits))] + (torch.rand(300, exits) < 0.5) * 0.1
    d = models.CalibrationData(entropy=e, correct=torch.rand(300, exits) > 0.4)
    macs = [10 * (i + 1) for i in range(exits)]
    acc, shares, cost = evaluate_grid(d, macs, [grid] * (exits - 1))
    combos = torch.tensor(list(itertools.product(grid, repeat=exits - 1))).reshape(-1, exits - 1)
    acc2, shares2, cost2 = evaluate_many(d, macs, combos)
    torch.testing.assert_close(acc.reshape(-1), acc2)
    torch.testing.assert_close(shares.reshape(-1, exits), shares2)
    torch.testing.assert_close(cost.reshape(-1), cost2)


def test_choice_is_fast_and_small_for_three_exits() -> None:
    # 5,000 validation samples, 3 exits: the search over 40,000 settings must not
    # materialise settings x samples (it once peaked at ~9 GB).
    d = models.CalibrationData(entropy=torch.rand(5000, 3) * 2, correct=torch.rand(5000, 3) > 0.3)
    p = models.choose_thresholds(d, MACS)
    again = models.evaluate_thresholds(d, MACS, list(p.thresholds))
    assert again.accuracy == pytest.approx(p.accuracy)
    assert again.expected_macs == pytest.approx(p.expected_macs)


def test_operating_point_describes_itself_in_one_line() -> None:
    point = models.OperatingPoint((0.25, math.inf), 0.8, (0.5, 0.3, 0.2), 10.0, 0.5)
    assert point.describe() == (
        "thresholds [0.25, inf], accuracy 80.00%, exit shares [50.0, 30.0, 20.0], "
        "relative cost 0.500"
    )
