"""The gateway with a smaller picows first read buffer, to measure a proposed change.

`python -m benchmarks.fanout.gateway_variant serve ...` runs `rtserver serve` with
rtserver.http.new_ws_protocol building its WSProtocol with `FANOUT_READ_BUFFER` bytes (default
2048) instead of 16 KiB: picows allocates that buffer per connection and grows it when a larger
message arrives. Server kind `gateway-rb2k` in the harness (not part of the standard set).
"""

from __future__ import annotations

import logging
import os

from picows import WSAutoPingStrategy
from picows.picows import WSProtocol

from rtserver import http


def _new_ws_protocol(gw, fields=None):
    # `fields` (the connection's log fields) as rtserver.http.new_ws_protocol takes them: the
    # gateway passes them, and this variant logs without them.
    limits = gw.cfg.limits
    return WSProtocol(
        None, None, False, gw.ws_listener_factory, logging.getLogger("picows.server"), True, 5.0, False, 20.0,
        20.0, WSAutoPingStrategy.PING_WHEN_IDLE, True, max(limits.max_message_bytes * 4, 1 << 20), None,
        int(os.environ.get("FANOUT_READ_BUFFER", "2048")),
    )


http.new_ws_protocol = _new_ws_protocol

if __name__ == "__main__":
    from rtserver.cli import main

    raise SystemExit(main())
