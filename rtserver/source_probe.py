"""Whether a feed's database can be reached as its feed would reach it, without reading it: a
standby ingest's check of the feeds it would take over (its /readyz says it), so a standby
that could not read them is seen before a takeover, not after."""

from __future__ import annotations

import asyncio
from typing import Any

from rtserver.redact import redact

PROBE_TIMEOUT = 10.0  # s: a probe's connect and command together


async def probe(feed: dict[str, Any]) -> str:
    """"" when the database of `feed` (plan_sources' shape) answers; else why not, with its
    URL's credentials masked."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            if feed["kind"] == "postgres":
                await _probe_postgres(feed["url"])
            else:
                await _probe_mongo(feed["url"], feed["database"])
    except TimeoutError:
        return f"no answer within {PROBE_TIMEOUT:g} s"
    except Exception as exc:  # noqa: BLE001 - whatever the driver raises is the answer
        return redact(f"{type(exc).__name__}: {exc}".strip())
    return ""


async def _probe_postgres(url: str) -> None:
    """A replication connection, as the feed opens (its role needs REPLICATION and a
    `replication` line in pg_hba.conf, which a plain connection would not test)."""
    import psycopg

    conn = await psycopg.AsyncConnection.connect(url, autocommit=True, replication="database",
                                                 application_name="rtserver-ingest-probe")
    await conn.close()


async def _probe_mongo(url: str, database: str) -> None:
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient[Any] = AsyncMongoClient(url, serverSelectionTimeoutMS=int(PROBE_TIMEOUT * 1000))
    try:
        await client[database].command("ping")
    finally:
        await client.close()
