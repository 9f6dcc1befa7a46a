"""The service checks' test JPEGs and the offline answers served ones are compared with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu.common import MAX_PIXELS
from models import Checkpoint, entropy_from_logits
from service.preprocess import preprocess


@dataclass
class Images:
    names: list[str]
    data: list[bytes]
    labels: list[int]


def load_images(data_dir: Path, count: int, class_names: list[str]) -> Images:
    """The first ``count`` CIFAR-10 test JPEGs, interleaving classes (0000 of every
    class, then 0001, ...) so that any prefix has every class."""
    test = data_dir / "cifar10" / "test"
    files = sorted(test.glob("*/*.jpg"), key=lambda p: (p.stem, p.parent.name))[:count]
    if len(files) < count:
        raise FileNotFoundError(f"only {len(files)} JPEGs under {test}; {count} asked")
    return Images(
        names=[f"{p.parent.name}/{p.name}" for p in files],
        data=[p.read_bytes() for p in files],
        labels=[class_names.index(p.parent.name) for p in files],
    )


@dataclass
class Reference:
    """Offline answers: CPU, float32, default thresholds, service preprocessing."""

    x: torch.Tensor  # (N, C, H, W) normalised inputs
    thresholds: list[float]
    exit: torch.Tensor  # (N,)
    cls: torch.Tensor  # (N,)
    entropy: torch.Tensor  # (N,) at the exit taken
    all_entropy: torch.Tensor  # (N, E) at every exit
    all_probs: torch.Tensor  # (N, E, C) at every exit


def reference(ckpt: Checkpoint, images: Images) -> Reference:
    spec = ckpt.input_spec
    x = torch.stack([preprocess(d, spec, max_pixels=MAX_PIXELS) for d in images.data])
    model = ckpt.model.float().eval()
    exits, classes, ents, all_logits = [], [], [], []
    with torch.inference_mode():
        for xb in x.split(256):
            r = model.early_exit(xb, ckpt.thresholds)
            exits.append(r.exit_index)
            classes.append(r.logits.argmax(1))
            ents.append(r.entropy)
            all_logits.append(torch.stack([z.float() for z in model(xb)], dim=1))
    logits = torch.cat(all_logits)
    return Reference(
        x=x,
        thresholds=list(ckpt.thresholds),
        exit=torch.cat(exits),
        cls=torch.cat(classes),
        entropy=torch.cat(ents),
        all_entropy=entropy_from_logits(logits),
        all_probs=torch.softmax(logits, dim=-1),
    )


def agreement(
    ref: Reference,
    cls: list[int],
    exit_: list[int],
    entropy: list[float],
    tol: float,
) -> dict[str, Any]:
    """Compare answers with the reference; explain each disagreement."""
    n = len(cls)
    got_cls, got_exit = torch.tensor(cls), torch.tensor(exit_)
    same_cls = got_cls == ref.cls[:n]
    same_exit = got_exit == ref.exit[:n]
    both = same_cls & same_exit
    t = torch.tensor(ref.thresholds)
    details = []
    near = 0
    for k in (~both).nonzero().flatten().tolist():
        re, ge = int(ref.exit[k]), int(got_exit[k])
        item: dict[str, Any] = {"image": k, "ref": [re, int(ref.cls[k])], "got": [ge, cls[k]]}
        if re != ge:
            # The exits up to the later of the two decided differently: distance of the
            # reference entropy from the threshold at the closest one.
            upto = min(max(re, ge) + 1, len(t))
            dist = (ref.all_entropy[k, :upto] - t[:upto]).abs().min().item()
            item["entropy_to_threshold"] = dist
            tie = dist < tol
        else:
            top2 = ref.all_probs[k, re].topk(2).values
            margin = float(top2[0] - top2[1])
            item["top2_margin"] = margin
            tie = margin < tol
        item["near_tie"] = tie
        near += tie
        details.append(item)
    ent_diff = [abs(entropy[k] - float(ref.entropy[k])) for k in range(n) if bool(same_exit[k])]
    return {
        "images": n,
        "class_agree": int(same_cls.sum()),
        "class_agree_pct": 100.0 * float(same_cls.float().mean()),
        "exit_agree": int(same_exit.sum()),
        "exit_agree_pct": 100.0 * float(same_exit.float().mean()),
        "both_agree": int(both.sum()),
        "both_agree_pct": 100.0 * float(both.float().mean()),
        "disagreements": n - int(both.sum()),
        "near_tie_disagreements": near,
        "tie_tol": tol,
        "max_entropy_abs_diff_same_exit": max(ent_diff, default=0.0),
        "disagreement_details": details[:25],
    }
