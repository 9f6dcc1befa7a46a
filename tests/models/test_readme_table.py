from pathlib import Path

from models.__main__ import PAPER, table


def test_readme_architecture_table_is_current() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert table(PAPER) in readme, "regenerate the README table with `python -m models`"
