"""README is the front door and docs/ holds the rest: short, linked, in step with the tree and the parser."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from jobs.cli.parser import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_stays_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_lead_somewhere(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def _commands(text: str) -> list[str]:
    """Every `python jobs/submit.py ...` line of the code blocks, continuations joined."""
    out = []
    for block in re.findall(r"```(?:bash)?\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            line = re.sub(r"^(\w+=\S+ )+", "", line)  # PYTHONPATH=examples ...
            if line.startswith("python jobs/submit.py") and "..." not in line:
                out.append(line.split(" #")[0])
    return out


COMMANDS = [(page.name, cmd) for page in PAGES for cmd in _commands(page.read_text())]


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}:{c[22:60]}" for p, c in COMMANDS])
def test_every_documented_command_parses(page, command):
    build_parser().parse_args(shlex.split(command)[2:])


def test_architecture_names_every_room_and_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for pkg in ("core", "jobs"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if path.name == "__init__.py":
                if rel.parent.name != pkg and f"{rel.parent.name}/" not in text:
                    missing.append(str(rel.parent))
            elif path.stem not in text:
                missing.append(str(rel))
    assert not missing, f"docs/architecture.md does not mention: {missing}"


def test_product_text_names_no_issue_numbers():
    pattern = re.compile(r"\bissue \d+|\(issue\b|\bsession \d+", re.I)
    found = []
    for pkg in ("core", "jobs", "mp", "pp", "tp", "tests", "bench", "examples", "tools", "docs"):
        for path in (ROOT / pkg).rglob("*"):
            if path.suffix in (".py", ".md") and path != Path(__file__) and pattern.search(path.read_text()):
                found.append(str(path.relative_to(ROOT)))
    if pattern.search((ROOT / "README.md").read_text()):
        found.append("README.md")
    assert not found, f"issue or session numbers in: {found}"


def test_readme_names_every_flag_the_parser_has():
    """README's index of flags stays whole as options are added (docs/cli.md holds their help)."""
    readme = (ROOT / "README.md").read_text()
    flags = {o for a in build_parser()._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
    missing = sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", readme))
    assert not missing, f"README.md does not name {missing}"
