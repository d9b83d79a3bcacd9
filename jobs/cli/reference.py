"""The command-line reference page (docs/cli.md), derived from the declared options like the parser.

Regenerate with ``python tools/cli_reference.py``; tests/test_cli_reference.py keeps the page in step.
"""

from __future__ import annotations

import dataclasses

from core.config import RunConfig, flag_of
from jobs.cli.parser import SubmitActions

HEADER = """# Command line

`python jobs/submit.py [options]`. Generated from the declared options (`RunConfig` in
`core/config/options.py`, `SubmitActions` in `jobs/cli/parser.py`) by `python tools/cli_reference.py`;
do not edit by hand. `python jobs/submit.py --help` prints the same. A default of "-" means the
option is off, or that the model or another option decides (said in its help). What each option
refuses, with the line the user sees: [failures.md](failures.md).
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _usage(f: dataclasses.Field) -> str:
    meta = f.metadata
    flag = flag_of(f)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    metavar = meta.get("metavar")
    if isinstance(metavar, tuple):
        return f"{flag} {' '.join(metavar)}"
    if metavar or meta.get("choices"):
        return f"{flag} {metavar or '{' + ','.join(meta['choices']) + '}'}"
    if default is False:
        return flag
    if default is True:
        return f"{flag} {{0,1}}"
    return f"{flag} {f.name.upper()}"


def _default(f: dataclasses.Field) -> str:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if default in (None, False, []):
        return "-"
    return f"`{default}`"


def _table(cls: type) -> list[str]:
    rows = ["| option | default | what it does |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        rows.append(f"| `{_cell(_usage(f))}` | {_default(f)} | {_cell(f.metadata.get('help', ''))} |")
    return rows


def reference_markdown() -> str:
    """docs/cli.md: every option of the run, then the submit command's actions."""
    lines = [HEADER, "## The run (stored in config.json)", "", *_table(RunConfig), ""]
    lines += ["## What the command does with it", "", *_table(SubmitActions), ""]
    return "\n".join(lines)
