"""``scripts/bootstrap.sh`` says what it does, one line per step, on standard error.

The fresh-install path runs in a copy of the script with a stand-in Python that records
its calls (no packages are installed), so the test is quick and needs no network.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
# Stand-in for python: `-m venv DIR` makes DIR/bin/python (this script); every call is logged.
echo "$*" >> "$(dirname "$0")/../../calls.log"
if [ "$1" = "--version" ]; then echo "Python 3.11.0"; exit 0; fi
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && chmod +x "$3/bin/python"
fi
"""


def _run(cwd: Path, python: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "scripts/bootstrap.sh"],
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "PYTHON": python},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_fresh_install_prints_one_line_per_step(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "bootstrap.sh", tmp_path / "scripts")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    fake = tmp_path / "tools" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)

    first = _run(tmp_path, str(fake))
    assert first.returncode == 0, first.stderr
    assert first.stdout == ""
    lines = first.stderr.splitlines()
    assert [ln.split(" ")[1] for ln in lines] == ["creating", "upgrading", "installing", "ready"]
    assert all(ln.startswith("bootstrap: ") for ln in lines)
    assert "Python 3.11.0" in lines[0]
    calls = (tmp_path / "calls.log").read_text()
    assert "-m pip install --quiet -e .[dev]" in calls

    again = _run(tmp_path, str(fake))
    assert again.returncode == 0
    assert again.stderr == "bootstrap: .venv is up to date with pyproject.toml\n"
