"""Provenance of what the training jobs write: the code version, the machine, and (for a
trained checkpoint) the command, data and software it came from.

Shared by ``training.train`` (checkpoints), ``training.evaluate`` (reports) and the
benchmarks (their JSON results), so every file names its origin the same way.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from training.config import TrainConfig
    from training.data import Dataset


def training_provenance(cfg: TrainConfig, ds: Dataset, device: torch.device) -> dict[str, Any]:
    """Where a trained checkpoint came from: command, code version, data, software,
    machine."""
    return {
        "command": shlex.join([Path(sys.executable).name, "-m", "training.train", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dataset": ds.name,
        "data_dir": str(cfg.data_dir),
        "data_sha256": ds.checksum,
        "split": {"train": len(ds.train), "val": len(ds.val), "seed": cfg.seed},
        "device": str(device),
        "machine": machine_info(),
        "versions": software_versions(),
    }


def git_commit() -> str | None:
    """The current commit of the source tree (with ``-dirty`` if it has edits)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    """CPU / GPU description for reports."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def software_versions() -> dict[str, str]:
    """Python, torch and torchvision versions."""
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
