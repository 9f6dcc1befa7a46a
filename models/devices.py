"""The one device resolver: what ``auto``, ``cpu``, ``cuda`` and ``cuda:N`` mean, for
the server (``BRANCHY_DEVICE``), training and evaluation (``--device``) alike."""

from __future__ import annotations

import torch


def resolve_device(setting: str | torch.device, *, local_rank: int | None = None) -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU; anything else
    as :class:`torch.device` reads it, checked against this machine.

    Args:
        setting: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (or a device).
        local_rank: under ``torchrun``, the process's local rank: a ``cuda`` without an
            index then means this rank's own GPU, ``cuda:<local_rank>``.

    Raises:
        ValueError: CUDA requested but not available, or no such device index.
    """
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(setting)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device {str(setting)!r} requested but CUDA is not available")
    if device.index is None and local_rank is not None:
        device = torch.device("cuda", local_rank)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {str(setting)!r} requested but there are {torch.cuda.device_count()} GPU(s)"
        )
    return device
