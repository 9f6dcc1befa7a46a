"""One-shot check of the service's CUDA path, prepared for a short run on a rented GPU.

Nobody has run the server on a GPU before; this script exercises the CUDA-only parts
(pinned host memory, ``BRANCHY_HALF_PRECISION``, ``BRANCHY_COMPILE``, batch splitting
after a real ``torch.cuda.OutOfMemoryError``) and measures the served throughput. Every
check runs in its own ``try``; a failure is recorded with its traceback and the others
still run. Every request and subprocess has a timeout.

Checks (model ``b-alexnet`` from ``--zoo``, CIFAR-10 test JPEGs from ``--data-dir``):

1. ``serve_fp32``, ``serve_half``, ``serve_compile``: a real ``python -m service`` process
   per variant (``BRANCHY_DEVICE``; plus ``BRANCHY_HALF_PRECISION=1``; plus
   ``BRANCHY_COMPILE=1``) classifies the first ``--images`` test JPEGs (the files' bytes,
   16 per multipart request, 4 concurrent clients). Each answer's class and exit index is
   compared with the offline reference: the checkpoint on the CPU in float32,
   ``early_exit`` at its default thresholds, on the images decoded and normalised by the
   service's own ``service.preprocess.preprocess``. Disagreements are classified as
   near-ties (a reference entropy within ``--tie-tol`` of a threshold, or a top-2
   probability margin under it). ``branchy_exit_total`` in ``/metrics`` must grow by
   exactly the number of images, per exit as answered.
   Pass: fp32 and compile ≥ 99.5 % class+exit agreement, half ≥ 98 % class agreement,
   no failed request, metrics exact, exit status 0 after SIGTERM.
2. ``oom_split`` (CUDA only): in-process, the service's ``Engine`` with the memory capped
   by ``torch.cuda.set_per_process_memory_fraction`` so that a batch of ``--oom-batch``
   images does not fit. Plain ``service.batcher.run_model`` must raise
   ``torch.cuda.OutOfMemoryError``; ``Engine.run`` (which goes through ``split_on_oom``)
   must then answer every image exactly as the same engine does in chunks of 256
   without a cap (near-ties allowed). Also reports the largest sub-batch the split ran
   against the largest batch that fits fresh under the same cap.
3. ``throughput`` and ``latency_b1``: the fp32 server under ``--seconds`` of closed-loop
   load (16 clients x 16-image requests), against in-process ``early_exit`` on the same
   device at batch 256 (input already on the device, synchronised) and against the
   service's ``Engine.run`` at batch 256 (CPU batch in through pinned memory, answers
   back on the CPU); then the median and p99 of 200 single-image requests.

Run from the repository root (the GPU machine has fastapi & co. in /tmp/site):

    PYTHONPATH=$PWD:/tmp/site python3 benchmarks/gpu_service.py --zoo zoo \\
        --data-dir /work/shared/data --out OUTDIR [--device cuda] [--images 512] [--seconds 8]

A CPU dry run (half/compile/OOM are skipped there):

    nice -n 10 .venv/bin/python benchmarks/gpu_service.py --zoo zoo \\
        --data-dir /work/shared/data --out /tmp/gpucheck --device cpu --images 128 --seconds 3

Writes ``OUTDIR/gpu_service.json`` (every number, GPU name, torch version, pass/fail per
check) and the server logs ``OUTDIR/server-*.log``, prints a table, and exits 1 when a
check failed (0 when all passed or were skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models import Checkpoint, entropy_from_logits, load_checkpoint  # noqa: E402
from service.preprocess import preprocess  # noqa: E402
from testsupport.multipart import encode_multipart, image_parts  # noqa: E402
from testsupport.server import ServerProcess  # noqa: E402

MODEL = "b-alexnet"
MAX_PIXELS = 4096 * 4096
REQUEST_TIMEOUT_S = 30.0


def get_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", type=Path, default=ROOT / "zoo", help="model repository")
    p.add_argument("--data-dir", type=Path, required=True, help="root holding cifar10/test/")
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_service.json")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--images", type=int, default=512, help="test JPEGs to classify")
    p.add_argument("--seconds", type=float, default=8.0, help="served load duration")
    p.add_argument("--clients", type=int, default=16, help="load clients (closed loop)")
    p.add_argument("--per-request", type=int, default=16, help="images per load request")
    p.add_argument("--max-batch-size", type=int, default=256, help="BRANCHY_MAX_BATCH_SIZE")
    p.add_argument("--oom-batch", type=int, default=16384, help="images in the OOM batch")
    p.add_argument("--latency-requests", type=int, default=200)
    p.add_argument("--tie-tol", type=float, default=1e-4, help="near-tie tolerance (nats)")
    p.add_argument("--budget", type=float, default=115.0, help="wall seconds the whole run aims at")
    return p.parse_args()


# --------------------------------------------------------------------------- results


class Report:
    """Per-check results: status pass/fail/skipped, numbers, and a traceback on error."""

    def __init__(self) -> None:
        self.checks: dict[str, dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Run ``fn(result)``; it fills ``result`` and may set ``status``/``reason``."""
        result: dict[str, Any] = {"status": "pass"}
        self.checks[name] = result
        start = time.monotonic()
        try:
            fn(result)
        except Skip as exc:
            result.update(status="skipped", reason=str(exc))
        except BaseException as exc:
            result.update(
                status="fail", reason=f"{type(exc).__name__}: {exc}"[:500], traceback=_tb(exc)
            )
            if isinstance(exc, KeyboardInterrupt):
                raise
        result["seconds"] = round(time.monotonic() - start, 2)
        return result


class Skip(Exception):
    """A check that does not apply here."""


def _tb(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]


def fail(result: dict[str, Any], reason: str) -> None:
    result["status"] = "fail"
    result["reason"] = f"{result['reason']}; {reason}" if result.get("reason") else reason


# --------------------------------------------------------------------------- data


@dataclass
class Images:
    names: list[str]
    data: list[bytes]
    labels: list[int]


def load_images(data_dir: Path, count: int, class_names: list[str]) -> Images:
    """The first ``count`` CIFAR-10 test JPEGs, interleaving classes (0000 of every
    class, then 0001, ...) so that any prefix has every class."""
    test = data_dir / "cifar10" / "test"
    files = sorted(test.glob("*/*.jpg"), key=lambda p: (p.stem, p.parent.name))[:count]
    if len(files) < count:
        raise FileNotFoundError(f"only {len(files)} JPEGs under {test}; {count} asked")
    return Images(
        names=[f"{p.parent.name}/{p.name}" for p in files],
        data=[p.read_bytes() for p in files],
        labels=[class_names.index(p.parent.name) for p in files],
    )


@dataclass
class Reference:
    """Offline answers: CPU, float32, default thresholds, service preprocessing."""

    x: torch.Tensor  # (N, C, H, W) normalised inputs
    thresholds: list[float]
    exit: torch.Tensor  # (N,)
    cls: torch.Tensor  # (N,)
    entropy: torch.Tensor  # (N,) at the exit taken
    all_entropy: torch.Tensor  # (N, E) at every exit
    all_probs: torch.Tensor  # (N, E, C) at every exit


def reference(ckpt: Checkpoint, images: Images) -> Reference:
    spec = ckpt.input_spec
    x = torch.stack([preprocess(d, spec, max_pixels=MAX_PIXELS) for d in images.data])
    model = ckpt.model.float().eval()
    exits, classes, ents, all_logits = [], [], [], []
    with torch.inference_mode():
        for xb in x.split(256):
            r = model.early_exit(xb, ckpt.thresholds)
            exits.append(r.exit_index)
            classes.append(r.logits.argmax(1))
            ents.append(r.entropy)
            all_logits.append(torch.stack([z.float() for z in model(xb)], dim=1))
    logits = torch.cat(all_logits)
    return Reference(
        x=x,
        thresholds=list(ckpt.thresholds),
        exit=torch.cat(exits),
        cls=torch.cat(classes),
        entropy=torch.cat(ents),
        all_entropy=entropy_from_logits(logits),
        all_probs=torch.softmax(logits, dim=-1),
    )


def agreement(
    ref: Reference,
    cls: list[int],
    exit_: list[int],
    entropy: list[float],
    tol: float,
) -> dict[str, Any]:
    """Compare answers with the reference; explain each disagreement."""
    n = len(cls)
    got_cls, got_exit = torch.tensor(cls), torch.tensor(exit_)
    same_cls = got_cls == ref.cls[:n]
    same_exit = got_exit == ref.exit[:n]
    both = same_cls & same_exit
    t = torch.tensor(ref.thresholds)
    details = []
    near = 0
    for k in (~both).nonzero().flatten().tolist():
        re, ge = int(ref.exit[k]), int(got_exit[k])
        item: dict[str, Any] = {"image": k, "ref": [re, int(ref.cls[k])], "got": [ge, cls[k]]}
        if re != ge:
            # The exits up to the later of the two decided differently: distance of the
            # reference entropy from the threshold at the closest one.
            upto = min(max(re, ge) + 1, len(t))
            dist = (ref.all_entropy[k, :upto] - t[:upto]).abs().min().item()
            item["entropy_to_threshold"] = dist
            tie = dist < tol
        else:
            top2 = ref.all_probs[k, re].topk(2).values
            margin = float(top2[0] - top2[1])
            item["top2_margin"] = margin
            tie = margin < tol
        item["near_tie"] = tie
        near += tie
        details.append(item)
    ent_diff = [abs(entropy[k] - float(ref.entropy[k])) for k in range(n) if bool(same_exit[k])]
    return {
        "images": n,
        "class_agree": int(same_cls.sum()),
        "class_agree_pct": 100.0 * float(same_cls.float().mean()),
        "exit_agree": int(same_exit.sum()),
        "exit_agree_pct": 100.0 * float(same_exit.float().mean()),
        "both_agree": int(both.sum()),
        "both_agree_pct": 100.0 * float(both.float().mean()),
        "disagreements": n - int(both.sum()),
        "near_tie_disagreements": near,
        "tie_tol": tol,
        "max_entropy_abs_diff_same_exit": max(ent_diff, default=0.0),
        "disagreement_details": details[:25],
    }


# --------------------------------------------------------------------------- HTTP


class Http:
    """One keep-alive loopback connection, every call with a timeout."""

    def __init__(self, port: int, timeout: float = REQUEST_TIMEOUT_S) -> None:
        self.port, self.timeout = port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, body: bytes | None = None, ctype: str | None = None
    ) -> tuple[int, bytes]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        headers = {"Content-Type": ctype} if ctype else {}
        try:
            self.conn.request(method, path, body=body, headers=headers)
            resp = self.conn.getresponse()
            data = resp.read()
        except Exception:
            self.close()
            raise
        if resp.getheader("connection", "").lower() == "close":
            self.close()
        return resp.status, data

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def multipart(names: list[str], data: list[bytes]) -> tuple[bytes, str]:
    return encode_multipart(image_parts(data, ctype="image/jpeg", names=names))


class Server(ServerProcess):
    """A real ``python -m service`` process serving only ``b-alexnet`` on loopback."""

    def __init__(self, name: str, args: argparse.Namespace, extra: dict[str, str]) -> None:
        self.state_dir = Path(tempfile.mkdtemp(prefix=f"gpucheck-state-{name}-"))
        env = {
            "BRANCHY_MODEL_REPOSITORY": str(args.zoo.resolve()),
            "BRANCHY_MODELS": MODEL,
            "BRANCHY_DEVICE": args.device,
            "BRANCHY_STATE_DIR": str(self.state_dir),
            "BRANCHY_MAX_BATCH_SIZE": str(args.max_batch_size),
            "BRANCHY_GRACEFUL_SHUTDOWN_S": "10",
            "BRANCHY_LOG_LEVEL": "INFO",
            "BRANCHY_STATE_POLL_S": "0",  # one server: nothing to poll for
        }
        if args.device == "cpu":
            if "OMP_NUM_THREADS" not in os.environ:  # a small shared machine
                env["OMP_NUM_THREADS"] = "1"
            env["BRANCHY_TORCH_THREADS"] = "1"
        env.update(extra)
        super().__init__(env, log_path=args.out / f"server-{name}.log", name=name, strict=True)

    def stop(self, timeout: float = 20.0) -> int | None:
        try:
            return super().stop(timeout)
        finally:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def exit_counts(port: int) -> dict[str, float]:
    """``branchy_exit_total{model=b-alexnet}`` per exit label."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = Http(port)
    status, body = conn.request("GET", "/metrics")
    conn.close()
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == "branchy_exit_total" and s.labels.get("model") == MODEL:
                counts[s.labels["exit"]] = counts.get(s.labels["exit"], 0.0) + s.value
    return counts


def classify_all(port: int, images: Images, per_request: int, clients: int) -> list[dict]:
    """Every image's served answer (in input order), several images per request."""
    n = len(images.data)
    chunks = [list(range(i, min(i + per_request, n))) for i in range(0, n, per_request)]
    answers: list[dict | None] = [None] * n
    errors: list[str] = []

    def client(mine: list[list[int]]) -> None:
        conn = Http(port)
        try:
            for idx in mine:
                body, ctype = multipart(
                    [images.names[i] for i in idx], [images.data[i] for i in idx]
                )
                status, data = conn.request("POST", f"/v1/models/{MODEL}/classify", body, ctype)
                if status != 200:
                    errors.append(f"{status}: {data[:300]!r}")
                    continue
                for i, r in zip(idx, json.loads(data)["results"], strict=True):
                    answers[i] = r
        except Exception as exc:
            errors.append(repr(exc))
        finally:
            conn.close()

    threads = [
        threading.Thread(target=client, args=(chunks[k::clients],), daemon=True)
        for k in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S * (len(chunks) // clients + 2))
    if errors or any(a is None for a in answers):
        missing = sum(a is None for a in answers)
        raise RuntimeError(f"{len(errors)} failed request(s), {missing} missing: {errors[:5]}")
    return [a for a in answers if a is not None]


# --------------------------------------------------------------------------- checks


def check_served(
    result: dict[str, Any],
    server: Server | None,
    ref: Reference,
    images: Images,
    args: argparse.Namespace,
    *,
    ready_timeout: float,
    min_pct: float,
    criterion: str,
    start_error: str | None = None,
) -> None:
    """Correctness of one server variant against the offline reference, and metrics."""
    if server is None:
        if start_error:
            raise RuntimeError(f"the server process did not start: {start_error}")
        raise Skip("CUDA-only option; the settings ignore it on the CPU")
    result["env"] = server.env
    result["ready_s"] = round(server.wait_ready(ready_timeout), 2)
    conn = Http(server.port)
    status, body = conn.request("GET", f"/v1/models/{MODEL}")
    conn.close()
    if status != 200:
        raise RuntimeError(f"GET /v1/models/{MODEL} answered {status}: {body[:300]!r}")
    described = json.loads(body)
    result["described"] = {k: described.get(k) for k in ("device", "half_precision", "thresholds")}
    before = exit_counts(server.port)
    start = time.perf_counter()
    answers = classify_all(server.port, images, per_request=16, clients=4)
    result["classify_s"] = round(time.perf_counter() - start, 3)
    after = exit_counts(server.port)

    cls = [a["class_index"] for a in answers]
    ex = [a["exit"]["index"] for a in answers]
    ent = [float(a["entropy"]) for a in answers]
    result.update(agreement(ref, cls, ex, ent, args.tie_tol))
    result["accuracy_pct"] = (
        100.0 * sum(c == y for c, y in zip(cls, images.labels, strict=True)) / len(cls)
    )
    result["reference_accuracy_pct"] = 100.0 * float(
        (ref.cls == torch.tensor(images.labels)).float().mean()
    )
    result["exit_shares_pct"] = {
        str(e): round(100.0 * ex.count(e) / len(ex), 2) for e in sorted(set(ex))
    }

    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    served_per_exit = {str(e): float(ex.count(e)) for e in set(ex)}
    result["metrics_exit_delta"] = delta
    metrics_ok = sum(delta.values()) == len(answers) and all(
        delta.get(k, 0.0) == v for k, v in served_per_exit.items()
    )
    result["metrics_exact"] = metrics_ok
    if not metrics_ok:
        fail(result, f"branchy_exit_total grew by {delta}, answers per exit {served_per_exit}")
    pct = result[criterion]
    result["criterion"] = f"{criterion} >= {min_pct}"
    if pct < min_pct:
        fail(result, f"{criterion} {pct:.2f} % < {min_pct} %")
    if (
        server.env.get("BRANCHY_HALF_PRECISION") == "1"
        and described.get("half_precision") is not True
    ):
        fail(result, "the model does not report half_precision: true")


def check_oom(result: dict[str, Any], ref: Reference, args: argparse.Namespace) -> None:
    """A batch that really runs out of GPU memory is split and answered correctly."""
    device = torch.device(args.device)
    if device.type != "cuda":
        raise Skip("needs CUDA")
    import service.batcher as batcher

    ckpt = load_checkpoint(args.zoo / MODEL, device="cpu")
    engine = batcher.Engine(ckpt, device)  # fp32, as the service builds it
    engine.warm_up([1, 64])
    n = args.oom_batch
    e = engine.num_exits - 1
    reps = math.ceil(n / ref.x.shape[0])
    x = ref.x.repeat(reps, 1, 1, 1)[:n].contiguous()
    # A little noise so the copies of an image are not identical inputs.
    x += 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    thr = torch.tensor(ckpt.thresholds, dtype=torch.float32).expand(n, e).contiguous()

    # Unconstrained answers in chunks of 256 through the same engine, and the entropy at
    # every exit (to tell near-ties).
    chunks = [engine.run(xb, tb) for xb, tb in zip(x.split(256), thr.split(256), strict=True)]
    want_exit = torch.cat([c.exit_index for c in chunks])
    want_cls = torch.cat([c.probabilities.argmax(1) for c in chunks])
    want_probs = torch.cat([c.probabilities for c in chunks])
    with torch.inference_mode():
        all_logits = torch.cat(
            [torch.stack(engine.model(xb.to(device)), dim=1).float().cpu() for xb in x.split(256)]
        )

    # Peak memory per image of a 256 batch, to size the cap at about n/8 images.
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        batcher.run_model(engine.model, x[:256].to(device), thr[:256].to(device))
    torch.cuda.synchronize(device)
    per_image = (torch.cuda.max_memory_allocated(device) - base) / 256
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    reserved = torch.cuda.memory_reserved(device)
    input_bytes = x.numel() * 4 + thr.numel() * 4
    cap = reserved + input_bytes + per_image * (n // 8) + (64 << 20)
    fraction = min(cap / total, 0.9)
    result.update(
        batch=n,
        per_image_peak_bytes=round(per_image),
        cap_bytes=round(fraction * total),
        memory_fraction=round(fraction, 5),
        total_memory_bytes=total,
    )

    calls: list[tuple[int, str]] = []
    original = batcher.run_model

    def spy(model: Any, xb: torch.Tensor, tb: torch.Tensor) -> Any:
        try:
            out = original(model, xb, tb)
        except torch.cuda.OutOfMemoryError:
            calls.append((xb.shape[0], "oom"))
            raise
        calls.append((xb.shape[0], "ok"))
        return out

    # torch 2.11 wants an indexed device here ("cuda" alone raised ValueError on the H200)
    torch.cuda.set_per_process_memory_fraction(fraction, torch.cuda.current_device())
    try:
        # 1. The whole batch through plain run_model must really run out of memory.
        plain_oom = False
        try:
            with torch.inference_mode():
                batcher.run_model(engine.model, x.to(device), thr.to(device))
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            plain_oom = True
        torch.cuda.empty_cache()
        result["plain_run_model_raised_oom"] = plain_oom

        # 2. The largest power-of-two batch that fits fresh under the cap.
        fits_fresh = 0
        size = n // 2
        while size >= 1 and not fits_fresh:
            try:
                with torch.inference_mode():
                    batcher.run_model(engine.model, x[:size].to(device), thr[:size].to(device))
                torch.cuda.synchronize(device)
                fits_fresh = size
            except torch.cuda.OutOfMemoryError:
                size //= 2
            torch.cuda.empty_cache()
        result["largest_fresh_batch_under_cap"] = fits_fresh

        # 3. The service path: Engine.run -> split_on_oom -> run_model.
        batcher.run_model = spy
        split_error: BaseException | None = None
        try:
            start = time.perf_counter()
            got = engine.run(x, thr)
            result["split_run_s"] = round(time.perf_counter() - start, 3)
        except torch.cuda.OutOfMemoryError as exc:
            split_error = exc
        finally:
            batcher.run_model = original
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
        torch.cuda.empty_cache()

    ok_sizes = [s for s, what in calls if what == "ok"]
    result.update(
        run_model_calls=len(calls),
        ooms_in_split=sum(what == "oom" for _, what in calls),
        largest_split_batch_ok=max(ok_sizes, default=0),
        smallest_split_batch_ok=min(ok_sizes, default=0),
        split_sub_batches_ok=len(ok_sizes),
        # The first calls in order: (sub-batch size, "ok" | "oom").
        split_call_trace=[f"{size}:{what}" for size, what in calls[:60]],
    )
    if split_error is not None:
        # Raised out of split_on_oom: even single images did not fit (the failed
        # attempts' tensors may still be referenced while the halves run).
        raise RuntimeError(
            f"Engine.run raised OutOfMemoryError after {len(calls)} run_model calls "
            f"(largest batch fitting fresh under the cap: {fits_fresh})"
        ) from split_error
    got_exit, got_cls = got.exit_index, got.probabilities.argmax(1)
    bad = ((got_exit != want_exit) | (got_cls != want_cls)).nonzero().flatten().tolist()
    t = torch.tensor(ckpt.thresholds)
    all_entropy = entropy_from_logits(all_logits)
    all_probs = torch.softmax(all_logits, dim=-1)
    not_ties = []
    for k in bad:
        we, ge = int(want_exit[k]), int(got_exit[k])
        if we != ge:
            upto = min(max(we, ge) + 1, e)
            tie = (all_entropy[k, :upto] - t[:upto]).abs().min().item() < args.tie_tol * 10
        else:
            top2 = all_probs[k, we].topk(2).values
            tie = float(top2[0] - top2[1]) < args.tie_tol * 10
        if not tie:
            not_ties.append(k)
    result.update(
        answered=int(got_exit.shape[0]),
        mismatches_vs_chunks=len(bad),
        mismatches_not_near_tie=len(not_ties),
        max_prob_abs_diff=float((got.probabilities - want_probs).abs().max()),
    )
    if not plain_oom:
        fail(result, "plain run_model did not raise OutOfMemoryError under the cap")
    if not result["ooms_in_split"]:
        fail(result, "the service path never hit OutOfMemoryError (nothing was split)")
    if result["answered"] != n or not_ties:
        fail(result, f"{len(not_ties)} answer(s) differ from the chunked run (not near-ties)")


def check_throughput(
    result: dict[str, Any], server: Server, ref: Reference, images: Images, args: argparse.Namespace
) -> None:
    """Served images/s under closed-loop load against in-process early_exit."""
    device = torch.device(args.device)
    k = args.per_request
    bodies = [
        multipart(images.names[i : i + k], images.data[i : i + k])
        for i in range(0, len(images.data) - k + 1, k)
    ]
    done = [0] * args.clients
    errors: list[str] = []
    stop_at = time.monotonic() + args.seconds

    def client(c: int) -> None:
        conn = Http(server.port)
        j = c
        try:
            while time.monotonic() < stop_at:
                body, ctype = bodies[j % len(bodies)]
                status, data = conn.request("POST", f"/v1/models/{MODEL}/classify", body, ctype)
                if status == 200:
                    done[c] += k
                else:
                    errors.append(f"{status}: {data[:200]!r}")
                j += args.clients
        except Exception as exc:
            errors.append(repr(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(args.clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.seconds + REQUEST_TIMEOUT_S)
    elapsed = time.monotonic() - start
    served = sum(done) / elapsed
    result.update(
        served_images_per_s=round(served, 1),
        served_seconds=round(elapsed, 2),
        clients=args.clients,
        images_per_request=k,
        max_batch_size=args.max_batch_size,
        load_errors=len(errors),
        load_error_samples=errors[:5],
    )

    # In-process: the same images at batch 256, same device, synchronised.
    ckpt = load_checkpoint(args.zoo / MODEL, device="cpu")
    model = ckpt.model.to(device).eval()
    reps = math.ceil(256 / ref.x.shape[0])
    x_cpu = ref.x.repeat(reps, 1, 1, 1) if reps > 1 else ref.x
    batches_cpu = [b for b in x_cpu.split(256) if b.shape[0] == 256]
    batches = [b.to(device) for b in batches_cpu]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    seconds = min(args.seconds, 2.0)

    def rate(step: Callable[[int], None]) -> float:
        for i in range(3):
            step(i)
        sync()
        count, i, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            step(i)
            count += 256
            i += 1
        sync()
        return count / (time.perf_counter() - t0)

    with torch.inference_mode():
        inproc = rate(lambda i: model.early_exit(batches[i % len(batches)], ckpt.thresholds))
    import service.batcher as batcher

    engine = batcher.Engine(load_checkpoint(args.zoo / MODEL, device="cpu"), device)
    thr = torch.tensor(ckpt.thresholds, dtype=torch.float32).expand(256, len(ckpt.thresholds))
    engine_rate = rate(lambda i: engine.run(batches_cpu[i % len(batches_cpu)], thr))
    result.update(
        inprocess_early_exit_images_per_s=round(inproc, 1),
        inprocess_engine_run_images_per_s=round(engine_rate, 1),
        served_over_inprocess=round(served / inproc, 3),
        served_over_engine_run=round(served / engine_rate, 3),
    )
    if errors or served <= 0:
        fail(result, f"{len(errors)} failed load request(s), {served:.1f} images/s")


def check_latency(
    result: dict[str, Any], server: Server, images: Images, args: argparse.Namespace
) -> None:
    """Batch-1 served latency: sequential single-image raw-body requests."""
    conn = Http(server.port)
    lat, errors = [], 0
    try:
        for i in range(5):  # warm the connection and the batch-1 path
            conn.request("POST", f"/v1/models/{MODEL}/classify", images.data[i], "image/jpeg")
        for i in range(args.latency_requests):
            data = images.data[i % len(images.data)]
            t0 = time.perf_counter()
            status, _ = conn.request("POST", f"/v1/models/{MODEL}/classify", data, "image/jpeg")
            lat.append(time.perf_counter() - t0)
            errors += status != 200
    finally:
        conn.close()
    lat.sort()
    result.update(
        requests=len(lat),
        errors=errors,
        p50_ms=round(1e3 * statistics.median(lat), 3),
        p99_ms=round(1e3 * lat[min(len(lat) - 1, math.ceil(0.99 * len(lat)) - 1)], 3),
        mean_ms=round(1e3 * statistics.fmean(lat), 3),
    )
    if errors:
        fail(result, f"{errors} failed request(s)")


# --------------------------------------------------------------------------- main


def environment(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "host_cpus": os.cpu_count(),
        "device": device,
    }
    if torch.cuda.is_available() and device.startswith("cuda"):
        dev = torch.device(device)
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(dev).total_memory
        with contextlib.suppress(Exception):
            info["cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
            info["matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return info


def table(report: Report) -> str:
    def fmt(name: str, r: dict[str, Any]) -> str:
        if (
            r["status"] != "pass"
            and "reason" in r
            and not any(
                k in r for k in ("both_agree_pct", "served_images_per_s", "p50_ms", "answered")
            )
        ):
            return r["reason"].splitlines()[0][:110]
        if name.startswith("serve_"):
            return (
                f"class {r['class_agree_pct']:.2f}%  exit {r['exit_agree_pct']:.2f}%  "
                f"both {r['both_agree_pct']:.2f}% ({r['disagreements']} differ, "
                f"{r['near_tie_disagreements']} near-ties)  metrics "
                f"{'exact' if r['metrics_exact'] else 'WRONG'}  ready {r['ready_s']} s  "
                f"exit code {r.get('exit_code')}"
            )
        if name == "oom_split":
            return (
                f"batch {r['batch']}: plain OOM {r['plain_run_model_raised_oom']}, "
                f"{r['ooms_in_split']} OOMs split, sub-batches {r['largest_split_batch_ok']}"
                f"..{r['smallest_split_batch_ok']} (fresh fit {r['largest_fresh_batch_under_cap']})"
                f", {r['mismatches_vs_chunks']} mismatches ({r['mismatches_not_near_tie']} real)"
            )
        if name == "throughput":
            return (
                f"served {r['served_images_per_s']:.0f} img/s vs early_exit "
                f"{r['inprocess_early_exit_images_per_s']:.0f} ({r['served_over_inprocess']:.0%}),"
                f" Engine.run {r['inprocess_engine_run_images_per_s']:.0f} img/s, "
                f"{r['load_errors']} errors"
            )
        if name == "reference":
            shares = ", ".join(f"{v:.1f}" for v in r["exit_shares_pct"].values())
            return (
                f"{r['images']} images on the CPU, accuracy {r['accuracy_pct']:.1f}%, "
                f"exits {shares}%"
            )
        if name == "latency_b1":
            return (
                f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  over {r['requests']}, "
                f"{r['errors']} errors"
            )
        return r.get("reason", "")

    lines = ["| check | status | s | result |", "|---|---|---|---|"]
    for name, r in report.checks.items():
        text = fmt(name, r)
        if r["status"] == "fail" and r.get("reason") and r["reason"][:40] not in text:
            text += " — " + r["reason"].splitlines()[0][:160]
        lines.append(
            f"| {name} | {r['status']} | {r.get('seconds', '')} | {text.replace('|', '/')} |"
        )
    return "\n".join(lines)


def main() -> int:
    args = get_args()
    t_start = time.monotonic()
    deadline = t_start + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cpu":
        torch.set_num_threads(1)  # like the server's BRANCHY_TORCH_THREADS=1 here
    cuda = args.device.startswith("cuda")
    report = Report()
    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    out["environment"] = environment(args.device)
    servers: dict[str, Server | None] = {}
    start_errors: dict[str, str] = {}
    out["start_errors"] = start_errors
    ref: Reference | None = None
    images: Images | None = None

    def finish_server(check: str, name: str, timeout: float = 20.0) -> None:
        server = servers.get(name)
        if server is None:
            return
        code = server.stop(timeout)
        result = report.checks.get(check)
        if result is not None and result["status"] != "skipped":
            result["exit_code"] = code
            if code != 0:
                fail(result, f"server exit status {code} after SIGTERM (want 0)")
        servers[name] = None

    try:
        # Start every variant at once: their start-up (CUDA, warm-up, torch.compile)
        # overlaps with the reference computation and with each other.
        variants = {"fp32": {}}
        if cuda:
            variants["half"] = {"BRANCHY_HALF_PRECISION": "1"}
            variants["compile"] = {"BRANCHY_COMPILE": "1"}
        for name, extra in variants.items():
            try:
                servers[name] = Server(name, args, extra)
            except Exception as exc:
                start_errors[name] = _tb(exc)
                servers[name] = None
        for name in ("half", "compile"):
            servers.setdefault(name, None)

        def prepare(result: dict[str, Any]) -> None:
            nonlocal ref, images
            ckpt = load_checkpoint(args.zoo / MODEL, device="cpu")
            images = load_images(args.data_dir, args.images, list(ckpt.class_names))
            ref = reference(ckpt, images)
            labels = torch.tensor(images.labels)
            result.update(
                images=len(images.data),
                thresholds=ref.thresholds,
                accuracy_pct=100.0 * float((ref.cls == labels).float().mean()),
                exit_shares_pct={
                    str(e): 100.0 * float((ref.exit == e).float().mean())
                    for e in range(len(ref.thresholds) + 1)
                },
            )

        report.run("reference", prepare)
        if ref is None or images is None:
            raise RuntimeError("no reference answers; nothing to compare with")
        r, im = ref, images

        report.run(
            "serve_fp32",
            lambda res: check_served(
                res, servers["fp32"], r, im, args, ready_timeout=90,
                min_pct=99.5, criterion="both_agree_pct",
                start_error=start_errors.get("fp32"),
            ),
        )  # fmt: skip
        report.run(
            "serve_half",
            lambda res: check_served(
                res, servers["half"], r, im, args, ready_timeout=60,
                min_pct=98.0, criterion="class_agree_pct",
                start_error=start_errors.get("half"),
            ),
        )  # fmt: skip
        finish_server("serve_half", "half")
        report.run("oom_split", lambda res: check_oom(res, r, args))
        # The compile server gets what is left of the budget, less what the rest needs
        # (the served load, two in-process rates, latency, stopping two servers).
        reserve = args.seconds + 25
        report.run(
            "serve_compile",
            lambda res: check_served(
                res, servers["compile"], r, im, args,
                ready_timeout=max(10.0, deadline - time.monotonic() - reserve),
                min_pct=99.5, criterion="both_agree_pct",
                start_error=start_errors.get("compile"),
            ),
        )  # fmt: skip
        finish_server("serve_compile", "compile", timeout=10.0)

        fp32 = servers["fp32"]
        if fp32 is not None and report.checks["serve_fp32"].get("ready_s") is not None:
            report.run("throughput", lambda res: check_throughput(res, fp32, r, im, args))
            report.run("latency_b1", lambda res: check_latency(res, fp32, im, args))
        else:
            for name in ("throughput", "latency_b1"):
                report.run(name, lambda res: fail(res, "the fp32 server is not serving"))
        finish_server("serve_fp32", "fp32")
    except Exception as exc:
        out["fatal"] = _tb(exc)
    finally:
        for server in servers.values():
            if server is not None:
                server.stop()

    out["checks"] = report.checks
    out["passed"] = {k: v["status"] for k, v in report.checks.items()}
    out["wall_s"] = round(time.monotonic() - t_start, 1)
    path = args.out / "gpu_service.json"
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    env = out["environment"]
    print(f"\n{env.get('gpu', 'no GPU')} | torch {env['torch']} | device {args.device}")
    print(table(report))
    print(f"\nwall {out['wall_s']} s; details in {path}")
    if "fatal" in out:
        print(out["fatal"], file=sys.stderr)
    failed = [k for k, v in report.checks.items() if v["status"] == "fail"]
    return 1 if failed or "fatal" in out else 0


if __name__ == "__main__":
    sys.exit(main())
