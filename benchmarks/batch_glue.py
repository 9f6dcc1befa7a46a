"""What a served batch costs besides its network, piece by piece, in one process.

The batch thread runs the network with the GIL released; everything else a batch needs
is Python holding the GIL, on the batch thread or the event loop. This times each piece
on the engine the server would run (``service.batcher.Engine``, one thread) for one
batch of ``--batch`` images sent as requests of ``--images-per-request``, in
interleaved rounds (every piece once per round, the median of ``--repeats`` timings
each):

* event loop, per request: its images' pixels as the batcher's inputs
  (``service.preprocess.pixel_inputs``);
* batch thread: the batch's thresholds as a tensor, its input stacked and normalised
  (``_batch_input``), and the network with its exit decisions (``Engine.run``);
* the answers (``Batcher._answers``: an answer object and two histogram observations
  per image), built on the batch thread when no full batch waits, else on the loop;
* the whole batch as the batch thread serves it (``Batcher._compute``: thresholds,
  input, network, early release of each exit's answers), against the network alone.

::

    .venv/bin/python benchmarks/batch_glue.py                      # zoo/alexnet
    .venv/bin/python benchmarks/batch_glue.py --model-dir zoo/b-alexnet

Prints a table, writes ``reports/serving/batch-glue.json`` (``--out``) and a Markdown
twin beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.runtimes import machine  # noqa: E402
from models import load_checkpoint  # noqa: E402
from service.batcher import Batcher, Engine, _batch_input, _Computed, _Item  # noqa: E402
from service.metrics import Metrics  # noqa: E402
from service.preprocess import pixel_inputs  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=ROOT / "zoo" / "alexnet")
    p.add_argument("--runtime", default="auto", help="as BRANCHY_RUNTIME")
    p.add_argument("--threads", type=int, default=1, help="as BRANCHY_TORCH_THREADS")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images-per-request", type=int, default=16)
    p.add_argument(
        "--early-release",
        action="store_true",
        help="as BRANCHY_EARLY_RELEASE=true (the server's default is off)",
    )
    p.add_argument("--repeats", type=int, default=50, help="timings per piece and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "serving" / "batch-glue.json")
    return p


class _Source:
    def __init__(self, engine: Engine, thresholds: tuple[float, ...]) -> None:
        self.engine, self.thresholds = engine, thresholds

    def snapshot(self) -> tuple[Engine, tuple[float, ...]]:
        return self.engine, self.thresholds


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.model_dir)
    engine = Engine(ckpt, torch.device("cpu"), runtime=args.runtime, threads=args.threads)
    thresholds = tuple(float(t) for t in ckpt.thresholds)
    batcher = Batcher(
        args.model_dir.name,
        _Source(engine, thresholds),
        Metrics(),
        max_batch_size=args.batch,
        max_delay_s=0.0,
        max_queue=args.batch,
        early_release=args.early_release,
    )
    c, h, w = ckpt.input_spec.shape
    per_request, requests = args.images_per_request, -(-args.batch // args.images_per_request)
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (per_request, h, w, c), dtype=np.uint8) for _ in range(requests)]

    inputs = [x for arr in pixels for x in pixel_inputs(arr)][: args.batch]
    loop = asyncio.new_event_loop()
    items = [_Item(x, None, loop.create_future(), 0.0, 0.0, engine, thresholds) for x in inputs]
    x = _batch_input(engine, items)
    t = torch.tensor([thresholds] * args.batch, dtype=torch.float32).reshape(args.batch, -1)
    out = engine.run(x, t)

    def answers() -> object:
        done = _Computed(
            engine, x, items, per_sample, list(range(args.batch)),
            out.exit_index.tolist(), out.probabilities, out.entropy, 0.0,
        )  # fmt: skip
        return batcher._answers(done)

    per_sample = [thresholds] * args.batch
    pieces: dict[str, tuple[str, Callable[[], object], int]] = {
        # name: (where it runs, what, times per batch)
        "request pixels -> batcher inputs (pixel_inputs)": (
            "event loop", lambda: pixel_inputs(pixels[0]), requests,
        ),
        "the batch's thresholds (a tensor of per-image tuples)": (
            "batch thread", lambda: torch.tensor(per_sample, dtype=torch.float32), 1,
        ),
        "stack the batch": ("batch thread", lambda: torch.stack(inputs), 1),
        "batch input (stack + normalise, _batch_input)": (
            "batch thread", lambda: _batch_input(engine, items), 1,
        ),
        "network and exit decisions (Engine.run)": ("batch thread", lambda: engine.run(x, t), 1),
        "answers (Batcher._answers)": ("batch thread or loop", answers, 1),
        # everything above that the batch thread does, as the server does it (a batch
        # that fills hands its answers to the loop, one that does not builds them; with
        # early release once per exit taken)
        "the whole batch as served (Batcher._compute)": (
            "batch thread", lambda: batcher._compute(items, loop, lambda: None), 1,
        ),
    }  # fmt: skip
    for _, fn, _ in pieces.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {name: [] for name in pieces}
    for _ in range(args.rounds):
        for name, (_, fn, times) in pieces.items():
            samples[name].append(_median_ms(fn, args.repeats) * times)
    loop.close()  # never run: the answers handed to it are dropped with it
    network = statistics.median(samples["network and exit decisions (Engine.run)"])
    rows = [
        {
            "piece": name,
            "runs_on": where,
            "ms_per_batch": statistics.median(samples[name]),
            "ms_per_batch_by_round": samples[name],
            "share_of_network": statistics.median(samples[name]) / network,
        }
        for name, (where, _, _) in pieces.items()
    ]
    return {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "machine": machine(),
        "model": args.model_dir.name,
        "runtime": f"{engine.runtime} {engine.precision}",
        "batch": args.batch,
        "early_release": args.early_release,
        "images_per_request": per_request,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "rows": rows,
    }


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    flags = ", ".join(k for k, v in m["cpu"].get("flags", {}).items() if v) or "no flags read"
    lines = [
        f"`{report['command']}`; CPU {m['cpu']['model']} ({m['cpus']} cores; {flags}); "
        f"{report['model']} on {report['runtime']}, one batch of {report['batch']} images "
        f"in requests of {report['images_per_request']}; median of {report['rounds']} "
        f"interleaved rounds of {report['repeats']} timings",
        "",
        "| piece | runs on | ms per batch | share of the network | by round |",
        "|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        by_round = ", ".join(f"{v:.3f}" for v in r["ms_per_batch_by_round"])
        lines.append(
            f"| {r['piece']} | {r['runs_on']} | {r['ms_per_batch']:.3f} | "
            f"{100 * r['share_of_network']:.1f} % | {by_round} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = get_args_parser().parse_args()
    report = measure(args)
    text = table(report)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text)
    print(f"written {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
