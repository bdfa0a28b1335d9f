"""Closing aiokafka's TLS connections under uvloop without waiting 30 s.

uvloop's TLS transport does not read while it shuts down (MagicStack/uvloop#471, open): when
data arrives after `close()` (the response to a consumer's fetch that was in flight), it
waits for the broker's close_notify until its ssl_shutdown_timeout, 30 s. aiokafka awaits
that closure in every client's stop() (AIOKafkaClient.close awaits each connection's
closed future): an ingest taking over the lease over SSL/SASL_SSL sat for 30 s after scanning
the topic, about one takeover in three. aiokafka gives no way to set the transport's
shutdown timeout, so `install()` makes AIOKafkaConnection.close abort a TLS connection that
is still closing after `GRACE` seconds. A Kafka client loses nothing by it: by then aiokafka
has failed every request still waiting on that connection.
"""

from __future__ import annotations

import asyncio
from typing import Any

GRACE = 1.0  # above a fetch's default wait (500 ms): a broker answering it closes before


def install() -> None:
    """Idempotent; called before a TLS Kafka client is made."""
    from aiokafka.conn import AIOKafkaConnection

    original = AIOKafkaConnection.close
    if getattr(original, "_rtserver_tls_abort", False):
        return

    def close(self: Any, reason: Any = None, exc: Any = None) -> asyncio.Future:
        writer = self._writer
        closed = original(self, reason=reason, exc=exc)
        if writer is not None and self._ssl_context is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not from a coroutine (a finalizer): nothing waits for it
                return closed
            loop.call_later(GRACE, _abort_unless_closed, writer.transport, closed)
        return closed

    close._rtserver_tls_abort = True  # type: ignore[attr-defined]
    AIOKafkaConnection.close = close  # type: ignore[method-assign]


def _abort_unless_closed(transport: asyncio.BaseTransport, closed: asyncio.Future) -> None:
    if not closed.done():
        transport.abort()


def ssl_context(cafile: str = "", certfile: str = "", keyfile: str = "") -> Any:
    """The SSL context of every Kafka client (audit and bus): the CAs trusted for the broker's
    certificate (`cafile`, or the system's) and, for mutual TLS, the client certificate and its
    key (audit.ssl_certfile, audit.ssl_keyfile). Reads files: call it in an executor. An
    encrypted key raises (config.py refuses one at start) rather than OpenSSL asking for its
    passphrase on the terminal."""
    from aiokafka.helpers import create_ssl_context

    from rtserver.config import no_passphrase

    install()  # a client's stop() could wait 30 s under uvloop (see above)
    return create_ssl_context(cafile=cafile or None, certfile=certfile or None, keyfile=keyfile or None,
                              password=no_passphrase if certfile else None)
