"""Stage-level batching under a simulated stream, in process: with and without the pool.

A stream of ``--batch``-image batches of real test images (what the request batcher
hands the engine when requests arrive one batch at a time) is classified three ways,
each over the whole stream, rounds interleaved:

- ``eager``: :func:`models.engine.early_exit` on :class:`models.engine.TorchExecutor`
  per batch (later segments run on the few samples that continue);
- ``buckets``: :class:`models.captured.CapturedExecutor` per batch (CUDA graphs on a GPU;
  on the CPU the same buckets, eagerly);
- ``pool``: :class:`models.stage_pool.StagePool` over the same executor, later segments
  cut at ``--target`` samples across batches (the stream is saturated, so no delay cut
  fires; the end of the stream is flushed).

Throughput is images over wall seconds for the whole stream (synchronised on CUDA), the
median of ``--rounds``. Each mode's answers are compared with ``eager``'s (class and exit
per image). Also the mean batch size each segment ran at.

    .venv/bin/python benchmarks/stage_pool.py                      # zoo/b-alexnet, CPU
    .venv/bin/python benchmarks/stage_pool.py --device cuda --out OUT/stage_pool.json

Writes ``--out`` (JSON) and prints a Markdown table.
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu.data import test_inputs  # noqa: E402
from benchmarks.runtimes import cpu_info  # noqa: E402
from models import ExitResult, load_checkpoint  # noqa: E402
from models.captured import DEFAULT_BUCKETS, CapturedExecutor  # noqa: E402
from models.engine import TorchExecutor, early_exit  # noqa: E402
from models.stage_pool import StagePool  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=ROOT / "zoo" / "b-alexnet")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "cache")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    p.add_argument("--images", type=int, default=1024, help="images in the stream")
    p.add_argument("--batch", type=int, default=16, help="images per submitted batch")
    p.add_argument("--target", type=int, default=128, help="the pool's segment batch size")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--buckets", type=_sizes, default=DEFAULT_BUCKETS, help="e.g. 1,2,4,8")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "stage_pool.json")
    return p


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _per_batch(run: Callable[[Tensor], ExitResult], batches: list[Tensor]) -> list[ExitResult]:
    return [run(xb) for xb in batches]


def _pooled(pool: StagePool, batches: list[Tensor]) -> list[ExitResult]:
    tickets = [pool.submit(xb) for xb in batches]
    pool.flush()
    done = pool.pop_finished()
    return [done[t] for t in tickets]


def _segment_sizes(results: list[ExitResult], num_exits: int) -> list[float]:
    # per-batch engines: segment i runs on the samples of a batch whose exit >= i
    sizes: list[list[int]] = [[] for _ in range(num_exits)]
    for r in results:
        for i in range(num_exits):
            k = int((r.exit_index >= i).sum())
            if k:
                sizes[i].append(k)
    return [statistics.fmean(s) if s else 0.0 for s in sizes]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every mode's throughput, agreement with ``eager`` and segment batch sizes."""
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.model_dir)
    net = ckpt.model.eval().to(device)
    x = test_inputs(ckpt, args.data_dir, args.images, cache_dir=args.cache_dir).to(device)
    batches = list(x.split(args.batch))
    thresholds = list(ckpt.thresholds)
    eager, cap = TorchExecutor(net), CapturedExecutor(net, buckets=args.buckets)
    cap.warm(net.input_shape)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    pools: list[StagePool] = []

    def pooled(b: list[Tensor]) -> list[ExitResult]:
        pools.append(StagePool(cap, thresholds, target=args.target, max_delay_s=1e9))
        return _pooled(pools[-1], b)

    modes: dict[str, Callable[[list[Tensor]], list[ExitResult]]] = {
        "eager": lambda b: _per_batch(lambda xb: early_exit(eager, xb, thresholds), b),
        "buckets": lambda b: _per_batch(lambda xb: cap.early_exit(xb, thresholds), b),
        "pool": pooled,
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    answers: dict[str, list[ExitResult]] = {}
    with torch.inference_mode():
        for m, run in modes.items():  # warm-up round, untimed
            answers[m] = run(batches)
        for _ in range(args.rounds):
            for m, run in modes.items():
                sync()
                start = time.perf_counter()
                run(batches)
                sync()
                times[m].append(time.perf_counter() - start)
    ref = answers["eager"]
    out: dict[str, Any] = {}
    for m in modes:
        same = sum(
            int(((a.exit_index == r.exit_index) & (a.prediction == r.prediction)).sum())
            for a, r in zip(answers[m], ref, strict=True)
        )
        seconds = statistics.median(times[m])
        out[m] = {
            "images_per_s": round(len(x) / seconds, 1),
            "seconds": [round(t, 4) for t in times[m]],
            "answers_equal_eager": same / len(x),
            "mean_segment_batch": [round(s, 1) for s in _segment_sizes(answers[m], net.num_exits)],
        }
    last = pools[-1]
    out["pool"]["mean_segment_batch"] = [
        round(s / r, 1) if r else 0.0
        for s, r in zip(last.segment_samples, last.segment_runs, strict=True)
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    modes = measure(args)
    device = torch.device(args.device)
    report = {
        "command": "benchmarks/stage_pool.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model_dir.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": cpu_info(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "images": args.images,
        "batch": args.batch,
        "target": args.target,
        "rounds": args.rounds,
        "buckets": list(args.buckets),
        "modes": modes,
        "speedup_pool_over_eager": round(
            modes["pool"]["images_per_s"] / modes["eager"]["images_per_s"], 3
        ),
        "speedup_pool_over_buckets": round(
            modes["pool"]["images_per_s"] / modes["buckets"]["images_per_s"], 3
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['model']} on {report['device']} ({report['cpu']['model']}), "
          f"{args.images} images in batches of {args.batch}, pool target {args.target}")  # fmt: skip
    print("| mode | images/s | answers = eager | mean batch per segment |\n|---|---|---|---|")
    for m, r in modes.items():
        sizes = ", ".join(f"{s:g}" for s in r["mean_segment_batch"])
        print(f"| {m} | {r['images_per_s']:.0f} | {r['answers_equal_eager']:.2%} | {sizes} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
