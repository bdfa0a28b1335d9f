"""rtserver.eager.start_now: a coroutine runs at once; only one that waits becomes a task, and
that task behaves as if it had run the coroutine from the start (results, exceptions,
cancellation, bare yields)."""

from __future__ import annotations

import asyncio

import pytest

from rtserver.eager import run_now, start_now


async def test_a_coroutine_that_never_waits_runs_before_start_now_returns():
    ran = []

    async def quick() -> int:
        ran.append(1)
        return 5

    assert start_now(quick()) is None
    assert ran == [1]


async def test_an_exception_before_any_wait_reaches_the_caller():
    async def bad() -> None:
        raise ValueError("early")

    with pytest.raises(ValueError, match="early"):
        start_now(bad())


async def test_a_coroutine_that_waits_finishes_in_a_task_with_its_result():
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    steps = []

    async def slow() -> int:
        steps.append("before")
        got = await fut
        steps.append("after")
        await asyncio.sleep(0)  # a bare yield
        value = await asyncio.sleep(0.01, result=got + 1)
        return value * 2

    task = start_now(slow())
    assert isinstance(task, asyncio.Task) and steps == ["before"]
    await asyncio.sleep(0)
    assert not task.done()
    fut.set_result(20)
    assert await asyncio.wait_for(task, 5) == 42
    assert steps == ["before", "after"]


async def test_an_exception_raised_by_what_it_waits_for_is_raised_inside_the_coroutine():
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    caught = []

    async def guarded() -> str:
        try:
            await fut
        except KeyError as exc:
            caught.append(exc)
            return "handled"
        return "not reached"

    task = start_now(guarded())
    fut.set_exception(KeyError("k"))
    assert await task == "handled" and len(caught) == 1


async def test_cancelling_the_task_cancels_the_coroutine_where_it_waits():
    started = asyncio.Event()
    cleanup = []

    async def waits_forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleanup.append("finally")

    task = start_now(waits_forever())
    assert task is not None and started.is_set()
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleanup == ["finally"] and task.cancelled()


async def test_a_coroutine_may_catch_its_cancellation_and_go_on():
    async def stubborn() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0)
            return "kept going"
        return "slept"

    task = start_now(stubborn())
    await asyncio.sleep(0)
    task.cancel()
    assert await task == "kept going"


async def test_run_now_gives_the_result_of_a_coroutine_that_never_waits_or_a_task_of_one_that_does():
    async def quick() -> int:
        return 5

    assert run_now(quick()) == (True, 5)
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def slow() -> int:
        return await fut + 1

    finished, task = run_now(slow())
    assert not finished and isinstance(task, asyncio.Task)
    fut.set_result(6)
    assert await task == 7
