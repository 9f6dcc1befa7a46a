"""benchmarks/shadow_cost.py: its paired statistics, and a short run on real servers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import shadow_cost

ROOT = Path(__file__).resolve().parents[2]


def test_sign_test_and_bootstrap_interval() -> None:
    assert shadow_cost.sign_test(10, 20) == 1.0
    assert shadow_cost.sign_test(0, 10) == pytest.approx(2 / 1024)
    assert shadow_cost.sign_test(10, 10) == pytest.approx(2 / 1024)
    assert shadow_cost.sign_test(3, 0) == 1.0
    # ratios all near 0.9: the cost is 10 %, and its interval is tight around it
    ratios = [0.89, 0.9, 0.91, 0.9, 0.88, 0.92, 0.9, 0.9, 0.89, 0.91]
    c = shadow_cost.paired_cost([100 * r for r in ratios], [100.0] * len(ratios), seed=0)
    assert c["cost"] == pytest.approx(0.1)
    lo, hi = c["cost_ci95"]
    assert 0.08 <= lo <= 0.1 <= hi <= 0.12
    assert c["rounds_slower"] == 10 and c["sign_test_p"] < 0.01
    # no difference: an interval around 0 and no significant sign test
    same = shadow_cost.paired_cost([99.0, 101.0] * 5, [100.0] * 10, seed=0)
    assert same["cost_ci95"][0] <= 0 <= same["cost_ci95"][1]
    assert same["sign_test_p"] == 1.0


def test_short_run_reports_paired_rounds_and_adding_up_counters(tmp_path: Path) -> None:
    args = shadow_cost.get_args_parser().parse_args(
        ["--model", str(ROOT / "zoo" / "b-lenet"), "--rate", "1", "--no-upper",
         "--rounds", "2", "--seconds", "0.5", "--concurrency", "2",
         "--out", str(tmp_path / "cost.json")]
    )  # fmt: skip
    report = shadow_cost.main(args)
    on = report["servers"]["on"]
    assert len(on["ratios"]) == 2 == len(report["images_per_s"]["off"])
    assert on["ratios"][0] == pytest.approx(
        report["images_per_s"]["on"][0] / report["images_per_s"]["off"][0]
    )
    # rate 1: every early exit it served was shadowed or dropped (shadows still queued
    # at shutdown are counted as dropped only after the metrics were read)
    assert 0 < on["shadows_run"] + on["shadows_dropped"] <= on["early_exits_served"]
    assert json.loads((tmp_path / "cost.json").read_text())["servers"]["on"]["rate"] == 1.0
