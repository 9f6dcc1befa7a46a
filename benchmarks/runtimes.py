"""Plain and branchy nets on every CPU runtime, side by side: batch-1 latency, batch-256
throughput, agreement with torch, and where early exit can pay on each runtime.

For every zoo pair (branchy:plain) this builds one engine per runtime and precision
available here (:func:`models.load_engine` with ``runtime`` torch, onnxruntime,
openvino; openvino bf16 only where the CPU computes bf16 natively), plus the engine that
``runtime="auto"`` picks, for both nets, and times them all in interleaved rounds: in
every round each engine classifies every image once per measure, the images in chunks
and the engines taking turns chunk by chunk, in an order rotated from chunk to chunk,
so that a change in machine load hits them all alike. The path timed is the service's
whole path: a normalised input tensor -> ``engine.early_exit`` (segments,
heads, entropies, exit decisions, compaction) -> predicted class on the host. Branchy
nets run at their checkpoint's default thresholds.

    .venv/bin/python benchmarks/runtimes.py --data-dir ../shared/data
    .venv/bin/python benchmarks/runtimes.py --pairs b-lenet:lenet --rounds 3 \\
        --latency-samples 1000 --throughput-samples 5000

Measures, per engine:

- batch-1 latency: every image of a class-balanced sample (``--latency-samples``, the
  first images of every class, :func:`training.data.class_balanced_indices`; the same
  images for every engine) classified alone; the median per round and over all rounds;
- throughput: the test split (or a class-balanced ``--throughput-samples`` subset) in
  batches of ``--batch-size``; images per second per round, and the median of rounds;
- agreement with torch: images whose class and exit equal those of the eager engine of
  the same net, as exact counts, at batch ``--batch-size`` over the throughput images
  and at batch 1 over the latency images;
- ratios (speed-ups, > 1 is faster), per round and their median over rounds: to the
  eager plain net of the same round, to the plain net on *its* fastest runtime and
  precision (fastest by the median over rounds, chosen per measure), and for branchy
  nets to the eager branchy engine (today's ``early_exit``).

Per runtime and precision it also profiles the segments: each segment alone
(``executor.segment``) on full batches of ``--profile-samples`` images, no sample leaving,
interleaved like the rest. The *time-ideal gain* charges each sample only the segments
it ran (exit shares of that engine on the throughput images) against the plain net's
time on the same runtime; the *first segment's share* of the plain net's time bounds any
gain from early exit at ``1 / share``, whatever the thresholds. Every profile figure is
computed per round from that round's times and summarised by its median over rounds
(so it pairs with the measured throughput gain of the same rounds).

Prints a markdown table and writes JSON (``--out``), both naming the CPU model and flags,
the runtimes' versions and the thread count.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from models.engine import Executor  # noqa: E402
from models.runtimes import EarlyExitEngine, openvino_has_bf16  # noqa: E402
from training import data as data_mod  # noqa: E402
from training import timing  # noqa: E402
from training.provenance import git_commit, machine_info  # noqa: E402

# (runtime, precision) that the benchmark asks load_engine for, when installed/supported
CANDIDATES = (
    ("torch", "fp32"),
    ("onnxruntime", "fp32"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
)
EAGER = "torch fp32"
# batch-1 images are timed in this many chunks per round, every engine taking its turn
# on a chunk before the next chunk starts (load changes within a round hit all alike)
LATENCY_CHUNKS = 10
THROUGHPUT_CHUNKS = 4  # likewise for the batches (a chunk holds whole batches)
AUTO = "auto"
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
# the goals: branchy (runtime auto) against its plain net on the plain net's
# fastest runtime and precision, (batch-1 latency, batch throughput) speed-ups
GOALS = {"b-alexnet": (1.3, 1.0), "b-lenet": (2.0, 2.0)}
GOAL_VS_EAGER_BRANCHY = 3.5  # branchy batch-1 latency against today's eager early_exit


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", type=Path, default=ROOT / "zoo")
    p.add_argument("--pairs", default="b-lenet:lenet,b-alexnet:alexnet",
                   help="comma list of branchy:plain checkpoint names in --zoo")  # fmt: skip
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"default: ${data_mod.DATA_DIR_ENV}, then ./data")  # fmt: skip
    p.add_argument("--cache-dir", type=Path, default=ROOT / "cache")
    p.add_argument("--runtimes", default="torch,onnxruntime,openvino",
                   help="runtimes to time besides auto (torch, the reference, always)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="threads of every runtime")
    p.add_argument("--latency-samples", type=int, default=1000,
                   help="class-balanced test images timed one by one")  # fmt: skip
    p.add_argument("--throughput-samples", type=int, default=None,
                   help="class-balanced test images per throughput pass (default: all)")  # fmt: skip
    p.add_argument("--profile-samples", type=int, default=2560,
                   help="class-balanced test images per segment-profile pass")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--note", default="", help="a sentence for the report (e.g. machine load)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "runtimes.json")
    p.add_argument("--md", type=Path, default=None, help="also write the markdown here")
    p.add_argument("--render", type=Path, default=None,
                   help="only print (and --md) the markdown of this saved JSON; no timing")  # fmt: skip
    return p


# ---------------------------------------------------------------------------- machine


def cpu_info(path: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU's model name and the SIMD/matrix flags that decide which kernels run."""
    model: str | None = None
    flags: set[str] | None = None
    try:
        lines = path.read_text().splitlines()
    except OSError:  # not Linux
        lines = []
    for line in lines:  # the first processor's entries
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip()
        elif key.strip() == "flags" and flags is None:
            flags = set(value.split())
    return {
        "model": model or platform.processor() or platform.machine(),
        "flags": {f: f in (flags or set()) for f in CPU_FLAGS},
    }


def machine() -> dict[str, Any]:
    """What a benchmark report says of the machine it ran on: the CPU (model and flags),
    its core count, the platform and torch's version."""
    return {
        "cpu": cpu_info(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("onnxruntime", "openvino", "onnx", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------------------- timing


@dataclass
class Entry:
    """One engine of one net, and everything measured for it."""

    net: str  # checkpoint name
    kind: str  # "plain" or "branchy"
    label: str  # "torch fp32", "onnxruntime fp32", ..., or "auto"
    engine: EarlyExitEngine
    thresholds: list[float]
    latency_s: list[list[float]] = field(default_factory=list)  # per round, per image
    rates: list[float] = field(default_factory=list)  # img/s per round
    segments: list[list[float]] = field(default_factory=list)  # per round, s/image/segment
    batch_exits: Tensor | None = None
    batch_preds: Tensor | None = None
    one_exits: list[int] = field(default_factory=list)
    one_preds: list[int] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.net} {self.label}"


def throughput_pass(
    engine: EarlyExitEngine, x: Tensor, thresholds: list[float], batch_size: int
) -> tuple[float, Tensor, Tensor]:
    """All of ``x`` in batches, whole path: seconds, exits and classes."""
    preds, exits = [], []
    t0 = time.perf_counter()
    for start in range(0, x.shape[0], batch_size):
        result = engine.early_exit(x[start : start + batch_size], thresholds)
        preds.append(result.prediction)
        exits.append(result.exit_index)
    seconds = time.perf_counter() - t0
    return seconds, torch.cat(exits), torch.cat(preds)


def segment_seconds(executor: Executor, x: Tensor, batch_size: int) -> list[float]:
    """Seconds spent in each segment (``executor.segment``) on all of ``x`` in batches,
    every sample through every segment, each segment timed alone."""
    totals = [0.0] * executor.num_exits
    clock = time.perf_counter
    with torch.inference_mode():
        for start in range(0, x.shape[0], batch_size):
            chunk = x[start : start + batch_size]
            state = executor.begin(chunk)
            for i in range(executor.num_exits):
                t0 = clock()
                state, _, _ = executor.segment(i, state, one=chunk.shape[0] == 1)
                totals[i] += clock() - t0
    return totals


def ideal_seconds_per_image(segments: Sequence[float], exit_shares: Sequence[float]) -> float:
    """Time per image if a sample leaving at exit k paid segments 0..k and nothing else."""
    if len(segments) != len(exit_shares):
        raise ValueError(
            f"need one exit share per segment ({len(segments)}); got {len(exit_shares)}"
        )
    reached, total = 0.0, 0.0
    for seconds, share in zip(segments, exit_shares, strict=True):
        reached += seconds
        total += share * reached
    return total


def rotated(n: int, round_: int) -> list[int]:
    """The order of round ``round_``: 0..n-1 rotated by the round number."""
    k = round_ % n if n else 0
    return list(range(k, n)) + list(range(k))


def batch_chunks(n: int, batch_size: int, chunks: int) -> list[int]:
    """Boundaries that cut ``n`` images into at most ``chunks`` runs of whole batches."""
    batches = -(-n // batch_size)
    return sorted({min(n, batch_size * round(batches * c / chunks)) for c in range(chunks + 1)})


def run_rounds(
    entries: list[Entry],
    inputs: dict[str, dict[str, Tensor]],
    args: argparse.Namespace,
) -> None:
    """Warm every engine up, then time all of them ``args.rounds`` times, interleaved."""
    for e in entries:
        x = inputs[e.net]
        timing.latency_batch1(e.engine, x["latency"][:20], e.thresholds, warmup=0)
        throughput_pass(e.engine, x["throughput"][: args.batch_size], e.thresholds, args.batch_size)
        segment_seconds(e.engine.executor, x["profile"][: args.batch_size], args.batch_size)
    profiled = [e for e in entries if e.label != AUTO]  # auto repeats one of them
    n_lat = min(x["latency"].shape[0] for x in inputs.values())
    cuts = [round(n_lat * c / LATENCY_CHUNKS) for c in range(LATENCY_CHUNKS + 1)]
    n_tp = min(x["throughput"].shape[0] for x in inputs.values())
    n_pf = min(x["profile"].shape[0] for x in inputs.values())
    tp_cuts = batch_chunks(n_tp, args.batch_size, THROUGHPUT_CHUNKS)
    pf_cuts = batch_chunks(n_pf, args.batch_size, THROUGHPUT_CHUNKS)
    for r in range(args.rounds):
        # batch 1: the images in chunks, the engines taking turns chunk by chunk
        for e in entries:
            e.latency_s.append([])
        for c in range(LATENCY_CHUNKS):
            for k in rotated(len(entries), r * LATENCY_CHUNKS + c):
                e = entries[k]
                chunk = inputs[e.net]["latency"][cuts[c] : cuts[c + 1]]
                one = timing.latency_batch1(e.engine, chunk, e.thresholds, warmup=0)
                e.latency_s[-1] += one.seconds
                if r == 0:
                    e.one_exits += one.exits
                    e.one_preds += one.predictions
        # batches: the images in chunks of whole batches, likewise in turns
        spent = [0.0] * len(entries)
        outs: list[list[tuple[Tensor, Tensor]]] = [[] for _ in entries]
        for c in range(len(tp_cuts) - 1):
            for k in rotated(len(entries), r * THROUGHPUT_CHUNKS + c):
                e = entries[k]
                chunk = inputs[e.net]["throughput"][tp_cuts[c] : tp_cuts[c + 1]]
                took, exits_t, preds_t = throughput_pass(
                    e.engine, chunk, e.thresholds, args.batch_size
                )
                spent[k] += took
                outs[k].append((exits_t, preds_t))
        for k, e in enumerate(entries):
            e.rates.append(n_tp / spent[k])
            if r == 0:
                e.batch_exits = torch.cat([o[0] for o in outs[k]])
                e.batch_preds = torch.cat([o[1] for o in outs[k]])
        # segments alone: likewise
        in_segments = [[0.0] * e.engine.num_exits for e in profiled]
        for c in range(len(pf_cuts) - 1):
            for k in rotated(len(profiled), r * THROUGHPUT_CHUNKS + c):
                e = profiled[k]
                chunk = inputs[e.net]["profile"][pf_cuts[c] : pf_cuts[c + 1]]
                took_each = segment_seconds(e.engine.executor, chunk, args.batch_size)
                in_segments[k] = [a + b for a, b in zip(in_segments[k], took_each, strict=True)]
        for k, e in enumerate(profiled):
            e.segments.append([t / n_pf for t in in_segments[k]])
        sys.stderr.write(f"  round {r + 1}/{args.rounds} done\n")


# ---------------------------------------------------------------------------- results


def _ratio(per_round: list[float]) -> dict[str, Any]:
    return {"per_round": per_round, "median": statistics.median(per_round)}


def latency_ratio(reference: Entry, e: Entry) -> dict[str, Any]:
    """Per round, the reference's median batch-1 latency over this engine's."""
    return _ratio(
        [statistics.median(a) / statistics.median(b) for a, b in zip(reference.latency_s, e.latency_s, strict=True)]
    )  # fmt: skip


def throughput_ratio(reference: Entry, e: Entry) -> dict[str, Any]:
    """Per round, this engine's throughput over the reference's."""
    return _ratio([b / a for a, b in zip(reference.rates, e.rates, strict=True)])


def _agreement(exits: Sequence[int], preds: Sequence[int], ref_exits: Sequence[int],
               ref_preds: Sequence[int]) -> dict[str, Any]:  # fmt: skip
    same = sum(
        1
        for a, b, c, d in zip(exits, preds, ref_exits, ref_preds, strict=True)
        if a == c and b == d
    )
    total = len(exits)
    return {"same": same, "total": total, "share": same / total if total else None}


def _shares(exits: Sequence[int], num_exits: int) -> list[float]:
    counts = torch.bincount(torch.tensor(list(exits), dtype=torch.int64), minlength=num_exits)
    return (counts.double() / max(1, len(exits))).tolist()


def _latency_median(e: Entry) -> float:
    return statistics.median(statistics.median(r) for r in e.latency_s)


def _median_segments(e: Entry) -> list[float]:
    return [statistics.median(t) for t in zip(*e.segments, strict=True)]


def profile_on_runtime(branchy: Entry, plain: Entry, exit_shares: list[float]) -> dict[str, Any]:
    """Time-ideal gain and the first segment's bound on one runtime, per round (from that
    round's segment times and throughputs) and their medians over rounds."""
    per_round: dict[str, list[Any]] = {k: [] for k in (
        "branchy_segment_us_per_image", "plain_us_per_image", "ideal_us_per_image",
        "time_ideal_gain", "first_segment_share_of_plain", "gain_if_all_leave_at_first_exit",
        "measured_throughput_gain", "measured_vs_time_ideal",
    )}  # fmt: skip
    rounds = zip(branchy.segments, plain.segments, branchy.rates, plain.rates, strict=True)
    for seg, plain_seg, b_rate, p_rate in rounds:
        plain_s = sum(plain_seg)
        ideal = ideal_seconds_per_image(seg, exit_shares)
        measured = b_rate / p_rate
        for key, value in (
            ("branchy_segment_us_per_image", [1e6 * t for t in seg]),
            ("plain_us_per_image", 1e6 * plain_s),
            ("ideal_us_per_image", 1e6 * ideal),
            ("time_ideal_gain", plain_s / ideal),
            ("first_segment_share_of_plain", seg[0] / plain_s),
            ("gain_if_all_leave_at_first_exit", plain_s / seg[0]),
            ("measured_throughput_gain", measured),
            ("measured_vs_time_ideal", measured / (plain_s / ideal)),
        ):
            per_round[key].append(value)
    out: dict[str, Any] = {
        "branchy_segment_us_per_image": [
            statistics.median(t)
            for t in zip(*per_round["branchy_segment_us_per_image"], strict=True)
        ],
        "exit_shares": exit_shares,
    }
    for key, values in per_round.items():
        if key != "branchy_segment_us_per_image":
            out[key] = statistics.median(values)
    out["per_round"] = per_round
    return out


def summarise_pair(
    pair: str,
    entries: list[Entry],
    labels: dict[str, dict[str, Tensor]],
    skipped: list[dict],
    batch_size: int,
) -> dict[str, Any]:
    """Rows, profile and goals of one pair, as JSON-able dicts."""
    by_key = {(e.kind, e.label): e for e in entries}
    eager_plain, eager_branchy = by_key[("plain", EAGER)], by_key[("branchy", EAGER)]
    plains = [e for e in entries if e.kind == "plain" and e.label != AUTO]
    fastest_lat = min(plains, key=_latency_median)
    fastest_tput = max(plains, key=lambda e: statistics.median(e.rates))
    rows = []
    for e in entries:
        ref = eager_branchy if e.kind == "branchy" else eager_plain
        assert e.batch_exits is not None and e.batch_preds is not None
        assert ref.batch_exits is not None and ref.batch_preds is not None
        y_tp = labels[e.net]["throughput"]
        flat = [s for r in e.latency_s for s in r]
        row: dict[str, Any] = {
            "net": e.net,
            "kind": e.kind,
            "engine": e.label,
            "runtime": e.engine.runtime,
            "precision": e.engine.precision,
            "reason": e.engine.reason,
            "thresholds": models.exits.encode_thresholds(e.thresholds),
            "latency_ms": {
                "median": 1e3 * _latency_median(e),  # median of the rounds' medians
                "per_round_median": [1e3 * statistics.median(r) for r in e.latency_s],
                "pooled_median": 1e3 * statistics.median(flat),
                "p90": 1e3 * sorted(flat)[int(0.9 * (len(flat) - 1))],
                "p99": 1e3 * sorted(flat)[int(0.99 * (len(flat) - 1))],
                "samples_per_round": len(e.latency_s[0]),
            },
            "throughput_img_s": {
                "median": statistics.median(e.rates),
                "best": max(e.rates),
                "per_round": e.rates,
            },
            "accuracy": float((e.batch_preds == y_tp).double().mean()),
            "exit_shares": _shares(e.batch_exits.tolist(), e.engine.num_exits),
            "exit_shares_batch1": _shares(e.one_exits, e.engine.num_exits),
            "agreement_with_torch": {
                "batch": _agreement(
                    e.batch_exits.tolist(),
                    e.batch_preds.tolist(),
                    ref.batch_exits.tolist(),
                    ref.batch_preds.tolist(),
                ),
                "batch1": _agreement(e.one_exits, e.one_preds, ref.one_exits, ref.one_preds),
            },
            "ratios": {
                "latency_vs_eager_plain": latency_ratio(eager_plain, e),
                "throughput_vs_eager_plain": throughput_ratio(eager_plain, e),
                "latency_vs_fastest_plain": latency_ratio(fastest_lat, e),
                "throughput_vs_fastest_plain": throughput_ratio(fastest_tput, e),
            },
        }
        if e.kind == "branchy":
            row["ratios"]["latency_vs_eager_branchy"] = latency_ratio(eager_branchy, e)
            row["ratios"]["throughput_vs_eager_branchy"] = throughput_ratio(eager_branchy, e)
        if e.segments:
            row["segment_us_per_image"] = [1e6 * s for s in _median_segments(e)]
            row["segment_us_per_image_per_round"] = [[1e6 * s for s in r] for r in e.segments]
        rows.append(row)
    profile = {}
    for e in entries:
        plain = by_key.get(("plain", e.label))
        if e.kind != "branchy" or e.label == AUTO or plain is None:
            continue
        row = next(r for r in rows if r["kind"] == "branchy" and r["engine"] == e.label)
        profile[e.label] = profile_on_runtime(e, plain, row["exit_shares"])
    auto_b, auto_p = by_key[("branchy", AUTO)], by_key[("plain", AUTO)]
    goals = []
    branchy_net = auto_b.net
    if branchy_net in GOALS:
        lat_goal, tput_goal = GOALS[branchy_net]
        goals += [
            _goal(f"{branchy_net} auto vs {auto_p.net} on its fastest ({fastest_lat.label}): "
                  "batch-1 latency", latency_ratio(fastest_lat, auto_b), lat_goal),
            _goal(f"{branchy_net} auto vs {auto_p.net} on its fastest ({fastest_tput.label}): "
                  f"batch-{batch_size} throughput", throughput_ratio(fastest_tput, auto_b),
                  tput_goal),
        ]  # fmt: skip
    goals.append(
        _goal(f"{branchy_net} auto vs eager early_exit: batch-1 latency",
              latency_ratio(eager_branchy, auto_b), GOAL_VS_EAGER_BRANCHY)
    )  # fmt: skip
    return {
        "pair": pair,
        "fastest_plain": {"latency": fastest_lat.label, "throughput": fastest_tput.label},
        "auto": {"branchy": _engine_name(auto_b.engine), "plain": _engine_name(auto_p.engine)},
        "rows": rows,
        "profile": profile,
        "goals": goals,
        "skipped": skipped,
    }


def _goal(what: str, ratio: dict[str, Any], target: float) -> dict[str, Any]:
    measured = ratio["median"]
    return {"goal": what, "measured": measured, "per_round": ratio["per_round"],
            "target": target, "met": measured >= target}  # fmt: skip


def _engine_name(engine: EarlyExitEngine) -> str:
    return f"{engine.runtime} {engine.precision}"


# ---------------------------------------------------------------------------- setup


def build_entries(
    name: str, kind: str, ckpt: models.Checkpoint, args: argparse.Namespace
) -> tuple[list[Entry], list[dict[str, str]]]:
    """One engine per runtime and precision available here, then auto's choice."""
    wanted = {"torch", *(r.strip() for r in args.runtimes.split(",") if r.strip())}
    thresholds = list(ckpt.thresholds)
    entries, skipped = [], []
    for runtime, precision in CANDIDATES:
        label = f"{runtime} {precision}"
        if runtime not in wanted:
            continue
        if precision == "bf16" and not openvino_has_bf16():
            skipped.append({"net": name, "engine": label, "why": "no native bf16 on this CPU"})
            continue
        engine = models.load_engine(ckpt, runtime=runtime, precision=precision,
                                    threads=args.threads, log=_log)  # fmt: skip
        if (engine.runtime, engine.precision) != (runtime, precision):
            skipped.append({"net": name, "engine": label, "why": engine.reason})
            continue
        entries.append(Entry(name, kind, label, engine, thresholds))
    auto = models.load_engine(ckpt, runtime="auto", threads=args.threads, log=_log)
    entries.append(Entry(name, kind, AUTO, auto, thresholds))
    return entries, skipped


def _log(message: str) -> None:
    sys.stderr.write(message + "\n")


def pair_inputs(
    ckpt: models.Checkpoint, test: data_mod.Split, args: argparse.Namespace
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Normalised class-balanced inputs for the three measures, and their labels."""
    spec = ckpt.input_spec
    x = data_mod.normalize(test.images, torch.tensor(spec.mean), torch.tensor(spec.std))
    n = len(test)
    picks = {
        "latency": data_mod.class_balanced_indices(test.labels, args.latency_samples),
        "throughput": data_mod.class_balanced_indices(test.labels, args.throughput_samples or n),
        "profile": data_mod.class_balanced_indices(test.labels, args.profile_samples),
    }
    xs = {k: x[idx].contiguous() for k, idx in picks.items()}
    ys = {k: test.labels[idx] for k, idx in picks.items()}
    return xs, ys


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write the JSON; returns the JSON's content."""
    given = list(sys.argv[1:] if argv is None else argv)
    args = get_args_parser().parse_args(given)
    if args.render is not None:
        saved: dict[str, Any] = json.loads(args.render.read_text())
        _write_markdown(render_markdown(saved), args.md)
        return saved
    data_dir = args.data_dir or data_mod.default_data_dir()
    default_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    commit = git_commit()  # the code that runs (before anything is written)
    pairs = []
    try:
        for pair in args.pairs.split(","):
            b_name, p_name = pair.split(":")
            branchy = models.load_checkpoint(args.zoo / b_name)
            plain = models.load_checkpoint(args.zoo / p_name)
            dataset = branchy.provenance.get("dataset")
            if dataset is None or plain.provenance.get("dataset") != dataset:
                raise SystemExit(f"{pair}: both checkpoints must record the same dataset")
            test, _ = data_mod.load_test_split(dataset, data_dir, cache_dir=args.cache_dir)
            sys.stderr.write(f"{pair}: building engines\n")
            b_entries, b_skipped = build_entries(b_name, "branchy", branchy, args)
            p_entries, p_skipped = build_entries(p_name, "plain", plain, args)
            entries = p_entries + b_entries
            inputs, labels = {}, {}
            for name, ckpt in ((b_name, branchy), (p_name, plain)):
                inputs[name], labels[name] = pair_inputs(ckpt, test, args)
            sys.stderr.write(f"{pair}: timing {len(entries)} engines, {args.rounds} rounds\n")
            run_rounds(entries, inputs, args)
            summary = summarise_pair(pair, entries, labels, p_skipped + b_skipped, args.batch_size)
            summary["dataset"] = dataset
            summary["samples"] = {k: int(v.shape[0]) for k, v in inputs[b_name].items()}
            summary["latency_class_counts"] = torch.bincount(labels[b_name]["latency"]).tolist()
            pairs.append(summary)
    finally:
        torch.set_num_threads(default_threads)
    result = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "benchmarks/runtimes.py", *given]),
        "git_commit": commit,
        "note": args.note,
        "cpu": cpu_info(),
        "machine": machine_info(),
        "versions": versions(),
        "openvino_bf16": openvino_has_bf16(),
        "threads": args.threads,
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "seconds": time.perf_counter() - started,
        "pairs": pairs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    _write_markdown(render_markdown(result), args.md)
    sys.stderr.write(f"wrote {args.out}\n")
    return result


def _write_markdown(md: str, path: Path | None) -> None:
    sys.stdout.write(md)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(md)


# ---------------------------------------------------------------------------- markdown


def _x(v: float) -> str:
    return f"{v:.2f}"


def _pct(shares: Sequence[float]) -> str:
    return "/".join(f"{100 * s:.0f}" for s in shares)


def render_markdown(result: dict[str, Any]) -> str:
    """The tables: one row per engine, the segment profile per runtime, the goals."""
    cpu = result["cpu"]
    flags = ", ".join(f for f, on in cpu["flags"].items() if on) or "none of " + "/".join(CPU_FLAGS)
    v = result["versions"]
    b = result["batch_size"]
    lines = [
        "# Runtimes: plain and branchy nets on every CPU runtime",
        "",
        f"CPU: {cpu['model']} ({result['machine']['cpu_count']} logical CPUs; flags: {flags}; "
        f"OpenVINO bf16 {'available' if result['openvino_bf16'] else 'not available'}). "
        f"torch {v['torch']}, onnxruntime {v['onnxruntime']}, openvino {v['openvino']}; "
        f"{result['threads']} thread(s) for every runtime; {result['rounds']} interleaved rounds.",
    ]
    if result["note"]:
        lines += ["", result["note"]]
    lines += [
        "",
        f"Command: `{result['command']}` (commit {result['git_commit']}, "
        f"{result['seconds']:.0f} s).",
        "",
        "Batch-1: median latency (median of the rounds' medians) over class-balanced test "
        f"images; batch-{b}: images per second (median of rounds). Whole path, input tensor to "
        "predicted class on the host. `×` columns are speed-ups (median of the per-round "
        "ratios): to the eager plain net of the same round, and to the plain net on its "
        "fastest runtime and precision. Agreement: images whose class and exit equal the "
        f"eager engine's, at batch {b} (batch 1 in brackets).",
    ]
    for p in result["pairs"]:
        s = p["samples"]
        lines += [
            "",
            f"## {p['pair']} ({p['dataset']}; {s['latency']} latency images, "
            f"{s['throughput']} throughput images, {s['profile']} profile images)",
            "",
            f"Plain net's fastest: {p['fastest_plain']['latency']} (batch 1), "
            f"{p['fastest_plain']['throughput']} (batch {b}). `auto` picked "
            f"{p['auto']['plain']} for the plain net and {p['auto']['branchy']} for the "
            "branchy one.",
            "",
            f"| Net | Engine | batch-1 ms | × eager plain | × fastest plain | img/s @{b} "
            "| × eager plain | × fastest plain | agree with torch | acc % | exit % |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in p["rows"]:
            q = r["ratios"]
            a = r["agreement_with_torch"]
            engine = (
                r["engine"] if r["engine"] != AUTO else f"auto ({r['runtime']} {r['precision']})"
            )
            lines.append(
                f"| {r['net']} | {engine} | {r['latency_ms']['median']:.3f} | "
                f"{_x(q['latency_vs_eager_plain']['median'])} | "
                f"{_x(q['latency_vs_fastest_plain']['median'])} | "
                f"{r['throughput_img_s']['median']:,.0f} | "
                f"{_x(q['throughput_vs_eager_plain']['median'])} | "
                f"{_x(q['throughput_vs_fastest_plain']['median'])} | "
                f"{a['batch']['same']}/{a['batch']['total']} "
                f"({a['batch1']['same']}/{a['batch1']['total']}) | "
                f"{100 * r['accuracy']:.2f} | {_pct(r['exit_shares'])} |"
            )
        lines += [
            "",
            f"Segment profile per runtime (each segment alone at batch {b}, µs per image). "
            "Time-ideal gain: each sample charged only the segments it ran, against the plain "
            "net on the same runtime; measured gain: the branchy net's throughput over the "
            "plain net's on that runtime; the first segment's share of the plain net's time "
            "caps any gain at 1/share. Each figure: the median over rounds of that round's.",
            "",
            "| Runtime | plain µs | branchy segments µs | exit % | time-ideal gain | "
            "measured gain | measured / ideal | first segment / plain | gain if all leave at exit 1 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, f in p["profile"].items():
            segs = ", ".join(f"{t:.1f}" for t in f["branchy_segment_us_per_image"])
            lines.append(
                f"| {label} | {f['plain_us_per_image']:.1f} | {segs} | {_pct(f['exit_shares'])} "
                f"| {_x(f['time_ideal_gain'])} | {_x(f['measured_throughput_gain'])} | "
                f"{_x(f['measured_vs_time_ideal'])} | "
                f"{100 * f['first_segment_share_of_plain']:.0f} % | "
                f"{_x(f['gain_if_all_leave_at_first_exit'])} |"
            )
        lines += [
            "",
            "| Goal | measured (median) | per round | target | met |",
            "|---|---|---|---|---|",
        ]
        for g in p["goals"]:
            rounds = ", ".join(_x(v) for v in g.get("per_round", []))
            lines.append(
                f"| {g['goal']} | {_x(g['measured'])}x | {rounds} | "
                f"≥ {g['target']}x | {'yes' if g['met'] else 'no'} |"
            )
        for sk in p["skipped"]:
            lines.append(f"\nNot timed: {sk['net']} {sk['engine']} ({sk['why']}).")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
