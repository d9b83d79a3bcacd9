"""The user's files, read and written in one place: an OS or format error becomes one line naming the file.

The command reads and writes files the user owns or chose (a run's config.json, a checkpoint's
latest.json and meta.json, the ``--export`` target, the ``--init-from`` weights). Any of them can be
missing, unreadable, truncated, on a full or read-only disk, or hold something else; the user should
read "FILE: what is wrong" and never a traceback. It sits at the bottom of ``core`` beside
``errors.py`` because both the command (``jobs/cli``) and the training room (the checkpoint's
files, read by the ranks and by the submitting host alike) go through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import zipfile
from collections.abc import Iterator
from typing import Any

from core.errors import ConfigError

# what a file that is there but does not hold what it should raises, by reader: json, pickle,
# torch.load (a zip archive, or the legacy pickle format), and text that is not UTF-8
FORMAT_ERRORS = (
    json.JSONDecodeError,
    UnicodeDecodeError,
    pickle.UnpicklingError,
    EOFError,
    zipfile.BadZipFile,
)


def os_reason(e: OSError) -> str:
    """The OS's own words (``No space left on device``, ``Permission denied``), without errno noise."""
    return e.strerror or str(e)


@contextlib.contextmanager
def user_file(path: str, doing: str = "read") -> Iterator[None]:
    """Run the body; an OS or format error about ``path`` becomes one ConfigError line naming it."""
    try:
        yield
    except ConfigError:
        raise
    except OSError as e:
        # the file the user named, not our temporary one beside it
        raise ConfigError(f"cannot {doing} {path}: {os_reason(e)}") from None
    except FORMAT_ERRORS as e:
        raise ConfigError(f"{path} is damaged or not what it should be ({type(e).__name__}: {e})") from None


def read_json(path: str, expect: str = "an object") -> dict:
    """A JSON object from ``path``; anything else (missing, unreadable, truncated, a list) is one line."""
    with user_file(path):
        with open(path) as f:
            data = json.load(f)
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not {expect}")
    return data


def write_json_atomic(path: str, data: dict) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file; a full or
    read-only disk is one line and leaves neither the temporary file nor a half-written one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with user_file(path, "write"):
            with open(tmp, "w") as f:
                json.dump(data, f, indent=2, default=str)
                f.write("\n")
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def torch_save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` beside the target and rename: a failed write leaves the target as it was."""
    import torch

    tmp = path + ".partial"
    try:
        with user_file(path, "write"):
            # our own file object: an unwritable folder or a full disk is Python's OSError, not the
            # RuntimeError torch's own writer raises
            with open(tmp, "wb") as f:
                torch.save(obj, f)
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def torch_load(path: str, weights_only: bool = True) -> Any:
    """``torch.load`` on CPU; a file that is not a torch file (or not only tensors) is one line."""
    import torch

    with user_file(path):
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only)
        except OSError:
            raise
        except Exception as e:  # junk bytes reach torch's legacy unpickler, which raises anything (KeyError)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{path} is not a torch file of tensors ({type(e).__name__}: {first})") from None
