"""Pack a folder tree of many small files into one file, and unpack it elsewhere.

The GPU machine that runs ``scripts/gpu_session.sh`` receives only the repository (at
most 64 MiB, and no ``../shared``). CIFAR-10's 60,000 JPEG files hold 52.7 MiB of data,
but a tar or zip of them adds 7-60 MiB of per-file headers, so they travel as one blob:

    [8-byte little-endian length N][N bytes: zlib-compressed JSON index][file bytes...]

The index lists each file's relative path and size, plus one SHA-256 of all the file
bytes in order; ``unpack`` checks it, so the data used there is byte-identical to the
data here. (A digest per file would add 2.6 MiB that the 64 MiB limit cannot spare.)

    python scripts/pack_files.py pack ../shared/data/cifar10 .device-data/cifar10.pack
    python scripts/pack_files.py unpack .device-data/cifar10.pack /tmp/data/cifar10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
import zlib
from pathlib import Path


def pack(src: Path, dest: Path) -> int:
    files = sorted(p for p in src.rglob("*") if p.is_file())
    blobs = [p.read_bytes() for p in files]
    index = {
        "files": [
            [p.relative_to(src).as_posix(), len(b)] for p, b in zip(files, blobs, strict=True)
        ],
        "sha256": hashlib.sha256(b"".join(blobs)).hexdigest(),
    }
    header = zlib.compress(json.dumps(index).encode(), 9)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for b in blobs:
            f.write(b)
    return len(files)


def unpack(pack_file: Path, dest: Path) -> int:
    data = pack_file.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    index = json.loads(zlib.decompress(data[8 : 8 + n]))
    start = 8 + n
    if len(data) - start != sum(size for _, size in index["files"]):
        raise SystemExit(f"{pack_file}: wrong length; the pack is damaged")
    if hashlib.sha256(memoryview(data)[start:]).hexdigest() != index["sha256"]:
        raise SystemExit(f"{pack_file}: SHA-256 differs; the pack is damaged")
    offset = start
    for rel, size in index["files"]:
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise SystemExit(f"{pack_file}: refusing path {rel!r}")
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[offset : offset + size])
        offset += size
    return len(index["files"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("pack", "unpack"):
        s = sub.add_parser(name)
        s.add_argument("src", type=Path)
        s.add_argument("dest", type=Path)
    args = p.parse_args()
    count = (pack if args.cmd == "pack" else unpack)(args.src, args.dest)
    print(f"{args.cmd}ed {count} files: {args.src} -> {args.dest}", file=sys.stderr)


if __name__ == "__main__":
    main()
