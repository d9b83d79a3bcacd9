"""Writes docs/cli.md, the command-line reference, from the declared options (jobs/cli/reference.py).

Run: python tools/cli_reference.py        (tests/test_cli_reference.py fails when the page is stale)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jobs.cli.reference import reference_markdown  # noqa: E402

if __name__ == "__main__":
    (ROOT / "docs" / "cli.md").write_text(reference_markdown())
    print(f"wrote {ROOT / 'docs' / 'cli.md'}")
