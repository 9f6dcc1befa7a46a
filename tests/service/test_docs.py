"""``/docs`` works offline: the page references only the server itself, its assets are
served from the installed package, and a real headless browser renders it from a real
server process without loading anything from elsewhere."""

from __future__ import annotations

import re
from typing import Any

from fastapi.testclient import TestClient
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from service.routes.docs import ASSETS_URL
from tests.service.browser import browser, foreign_resources, screenshot  # noqa: F401
from tests.service.conftest import ServerProcess

_URL_ATTR = re.compile(r"""(?:src|href|url)\s*[=:]\s*["']([^"']+)["']""", re.I)


def referenced(html: str) -> list[str]:
    """Every URL the page names in src/href attributes and Swagger's ``url:``."""
    return _URL_ATTR.findall(html)


def test_docs_page_names_no_external_host(app_client: TestClient) -> None:
    response = app_client.get("/docs")
    assert response.status_code == 200
    html = response.text
    assert "//" not in "".join(u for u in referenced(html) if not u.startswith("/"))
    assert not re.search(r"https?://", html), re.findall(r"https?://[^\s\"'<>]+", html)
    urls = referenced(html)
    assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), urls
    for url in urls:  # every asset the page names is served by the server itself
        if url.startswith(ASSETS_URL):
            asset = app_client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 1000, url


def test_swagger_ui_fetches_no_validator_badge(app_client: TestClient) -> None:
    assert '"validatorUrl": null' in app_client.get("/docs").text


def test_assets_are_the_installed_bundles(app_client: TestClient) -> None:
    js = app_client.get(f"{ASSETS_URL}/swagger-ui-bundle.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert b"SwaggerUIBundle" in js.content
    missing = app_client.get(f"{ASSETS_URL}/nothing.js")
    assert missing.status_code == 404


def _wait(session: Any, xpath: str, timeout: float = 30) -> Any:
    return WebDriverWait(session, timeout).until(ec.presence_of_element_located((By.XPATH, xpath)))


def test_swagger_ui_renders_offline_in_a_browser(server: ServerProcess, browser: Any) -> None:  # noqa: F811
    browser.get(f"{server.base_url}/docs")
    title = _wait(browser, "//*[contains(@class, 'info')]//h1[contains(., 'branchy-serve')]")
    assert "branchy-serve" in title.text
    _wait(browser, "//*[contains(@class, 'opblock-summary-path')]//*[contains(., 'classify')]")
    operations = browser.find_elements(By.CSS_SELECTOR, ".opblock")
    assert len(operations) >= 10
    screenshot(browser, "docs")
    assert foreign_resources(browser, server.base_url) == []


def test_redoc_is_not_served(app_client: TestClient) -> None:
    # its bundle fetches a logo from a CDN; /docs is the one documentation page
    assert app_client.get("/redoc").status_code == 404
