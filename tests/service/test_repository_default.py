"""The model repository default works wherever the package is installed: ``zoo/`` under
the working directory, not a path computed from the installed code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_default_repository_is_zoo_of_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BRANCHY_MODEL_REPOSITORY", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zoo").mkdir()
    assert Settings().model_repository.resolve() == tmp_path / "zoo"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setenv("BRANCHY_MODEL_REPOSITORY", str(tmp_path / "elsewhere"))
    assert Settings().model_repository == tmp_path / "elsewhere"


def test_server_started_elsewhere_names_the_missing_zoo(tmp_path: Path) -> None:
    # Started from a folder without zoo/ (as an installed package would be), the server
    # refuses to start with one message naming the setting, not a traceback.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRANCHY_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "model_repository 'zoo' is not a directory" in proc.stderr, proc.stderr
    assert "working directory" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
