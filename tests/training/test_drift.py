"""benchmarks/drift.py end to end on a tiny trained B-LeNet and synthetic MNIST files."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import drift
from training import train


def test_drift_replay_writes_its_table_and_counts_violations(
    mnist_dir: Path, tmp_path: Path
) -> None:
    argv = [
        "--model", "b-lenet", "--dataset", "mnist", "--data-dir", str(mnist_dir),
        "--val-size", "400", "--batch-size", "64", "--threads", "1", "--no-progress",
        "--epochs", "1", "--out", str(tmp_path / "ck"), "--work-dir", str(tmp_path / "w"),
    ]  # fmt: skip
    ckpt = train.main(train.parse_config(argv))
    args = drift.get_args_parser().parse_args(
        ["--checkpoint", str(ckpt), "--data-dir", str(mnist_dir), "--windows", "3",
         "--window-size", "200", "--epsilon", "0.2", "--shadow-rate", "1",
         "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    )  # fmt: skip
    report = drift.main(args)
    assert len(report["rows"]) == 3
    for row in report["rows"]:
        for policy in ("fixed", "autotune", "greedy"):
            assert 0 <= row[policy]["true_disagreement"] <= 1
            assert row[policy]["compute_saved"] <= 1
    # the fixed policy never moves
    assert len({tuple(r["fixed"]["thresholds"]) for r in report["rows"]}) == 1
    limit = report["violation_limit"]
    for policy, s in report["summary"].items():
        want = sum(r[policy]["true_disagreement"] > limit for r in report["rows"][1:])
        assert s["violations"] == want
    saved = json.loads((tmp_path / "out" / "drift-b-lenet.json").read_text())
    assert saved["summary"] == report["summary"]
    assert (tmp_path / "out" / "drift-b-lenet.png").stat().st_size > 1000
    assert "| autotune |" in (tmp_path / "out" / "drift-b-lenet.md").read_text()
