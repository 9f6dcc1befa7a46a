"""Soak (issue 5): ``benchmarks/soak.py`` as a test -- a real server process, clients at
concurrency 32 sending valid and invalid requests while the thresholds change every
second. The default run is short (6 s of load, under 20 s in all); the full 60 s run is marked slow.

Pass criteria are the script's (see its docstring): no 5xx, every valid answer equal to
offline ``early_exit`` under the thresholds in force, every invalid request answered with
its contract 4xx, ``branchy_exit_total`` equal to the images answered, RSS growth < 10 %.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_soak(tmp_path: Path, duration: float, timeout: float) -> dict:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "soak.py"),
            "--duration",
            str(duration),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    failed = [k for k, ok in report["checks"].items() if not ok]
    assert proc.returncode == 0 and report["passed"], (
        f"failed checks {failed}\n{proc.stdout[-3000:]}\n"
        + json.dumps({k: v for k, v in report.items() if k.startswith("examples")}, indent=1)[:4000]
    )
    return report


def test_short_soak(tmp_path: Path) -> None:
    report = run_soak(tmp_path, duration=6, timeout=120)
    # The run did what it claims: both kinds of traffic, changes, and real load.
    assert report["concurrency"] == 32
    assert report["valid_requests"] > 50 and report["invalid_requests"] > 10
    assert report["threshold_changes"] >= 5  # the set-up PUT + one per second
    assert report["images_answered"] == sum(report["branchy_exit_total_increase"].values())
    assert set(report["statuses"]) <= {"200", "400", "404", "413", "415", "422"}


@pytest.mark.slow
def test_full_soak(tmp_path: Path) -> None:
    report = run_soak(tmp_path, duration=60, timeout=300)
    assert report["threshold_changes"] >= 59


def test_a_soak_that_cannot_run_still_writes_its_report(tmp_path: Path) -> None:
    """The failure path writes the report too (it once crashed on a frozenset while
    writing the examples of a failed run, and the report was lost)."""
    empty = tmp_path / "no-models"
    empty.mkdir()
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--duration", "1",
         "--model-repository", str(empty), "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["passed"] is False and report["checks"] == {"run_completed": False}
    assert report["error"]


def test_the_report_holds_records_with_sets() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import soak

    record = soak.Record("invalid", 0.0, status=-1, expect_codes=frozenset({"b", "a"}))
    text = json.dumps(soak._jsonable(soak.dataclasses.asdict(record)))
    assert json.loads(text)["expect_codes"] == ["a", "b"]
