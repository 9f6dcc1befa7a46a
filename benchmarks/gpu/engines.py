"""Plain against branchy nets on one device, each pair with the same engine.

For AlexNet / B-AlexNet (CIFAR-10 test images) and LeNet / B-LeNet (MNIST test digits),
with each engine (``eager``: :class:`models.engine.TorchExecutor`; ``captured``:
:class:`models.captured.CapturedExecutor`, CUDA graphs on a GPU, eager buckets on the
CPU):

- throughput: images/s at batch ``--batch`` over the test images (already on the
  device), synchronised, the median of ``--rounds`` interleaved rounds of ``--seconds``;
- batch-1 latency: the median time of one image from input tensor to answer (the call
  and a device synchronisation), over ``--latency-samples`` images per round;
- the branchy net's gain: throughput ratio (branchy / plain) and latency ratio
  (plain / branchy), both > 1 when early exit pays;
- answers: for every branchy net, the share of the ``--images`` test images whose class
  and exit under ``captured`` equal those of the eager engine (both at batch
  ``--batch`` on the device).

    .venv/bin/python -m benchmarks.gpu.engines --device cpu --images 256 --seconds 0.3 \\
        --out /tmp/engines.json

Writes ``--out`` (JSON) and prints one line per pair and engine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.gpu.common import ROOT, environment
from benchmarks.gpu.data import test_inputs
from models import ExitResult, load_checkpoint
from models.captured import DEFAULT_BUCKETS, CapturedExecutor
from models.engine import Executor, TorchExecutor, early_exit

PAIRS = {"alexnet": ("alexnet", "b-alexnet"), "lenet": ("lenet", "b-lenet")}
ENGINES = ("eager", "captured")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--zoo", type=Path, default=ROOT / "zoo")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "cache")
    p.add_argument("--device", default="cuda")
    p.add_argument("--images", type=int, default=10000, help="test images per data set")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seconds", type=float, default=1.0, help="per throughput round")
    p.add_argument("--latency-samples", type=int, default=300, help="per latency round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--buckets", type=_sizes, default=DEFAULT_BUCKETS, help="e.g. 1,2,4,8")
    p.add_argument("--out", type=Path, required=True)
    return p


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _run(ex: Executor) -> Callable[[Tensor, list[float]], ExitResult]:
    if isinstance(ex, CapturedExecutor):
        return ex.early_exit
    return lambda x, t: early_exit(ex, x, t)


def _executor(engine: str, net: torch.nn.Module, buckets: tuple[int, ...]) -> Executor:
    if engine == "eager":
        return TorchExecutor(net)
    cap = CapturedExecutor(net, buckets=buckets)
    cap.warm(net.input_shape)  # type: ignore[arg-type]
    return cap


def measure_pair(
    pair: str, args: argparse.Namespace, device: torch.device, sync: Callable[[], None]
) -> dict[str, Any]:
    """Throughput, latency and (branchy) answers of one pair under every engine."""
    plain_name, branchy_name = PAIRS[pair]
    ckpts = {n: load_checkpoint(args.zoo / n) for n in (plain_name, branchy_name)}
    x = test_inputs(ckpts[branchy_name], args.data_dir, args.images, cache_dir=args.cache_dir)
    x = x.to(device)
    big = [b for b in x.split(args.batch) if b.shape[0] == args.batch] or [x]
    runs: dict[tuple[str, str], Callable[[Tensor, list[float]], ExitResult]] = {}
    for n, ck in ckpts.items():
        net = ck.model.eval().to(device)
        for engine in ENGINES:
            runs[n, engine] = _run(_executor(engine, net, args.buckets))
    thresholds = {n: list(ck.thresholds) for n, ck in ckpts.items()}
    rate: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
    latency: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for (n, _), run in runs.items():  # warm-up
            run(big[0], thresholds[n])
            run(x[:1], thresholds[n])
        for _ in range(args.rounds):
            for (n, engine), run in runs.items():
                t = thresholds[n]
                sync()
                count, i, start = 0, 0, time.perf_counter()
                while time.perf_counter() - start < args.seconds:
                    run(big[i % len(big)], t)
                    count += big[i % len(big)].shape[0]
                    i += 1
                sync()
                rate[n, engine].append(count / (time.perf_counter() - start))
                times = []
                for j in range(args.latency_samples):
                    xj = x[j % len(x) : j % len(x) + 1]
                    t0 = time.perf_counter()
                    run(xj, t)
                    sync()
                    times.append(time.perf_counter() - t0)
                latency[n, engine].append(statistics.median(times))
        # answers: captured against eager, the whole sample at batch `--batch`
        t = thresholds[branchy_name]
        want = [runs[branchy_name, "eager"](b, t) for b in x.split(args.batch)]
        got = [runs[branchy_name, "captured"](b, t) for b in x.split(args.batch)]
    same = sum(
        int(((g.exit_index == w.exit_index) & (g.prediction == w.prediction)).sum())
        for g, w in zip(got, want, strict=True)
    )
    out: dict[str, Any] = {"images": len(x), "batch": args.batch, "answers_same": same}
    for engine in ENGINES:
        tp = {n: statistics.median(rate[n, engine]) for n in ckpts}
        lat = {n: statistics.median(latency[n, engine]) for n in ckpts}
        out[engine] = {
            "images_per_s": {n: round(v, 1) for n, v in tp.items()},
            "batch1_ms": {n: round(1e3 * v, 4) for n, v in lat.items()},
            "throughput_gain": round(tp[branchy_name] / tp[plain_name], 4),
            "latency_gain": round(lat[plain_name] / lat[branchy_name], 4),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # a small shared machine: the dry run
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    start = time.monotonic()
    out: dict[str, Any] = {"environment": environment(args.device), "args": vars(args).copy()}
    out["args"] = {k: str(v) for k, v in out["args"].items()}
    for pair in PAIRS:
        try:
            out[pair] = measure_pair(pair, args, device, sync)
        except Exception as exc:  # e.g. no MNIST in the tree: the other pair still counts
            out[pair] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"{pair}: failed: {out[pair]['error']}")
            continue
        for engine in ENGINES:
            r = out[pair][engine]
            print(f"{pair} {engine}: throughput gain {r['throughput_gain']:.3f}x "
                  f"({r['images_per_s']}), batch-1 latency gain {r['latency_gain']:.3f}x "
                  f"({r['batch1_ms']} ms)")  # fmt: skip
        print(f"{pair}: captured answers equal eager for {out[pair]['answers_same']} of "
              f"{out[pair]['images']} images")  # fmt: skip
    out["wall_s"] = round(time.monotonic() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 1 if any("error" in out[pair] for pair in PAIRS) else 0


if __name__ == "__main__":
    sys.exit(main())
