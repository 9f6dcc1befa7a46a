"""Checkpoints: a directory holding ``model.safetensors`` and ``manifest.json``.

Loading never unpickles: weights are safetensors, everything else is JSON. The optional
``calibration.safetensors`` holds per-exit entropies, correctness and predicted classes
on the validation split, so that a server can re-choose thresholds for another accuracy
target or risk budget without re-running the model.

Layout (format_version 1)::

    <dir>/manifest.json            architecture, classes, input spec, thresholds, metrics
    <dir>/model.safetensors        state dict
    <dir>/calibration.safetensors  optional: entropy (N, E) f32, correct (N, E) u8,
                                   prediction (N, E) i32 (optional inside the file:
                                   older checkpoints lack it and still load; the
                                   disagreement risk then says it needs it)
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from models.branchy import BranchyNet
from models.calibration import CalibrationData
from models.exits import check_thresholds, encode_thresholds
from models.registry import build_model

FORMAT = "branchy-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
CALIBRATION = "calibration.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, damaged, or does not match its manifest."""


@dataclass(frozen=True)
class InputSpec:
    """What the network expects: ``(channels, height, width)`` and per-channel
    normalisation ``(x / 255 - mean) / std`` of uint8 pixels."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if min(self.channels, self.height, self.width) < 1:
            raise ValueError(f"input dimensions must be positive; got {self.shape}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean and std need {self.channels} value(s), one per channel; "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ValueError(f"std must be finite and positive; got {self.std}")
        if not all(math.isfinite(m) for m in self.mean):
            raise ValueError(f"mean must be finite; got {self.mean}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def normalise(self, pixels: Tensor) -> Tensor:
        """``(x / 255 - mean) / std`` per channel, in float32: the one definition of the
        network's input, for training, evaluation and serving alike. The arithmetic is
        torchvision's ``ToTensor`` + ``Normalize`` (so served and offline answers agree),
        in place on the fresh float copy.

        Args:
            pixels: ``(C, H, W)`` or ``(B, C, H, W)`` uint8 (or float in ``[0, 255]``).

        Returns:
            A new float32 tensor on ``pixels``' device.
        """
        mean, std = _stats(self, pixels.device)
        return normalise_pixels(pixels, mean, std)

    def to_json(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            "mean": list(self.mean),
            "std": list(self.std),
        }


def normalise_pixels(pixels: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """:meth:`InputSpec.normalise` with the statistics given as ``(C, 1, 1)`` float32
    tensors on ``pixels``' device (for callers that hold them already, e.g. training).
    ``pixels`` is never changed: the arithmetic runs in place on a float32 copy."""
    return pixels.to(torch.float32, copy=True).div_(255).sub_(mean).div_(std)


@functools.lru_cache(maxsize=64)
def _stats(spec: InputSpec, device: torch.device) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(-1, 1, 1)
    return mean, std


@dataclass
class Checkpoint:
    """A loaded checkpoint: the network in eval mode plus everything in its manifest."""

    model: BranchyNet
    class_names: list[str]
    input_spec: InputSpec
    thresholds: list[float]
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    calibration: CalibrationData | None = None
    path: Path | None = None


def save_checkpoint(
    path: str | os.PathLike[str],
    model: BranchyNet,
    *,
    class_names: Sequence[str],
    input_spec: InputSpec,
    thresholds: Sequence[float] | None = None,
    calibration: CalibrationData | None = None,
    metrics: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` and its description to the directory ``path``.

    Each file is written to a temporary name and renamed, so a reader never sees a
    half-written file.

    Args:
        path: checkpoint directory (created if needed).
        model: the network; its weights are saved from CPU copies.
        class_names: one name per class.
        input_spec: the input the network expects and its normalisation.
        thresholds: default entropy thresholds, ``num_exits - 1`` of them (default:
            all 0, i.e. no early exit).
        calibration: validation-split entropies and correctness per exit.
        metrics: free-form JSON-able measurements.
        provenance: free-form JSON-able origin (command, data, versions).

    Returns:
        The checkpoint directory.
    """
    path = Path(path)
    thresholds = [0.0] * (model.num_exits - 1) if thresholds is None else list(thresholds)
    _check_consistency(
        model, list(class_names), input_spec, thresholds, calibration, where=str(path)
    )
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _atomic(path / WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": FORMAT}))
    if calibration is not None:
        _write_calibration(path, calibration)
    elif (path / CALIBRATION).exists():
        (path / CALIBRATION).unlink()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": {"name": model.name, "config": model.config_dict()},
        "num_exits": model.num_exits,
        "class_names": list(class_names),
        "input": input_spec.to_json(),
        "thresholds": encode_thresholds(thresholds),
        "exit_macs": model.exit_macs(),
        "calibration": None
        if calibration is None
        else {"file": CALIBRATION, **calibration.summary()},
        "metrics": metrics or {},
        "provenance": provenance or {},
    }
    text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
    _atomic(path / MANIFEST, lambda p: p.write_text(text))
    return path


def load_checkpoint(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> Checkpoint:
    """Load a checkpoint directory; the model comes back in eval mode on ``device``.

    Raises:
        CheckpointError: missing file, bad JSON, unknown format version or architecture,
            weights that do not fit the architecture, inconsistent thresholds, classes,
            input spec or calibration data. The message names the problem.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: not a directory")
    manifest = _read_manifest(path)
    where = str(path)
    try:
        arch = manifest["architecture"]
        name, config = arch["name"], arch["config"]
        class_names = [str(c) for c in manifest["class_names"]]
        spec = manifest["input"]
        input_spec = InputSpec(
            channels=int(spec["channels"]),
            height=int(spec["height"]),
            width=int(spec["width"]),
            mean=tuple(float(m) for m in spec["mean"]),
            std=tuple(float(s) for s in spec["std"]),
        )
        thresholds = [float(t) for t in manifest["thresholds"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {where}: malformed manifest: {exc!r}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {where}: architecture config must be an object")
    try:
        model = build_model(str(name), **config)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {where}: cannot build architecture: {exc}") from None

    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {where}: missing {WEIGHTS}")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {where}: cannot read {WEIGHTS}: {exc}") from None
    _check_state(model, state, where)
    model.load_state_dict(state, strict=True)

    calibration = None
    if manifest.get("calibration"):
        calibration = _read_calibration(path, where)
    _check_consistency(model, class_names, input_spec, thresholds, calibration, where=where)
    model.to(device).eval()
    return Checkpoint(
        model=model,
        class_names=class_names,
        input_spec=input_spec,
        thresholds=thresholds,
        metrics=dict(manifest.get("metrics") or {}),
        provenance=dict(manifest.get("provenance") or {}),
        calibration=calibration,
        path=path,
    )


def save_calibration(path: str | os.PathLike[str], calibration: CalibrationData) -> Path:
    """Replace only a checkpoint's calibration data (and its summary in the manifest).

    The weights file is not touched, and neither are thresholds, metrics or provenance:
    this is how calibration data gain fields collected later (per-exit predictions)
    without re-training or re-writing the network.

    Raises:
        CheckpointError: the checkpoint does not load, or the data do not fit its model.
    """
    path = Path(path)
    ckpt = load_checkpoint(path)
    _check_consistency(
        ckpt.model,
        ckpt.class_names,
        ckpt.input_spec,
        ckpt.thresholds,
        calibration,
        where=str(path),
    )
    manifest = _read_manifest(path)
    _write_calibration(path, calibration)
    manifest["calibration"] = {"file": CALIBRATION, **calibration.summary()}
    text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
    _atomic(path / MANIFEST, lambda p: p.write_text(text))
    return path


def _write_calibration(path: Path, calibration: CalibrationData) -> None:
    tensors = {
        "entropy": calibration.entropy.float().contiguous(),
        "correct": calibration.correct.to(torch.uint8).contiguous(),
    }
    if calibration.prediction is not None:
        tensors["prediction"] = calibration.prediction.to(torch.int32).contiguous()
    _atomic(path / CALIBRATION, lambda p: save_file(tensors, str(p)))


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path}: missing {MANIFEST}")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: unsupported format_version {version!r} "
            f"(this version reads {FORMAT_VERSION})"
        )
    return manifest


def _check_state(model: BranchyNet, state: dict[str, torch.Tensor], where: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {where}: weights do not match architecture {model.name!r}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, ref in expected.items():
        got = state[key]
        if got.shape != ref.shape:
            raise CheckpointError(
                f"checkpoint {where}: weight {key!r} has shape {tuple(got.shape)}, "
                f"architecture {model.name!r} needs {tuple(ref.shape)}"
            )
        if got.dtype.is_floating_point != ref.dtype.is_floating_point:
            raise CheckpointError(f"checkpoint {where}: weight {key!r} has dtype {got.dtype}")


def _read_calibration(path: Path, where: str) -> CalibrationData:
    file = path / CALIBRATION
    if not file.is_file():
        raise CheckpointError(f"checkpoint {where}: manifest names {CALIBRATION} but it is missing")
    try:
        tensors = load_file(str(file), device="cpu")
        prediction = tensors.get("prediction")
        return CalibrationData(
            entropy=tensors["entropy"],
            correct=tensors["correct"].bool(),
            prediction=None if prediction is None else prediction.long(),
        )
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {where}: cannot read {CALIBRATION}: {exc!r}") from None


def _check_consistency(
    model: BranchyNet,
    class_names: list[str],
    input_spec: InputSpec,
    thresholds: list[float],
    calibration: CalibrationData | None,
    *,
    where: str,
) -> None:
    if len(class_names) != model.num_classes:
        raise CheckpointError(
            f"checkpoint {where}: {len(class_names)} class name(s) for a "
            f"{model.num_classes}-class model"
        )
    if input_spec.shape != model.input_shape:
        raise CheckpointError(
            f"checkpoint {where}: input spec {input_spec.shape} does not match the "
            f"architecture's input {model.input_shape}"
        )
    if len(thresholds) != model.num_exits - 1:
        raise CheckpointError(
            f"checkpoint {where}: {len(thresholds)} threshold(s) for a model with "
            f"{model.num_exits} exits (needs {model.num_exits - 1})"
        )
    try:
        check_thresholds(thresholds, model.num_exits)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {where}: {exc}") from None
    if calibration is not None and calibration.num_exits != model.num_exits:
        raise CheckpointError(
            f"checkpoint {where}: calibration data has {calibration.num_exits} exit(s), "
            f"the model {model.num_exits}"
        )
    if calibration is not None and calibration.prediction is not None:
        pred = calibration.prediction
        if int(pred.min()) < 0 or int(pred.max()) >= model.num_classes:
            raise CheckpointError(
                f"checkpoint {where}: calibration predictions must be class indices in "
                f"0..{model.num_classes - 1}"
            )


def _atomic(target: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
