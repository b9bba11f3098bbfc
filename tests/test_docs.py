"""Every ```python block of README.md and docs/*.md runs as pasted, so the docs cannot drift
from the code; a block preceded by a line `<!-- not-run ... -->` is left out. Every test file
the pages name exists, and every `--help` shown in docs/command-line.md is the real one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import mixprec
from mixprec.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = "<!-- not-run"


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(line of the opening fence, code, runnable) for each ```python block of `text`."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            before = [line.strip() for line in lines[:i] if line.strip()]
            runnable = not (before and before[-1].startswith(NOT_RUN))
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            blocks.append((i + 1, "\n".join(lines[i + 1 : end]), runnable))
            i = end
        i += 1
    return blocks


CASES = [
    pytest.param(page, line, code, id=f"{page.name}:{line}")
    for page in PAGES
    for line, code, runnable in python_blocks(page.read_text())
    if runnable
]


@pytest.mark.parametrize(("page", "line", "code"), CASES)
def test_block_runs_as_pasted(page, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files a block writes land in a temp dir
    torch.manual_seed(0)
    torch.set_num_threads(1)
    exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), {"__name__": "__main__"})


def test_blocks_are_found_and_markers_honoured():
    text = "a\n```python\nx = 1\n```\n<!-- not-run: needs a GPU -->\n\n```python\ny\n```\n"
    assert python_blocks(text) == [(2, "x = 1", True), (7, "y", False)]


def test_readme_is_short_and_its_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.startswith("pip install") and ci in readme


def test_api_table_names_every_public_name():
    table = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in mixprec.__all__ if not re.search(rf"`{name}\b", table)]
    assert missing == []


def test_every_test_file_the_pages_name_exists():
    named = {
        (page.name, path)
        for page in PAGES
        for path in re.findall(r"tests/[\w/.-]*?\.py\b", page.read_text())
    }
    assert named, "the pattern finds the test files the pages name"
    assert sorted((page, path) for page, path in named if not (ROOT / path).is_file()) == []


def help_blocks(text: str) -> list[tuple[list[str], str]]:
    """(arguments, shown output) of each fenced `$ mixprec ... --help` block of `text`."""
    found = re.findall(r"```\n\$ mixprec ((?:\S+ )*--help)\n(.*?)```", text, re.S)
    return [(command.split(), shown.strip()) for command, shown in found]


def test_every_help_shown_in_command_line_md_is_the_real_help(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")  # as the page says its help was captured
    blocks = help_blocks((ROOT / "docs" / "command-line.md").read_text())
    assert (["bench", "step", "--help"]) in [args for args, _ in blocks]
    stale = []
    for args, shown in blocks:
        with pytest.raises(SystemExit):
            main(args)
        if capsys.readouterr().out.strip() != shown:
            stale.append(" ".join(args))
    assert stale == [], "regenerate these blocks with COLUMNS=100 mixprec ... --help"
