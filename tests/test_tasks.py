"""rtserver.tasks.cancel_and_wait: a task's end is not its caller's; the caller's cancellation
still reaches it, and nothing in rtserver awaits a cancelled task the old way."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import logging
import pathlib

import pytest

from rtserver.tasks import cancel_and_wait


async def _slow_to_end(ended: asyncio.Event) -> None:
    try:
        await asyncio.sleep(3600)
    finally:
        await asyncio.sleep(0.1)  # a cursor closed on its server, a producer flushed
        ended.set()


async def _old_way(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("close", [cancel_and_wait, _old_way], ids=["cancel_and_wait", "old_way"])
async def test_a_caller_cancelled_while_the_task_ends_is_cancelled(close):
    ended = asyncio.Event()
    task = asyncio.create_task(_slow_to_end(ended))
    await asyncio.sleep(0)
    closing = asyncio.create_task(close(task))
    await asyncio.sleep(0.02)
    closing.cancel()  # a stop deadline, an abandoned start-up
    await asyncio.wait({closing})
    await asyncio.wait({task})
    assert task.cancelled()
    if close is _old_way:
        # What rtserver's close paths did: the caller's cancellation went to the task, cut its
        # clean-up short, and the caller carried on as if it had not been cancelled.
        assert not closing.cancelled() and not ended.is_set()
    else:
        assert closing.cancelled() and ended.is_set()


async def test_the_tasks_end_is_not_raised_and_its_failure_is_logged(caplog):
    async def fails() -> None:
        raise ValueError("broker said no")

    task = asyncio.create_task(fails(), name="rtserver-test-writer")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="rtserver"):
        await cancel_and_wait(task)
    assert [(r.getMessage(), r.exc_info[0]) for r in caplog.records] == [("rtserver-test-writer failed", ValueError)]
    caplog.clear()
    failed_quietly = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await cancel_and_wait(failed_quietly, quiet=True)
    running = asyncio.create_task(asyncio.sleep(3600))
    await cancel_and_wait(running)
    await cancel_and_wait(None)
    assert running.cancelled() and not caplog.records


def _awaits_a_task_under_suppressed_cancellation(tree: ast.AST) -> list[int]:
    """Lines of `with ...suppress(..., CancelledError, ...): ... await <name>` (awaiting a task
    object, not a call) in a module."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.With, ast.AsyncWith)):
            continue
        suppresses = any(
            isinstance(item.context_expr, ast.Call)
            and "suppress" in ast.unparse(item.context_expr.func)
            and any("CancelledError" in ast.unparse(a) for a in item.context_expr.args)
            for item in node.items
        )
        if suppresses:
            for inner in ast.walk(ast.Module(body=node.body, type_ignores=[])):
                if isinstance(inner, ast.Await) and isinstance(inner.value, (ast.Name, ast.Attribute)):
                    found.append(inner.lineno)
    return found


def test_no_close_path_awaits_a_cancelled_task_under_suppressed_cancellation():
    root = pathlib.Path(__file__).resolve().parent.parent / "rtserver"
    found = {
        f"{path.relative_to(root.parent)}:{line}"
        for path in root.rglob("*.py")
        for line in _awaits_a_task_under_suppressed_cancellation(ast.parse(path.read_text()))
    }
    assert not found, f"use rtserver.tasks.cancel_and_wait: {sorted(found)}"
