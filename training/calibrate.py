"""Re-choose a branchy checkpoint's default thresholds from its own validation data.

Training chooses thresholds for ``--tolerance`` or ``--target-accuracy``; this rewrites
that choice later without running the network (the checkpoint keeps each validation
sample's per-exit entropy and correctness). ``--match-baseline`` asks for the cheapest
thresholds whose validation accuracy is at least the plain baseline's, measured on the
same validation split (both checkpoints record it in their manifests)::

    python -m training.calibrate --checkpoint zoo/b-alexnet --match-baseline zoo/alexnet

``--max-disagreement EPS`` and ``--max-accuracy-drop EPS`` (with ``--confidence``, default
0.95) choose instead the cheapest thresholds whose risk is *certified* at most EPS on
unseen data from the validation distribution (``models.certify_thresholds``).

``--recollect`` re-runs the network on the checkpoint's own validation split (rebuilt
from its provenance: data set, checksum, split size and seed) and rewrites only the
calibration data, adding fields that older checkpoints lack (each exit's predicted
class); weights and thresholds stay as they are::

    BRANCHY_DATA_DIR=../shared/data python -m training.calibrate --checkpoint zoo/b-lenet \
        --recollect

The test split is never read. The new rule is recorded in the manifest beside the old.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

import models
from models.calibration import CalibrationData

log = logging.getLogger("training.calibrate")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="branchy checkpoint dir")
    rule = p.add_mutually_exclusive_group(required=True)
    rule.add_argument(
        "--recollect",
        action="store_true",
        help="re-run the network on the validation split and rewrite only the calibration "
        "data (adds per-exit predictions; thresholds unchanged)",
    )
    rule.add_argument(
        "--max-disagreement",
        type=float,
        metavar="EPS",
        help="certify disagreement with the final exit <= EPS (fraction)",
    )
    rule.add_argument(
        "--max-accuracy-drop",
        type=float,
        metavar="EPS",
        help="certify the accuracy drop against the final exit <= EPS (fraction)",
    )
    rule.add_argument("--tolerance", type=float, help="allowed drop below the final exit")
    rule.add_argument("--target-accuracy", type=float, help="absolute accuracy (fraction)")
    rule.add_argument(
        "--match-baseline",
        type=Path,
        metavar="DIR",
        help="target = this plain checkpoint's validation accuracy",
    )
    p.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        help="1 - delta for --max-disagreement / --max-accuracy-drop (default 0.95)",
    )
    p.add_argument("--data-dir", type=Path, default=None, help="--recollect: data folder")
    p.add_argument("--cache-dir", type=Path, default=Path("cache"))
    return p


def recollect(ckpt: models.Checkpoint, data_dir: Path | None, cache_dir: Path) -> CalibrationData:
    """Every exit's entropy, correctness and prediction on the checkpoint's own
    validation split, rebuilt from its provenance and checked against the stored data.

    Raises:
        ValueError: no provenance, other data (checksum), or results that differ from the
            stored calibration data (a different split or network).
    """
    from training import data as data_mod
    from training.train import evaluate

    prov = ckpt.provenance
    split = prov.get("split") or {}
    if not prov.get("dataset") or "val" not in split or "seed" not in split:
        raise ValueError(f"{ckpt.path}: provenance does not say how the validation split was made")
    ds = data_mod.load_dataset(
        str(prov["dataset"]),
        data_dir or data_mod.default_data_dir(),
        val_size=int(split["val"]),
        seed=int(split["seed"]),
        cache_dir=cache_dir,
    )
    if prov.get("data_sha256") and ds.checksum != prov["data_sha256"]:
        raise ValueError(f"{ckpt.path}: the data differ from those it was trained on (checksum)")
    spec = ckpt.input_spec
    fresh = evaluate(
        ckpt.model,
        ds.val,
        mean=torch.tensor(spec.mean),
        std=torch.tensor(spec.std),
        device=torch.device("cpu"),
    )
    old = ckpt.calibration
    if old is not None:
        if old.entropy.shape != fresh.entropy.shape or not torch.equal(old.correct, fresh.correct):
            raise ValueError(f"{ckpt.path}: re-collected correctness differs from the stored one")
        diff = float((old.entropy - fresh.entropy).abs().max())
        if diff > 1e-3:
            raise ValueError(f"{ckpt.path}: re-collected entropies differ by up to {diff:.2g}")
        log.info(
            "%s: re-collected data match the stored ones (entropy within %.2g)", ckpt.path, diff
        )
        # keep the stored entropies bit for bit, so every earlier choice still reproduces
        return CalibrationData(old.entropy, old.correct, fresh.prediction)
    return fresh


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
    if args.recollect:
        fresh = recollect(ckpt, args.data_dir, args.cache_dir)
        models.save_calibration(args.checkpoint, fresh)
        log.info("%s: calibration data rewritten: %s", args.checkpoint, fresh.summary())
        return fresh.summary()
    if ckpt.calibration is None:
        raise ValueError(f"{args.checkpoint}: no calibration data to choose thresholds from")
    target = args.target_accuracy
    if args.match_baseline is not None:
        target = baseline_accuracy(args.match_baseline, ckpt)
    macs = ckpt.model.exit_macs()
    certified = None
    if args.max_disagreement is not None or args.max_accuracy_drop is not None:
        risk = "disagreement" if args.max_disagreement is not None else "accuracy_drop"
        eps = args.max_disagreement if args.max_disagreement is not None else args.max_accuracy_drop
        certified = models.certify_thresholds(
            ckpt.calibration, macs, risk=risk, epsilon=eps, delta=1.0 - args.confidence
        )
        point = certified.point
    else:
        point = models.choose_thresholds(
            ckpt.calibration, macs, tolerance=args.tolerance, target=target
        )
    metrics = dict(ckpt.metrics)
    metrics.setdefault("calibration_history", []).append(
        {"rule": metrics.get("calibration_rule"), "point": metrics.get("val_calibrated")}
    )
    metrics["val_calibrated"] = point.to_json() if certified is None else certified.to_json()
    metrics["calibration_rule"] = {
        "max_disagreement": args.max_disagreement,
        "max_accuracy_drop": args.max_accuracy_drop,
        "confidence": args.confidence if certified is not None else None,
        "tolerance": None if target is not None or certified is not None else args.tolerance,
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
    text = point.describe() if certified is None else certified.describe()
    log.info("%s: on the validation split, %s", args.checkpoint, text)
    return point.to_json() if certified is None else certified.to_json()


def cli() -> None:
    try:
        main()
    except (ValueError, models.CheckpointError) as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
