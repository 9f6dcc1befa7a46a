"""``benchmarks/serving.py`` runs end to end and writes a well-formed report (a short,
unjudged run on the committed LeNet pair: no timing is asserted)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.service.conftest import ROOT


def test_serving_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serving.py"),
         "--plain-dir", str(ROOT / "zoo" / "lenet"), "--branchy-dir", str(ROOT / "zoo" / "b-lenet"),
         "--runtime", "torch", "--duration", "0.5", "--rounds", "1", "--warmup", "0.1",
         "--concurrency", "2", "--shapes", "1", "4", "--images", "16", "--litserve", "off",
         "--variant", "inline:BRANCHY_INLINE_DECODE_PIXELS=4096", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().strip() in proc.stdout
    assert report["litserve"].startswith("skipped: --litserve off")
    assert report["machine"]["cpu"]["model"]
    assert {m["runtime"] for m in report["models"].values()} == {"torch"}
    for role in ("plain", "branchy"):
        assert report["in_process"][role]["images_per_s"] > 0
    cells = {(r["system"], r["role"], r["images_per_request"], r["concurrency"])
             for r in report["served"]}  # fmt: skip
    assert cells == {
        (system, role, n, 2)
        for system in ("branchy-serve", "branchy-serve[inline]")
        for role in ("plain", "branchy")
        for n in (1, 4)
    }
    assert report["variants"] == {"inline": {"BRANCHY_INLINE_DECODE_PIXELS": "4096"}}
    assert report["variant_runtimes"] == {"inline": {"plain": "torch", "branchy": "torch"}}
    assert len(report["variant_ratios"]) == 4
    for v in report["variant_ratios"]:  # one ratio per round: here one round, the same
        assert v["over_default_by_round"] == [pytest.approx(v["over_default"])]
    for row in report["served"]:
        assert row["errors"] == 0 and row["requests"] > 0
        assert row["images"] == row["requests"] * row["images_per_request"]
        assert row["p50_ms"] <= row["p99_ms"]
        # a server answering requests used CPU, and no more than the machine has
        assert 0 < row["server_cores"] <= (os.cpu_count() or 1) + 0.5
        assert 0 < row["client_cores"] <= (os.cpu_count() or 1) + 0.5
        # the server's own batch-size histogram, over the cell: at least one image per
        # batch, at most the max batch size (64)
        assert 1 <= row["mean_batch"] <= 64
        # its inference time over the cell: the batch thread computed some of the wall
        # time, never more than all of it
        assert 0 < row["engine_busy"] <= 1
        size = str(max(1, round(row["mean_batch"])))
        if row["system"] == "branchy-serve":  # the ceiling at the batch size it formed
            assert report["in_process_at_batch"][row["role"]][size] > 0
    assert [(x["images_per_request"], x["concurrency"]) for x in report["ratios"]] == [
        (1, 2),
        (4, 2),
    ]
    for x in report["ratios"]:
        assert x["gain_ratio"] == x["served_gain"] / x["in_process_gain"]
        assert x["plain_over_litserve"] is None  # not measured, never made up
        assert x["plain_over_litserve_by_round"] is None
        plain, branchy = (
            next(r for r in report["served"] if r["system"] == "branchy-serve" and r["role"] == role
                 and (r["images_per_request"], r["concurrency"]) == (x["images_per_request"], 2))
            for role in ("plain", "branchy")
        )  # fmt: skip
        at = report["in_process_at_batch"]
        small_plain = at["plain"][str(max(1, round(plain["mean_batch"])))]
        small_branchy = at["branchy"][str(max(1, round(branchy["mean_batch"])))]
        assert x["in_process_gain_at_served_batch"] == small_branchy / small_plain
        assert x["plain_served_over_in_process_at_served_batch"] == (
            plain["images_per_s"] / small_plain
        )
    peer_goals = [g for g in report["goals"] if "LitServe" in g["goal"]]
    assert peer_goals and all(g["met"] is None and g["value"] is None for g in peer_goals)
    assert all(isinstance(g["met"], bool) for g in report["goals"] if g["value"] is not None)


def test_signal_tree_stops_and_resumes_children() -> None:
    """What the benchmark does to the servers it is not measuring: SIGSTOP to a process
    tree stops its child's CPU use, SIGCONT lets it go on."""
    sys.path.insert(0, str(ROOT))
    from testsupport.procstat import signal_tree, tree_cpu_seconds

    child = "while True: pass"
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"],
        start_new_session=True,
    )  # fmt: skip
    try:
        time.sleep(0.5)
        signal_tree(parent.pid, signal.SIGSTOP)
        time.sleep(0.1)  # the stop is delivered
        before = tree_cpu_seconds(parent.pid)
        time.sleep(0.5)
        stopped = tree_cpu_seconds(parent.pid) - before
        signal_tree(parent.pid, signal.SIGCONT)
        time.sleep(0.5)
        resumed = tree_cpu_seconds(parent.pid) - before - stopped
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
    assert stopped <= 0.02  # a clock tick at most
    assert resumed >= 0.2


def test_process_tree_cpu_counts_children() -> None:
    """A parent that only waits while its child burns CPU: the child's time is counted."""
    sys.path.insert(0, str(ROOT))
    from testsupport.procstat import tree_cpu_seconds

    child = "while True: pass"
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"],
        start_new_session=True,
    )  # fmt: skip
    try:
        time.sleep(0.5)  # both started, the child burning
        before = tree_cpu_seconds(parent.pid)
        time.sleep(0.5)
        during = tree_cpu_seconds(parent.pid)
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(30)
    assert during - before > 0.2  # the child's CPU, while the parent itself sleeps


def test_profile_steps_name_the_front_end_and_the_engine_link() -> None:
    """``benchmarks/serving_profile.py`` groups each process's stacks by the innermost
    frame it recognises: a front end's own work and the link are named, not 'other'."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.serving_profile import group, step_of

    def stack(*frames: str) -> str:
        return ";".join(f"{f} (/x/{path}:1)" for f, path in frames)

    decode = stack(("FrontEnd._classify", "service/frontend.py"), ("decode", "service/intake.py"),
                   ("load_pixels", "service/preprocess.py"))  # fmt: skip
    link = stack(("FrontEnd._classify", "service/frontend.py"),
                 ("EngineLink.call", "service/engine_link.py"))  # fmt: skip
    parts = stack(("FrontEnd._classify", "service/frontend.py"),
                  ("parse_multipart", "service/frontend.py"))  # fmt: skip
    answer = stack(("_Request._answer", "service/engine_link.py"),
                   ("classify_body", "service/intake.py"))  # fmt: skip
    own = stack(("FrontEnd._http", "service/frontend.py"), ("_query", "service/frontend.py"))
    assert step_of(decode) == "decode (Pillow, normalise)"
    assert step_of(link) == "engine link (frames, pickling, answers)"
    assert step_of(parts) == "multipart parsing"
    assert step_of(answer) == "response JSON (pydantic)"
    assert step_of(own) == "front end: request handling"
    total, steps = group(f"{decode} 3\n{link} 1\nnot a sample line\n")
    assert total == 4 and steps == {
        "decode (Pillow, normalise)": 3,
        "engine link (frames, pickling, answers)": 1,
    }


def test_batch_glue_benchmark_smoke(tmp_path: Path) -> None:
    """``benchmarks/batch_glue.py`` times every piece of a batch and writes its report
    (a few timings on the LeNet checkpoint: nothing about speed is asserted)."""
    out = tmp_path / "glue.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "batch_glue.py"),
         "--model-dir", str(ROOT / "zoo" / "b-lenet"), "--runtime", "torch", "--batch", "8",
         "--images-per-request", "3", "--repeats", "2", "--rounds", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().strip() in proc.stdout
    assert report["runtime"] == "torch fp32" and report["batch"] == 8
    pieces = {r["piece"]: r for r in report["rows"]}
    assert "network and exit decisions (Engine.run)" in pieces
    assert "answers (Batcher._answers)" in pieces
    assert "the whole batch as served (Batcher._compute)" in pieces
    assert report["early_release"] is False  # the server's default
    for row in report["rows"]:
        assert len(row["ms_per_batch_by_round"]) == 2
        assert row["ms_per_batch"] > 0 and row["share_of_network"] > 0
