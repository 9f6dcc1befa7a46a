"""Re-choose a branchy checkpoint's default thresholds from its own validation data.

Training chooses thresholds for ``--tolerance`` or ``--target-accuracy``; this rewrites
that choice later without running the network (the checkpoint keeps each validation
sample's per-exit entropy and correctness). ``--match-baseline`` asks for the cheapest
thresholds whose validation accuracy is at least the plain baseline's, measured on the
same validation split (both checkpoints record it in their manifests)::

    python -m training.calibrate --checkpoint zoo/b-alexnet --match-baseline zoo/alexnet

The test split is never read. The new rule is recorded in the manifest beside the old.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import models

log = logging.getLogger("training.calibrate")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="branchy checkpoint dir")
    rule = p.add_mutually_exclusive_group(required=True)
    rule.add_argument("--tolerance", type=float, help="allowed drop below the final exit")
    rule.add_argument("--target-accuracy", type=float, help="absolute accuracy (fraction)")
    rule.add_argument(
        "--match-baseline",
        type=Path,
        metavar="DIR",
        help="target = this plain checkpoint's validation accuracy",
    )
    return p


def baseline_accuracy(path: Path, branchy: models.Checkpoint) -> float:
    """The plain checkpoint's validation accuracy, if it comes from the same split."""
    base = models.load_checkpoint(path)
    if base.model.num_exits != 1:
        raise ValueError(f"{path}: --match-baseline needs a plain (1-exit) checkpoint")
    acc = base.metrics.get("val_exit_accuracy")
    if not acc:
        raise ValueError(f"{path}: the manifest records no validation accuracy")
    mine, theirs = branchy.provenance, base.provenance
    for key in ("dataset", "data_sha256", "split"):
        if mine.get(key) != theirs.get(key):
            raise ValueError(
                f"{path}: validation split differs ({key}: {theirs.get(key)!r} there, "
                f"{mine.get(key)!r} in {branchy.path})"
            )
    return float(acc[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ckpt = models.load_checkpoint(args.checkpoint)
    if ckpt.calibration is None:
        raise ValueError(f"{args.checkpoint}: no calibration data to choose thresholds from")
    target = args.target_accuracy
    if args.match_baseline is not None:
        target = baseline_accuracy(args.match_baseline, ckpt)
    macs = ckpt.model.exit_macs()
    point = models.choose_thresholds(
        ckpt.calibration, macs, tolerance=args.tolerance, target=target
    )
    metrics = dict(ckpt.metrics)
    metrics.setdefault("calibration_history", []).append(
        {"rule": metrics.get("calibration_rule"), "point": metrics.get("val_calibrated")}
    )
    metrics["val_calibrated"] = point.to_json()
    metrics["calibration_rule"] = {
        "tolerance": None if target is not None else args.tolerance,
        "target_accuracy": target,
        "match_baseline": None if args.match_baseline is None else str(args.match_baseline),
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
    }
    models.save_checkpoint(
        args.checkpoint,
        ckpt.model,
        class_names=ckpt.class_names,
        input_spec=ckpt.input_spec,
        thresholds=point.thresholds,
        calibration=ckpt.calibration,
        metrics=metrics,
        provenance=ckpt.provenance,
    )
    log.info("%s: on the validation split, %s", args.checkpoint, point.describe())
    return point.to_json()


def cli() -> None:
    try:
        main()
    except (ValueError, models.CheckpointError) as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
