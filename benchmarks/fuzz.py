"""Long schemathesis run against a real server process (issue 5: "a longer run as a script").

    python benchmarks/fuzz.py                      # 200 examples per operation and mode
    python benchmarks/fuzz.py --max-examples 20    # a quick look

Loopback only. Starts ``python -m service`` on a seeded, freshly initialised B-LeNet and
B-AlexNet (or ``--model-repository``) with an admin token, loads its OpenAPI document and
fuzzes every operation with schemathesis, in positive (fits the schema) and negative
(does not) generation modes, with generated and with real model names, admin routes
included (the token is sent). The CI runs the same code, bounded, in
``tests/service/test_fuzz.py``.

Pass (exit status 0): no 5xx, no transport error or timeout, every error in the contract's
JSON shape, the server alive at the end with no traceback in its log. Answers that
disagree with the OpenAPI document (undocumented status codes or content types) are
listed as conformance notes; they do not fail the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as `python benchmarks/fuzz.py`
    sys.path.insert(0, str(REPO_ROOT))

from testsupport.reliability import (  # noqa: E402
    ADMIN_TOKEN,
    fuzz_openapi,
    make_checkpoint,
    reliability_server,
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-examples", type=int, default=200, help="per operation, mode, name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-repository", type=Path, default=None)
    p.add_argument("--model", default="b-lenet", help="served model used as {name}")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks/results/fuzz.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        work = Path(tmp)
        repo = args.model_repository
        if repo is None:
            repo = work / "repository"
            make_checkpoint(repo / "b-lenet", architecture="b-lenet")
            make_checkpoint(repo / "b-alexnet", architecture="b-alexnet", seed=1)
        env = {"BRANCHY_ADMIN_TOKEN": ADMIN_TOKEN, "BRANCHY_LOG_LEVEL": "WARNING"}
        with reliability_server(repo, work, env) as server:
            start = time.perf_counter()
            report = fuzz_openapi(
                server.url,
                max_examples=args.max_examples,
                seed=args.seed,
                token=ADMIN_TOKEN,
                model=args.model,
            )
            elapsed = time.perf_counter() - start
            alive = server.alive()
            log = server.log()
    traceback_in_log = "Traceback" in log
    passed = not report.failures and alive and not traceback_in_log
    result = {
        "passed": passed,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()} {os.cpu_count()}-core CPU, no GPU used (device cpu)",
        "duration_s": round(elapsed, 1),
        "max_examples": args.max_examples,
        "seed": args.seed,
        "operations": report.operations,
        "cases": report.cases,
        "statuses": dict(sorted(report.statuses.items())),
        "failures": report.failures,
        "server_alive_at_end": alive,
        "traceback_in_server_log": traceback_in_log,
        "conformance_notes": report.conformance,
    }
    rows = [
        ("result", "PASS" if passed else "FAIL"),
        ("operations", len(report.operations)),
        ("cases sent", report.cases),
        ("duration (s)", f"{elapsed:.1f}"),
        ("statuses", ", ".join(f"{k}: {v}" for k, v in sorted(report.statuses.items()))),
        ("failures (5xx, transport, error shape)", len(report.failures)),
        ("server alive at the end", alive),
        ("traceback in server log", traceback_in_log),
        ("conformance notes (not failures)", sum(report.conformance.values())),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"| {'fuzz'.ljust(width)} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    for note, count in sorted(report.conformance.items()):
        print(f"  conformance: {note} (x{count})")
    for failure in report.failures[:20]:
        print(f"  FAILURE {failure['operation']}: {failure['problem']}\n    {failure['reproduce']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
