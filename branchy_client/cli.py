"""``branchy``: the command-line client of a branchy-serve server.

::

    branchy classify PATH... [--url URL] [--model NAME] [--thresholds T,...] [--top-k K]
                     [--batch-size N] [--concurrency N] [--format table|json|csv] [--labels]
    branchy models [--format table|json]
    branchy thresholds get MODEL
    branchy thresholds set MODEL (T... | --tolerance F | --target F)

Every error a user can cause (no server, unknown model, unreadable file, admin command
without a token) prints one line starting ``branchy: error:`` and exits with status 1;
bad arguments exit 2. Per-file problems in ``classify`` are reported and skipped, the
other files go on, and the exit status is then 1.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from branchy_client._progress import Progress
from branchy_client.client import (
    TOKEN_ENV,
    URL_ENV,
    AsyncClient,
    Client,
    read_image,
)
from branchy_client.errors import (
    BadRequest,
    BranchyError,
    ImageReadError,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from branchy_client.files import collect_images, label_of
from branchy_client.results import ModelInfo, Prediction, ThresholdState

#: Progress is drawn for more images than this (and only on a terminal, by default).
PROGRESS_MIN_IMAGES = 8
# Answers that concern the images of a request, not the server: retried image by image
# so that one bad file fails alone.
_PER_IMAGE_ERRORS = (BadRequest, UnsupportedMediaType, PayloadTooLarge)


class UsageError(BranchyError):
    """A command line that cannot be carried out (reported as one line, status 1)."""


def fmt_threshold(t: float) -> str:
    return "inf" if math.isinf(t) else f"{t:.4g}"


def fmt_thresholds(ts: Sequence[float]) -> str:
    return ", ".join(fmt_threshold(t) for t in ts) or "-"


def parse_thresholds(text: str) -> list[float]:
    """``"0.05,1.0"`` → ``[0.05, 1.0]``; ``inf`` allowed."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.05,1.0; got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one threshold")
    return values


# ------------------------------------------------------------------------- classify


@dataclass
class Outcome:
    """What ``classify`` found for every file."""

    files: list[Path]
    labels: list[str | None]
    predictions: dict[int, Prediction] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    thresholds: tuple[float, ...] = ()
    seconds: float = 0.0
    requests: int = 0
    round_trips_ms: list[float] = field(default_factory=list)


async def classify_files(
    client: AsyncClient,
    model: str,
    files: list[Path],
    *,
    batch_size: int,
    concurrency: int,
    thresholds: Sequence[float] | None,
    top_k: int | None,
    progress: Progress,
    labels: bool = False,
) -> Outcome:
    """Classify ``files`` with ``concurrency`` requests of up to ``batch_size`` images in
    flight. Unreadable files and images the server refuses are recorded in
    ``Outcome.errors`` and skipped; any other error (server gone, model unloaded)
    stops the run and is raised."""
    out = Outcome(files, [label_of(f) if labels else None for f in files])
    batches: asyncio.Queue[list[int]] = asyncio.Queue()
    for first in range(0, len(files), batch_size):
        batches.put_nowait(list(range(first, min(first + batch_size, len(files)))))

    def read(indices: list[int]) -> list[tuple[int, tuple[str | None, bytes]]]:
        ok = []
        for i in indices:
            try:
                ok.append((i, read_image(files[i])))
            except ImageReadError as exc:
                out.errors[i] = exc.reason
        return ok

    async def send(items: list[tuple[int, tuple[str | None, bytes]]]) -> None:
        try:
            answer = await client.classify(
                model, [data for _, data in items], thresholds=thresholds, top_k=top_k
            )
        except _PER_IMAGE_ERRORS as exc:
            if len(items) > 1:  # find the image(s) at fault: one request each
                for item in items:
                    await send([item])
                return
            out.errors[items[0][0]] = exc.message
            progress.advance(1, 1)
            return
        out.requests += 1
        out.round_trips_ms.append(answer.round_trip_ms)
        out.thresholds = answer.thresholds
        for (i, _), p in zip(items, answer.predictions, strict=True):
            out.predictions[i] = p
        progress.advance(len(items))

    async def worker() -> None:
        while not batches.empty():
            indices = batches.get_nowait()
            items = await asyncio.to_thread(read, indices)
            if len(items) < len(indices):
                progress.advance(len(indices) - len(items), len(indices) - len(items))
            if items:
                await send(items)

    start = time.perf_counter()
    tasks = [asyncio.create_task(worker()) for _ in range(max(1, concurrency))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    out.seconds = time.perf_counter() - start
    return out


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    k = min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))
    return s[k]


def summarise(
    out: Outcome, info: ModelInfo, *, batch_size: int, concurrency: int
) -> dict[str, Any]:
    """Counts, exit shares, throughput and (labels mode) accuracy of a run."""
    preds = out.predictions
    n = len(preds)
    exits = [0] * info.num_exits
    for p in preds.values():
        exits[p.exit_index] += 1
    summary: dict[str, Any] = {
        "model": info.name,
        "thresholds": [fmt_threshold(t) for t in (out.thresholds or info.thresholds)],
        "images": len(out.files),
        "classified": n,
        "failed": len(out.errors),
        "seconds": out.seconds,
        "images_per_second": n / out.seconds if out.seconds > 0 else 0.0,
        "requests": out.requests,
        "batch_size": batch_size,
        "concurrency": concurrency,
        "exit_counts": exits,
        "exit_shares": [c / n if n else 0.0 for c in exits],
        "round_trip_ms": {
            "p50": _percentile(out.round_trips_ms, 0.5),
            "p95": _percentile(out.round_trips_ms, 0.95),
        },
    }
    if any(label is not None for label in out.labels):
        right = [0] * info.num_exits
        unknown = sorted({out.labels[i] or "" for i in preds} - set(info.classes))
        correct = 0
        for i, p in preds.items():
            if p.class_name == out.labels[i]:
                correct += 1
                right[p.exit_index] += 1
        summary["correct"] = correct
        summary["accuracy"] = correct / n if n else 0.0
        summary["exit_accuracy"] = [r / c if c else None for r, c in zip(right, exits, strict=True)]
        summary["unknown_labels"] = unknown
    return summary


def _row(out: Outcome, i: int, p: Prediction, top_k: bool) -> dict[str, Any]:
    row: dict[str, Any] = {
        "file": str(out.files[i]),
        "class_index": p.class_index,
        "class_name": p.class_name,
        "confidence": p.confidence,
        "entropy": p.entropy,
        "exit": p.exit_index,
    }
    if out.labels[i] is not None:
        row["label"] = out.labels[i]
        row["correct"] = p.class_name == out.labels[i]
    if top_k:
        row["top_k"] = [
            {"class_name": c.class_name, "class_index": c.class_index, "probability": c.probability}
            for c in p.top_k
        ]
    return row


def write_rows(out: Outcome, fmt: str, stream: TextIO, *, top_k: bool) -> None:
    """Per-image results as a table or CSV (JSON is written by :func:`write_json`)."""
    rows = [_row(out, i, out.predictions[i], top_k) for i in sorted(out.predictions)]
    if fmt == "csv":
        cols = ["file", "class_index", "class_name", "confidence", "entropy", "exit"]
        if any("label" in r for r in rows):
            cols += ["label", "correct"]
        if top_k:
            cols.append("top_k")
        w = csv.writer(stream, lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            if top_k:
                r["top_k"] = " ".join(
                    f"{c['class_name']}:{c['probability']:.4f}" for c in r["top_k"]
                )
            w.writerow([r.get(c, "") for c in cols])
        return
    header = ["FILE", "CLASS", "CONFIDENCE", "EXIT", "ENTROPY"]
    labelled = any("label" in r for r in rows)
    if labelled:
        header += ["LABEL", "OK"]
    if top_k:
        header.append("TOP-K")
    table = [header]
    for r in rows:
        line = [
            r["file"],
            r["class_name"],
            f"{r['confidence']:.4f}",
            str(r["exit"]),
            f"{r['entropy']:.4f}",
        ]
        if labelled:
            line += [r.get("label", ""), "yes" if r.get("correct") else "no"]
        if top_k:
            line.append(", ".join(f"{c['class_name']} {c['probability']:.3f}" for c in r["top_k"]))
        table.append(line)
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    for row in table:
        stream.write(
            "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n"
        )


def write_json(out: Outcome, summary: dict[str, Any], stream: TextIO, *, top_k: bool) -> None:
    doc = {
        "results": [_row(out, i, out.predictions[i], top_k) for i in sorted(out.predictions)],
        "errors": [{"file": str(out.files[i]), "error": e} for i, e in sorted(out.errors.items())],
        "summary": summary,
    }
    json.dump(doc, stream, indent=1, allow_nan=False, default=str)
    stream.write("\n")


def write_summary(summary: dict[str, Any], stream: TextIO) -> None:
    """The human summary: counts, throughput, exit shares, accuracy."""
    s = summary
    failed = f", {s['failed']} failed" if s["failed"] else ""
    stream.write(
        f"model {s['model']}, thresholds {', '.join(s['thresholds']) or '-'}\n"
        f"{s['classified']} of {s['images']} images classified"
        f"{failed} in {s['seconds']:.2f} s: "
        f"{s['images_per_second']:,.1f} images/s ({s['requests']} requests of up to "
        f"{s['batch_size']} images, {s['concurrency']} in flight)\n"
    )
    shares = ", ".join(f"exit {i} {100 * share:.2f}%" for i, share in enumerate(s["exit_shares"]))
    stream.write(f"exit shares: {shares}\n")
    if "accuracy" in s:
        per_exit = ", ".join(
            f"exit {i} {'-' if a is None else f'{100 * a:.2f}%'}"
            for i, a in enumerate(s["exit_accuracy"])
        )
        stream.write(
            f"accuracy: {100 * s['accuracy']:.2f}% ({s['correct']} of {s['classified']}); "
            f"of the images leaving at each exit: {per_exit}\n"
        )
        if s["unknown_labels"]:
            stream.write(
                f"note: folder names that are not classes of the model (counted wrong): "
                f"{', '.join(s['unknown_labels'][:10])}\n"
            )


async def _pick_model(client: AsyncClient, name: str | None) -> ModelInfo:
    if name is not None:
        return await client.model(name)
    served = await client.models()
    if len(served) == 1:
        return await client.model(served[0].name)
    names = ", ".join(m.name for m in served) or "none"
    raise UsageError(f"the server serves several models ({names}); choose one with --model")


async def _classify(args: argparse.Namespace) -> int:
    files, problems = collect_images(args.paths)
    for p in problems:
        print(f"branchy: {p}", file=sys.stderr)
    if not files:
        raise UsageError("no image files to classify")
    fmt = args.format or "table"
    rows = args.format is not None or not args.labels
    async with AsyncClient(args.url, timeout=args.timeout, retries=args.retries) as client:
        info = await _pick_model(client, args.model)
        show = args.progress if args.progress is not None else sys.stderr.isatty()
        progress = Progress(
            len(files), sys.stderr, enabled=show and len(files) > PROGRESS_MIN_IMAGES
        )
        try:
            out = await classify_files(
                client,
                info.name,
                files,
                batch_size=args.batch_size,
                concurrency=args.concurrency,
                thresholds=args.thresholds,
                top_k=args.top_k,
                progress=progress,
                labels=args.labels,
            )
        finally:
            progress.close()
    for i, err in sorted(out.errors.items()):
        print(f"branchy: {files[i]}: {err} (skipped)", file=sys.stderr)
    summary = summarise(out, info, batch_size=args.batch_size, concurrency=args.concurrency)
    top_k = args.top_k is not None
    if fmt == "json":
        write_json(out, summary, sys.stdout, top_k=top_k)
    else:
        if rows:
            write_rows(out, fmt, sys.stdout, top_k=top_k)
        # With rows on standard output (CSV, or a table to read), the summary goes to
        # standard error; in labels mode it is the output.
        write_summary(summary, sys.stdout if not rows or fmt == "table" else sys.stderr)
    return 1 if out.errors else 0


# --------------------------------------------------------------- models, thresholds


def _models(args: argparse.Namespace) -> int:
    with Client(args.url, timeout=args.timeout, retries=args.retries) as client:
        infos = [client.model(m.name) for m in client.models()]
    if args.format == "json":
        json.dump([dict(i.raw) for i in infos], sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
        return 0
    header = ["NAME", "ARCHITECTURE", "EXITS", "THRESHOLDS", "SOURCE", "DEVICE", "CLASSES",
              "CALIBRATION"]  # fmt: skip
    table = [header] + [
        [
            i.name,
            i.architecture,
            str(i.num_exits),
            fmt_thresholds(i.thresholds),
            i.threshold_source,
            i.device,
            str(len(i.classes)),
            "yes" if i.has_calibration else "no",
        ]
        for i in infos
    ]
    widths = [max(len(r[c]) for r in table) for c in range(len(header))]
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    if not infos:
        print("(no models loaded yet)")
    return 0


def _print_state(state: ThresholdState, fmt: str) -> None:
    if fmt == "json":
        doc = {
            "model": state.model,
            "thresholds": [fmt_threshold(t) if math.isinf(t) else t for t in state.thresholds],
            "source": state.source,
            "updated_at": state.updated_at,
            "expected": None if state.expected is None else vars(state.expected),
        }
        json.dump(doc, sys.stdout, indent=1, default=list)
        sys.stdout.write("\n")
        return
    print(f"{state.model}: thresholds {fmt_thresholds(state.thresholds)} (source {state.source})")
    e = state.expected
    if e is not None:
        shares = ", ".join(f"{100 * s:.2f}%" for s in e.exit_shares)
        print(
            f"on {e.calibration_samples} calibration samples: accuracy {100 * e.accuracy:.2f}%, "
            f"exit shares {shares}, relative cost {e.relative_cost:.3f}"
        )


def _thresholds(args: argparse.Namespace) -> int:
    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise UsageError(
            f"'branchy thresholds' is an admin command: set {TOKEN_ENV} to the server's admin token"
        )
    with Client(args.url, admin_token=token, timeout=args.timeout, retries=args.retries) as c:
        if args.action == "get":
            state = c.get_thresholds(args.model)
        else:
            given = sum(x is not None for x in (args.values or None, args.tolerance, args.target))
            if given != 1:
                raise UsageError(
                    "give the thresholds (one per early exit), or --tolerance, or --target"
                )
            state = c.set_thresholds(
                args.model, args.values or None, tolerance=args.tolerance, target=args.target
            )
    _print_state(state, args.format)
    return 0


# ---------------------------------------------------------------------------- parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1; got {value}")
    return value


def get_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=None,
        help=f"the server (default ${URL_ENV} or http://127.0.0.1:8000)",
    )
    common.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    common.add_argument(
        "--retries", type=int, default=5, help="retries of a 503 answer (honouring Retry-After)"
    )
    parser = argparse.ArgumentParser(
        prog="branchy", description="Command-line client of a branchy-serve server."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "classify",
        parents=[common],
        help="classify image files, folders (recursively) and globs",
        description="Classify images. Folders are walked recursively; patterns with * ? [ "
        "are globs (** recursive). With --labels, each image's folder name is its label "
        "and the summary adds accuracy.",
    )
    c.add_argument("paths", nargs="+", metavar="PATH")
    c.add_argument("--model", help="model name (default: the only one served)")
    c.add_argument(
        "--thresholds", type=parse_thresholds, help="this run's thresholds, e.g. 0.05,1.0"
    )
    c.add_argument("--top-k", type=_positive, help="also show the k most probable classes")
    c.add_argument(
        "--batch-size", type=_positive, default=16, help="images per request (default 16)"
    )
    c.add_argument(
        "--concurrency", type=_positive, default=4, help="requests in flight (default 4)"
    )
    c.add_argument(
        "--format",
        choices=("table", "json", "csv"),
        help="per-image output (default table; with --labels only the summary unless given)",
    )
    c.add_argument(
        "--labels", action="store_true", help="folder names are the labels: report accuracy"
    )
    c.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"progress bar on standard error (default: on a terminal, over "
        f"{PROGRESS_MIN_IMAGES} images)",
    )
    c.set_defaults(handler=lambda a: asyncio.run(_classify(a)))

    m = sub.add_parser("models", parents=[common], help="the models the server serves")
    m.add_argument("--format", choices=("table", "json"), default="table")
    m.set_defaults(handler=_models)

    t = sub.add_parser(
        "thresholds",
        parents=[common],
        help=f"read or set a model's thresholds (admin; token in ${TOKEN_ENV})",
    )
    t.add_argument("action", choices=("get", "set"))
    t.add_argument("model")
    t.add_argument(
        "values", nargs="*", type=float, metavar="T", help="set: one threshold per early exit"
    )
    t.add_argument(
        "--tolerance", type=float, help="set: cheapest within this accuracy drop (fraction)"
    )
    t.add_argument("--target", type=float, help="set: cheapest reaching this accuracy (fraction)")
    t.add_argument("--format", choices=("table", "json"), default="table")
    t.set_defaults(handler=_thresholds)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 an error, 2 bad arguments)."""
    args = get_parser().parse_args(argv)
    if getattr(args, "action", None) == "get" and (args.values or args.tolerance or args.target):
        print("branchy: error: 'thresholds get' takes only the model name", file=sys.stderr)
        return 2
    try:
        return int(args.handler(args))
    except BranchyError as exc:
        print(f"branchy: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("branchy: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `branchy classify ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
