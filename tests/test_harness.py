"""The harness itself: what its fixtures promise the tests that use them."""

from __future__ import annotations

import json
import pathlib

import pytest

pytestmark = pytest.mark.postgres

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Wraps the two services a gateway reads: at their teardown, says which gateways still ran.
_CONFTEST = '''
import json, os, pytest
pytest_plugins = {plugins!r}

def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True

def _note(service):
    with open("pids.json") as fh:
        pids = json.load(fh)
    with open(service + ".json", "w") as fh:
        json.dump([pid for pid in pids if _alive(pid)], fh)

@pytest.fixture
def pg_database(pg_database):
    yield pg_database
    _note("pg_database")

@pytest.fixture
def mongo_server(mongo_server):
    yield mongo_server
    _note("mongo_server")
'''

# The gateway factory asked for first: set up first, it was torn down last, after the services.
_TEST = '''
import json

async def test_gateway_on_both(gateway_factory, pg_database, mongo_server):
    gw = await gateway_factory(env={"RT_POSTGRES_URL": pg_database, "RT_MONGO_URL": mongo_server.url})
    with open("pids.json", "w") as fh:
        json.dump([gw.proc.pid], fh)
'''


def test_services_outlive_the_gateways_using_them(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """A service fixture (a database, a MongoDB test server) was torn down while a gateway of
    gateway_factory still read it, whenever the test asked for gateway_factory first: CI failed
    on a database dropped under a live replication slot, and a gateway's shutdown waited 2 s on
    a MongoDB server already gone. Gateways now stop before the services they read."""
    plugins = sorted(f"tests.harness.{p.stem}" for p in (ROOT / "tests" / "harness").glob("fixtures_*.py"))
    pytester.makeconftest(_CONFTEST.format(plugins=plugins))
    pytester.makepyfile(test_inner=_TEST)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-o", "asyncio_mode=auto",
                                           "-o", "asyncio_default_fixture_loop_scope=function", timeout=180)
    result.assert_outcomes(passed=1)
    for service in ("pg_database", "mongo_server"):
        still = json.loads((pytester.path / f"{service}.json").read_text())
        assert still == [], f"{service} torn down while gateway {still} still ran"
