#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv.
# Re-installs only when pyproject.toml changed since the last successful install.
# Says what it does, one line per step, on standard error (standard output stays free
# for the command that runs after it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
say() { echo "bootstrap: $*" >&2; }
start=$SECONDS
if [ ! -x .venv/bin/python ]; then
    say "creating the virtual environment .venv with $("$PY" --version 2>&1)"
    "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
    say "upgrading pip in .venv"
    .venv/bin/python -m pip install --quiet --upgrade pip
    say "installing the project and its dependencies into .venv (torch, FastAPI, test tools; a few minutes the first time)"
    .venv/bin/python -m pip install --quiet -e '.[dev]'
    rm -f .venv/.installed-*
    touch "$stamp"
    say "ready in $((SECONDS - start)) s: .venv/bin/branchy-serve, .venv/bin/branchy, .venv/bin/python"
else
    say ".venv is up to date with pyproject.toml"
fi
