"""A CPU dry run of ``scripts/gpu_session.sh``: the same steps, tiny, on the CPU.

It unpacks a small pack of real CIFAR-10 JPEGs (with its digest), checks the MNIST test
files against their SHA-256 sums, measures plain against branchy nets on both engines,
runs the stage pool and (in the slow version) the service checks, and must write
``gpu-latest.json`` with every key issue 13 asks for, measured in that run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu.summary import KEYS

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

needs_data = pytest.mark.skipif(
    not (DATA / "cifar10" / "test").is_dir() or not (DATA / "mnist").is_dir(),
    reason="../shared/data (CIFAR-10 and MNIST) is not there",
)


def _tiny_cifar(dest: Path, per_class: int) -> str:
    """``per_class`` test JPEGs (and one train JPEG) of every class; the tree's digest
    as the script computes it (sha256sum of the sorted files' sha256sum lines)."""
    lines = []
    for split, count in (("test", per_class), ("train", 1)):
        for folder in sorted((DATA / "cifar10" / split).iterdir()):
            for f in sorted(folder.glob("*.jpg"))[:count]:
                rel = f"{split}/{folder.name}/{f.name}"
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dest / rel)
                lines.append(rel)
    listing = "".join(
        f"{hashlib.sha256((dest / rel).read_bytes()).hexdigest()}  {rel}\n"
        for rel in sorted(lines, key=lambda s: s.encode())
    )
    return hashlib.sha256(listing.encode()).hexdigest()


def _dry_run(tmp_path: Path, *, service: bool) -> tuple[dict, str]:
    tree = tmp_path / "cifar10"
    digest = _tiny_cifar(tree, per_class=4 if not service else 8)
    pack = tmp_path / "tiny.pack"
    subprocess.run(
        [sys.executable, "scripts/pack_files.py", "pack", str(tree), str(pack)],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "RUNS": str(tmp_path / "runs"),
        "DEVICE": "cpu",
        "PY": sys.executable,
        "PACK": str(pack),
        "CIFAR_DIGEST": digest,
        "MNIST_DIR": str(DATA / "mnist"),
        "ENGINE_ARGS": "--images 40 --batch 16 --seconds 0.05 --latency-samples 4 --rounds 1 --buckets 1,4,16",
        "POOL_ARGS": "--images 40 --batch 8 --target 16 --rounds 1 --buckets 1,4,16",
        "SERVICE": "1" if service else "0",
        "SERVICE_ARGS": "--images 32 --seconds 1 --clients 2 --latency-requests 5",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        ["bash", "scripts/gpu_session.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    return json.loads((out / "gpu-latest.json").read_text()), log


def _check_measured(summary: dict, keys: tuple[str, ...]) -> None:
    assert set(KEYS) <= set(summary)
    assert summary["device"] == "cpu (dry run)"
    for k in keys:
        assert isinstance(summary[k], float) and summary[k] > 0, (k, summary[k])
    # on the CPU the captured engine runs the same layers: the same answers
    assert summary["answers_agree"] == 1.0


@needs_data
def test_short_dry_run_writes_every_engine_key_and_names_what_it_skipped(
    tmp_path: Path,
) -> None:
    summary, log = _dry_run(tmp_path, service=False)
    engine_keys = (*(k for k in KEYS if k.startswith("b_")), "answers_agree")
    _check_measured(summary, engine_keys)
    # the service step was skipped: its keys are null and said to be missing
    assert summary["served_vs_inprocess_throughput"] is None
    assert summary["missing"] == ["served_vs_inprocess_throughput", "oom_split_verified"]
    assert summary["stage_pool"]["speedup_pool_over_eager"] > 0
    assert "cifar10 digest" in log and "t10k-labels-idx1-ubyte.gz: OK" in log


@needs_data
@pytest.mark.slow
def test_full_dry_run_measures_every_key(tmp_path: Path) -> None:
    summary, _ = _dry_run(tmp_path, service=True)
    _check_measured(summary, tuple(k for k in KEYS if k not in ("device", "oom_split_verified")))
    # a real CUDA out-of-memory error cannot happen on the CPU: never claimed there
    assert summary["oom_split_verified"] is False and summary["oom_split_status"] == "skipped"
    assert summary["missing"] == []


def test_summary_counts_what_finished_and_names_what_did_not(tmp_path: Path) -> None:
    engines = {
        "environment": {"device": "cuda:0", "gpu": "NVIDIA H200"},
        "alexnet": {
            "images": 100,
            "answers_same": 99,
            "captured": {"throughput_gain": 1.3, "latency_gain": 0.9},
            "eager": {"throughput_gain": 0.4, "latency_gain": 0.8},
        },
        "lenet": {"error": "FileNotFoundError: no MNIST test images"},
    }
    (tmp_path / "engines.json").write_text(json.dumps(engines))
    out = tmp_path / "gpu-latest.json"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu.summary", "--engines", str(tmp_path / "engines.json"),
         "--service", str(tmp_path / "absent.json"), "--out", str(out)],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    summary = json.loads(out.read_text())
    assert summary["device"] == "NVIDIA H200"
    assert summary["b_alexnet_vs_alexnet_throughput"] == 1.3
    assert summary["answers_agree"] == 0.99 and summary["answers_agree_nets"] == ["b-alexnet"]
    assert summary["missing"] == [
        "b_lenet_vs_lenet_throughput", "b_lenet_vs_lenet_latency",
        "served_vs_inprocess_throughput", "oom_split_verified",
    ]  # fmt: skip
    assert summary["goals"]["b_alexnet_vs_alexnet_throughput"]["met"] is True
    assert summary["goals"]["b_alexnet_vs_alexnet_latency"]["met"] is False
    assert summary["goals"]["b_lenet_vs_lenet_throughput"]["met"] is None
