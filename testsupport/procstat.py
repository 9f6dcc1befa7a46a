"""CPU time of a server and every process it started, from Linux ``/proc``: one reader
for the tests and benchmarks (a server with HTTP front ends, or LitServe's workers,
spends its CPU in child processes)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds of every thread) of ``pid``; None once it
    has exited."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> dict[int, float]:
    """CPU seconds of ``pid`` and of each of its live descendants, by pid."""
    children: dict[int, list[int]] = {}
    used: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
            used[int(entry.name)] = stat[1]
    tree: dict[int, float] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        if p not in tree and p in used:
            tree[p] = used[p]
            todo += children.get(p, [])
    return tree


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its live descendants, ``pid`` first."""
    return sorted(_tree(pid), key=lambda p: p != pid)


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its live descendants (an exited child's time is not
    counted)."""
    return sum(_tree(pid).values())


def signal_tree(pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid`` and its live descendants (one that exits meanwhile is
    skipped)."""
    for p in _tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)
