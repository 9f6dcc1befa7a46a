"""Image files for the client tests: random PNGs in ``<root>/<label>/<n>.png`` trees."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.service.conftest import encode


def write_pngs(
    folder: Path, count: int, *, size: int = 28, channels: int = 1, seed: int = 0
) -> list[Path]:
    """``count`` random PNGs ``0.png ...`` in ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size) + ((channels,) if channels > 1 else ())
    paths = []
    for i in range(count):
        p = folder / f"{i}.png"
        p.write_bytes(encode(rng.integers(0, 256, size=shape, dtype=np.uint8)))
        paths.append(p)
    return paths


def labelled_tree(root: Path, per_class: int, classes: list[str], *, seed: int = 0) -> list[Path]:
    """``root/<class>/<n>.png`` for each class: a labels-mode tree of MNIST-sized PNGs."""
    out: list[Path] = []
    for k, name in enumerate(classes):
        out += write_pngs(root / name, per_class, seed=seed + 100 * k)
    return out
