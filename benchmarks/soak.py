"""Soak test: a real server process under a mix of valid and invalid requests while an
operator changes the thresholds every second (issue 5).

    python benchmarks/soak.py                       # 60 s, concurrency 32
    python benchmarks/soak.py --duration 10         # the short CI version

Loopback only. The server runs in a child process (``python -m service``) on a seeded,
freshly initialised B-LeNet unless ``--model-repository``/``--model`` name another.

Pass criteria (all must hold; the exit status is 1 otherwise):

1. no 5xx answer, no transport error, no request left unanswered at the timeout;
2. every valid request answered 200 and correctly: per image, class and exit equal the
   offline ``early_exit`` of the same pixels with the thresholds in force;
3. every invalid request answered with its contract 4xx status and error code;
4. the increase of ``branchy_exit_total`` equals the images answered, exit by exit;
5. the server's resident memory grows less than 10 % from the end of the warm-up to the
   end of the run.

Which thresholds were in force? Requests of the ``per_request`` kind carry their own
thresholds (``?thresholds=``), so their answer key is exact. The others use the model's
thresholds, which an admin task replaces every second with the next setting of a fixed
cycle. The admin task is the only writer and waits for each PUT's answer, so the k-th
setting takes effect at one instant inside its PUT ``[start_k, ack_k]``, and the k-th
change happens after the (k-1)-th. A batch reads the thresholds once, at an instant inside
its request's ``[send, receive]``. So the setting in force is one of: the last setting
acknowledged before ``send``, or any setting whose PUT started before ``receive``. The
answer must equal offline evaluation under one of these candidates; almost always there
is only one (a request lasts milliseconds, a setting a second), and the report counts
the requests checked against a single candidate. Images close to a decision boundary
(an entropy within ``--margin`` of a threshold, relative to it, or a top-2 logit gap
under ``--margin``) are left out of the image pool beforehand, so the check is exact and
not flaky: batch composition may change a float's last bits, never a decision made with
a margin.

``--model-repository zoo --images mnist`` soaks the committed, trained B-LeNet with MNIST
test digits (``--images cifar10`` for a 3x32x32 model) instead.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gzip
import json
import logging
import math
import random
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

# A script in the repository: make the repository's packages importable when run as
# `python benchmarks/soak.py` (sys.path[0] is benchmarks/ then).
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from testsupport import badimages as bad  # noqa: E402
from testsupport.reliability import (  # noqa: E402
    ADMIN_TOKEN,
    OfflineReference,
    make_repository,
    metric_by,
    parse_metrics,
    reliability_server,
    rss_bytes,
    spaced_thresholds,
)
from testsupport.server import ServerProcess  # noqa: E402

logger = logging.getLogger("soak")

# Request kinds and their shares of the traffic.
MIX = {
    "raw": 0.30,  # one PNG as the raw body, model thresholds
    "multipart": 0.20,  # 2..6 PNGs in one multipart body, model thresholds
    "per_request": 0.15,  # one PNG with ?thresholds=..., exact answer key
    "v2": 0.15,  # Open Inference Protocol v2 UINT8 tensor, model thresholds
    "invalid": 0.20,  # one of the bad-input cases of testsupport/badimages.py
}
# Bad cases left out of the mix: they are slow to build or send on every draw and are
# covered by tests/service/test_bad_input.py.
SKIP_BAD = {"raw_body_over_limit", "raw_bomb_full_6000x6000"}


@dataclasses.dataclass
class Record:
    """One request of the run."""

    kind: str
    send: float
    recv: float = math.nan
    status: int = 0
    images: tuple[int, ...] = ()
    setting: int | None = None  # per-request thresholds: index into the settings
    answers: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    reported: list[float] | None = None  # thresholds the server says it used (v1 only)
    expect_status: int = 200
    expect_codes: frozenset[str] = frozenset()
    code: str = ""
    error: str = ""


@dataclasses.dataclass
class Change:
    """One admin threshold change."""

    setting: int
    start: float
    ack: float = math.nan
    status: int = 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=32, help="clients in flight")
    p.add_argument("--warmup", type=float, default=None, help="seconds (default min(10, d/4))")
    p.add_argument("--change-every", type=float, default=1.0, help="seconds between changes")
    p.add_argument("--pool", type=int, default=96, help="distinct test images")
    p.add_argument(
        "--margin",
        type=float,
        default=1e-3,
        help="decision margin of the pool (logit gap; relative for entropies)",
    )
    p.add_argument("--max-rss-growth", type=float, default=0.10, help="allowed RSS growth")
    p.add_argument("--model-repository", type=Path, default=None)
    p.add_argument("--model", default="b-lenet", help="model name in the repository")
    p.add_argument(
        "--images",
        choices=["synthetic", "mnist", "cifar10"],
        default="synthetic",
        help="image pool: seeded synthetic pixels, or test-split images of a data set",
    )
    p.add_argument(
        "--data-root",
        type=Path,
        default=REPO_ROOT.parent / "shared" / "data",
        help="folder holding mnist/ and cifar10/ (see its README)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=30.0, help="per-request client timeout")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks/results/soak.json")
    p.add_argument("--workdir", type=Path, default=None, help="server log/state (default tmp)")
    return p


# --------------------------------------------------------------------------- set-up


@dataclasses.dataclass
class Plan:
    """Everything fixed before the load starts."""

    target: bad.Target
    pool: np.ndarray  # (N, H, W, C) uint8
    pngs: list[bytes]
    settings: list[list[float]]
    # expected[k][i] = (class, exit) of image i under settings[k]
    expected: list[list[tuple[int, int]]]
    bad_cases: list[bad.BadCase]


def make_plan(ref: OfflineReference, model: str, args: argparse.Namespace) -> Plan:
    c, h, w = ref.spec.shape
    e = ref.num_exits - 1
    candidates = load_pool(args, (c, h, w), args.pool * 3)
    ent, _ = ref.every_exit(candidates)
    # A cycle of settings that move images between exits: no early exit, then cuts at
    # several quantiles of each early exit's entropies, in the gaps between images.
    settings: list[list[float]] = [[0.0] * e]
    for q in (0.2, 0.5, 0.8):
        settings.append([spaced_thresholds(ent[:, i], [q])[0] for i in range(e)])
    settings.append([spaced_thresholds(ent[:, i], [0.5 if i % 2 else 0.35])[0] for i in range(e)])
    stable = ref.stable(candidates, settings, margin=args.margin)
    pool = candidates[stable][: args.pool]
    if len(pool) < min(16, args.pool):
        raise SystemExit(f"only {len(pool)} images clear the decision margin; lower --margin")
    expected = []
    for t in settings:
        classes, exits = ref.early_exit(pool, t)
        expected.append(list(zip(classes, exits, strict=True)))
    target = bad.Target(model, c, h, w, e, max_body_bytes=1 << 20, max_images=16)
    cases = [case for case in bad.bad_requests(target) if case.name not in SKIP_BAD]
    return Plan(target, pool, [bad.png(p) for p in pool], settings, expected, cases)


def load_pool(args: argparse.Namespace, shape: tuple[int, int, int], count: int) -> np.ndarray:
    """``count`` candidate images ``(N, H, W, C)`` uint8 of the model's input shape."""
    c, h, w = shape
    if args.images == "synthetic":
        return np.stack([bad.pixels(h, w, c, seed=args.seed * 100_000 + i) for i in range(count)])
    if args.images == "mnist":
        if (c, h, w) != (1, 28, 28):
            raise SystemExit(f"--images mnist needs a 1x28x28 model; this one takes {shape}")
        with gzip.open(args.data_root / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
            raw = f.read()
        n, rows, cols = struct.unpack(">III", raw[4:16])  # IDX: magic, then the dimensions
        digits = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)
        return digits[:count, :, :, None].copy()
    if (c, h, w) != (3, 32, 32):
        raise SystemExit(f"--images cifar10 needs a 3x32x32 model; this one takes {shape}")
    files = sorted((args.data_root / "cifar10" / "test").glob("*/*.jpg"))
    # Every class, in turn: the first files of each class folder interleaved.
    by_class: dict[str, list[Path]] = {}
    for f in files:
        by_class.setdefault(f.parent.name, []).append(f)
    order = [f for group in zip(*by_class.values(), strict=False) for f in group][:count]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in order])


# --------------------------------------------------------------------------- load


def parse_answers(body: dict[str, Any]) -> list[tuple[int, int]]:
    """(class, exit) per image of a classify answer."""
    return [(int(r["class_index"]), int(r["exit"]["index"])) for r in body["results"]]


def parse_v2_answers(body: dict[str, Any]) -> list[tuple[int, int]]:
    """(class, exit) per image of a v2 infer answer."""
    outs = {o["name"]: o for o in body["outputs"]}
    classes = [int(v) for v in outs["CLASS"]["data"]]
    exits = [int(v) for v in outs["EXIT"]["data"]]
    return list(zip(classes, exits, strict=True))


class Load:
    """The clients, the admin task and the memory sampler of one run."""

    def __init__(self, plan: Plan, server: ServerProcess, args: argparse.Namespace) -> None:
        self.plan = plan
        self.server = server
        self.args = args
        self.records: list[Record] = []
        self.changes: list[Change] = []
        self.rss: list[tuple[float, int]] = []
        self.t0 = 0.0

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.args.concurrency + 4)
        async with httpx.AsyncClient(
            base_url=self.server.url, limits=limits, timeout=self.args.timeout
        ) as client:
            await self._put(client, 0)  # a known setting before the first request
            self.t0 = time.monotonic()
            end = self.t0 + self.args.duration
            tasks = [
                asyncio.create_task(self._client(client, i, end))
                for i in range(self.args.concurrency)
            ]
            tasks.append(asyncio.create_task(self._admin(client, end)))
            tasks.append(asyncio.create_task(self._sample_rss(end)))
            await asyncio.gather(*tasks)

    async def _put(self, client: httpx.AsyncClient, k: int) -> None:
        change = Change(k, time.monotonic())
        self.changes.append(change)
        try:
            resp = await client.put(
                f"/admin/models/{self.plan.target.model}/thresholds",
                json={"thresholds": self.plan.settings[k]},
                headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            )
            change.status = resp.status_code
        except httpx.HTTPError as exc:
            change.status = -1
            logger.error("admin PUT failed: %r", exc)
        change.ack = time.monotonic()

    async def _admin(self, client: httpx.AsyncClient, end: float) -> None:
        # On a fixed schedule (t0 + 1 s, t0 + 2 s, ...), whatever each PUT's latency.
        step = 0
        while True:
            step += 1
            await asyncio.sleep(
                max(0.0, self.t0 + step * self.args.change_every - time.monotonic())
            )
            if time.monotonic() >= end:
                return
            await self._put(client, step % len(self.plan.settings))

    async def _sample_rss(self, end: float) -> None:
        while time.monotonic() < end:
            self.rss.append((time.monotonic() - self.t0, rss_bytes(self.server.pid)))
            await asyncio.sleep(0.5)
        self.rss.append((time.monotonic() - self.t0, rss_bytes(self.server.pid)))

    async def _client(self, client: httpx.AsyncClient, worker: int, end: float) -> None:
        rng = random.Random(self.args.seed * 1000 + worker)
        kinds, weights = list(MIX), list(MIX.values())
        while time.monotonic() < end:
            kind = rng.choices(kinds, weights)[0]
            await self._one(client, rng, kind)

    async def _one(self, client: httpx.AsyncClient, rng: random.Random, kind: str) -> None:
        plan, target = self.plan, self.plan.target
        n = len(plan.pool)
        rec = Record(kind, 0.0)
        if kind == "invalid":
            case = rng.choice(plan.bad_cases)
            req = case.request
            rec.expect_status, rec.expect_codes = case.status, case.codes
            rec.code = case.name
        elif kind == "v2":
            rec.images = (rng.randrange(n),)
            body = bad.v2_tensor_body(target, plan.pool[rec.images[0]])
            req = bad.v2_request(target, json.dumps(body).encode())
        elif kind == "multipart":
            rec.images = tuple(rng.randrange(n) for _ in range(rng.randint(2, 6)))
            req = bad.classify_multipart(target, [("image/png", plan.pngs[i]) for i in rec.images])
        else:
            rec.images = (rng.randrange(n),)
            query = ""
            if kind == "per_request":
                rec.setting = rng.randrange(len(plan.settings))
                query = "thresholds=" + ",".join(repr(t) for t in plan.settings[rec.setting])
            req = bad.classify_raw(target, plan.pngs[rec.images[0]], "image/png", query)
        rec.send = time.monotonic()
        try:
            resp = await client.request(req.method, req.path, headers=req.headers, content=req.body)
            rec.recv = time.monotonic()
            rec.status = resp.status_code
            if kind == "invalid" or resp.status_code != 200:
                rec.error = _error_code(resp)
            elif kind == "v2":
                rec.answers = parse_v2_answers(resp.json())
            else:
                body = resp.json()
                rec.answers = parse_answers(body)
                rec.reported = [float(t) for t in body["thresholds"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            rec.recv = time.monotonic()
            rec.status = rec.status or -1
            rec.error = f"{type(exc).__name__}: {exc}"[:300]
        self.records.append(rec)


def _error_code(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        # /v2 answers the Open Inference Protocol's {"error": "<message>", "code": ...}.
        return str(body["code"] if isinstance(body["error"], str) else body["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"<not the error shape: {resp.text[:80]!r}>"


# --------------------------------------------------------------------------- verdict


def candidates(changes: list[Change], send: float, recv: float) -> list[int]:
    """Indices into ``changes`` of the settings that may have been in force for a request
    sent at ``send`` and answered at ``recv`` (see the module docstring)."""
    lo = max((j for j, c in enumerate(changes) if c.ack <= send), default=0)
    return [lo] + [j for j in range(lo + 1, len(changes)) if changes[j].start < recv]


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(
        math.isclose(x, y, rel_tol=1e-9) for x, y in zip(a, b, strict=True)
    )


def verdict(load: Load, before: dict[Any, float], after: dict[Any, float]) -> dict[str, Any]:
    plan, args, model = load.plan, load.args, load.plan.target.model
    statuses = Counter(r.status for r in load.records)
    by_kind = Counter(r.kind for r in load.records)
    five_xx = [r for r in load.records if r.status >= 500]
    transport = [r for r in load.records if r.status < 0]
    wrong_status = []
    wrong_answer = []
    images_answered = 0
    exits_answered: Counter[str] = Counter()
    single = 0
    for r in load.records:
        if r.kind == "invalid":
            if r.status != r.expect_status or r.error not in r.expect_codes:
                wrong_status.append(r)
            continue
        if r.status != 200:
            wrong_status.append(r)
            continue
        if len(r.answers) != len(r.images):
            wrong_answer.append(r)
            continue
        images_answered += len(r.answers)
        exits_answered.update(str(ex) for _, ex in r.answers)
        if r.setting is not None:
            options = [r.setting]
            single += 1
        else:
            cands = candidates(load.changes, r.send, r.recv)
            options = sorted({load.changes[j].setting for j in cands})
            single += len(options) == 1
        if r.reported is not None and not any(_same(r.reported, plan.settings[k]) for k in options):
            # The server names thresholds that were not in force during the request.
            wrong_answer.append(r)
            continue
        for img, answer in zip(r.images, r.answers, strict=True):
            if not any(plan.expected[k][img] == answer for k in options):
                wrong_answer.append(r)
                break

    # Counter increase over the run (the set-up PUT classifies nothing).
    exit_before = metric_by(before, "branchy_exit_total", "exit", model=model)
    exit_after = metric_by(after, "branchy_exit_total", "exit", model=model)
    exit_delta = {
        k: int(exit_after.get(k, 0) - exit_before.get(k, 0))
        for k in sorted(set(exit_after) | set(exit_before))
    }
    metric_images = sum(exit_delta.values())

    warmup = args.warmup if args.warmup is not None else min(10.0, args.duration / 4)
    after_warmup = [b for t, b in load.rss if t >= warmup]
    rss_start = after_warmup[0] if after_warmup else load.rss[0][1]
    rss_end = load.rss[-1][1]
    growth = rss_end / rss_start - 1.0
    elapsed = max(r.recv for r in load.records) - load.t0 if load.records else 0.0
    failed_changes = [c for c in load.changes if c.status != 200]

    checks = {
        "no_5xx": not five_xx,
        "no_transport_errors": not transport,
        "invalid_requests_answered_as_contracted": not wrong_status,
        "valid_requests_answered_correctly": not wrong_answer,
        "exit_total_equals_images_answered": metric_images == images_answered
        and all(exit_delta.get(k, 0) == v for k, v in exits_answered.items()),
        "threshold_changes_accepted": not failed_changes,
        "rss_growth_under_limit": growth < args.max_rss_growth,
    }

    def sample(rs: list[Record]) -> list[dict[str, Any]]:
        return [_jsonable(dataclasses.asdict(r)) for r in rs[:10]]

    return {
        "passed": all(checks.values()),
        "checks": checks,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": _machine(),
        "model": model,
        "duration_s": round(elapsed, 2),
        "concurrency": args.concurrency,
        "requests": len(load.records),
        "requests_by_kind": dict(by_kind),
        "requests_per_s": round(len(load.records) / elapsed, 1) if elapsed else 0.0,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "valid_requests": sum(1 for r in load.records if r.kind != "invalid"),
        "invalid_requests": by_kind.get("invalid", 0),
        "images_answered": images_answered,
        "images_by_exit_client": dict(sorted(exits_answered.items())),
        "branchy_exit_total_increase": exit_delta,
        "checked_against_single_setting": single,
        "threshold_settings": plan.settings,
        "threshold_changes": len(load.changes),
        "failed_threshold_changes": len(failed_changes),
        "image_pool": len(plan.pool),
        "images_source": args.images,
        "rss_bytes_after_warmup": rss_start,
        "rss_bytes_end": rss_end,
        "rss_bytes_max": max(b for _, b in load.rss),
        "rss_growth": round(growth, 4),
        "warmup_s": warmup,
        "examples_5xx": sample(five_xx),
        "examples_transport_errors": sample(transport),
        "examples_wrong_status": sample(wrong_status),
        "examples_wrong_answer": sample(wrong_answer),
    }


def _jsonable(value: Any) -> Any:
    """``value`` with sets (a record's expected codes) as sorted lists, for json.dumps."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted(value)
    return value


def _machine() -> str:
    import os
    import platform

    return f"{platform.machine()} {os.cpu_count()}-core CPU, no GPU used (device cpu)"


def print_table(report: dict[str, Any]) -> None:
    rows = [
        ("result", "PASS" if report["passed"] else "FAIL"),
        ("duration (s)", report["duration_s"]),
        ("concurrency", report["concurrency"]),
        ("requests", report["requests"]),
        ("  valid / invalid", f"{report['valid_requests']} / {report['invalid_requests']}"),
        ("requests per s", report["requests_per_s"]),
        ("statuses", ", ".join(f"{k}: {v}" for k, v in report["statuses"].items())),
        ("images answered", report["images_answered"]),
        ("exit_total increase", sum(report["branchy_exit_total_increase"].values())),
        ("threshold changes", report["threshold_changes"]),
        ("checked vs one setting", report["checked_against_single_setting"]),
        ("RSS after warm-up (MiB)", f"{report['rss_bytes_after_warmup'] / 2**20:.1f}"),
        ("RSS at end (MiB)", f"{report['rss_bytes_end'] / 2**20:.1f}"),
        ("RSS growth", f"{100 * report['rss_growth']:.1f} %"),
    ]
    rows += [(f"check {k}", "ok" if v else "FAILED") for k, v in report["checks"].items()]
    width = max(len(k) for k, _ in rows)
    print(f"| {'soak'.ljust(width)} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One soak run in ``work``: the server, the load, and the verdict (the report)."""
    repo = args.model_repository or make_repository(work / "repository", name=args.model)
    ref = OfflineReference(repo / args.model)
    plan = make_plan(ref, args.model, args)
    logger.info(
        "pool of %d images, %d threshold settings: %s",
        len(plan.pool),
        len(plan.settings),
        plan.settings,
    )
    env = {
        "BRANCHY_ADMIN_TOKEN": ADMIN_TOKEN,
        "BRANCHY_MODELS": args.model,
        "BRANCHY_MAX_BODY_BYTES": str(plan.target.max_body_bytes),
        "BRANCHY_MAX_IMAGES_PER_REQUEST": str(plan.target.max_images),
        "BRANCHY_LOG_LEVEL": "WARNING",
    }
    with reliability_server(repo, work, env) as server:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            before = parse_metrics(c.get("/metrics").text)
        load = Load(plan, server, args)
        asyncio.run(load.run())
        with httpx.Client(base_url=server.url, timeout=10) as c:
            after = parse_metrics(c.get("/metrics").text)
        alive = server.alive()
        code = server.stop()
    report = verdict(load, before, after)
    report["checks"]["server_alive_until_the_end"] = alive
    report["passed"] = all(report["checks"].values())
    # Informative only: the clean-exit criterion is tested in test_overload.py.
    report["server_exit_status_after_sigterm"] = code
    return report


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        try:
            report = run(args, args.workdir or Path(tmp))
        except Exception as exc:  # the run itself broke: the report still says what happened
            logger.exception("the soak run did not complete")
            report = {
                "passed": False,
                "checks": {"run_completed": False},
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "machine": _machine(),
                "error": f"{type(exc).__name__}: {exc}"[:4000],
            }
    if "error" not in report:
        print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # default=str: whatever a record holds, the report is written.
    args.out.write_text(json.dumps(_jsonable(report), indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
