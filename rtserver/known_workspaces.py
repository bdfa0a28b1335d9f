"""The workspaces this gateway has served, remembered across restarts.

A database shared by all workspaces (RT_POSTGRES_URL) feeds every workspace the node knows.
Changes committed while the gateway was down are streamed again at start-up, before any client
has reconnected: remembering the workspaces lets those changes land in the right histories
instead of being acknowledged with nobody to record them.

One id a line in `<state_dir>/workspaces`, each once; appends happen off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os

from rtserver.atomic_file import replace_file
from rtserver.config import WORKSPACE_ID_RE

log = logging.getLogger("rtserver.known_workspaces")


class KnownWorkspaces:
    def __init__(self, path: str):
        self.path = path
        self._pending: list[str] = []
        self._task: asyncio.Future | None = None
        self._known: set[str] = set()

    def load(self) -> list[str]:
        """The remembered ids (blocking: run it in an executor). A file holding an id twice
        (written by earlier versions) is rewritten with each once; so is one whose last line a
        crash cut short: that part of an id is dropped (its workspace is remembered again when
        next used), and the next id appended is not joined to it."""
        try:
            with open(self.path) as fh:
                text = fh.read()
        except FileNotFoundError:
            return []
        lines = text.split("\n")
        cut = lines.pop()  # "" after the last newline, else what a crash left of a line
        ids = list(dict.fromkeys(i for i in (line.strip() for line in lines) if WORKSPACE_ID_RE.match(i)))
        self._known = set(ids)
        if len(ids) < len(lines) or cut:
            replace_file(self.path, "".join(f"{i}\n" for i in ids).encode())
        return ids

    def add(self, workspace: str) -> None:
        # A workspace whose memory was given back when idle (Hub.sweep), or not created at start,
        # is new to the hub again when next used: remembered already.
        if workspace in self._known:
            return
        self._known.add(workspace)
        self._pending.append(workspace)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self.flush())

    async def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._append, batch)
            except OSError as exc:
                log.error("cannot remember workspaces", extra={"fields": {"path": self.path, "error": str(exc)}})

    def _append(self, ids: list[str]) -> None:
        with open(self.path, "a") as fh:
            fh.write("".join(f"{i}\n" for i in ids))
            fh.flush()
            os.fsync(fh.fileno())
