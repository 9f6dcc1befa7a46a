"""Tiny synthetic data sets written by the tests in the real on-disk formats."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def make_images(n: int, channels: int, size: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: class k lights up horizontal band k, plus noise. (N, C, H, W)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, channels, size, size), dtype=np.uint8)
    band = size // 10
    for i, k in enumerate(labels):
        images[i, :, k * band : (k + 1) * band, :] = 220
    return images, labels.astype(np.uint8)


def write_idx(path: Path, array: np.ndarray, *, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_mnist(folder: Path, *, n_train: int, n_test: int, compress: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for part, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = make_images(n, 1, 28, seed=seed)
        write_idx(folder / f"{part}-images-idx3-ubyte", images[:, 0], compress=compress)
        write_idx(folder / f"{part}-labels-idx1-ubyte", labels, compress=compress)


def write_image_folder(root: Path, *, n_train: int, n_test: int, fmt: str = "png") -> None:
    for part, n, seed in (("train", n_train, 3), ("test", n_test, 4)):
        images, labels = make_images(n, 3, 32, seed=seed)
        for i, (img, k) in enumerate(zip(images, labels, strict=True)):
            folder = root / part / CLASSES[k]
            folder.mkdir(parents=True, exist_ok=True)
            kind = fmt if fmt != "mixed" else ("png" if i % 2 else "jpg")
            path = folder / f"{i:04d}.{kind}"
            pil = Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)))  # (H, W, C)
            if kind == "png":
                pil.save(path, format="PNG")
            else:
                pil.save(path, format="JPEG", quality=90)


def write_cifar_pickles(root: Path, *, per_batch: int, n_test: int) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for j, name in enumerate(names):
        n = n_test if name == "test_batch" else per_batch
        images, labels = make_images(n, 3, 32, seed=10 + j)
        entry = {"data": images.reshape(n, -1), "labels": [int(v) for v in labels]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mnist")
    write_mnist(root, n_train=1200, n_test=200)
    return root


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_image_folder(root / "cifar10", n_train=300, n_test=60, fmt="mixed")
    return root
