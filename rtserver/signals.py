"""Run a service until a stop signal, then stop it within a deadline.

SIGTERM, SIGINT and SIGHUP (a closed terminal; not when started ignoring it, as by nohup)
start a clean stop, from the start-up on: a signal while the service starts abandons the
start and stops what it began. A second signal, or a stop still running when its deadline
passes (a broker that stopped answering), ends the process at once: an operator's second
Ctrl-C, or the orchestrator's patience, must always win.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable

from rtserver import logs

log = logging.getLogger("rtserver")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def until_signalled(start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]],
                          deadline: float, name: str) -> int:
    """Run `start()`, wait for a stop signal, run `stop()`; 0 once it is done, else the process
    exits with 1. A failed start raises, once what it began is stopped. The handlers are in
    place before `start()`: a signal during a slow start-up (a JWKS or Kafka that takes its
    time) would kill the process, exit 143 without a log line."""
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for sig in STOP_SIGNALS:
        if sig == signal.SIGHUP and signal.getsignal(sig) is signal.SIG_IGN:
            # Ignored by whoever started us (`nohup rtserver serve &`): closing that terminal
            # must not stop the gateway the operator asked to outlive it.
            continue
        loop.add_signal_handler(sig, signalled.set)
    starting = asyncio.ensure_future(start())
    waiting = asyncio.ensure_future(signalled.wait())
    await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done():
        waiting.cancel()
        if not starting.cancelled() and starting.exception() is not None:
            await _stop_failed_start(stop, deadline, name)
        starting.result()
        await signalled.wait()
    else:
        starting.cancel()
        log.info("%s asked to stop during start-up: start abandoned", name)
    signalled.clear()
    stopping = asyncio.ensure_future(_after(starting, stop))
    again = asyncio.ensure_future(signalled.wait())
    done, _ = await asyncio.wait({stopping, again}, timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
    if stopping in done:
        again.cancel()
        stopping.result()
        return 0
    why = "a second signal" if again in done else f"still stopping after {deadline:g} s"
    log.error("%s did not stop cleanly (%s): exiting now", name, why, extra={"fields": {"reason": why}})
    logs.flush()
    os._exit(1)


async def _stop_failed_start(stop: Callable[[], Awaitable[None]], deadline: float, name: str) -> None:
    """`stop()` after a failed start, within `deadline`: what the start began (the seq
    reservation 30 s ahead, the lease's group membership, a source's replication connection)
    ends as at a clean stop, and a quick restart does not find it. Its own failure is logged:
    the start's error is the one to report."""
    stopping = asyncio.ensure_future(stop())
    done, _ = await asyncio.wait({stopping}, timeout=deadline)
    if not done:
        stopping.cancel()
        log.error("%s: stopping after the failed start took over %g s: abandoned", name, deadline)
    elif stopping.exception() is not None:
        log.error("%s: stopping after the failed start failed", name, exc_info=stopping.exception())


async def _after(start: asyncio.Future[None], stop: Callable[[], Awaitable[None]]) -> None:
    """`stop()` once `start` (done, or cancelled at a signal) has ended: stop then finds what the
    start began, however far it got."""
    if not start.done():
        await asyncio.wait({start})
    if not start.cancelled():
        start.exception()  # retrieved: the stop is what is reported now
    await stop()
