"""``gpu-latest.json``: the GPU session's figures in one machine-readable file.

Reads what the session's steps wrote (:mod:`benchmarks.gpu.engines`' JSON, the service
checks' ``gpu_service.json``, ``benchmarks/stage_pool.py``'s JSON; any may be missing
when its step failed) and writes one object with at least these keys, each measured in
that run, or ``null`` (and named in ``missing``) when its step did not produce it:

- ``device``: the GPU's name, or ``"cpu (dry run)"``;
- ``b_alexnet_vs_alexnet_throughput``, ``b_lenet_vs_lenet_throughput``: branchy over
  plain images/s at batch 256, both nets on the captured engine;
- ``b_alexnet_vs_alexnet_latency``, ``b_lenet_vs_lenet_latency``: plain over branchy
  batch-1 time (above 1: the branchy net answers sooner), captured engine;
- ``served_vs_inprocess_throughput``: the server's images/s (16-image requests) over
  in-process ``early_exit``'s at batch 256 on the same device;
- ``answers_agree``: the share of test images (B-AlexNet on CIFAR-10, B-LeNet on MNIST)
  whose class and exit on the captured engine equal the eager engine's;
- ``oom_split_verified``: whether a batch that really ran out of CUDA memory was split
  and answered correctly (always false on the CPU, where the check cannot run).

Also the same gains on the eager engine, the stage pool's speed-ups, the goals of
issue 13 and whether each was met.

    python -m benchmarks.gpu.summary --engines RUNS/engines.json \\
        --service RUNS/service/gpu_service.json --stage-pool RUNS/stage_pool.json \\
        --out OUT/gpu-latest.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

KEYS = (
    "device",
    "b_alexnet_vs_alexnet_throughput",
    "b_alexnet_vs_alexnet_latency",
    "b_lenet_vs_lenet_throughput",
    "b_lenet_vs_lenet_latency",
    "served_vs_inprocess_throughput",
    "answers_agree",
    "oom_split_verified",
)
# issue 13's goals on the GPU (at least these values)
GOALS = {
    "b_alexnet_vs_alexnet_throughput": 1.2,
    "b_alexnet_vs_alexnet_latency": 1.0,
    "b_lenet_vs_lenet_throughput": 1.5,
    "served_vs_inprocess_throughput": 0.25,
}


def _read(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _get(data: dict[str, Any] | None, *keys: str) -> Any:
    for k in keys:
        if not isinstance(data, dict) or k not in data:
            return None
        data = data[k]
    return data


def summarize(
    engines: dict[str, Any] | None,
    service: dict[str, Any] | None,
    stage_pool: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary object from the steps' outputs (``None`` for a missing one)."""
    env = _get(engines, "environment") or _get(service, "environment") or {}
    on_cuda = str(env.get("device", "")).startswith("cuda")
    out: dict[str, Any] = {
        "device": env.get("gpu", "cuda (name unknown)") if on_cuda else "cpu (dry run)",
        "engine": "captured (models.captured: CUDA graphs at bucketed batch sizes)",
    }
    for pair, short in (("alexnet", "b_alexnet_vs_alexnet"), ("lenet", "b_lenet_vs_lenet")):
        out[f"{short}_throughput"] = _get(engines, pair, "captured", "throughput_gain")
        out[f"{short}_latency"] = _get(engines, pair, "captured", "latency_gain")
    out["served_vs_inprocess_throughput"] = _get(
        service, "checks", "throughput", "served_over_inprocess"
    )
    # over the pairs whose step finished (both, normally)
    counted = [
        p
        for p in ("alexnet", "lenet")
        if isinstance(_get(engines, p, "answers_same"), int) and _get(engines, p, "images")
    ]
    same = sum(_get(engines, p, "answers_same") for p in counted)
    count = sum(_get(engines, p, "images") for p in counted)
    out["answers_agree"] = same / count if counted else None
    out["answers_agree_nets"] = [f"b-{p}" for p in counted]
    oom = _get(service, "checks", "oom_split", "status")
    out["oom_split_verified"] = None if oom is None else oom == "pass"
    out["oom_split_status"] = oom
    out["eager"] = {
        pair: {
            k: _get(engines, pair, "eager", k)
            for k in ("throughput_gain", "latency_gain", "images_per_s", "batch1_ms")
        }
        for pair in ("alexnet", "lenet")
    }
    out["captured_detail"] = {
        pair: {k: _get(engines, pair, "captured", k) for k in ("images_per_s", "batch1_ms")}
        for pair in ("alexnet", "lenet")
    }
    if stage_pool is not None:
        out["stage_pool"] = {
            k: stage_pool.get(k)
            for k in ("model", "batch", "target", "speedup_pool_over_eager",
                      "speedup_pool_over_buckets")
        }  # fmt: skip
    out["goals"] = {
        k: {"at_least": v, "met": None if out[k] is None else out[k] >= v} for k, v in GOALS.items()
    }
    out["missing"] = [k for k in KEYS if out[k] is None]
    out["environment"] = env
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--engines", type=Path)
    p.add_argument("--service", type=Path)
    p.add_argument("--stage-pool", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    out = summarize(_read(args.engines), _read(args.service), _read(args.stage_pool))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for k in KEYS:
        print(f"{k}: {out[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
