"""Loaders for the real on-disk formats, splits, statistics and augmentation."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.training.conftest import make_images, write_cifar_pickles, write_idx, write_mnist
from training import data


def test_idx_round_trip_gz_and_raw(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", array, compress=True)
    write_idx(tmp_path / "b", array, compress=False)
    for name in ("a.gz", "b"):
        t = data.read_idx(tmp_path / name)
        assert t.dtype == torch.uint8 and t.shape == (2, 3, 4)
        assert torch.equal(t, torch.from_numpy(array))


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x00\x00\x08", "bad magic"),
        (b"\x12\x34\x08\x01\x00\x00\x00\x02\x01\x02", "bad magic"),
        (b"\x00\x00\x0d\x01\x00\x00\x00\x02\x01\x02", "unsupported IDX type"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", "header says"),
    ],
)
def test_malformed_idx_is_a_clear_error(tmp_path: Path, payload: bytes, message: str) -> None:
    (tmp_path / "x").write_bytes(payload)
    with pytest.raises(data.DatasetError, match=message):
        data.read_idx(tmp_path / "x")


def test_mnist_plain_gz_folder(mnist_dir: Path) -> None:
    train, test = data.load_mnist(mnist_dir)
    assert train.images.shape == (1200, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (200, 1, 28, 28)
    expected, labels = make_images(1200, 1, 28, seed=1)
    assert torch.equal(train.images, torch.from_numpy(expected))
    assert torch.equal(train.labels, torch.from_numpy(labels).long())


def test_mnist_torchvision_raw_layout(tmp_path: Path) -> None:
    write_mnist(tmp_path / "MNIST" / "raw", n_train=50, n_test=20, compress=False)
    train, test = data.load_mnist(tmp_path)
    assert len(train) == 50 and len(test) == 20


def test_missing_mnist_names_what_and_where(tmp_path: Path) -> None:
    with pytest.raises(data.DatasetError, match=r"train-images-idx3-ubyte.*--download"):
        data.load_mnist(tmp_path)


def test_image_folder_png_and_jpeg_decoded_once_and_cached(cifar_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    train, test, classes = data.load_cifar10(cifar_dir, cache_dir=cache)
    assert classes[0] == "airplane" and len(classes) == 10
    assert train.images.shape == (300, 3, 32, 32) and train.images.dtype == torch.uint8
    assert len(test) == 60
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 2
    # PNG files are lossless: the decoded pixels are exactly what the test encoded
    expected, labels = make_images(300, 3, 32, seed=3)
    listed, listed_labels, _ = data.list_image_folder(cifar_dir / "cifar10" / "train")
    for row, path in enumerate(listed):
        if path.suffix == ".png":
            i = int(path.stem)
            assert torch.equal(train.images[row], torch.from_numpy(expected[i]))
            assert listed_labels[row] == labels[i]
            break
    # a second load reads the cache (same tensors) instead of decoding
    mtimes = [f.stat().st_mtime_ns for f in files]
    again, _, _ = data.load_cifar10(cifar_dir, cache_dir=cache)
    assert torch.equal(again.images, train.images)
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_cifar_pickles(tmp_path: Path) -> None:
    write_cifar_pickles(tmp_path, per_batch=20, n_test=10)
    train, test, classes = data.load_cifar10(tmp_path, cache_dir=None)
    assert train.images.shape == (100, 3, 32, 32) and len(test) == 10
    expected, labels = make_images(20, 3, 32, seed=10)
    assert torch.equal(train.images[:20], torch.from_numpy(expected))
    assert torch.equal(train.labels[:20], torch.from_numpy(labels).long())
    assert classes == data.CIFAR10_CLASSES


def test_cifar_pickle_with_foreign_global_is_refused(tmp_path: Path) -> None:
    write_cifar_pickles(tmp_path, per_batch=5, n_test=5)
    # a pickle that would call os.system when loaded by an unrestricted unpickler
    payload = b"cos\nsystem\n(S'true'\ntR."
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(payload)
    with pytest.raises(data.DatasetError, match="not allowed"):
        data.load_cifar10(tmp_path, cache_dir=None)


def test_missing_cifar_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(data.DatasetError, match="image-folder tree"):
        data.load_cifar10(tmp_path, cache_dir=None)


def test_validation_split_is_seeded_and_disjoint(mnist_dir: Path) -> None:
    ds = data.load_dataset("mnist", mnist_dir, val_size=200, seed=5)
    again = data.load_dataset("mnist", mnist_dir, val_size=200, seed=5)
    other = data.load_dataset("mnist", mnist_dir, val_size=200, seed=6)
    assert len(ds.train) == 1000 and len(ds.val) == 200 and len(ds.test) == 200
    assert torch.equal(ds.val.images, again.val.images)
    assert not torch.equal(ds.val.images, other.val.images)
    flat = lambda s: {bytes(x.numpy()) for x in s.images}  # noqa: E731
    assert not flat(ds.train) & flat(ds.val)
    # statistics come from the training split alone
    x = ds.train.images.double() / 255
    assert ds.mean[0] == pytest.approx(float(x.mean()), rel=1e-9)
    assert ds.std[0] == pytest.approx(float(x.std(unbiased=False)), rel=1e-6)


def test_random_crop_flip_moves_whole_images() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) + 1
    gen = torch.Generator().manual_seed(0)
    out = data.random_crop_flip(x, pad=2, flip=True, generator=gen)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        windows = [padded[b, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        candidates = windows + [w.flip(2) for w in windows]
        assert any(torch.equal(out[b], w) for w in candidates)
    assert torch.equal(data.random_crop_flip(x, pad=0, flip=False, generator=gen), x)


def test_batches_cover_split_once_per_epoch_across_ranks(mnist_dir: Path) -> None:
    train, _ = data.load_mnist(mnist_dir)
    seen = []
    for rank in range(2):
        gen = torch.Generator().manual_seed(3)
        for _, labels in data.iterate_batches(
            train, 64, shuffle=True, generator=gen, rank=rank, world_size=2
        ):
            seen.append(labels)
    assert sum(len(s) for s in seen) == len(train)
    assert torch.equal(torch.cat(seen).sort().values, train.labels.sort().values)


CIFAR_JPEGS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10"


def _torchvision_decode(files: list[Path]) -> torch.Tensor:
    """The decoder the zoo's data were decoded with before (deprecated in 0.29)."""
    io = pytest.importorskip("torchvision.io")
    if not hasattr(io, "decode_jpeg"):
        pytest.skip("this torchvision has no image decoding any more")
    with warnings.catch_warnings():  # its deprecation notice, here only
        warnings.simplefilter("ignore", DeprecationWarning)
        encoded = [io.read_file(str(f)) for f in files]
        return torch.stack(io.decode_jpeg(encoded, mode=io.ImageReadMode.RGB))


def _cifar_sample(split: str, step: int) -> list[Path]:
    folder = CIFAR_JPEGS / split
    if not folder.is_dir():
        pytest.skip("the shared CIFAR-10 JPEGs are not here")
    return data.list_image_folder(folder)[0][::step]


def test_decoded_pixels_equal_torchvisions_on_cifar_jpegs() -> None:
    files = _cifar_sample("test", 50)  # 200 files, 20 per class
    assert torch.equal(data.decode_files(files), _torchvision_decode(files))


@pytest.mark.slow
@pytest.mark.parametrize("split", ["test", "train"])
def test_decoded_pixels_equal_torchvisions_on_every_cifar_jpeg(split: str) -> None:
    files = _cifar_sample(split, 1)
    assert torch.equal(data.decode_files(files), _torchvision_decode(files))


def test_decoding_raises_no_warning(cifar_dir: Path) -> None:
    files = data.list_image_folder(cifar_dir / "cifar10" / "train")[0][:20]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images = data.decode_files(files)
    assert images.shape == (20, 3, 32, 32)


def test_grey_images_become_rgb_and_bad_files_are_named(tmp_path: Path) -> None:
    grey = tmp_path / "grey.png"
    Image.fromarray(np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)).save(grey)
    (rgb,) = data.decode_files([grey])
    assert rgb.shape == (3, 32, 32) and torch.equal(rgb[0], rgb[2])
    assert data.decode_files([grey], channels=1).shape == (1, 1, 32, 32)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(data.DatasetError, match="broken.jpg"):
        data.decode_files([grey, broken])
