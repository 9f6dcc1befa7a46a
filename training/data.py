"""Data sets for training and evaluation, decoded once into uint8 tensors.

MNIST is read from IDX files (gzipped or not), either in a plain folder or in a
torchvision root (``<root>/MNIST/raw``). CIFAR-10 is read from an image-folder tree
(``train/<class>/*.jpg|png`` and ``test/<class>/...``) or from torchvision's
``cifar-10-batches-py`` pickles. Images stay uint8 ``(N, C, H, W)`` in memory; batches are
converted to float, augmented and normalised on the training device, so no epoch ever
decodes an image again.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from models.checkpoint import normalise_pixels

log = logging.getLogger(__name__)

DATA_DIR_ENV = "BRANCHY_DATA_DIR"
DATASETS = ("mnist", "cifar10")
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
MNIST_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_IDX_DTYPES = {0x08: torch.uint8}


class DatasetError(ValueError):
    """A data set is missing or malformed; the message says what was expected where."""


@dataclass(frozen=True)
class Split:
    """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError(f"images must be uint8 (N, C, H, W); got {self.images.dtype} "
                               f"{tuple(self.images.shape)}")  # fmt: skip
        if self.labels.shape != (self.images.shape[0],):
            raise DatasetError(
                f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class Dataset:
    """A data set split three ways, with the training split's normalisation statistics.

    Attributes:
        name: ``"mnist"`` or ``"cifar10"``.
        class_names: one name per label index.
        train: the training split (validation images removed).
        val: the held-out validation split (for per-epoch accuracy and calibration).
        test: the test split; only the final report reads it.
        mean: per-channel mean of ``train`` pixels scaled to [0, 1].
        std: per-channel standard deviation, likewise.
        checksum: sha256 of the decoded training and test pixels and labels.
    """

    name: str
    class_names: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]
    checksum: str


def default_data_dir() -> Path:
    """``$BRANCHY_DATA_DIR`` if set, else ``./data``."""
    return Path(os.environ.get(DATA_DIR_ENV) or "data")


# ---------------------------------------------------------------------------- MNIST


def read_idx(path: Path) -> Tensor:
    """Read one IDX file (gzip-compressed if its name ends in ``.gz``).

    Raises:
        DatasetError: the file is not a well-formed uint8 IDX file.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read IDX file {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_DTYPES or ndim == 0:
        raise DatasetError(f"{path}: unsupported IDX type 0x{dtype_code:02x} with {ndim} dims")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = 1
    for s in shape:
        count *= s
    if len(data) - header != count:
        raise DatasetError(
            f"{path}: IDX header says {shape} ({count} bytes) but {len(data) - header} follow"
        )
    flat = torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8)
    return flat.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "mnist", root / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def load_mnist(root: Path, *, download: bool = False) -> tuple[Split, Split]:
    """MNIST train and test splits from IDX files under ``root``.

    Looks in ``root``, ``root/mnist`` and the torchvision layout ``root/MNIST/raw``, for
    each file gzipped or not.

    Raises:
        DatasetError: a file is missing or malformed.
    """
    if download:
        from torchvision.datasets import MNIST

        for train in (True, False):
            MNIST(str(root), train=train, download=True)
    arrays: dict[tuple[str, str], Tensor] = {}
    for key, stem in MNIST_FILES.items():
        path = _find_idx(root, stem)
        if path is None:
            raise DatasetError(
                f"MNIST: no {stem}[.gz] in {root}, {root / 'mnist'} or {root / 'MNIST/raw'}; "
                f"point --data-dir (or ${DATA_DIR_ENV}) at a folder with the four IDX files, "
                f"or pass --download"
            )
        arrays[key] = read_idx(path)
    splits = []
    for part in ("train", "test"):
        images, labels = arrays[(part, "images")], arrays[(part, "labels")]
        if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise DatasetError(
                f"MNIST {part}: images {tuple(images.shape)} and labels "
                f"{tuple(labels.shape)} do not match (expected (N, 28, 28) and (N,))"
            )
        if int(labels.max()) > 9:
            raise DatasetError(f"MNIST {part}: label {int(labels.max())} out of range 0..9")
        splits.append(Split(images.unsqueeze(1).contiguous(), labels.long()))
    return splits[0], splits[1]


# ---------------------------------------------------------------------------- CIFAR-10


def _image_folder_root(root: Path) -> Path | None:
    for folder in (root, root / "cifar10", root / "cifar-10"):
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            return folder
    return None


def _pickle_root(root: Path) -> Path | None:
    for folder in (root, root / "cifar10"):
        if (folder / "cifar-10-batches-py").is_dir():
            return folder
    return None


def list_image_folder(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    """Files and labels of an image-folder tree ``folder/<class>/<image>``.

    Classes are the sorted subfolder names (torchvision ``ImageFolder`` order); files
    are sorted within each class so that the order, and hence the split, is stable.
    """
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{folder}: expected one subfolder per class, found none")
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        found = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files.extend(found)
        labels.extend([index] * len(found))
    if not files:
        raise DatasetError(f"{folder}: no {'/'.join(IMAGE_SUFFIXES)} files in the class folders")
    return files, labels, classes


def _decode_one(path: Path, mode: str) -> Tensor:
    """One image file as ``(C, H, W)`` uint8, converted to Pillow ``mode`` (RGB or L)."""
    with Image.open(path) as img:
        array = np.array(img if img.mode == mode else img.convert(mode))  # a writable copy
    t = torch.from_numpy(array)
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def decode_files(files: list[Path], *, channels: int = 3) -> Tensor:
    """Decode image files into one ``(N, C, H, W)`` uint8 tensor.

    Pillow decodes (as the server does); files are decoded in a few threads, since
    Pillow releases the GIL while decoding. On the CIFAR-10 JPEGs (all 60,000) the
    pixels equal those of torchvision's ``decode_jpeg``, which earlier versions used and
    which torchvision 0.29 deprecates (``tests/training/test_data.py`` checks a sample).
    Three channels convert grey images to RGB; one channel converts colour to luma
    (ITU-R 601-2, Pillow's ``L``).

    Raises:
        DatasetError: a file does not decode or the images differ in size.
    """
    mode = "RGB" if channels == 3 else "L"

    def decode(path: Path) -> Tensor:
        try:
            return _decode_one(path, mode)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"cannot decode {path}: {exc}") from None

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        out = list(pool.map(decode, files, chunksize=256))
    shapes = {tuple(img.shape) for img in out}
    if len(shapes) != 1:
        raise DatasetError(f"images differ in size: {sorted(shapes)[:4]}")
    return torch.stack(out)


def _folder_key(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_image_folder(folder: Path, *, cache_dir: Path | None) -> tuple[Split, list[str]]:
    """One split from an image-folder tree, decoded once and cached as uint8 tensors.

    The cache file is keyed by the file list, sizes and modification times, so a
    changed tree is decoded again.
    """
    files, labels, classes = list_image_folder(folder)
    cache = None
    if cache_dir is not None:
        cache = cache_dir / f"imagefolder-{folder.name}-{_folder_key(files)}.pt"
        if cache.is_file():
            saved = torch.load(cache, weights_only=True)
            log.info("loaded %d decoded images from %s", len(files), cache)
            return Split(saved["images"], saved["labels"]), classes
    log.info("decoding %d images under %s", len(files), folder)
    split = Split(decode_files(files), torch.tensor(labels, dtype=torch.int64))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        # A per-process name: two trainings started together both decode and write,
        # and the last os.replace wins with an identical file.
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"images": split.images, "labels": split.labels}, tmp)
        os.replace(tmp, cache)
    return split, classes


def load_cifar10(
    root: Path, *, download: bool = False, cache_dir: Path | None = Path("cache")
) -> tuple[Split, Split, tuple[str, ...]]:
    """CIFAR-10 train and test splits and class names.

    Reads an image-folder tree (``root``, ``root/cifar10``) or torchvision's
    ``cifar-10-batches-py`` pickles (``root``, ``root/cifar10``).

    Raises:
        DatasetError: neither layout is present, or it is malformed.
    """
    if download:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=True, download=True)
        CIFAR10(str(root), train=False, download=True)
    folder = _image_folder_root(root)
    if folder is not None:
        train, classes = load_image_folder(folder / "train", cache_dir=cache_dir)
        test, test_classes = load_image_folder(folder / "test", cache_dir=cache_dir)
        if classes != test_classes:
            raise DatasetError(f"{folder}: train classes {classes} differ from test {test_classes}")
        return train, test, tuple(classes)
    pickles = _pickle_root(root)
    if pickles is not None:
        return (*_load_cifar_pickles(pickles), CIFAR10_CLASSES)
    raise DatasetError(
        f"CIFAR-10: expected an image-folder tree (train/<class>/*.jpg|png and test/...) in "
        f"{root} or {root / 'cifar10'}, or torchvision's cifar-10-batches-py there; "
        f"point --data-dir (or ${DATA_DIR_ENV}) at it, or pass --download"
    )


CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batch files but refuses every global except numpy's array
    reconstruction, so a crafted file cannot run code."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def read_cifar_batch(path: Path) -> Split:
    """One ``cifar-10-batches-py`` file: ``data`` (N, 3072) uint8 rows, ``labels``.

    Raises:
        DatasetError: unreadable or not in the CIFAR batch layout.
    """
    import numpy as np

    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
        raw = np.asarray(entry["data"], dtype=np.uint8)
        labels = entry.get("labels", entry.get("fine_labels"))
        images = torch.from_numpy(raw.reshape(-1, 3, 32, 32).copy())
        labels_t = torch.tensor(list(labels), dtype=torch.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: not a CIFAR-10 python batch file: {exc}") from None
    return Split(images, labels_t)


def _load_cifar_pickles(root: Path) -> tuple[Split, Split]:
    folder = root / "cifar-10-batches-py"
    missing = [n for n in (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH) if not (folder / n).is_file()]
    if missing:
        raise DatasetError(f"{folder}: missing {', '.join(missing)}")
    parts = [read_cifar_batch(folder / n) for n in CIFAR_TRAIN_BATCHES]
    train = Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))
    return train, read_cifar_batch(folder / CIFAR_TEST_BATCH)


# ---------------------------------------------------------------------------- splits, stats


def split_validation(split: Split, *, val_size: int, seed: int) -> tuple[Split, Split]:
    """Hold out ``val_size`` samples, chosen by a seeded permutation, for validation."""
    n = len(split)
    if not 0 < val_size < n:
        raise ValueError(f"validation size must be in 1..{n - 1}; got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    return (
        Split(split.images[train_idx], split.labels[train_idx]),
        Split(split.images[val_idx], split.labels[val_idx]),
    )


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``(N, C, H, W)`` pixels scaled to [0, 1]."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    # chunks keep the float copy small for 50k CIFAR images
    for chunk in images.split(4096):
        x = chunk.double().div_(255).transpose(0, 1).reshape(c, -1)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
    count = images.numel() // c
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def checksum(*splits: Split) -> str:
    """sha256 over the decoded pixels and labels (cheap: one pass over memory)."""
    h = hashlib.sha256()
    for s in splits:
        h.update(s.images.contiguous().numpy().tobytes())
        h.update(s.labels.contiguous().numpy().tobytes())
    return h.hexdigest()


def load_dataset(
    name: str,
    data_dir: Path,
    *,
    val_size: int = 5000,
    seed: int = 0,
    download: bool = False,
    cache_dir: Path | None = Path("cache"),
) -> Dataset:
    """Load ``name`` from ``data_dir``, hold out a seeded validation split, compute stats.

    Raises:
        DatasetError: the data set is missing or malformed.
        ValueError: unknown name or bad ``val_size``.
    """
    if name == "mnist":
        full, test = load_mnist(data_dir, download=download)
        classes: tuple[str, ...] = tuple(str(i) for i in range(10))
    elif name == "cifar10":
        full, test, classes = load_cifar10(data_dir, download=download, cache_dir=cache_dir)
    else:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if test.images.shape[1:] != full.images.shape[1:]:
        raise DatasetError(
            f"{name}: train images {tuple(full.images.shape[1:])} and test images "
            f"{tuple(test.images.shape[1:])} differ in shape"
        )
    train, val = split_validation(full, val_size=val_size, seed=seed)
    mean, std = channel_stats(train.images)
    log.info(
        "%s: %d train, %d validation, %d test images of shape %s",
        name, len(train), len(val), len(test), tuple(train.images.shape[1:]),
    )  # fmt: skip
    return Dataset(name, classes, train, val, test, mean, std, checksum(full, test))


# ---------------------------------------------------------------------------- batches


def normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 or [0, 255] float ``(B, C, H, W)`` -> ``(x / 255 - mean) / std`` float32.

    ``mean`` and ``std`` are ``(C,)`` tensors on ``x``'s device.
    """
    return normalise_pixels(x, mean[:, None, None], std[:, None, None])


def random_crop_flip(x: Tensor, *, pad: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Per-sample random crop after zero padding, and random horizontal flip.

    Works on the whole batch on its device with one gather; ``generator`` lives on the
    same device so the draw is reproducible.

    Args:
        x: ``(B, C, H, W)`` images, any dtype.
        pad: zero padding on every side before cropping back to ``H × W``.
        flip: mirror each image left-right with probability 1/2.
        generator: random source on ``x.device``.
    """
    b, c, h, w = x.shape
    dev = x.device
    if pad > 0:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
        rows = dy[:, None] + torch.arange(h, device=dev)  # (B, H)
        cols = dx[:, None] + torch.arange(w, device=dev)  # (B, W)
    else:
        padded = x
        rows = torch.arange(h, device=dev).expand(b, h)
        cols = torch.arange(w, device=dev).expand(b, w)
    if flip:
        mirror = torch.rand((b,), device=dev, generator=generator) < 0.5
        cols = torch.where(mirror[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def iterate_batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(images, labels)`` batches of a split; each rank gets a disjoint shard.

    Under data-parallel training every rank draws the same permutation (same seed) and
    takes every ``world_size``-th sample, so the shards cover the split once per epoch.
    """
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order[rank::world_size].to(split.images.device)
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield split.images[idx], split.labels[idx]


def load_test_split(
    name: str, data_dir: Path, *, download: bool = False, cache_dir: Path | None = Path("cache")
) -> tuple[Split, tuple[str, ...]]:
    """Only the test split and class names (for the final report).

    Raises:
        DatasetError: the data set is missing or malformed.
        ValueError: unknown name.
    """
    if name == "mnist":
        _, test = load_mnist(data_dir, download=download)
        return test, tuple(str(i) for i in range(10))
    if name == "cifar10":
        _, test, classes = load_cifar10(data_dir, download=download, cache_dir=cache_dir)
        return test, classes
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def class_balanced_indices(labels: Tensor, n: int) -> Tensor:
    """Indices of ``n`` samples taken evenly from every class, deterministically.

    The samples are the first of each class in split order, interleaved class by class
    (the first of every class, then the second of every class, ...), so the counts per
    class differ by at most one, and every prefix of the result is as balanced as the
    whole. A class that runs out leaves its turns to the others. Use it wherever a
    subset of a test split is timed: the CIFAR-10 image folders list one class after
    another, so the first N images are only a few classes (and exit differently).

    Args:
        labels: ``(N,)`` integer labels of the split.
        n: how many samples; at least ``len(labels)`` gives every sample.

    Returns:
        ``(min(n, N),)`` int64 indices into the split, in the interleaved order.

    Raises:
        ValueError: ``n`` is negative or ``labels`` is not one-dimensional.
    """
    if n < 0:
        raise ValueError(f"sample count must be >= 0; got {n}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be one-dimensional; got shape {tuple(labels.shape)}")
    labels = labels.cpu().long()
    order = torch.arange(labels.numel())
    # rank of each sample within its class (0 for the first of its class, 1, ...)
    rank = torch.empty_like(order)
    for k in labels.unique():
        members = (labels == k).nonzero().squeeze(1)
        rank[members] = torch.arange(members.numel())
    # by rank, then by class: class order within a turn is fixed and label-sorted
    key = rank * (int(labels.max()) + 1 if labels.numel() else 1) + labels
    return order[key.argsort(stable=True)][:n]
