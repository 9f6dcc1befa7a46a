"""The served path side by side with its ceiling and a peer server, in one run.

For a plain checkpoint and its branchy counterpart (default zoo/alexnet, zoo/b-alexnet)
it measures, in interleaved rounds so that a shared machine's drift hits every cell
alike:

* served: one ``python -m service`` process serving both models (the default runtime
  unless ``--runtime``), closed-loop clients (``benchmarks/load.py``'s) at each
  concurrency, with 1 and with 16 CIFAR-10 test JPEGs per multipart request, each model
  at its own checkpoint's thresholds;
* in-process: the same checkpoints on the same runtime (``service.batcher.Engine``,
  what the server runs) on already decoded images, batches of the server's max batch
  size: the ceiling of serving;
* LitServe (when installed, ``pip install -e '.[bench]'``): the same plain checkpoint on
  the same runtime behind LitServe's dynamic batching (``benchmarks/litserve_peer.py``),
  the same client and requests. Skipped with a message when LitServe is not installed
  or does not start.

``auto`` picks a runtime per process from load-time timings, and a close call can go
either way; so the LitServe peer and variant servers (``--variant``) run the runtime and
precision the server chose for each model (``BRANCHY_RUNTIME=model=runtime,...``; a
variant whose runtimes still differ, e.g. one that sets its own, is named in the log and
the JSON).

Only the server being measured runs: the others are stopped (SIGSTOP) meanwhile, and all
of them during the in-process runs (an idle LitServe polls its workers).

It reports img/s, p50/p99 per cell, the CPU cores the server (its whole process tree)
and the client used during the cell, served/in-process, the served early-exit gain
(branchy / plain img/s) over the in-process gain, served/LitServe, and the issue's goals
met or not. Prints a Markdown table; writes JSON and Markdown (``--out``).

    .venv/bin/python benchmarks/serving.py                        # ~4 min on 2 cores
    .venv/bin/python benchmarks/serving.py --duration 1 --rounds 1 --concurrency 2 \\
        --shapes 1 --litserve off --out /tmp/serving.json          # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.load import (  # noqa: E402
    Cell,
    closed_loop,
    multipart,
    summarise_rounds,
    test_images,
)
from benchmarks.runtimes import machine  # noqa: E402
from models import Checkpoint, load_checkpoint  # noqa: E402
from service.batcher import Engine  # noqa: E402
from service.preprocess import preprocess  # noqa: E402
from testsupport.procstat import signal_tree, tree_cpu_seconds  # noqa: E402
from testsupport.server import ServerProcess, free_port  # noqa: E402

logger = logging.getLogger("serving")

# The goals (issue 17), checked on every run.
GOAL_SINGLE_C32 = 0.60  # 1-image requests at the highest concurrency: served / in-process
GOAL_MULTI = 0.85  # 16-image requests: served / in-process
GOAL_GAIN = 0.90  # served early-exit gain / in-process gain
GOAL_PEER = 1.5  # served img/s / LitServe img/s (plain model)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plain-dir", type=Path, default=ROOT / "zoo" / "alexnet")
    p.add_argument("--branchy-dir", type=Path, default=ROOT / "zoo" / "b-alexnet")
    p.add_argument("--runtime", default="auto", help="BRANCHY_RUNTIME of server and ceiling")
    p.add_argument("--torch-threads", type=int, default=1, help="BRANCHY_TORCH_THREADS")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-batch-delay-ms", type=float, default=2.0)
    p.add_argument("--shapes", type=int, nargs="+", default=[1, 16], help="images per request")
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    p.add_argument("--duration", type=float, default=6.0, help="measured seconds per cell")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per cell")
    p.add_argument("--images", type=int, default=512, help="distinct test images to cycle")
    p.add_argument("--litserve", choices=["auto", "off"], default="auto")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE[,VAR=VALUE]",
        help="also serve both models from a server with these extra BRANCHY_* settings, "
        "measured in the same interleaved rounds (an A/B of a setting), e.g. "
        "inline:BRANCHY_INLINE_DECODE_PIXELS=4096",
    )
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to start")
    p.add_argument(
        "--out", type=Path, default=ROOT / "reports" / "serving" / "latest.json", help="JSON"
    )
    return p


class _Repo(ServerProcess):
    """branchy-serve serving the two checkpoints, from a temporary repository."""

    def __init__(
        self,
        dirs: list[Path],
        args: argparse.Namespace,
        tmp: Path,
        extra: dict[str, str] | None = None,
        label: str = "branchy-serve",
    ) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        repo = tmp / "repo"
        repo.mkdir()
        for d in dirs:
            (repo / d.name).symlink_to(d.resolve())
        env = {
            "BRANCHY_MODEL_REPOSITORY": str(repo),
            "BRANCHY_STATE_DIR": str(tmp / "state"),
            "BRANCHY_MAX_BATCH_SIZE": str(args.max_batch_size),
            "BRANCHY_MAX_BATCH_DELAY_MS": str(args.max_batch_delay_ms),
            "BRANCHY_TORCH_THREADS": str(args.torch_threads),
            "BRANCHY_RUNTIME": args.runtime,
            "BRANCHY_LOG_LEVEL": "WARNING",
            "BRANCHY_STATE_POLL_S": "0",  # one server: nothing to poll for
            **(extra or {}),
        }
        super().__init__(env, log_path=tmp / "server.log", name=label, strict=True)


class _OneAtATime:
    """Keeps every server but the one being measured stopped (SIGSTOP to its process
    tree), and all of them during the in-process runs: an idle server is not idle on
    every stack (LitServe's workers poll, about 0.19 core of a 2-core machine while no
    request comes), and those cycles would be taken from whatever is being measured."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = list(dict.fromkeys(pids))
        self.running = set(self.pids)

    def only(self, pid: int | None) -> None:
        """Let ``pid`` run and stop the others (None: stop them all)."""
        for p in self.pids:
            if p == pid and p not in self.running:
                signal_tree(p, signal.SIGCONT)
                self.running.add(p)
            elif p != pid and p in self.running:
                signal_tree(p, signal.SIGSTOP)
                self.running.discard(p)

    def resume_all(self) -> None:
        for p in self.pids:
            if p not in self.running:
                signal_tree(p, signal.SIGCONT)
                self.running.add(p)


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``NAME:VAR=VALUE[,VAR=VALUE]`` -> (name, settings); only ``BRANCHY_*`` variables."""
    name, sep, rest = text.partition(":")
    env = dict(pair.split("=", 1) for pair in rest.split(",") if "=" in pair)
    if not sep or not name or not env or not all(k.startswith("BRANCHY_") for k in env):
        raise SystemExit(f"--variant {text!r}: expected NAME:BRANCHY_VAR=VALUE[,...]")
    return name, env


class _LitServe:
    """``benchmarks/litserve_peer.py`` in its own process (it starts its own workers)."""

    def __init__(
        self, plain: Path, args: argparse.Namespace, tmp: Path, runtime: str, precision: str
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "litserve.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [
            sys.executable,
            str(ROOT / "benchmarks" / "litserve_peer.py"),
            f"--model-dir={plain}",
            f"--port={self.port}",
            f"--max-batch-size={args.max_batch_size}",
            f"--batch-timeout-ms={args.max_batch_delay_ms}",
            f"--runtime={runtime}",
            f"--precision={precision}",
            f"--torch-threads={args.torch_threads}",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BRANCHY_")}
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"LitServe exited with {self.proc.returncode}: {self.tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2.0)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"LitServe not ready after {timeout:.0f} s: {self.tail()}")

    def tail(self, lines: int = 5) -> str:
        self._log.flush()
        return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # its own session: the server and its workers
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        self._log.close()


def client_cpu_s() -> float:
    """This process's CPU seconds (the closed-loop client's threads run here)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _get(url: str, path: str) -> Any:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def batch_totals(url: str) -> dict[str, tuple[float, float, float]]:
    """Per served model: (images, batches, seconds of inference) the server has run so
    far, from its ``branchy_batch_size`` and ``branchy_inference_duration_seconds``
    histograms."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out: dict[str, list[float]] = {}
    slot = {
        "branchy_batch_size_sum": 0,
        "branchy_batch_size_count": 1,
        "branchy_inference_duration_seconds_sum": 2,
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in slot:
                out.setdefault(sample.labels["model"], [0.0, 0.0, 0.0])[slot[sample.name]] += (
                    sample.value
                )
    return {model: (v[0], v[1], v[2]) for model, v in out.items()}


def in_process(
    engine: Engine, xs: torch.Tensor, thresholds: list[float], *, batch: int, seconds: float
) -> tuple[int, float]:
    """Images run and seconds spent by ``engine`` in batches of ``batch`` for ``seconds``."""
    t = torch.tensor([thresholds], dtype=torch.float32)
    done, k, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        lo = (k * batch) % (len(xs) - batch + 1)
        x = xs[lo : lo + batch]
        engine.run(x, t.expand(len(x), -1).contiguous())
        done += len(x)
        k += 1
    return done, time.perf_counter() - start


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.torch_threads)
    plain_ck, branchy_ck = load_checkpoint(args.plain_dir), load_checkpoint(args.branchy_dir)
    names = {"plain": args.plain_dir.name, "branchy": args.branchy_dir.name}
    cks: dict[str, Checkpoint] = {"plain": plain_ck, "branchy": branchy_ck}
    images, source = test_images(plain_ck, args.images)
    tmp = Path(tempfile.mkdtemp(prefix="branchy-serving-"))
    server = _Repo([args.plain_dir, args.branchy_dir], args, tmp / "main")
    variants = [parse_variant(v) for v in args.variant]
    others: dict[str, _Repo] = {}
    peer: _LitServe | None = None
    litserve_note: str | None = None
    served: dict[tuple[str, int, int], list[tuple[Cell, float]]] = {}
    # per cell: server CPU s (its process tree), client CPU s, wall s, summed over rounds
    cores: dict[tuple[str, int, int], list[float]] = {}
    bound: dict[str, list[tuple[int, float]]] = {"plain": [], "branchy": []}
    # per branchy-serve cell: images, batches and inference seconds its model ran
    # during the cell
    batched: dict[tuple[str, int, int], list[float]] = {}
    # in-process at the batch sizes the server formed: {(role, batch): [(images, s)]}
    at_batch: dict[tuple[str, int], list[tuple[int, float]]] = {}
    info: dict[str, Any] = {}
    variant_runtimes: dict[str, dict[str, Any]] = {}  # what each variant server runs
    quiet = _OneAtATime([])
    try:
        server.wait_ready(args.ready_timeout)
        for role in cks:
            info[role] = _get(server.url, f"/v1/models/{names[role]}")
        # Everything else runs the runtime the server chose for each model: `auto`
        # decides per process from load-time timings, and a close call can go either way.
        pin = {"BRANCHY_RUNTIME": ",".join(f"{names[r]}={info[r].get('runtime')}" for r in cks)}
        precisions = {info[r].get("precision") for r in cks}
        if len(precisions) == 1:
            pin["BRANCHY_PRECISION"] = str(precisions.pop())
        for i, (name, env) in enumerate(variants):
            others[name] = _Repo(
                [args.plain_dir, args.branchy_dir], args, tmp / f"v{i}", {**pin, **env}, name
            )
        if args.litserve == "off":
            litserve_note = "skipped: --litserve off"
        else:
            try:
                import litserve  # noqa: F401
            except ImportError:
                litserve_note = "skipped: LitServe is not installed (pip install -e '.[bench]')"
            else:
                plain = info["plain"]
                runtime, precision = str(plain["runtime"]), str(plain["precision"])
                peer = _LitServe(args.plain_dir, args, tmp, runtime, precision)
                litserve_note = f"measured, {names['plain']} on {runtime} {precision}"
        for name, other in others.items():
            other.wait_ready(args.ready_timeout)
            for role in cks:
                got = _get(other.url, f"/v1/models/{names[role]}")
                variant_runtimes.setdefault(name, {})[role] = got.get("runtime")
                if (got.get("runtime"), got.get("precision")) != (
                    info[role].get("runtime"),
                    info[role].get("precision"),
                ):
                    logger.warning(
                        "variant %s runs %s on %s %s, the default server on %s %s: "
                        "its ratios compare runtimes too",
                        name, names[role], got.get("runtime"), got.get("precision"),
                        info[role].get("runtime"), info[role].get("precision"),
                    )  # fmt: skip
        if peer is not None:
            try:
                peer.wait_ready(args.ready_timeout)
            except (RuntimeError, TimeoutError) as exc:
                litserve_note = f"skipped: LitServe did not start ({exc})"
                peer.stop()
                peer = None
        engines: dict[str, Engine] = {}
        thresholds: dict[str, list[float]] = {}
        for role, ck in cks.items():
            runtime = str(info[role].get("runtime", args.runtime))
            engines[role] = Engine(
                ck, torch.device("cpu"), runtime=runtime, threads=args.torch_threads
            )
            thresholds[role] = [float(t) for t in ck.thresholds]
        xs = torch.stack([preprocess(b, plain_ck.input_spec, max_pixels=1 << 24) for b in images])
        xs = xs.repeat(max(1, -(-args.max_batch_size * 2 // len(xs))), 1, 1, 1)
        bodies = {
            n: [
                multipart([images[(k * n + j) % len(images)] for j in range(n)])
                for k in range(max(1, len(images) // n))
            ]
            for n in args.shapes
        }
        targets: list[tuple[str, str, str, int]] = [
            ("branchy-serve", role, server.url, server.pid) for role in ("plain", "branchy")
        ]
        for name, other in others.items():
            targets += [
                (f"branchy-serve[{name}]", role, other.url, other.pid)
                for role in ("plain", "branchy")
            ]
        if peer is not None:
            targets.append(("litserve", "plain", peer.url, peer.proc.pid))
        slice_s = args.duration / args.rounds
        quiet = _OneAtATime([pid for *_, pid in targets])
        for rnd in range(args.rounds):
            for n in args.shapes:
                for c in args.concurrency:
                    for system, role, url, pid in targets:
                        load = {"concurrency": c, "max_requests": 10**7}
                        quiet.only(pid)
                        if rnd == 0:
                            closed_loop(url, names[role], bodies[n], seconds=args.warmup, **load)
                        ours = system.startswith("branchy-serve")
                        b0 = batch_totals(url).get(names[role], (0.0,) * 3) if ours else None
                        s0, c0 = tree_cpu_seconds(pid), client_cpu_s()
                        cell = closed_loop(url, names[role], bodies[n], seconds=slice_s, **load)
                        key = (system + ":" + role, n, c)
                        served.setdefault(key, []).append(cell)
                        spent = cores.setdefault(key, [0.0, 0.0, 0.0])
                        spent[0] += tree_cpu_seconds(pid) - s0
                        spent[1] += client_cpu_s() - c0
                        spent[2] += cell[1]
                        if b0 is not None:
                            b1 = batch_totals(url).get(names[role], (0.0,) * 3)
                            ran = batched.setdefault(key, [0.0, 0.0, 0.0])
                            for k in range(3):
                                ran[k] += b1[k] - b0[k]
            quiet.only(None)
            for role, engine in engines.items():
                bound[role].append(
                    in_process(
                        engine,
                        xs,
                        thresholds[role],
                        batch=args.max_batch_size,
                        seconds=max(0.5, slice_s / 2),
                    )
                )
            logger.info("round %d/%d done", rnd + 1, args.rounds)
        # The same engines at the batch sizes the server formed (rounded means of the
        # default server's cells), also in rounds: with single images a server cannot
        # form the max-size batches of the ceiling above, and the early-exit gain of a
        # small batch is smaller (fixed costs per stage and exit).
        sizes = sorted(
            {
                (who.rpartition(":")[2], max(1, round(ran[0] / ran[1])))
                for (who, _, _), ran in batched.items()
                if who.startswith("branchy-serve:") and ran[1] > 0
            }
        )
        for _ in range(args.rounds if sizes else 0):
            for role, b in sizes:
                at_batch.setdefault((role, b), []).append(
                    in_process(
                        engines[role],
                        xs,
                        thresholds[role],
                        batch=b,
                        seconds=max(0.5, slice_s / 4),
                    )
                )
    finally:
        quiet.resume_all()  # a stopped process would not see SIGTERM
        for label, proc in [("branchy-serve", server), *others.items()]:
            if not proc.alive():  # died during the run: say so before its log is removed
                logger.error(
                    "%s exited with %s during the run; its log ends:\n%s",
                    label,
                    proc.proc.returncode,
                    proc.log_tail(),
                )
        server.stop()
        for other in others.values():
            other.stop()
        if peer is not None:
            peer.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    report: dict[str, Any] = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "machine": {**machine(), "load_average_at_end": list(os.getloadavg())},
        "models": {
            role: {
                "name": names[role],
                "architecture": cks[role].model.name,
                "runtime": info[role].get("runtime"),
                "thresholds": thresholds[role],
            }
            for role in cks
        },
        "images": source,
        "settings": {
            k: getattr(args, k)
            for k in (
                "max_batch_size",
                "max_batch_delay_ms",
                "torch_threads",
                "shapes",
                "concurrency",
                "duration",
                "rounds",
                "warmup",
            )
        },
        "litserve": litserve_note,
        "variants": {name: env for name, env in variants},
        "variant_runtimes": variant_runtimes,
        "in_process": {},
        "in_process_at_batch": {"plain": {}, "branchy": {}},
        "served": [],
    }
    for role, runs in bound.items():
        done, secs = sum(d for d, _ in runs), sum(s for _, s in runs)
        report["in_process"][role] = {"images_per_s": done / secs, "images": done, "seconds": secs}
    for (role, b), runs in sorted(at_batch.items()):
        done, secs = sum(d for d, _ in runs), sum(s for _, s in runs)
        report["in_process_at_batch"][role][str(b)] = done / secs
    for (who, n, c), parts in served.items():
        system, _, role = who.rpartition(":")
        row = summarise_rounds(parts, cks[role].model.num_exits)
        row["round_images_per_s"] = [cell.images / secs for cell, secs in parts]
        server_s, client_s, wall_s = cores[(who, n, c)]
        row["server_cores"] = server_s / wall_s
        row["client_cores"] = client_s / wall_s
        ran_images, ran_batches, ran_s = batched.get((who, n, c), [0.0, 0.0, 0.0])
        row["mean_batch"] = ran_images / ran_batches if ran_batches > 0 else None
        # share of the cell's wall time the batch thread computed (the rest it idled:
        # waiting for images, or for the event loop to hand it the next batch)
        row["engine_busy"] = ran_s / wall_s if ran_batches > 0 else None
        report["served"].append(
            {
                "system": system,
                "model": names[role],
                "role": role,
                "images_per_request": n,
                "concurrency": c,
                **row,
            }
        )
    report["ratios"] = ratios(report)
    report["goals"] = goals(report)
    report["variant_ratios"] = [
        {
            "system": r["system"],
            "role": r["role"],
            "images_per_request": r["images_per_request"],
            "concurrency": r["concurrency"],
            "over_default": r["images_per_s"] / base["images_per_s"],
            # round by round (both servers ran in each round, one after the other): the
            # spread says how much of the ratio is noise
            "over_default_by_round": [
                v / d if d > 0 else None
                for v, d in zip(r["round_images_per_s"], base["round_images_per_s"], strict=True)
            ],
        }
        for r in report["served"]
        if r["system"].startswith("branchy-serve[")
        and (
            base := _row(
                report, "branchy-serve", r["role"], r["images_per_request"], r["concurrency"]
            )
        )
        is not None
        and base["images_per_s"] > 0
    ]
    md = table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)
    print(f"\nwritten {args.out} and {args.out.with_suffix('.md')}")
    return report


def _row(report: dict[str, Any], system: str, role: str, n: int, c: int) -> dict[str, Any] | None:
    for r in report["served"]:
        if (r["system"], r["role"], r["images_per_request"], r["concurrency"]) == (
            system,
            role,
            n,
            c,
        ):
            return r
    return None


def ratios(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (images per request, concurrency): served/in-process for both models, the
    served and in-process early-exit gains and their ratio, served/LitServe."""
    ip = report["in_process"]
    ip_gain = ip["branchy"]["images_per_s"] / ip["plain"]["images_per_s"]
    out = []
    s = report["settings"]
    for n in s["shapes"]:
        for c in s["concurrency"]:
            plain = _row(report, "branchy-serve", "plain", n, c)
            branchy = _row(report, "branchy-serve", "branchy", n, c)
            peer = _row(report, "litserve", "plain", n, c)
            if plain is None or branchy is None:
                continue
            gain = branchy["images_per_s"] / plain["images_per_s"]
            x: dict[str, Any] = {
                "images_per_request": n,
                "concurrency": c,
                "plain_served_over_in_process": plain["images_per_s"] / ip["plain"]["images_per_s"],
                "branchy_served_over_in_process": branchy["images_per_s"]
                / ip["branchy"]["images_per_s"],
                "served_gain": gain,
                "in_process_gain": ip_gain,
                "gain_ratio": gain / ip_gain,
                # the in-process gain and ceilings at the batch sizes served
                "in_process_gain_at_served_batch": None,
                "plain_served_over_in_process_at_served_batch": None,
                "branchy_served_over_in_process_at_served_batch": None,
                "plain_over_litserve": None,
                "plain_over_litserve_by_round": None,
                "branchy_over_litserve": None,
            }
            small = {
                role: at.get(str(max(1, round(row["mean_batch"]))))
                if row.get("mean_batch")
                else None
                for role, row, at in (
                    ("plain", plain, report["in_process_at_batch"]["plain"]),
                    ("branchy", branchy, report["in_process_at_batch"]["branchy"]),
                )
            }
            if small["plain"] and small["branchy"]:
                x["in_process_gain_at_served_batch"] = small["branchy"] / small["plain"]
                x["plain_served_over_in_process_at_served_batch"] = (
                    plain["images_per_s"] / small["plain"]
                )
                x["branchy_served_over_in_process_at_served_batch"] = (
                    branchy["images_per_s"] / small["branchy"]
                )
            if peer is not None and peer["images_per_s"] > 0:
                x["plain_over_litserve"] = plain["images_per_s"] / peer["images_per_s"]
                # round by round (LitServe ran right after the server in each round)
                x["plain_over_litserve_by_round"] = [
                    v / d if d > 0 else None
                    for v, d in zip(
                        plain["round_images_per_s"], peer["round_images_per_s"], strict=True
                    )
                ]
                x["branchy_over_litserve"] = branchy["images_per_s"] / peer["images_per_s"]
            out.append(x)
    return out


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals, each with the measured value and whether it is met."""
    rows = report["ratios"]
    top = max(report["settings"]["concurrency"])
    out = []

    def add(goal: str, value: float | None, target: float) -> None:
        out.append(
            {
                "goal": goal,
                "value": value,
                "target": target,
                "met": None if value is None else value >= target,
            }
        )

    for x in rows:
        n, c = x["images_per_request"], x["concurrency"]
        worst = min(x["plain_served_over_in_process"], x["branchy_served_over_in_process"])
        if n == 1 and c == top:
            add(f"1 image, c={c}: served / in-process (worse model)", worst, GOAL_SINGLE_C32)
        if n > 1:
            add(f"{n} images, c={c}: served / in-process (worse model)", worst, GOAL_MULTI)
        add(f"{n} image(s), c={c}: served gain / in-process gain", x["gain_ratio"], GOAL_GAIN)
        add(f"{n} image(s), c={c}: plain served / LitServe", x["plain_over_litserve"], GOAL_PEER)
    return out


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"`{report['command']}`; CPU {m['cpu']['model']} ({m['cpus']} cores; "
        + (", ".join(k for k, v in m["cpu"].get("flags", {}).items() if v) or "no flags read")
        + "), load average "
        f"at the end {m['load_average_at_end'][0]:.1f}; runtimes "
        + ", ".join(f"{v['name']} {v['runtime']}" for v in report["models"].values())
        + f"; LitServe: {report['litserve']}"
        + "".join(
            f"; [{name}] runtimes "
            + ", ".join(f"{report['models'][role]['name']} {rt}" for role, rt in by_role.items())
            for name, by_role in report.get("variant_runtimes", {}).items()
        ),
        "",
        "| system | model | img/req | c | img/s | p50 ms | p99 ms | errors | server cores "
        "| client cores | mean batch | engine busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["served"]:
        batch = "-" if r.get("mean_batch") is None else f"{r['mean_batch']:.1f}"
        busy = "-" if r.get("engine_busy") is None else f"{r['engine_busy']:.0%}"
        lines.append(
            f"| {r['system']} | {r['model']} | {r['images_per_request']} | {r['concurrency']} | "
            f"{r['images_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | "
            f"{r['server_cores']:.2f} | {r['client_cores']:.2f} | {batch} | {busy} |"
        )
    for role, r in report["in_process"].items():
        lines.append(
            f"| in-process (batch {report['settings']['max_batch_size']}) | "
            f"{report['models'][role]['name']} | - | - | {r['images_per_s']:.0f} | - | - | - | 1 "
            "thread | - | - | - |"
        )
    for role, by_size in report["in_process_at_batch"].items():
        for b, rate in by_size.items():
            lines.append(
                f"| in-process (batch {b}) | {report['models'][role]['name']} | - | - | "
                f"{rate:.0f} | - | - | - | 1 thread | - | {b} | - |"
            )
    lines += [
        "",
        "| img/req | c | plain served/in-process | branchy served/in-process | served gain | "
        "in-process gain | gain ratio | plain/LitServe | at the served batch sizes: plain, "
        "branchy served/in-process, in-process gain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.0f} %"

    for x in report["ratios"]:
        peer = x["plain_over_litserve"]
        at_served = "-"
        if x["in_process_gain_at_served_batch"] is not None:
            at_served = (
                f"{pct(x['plain_served_over_in_process_at_served_batch'])}, "
                f"{pct(x['branchy_served_over_in_process_at_served_batch'])}, "
                f"{x['in_process_gain_at_served_batch']:.2f}x"
            )
        lines.append(
            f"| {x['images_per_request']} | {x['concurrency']} | "
            f"{pct(x['plain_served_over_in_process'])} | "
            f"{pct(x['branchy_served_over_in_process'])} | {x['served_gain']:.2f}x | "
            f"{x['in_process_gain']:.2f}x | {pct(x['gain_ratio'])} | "
            f"{'-' if peer is None else f'{peer:.2f}x'} | {at_served} |"
        )
    for x in report["ratios"]:
        if x["plain_over_litserve_by_round"] is not None:
            lines.append(
                f"- plain served / LitServe, {x['images_per_request']} img/req, "
                f"c={x['concurrency']}, by round: "
                + ", ".join(
                    "-" if v is None else f"{v:.2f}" for v in x["plain_over_litserve_by_round"]
                )
            )
    for v in report["variant_ratios"]:
        lines.append(
            f"- {v['system']}, {v['role']}, {v['images_per_request']} img/req, "
            f"c={v['concurrency']}: {v['over_default']:.2f}x the default server's img/s "
            "(by round: "
            + ", ".join("-" if x is None else f"{x:.2f}" for x in v["over_default_by_round"])
            + ")"
        )
    lines += ["", "Goals (issue 17):", ""]
    for g in report["goals"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
        value = "-" if g["value"] is None else f"{g['value']:.2f}"
        lines.append(f"- {g['goal']}: {value} (target {g['target']}): {verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
