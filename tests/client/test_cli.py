"""The ``branchy`` command line, run as a real process against a real server: files,
folders, globs, the three output formats, labels mode, per-file errors that skip only
that file, ``models`` and ``thresholds``, and one clear line (no traceback, non-zero
status) for every error a user can cause."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.client.images import labelled_tree, write_pngs
from tests.service.conftest import TOKEN, ServerProcess, free_port

DIGITS = [str(i) for i in range(10)]


def branchy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("BRANCHY_URL", "BRANCHY_ADMIN_TOKEN")}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "branchy_client", *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=120,
    )


def one_error_line(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The run failed with exactly one ``branchy: error:`` line and no traceback."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("branchy: error: "), lines
    assert "Traceback" not in done.stderr + done.stdout
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_the_console_script_is_installed() -> None:
    assert (Path(sys.executable).parent / "branchy").is_file() or shutil.which("branchy")


def test_classify_files_folders_and_globs_as_json(server: ServerProcess, tmp_path: Path) -> None:
    a = write_pngs(tmp_path / "a", 3, seed=1)
    b = write_pngs(tmp_path / "b" / "deep", 2, seed=2)
    single = write_pngs(tmp_path / "c", 1, seed=3)[0]
    done = branchy(
        "classify", str(tmp_path / "a"), str(tmp_path / "b" / "**" / "*.png"), str(single),
        str(a[0]),  # named twice: classified once
        "--url", server.base_url, "--model", "b-lenet", "--format", "json", "--top-k", "2",
        "--batch-size", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    files = [r["file"] for r in doc["results"]]
    assert files == [str(p) for p in [*a, *b, single]]
    # the same answers as the server gives one request of all of them
    parts = [("images", (Path(f).name, Path(f).read_bytes(), "image/png")) for f in files]
    raw = httpx.post(f"{server.base_url}/v1/models/b-lenet/classify", files=parts).json()
    for r, s in zip(doc["results"], raw["results"], strict=True):
        assert (r["class_index"], r["exit"]) == (s["class_index"], s["exit"]["index"])
        assert r["entropy"] == pytest.approx(s["entropy"], abs=1e-5)
        assert len(r["top_k"]) == 2
    summary = doc["summary"]
    assert summary["classified"] == 6 and summary["failed"] == 0 and doc["errors"] == []
    assert summary["requests"] == 3  # batches of 2
    assert sum(summary["exit_counts"]) == 6


def test_table_and_csv(server: ServerProcess, tmp_path: Path) -> None:
    paths = write_pngs(tmp_path, 3)
    table = branchy("classify", str(tmp_path), "--url", server.base_url, "--model", "b-lenet")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["FILE", "CLASS", "CONFIDENCE", "EXIT", "ENTROPY"]
    assert [ln.split()[0] for ln in lines[1:4]] == [str(p) for p in paths]
    assert "3 of 3 images classified" in table.stdout and "exit shares: exit 0" in table.stdout
    out = branchy(
        "classify", *map(str, paths), "--url", server.base_url, "--model", "b-lenet",
        "--format", "csv",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [r["file"] for r in rows] == [str(p) for p in paths]
    assert all(r["exit"] in ("0", "1") and 0 <= float(r["confidence"]) <= 1 for r in rows)
    assert "3 of 3 images classified" in out.stderr  # the summary stays off the CSV


def test_labels_mode_prints_accuracy_exit_shares_and_throughput(
    server: ServerProcess, tmp_path: Path
) -> None:
    labelled_tree(tmp_path / "tree", 2, DIGITS[:5])
    done = branchy(
        "classify", str(tmp_path / "tree"), "--labels", "--url", server.base_url,
        "--model", "b-lenet", "--format", "json", "--progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    results, s = doc["results"], doc["summary"]
    assert len(results) == 10
    assert all(r["label"] == Path(r["file"]).parent.name for r in results)
    correct = sum(r["class_name"] == r["label"] for r in results)
    assert s["correct"] == correct and s["accuracy"] == pytest.approx(correct / 10)
    assert s["exit_shares"] == pytest.approx(
        [sum(r["exit"] == e for r in results) / 10 for e in (0, 1)]
    )
    assert s["images_per_second"] > 0
    assert "] 10/10 100%" in done.stderr  # the progress bar ran
    # without --format: the summary alone, in words
    text = branchy(
        "classify", str(tmp_path / "tree"), "--labels", "--url", server.base_url,
        "--model", "b-lenet",
    )  # fmt: skip
    assert text.returncode == 0, text.stderr
    assert f"accuracy: {100 * correct / 10:.2f}% ({correct} of 10)" in text.stdout
    assert "images/s" in text.stdout and "exit shares: exit 0" in text.stdout
    assert ".png" not in text.stdout  # no per-image rows


def test_bad_files_are_reported_and_skipped(server: ServerProcess, tmp_path: Path) -> None:
    good = write_pngs(tmp_path, 3)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    done = branchy(
        "classify", str(good[0]), str(broken), str(tmp_path / "missing.png"), str(empty),
        str(good[1]), str(good[2]), "--url", server.base_url, "--model", "b-lenet",
        "--format", "json",
    )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    doc = json.loads(done.stdout)
    assert [r["file"] for r in doc["results"]] == [str(p) for p in good]
    errors = {e["file"]: e["error"] for e in doc["errors"]}
    assert set(errors) == {str(broken), str(empty)}
    assert "empty" in errors[str(empty)]
    assert "missing.png: no such file or folder" in done.stderr
    assert f"{broken}: " in done.stderr and "(skipped)" in done.stderr


def test_models_command(server: ServerProcess) -> None:
    done = branchy("models", "--url", server.base_url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "ARCHITECTURE", "EXITS"]
    assert [ln.split()[0] for ln in lines[1:]] == ["b-alexnet", "b-lenet"]
    doc = json.loads(branchy("models", "--url", server.base_url, "--format", "json").stdout)
    assert [m["name"] for m in doc] == ["b-alexnet", "b-lenet"]


def test_thresholds_get_and_set(server: ServerProcess) -> None:
    env = {"BRANCHY_ADMIN_TOKEN": TOKEN, "BRANCHY_URL": server.base_url}
    before = json.loads(branchy("thresholds", "get", "b-lenet", "--format", "json", env=env).stdout)
    done = branchy("thresholds", "set", "b-lenet", "0.125", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("b-lenet: thresholds 0.125 (source admin)")
    assert "calibration samples: accuracy" in done.stdout
    got = branchy("thresholds", "get", "b-lenet", env=env)
    assert got.stdout.startswith("b-lenet: thresholds 0.125 (source admin)")
    assert branchy("thresholds", "set", "b-lenet", "--tolerance", "0.05", env=env).returncode == 0
    branchy("thresholds", "set", "b-lenet", *map(str, before["thresholds"]), env=env)


def test_user_errors_print_one_line(server: ServerProcess, tmp_path: Path) -> None:
    image = str(write_pngs(tmp_path, 1)[0])
    url = ["--url", server.base_url]
    nobody = f"http://127.0.0.1:{free_port()}"
    one_error_line(branchy("classify", image, "--url", nobody), "cannot reach the server", nobody)
    one_error_line(branchy("models", "--url", nobody), "cannot reach the server")
    one_error_line(
        branchy("classify", image, *url, "--model", "nope"), "no model named 'nope'", "b-lenet"
    )
    one_error_line(branchy("classify", image, *url), "several models", "--model")
    done = branchy("classify", str(tmp_path / "nothing-here.png"), *url, "--model", "b-lenet")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"branchy: {tmp_path / 'nothing-here.png'}: no such file or folder",
        "branchy: error: no image files to classify",
    ]
    one_error_line(
        branchy("classify", image, *url, "--model", "b-lenet", "--thresholds", "1,2"),
        "422",
    )
    one_error_line(branchy("thresholds", "get", "b-lenet", *url), "BRANCHY_ADMIN_TOKEN")
    one_error_line(
        branchy("thresholds", "get", "b-lenet", *url, env={"BRANCHY_ADMIN_TOKEN": "wrong-123456"}),
        "401",
    )
    one_error_line(
        branchy("thresholds", "set", "b-lenet", *url, env={"BRANCHY_ADMIN_TOKEN": TOKEN}),
        "--tolerance",
    )
    bad_arg = branchy("classify", image, "--thresholds", "a,b")
    assert bad_arg.returncode == 2 and "expected comma-separated numbers" in bad_arg.stderr
    assert "Traceback" not in bad_arg.stderr
