"""Test-only entry point: ``python -m service`` with a fault-injection seam.

It patches ``service.batcher.run_model`` (the one function through which every batch
reaches the network) and then runs ``service.__main__.main`` unchanged, so production
code carries no test switches. Faults are armed at run time through a file named by
the environment variable ``BRANCHY_TEST_FAULT_FILE``; the file is read before every
(sub-)batch and holds one command:

* ``raise``   - the next batch raises ``RuntimeError``; the file is then deleted (one shot).
* ``sleep S`` - every batch first sleeps ``S`` seconds while the file exists (slow model:
  queues fill, deadlines pass, shutdown has work to drain).
* ``oom N``   - every (sub-)batch larger than ``N`` images raises
  ``torch.cuda.OutOfMemoryError`` while the file exists (exercises batch splitting).

Usage (the ``start_server(hooked=True)`` fixture does this)::

    BRANCHY_TEST_FAULT_FILE=/tmp/fault python testsupport/hooked_server.py
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import service.batcher  # noqa: E402  (after the path is set)
from service.__main__ import main  # noqa: E402

logger = logging.getLogger("hooked_server")
_original = service.batcher.run_model


def _hooked_run_model(
    model: object, x: torch.Tensor, thresholds: torch.Tensor, release: object = None
) -> object:
    path = os.environ.get("BRANCHY_TEST_FAULT_FILE")
    command = ""
    if path:
        try:
            command = Path(path).read_text().strip()
        except OSError:
            command = ""
    op, _, arg = command.partition(" ")
    if op == "raise":
        Path(path or "").unlink(missing_ok=True)
        logger.warning("injecting a fault into a batch of %d", x.shape[0])
        raise RuntimeError("injected fault (testsupport/hooked_server.py)")
    if op == "sleep":
        time.sleep(float(arg))
    if op == "oom" and x.shape[0] > int(arg):
        raise torch.cuda.OutOfMemoryError(f"injected OOM for a batch of {x.shape[0]} > {arg}")
    return _original(model, x, thresholds, release)  # type: ignore[arg-type]


service.batcher.run_model = _hooked_run_model  # type: ignore[assignment]

if __name__ == "__main__":
    main()
