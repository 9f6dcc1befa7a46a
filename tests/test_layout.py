"""The repository's layering: what may import what, what the wheel contains, and the
support package the tests and benchmarks share (``testsupport/``)."""

from __future__ import annotations

import ast
import io
import tomllib
from pathlib import Path

import pytest
import python_multipart
import setuptools

from testsupport.multipart import encode_multipart, image_parts
from testsupport.server import ROOT, server_environment

PRODUCT = ["models", "service", "training", "branchy_client"]


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved no further
    than their own package, which is enough to tell top-level packages apart)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def imports_of(folder: str) -> dict[str, set[str]]:
    return {
        str(p.relative_to(ROOT)): imported_modules(p) for p in sorted((ROOT / folder).rglob("*.py"))
    }


@pytest.mark.parametrize("folder", ["benchmarks", "testsupport", *PRODUCT])
def test_nothing_outside_tests_imports_from_tests(folder: str) -> None:
    bad = {
        f: sorted(m for m in mods if m == "tests" or m.startswith("tests."))
        for f, mods in imports_of(folder).items()
    }
    assert {f: m for f, m in bad.items() if m} == {}


@pytest.mark.parametrize("folder", PRODUCT)
def test_the_product_does_not_import_the_support_code(folder: str) -> None:
    bad = {
        f: sorted(m for m in mods if m.split(".")[0] in {"testsupport", "benchmarks"})
        for f, mods in imports_of(folder).items()
    }
    assert {f: m for f, m in bad.items() if m} == {}


def test_the_check_would_see_an_import_from_tests(tmp_path: Path) -> None:
    # The AST walk above must catch both import forms, or the layering tests prove nothing.
    probe = tmp_path / "probe.py"
    probe.write_text("import tests.helpers\nfrom tests.service import conftest\n")
    assert {"tests.helpers", "tests.service"} <= imported_modules(probe)


def test_setuptools_packages_the_product_only() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = setuptools.find_packages(str(ROOT), include=config["packages"]["find"]["include"])
    tops = {name.split(".")[0] for name in found}
    assert tops == set(PRODUCT)
    # every product package with modules below it is found, e.g. service.routes
    assert "service.routes" in found


def test_multipart_encoder_is_read_back_by_the_servers_parser() -> None:
    images = [b"\x89PNG first", b"second\r\n--not-a-boundary\r\n", b""]
    body, ctype = encode_multipart(image_parts(images, names=["a.png", "b.png", "c.png"]))
    files: list[tuple[bytes | None, bytes | None, bytes]] = []

    def on_file(f: python_multipart.multipart.File) -> None:
        f.file_object.seek(0)
        files.append((f.field_name, f.file_name, f.file_object.read()))

    python_multipart.parse_form({"Content-Type": ctype.encode()}, io.BytesIO(body), None, on_file)
    assert files == [
        (b"images", n.encode(), d) for n, d in zip(["a.png", "b.png", "c.png"], images, strict=True)
    ]


def test_server_processes_ignore_inherited_branchy_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BRANCHY_MAX_BATCH_SIZE", "999")
    monkeypatch.setenv("BRANCHY_PORT", "1")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = server_environment({"BRANCHY_DEVICE": "cpu"}, 12345)
    assert {k: v for k, v in env.items() if k.startswith("BRANCHY_")} == {
        "BRANCHY_HOST": "127.0.0.1",
        "BRANCHY_PORT": "12345",
        "BRANCHY_DEVICE": "cpu",
    }
    assert env["PYTHONPATH"].split(":") == [str(ROOT), "/elsewhere"]
