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

    PYTHONPATH=$PWD:/tmp/site python3 -m benchmarks.gpu.service --zoo zoo \\
        --data-dir /work/shared/data --out OUTDIR [--device cuda] [--images 512] [--seconds 8]

A CPU dry run (half/compile/OOM are skipped there):

    nice -n 10 .venv/bin/python -m benchmarks.gpu.service --zoo zoo \\
        --data-dir /work/shared/data --out /tmp/gpucheck --device cpu --images 128 --seconds 3

Writes ``OUTDIR/gpu_service.json`` (every number, GPU name, torch version, pass/fail per
check) and the server logs ``OUTDIR/server-*.log``, prints a table, and exits 1 when a
check failed (0 when all passed or were skipped).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu.check_latency import check_latency
from benchmarks.gpu.check_oom import check_oom
from benchmarks.gpu.check_served import check_served
from benchmarks.gpu.check_throughput import check_throughput
from benchmarks.gpu.common import MODEL, ROOT, Report, environment, fail, tb
from benchmarks.gpu.reference import Images, Reference, load_images, reference
from benchmarks.gpu.serving import Server
from models import load_checkpoint


def get_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
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
        variants: dict[str, dict[str, str]] = {"fp32": {}}
        if cuda:
            variants["half"] = {"BRANCHY_HALF_PRECISION": "1"}
            variants["compile"] = {"BRANCHY_COMPILE": "1"}
        for name, extra in variants.items():
            try:
                servers[name] = Server(name, args, extra)
            except Exception as exc:
                start_errors[name] = tb(exc)
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

        def serve_check(variant: str, ready_timeout: float, min_pct: float, criterion: str) -> None:
            """Check ``serve_<variant>``: that server's answers against the reference."""
            report.run(
                f"serve_{variant}",
                lambda res: check_served(
                    res, servers[variant], r, im, args, ready_timeout=ready_timeout,
                    min_pct=min_pct, criterion=criterion, start_error=start_errors.get(variant),
                ),
            )  # fmt: skip

        serve_check("fp32", ready_timeout=90, min_pct=99.5, criterion="both_agree_pct")
        serve_check("half", ready_timeout=60, min_pct=98.0, criterion="class_agree_pct")
        finish_server("serve_half", "half")
        report.run("oom_split", lambda res: check_oom(res, r, args))
        # The compile server gets what is left of the budget, less what the rest needs
        # (the served load, two in-process rates, latency, stopping two servers).
        reserve = args.seconds + 25
        serve_check(
            "compile",
            ready_timeout=max(10.0, deadline - time.monotonic() - reserve),
            min_pct=99.5,
            criterion="both_agree_pct",
        )
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
        out["fatal"] = tb(exc)
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
