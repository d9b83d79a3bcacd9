"""docs/cli.md is generated from the declared options: regenerating it must give the committed page."""

from __future__ import annotations

from pathlib import Path

from jobs.cli.parser import build_parser
from jobs.cli.reference import reference_markdown

PAGE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_the_committed_reference_is_what_the_options_generate():
    assert PAGE.read_text() == reference_markdown(), "docs/cli.md is stale: run python tools/cli_reference.py"


def test_the_reference_names_every_flag_the_parser_takes():
    flags = {s for action in build_parser()._actions for s in action.option_strings if s.startswith("--")}
    page = PAGE.read_text()
    missing = sorted(f for f in flags - {"--help"} if f"`{f}" not in page)
    assert not missing, f"flags missing from docs/cli.md: {missing}"
