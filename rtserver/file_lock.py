"""An exclusive lock on a file of a state directory, held while the returned file stays open:
two processes sharing the directory would overwrite each other's state."""

from __future__ import annotations

import fcntl
from typing import IO


def lock_exclusive(path: str) -> IO[bytes] | None:
    """Lock `path` (created when missing) for this process; None when another holds it.
    OSError when the file cannot be opened."""
    fh = open(path, "a+b")  # noqa: SIM115 - held open as long as the lock is wanted
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        return None
    return fh
