"""Finding the image files a command line names: files, folders (recursively), globs."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

#: Suffixes picked up when walking a folder (the formats the server decodes).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm"}
)
_MAGIC = frozenset("*?[")


def _walk(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def collect_images(paths: Sequence[str]) -> tuple[list[Path], list[str]]:
    """The image files named by ``paths``, in order, each once, and the problems found.

    A file is taken whatever its suffix (it was named explicitly); a folder contributes
    every image file below it (by suffix, sorted); a pattern with ``*``, ``?`` or ``[``
    that names no existing path is expanded as a glob (``**`` recursive), its folders
    walked like folders.

    Returns:
        ``(files, problems)``: problems are one line each, e.g. ``"x.png: no such file or
        folder"``; the caller reports them and goes on with the files.
    """
    files: list[Path] = []
    seen: set[Path] = set()
    problems: list[str] = []

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            files.append(p)

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = _walk(path)
            if not found:
                problems.append(f"{raw}: folder has no image files")
            for p in found:
                add(p)
        elif path.exists():
            add(path)
        elif _MAGIC & set(raw):
            matches = sorted(glob.glob(raw, recursive=True))
            if not matches:
                problems.append(f"{raw}: pattern matches no file")
            for m in matches:
                mp = Path(m)
                for p in _walk(mp) if mp.is_dir() else [mp]:
                    add(p)
        else:
            problems.append(f"{raw}: no such file or folder")
    return files, problems


def label_of(path: Path) -> str:
    """The label of an image in labels mode: the name of the folder holding it."""
    return path.parent.name
