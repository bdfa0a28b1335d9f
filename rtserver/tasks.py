"""Ending a background task from a stop path.

`task.cancel()` then `with suppress(CancelledError): await task` swallows the caller's own
cancellation: a caller cancelled while it awaits the task cancels the task (already ending)
instead of itself, and the CancelledError it then gets is taken for the task's. A stop deadline
or an abandoned start-up then went unnoticed by that caller, which carried on. Waiting through
asyncio.wait keeps the two apart.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("rtserver")


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None, what: str = "", quiet: bool = False) -> None:
    """Cancel `tasks` (None: nothing to do) and wait until they have all ended. Their
    cancellation is not raised, nor a failure: that is logged with `what` (the task's name by
    default) unless `quiet` (the failure was reported where it happened). The caller's own
    cancellation is raised, as anywhere else; the tasks are all cancelled by then."""
    pending = {t for t in tasks if t is not None and not t.done()}
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    for task in tasks:
        if task is None or task.cancelled():
            continue
        exc = task.exception()  # retrieved either way: asyncio would log it again at collection
        if exc is not None and not quiet:
            name = what or (task.get_name() if isinstance(task, asyncio.Task) else repr(task))
            log.error("%s failed", name, exc_info=exc, extra={"fields": {"task": name}})
