"""benchmarks/drift.py end to end: a tiny trained B-LeNet served by a real server process
with shadow monitoring and auto-tuning, on a drifting stream of synthetic MNIST files."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import drift
from training import train


def test_drift_drives_a_server_and_counts_violations(mnist_dir: Path, tmp_path: Path) -> None:
    argv = [
        "--model", "b-lenet", "--dataset", "mnist", "--data-dir", str(mnist_dir),
        "--val-size", "400", "--batch-size", "64", "--threads", "1", "--no-progress",
        "--epochs", "1", "--out", str(tmp_path / "ck"), "--work-dir", str(tmp_path / "w"),
    ]  # fmt: skip
    ckpt = train.main(train.parse_config(argv))
    args = drift.get_args_parser().parse_args(
        ["--checkpoint", str(ckpt), "--data-dir", str(mnist_dir), "--windows", "3",
         "--window-size", "160", "--epsilon", "0.2", "--shadow-rate", "1",
         "--min-samples", "100", "--interval", "0.2",
         "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    )  # fmt: skip
    report = drift.main(args)
    rows = report["rows"]
    assert len(rows) == 3
    for row in rows:
        for policy in drift.POLICIES:
            assert 0 <= row[policy]["true_disagreement"] <= 1
            assert row[policy]["compute_saved"] <= 1
        served = row["autotune"]
        # the server's final-exit answers are the offline network's
        assert served["final_exit_match"] >= 0.99
        # what the server's /metrics said, after its shadow queue ran dry
        assert served["shadows_dropped"] == 0
        assert 0 <= served["shadow_estimate"] <= served["shadow_upper"] <= 1
    # the fixed policy never moves, and starts where the server's certificate put it
    assert {tuple(r["fixed"]["thresholds"]) for r in rows} == {tuple(report["start_thresholds"])}
    # rate 1: every early exit of the server was shadowed
    assert rows[-1]["autotune"]["shadows_run"] > 0
    limit = report["violation_limit"]
    for policy, s in report["summary"].items():
        want = sum(r[policy]["true_disagreement"] > limit for r in rows[1:])
        assert s["violations"] == want
    saved = json.loads((tmp_path / "out" / "drift-b-lenet.json").read_text())
    assert saved["summary"] == report["summary"]
    assert (tmp_path / "out" / "drift-b-lenet.png").stat().st_size > 1000
    assert "| autotune |" in (tmp_path / "out" / "drift-b-lenet.md").read_text()
