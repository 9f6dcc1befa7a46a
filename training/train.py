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

import contextlib
import itertools
import json
import logging
import math
import os
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
from training.config import TrainConfig, parse_config
from training.data import Dataset, Split
from training.provenance import training_provenance

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


def build_model_from_config(cfg: TrainConfig, num_classes: int, channels: int) -> BranchyNet:
    config: dict[str, Any] = {"num_classes": num_classes, "in_channels": channels}
    if cfg.b1_extra_convs is not None:
        config["b1_extra_convs"] = cfg.b1_extra_convs
    return models.build_model(cfg.model, **config)


def exit_weights(cfg: TrainConfig, num_exits: int) -> list[float]:
    """Per-exit loss weights; raises ValueError on a count mismatch."""
    weights = cfg.exit_weights or [1.0] * num_exits
    if len(weights) != num_exits:
        raise ValueError(
            f"--exit-weights needs {num_exits} value(s) for {cfg.model}; got {len(weights)}"
        )
    return list(weights)


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
    )


def build_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: optional linear warm-up, then constant or cosine to zero."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        # read at every step: --time-budget may shorten cfg.epochs during training, and
        # the cosine then re-spans from the current step to the new end
        total = max(1, cfg.epochs * steps_per_epoch)
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
    cfg: TrainConfig,
    epoch: int,
    info: DistInfo,
    device: torch.device,
) -> float:
    """One pass over the (sharded) training split; returns the mean loss of this rank."""
    model.train()
    order_gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed * 100_019 + epoch)
    batches = data_mod.iterate_batches(
        split,
        cfg.batch_size,
        shuffle=True,
        generator=order_gen,
        rank=info.rank,
        world_size=info.world_size,
        drop_last=True,
    )
    steps = (len(split) // info.world_size) // cfg.batch_size
    bar = _progress(batches, steps, f"epoch {epoch + 1}/{cfg.epochs}", cfg, info)
    total, count = torch.zeros((), device=device), 0
    for images, labels in bar:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if cfg.augment:
            images = data_mod.random_crop_flip(images, pad=4, flip=True, generator=aug_gen)
        x = data_mod.normalize(images, mean, std)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, bool(cfg.amp)):
            outputs = model(x)
        loss = joint_loss(outputs, labels, weights, smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad_norm:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
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


def _progress(it: Any, total: int, desc: str, cfg: TrainConfig, info: DistInfo) -> Any:
    if cfg.no_progress or not info.is_main:
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


def write_args(path: Path, cfg: TrainConfig) -> None:
    """The resolved config as ``path/args.json``."""
    path.mkdir(parents=True, exist_ok=True)
    (path / ARGS_FILE).write_text(json.dumps(cfg.to_json(), indent=2, sort_keys=True) + "\n")


def calibrate_and_save(
    model: BranchyNet,
    ds: Dataset,
    cfg: TrainConfig,
    *,
    device: torch.device,
    history: list[dict[str, Any]],
    train_seconds: float,
) -> Path:
    """Calibrate on the validation split, choose thresholds, write the checkpoint."""
    mean = torch.tensor(ds.mean, device=device)
    std = torch.tensor(ds.std, device=device)
    calib = evaluate(
        model, ds.val, mean=mean, std=std, device=device, batch_size=cfg.eval_batch_size
    )
    macs = model.exit_macs()
    target = cfg.target_accuracy if model.num_exits > 1 else None
    point = models.choose_thresholds(calib, macs, tolerance=cfg.tolerance, target=target)
    log.info("calibrated on %d validation images: %s", calib.num_samples, point.describe())
    metrics = {
        "val_exit_accuracy": calib.correct.float().mean(0).tolist(),
        "val_calibrated": point.to_json(),
        "calibration_rule": {"tolerance": cfg.tolerance, "target_accuracy": target},
        "epochs": cfg.epochs,
        "train_seconds": round(train_seconds, 1),
        "history": history,
    }
    c, h, w = ds.train.images.shape[1:]
    spec = InputSpec(channels=c, height=h, width=w, mean=ds.mean, std=ds.std)
    out = models.save_checkpoint(
        cfg.out,
        model,
        class_names=ds.class_names,
        input_spec=spec,
        thresholds=point.thresholds,
        calibration=calib,
        metrics=metrics,
        provenance=training_provenance(cfg, ds, device),
    )
    write_args(cfg.out, cfg)
    return out


# ---------------------------------------------------------------------------- main


def main(config: TrainConfig) -> Path | None:
    """Train, calibrate and save; returns the checkpoint directory on rank 0.

    Raises:
        ValueError, FileNotFoundError, training.data.DatasetError: bad settings or data,
            each naming the bad value (:func:`cli` turns them into one line, exit 2).
    """
    cfg = config.resolved()
    # resolved() fills these in
    assert cfg.data_dir is not None and cfg.work_dir is not None
    info = setup_distributed()
    logging.basicConfig(
        level=logging.INFO if info.is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device, info)
    if cfg.amp is None:
        cfg.amp = device.type == "cuda"
    torch.manual_seed(cfg.seed)

    ds = data_mod.load_dataset(
        cfg.dataset,
        cfg.data_dir,
        val_size=cfg.val_size,
        seed=cfg.seed,
        download=cfg.download and info.is_main,
        cache_dir=cfg.cache_dir,
    )
    train_split = Split(ds.train.images.to(device), ds.train.labels.to(device))
    mean = torch.tensor(ds.mean, device=device)
    std = torch.tensor(ds.std, device=device)
    channels = ds.train.images.shape[1]
    model = build_model_from_config(cfg, len(ds.class_names), channels).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    weights = exit_weights(cfg, model.num_exits)
    optimizer = build_optimizer(cfg, model)
    steps = (len(train_split) // info.world_size) // cfg.batch_size
    if steps < 1:
        raise ValueError(f"--batch-size {cfg.batch_size} exceeds the training shard")
    scheduler = build_scheduler(cfg, optimizer, steps)

    start_epoch, history, train_seconds = 0, [], 0.0
    state_path = cfg.work_dir / STATE_FILE
    if cfg.resume:
        state = load_state(state_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        train_seconds = float(state["train_seconds"])
        if start_epoch > cfg.epochs:
            raise ValueError(f"--resume: {state_path} has {start_epoch} epochs, more than --epochs")
        # A different --epochs on resume re-spans the schedule from the current step to
        # the new end (e.g. to finish sooner); the step count itself is restored.
        log.info("resumed from %s after epoch %d of %d", state_path, start_epoch, cfg.epochs)

    train_model: nn.Module = model
    if info.world_size > 1:
        # early heads get no gradient during the main-only phase
        train_model = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.main_epochs > 0,
        )
    if cfg.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]
    if info.is_main:
        write_args(cfg.work_dir, cfg)
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
        if epoch >= cfg.epochs:
            break
        if epochs_run and cfg.time_budget is not None:
            fit_time_budget(cfg, epoch, epochs_run, time.perf_counter() - loop_start, info, device)
            if epoch >= cfg.epochs:
                break
        epochs_run += 1
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)  # dropout, reproducible on resume
        main_only = epoch < cfg.main_epochs
        w = [0.0] * (model.num_exits - 1) + [weights[-1]] if main_only else weights
        t0 = time.perf_counter()
        loss = train_one_epoch(
            train_model, optimizer, scheduler, train_split,
            weights=w, mean=mean, std=std, cfg=cfg, epoch=epoch, info=info, device=device,
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
        stop = cfg.stop_after_epoch is not None and epoch + 1 >= cfg.stop_after_epoch
        if not info.is_main:
            if stop:
                break
            continue
        val = evaluate(
            model, ds.val, mean=mean, std=std, device=device,
            batch_size=cfg.eval_batch_size, channels_last=cfg.channels_last,
        )  # fmt: skip
        accs = val.correct.float().mean(0).tolist()
        history.append(
            {"epoch": epoch + 1, "loss": loss, "val_exit_accuracy": accs, "seconds": seconds}
        )
        log.info(
            "epoch %d/%d%s loss %.4f val acc %s lr %.2e time %.1fs",
            epoch + 1,
            cfg.epochs,
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
    stopped = cfg.stop_after_epoch is not None and cfg.stop_after_epoch < cfg.epochs
    if info.is_main and not stopped:
        out = calibrate_and_save(
            model, ds, cfg, device=device, history=history, train_seconds=train_seconds
        )
        log.info("wrote %s", out)
    if info.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


def fit_time_budget(
    cfg: TrainConfig,
    done: int,
    epochs_run: int,
    elapsed: float,
    info: DistInfo,
    device: torch.device,
) -> None:
    """Shorten ``cfg.epochs`` so that training ends within ``cfg.time_budget`` seconds.

    ``elapsed`` covers the ``epochs_run`` epochs this process ran (validation included),
    so the first epoch's one-off costs (cuDNN autotuning, compilation) make the estimate
    err towards fewer epochs. The count only ever shrinks, never below ``done``; with
    several processes, rank 0 decides for all.
    """
    assert cfg.time_budget is not None, "called only with a time budget"
    per_epoch = elapsed / epochs_run
    fit = done + int(max(0.0, cfg.time_budget - elapsed) // per_epoch)
    if info.world_size > 1:
        decided = torch.tensor([fit], device=device)  # NCCL needs it on the GPU
        dist.broadcast(decided, src=0)
        fit = int(decided.item())
    if fit < cfg.epochs:
        if info.is_main:
            log.info(
                "time budget %.0fs: %.1fs per epoch, so %d epochs fit; shortening from %d",
                cfg.time_budget, per_epoch, max(fit, done), cfg.epochs,
            )  # fmt: skip
        cfg.epochs = max(fit, done)


def cli(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``branchy-train``): builds the config from the command line
    and trains; errors in the inputs end with one clear line, exit status 2."""
    try:
        main(parse_config(argv))
    except (data_mod.DatasetError, ValueError, FileNotFoundError) as exc:
        logging.getLogger("training.train").error("%s", exc)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
