"""Replacing a state file whole: a crash leaves its old content or its new, never a mix."""

from __future__ import annotations

import contextlib
import os


def replace_file(path: str, data: bytes) -> None:
    """Write `data` to `path` through `path + ".tmp"` (created 0600), synced, then renamed over
    `path`. Blocking: run it in an executor."""
    tmp = f"{path}.tmp"
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
