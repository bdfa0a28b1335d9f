"""pytest fixture `kafka_broker`: one Apache Kafka (KRaft) broker for the whole session.

Tests that stop it (outage tests) must start it again before they end; the fixture checks
that it is running at every use and restarts it if a test left it down.
"""

from __future__ import annotations

import pytest

from tests.harness.kafka import KafkaBroker, KafkaHarnessError, ensure_jars


@pytest.fixture(scope="session")
def _kafka_session():
    try:
        jars = ensure_jars()
        broker = KafkaBroker(jars)
        broker.start()
    except KafkaHarnessError as exc:
        pytest.fail(f"Kafka test broker unavailable: {exc}", pytrace=False)
    try:
        yield broker
    finally:
        broker.destroy()


@pytest.fixture
def kafka_broker(_kafka_session: KafkaBroker) -> KafkaBroker:
    """The session's broker, running: `.bootstrap`, `.stop()`/`.start()` (and `astop`/`astart`)."""
    if not _kafka_session.running:
        _kafka_session.start()
    yield _kafka_session
    if not _kafka_session.running:
        _kafka_session.start()
