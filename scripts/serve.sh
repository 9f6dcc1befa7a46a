#!/usr/bin/env bash
# The main job: set up .venv, then serve the committed model zoo (zoo/) on
# http://127.0.0.1:8000 (GPU when there is one, CPU otherwise). Settings come from
# BRANCHY_* environment variables (see docs/api.md); extra arguments go to the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m service "$@"
