"""A few hundred joint-training steps of a branchy net on real CIFAR-10, one optimiser
setting at a time: does it learn, stall or blow up? For choosing a GPU recipe on the CPU.

    BRANCHY_DATA_DIR=../shared/data .venv/bin/python scripts/optimizer_trial.py \\
        --model b-resnet20 --optimizer sgd --lr 0.2 --clip-grad-norm 1

Random batches of the training split (validation images held out as in training), the
joint loss of ``training.train`` (sum of every exit's cross-entropy; chance is
``num_exits * ln 10``), bfloat16 autocast, a linear warm-up over ``--warmup-steps``.
Prints the mean and largest loss and the largest gradient norm (before clipping) of
every window of steps. Nothing is saved: this is a smoke trial, not a training.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from training import data as data_mod  # noqa: E402
from training.train import joint_loss  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="b-resnet20")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--clip-grad-norm", type=float, default=0.0, help="0: no clipping")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--window", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", type=Path, default=None)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ds = data_mod.load_dataset("cifar10", args.data_dir or data_mod.default_data_dir())
    images, labels = ds.train.images, ds.train.labels.long()
    mean, std = torch.tensor(ds.mean), torch.tensor(ds.std)
    net = models.build_model(args.model).train()
    opt: torch.optim.Optimizer
    if args.optimizer == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    else:  # the ResNet recipe's SGD
        opt = torch.optim.SGD(
            net.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
    gen = torch.Generator().manual_seed(0)
    losses: list[float] = []
    norms: list[float] = []
    start = time.perf_counter()
    print(f"{args.model} {args.optimizer} lr {args.lr} clip {args.clip_grad_norm or 'off'}; "
          f"chance {net.num_exits * math.log(10):.2f}")  # fmt: skip
    for step in range(args.steps):
        idx = torch.randint(0, images.shape[0], (args.batch_size,), generator=gen)
        x = data_mod.normalize(images[idx], mean, std)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup_steps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = net(x)
        loss = joint_loss([o.float() for o in outs], labels[idx], [1.0] * net.num_exits)
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(
            net.parameters(), args.clip_grad_norm if args.clip_grad_norm > 0 else math.inf
        )
        opt.step()
        losses.append(loss.item())
        norms.append(float(norm))
        if (step + 1) % args.window == 0:
            w = losses[-args.window :]
            print(
                f"step {step + 1:4d}  loss {sum(w) / len(w):7.3f}  max {max(w):8.2f}  "
                f"grad norm max {max(norms[-args.window :]):8.1f}  "
                f"{time.perf_counter() - start:5.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
