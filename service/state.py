"""Per-model threshold state persisted in the state folder.

One JSON file per model, ``<state_dir>/<model>.thresholds.json``, written atomically
(temporary file + rename) so a reader, including another replica sharing the folder,
never sees half a file. The model name comes from the loaded set (checkpoint folder
names), never from a request.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from models.exits import check_thresholds, encode_thresholds

logger = logging.getLogger(__name__)

SUFFIX = ".thresholds.json"
SOURCES = ("admin", "autotune")  # recorded in the file; older files say nothing


@dataclass(frozen=True)
class SavedThresholds:
    """Thresholds read back from the state folder."""

    thresholds: tuple[float, ...]
    updated_at: float
    mtime_ns: int
    source: str | None = None  # who set them: admin or autotune (absent in older files)
    autotune: bool | None = None  # auto-tuning switched on or off for the model


def state_file(state_dir: Path, model: str) -> Path:
    return state_dir / f"{model}{SUFFIX}"


def save_thresholds(
    state_dir: Path,
    model: str,
    thresholds: tuple[float, ...],
    *,
    source: str | None = None,
    autotune: bool | None = None,
) -> int:
    """Write a model's thresholds atomically.

    Returns:
        The file's new ``st_mtime_ns``, so the writer does not re-read its own change.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    target = state_file(state_dir, model)
    body = {
        "model": model,
        "thresholds": encode_thresholds(thresholds),
        "updated_at": time.time(),
    }
    if source is not None:
        body["source"] = source
    if autotune is not None:
        body["autotune"] = autotune
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(body, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target.stat().st_mtime_ns


# A temporary younger than this may belong to another replica writing right now.
STALE_TEMPORARY_S = 60.0


def clean_stale_temporaries(state_dir: Path, *, older_than_s: float = STALE_TEMPORARY_S) -> int:
    """Delete the temporaries (``.<model>.thresholds.json.*``) a writer killed between
    creating and renaming them left behind; only those older than ``older_than_s``, so a
    replica sharing the folder keeps the one it is writing. Returns how many went."""
    removed = 0
    now = time.time()
    try:
        candidates = list(state_dir.glob(f".*{SUFFIX}.*"))
    except OSError:
        return 0
    for path in candidates:
        try:
            if path.is_file() and now - path.stat().st_mtime > older_than_s:
                path.unlink()
                removed += 1
                logger.info("removed stale temporary state file %s", path.name)
        except OSError as exc:  # never a reason not to start
            logger.warning("cannot remove stale temporary state file %s: %s", path.name, exc)
    return removed


def delete_thresholds(state_dir: Path, model: str) -> bool:
    """Remove a model's saved thresholds (its checkpoint's apply again); True if there
    was a file."""
    try:
        state_file(state_dir, model).unlink()
    except FileNotFoundError:
        return False
    return True


def load_thresholds(state_dir: Path, model: str, num_exits: int) -> SavedThresholds | None:
    """Read a model's saved thresholds; a missing file gives None, a damaged one is
    logged and ignored (None) so it can never stop the server."""
    path = state_file(state_dir, model)
    try:
        stat = path.stat()
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.error("cannot read threshold state %s (ignored): %s", path, exc)
        return None
    try:
        body = json.loads(raw.decode("utf-8"))
        if not isinstance(body, dict):
            raise ValueError("not a JSON object")
        thresholds = check_thresholds(body.get("thresholds"), num_exits)
        updated = float(body.get("updated_at", stat.st_mtime))
        source = body.get("source")
        source = source if source in SOURCES else None
        autotune = body.get("autotune")
        autotune = autotune if isinstance(autotune, bool) else None
    except (ValueError, TypeError) as exc:
        logger.error(
            "damaged threshold state %s (ignored; keeping the current thresholds): %s", path, exc
        )
        return None
    return SavedThresholds(thresholds, updated, stat.st_mtime_ns, source, autotune)


def file_mtime_ns(state_dir: Path, model: str) -> int | None:
    try:
        return state_file(state_dir, model).stat().st_mtime_ns
    except OSError:
        return None
