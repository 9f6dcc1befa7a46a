"""``benchmarks/load.py`` runs end to end (a short, unjudged run: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.service.conftest import ROOT


def test_load_benchmark_smoke(model_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "load.py"), "--model-dir",
         str(model_repo / "b-lenet"), "--duration", "0.6", "--rounds", "1", "--warmup", "0.1",
         "--concurrency", "2", "--images", "32", "--images-per-request", "1", "4",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "| thresholds | img/req |" in proc.stdout
    for label in ("calibrated", "none"):
        assert report["in_process"][label]["images_per_s"] > 0
        for n in ("1", "4"):
            row = report["served"][label][n]
            assert row["errors"] == 0 and row["requests"] > 0
            assert abs(sum(row["exit_shares"]) - 1) < 1e-9
    assert report["served"]["none"]["4"]["exit_shares"][-1] == 1.0  # thresholds 0: last exit
    assert {"in_process_gain", "1", "4"} <= set(report["ratios"])


def test_early_release_benchmark_smoke(model_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "early.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "early_release.py"), "--model-dir",
         str(model_repo / "b-alexnet"), "--seconds", "0.6", "--rounds", "2", "--concurrency",
         "3", "--images", "16", "--runtime", "onnxruntime", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "| early release | img/s |" in proc.stdout
    assert report["runtime"] == {"on": "onnxruntime", "off": "onnxruntime"}
    for mode in ("on", "off"):
        s = report["early_release"][mode]
        assert s["requests"] > 0
        assert sum(e["requests"] for e in s["per_exit"].values()) == s["requests"]
