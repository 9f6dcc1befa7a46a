"""Helpers shared by the reliability tests and ``benchmarks/soak.py`` / ``benchmarks/fuzz.py``.

* :func:`make_checkpoint` / :func:`make_repository`: a model repository with a freshly
  initialised, seeded checkpoint whose exit heads are sharpened, so that entropies spread
  over ``[0, ln C]`` as a trained network's do (a fresh network's are all near ``ln C``);
  written by the one checkpoint factory, :func:`testsupport.checkpoints.write_checkpoint`;
* :func:`reliability_server`: the real server (:class:`testsupport.server.ServerProcess`)
  configured as these checks run it;
* :class:`OfflineReference`: the checkpoint evaluated in-process, to check served answers;
* :func:`parse_metrics` / :func:`metric_total`: ``/metrics`` parsed with prometheus_client's
  parser;
* :func:`assert_error`: the contract's JSON error shape;
* :func:`fuzz_openapi`: schemathesis over a running server's OpenAPI document.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

import models
from testsupport.checkpoints import write_checkpoint
from testsupport.server import ServerProcess

ADMIN_TOKEN = "reliability-admin-token-8f2c"  # >= 8 characters, as the settings require


# --------------------------------------------------------------------------- models


def make_checkpoint(
    path: Path,
    *,
    architecture: str = "b-lenet",
    seed: int = 0,
    thresholds: Sequence[float] | None = None,
) -> Path:
    """A seeded, freshly initialised checkpoint with sharpened heads (no training: the
    reliability checks compare served answers with offline ones, not with labels).

    Args:
        path: checkpoint folder to create.
        architecture: registry name (``b-lenet`` is the cheapest on a CPU).
        seed: torch seed of the initialisation.
        thresholds: default thresholds (default: 0.5 per early exit).
    """
    exits = models.build_model(architecture).num_exits
    return write_checkpoint(
        path,
        architecture,
        seed=seed,
        calibration=False,
        sharpen=True,
        thresholds=[0.5] * (exits - 1) if thresholds is None else thresholds,
        class_names=[f"class{i}" for i in range(10)],
        provenance={"made_by": "testsupport/reliability.py", "seed": seed},
    )


def make_repository(root: Path, *, name: str = "b-lenet", architecture: str = "b-lenet") -> Path:
    """A model repository folder holding one fresh checkpoint named ``name``."""
    root.mkdir(parents=True, exist_ok=True)
    make_checkpoint(root / name, architecture=architecture)
    return root


class OfflineReference:
    """A checkpoint evaluated in this process, as the answer key for served results.

    Served and offline answers may differ in the last float bit (batch composition
    changes the order of reductions), so :meth:`stable` tells which images are far enough
    from every decision boundary (entropy vs threshold, top-1 vs top-2 logit) for an
    exact comparison to be meaningful.
    """

    def __init__(self, checkpoint_dir: Path) -> None:
        self.checkpoint = models.load_checkpoint(checkpoint_dir)
        self.model = self.checkpoint.model.eval()
        self.spec = self.checkpoint.input_spec
        self.num_exits = self.model.num_exits

    def normalise(self, pixels: np.ndarray) -> torch.Tensor:
        """``(N, H, W, C)`` uint8 -> ``(N, C, H, W)`` float32, ``(x / 255 - mean) / std``."""
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div(255)
        mean = torch.tensor(self.spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        return x.sub(mean).div(std)

    def early_exit(
        self, pixels: np.ndarray, thresholds: Sequence[float]
    ) -> tuple[list[int], list[int]]:
        """Class and exit of every image under ``thresholds`` (one setting for all).

        Returns:
            (classes, exits), one entry per image.
        """
        with torch.inference_mode():
            r = self.model.early_exit(self.normalise(pixels), list(thresholds))
        return r.prediction.tolist(), r.exit_index.tolist()

    def every_exit(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Entropy ``(N, E)`` and top-1/top-2 logit gap ``(N, E)`` at every exit."""
        with torch.inference_mode():
            outs = self.model(self.normalise(pixels))
        ent = torch.stack([models.entropy_from_logits(z) for z in outs], dim=1)
        gaps = []
        for z in outs:
            top = z.float().topk(2, dim=1).values
            gaps.append(top[:, 0] - top[:, 1])
        return ent.numpy(), torch.stack(gaps, dim=1).numpy()

    def stable(
        self,
        pixels: np.ndarray,
        settings: Sequence[Sequence[float]],
        *,
        margin: float = 1e-3,
    ) -> np.ndarray:
        """Which images are clear of every decision under every setting: top-1 and top-2
        logits more than ``margin`` apart at every exit, and every entropy more than
        ``margin`` *relative* to the threshold away from it (a trained network's
        entropies go down to 1e-6, and their float error is relative too).

        Returns:
            ``(N,)`` bool.
        """
        ent, gap = self.every_exit(pixels)
        ok: np.ndarray = np.asarray((gap > margin).all(axis=1))
        for t in settings:
            for i, ti in enumerate(t):
                if math.isfinite(ti):
                    ok &= np.abs(ent[:, i] - ti) > margin * ti + 1e-6
        return ok


def spaced_thresholds(entropies: np.ndarray, quantiles: Sequence[float]) -> list[float]:
    """Thresholds placed in the middle of the gap between neighbouring entropies nearest
    each quantile, so that no image sits on a decision boundary.

    Args:
        entropies: ``(N,)`` entropies of the image pool at one exit.
        quantiles: where in the sorted pool to cut, each in ``(0, 1)``.
    """
    e = np.sort(entropies.astype(np.float64))
    out = []
    for q in quantiles:
        k = min(max(int(q * len(e)), 1), len(e) - 1)
        out.append(float((e[k - 1] + e[k]) / 2))
    return out


# --------------------------------------------------------------------------- server


def reliability_server(
    repository: Path, workdir: Path, env: Mapping[str, str] | None = None
) -> ServerProcess:
    """The real server on ``repository`` as the reliability checks run it: CPU, INFO log,
    one intra-op thread (server, client and other jobs share two cores), state and log in
    ``workdir``; ``env`` on top. Use it as a context manager (ready on entry)."""
    workdir.mkdir(parents=True, exist_ok=True)
    base = {
        "BRANCHY_MODEL_REPOSITORY": str(repository.resolve()),
        "BRANCHY_DEVICE": "cpu",
        "BRANCHY_STATE_DIR": str((workdir / "state").resolve()),
        "BRANCHY_LOG_LEVEL": "INFO",
        "OMP_NUM_THREADS": "1",
    }
    return ServerProcess({**base, **(env or {})}, workdir / "server.log")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (psutil)."""
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


# --------------------------------------------------------------------------- metrics


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus text -> {(sample name, labels): value}, with prometheus_client's parser."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return out


def metric_total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of every sample called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def metric_by(samples: Samples, name: str, key: str, **labels: str) -> dict[str, float]:
    """``name`` summed per value of label ``key`` (e.g. exit counts per exit)."""
    want = set(labels.items())
    out: dict[str, float] = {}
    for (n, lab), v in samples.items():
        if n == name and want <= lab:
            k = dict(lab).get(key, "")
            out[k] = out.get(k, 0.0) + v
    return out


# --------------------------------------------------------------------------- errors


def error_of(resp: httpx.Response) -> dict[str, Any]:
    """The error of a contract error body as ``{"status", "code", "message"[, "id"]}``
    (fails clearly if the shape is wrong). Under ``/v2`` the body is the Open Inference
    Protocol's, ``{"error": "<message>", "code": ..., "status": ...}``."""
    ctype = resp.headers.get("content-type", "")
    assert ctype.startswith("application/json"), (
        f"{resp.status_code} answer is {ctype!r}, not JSON: {resp.text[:200]!r}"
    )
    body = resp.json()
    problem = error_shape_problem(body, resp.status_code, v2=is_v2(resp.request.url.path))
    assert problem is None, problem
    if isinstance(body["error"], str):
        return {"message": body["error"], **{k: v for k, v in body.items() if k != "error"}}
    return dict(body["error"])


def is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def error_shape_problem(body: Any, status: int, *, v2: bool) -> str | None:
    """What is wrong with an error ``body`` of ``status`` (None when it is the contract's
    shape: the v2 one under ``/v2``, the ``{"error": {...}}`` one elsewhere)."""
    if not isinstance(body, dict) or "error" not in body:
        return f"not an error body: {str(body)[:200]}"
    if v2:
        err = {k: v for k, v in body.items() if k != "error"}
        err["message"] = body["error"]
    else:
        if set(body) != {"error"} or not isinstance(body["error"], dict):
            return f"not the error shape: {str(body)[:200]}"
        err = body["error"]
    if err.get("status") != status:
        return f"status {err.get('status')!r} in the body of a {status} answer"
    if not (isinstance(err.get("code"), str) and err["code"]):
        return f"no code: {str(body)[:200]}"
    if not (isinstance(err.get("message"), str) and err["message"]):
        return f"no message string: {str(body)[:200]}"
    if status >= 500 and not (isinstance(err.get("id"), str) and err["id"]):
        return f"5xx without an error id: {str(body)[:200]}"
    return None


def assert_error(
    resp: httpx.Response, status: int, codes: str | Sequence[str] | frozenset[str]
) -> dict[str, Any]:
    """Assert ``resp`` is the contract's error ``status`` with one of ``codes``."""
    allowed = {codes} if isinstance(codes, str) else set(codes)
    assert resp.status_code == status, (
        f"expected {status} {sorted(allowed)}, got {resp.status_code}: {resp.text[:300]}"
    )
    err = error_of(resp)
    assert err["code"] in allowed, f"expected code in {sorted(allowed)}, got {err}"
    return err


# --------------------------------------------------------------------------- schemathesis


@dataclass
class FuzzReport:
    """What one schemathesis run saw.

    Attributes:
        operations: ``METHOD /path`` of every operation fuzzed.
        cases: requests sent.
        statuses: how many answers of each status.
        failures: broken promises (a 5xx, a transport error, an error that is not the
            contract's JSON shape), with a curl line to reproduce each.
        conformance: answers that disagree with the OpenAPI document (undocumented status,
            body not matching the documented schema): reported, not failures.
    """

    operations: list[str]
    cases: int
    statuses: dict[str, int]
    failures: list[dict[str, str]]
    conformance: dict[str, int]


def check_answer(
    status: int, headers: Mapping[str, Any], body: bytes, path: str = ""
) -> str | None:
    """The promise every answer keeps, whatever was sent: no 5xx, and every error in the
    contract's JSON shape (the v2 one when ``path`` is under ``/v2``). Returns what is
    wrong, or None."""
    if status >= 500:
        return f"server error {status}: {body[:200]!r}"
    if status >= 400:
        ctype = headers.get("content-type") or headers.get("Content-Type") or ""
        if isinstance(ctype, list):  # schemathesis keeps every value of a header
            ctype = ctype[0] if ctype else ""
        if not ctype.startswith("application/json"):
            return f"{status} answer is not JSON: {body[:200]!r}"
        import json

        try:
            parsed = json.loads(body)
        except ValueError:
            return f"{status} answer is not JSON: {body[:200]!r}"
        problem = error_shape_problem(parsed, status, v2=is_v2(path))
        if problem:
            return f"{status} answer is not the contract's error shape: {problem}"
    return None


def fuzz_openapi(
    base_url: str,
    *,
    max_examples: int,
    seed: int = 0,
    token: str | None = None,
    model: str | None = None,
    modes: Sequence[str] = ("positive", "negative"),
    timeout_s: float = 30.0,
    include: Callable[[str], bool] | None = None,
) -> FuzzReport:
    """Schemathesis over every operation of a running server's OpenAPI document.

    Each operation is fuzzed in each generation mode (``positive``: data that fits the
    schema; ``negative``: data that does not), once with generated path parameters and,
    when ``model`` is given, once with ``{name}`` fixed to a served model (otherwise
    almost every case would stop at 404 before reaching the body parsers).

    Args:
        base_url: ``http://127.0.0.1:PORT``.
        max_examples: hypothesis examples per operation, mode and name choice.
        seed: hypothesis seed (runs repeat exactly).
        token: admin bearer token, sent with every request (admin routes get fuzzed too).
        model: a served model name.
        modes: generation modes.
        timeout_s: per request; a request that takes longer is a failure ("hangs").
        include: fuzz only the operations whose ``METHOD /path`` label it accepts.
    """
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.core.result import Ok

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    fuzzer = _Fuzzer(base_url, token, timeout_s)
    report = FuzzReport([], 0, {}, [], {})
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            # The document itself is broken for this operation: a failure to report.
            report.failures.append(
                {
                    "operation": "?",
                    "problem": f"invalid OpenAPI operation: {result.err()}"[:300],
                    "reproduce": f"{base_url}/openapi.json",
                }
            )
            continue
        op = result.ok()
        label = f"{op.method.upper()} {op.path}"
        if include is not None and not include(label):
            continue
        report.operations.append(label)
        fixed: list[dict[str, Any] | None] = [None]
        if model is not None and "{name}" in op.path:
            fixed.append({"name": model})
        for mode in modes:
            for path_parameters in fixed:
                strategy = op.as_strategy(
                    generation_mode=GenerationMode(mode), path_parameters=path_parameters
                )
                fuzzer.run(label, strategy, report, max_examples=max_examples, seed=seed)
    return report


class _Fuzzer:
    """Sends schemathesis cases and records what comes back."""

    def __init__(self, base_url: str, token: str | None, timeout_s: float) -> None:
        import requests
        from schemathesis.specs.openapi import checks as oas_checks

        self.base_url = base_url
        self.headers = {"authorization": f"Bearer {token}"} if token else {}
        self.timeout_s = timeout_s
        self.session = requests.Session()
        self.conformance_checks = [
            oas_checks.status_code_conformance,
            oas_checks.content_type_conformance,
            oas_checks.response_schema_conformance,
        ]

    def run(
        self, label: str, strategy: Any, report: FuzzReport, *, max_examples: int, seed: int
    ) -> None:
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import seed as hypothesis_seed
        from hypothesis.errors import Unsatisfiable

        @hypothesis_seed(seed)
        @settings(
            max_examples=max_examples,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],  # no shrinking: every case is recorded
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def one(case: Any) -> None:
            self.send(label, case, report)

        # No negative data exists for an operation without parameters: nothing to send.
        with contextlib.suppress(Unsatisfiable):
            one()

    def send(self, label: str, case: Any, report: FuzzReport) -> None:
        import requests

        report.cases += 1
        try:
            resp = case.call(
                base_url=self.base_url,
                session=self.session,
                headers=self.headers,
                timeout=self.timeout_s,
            )
        except requests.RequestException as exc:
            self._fail(label, case, report, f"transport: {exc!r}"[:300])
            return
        code = str(resp.status_code)
        report.statuses[code] = report.statuses.get(code, 0) + 1
        path = getattr(getattr(resp, "request", None), "path_url", "") or ""
        problem = check_answer(resp.status_code, resp.headers, resp.content, path.split("?")[0])
        if problem:
            self._fail(label, case, report, problem)
        try:
            case.validate_response(resp, checks=self.conformance_checks)
        except BaseExceptionGroup as group:  # schemathesis' FailureGroup of check failures
            for failure in group.exceptions:
                title = getattr(failure, "title", type(failure).__name__)
                key = f"{label} {resp.status_code}: {title}"
                report.conformance[key] = report.conformance.get(key, 0) + 1

    def _fail(self, label: str, case: Any, report: FuzzReport, problem: str) -> None:
        try:
            curl = case.as_curl_command(headers=self.headers)
        except Exception:
            curl = repr(case)[:300]
        report.failures.append({"operation": label, "problem": problem, "reproduce": curl})
