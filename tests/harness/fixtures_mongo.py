"""Fixtures for MongoDB: the wire-protocol test double (tests/mongo_server) on a random
loopback port, in a thread of its own so the test's event loop, sync clients and gateway
subprocesses can all reach it; and the real replica set named by RT_TEST_MONGO_URL."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.mongo_server import ThreadedMongoTestServer


@pytest.fixture
def mongo_server() -> Iterator[ThreadedMongoTestServer]:
    """A fresh test server per test: `.url` (directConnection), `.replica_set_url`,
    `.drop_connections()`, `.truncate_oplog()`, `.enable_pre_images(db, coll)`."""
    server = ThreadedMongoTestServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mongo_server_session() -> Iterator[ThreadedMongoTestServer]:
    """One test server for a whole session (tests must use their own database names)."""
    server = ThreadedMongoTestServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def real_mongo_url() -> str:
    """RT_TEST_MONGO_URL (a real replica set), or skip."""
    url = os.environ.get("RT_TEST_MONGO_URL", "")
    if not url:
        pytest.skip("RT_TEST_MONGO_URL is not set (a real MongoDB replica set)")
    return url


class CollectingSink:
    """A real EventSink for source tests: keeps what it is given, numbered like a history."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.gaps: list[tuple[str, str, str]] = []
        self._changed = asyncio.Condition()

    async def publish(self, event: Any) -> int:
        async with self._changed:
            self.events.append(event)
            self._changed.notify_all()
        return len(self.events)

    def history_gap(self, workspace: str, source: str, reason: str) -> None:
        self.gaps.append((workspace, source, reason))

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Any]:
        """The first `count` events, waiting for them to arrive."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(self.events) >= count), timeout)
        return self.events[:count]

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(e.body) for e in self.events]


@pytest.fixture
def collecting_sink() -> CollectingSink:
    return CollectingSink()
