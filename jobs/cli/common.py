"""What the command modules share: the one way a command reports a user's mistake and ends."""

from __future__ import annotations

import sys


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code
