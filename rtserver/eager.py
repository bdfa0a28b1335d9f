"""Run a coroutine at once, and make a task of it only if it has to wait.

Most publish requests finish without waiting for anything (the token's identity is cached, the
write backlog has room). A task would run each only in the next loop iteration, after whatever
that iteration holds (a chunk of fan-out writes), so every publisher round trip would wait for
it. Python 3.12 has eager tasks for this; 3.11 does not, hence this.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


def start_now(coro: Coroutine[Any, Any, Any]) -> asyncio.Task | None:
    """Run `coro` until it first waits. None if it finished (its result is dropped, an
    exception propagates to the caller); otherwise a task that finishes it."""
    finished, task = run_now(coro)
    return None if finished else task  # type: ignore[return-value]


def run_now(coro: Coroutine[Any, Any, T]) -> tuple[bool, T | asyncio.Task[T]]:
    """Run `coro` until it first waits: (True, its result) if it finished (an exception
    propagates to the caller), else (False, a task that finishes it)."""
    try:
        waiting_on = coro.send(None)
    except StopIteration as stop:
        return True, stop.value
    return False, asyncio.ensure_future(_finish(coro, waiting_on))


async def _finish(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> Any:
    return await _resume(coro, waiting_on)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> Generator[Any, None, Any]:
    # Hand the task what the coroutine stopped at (a future with _asyncio_future_blocking set,
    # or None for a bare yield), then pass the task's wake-up or cancellation into it, the way
    # the task would have if it had run the coroutine from the start.
    while True:
        try:
            yield waiting_on
        except BaseException as exc:  # noqa: BLE001 - cancellation and the rest go to coro
            try:
                waiting_on = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                waiting_on = coro.send(None)
            except StopIteration as stop:
                return stop.value
