"""What each hand-tuned part of the eager torch engine buys it, measured by ablation.

``TorchExecutor`` (``models.engine``) runs stages and heads through
``models.inference``, which holds several hand-tuned parts. This benchmark runs
``early_exit`` on the zoo checkpoints with the engine as it is, and with each part
switched off in turn (everything else unchanged), plus the plainest variant (every part
off: ``stage(h)``, ``head(h)``, PyTorch's own layers):

- ``walk``: the module walk instead of ``nn.Module.__call__`` for Conv2d, Linear, Flatten,
  Dropout and the Sequential containers (off: those run as modules; the layers of the
  other parts are still reached, so they still apply);
- ``pool``: max-pooling split into two 1-D poolings (off: ``torch.max_pool2d``);
- ``relu``: ReLU in place on tensors the engine made (off: out of place);
- ``lrn``: LRN by slice additions (off: ``F.local_response_norm``);
- ``shared``: a head's leading layers shared with the next stage run once (off: twice);
- ``entropy1``: ``entropy_of_one`` at batch 1 (off: ``entropy_from_logits``);
- ``thr1``: ``thresholds_for_one`` at batch 1 (off: the threshold tensor path).

Every variant must give the engine's bits (checked before timing). Times are the
calling thread's CPU time (``time.thread_time``; with one torch thread all the work runs
there), so that a machine shared with other jobs, which takes the CPU away for whole
milliseconds, disturbs them less than wall-clock times would. The engine runs twice
(``engine`` and ``engine-again``), so that an A/A comparison
shows the noise. Within a round every test image (class-balanced, ``--images`` of them)
runs through every variant back to back, in a new random order per image, then every
batch of 256 does, so that each variant's time has a partner, the engine's on the same
input a few milliseconds apart, under nearly the same machine load. The figures are
medians: per variant its time (batch-1 latency; images per second at batch 256) and the
median of its paired ratios to the engine (``>1``: slower than the engine, i.e. the part
it lacks helps), with the quartiles of those ratios and the median of each half of the
rounds (two independent estimates, a check on the noise).

    .venv/bin/python benchmarks/eager_parts.py --rounds 20 --images 20
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from benchmarks.runtimes import cpu_info  # noqa: E402
from models import engine, inference  # noqa: E402
from models.engine import TorchExecutor, _TorchState, early_exit  # noqa: E402
from models.exits import entropy_from_logits, entropy_of_one  # noqa: E402
from training import data as data_mod  # noqa: E402
from training.provenance import git_commit, machine_info  # noqa: E402

PARTS = ("walk", "pool", "relu", "lrn", "shared", "entropy1", "thr1")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nets", default="zoo/b-lenet,zoo/lenet,zoo/b-alexnet,zoo/alexnet")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="data sets (default: ../shared/data beside the checkout if present)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--images", type=int, default=20, help="batch-1 calls per variant and round")
    p.add_argument("--batches", type=int, default=1, help="batches per variant and round")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--variants", default="",
                   help="comma-separated subset of the ablations (-walk, ..., plain); default all")  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eager-parts.json")
    return p


class Ablated(TorchExecutor):
    """``TorchExecutor`` with only the parts in ``parts`` (the others as the plain
    PyTorch call would do them). Global hooks are not handled: the benchmark has none."""

    def __init__(self, net: nn.Module, parts: frozenset[str]) -> None:
        super().__init__(net)
        self.parts = parts
        self.bypass = bool(parts & {"walk", "pool", "relu", "lrn"})  # needs the hook checks
        self.inside = bool(parts & {"pool", "relu", "lrn"})  # must reach leaf layers

    def begin(self, x: Tensor) -> _TorchState:
        if self.bypass:
            inference.global_hooks_active()  # what the engine pays per batch
        if "shared" in self.parts and x.shape[0] != 1:
            shared = self.net.shared_prefixes()  # type: ignore[operator]
        else:
            shared = [0] * self.num_exits
        return _TorchState(x, False, 0, shared, False)

    def segment(self, i: int, state: _TorchState, *, one: bool) -> tuple[Any, Tensor, Tensor]:
        stage, head = self._stages[i], self._heads[i]
        last = i == self.num_exits - 1
        prefix = state.shared[i]
        h, owned = self._run(stage, state.h, state.owned, start=state.skip)
        if prefix:
            h, owned = self._run(head, h, owned, stop=prefix)
        z = self._run(head, h, owned and last, start=prefix)[0].float()
        state.h, state.owned, state.skip = h, owned, prefix
        if one and "entropy1" in self.parts:
            e, _ = entropy_of_one(z)
        else:
            e = entropy_from_logits(z)
        return (None if last else state), z, e

    def _run(
        self, m: nn.Module, h: Tensor, owned: bool, *, start: int = 0, stop: int | None = None
    ) -> tuple[Tensor, bool]:
        if start or stop is not None:
            for child in [c for c in m._modules.values() if c is not None][start:stop]:
                h, owned = self._node(child, h, owned)
            return h, owned
        return self._node(m, h, owned)

    def _node(self, m: nn.Module, h: Tensor, owned: bool) -> tuple[Tensor, bool]:
        parts = self.parts
        walk = "walk" in parts
        if self.bypass and inference._has_hooks(m):
            return m(h), False
        kind = type(m)
        if kind is nn.Sequential:
            if not walk and not self.inside:
                return m(h), False
            for child in m._modules.values():
                if child is not None:  # a Sequential's slot may be empty
                    h, owned = self._node(child, h, owned)
            return h, owned
        if kind is nn.ReLU:
            if "relu" in parts and (m.inplace or owned):
                return torch.relu_(h), owned
            return (torch.relu(h) if walk else m(h)), True
        if kind is nn.MaxPool2d:
            pool: nn.MaxPool2d = m  # type: ignore[assignment]  # (the type test above)
            if "pool" in parts:
                return inference._max_pool2d(pool, h), True
            if walk:
                return torch.max_pool2d(
                    h, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode
                ), True
            return m(h), True
        if kind is nn.LocalResponseNorm:
            lrn: nn.LocalResponseNorm = m  # type: ignore[assignment]  # (the type test above)
            if "lrn" in parts:
                return inference._local_response_norm(lrn, h), True
            if walk:
                return F.local_response_norm(h, lrn.size, lrn.alpha, lrn.beta, lrn.k), True
            return m(h), True
        direct = inference._DIRECT.get(kind)
        if direct is None:
            return m(h), False
        fn, fresh = direct
        return (fn(m, h) if walk else m(h)), fresh or owned


def variants(net: models.BranchyNet) -> dict[str, frozenset[str]]:
    """The ablations that apply to ``net`` (a part it has no use for is left out)."""
    kinds = {type(m) for m in net.modules()}
    applies = {
        "walk": True,
        "pool": nn.MaxPool2d in kinds,
        "relu": nn.ReLU in kinds,
        "lrn": nn.LocalResponseNorm in kinds,
        "shared": any(net.shared_prefixes()),
        "entropy1": True,
        "thr1": net.num_exits > 1,
    }
    everything = frozenset(PARTS)
    out = {f"-{p}": everything - {p} for p in PARTS if applies[p]}
    out["plain"] = frozenset()
    return out


@contextlib.contextmanager
def no_thresholds_for_one(parts: frozenset[str] | None) -> Iterator[None]:
    # without thresholds_for_one, plain numbers take the tensor path (threshold_matrix)
    if parts is None or "thr1" in parts:
        yield
        return
    with mock.patch.object(engine, "_plain_numbers", lambda values: False):
        yield


def balanced(x: Tensor, labels: Tensor, n: int) -> Tensor:
    """The first ``n`` images taking classes in turn (the test files come sorted by class
    in some folders, and early classes exit early more often)."""
    per = [torch.nonzero(labels == c).squeeze(1) for c in labels.unique().tolist()]
    order = [int(idx[j]) for j in range(max(len(i) for i in per)) for idx in per if j < len(idx)]
    return x[order[:n]]


def main() -> None:
    args = get_args_parser().parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    need = max(args.images, args.batch_size * args.batches)
    results: dict[str, Any] = {}
    for path in args.nets.split(","):
        ckpt = models.load_checkpoint(path)
        net = ckpt.model
        test, _ = data_mod.load_test_split(
            ckpt.provenance["dataset"], args.data_dir or default_data_dir()
        )
        spec = ckpt.input_spec
        x = data_mod.normalize(
            balanced(test.images, test.labels, need),
            torch.tensor(spec.mean),
            torch.tensor(spec.std),
        )
        thresholds = list(ckpt.thresholds)
        execs: dict[str, tuple[TorchExecutor, frozenset[str] | None]] = {
            "engine": (TorchExecutor(net), None),
            "engine-again": (TorchExecutor(net), None),
        }
        chosen = set(filter(None, args.variants.split(",")))
        for name, parts in variants(net).items():
            if not chosen or name in chosen:
                execs[name] = (Ablated(net, parts), parts)
        batches = [x[k * args.batch_size : (k + 1) * args.batch_size] for k in range(args.batches)]
        ones = [x[k : k + 1] for k in range(args.images)]
        with torch.no_grad():
            # the same bits as the engine, batched and one at a time
            for name, (ex, used) in execs.items():
                with no_thresholds_for_one(used):
                    for inp in (batches[0], *ones[:8]):
                        got = early_exit(ex, inp, thresholds)
                        want = net.early_exit(inp, thresholds)
                        for a, b in zip((got.logits, got.entropy, got.exit_index),
                                        (want.logits, want.entropy, want.exit_index), strict=True):  # fmt: skip
                            if not torch.equal(a, b):
                                raise AssertionError(f"{net.name} {name}: not the engine's bits")
            exits = torch.cat([net.early_exit(b, thresholds).exit_index for b in batches])
            shares = (torch.bincount(exits, minlength=net.num_exits).double() / len(exits)).tolist()
            # CPU seconds per call: one[name][round][image], batch[name][round]
            one: dict[str, list[list[float]]] = {n: [] for n in execs}
            batch: dict[str, list[float]] = {n: [] for n in execs}
            names = list(execs)
            for name in names:  # warm every variant once
                with no_thresholds_for_one(execs[name][1]):
                    early_exit(execs[name][0], batches[0], thresholds)
            for _ in range(args.rounds):
                for name in names:
                    one[name].append([])
                for image in ones:
                    rng.shuffle(names)  # each image runs every variant back to back
                    for name in names:
                        ex, used = execs[name]
                        with no_thresholds_for_one(used):
                            t0 = time.thread_time()
                            early_exit(ex, image, thresholds)
                            one[name][-1].append(time.thread_time() - t0)
                for b in batches:
                    rng.shuffle(names)
                    for name in names:
                        ex, used = execs[name]
                        with no_thresholds_for_one(used):
                            t0 = time.thread_time()
                            early_exit(ex, b, thresholds)
                            batch[name].append(time.thread_time() - t0)
        rows = {}
        half = args.rounds // 2
        for name in execs:
            # ratios > 1: this variant took longer than the engine did on the same input
            # in the same round, i.e. the part it lacks helps
            r1 = [[v / e for v, e in zip(rv, re_, strict=True)]
                  for rv, re_ in zip(one[name], one["engine"], strict=True)]  # fmt: skip
            flat = [r for rs in r1 for r in rs]
            rb = [v / e for v, e in zip(batch[name], batch["engine"], strict=True)]
            nb = len(batches)
            used = execs[name][1]
            rows[name] = {
                "parts": sorted(used) if used is not None else list(PARTS),
                "batch1_ms": statistics.median(t for ts in one[name] for t in ts) * 1e3,
                "batch1_ratio": statistics.median(flat),
                "batch1_ratio_quartiles": _quartiles(flat),
                "batch1_ratio_halves": [
                    statistics.median(r for rs in r1[:half] for r in rs),
                    statistics.median(r for rs in r1[half:] for r in rs),
                ],
                "throughput": args.batch_size / statistics.median(batch[name]),
                "throughput_ratio": statistics.median(rb),
                "throughput_ratio_quartiles": _quartiles(rb),
                "throughput_ratio_halves": [
                    statistics.median(rb[: half * nb]),
                    statistics.median(rb[half * nb :]),
                ],
            }
        results[net.name] = {"checkpoint": path, "exit_shares": shares, "variants": rows}
        print_net(net.name, shares, rows)

    report = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "benchmarks/eager_parts.py", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "machine": machine_info(),
        "cpu": cpu_model(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "threads": args.threads,
        "rounds": args.rounds,
        "variants": args.variants or "all",
        "images": args.images,
        "batches": args.batches,
        "batch_size": args.batch_size,
        "nets": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{report['cpu']}, {args.threads} thread(s), torch {torch.__version__}; "
          f"{args.rounds} rounds; wrote {args.out}")  # fmt: skip


def print_net(name: str, shares: list[float], rows: dict[str, dict[str, Any]]) -> None:
    print(f"\n{name}: exit shares {', '.join(f'{100 * s:.1f}%' for s in shares)}")
    print(
        "| variant | b1 ms | ×engine [quartiles] (halves) | img/s@256 | ×engine [quartiles] (halves) |"
    )
    print("|---|---|---|---|---|")
    for v, r in rows.items():
        q1, q3 = r["batch1_ratio_quartiles"]
        h1, h2 = r["batch1_ratio_halves"]
        t1, t3 = r["throughput_ratio_quartiles"]
        g1, g2 = r["throughput_ratio_halves"]
        print(f"| {v} | {r['batch1_ms']:.3f} | {r['batch1_ratio']:.3f} [{q1:.2f}, {q3:.2f}] "
              f"({h1:.3f}, {h2:.3f}) | {r['throughput']:,.0f} | {r['throughput_ratio']:.3f} "
              f"[{t1:.2f}, {t3:.2f}] ({g1:.3f}, {g2:.3f}) |")  # fmt: skip


def _quartiles(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return [q[0], q[2]]


def default_data_dir() -> Path:
    shared = ROOT.parent / "shared" / "data"
    return shared if shared.is_dir() else data_mod.default_data_dir()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``)."""
    return str(cpu_info()["model"])


if __name__ == "__main__":
    main()
