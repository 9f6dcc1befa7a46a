"""What one training run is configured with (:class:`TrainConfig`), and the command line
that builds it (:func:`get_args_parser`, :func:`parse_config`).

``training.train.main`` takes a :class:`TrainConfig`; the CLI, the tests and any other
caller build one, so training never reads an argparse ``Namespace``. The resolved config is
written next to the checkpoint as ``args.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import models
from training import data as data_mod


@dataclass
class TrainConfig:
    """Every setting of a training run; the CLI flag of ``name`` is ``--name`` with dashes
    (the help texts are in :func:`get_args_parser`).

    ``model``, ``dataset`` and ``out`` are required; ``None`` means "derive it" for
    ``data_dir``, ``work_dir``, ``augment`` and ``amp`` (see :meth:`resolved` and
    ``training.train.main``).
    """

    # model
    model: str
    dataset: str
    out: Path
    b1_extra_convs: int | None = None
    # data
    data_dir: Path | None = None
    download: bool = False
    cache_dir: Path = Path("cache")
    val_size: int = 5000
    augment: bool | None = None
    # optimisation
    epochs: int = 20
    main_epochs: int = 0
    batch_size: int = 512
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    exit_weights: list[float] | None = None
    clip_grad_norm: float | None = None
    label_smoothing: float = 0.0
    # calibration
    tolerance: float = 0.005
    target_accuracy: float | None = None
    # runtime
    work_dir: Path | None = None
    resume: bool = False
    stop_after_epoch: int | None = None
    time_budget: float | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None
    channels_last: bool = False
    compile: bool = False
    threads: int | None = None
    eval_batch_size: int = 1024
    no_progress: bool = False

    def resolved(self) -> TrainConfig:
        """A copy with the defaults that depend on other settings filled in, checked.

        Raises:
            ValueError: an inconsistent combination, naming the bad value.
        """
        cfg = dataclasses.replace(self, out=Path(self.out))
        if cfg.data_dir is None:
            cfg.data_dir = data_mod.default_data_dir()
        if cfg.work_dir is None:
            cfg.work_dir = Path("runs") / cfg.out.name
        if cfg.augment is None:
            cfg.augment = cfg.dataset == "cifar10"
        if cfg.epochs < 1:
            raise ValueError(f"--epochs must be >= 1; got {cfg.epochs}")
        if not 0 <= cfg.main_epochs <= cfg.epochs:
            raise ValueError(f"--main-epochs must be in 0..--epochs; got {cfg.main_epochs}")
        if cfg.b1_extra_convs is not None and "alexnet" not in cfg.model:
            raise ValueError("--b1-extra-convs applies to b-alexnet only")
        if cfg.b1_extra_convs is not None and not 0 <= cfg.b1_extra_convs <= 4:
            raise ValueError(f"--b1-extra-convs must be in 0..4; got {cfg.b1_extra_convs}")
        return cfg

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (paths as strings), as written to ``args.json``."""
        return {
            k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()
        }


# ---------------------------------------------------------------------------- the CLI


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The training CLI's arguments, grouped."""
    p = argparse.ArgumentParser(
        description="Train a branchy network and save a calibrated checkpoint.",
        add_help=add_help,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help=f"one of: {', '.join(models.list_models())}")
    g.add_argument(
        "--b1-extra-convs",
        type=int,
        help="B-AlexNet: extra Conv(32->32) layers in the first branch (0..4; default 1)",
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True, choices=data_mod.DATASETS)
    g.add_argument(
        "--data-dir",
        type=Path,
        help=f"data root (default: ${data_mod.DATA_DIR_ENV}, then ./data)",
    )
    g.add_argument("--download", action="store_true", help="download via torchvision first")
    g.add_argument("--cache-dir", type=Path, help="decoded-image cache")
    g.add_argument("--val-size", type=int, help="held-out validation images")
    g.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        help="random crop (pad 4) + horizontal flip (default: on for cifar10, off for mnist)",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="total epochs (main-only + joint)")
    g.add_argument(
        "--main-epochs",
        type=int,
        help="first epochs train only the final exit (two-phase schedule); 0 = joint throughout",
    )
    g.add_argument("--batch-size", type=int, help="per-process batch size")
    g.add_argument("--optimizer", choices=("adam", "sgd"))
    g.add_argument("--lr", type=float, help="peak learning rate (paper: Adam 1e-3)")
    g.add_argument("--momentum", type=float, help="SGD momentum")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--schedule", choices=("constant", "cosine"))
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up (epochs)")
    g.add_argument(
        "--exit-weights",
        type=_float_list,
        help="comma-separated loss weight per exit (default: all 1.0)",
    )
    g.add_argument(
        "--clip-grad-norm",
        type=float,
        metavar="MAX",
        help="clip the gradients' global norm to MAX (B-ResNet's wide linear branch heads "
        "diverge under SGD at high learning rates without it)",
    )
    g.add_argument("--label-smoothing", type=float)
    g = p.add_argument_group("calibration")
    g.add_argument(
        "--tolerance",
        type=float,
        help="allowed validation-accuracy drop below the final exit, as a fraction",
    )
    g.add_argument(
        "--target-accuracy",
        type=float,
        help="absolute validation-accuracy target (fraction); overrides --tolerance",
    )
    g = p.add_argument_group("runtime")
    g.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    g.add_argument(
        "--work-dir",
        type=Path,
        help="resumable training state (default: runs/<out name>)",
    )
    g.add_argument("--resume", action="store_true", help="continue from <work-dir>/last.pt")
    g.add_argument(
        "--stop-after-epoch",
        type=int,
        help="save the resumable state after this epoch and exit without a checkpoint",
    )
    g.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="shorten --epochs (and re-span the schedule) so that the epochs end within "
        "this many seconds; the count is estimated from the epochs run so far",
    )
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="cpu | cuda | cuda:N | auto")
    g.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        help="bfloat16 autocast for the forward pass (default: on for CUDA, off for CPU; "
        "on a CPU with AVX-512 BF16 it trains about 1.3x faster)",
    )
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    g.add_argument("--compile", action="store_true", help="torch.compile the training model")
    g.add_argument("--threads", type=int, help="CPU threads (torch default)")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    # The defaults are the dataclass's, so the CLI and TrainConfig(...) cannot disagree.
    p.set_defaults(**{f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING})
    return p


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers; got {text!r}"
        ) from None


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """The resolved :class:`TrainConfig` of a command line (``sys.argv`` by default).

    Raises:
        SystemExit: 2, with argparse's usage message, on a malformed command line.
        ValueError: an inconsistent combination (:meth:`TrainConfig.resolved`).
    """
    return TrainConfig(**vars(get_args_parser().parse_args(argv))).resolved()
