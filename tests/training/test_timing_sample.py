"""The class-balanced timing sample (``training.data.class_balanced_indices``) and its
use by ``training.evaluate``: the batch-1 latency is timed on every class alike, not on
the first images in folder order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import models
from tests.training.conftest import CLASSES
from testsupport.checkpoints import sharpen_heads
from training import data as data_mod
from training import evaluate


def test_first_images_of_every_class_interleaved() -> None:
    # folder order: six of class 0, then six of class 1, ... (as CIFAR's image folders)
    labels = torch.arange(4).repeat_interleave(6)
    idx = data_mod.class_balanced_indices(labels, 8)
    assert idx.tolist() == [0, 6, 12, 18, 1, 7, 13, 19]
    assert torch.bincount(labels[idx]).tolist() == [2, 2, 2, 2]
    # not a multiple of the class count: counts differ by one at most, lower labels first
    counts = torch.bincount(labels[data_mod.class_balanced_indices(labels, 6)])
    assert counts.tolist() == [2, 2, 1, 1]


def test_every_prefix_is_balanced_and_the_whole_split_is_a_permutation() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (500,), generator=g)
    everything = data_mod.class_balanced_indices(labels, 10_000)
    assert sorted(everything.tolist()) == list(range(500))
    smallest = int(torch.bincount(labels).min())
    for n in (10, 50, 10 * smallest):
        counts = torch.bincount(labels[everything[:n]], minlength=10)
        assert int(counts.max() - counts.min()) == 0, n
    # within a class the split's own order is kept
    for k in range(10):
        picked = everything[labels[everything] == k]
        assert picked.tolist() == sorted(picked.tolist())


def test_a_class_that_runs_out_leaves_its_turns_to_the_others() -> None:
    labels = torch.tensor([0, 1, 1, 1, 1, 2, 2, 2])
    idx = data_mod.class_balanced_indices(labels, 6)
    assert idx.tolist() == [0, 1, 5, 2, 6, 3]
    assert data_mod.class_balanced_indices(labels, 0).tolist() == []
    with pytest.raises(ValueError):
        data_mod.class_balanced_indices(labels, -1)
    with pytest.raises(ValueError):
        data_mod.class_balanced_indices(labels.reshape(2, 4), 2)


def test_evaluate_times_the_same_number_of_images_per_class(
    cifar_dir: Path, tmp_path: Path
) -> None:
    # cifar_dir's test folders hold 6 images per class, listed class after class: the
    # first 20 in folder order would be classes 0-3 only
    torch.manual_seed(0)
    net = sharpen_heads(models.build_model("b-alexnet")).eval()
    spec = models.InputSpec(3, 32, 32, (0.5,) * 3, (0.25,) * 3)
    ckpt = models.save_checkpoint(
        tmp_path / "b-alexnet", net, class_names=list(CLASSES), input_spec=spec,
        thresholds=[0.5, 0.5], provenance={"dataset": "cifar10"},
    )  # fmt: skip
    out = tmp_path / "report"
    args = evaluate.get_args_parser().parse_args(
        ["--checkpoint", str(ckpt), "--data-dir", str(cifar_dir), "--cache-dir",
         str(tmp_path / "cache"), "--latency-samples", "20", "--repeats", "1", "--no-plots",
         "--out", str(out)]
    )  # fmt: skip
    evaluate.main(args)
    report = json.loads((out / "report.json").read_text())
    latency = report["branchy"]["latency_ms"]
    assert latency["samples"] == 20
    assert latency["class_counts"] == [2] * 10
    assert "median over 20 test images (class-balanced)" in (out / "report.md").read_text()
