"""Run a service until a stop signal, then stop it within a deadline.

SIGTERM, SIGINT and SIGHUP (a closed terminal; not when started ignoring it, as by nohup)
start a clean stop. A second signal, or a stop still running when its deadline passes (a
broker that stopped answering), ends the process at once: an operator's second Ctrl-C, or the
orchestrator's patience, must always win.
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


async def until_signalled(stop: Callable[[], Awaitable[None]], deadline: float, name: str) -> int:
    """Wait for a stop signal, run `stop()`; 0 once it is done, else the process exits with 1."""
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for sig in STOP_SIGNALS:
        if sig == signal.SIGHUP and signal.getsignal(sig) is signal.SIG_IGN:
            # Ignored by whoever started us (`nohup rtserver serve &`): closing that terminal
            # must not stop the gateway the operator asked to outlive it.
            continue
        loop.add_signal_handler(sig, signalled.set)
    await signalled.wait()
    signalled.clear()
    stopping = asyncio.ensure_future(stop())
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
