"""What every GPU check shares: the model, limits, per-check results, the environment."""

from __future__ import annotations

import contextlib
import os
import platform
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
MODEL = "b-alexnet"
MAX_PIXELS = 4096 * 4096
REQUEST_TIMEOUT_S = 30.0


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
                status="fail", reason=f"{type(exc).__name__}: {exc}"[:500], traceback=tb(exc)
            )
            if isinstance(exc, KeyboardInterrupt):
                raise
        result["seconds"] = round(time.monotonic() - start, 2)
        return result


class Skip(Exception):
    """A check that does not apply here."""


def tb(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]


def fail(result: dict[str, Any], reason: str) -> None:
    result["status"] = "fail"
    result["reason"] = f"{result['reason']}; {reason}" if result.get("reason") else reason


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
