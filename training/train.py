"""Train a (branchy) network jointly over its exits and save a calibrated checkpoint.

Example::

    python -m training.train --model b-lenet --dataset mnist --epochs 20 --out zoo/b-lenet

The loss is the weighted sum of every exit's cross-entropy (``--exit-weights``, all 1.0
by default). With ``--main-epochs M`` the first M epochs train only the final exit (the
main network), as the original code did, and the rest train jointly. At the end the
per-exit entropies and correctness on the held-out validation split are saved as
calibration data, and the cheapest thresholds that keep validation accuracy within
``--tolerance`` of the final exit (or above ``--target-accuracy``) become the checkpoint's
defaults. The test split is never read here.

Under ``torchrun`` the model is wrapped in ``DistributedDataParallel``; every rank
trains on its own shard and rank 0 evaluates and writes files.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import models
from models import BranchyNet, CalibrationData, InputSpec, devices
from models.calibration import collect_calibration
from training import data as data_mod
from training.data import Dataset, Split

log = logging.getLogger("training.train")

STATE_FILE = "last.pt"
ARGS_FILE = "args.json"


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a ``torchrun`` job (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------------------- arguments


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
        default=None,
        help="B-AlexNet: extra Conv(32->32) layers in the first branch (0..4; default 1)",
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True, choices=data_mod.DATASETS)
    g.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"data root (default: ${data_mod.DATA_DIR_ENV}, then ./data)",
    )
    g.add_argument("--download", action="store_true", help="download via torchvision first")
    g.add_argument("--cache-dir", type=Path, default=Path("cache"), help="decoded-image cache")
    g.add_argument("--val-size", type=int, default=5000, help="held-out validation images")
    g.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random crop (pad 4) + horizontal flip (default: on for cifar10, off for mnist)",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=20, help="total epochs (main-only + joint)")
    g.add_argument(
        "--main-epochs",
        type=int,
        default=0,
        help="first epochs train only the final exit (two-phase schedule); 0 = joint throughout",
    )
    g.add_argument("--batch-size", type=int, default=512, help="per-process batch size")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (paper: Adam 1e-3)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    g.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up (epochs)")
    g.add_argument(
        "--exit-weights",
        type=_float_list,
        default=None,
        help="comma-separated loss weight per exit (default: all 1.0)",
    )
    g.add_argument(
        "--clip-grad-norm",
        type=float,
        default=None,
        metavar="MAX",
        help="clip the gradients' global norm to MAX (B-ResNet's wide linear branch heads "
        "diverge under SGD at high learning rates without it)",
    )
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g = p.add_argument_group("calibration")
    g.add_argument(
        "--tolerance",
        type=float,
        default=0.005,
        help="allowed validation-accuracy drop below the final exit, as a fraction",
    )
    g.add_argument(
        "--target-accuracy",
        type=float,
        default=None,
        help="absolute validation-accuracy target (fraction); overrides --tolerance",
    )
    g = p.add_argument_group("runtime")
    g.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    g.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="resumable training state (default: runs/<out name>)",
    )
    g.add_argument("--resume", action="store_true", help="continue from <work-dir>/last.pt")
    g.add_argument(
        "--stop-after-epoch",
        type=int,
        default=None,
        help="save the resumable state after this epoch and exit without a checkpoint",
    )
    g.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="shorten --epochs (and re-span the schedule) so that the epochs end within "
        "this many seconds; the count is estimated from the epochs run so far",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    g.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bfloat16 autocast for the forward pass (default: on for CUDA, off for CPU; "
        "on a CPU with AVX-512 BF16 it trains about 1.3x faster)",
    )
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    g.add_argument("--compile", action="store_true", help="torch.compile the training model")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    g.add_argument("--eval-batch-size", type=int, default=1024)
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers; got {text!r}"
        ) from None


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill defaults that depend on other arguments and check the combination.

    Raises:
        ValueError: an inconsistent combination, naming the bad value.
    """
    if args.data_dir is None:
        args.data_dir = data_mod.default_data_dir()
    if args.work_dir is None:
        args.work_dir = Path("runs") / args.out.name
    if args.augment is None:
        args.augment = args.dataset == "cifar10"
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1; got {args.epochs}")
    if not 0 <= args.main_epochs <= args.epochs:
        raise ValueError(f"--main-epochs must be in 0..--epochs; got {args.main_epochs}")
    if args.b1_extra_convs is not None and "alexnet" not in args.model:
        raise ValueError("--b1-extra-convs applies to b-alexnet only")
    if args.b1_extra_convs is not None and not 0 <= args.b1_extra_convs <= 4:
        raise ValueError(f"--b1-extra-convs must be in 0..4; got {args.b1_extra_convs}")
    return args


# ---------------------------------------------------------------------------- setup


def setup_distributed() -> DistInfo:
    """Join the ``torchrun`` process group if there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(name: str, info: DistInfo) -> torch.device:
    """:func:`models.devices.resolve_device`; under torchrun each rank takes its local
    GPU, made the current one."""
    device = devices.resolve_device(name, local_rank=info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def build_model_from_args(args: argparse.Namespace, num_classes: int, channels: int) -> BranchyNet:
    config: dict[str, Any] = {"num_classes": num_classes, "in_channels": channels}
    if args.b1_extra_convs is not None:
        config["b1_extra_convs"] = args.b1_extra_convs
    return models.build_model(args.model, **config)


def exit_weights(args: argparse.Namespace, num_exits: int) -> list[float]:
    """Per-exit loss weights; raises ValueError on a count mismatch."""
    weights = args.exit_weights or [1.0] * num_exits
    if len(weights) != num_exits:
        raise ValueError(
            f"--exit-weights needs {num_exits} value(s) for {args.model}; got {len(weights)}"
        )
    return list(weights)


def build_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adam":
        return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(
        params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, nesterov=True
    )


def build_scheduler(
    args: argparse.Namespace, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: optional linear warm-up, then constant or cosine to zero."""
    warmup = int(args.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if args.schedule == "constant":
            return 1.0
        # read at every step: --time-budget may shorten args.epochs during training, and
        # the cosine then re-spans from the current step to the new end
        total = max(1, args.epochs * steps_per_epoch)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------- loops


def joint_loss(
    outputs: Sequence[Tensor], labels: Tensor, weights: Sequence[float], *, smoothing: float = 0.0
) -> Tensor:
    """Weighted sum of every exit's cross-entropy; exits with weight 0 are skipped."""
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for logits, w in zip(outputs, weights, strict=True):
        if w:
            ce = nn.functional.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
            total = total + w * ce
    return total


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    split: Split,
    *,
    weights: Sequence[float],
    mean: Tensor,
    std: Tensor,
    args: argparse.Namespace,
    epoch: int,
    info: DistInfo,
    device: torch.device,
) -> float:
    """One pass over the (sharded) training split; returns the mean loss of this rank."""
    model.train()
    order_gen = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
    aug_gen = torch.Generator(device=device).manual_seed(args.seed * 100_019 + epoch)
    batches = data_mod.iterate_batches(
        split,
        args.batch_size,
        shuffle=True,
        generator=order_gen,
        rank=info.rank,
        world_size=info.world_size,
        drop_last=True,
    )
    steps = (len(split) // info.world_size) // args.batch_size
    bar = _progress(batches, steps, f"epoch {epoch + 1}/{args.epochs}", args, info)
    total, count = torch.zeros((), device=device), 0
    for images, labels in bar:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if args.augment:
            images = data_mod.random_crop_flip(images, pad=4, flip=True, generator=aug_gen)
        x = data_mod.normalize(images, mean, std)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, args.amp):
            outputs = model(x)
        loss = joint_loss(outputs, labels, weights, smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad_norm:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
        optimizer.step()
        scheduler.step()
        total += loss.detach()
        count += 1
        if count % 20 == 0 and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{float(total) / count:.4f}")
    return float(total) / max(count, 1)


@torch.no_grad()
def evaluate(
    model: BranchyNet,
    split: Split,
    *,
    mean: Tensor,
    std: Tensor,
    device: torch.device,
    batch_size: int = 1024,
    channels_last: bool = False,
) -> CalibrationData:
    """Every exit's entropy, correctness and predicted class on ``split`` (on the CPU),
    in eval mode."""

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in data_mod.iterate_batches(split, batch_size, shuffle=False):
            x = data_mod.normalize(images.to(device), mean, std)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, labels

    return collect_calibration(model, batches())


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if enabled:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _progress(it: Any, total: int, desc: str, args: argparse.Namespace, info: DistInfo) -> Any:
    if args.no_progress or not info.is_main:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0)


# ---------------------------------------------------------------------------- state, output


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write the resumable training state atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> dict[str, Any]:
    """Read a state written by :func:`save_state` (tensors and plain data only)."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no training state at {path}")
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def provenance(args: argparse.Namespace, ds: Dataset, device: torch.device) -> dict[str, Any]:
    """Where the checkpoint came from: command, code version, data, software, machine."""
    import torchvision

    return {
        "command": shlex.join([Path(sys.executable).name, "-m", "training.train", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dataset": ds.name,
        "data_dir": str(args.data_dir),
        "data_sha256": ds.checksum,
        "split": {"train": len(ds.train), "val": len(ds.val), "seed": args.seed},
        "device": str(device),
        "machine": machine_info(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
        },
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


def write_args(path: Path, args: argparse.Namespace) -> None:
    resolved = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path.mkdir(parents=True, exist_ok=True)
    (path / ARGS_FILE).write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")


def calibrate_and_save(
    model: BranchyNet,
    ds: Dataset,
    args: argparse.Namespace,
    *,
    device: torch.device,
    history: list[dict[str, Any]],
    train_seconds: float,
) -> Path:
    """Calibrate on the validation split, choose thresholds, write the checkpoint."""
    mean = torch.tensor(ds.mean, device=device)
    std = torch.tensor(ds.std, device=device)
    calib = evaluate(
        model, ds.val, mean=mean, std=std, device=device, batch_size=args.eval_batch_size
    )
    macs = model.exit_macs()
    target = args.target_accuracy if model.num_exits > 1 else None
    point = models.choose_thresholds(calib, macs, tolerance=args.tolerance, target=target)
    log.info("calibrated on %d validation images: %s", calib.num_samples, point.describe())
    metrics = {
        "val_exit_accuracy": calib.correct.float().mean(0).tolist(),
        "val_calibrated": point.to_json(),
        "calibration_rule": {"tolerance": args.tolerance, "target_accuracy": target},
        "epochs": args.epochs,
        "train_seconds": round(train_seconds, 1),
        "history": history,
    }
    c, h, w = ds.train.images.shape[1:]
    spec = InputSpec(channels=c, height=h, width=w, mean=ds.mean, std=ds.std)
    out = models.save_checkpoint(
        args.out,
        model,
        class_names=ds.class_names,
        input_spec=spec,
        thresholds=point.thresholds,
        calibration=calib,
        metrics=metrics,
        provenance=provenance(args, ds, device),
    )
    write_args(args.out, args)
    return out


# ---------------------------------------------------------------------------- main


def main(args: argparse.Namespace | None = None) -> Path | None:
    """Train, calibrate and save; returns the checkpoint directory on rank 0."""
    if args is None:
        args = get_args_parser().parse_args()
    args = resolve_args(args)
    info = setup_distributed()
    logging.basicConfig(
        level=logging.INFO if info.is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, info)
    if args.amp is None:
        args.amp = device.type == "cuda"
    torch.manual_seed(args.seed)

    ds = data_mod.load_dataset(
        args.dataset,
        args.data_dir,
        val_size=args.val_size,
        seed=args.seed,
        download=args.download and info.is_main,
        cache_dir=args.cache_dir,
    )
    train_split = Split(ds.train.images.to(device), ds.train.labels.to(device))
    mean = torch.tensor(ds.mean, device=device)
    std = torch.tensor(ds.std, device=device)
    channels = ds.train.images.shape[1]
    model = build_model_from_args(args, len(ds.class_names), channels).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    weights = exit_weights(args, model.num_exits)
    optimizer = build_optimizer(args, model)
    steps = (len(train_split) // info.world_size) // args.batch_size
    if steps < 1:
        raise ValueError(f"--batch-size {args.batch_size} exceeds the training shard")
    scheduler = build_scheduler(args, optimizer, steps)

    start_epoch, history, train_seconds = 0, [], 0.0
    state_path = args.work_dir / STATE_FILE
    if args.resume:
        state = load_state(state_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        train_seconds = float(state["train_seconds"])
        if start_epoch > args.epochs:
            raise ValueError(f"--resume: {state_path} has {start_epoch} epochs, more than --epochs")
        # A different --epochs on resume re-spans the schedule from the current step to
        # the new end (e.g. to finish sooner); the step count itself is restored.
        log.info("resumed from %s after epoch %d of %d", state_path, start_epoch, args.epochs)

    train_model: nn.Module = model
    if info.world_size > 1:
        # early heads get no gradient during the main-only phase
        train_model = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=args.main_epochs > 0,
        )
    if args.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]
    if info.is_main:
        write_args(args.work_dir, args)
        log.info(
            "%s: %d exits, exit MACs %s, %d parameters; %d steps/epoch on %s",
            model.name,
            model.num_exits,
            model.exit_macs(),
            sum(p.numel() for p in model.parameters()),
            steps,
            device,
        )

    loop_start, epochs_run = time.perf_counter(), 0
    for epoch in itertools.count(start_epoch):
        if epoch >= args.epochs:
            break
        if epochs_run and args.time_budget is not None:
            fit_time_budget(args, epoch, epochs_run, time.perf_counter() - loop_start, info, device)
            if epoch >= args.epochs:
                break
        epochs_run += 1
        torch.manual_seed(args.seed * 1_000_003 + epoch)  # dropout, reproducible on resume
        main_only = epoch < args.main_epochs
        w = [0.0] * (model.num_exits - 1) + [weights[-1]] if main_only else weights
        t0 = time.perf_counter()
        loss = train_one_epoch(
            train_model, optimizer, scheduler, train_split,
            weights=w, mean=mean, std=std, args=args, epoch=epoch, info=info, device=device,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        if not math.isfinite(loss):
            raise ValueError(
                f"training diverged in epoch {epoch + 1} (mean loss {loss}); "
                "lower --lr or set --clip-grad-norm"
            )
        if info.world_size > 1:
            dist.barrier()
        stop = args.stop_after_epoch is not None and epoch + 1 >= args.stop_after_epoch
        if not info.is_main:
            if stop:
                break
            continue
        val = evaluate(
            model, ds.val, mean=mean, std=std, device=device,
            batch_size=args.eval_batch_size, channels_last=args.channels_last,
        )  # fmt: skip
        accs = val.correct.float().mean(0).tolist()
        history.append(
            {"epoch": epoch + 1, "loss": loss, "val_exit_accuracy": accs, "seconds": seconds}
        )
        log.info(
            "epoch %d/%d%s loss %.4f val acc %s lr %.2e time %.1fs",
            epoch + 1,
            args.epochs,
            " (main exit only)" if main_only else "",
            loss,
            " ".join(f"{100 * a:.2f}%" for a in accs),
            scheduler.get_last_lr()[0],
            seconds,
        )
        save_state(
            state_path,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "history": history,
                "train_seconds": train_seconds,
            },
        )
        if stop:
            log.info("stopped after epoch %d as asked; continue with --resume", epoch + 1)
            break

    out = None
    stopped = args.stop_after_epoch is not None and args.stop_after_epoch < args.epochs
    if info.is_main and not stopped:
        out = calibrate_and_save(
            model, ds, args, device=device, history=history, train_seconds=train_seconds
        )
        log.info("wrote %s", out)
    if info.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


def fit_time_budget(
    args: argparse.Namespace,
    done: int,
    epochs_run: int,
    elapsed: float,
    info: DistInfo,
    device: torch.device,
) -> None:
    """Shorten ``args.epochs`` so that training ends within ``args.time_budget`` seconds.

    ``elapsed`` covers the ``epochs_run`` epochs this process ran (validation included),
    so the first epoch's one-off costs (cuDNN autotuning, compilation) make the estimate
    err towards fewer epochs. The count only ever shrinks, never below ``done``; with
    several processes, rank 0 decides for all.
    """
    per_epoch = elapsed / epochs_run
    fit = done + int(max(0.0, args.time_budget - elapsed) // per_epoch)
    if info.world_size > 1:
        decided = torch.tensor([fit], device=device)  # NCCL needs it on the GPU
        dist.broadcast(decided, src=0)
        fit = int(decided.item())
    if fit < args.epochs:
        if info.is_main:
            log.info(
                "time budget %.0fs: %.1fs per epoch, so %d epochs fit; shortening from %d",
                args.time_budget, per_epoch, max(fit, done), args.epochs,
            )  # fmt: skip
        args.epochs = max(fit, done)


def cli() -> None:
    """Console entry point: errors in the inputs end with one clear line, exit status 2."""
    try:
        main()
    except (data_mod.DatasetError, ValueError, FileNotFoundError) as exc:
        logging.getLogger("training.train").error("%s", exc)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
