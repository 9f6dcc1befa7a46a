#!/usr/bin/env bash
# The whole check: set up .venv, lint, type-check, run the test suite (slow tests excluded;
# run them with `scripts/test.sh -m slow`). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# promtool checks the Prometheus config and rules in tests/deploy; those tests skip
# without it. Install it where we can (root with apt, as on CI), never fail for it.
if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 300 \
        apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
        || echo "note: could not install promtool; its checks will be skipped" >&2
fi
# Debian's chromium and its driver run the web console and /docs in a real headless
# browser (tests/service/test_console.py, test_docs.py); those tests skip without them.
if ! command -v chromedriver >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium and chromium-driver for the browser tests" >&2
    (timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 \
        apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null) \
        || echo "note: could not install chromium; the browser tests will be skipped" >&2
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy models service branchy_client training benchmarks testsupport
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
.venv/bin/python -m pytest "$@"
