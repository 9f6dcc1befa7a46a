"""Real test images for the GPU checks, decoded and normalised like the service does."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from models import Checkpoint


def test_inputs(ckpt: Checkpoint, data_dir: Path, count: int, *, cache_dir: Path | None) -> Tensor:
    """``count`` test images of the checkpoint's data set (CIFAR-10 for 3-channel nets,
    MNIST for 1-channel ones), taken evenly from every class, deterministically, and
    normalised with its input spec.

    Args:
        ckpt: the checkpoint whose input spec applies.
        data_dir: the folder holding ``cifar10/test/<class>/*.jpg`` and
            ``mnist/t10k-images-idx3-ubyte.gz``.
        count: how many images (fewer if the split is smaller).
        cache_dir: where the decoded CIFAR-10 test split is cached (None: no cache).

    Returns:
        ``(N, C, H, W)`` float32 inputs on the CPU.
    """
    from training.data import (
        _find_idx,
        class_balanced_indices,
        load_image_folder,
        normalize,
        read_idx,
    )

    spec = ckpt.input_spec
    if spec.channels == 1:
        path = _find_idx(data_dir / "mnist", "t10k-images-idx3-ubyte")
        if path is None:
            raise FileNotFoundError(f"no MNIST test images under {data_dir / 'mnist'}")
        labels_path = _find_idx(data_dir / "mnist", "t10k-labels-idx1-ubyte")
        if labels_path is None:
            raise FileNotFoundError(f"no MNIST test labels under {data_dir / 'mnist'}")
        images = read_idx(path).unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28)
        labels = read_idx(labels_path).long()
    else:
        split, _ = load_image_folder(data_dir / "cifar10" / "test", cache_dir=cache_dir)
        images, labels = split.images, split.labels
    images = images[class_balanced_indices(labels, min(count, len(labels)))]
    return normalize(images, torch.tensor(spec.mean), torch.tensor(spec.std))
