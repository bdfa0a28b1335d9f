"""The state directory, and replacing a state file whole: a crash leaves its old content or its
new, never a mix."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile


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
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            # A write, flush or fsync refused (a full disk) names no file: "[Errno 28] No space
            # left on device" was all a failed start said. Named here, as an open's error is.
            raise OSError(exc.errno, exc.strerror, path) from exc
        raise


def state_dir_problem(path: str) -> str | None:
    """Why the state directory `path` could not be made or written, or may not be trusted,
    without making it; None when it could. One that other users may write to is refused: it
    holds the dev secret, which whoever replaces it can sign tokens with, and the sessions;
    made by the gateway it is private, but one made before was taken as it was."""
    what = f"state directory {path} (server.state_dir)"
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = 0  # not there yet (made private), or not usable: directory_problem says why
    if stat.S_ISDIR(mode) and mode & 0o022:
        return (f"{what}: writable by other users (mode {stat.S_IMODE(mode):04o}): it holds the dev secret and the "
                f"sessions, which they could replace; chmod 700 {path}")
    return directory_problem(path, what)


def directory_problem(path: str, what: str) -> str | None:
    """Why the directory `path` (`what`, as messages name it) could not be made or written,
    without making it; None when it could. Told by permissions, and as root (whom every mode
    bit lets pass) by making and removing a directory in the nearest one that exists: /proc or
    /sys passed."""
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    said = f"{what}: " + ("" if probe == path else f"cannot be made: {probe} is ")
    if not os.path.isdir(probe):
        return said + "not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return said + "not writable"
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".rtserver-probe-", dir=probe))
        except OSError as exc:
            return said + f"not writable ({exc.strerror or exc})"
    return None


def ensure_state_dir(path: str) -> None:
    """Create the state directory `path` (0700: it holds the dev secret, session ids, source
    positions, the audit spool) and check it can be written: RuntimeError, one line naming
    server.state_dir, when not (in state_dir_problem's words where it foresees the failure:
    a file in the way was "File exists")."""
    problem = state_dir_problem(path)
    if problem is not None:
        raise RuntimeError(problem)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
    except OSError as exc:
        raise RuntimeError(f"state directory {path} (server.state_dir): {exc.strerror or exc}") from None
