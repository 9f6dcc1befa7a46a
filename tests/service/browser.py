"""A real headless browser for the page tests: Debian's ``chromium`` and
``chromium-driver`` (``scripts/test.sh`` installs them when it runs as root), driven
by selenium. Tests that need it skip when either is missing.

Screenshots go to ``tests/artifacts/`` (ignored by git).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


def _binary(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def start_browser() -> Any:
    """A headless Chromium session, or ``pytest.skip`` when none can be had."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    browser = _binary("chromium", "chromium-browser")
    driver = _binary("chromedriver")
    if browser is None or driver is None:
        pytest.skip(
            "no chromium and chromedriver (Debian: apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1400",
        "--no-first-run",
        "--disable-background-networking",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(driver))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    session = start_browser()
    try:
        yield session
    finally:
        session.quit()


def screenshot(session: Any, name: str) -> Path:
    """Save the page as ``tests/artifacts/<name>.png``; returns the path."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    session.save_screenshot(str(path))
    return path


def foreign_resources(session: Any, base_url: str) -> list[str]:
    """Resources the page loaded from anywhere but ``base_url``'s host and port."""
    origin = urlsplit(base_url).netloc
    names = session.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    return [
        n for n in names if urlsplit(n).scheme in ("http", "https") and urlsplit(n).netloc != origin
    ]
