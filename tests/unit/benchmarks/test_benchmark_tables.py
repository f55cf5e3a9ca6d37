"""Every figure from a script: each committed benchmark result (``benchmarks/results/*.json``) records its
command, versions, machine and date, and a README (``benchmarks/README.md`` or the project's) shows exactly the
table the benchmark renders from it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "benchmarks"
sys.path.insert(0, str(BENCH))

import readme_tables  # noqa: E402

RESULT_FILES = sorted(p.stem for p in (BENCH / "results").glob("*.json"))


def test_every_result_has_a_table_and_every_table_a_result() -> None:
    assert RESULT_FILES, "no committed benchmark result"
    assert set(RESULT_FILES) == set(readme_tables.TABLES) == set(readme_tables.shown())


@pytest.mark.parametrize("name", RESULT_FILES)
def test_result_records_how_it_was_made(name: str) -> None:
    result = readme_tables.load(name)
    assert result["command"].startswith(f"python benchmarks/{readme_tables.TABLES[name]}.py")
    assert {"python", "dfquant", "torch"} <= set(result["versions"])
    assert result["machine"]["cpu"] and result["machine"]["cpu_count"] >= 1
    assert len(result["date"]) == 20 and result["date"].endswith("Z")


@pytest.mark.parametrize("name", RESULT_FILES)
def test_readme_table_is_the_rendered_result(name: str) -> None:
    assert readme_tables.shown()[name] == readme_tables.render(name), f"run python benchmarks/readme_tables.py ({name})"


def test_check_mode_finds_a_changed_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = readme_tables.README.read_text(encoding="utf-8")
    name = RESULT_FILES[0]
    body = readme_tables.blocks(text)[name]
    readme = tmp_path / "README.md"
    readme.write_text(text.replace(body, body.replace("|", "| ", 1)), encoding="utf-8")
    monkeypatch.setattr(readme_tables, "READMES", (readme,))
    assert readme_tables.main(["--check"]) == 1
    assert readme_tables.main([]) == 0
    assert readme_tables.main(["--check"]) == 0
    assert readme.read_text(encoding="utf-8") == text


def test_a_block_shown_twice_is_an_error(tmp_path: Path) -> None:
    text = readme_tables.README.read_text(encoding="utf-8")
    twin = tmp_path / "README.md"
    twin.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match="appears twice"):
        readme_tables.shown((readme_tables.README, twin))
