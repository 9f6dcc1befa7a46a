"""The console scripts of pyproject.toml go through their CLI's error handling: a bad
input ends with one clear line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the console script ``name`` as pip's generated wrapper does:
    ``sys.exit(<module>.<function>())`` with the arguments in ``sys.argv``."""
    module, _, function = SCRIPTS[name].partition(":")
    wrapper = (
        f"import sys; from {module} import {function}; "
        f"sys.argv[0] = {name!r}; sys.exit({function}())"
    )
    return subprocess.run(
        [sys.executable, "-c", wrapper, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


@pytest.mark.parametrize(
    "name, args, message",
    [
        # no data where the config points
        (
            "branchy-train",
            ["--model", "b-lenet", "--dataset", "mnist", "--data-dir", "{tmp}", "--out", "{tmp}/o"],
            "train-images-idx3-ubyte",
        ),
        # an inconsistent config, refused before any data is read
        (
            "branchy-train",
            ["--model", "b-lenet", "--dataset", "mnist", "--epochs", "0", "--out", "{tmp}/o"],
            "--epochs must be >= 1",
        ),
        ("branchy-evaluate", ["--checkpoint", "{tmp}/missing", "--out", "{tmp}/r"], "missing"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(
    tmp_path: Path, name: str, args: list[str], message: str
) -> None:
    proc = run_script(name, *(a.format(tmp=tmp_path) for a in args))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", ["branchy-train", "branchy-evaluate"])
def test_a_malformed_command_line_is_argparses_usage_and_exit_2(name: str) -> None:
    proc = run_script(name, "--no-such-flag")
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and "Traceback" not in proc.stderr
