"""Branchy (early-exit) networks, the batched early-exit engine, and checkpoints.

This package depends on neither ``training`` nor ``service``; both build on it.
"""

from models import alexnet, lenet, resnet  # noqa: F401  (register the architectures)
from models.branchy import BranchyNet, ExitResult
from models.calibration import (
    ORIGINAL_GRID,
    CalibrationData,
    CertifiedPoint,
    NotCertifiable,
    OperatingPoint,
    certify_thresholds,
    choose_thresholds,
    collect_calibration,
    evaluate_thresholds,
    pareto_frontier,
    sweep,
)
from models.checkpoint import (
    Checkpoint,
    CheckpointError,
    InputSpec,
    load_checkpoint,
    save_calibration,
    save_checkpoint,
)
from models.exits import entropy_from_logits
from models.registry import build_model, list_models
from models.runtimes import EarlyExitEngine, RuntimeUnavailable, load_engine

__all__ = [
    "ORIGINAL_GRID",
    "BranchyNet",
    "CalibrationData",
    "CertifiedPoint",
    "Checkpoint",
    "CheckpointError",
    "EarlyExitEngine",
    "ExitResult",
    "InputSpec",
    "NotCertifiable",
    "OperatingPoint",
    "RuntimeUnavailable",
    "build_model",
    "certify_thresholds",
    "choose_thresholds",
    "collect_calibration",
    "entropy_from_logits",
    "evaluate_thresholds",
    "list_models",
    "load_checkpoint",
    "load_engine",
    "pareto_frontier",
    "save_calibration",
    "save_checkpoint",
    "sweep",
]
