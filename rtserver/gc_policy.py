"""Keep the cyclic garbage collector's full passes proportional to what changed, not to how
many connections are open.

A full pass (generation 2) walks every tracked object: ~50 per connection, so with 10,000
connections one pass held the event loop for ~0.35 s, and every client waited for it. Python
starts one whenever the objects that survived into generation 2 grew by a quarter, which a
gateway under load reaches again and again (new connections, history entries).

Objects that survived a full pass are long-lived (the process's modules and configuration,
open connections, their subscriptions): after each full pass, and once after start-up, they
are moved to the permanent generation (`gc.freeze()`), so the next full passes walk only what
was allocated since. The cost: a frozen object that later becomes part of a reference cycle
is not reclaimed. The gateway's own objects are freed by reference counting when a connection
ends (rtserver.http breaks the one cycle a connection had), so that is rare; `server.gc_freeze`
turns the policy off, and `rt_gc_pause_seconds_total` shows what the passes cost either way.
"""

from __future__ import annotations

import asyncio
import gc


class FreezeSurvivors:
    """Installed for the life of a gateway: `start()` in Gateway.start, `stop()` at shutdown."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self.freezes = 0
        self.frozen = 0  # objects frozen so far

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        gc.collect()
        self._freeze()
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        gc.unfreeze()  # back to the default behaviour (matters for tests running many gateways)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        # Not from inside the collector's callback: right after it, on the loop.
        loop = self._loop
        # A collection after the loop closed (at interpreter exit) has no loop to run on: the
        # call_soon raised inside the collector, a plain-text "Exception ignored" on stderr.
        if phase == "stop" and info["generation"] == 2 and not self._scheduled and loop is not None \
                and not loop.is_closed():
            self._scheduled = True
            loop.call_soon(self._freeze)

    def _freeze(self) -> None:
        self._scheduled = False
        # Counted here, from the generations about to be frozen (right after a full pass that
        # walked them anyway; give or take a few temporaries): gc.get_freeze_count() walks the
        # whole permanent generation, ~10 ms per million objects, too long for a metrics scrape.
        moving = len(gc.get_objects(2)) + len(gc.get_objects(1)) + len(gc.get_objects(0))
        gc.freeze()
        self.freezes += 1
        self.frozen += moving
