"""Check ``oom_split``: a batch that really runs out of GPU memory is split and
answered as the same engine answers it in chunks."""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch

from benchmarks.gpu.common import MODEL, Skip, fail
from benchmarks.gpu.reference import Reference
from models import EarlyExitEngine, ExitResult, entropy_from_logits, load_checkpoint
from models.engine import Release


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
        batcher.run_model(engine.runner, x[:256].to(device), thr[:256].to(device))
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

    def spy(
        engine: EarlyExitEngine,
        x: torch.Tensor,
        thresholds: torch.Tensor,
        release: Release | None = None,
    ) -> ExitResult:
        try:
            out = original(engine, x, thresholds, release)
        except torch.cuda.OutOfMemoryError:
            calls.append((x.shape[0], "oom"))
            raise
        calls.append((x.shape[0], "ok"))
        return out

    # torch 2.11 wants an indexed device here ("cuda" alone raised ValueError on the H200)
    torch.cuda.set_per_process_memory_fraction(fraction, torch.cuda.current_device())
    try:
        # 1. The whole batch through plain run_model must really run out of memory.
        plain_oom = False
        try:
            with torch.inference_mode():
                batcher.run_model(engine.runner, x.to(device), thr.to(device))
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
                    batcher.run_model(engine.runner, x[:size].to(device), thr[:size].to(device))
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
