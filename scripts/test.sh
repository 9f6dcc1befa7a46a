#!/usr/bin/env bash
# The whole check: set up .venv, lint, type-check, run the test suite (slow tests excluded;
# run them with `scripts/test.sh -m slow`). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy models service
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
.venv/bin/python -m pytest "$@"
