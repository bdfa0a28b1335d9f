"""Connection strings in logs, /readyz and metric labels never carry their secrets."""

from __future__ import annotations

import asyncio
import json

import pytest

from rtserver.redact import redact
from tests.harness.prometheus import family_types
from tests.harness.wsclient import ws_connect


@pytest.mark.parametrize(("url", "expected"), [
    ("postgresql://rt:pw@db:5432/app?sslpassword=pw2&sslmode=require",
     "postgresql://***@db:5432/app?sslpassword=***&sslmode=require"),
    ("host=db port=5432 user=rt password=pw dbname=app", "host=db port=5432 user=rt password=*** dbname=app"),
    ("host=db password='p w\\' x' dbname=app", "host=db password=*** dbname=app"),
    ("mongodb://u:p@h1,h2/app?replicaSet=rs0&authMechanismProperties=AWS_SESSION_TOKEN:t",
     "mongodb://***@h1,h2/app?replicaSet=rs0&authMechanismProperties=***"),
    ("mongodb://h/app?tlsCertificateKeyFilePassword=pw&tls=true", "mongodb://h/app?tlsCertificateKeyFilePassword=***&tls=true"),
    ("postgresql://db/app", "postgresql://db/app"),
    # a JWKS URL behind a signed-URL or function-key gateway (Azure SAS, AWS SigV4, Azure Functions)
    ("https://idp.example/certs?sv=2022&sig=AbC%2Bd&se=2030", "https://idp.example/certs?sv=2022&sig=***&se=2030"),
    ("https://b.s3.amazonaws.com/jwks.json?X-Amz-Credential=AK%2F1&X-Amz-Signature=0f1e",
     "https://b.s3.amazonaws.com/jwks.json?X-Amz-Credential=***&X-Amz-Signature=***"),
    ("https://fn.azurewebsites.net/api/jwks?code=fnkey123", "https://fn.azurewebsites.net/api/jwks?code=***"),
    ("postgresql://db/app?client_encoding=UTF8", "postgresql://db/app?client_encoding=UTF8"),
    # short names of a password and of credentials; authSource names a database, not masked
    ("https://idp.example/certs?pwd=B2x&auth=B1x&v=1", "https://idp.example/certs?pwd=***&auth=***&v=1"),
    ("mongodb://h/app?authSource=admin&authMechanism=SCRAM-SHA-256",
     "mongodb://h/app?authSource=admin&authMechanism=SCRAM-SHA-256"),
])
def test_secrets_are_masked(url, expected):
    assert redact(url) == expected


async def test_no_database_secret_reaches_metrics_or_readiness(gateway_factory, tmp_path):
    # Unreachable databases, their passwords in a URL's user info, its query, a keyword/value
    # string: each database has its own /readyz entry, and no secret shows anywhere.
    config = tmp_path / "rt.toml"
    config.write_text("[workspaces.a]\npostgres_url = 'host=127.0.0.1 port=1 user=rt password=s3cret-c dbname=x'\n"
                      "[workspaces.b]\npostgres_url = 'postgresql://rt:s3cret-d@127.0.0.1:1/y'\n")
    gw = await gateway_factory(env={"RT_POSTGRES_URL": "postgresql://rt:s3cret-a@127.0.0.1:1/app?sslpassword=s3cret-b"},
                               args=["--config", str(config)])
    async with ws_connect(gw, "a", token=gw.token("a")), ws_connect(gw, "b", token=gw.token("b")):
        pass  # a granted workspace starts its sources
    _, metrics = await gw.get("/metrics")
    status, ready = await gw.get("/readyz")
    assert status == 503
    assert sorted(json.loads(ready)["sources"]) == [
        "postgres:host=127.0.0.1 port=1 user=rt password=*** dbname=x",
        "postgres:postgresql://***@127.0.0.1:1/app?sslpassword=***",
        "postgres:postgresql://***@127.0.0.1:1/y",
    ]
    for text in (metrics, ready, gw.logs().encode()):
        assert b"s3cret" not in text
    # Three sources' gauges: each family's samples stay together (the text format's rule).
    names = [line.split("{")[0].split(" ")[0] for line in metrics.decode().splitlines() if line and line[0] != "#"]
    runs = [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]
    assert len(runs) == len(set(runs)), [n for n in set(runs) if runs.count(n) > 1]
    assert names.count("rt_source_ready") == 3
    types = family_types(metrics.decode())
    for name in ("rt_source_events", "rt_source_transactions", "rt_source_duplicates_dropped",
                 "rt_source_slot_recreations", "rt_source_streamed_transactions"):
        assert types[name] == "counter", name
    assert types["rt_source_ready"] == types["rt_source_streamed_open"] == "gauge"


@pytest.mark.parametrize(("url", "expected"), [
    # libpq reads the user info up to the '@' before the first '/', pymongo up to the last '@'
    # before it: libpq takes a '#' or '?' in a password as written, pymongo a '#'.
    ("postgresql://rt:pa#ss@db/app", "postgresql://***@db/app"),
    ("postgresql://rt:pa?ss@db:5432/app?sslmode=require", "postgresql://***@db:5432/app?sslmode=require"),
    ("mongodb://rt:pa#ss@h1,h2/app?replicaSet=rs0", "mongodb://***@h1,h2/app?replicaSet=rs0"),
    ("mongodb://rt:pa#ss@h", "mongodb://***@h"),
    # libpq's unquoted keyword value: a backslash escapes the space that follows it
    ("host=db password=pa\\ ss dbname=app", "host=db password=*** dbname=app"),
    ("postgresql://db/app#x", "postgresql://db/app#x"),
    # a keyword/value string is no URL for holding "://" somewhere in a value
    ("host=db password=s3://cret dbname=app", "host=db password=*** dbname=app"),
    ("host=db application_name=https://app.example password=pw", "host=db application_name=https://app.example password=***"),
])
def test_secrets_with_url_delimiters_are_masked(url, expected):
    assert redact(url) == expected


async def test_a_parameter_name_written_percent_encoded_is_masked_everywhere(gateway_factory):
    """libpq percent-decodes a URL parameter's name as it does its value: `?p%61ssword=pw` is
    the password (and `sslp%61ssword` the key's passphrase). redact() matched the names as
    written, so /readyz, the rt_source_* labels and every log line about the source showed them."""
    assert redact("postgresql://db/app?p%61ssword=pw&a=1&sslp%61ssword=x") == \
        "postgresql://db/app?p%61ssword=***&a=1&sslp%61ssword=***"
    assert redact("https://idp/certs?next=/x?password=pw&%63ode=k") == "https://idp/certs?next=/x?password=***&%63ode=***"
    gw = await gateway_factory(env={"RT_POSTGRES_URL": "postgresql://rt@127.0.0.1:1/app?p%61ssword=s3cret-e"})
    await asyncio.sleep(0.5)  # a connection attempt or two, logged
    _, metrics = await gw.get("/metrics")
    status, ready = await gw.get("/readyz")
    assert status == 503
    assert list(json.loads(ready)["sources"]) == ["postgres:postgresql://***@127.0.0.1:1/app?p%61ssword=***"]
    assert "postgres source" in gw.logs()
    for text in (metrics, ready, gw.logs().encode()):
        assert b"s3cret" not in text


async def test_a_password_with_a_hash_sign_reaches_no_readiness_metric_or_log(gateway_factory):
    # The driver takes this password as written; /readyz, /metrics and the logs showed it.
    gw = await gateway_factory(env={"RT_MONGO_URL": "mongodb://rt:s3cret#y@127.0.0.1:1/app"})
    _, metrics = await gw.get("/metrics")
    status, ready = await gw.get("/readyz")
    assert status == 503
    assert json.loads(ready)["sources"]["mongo:app"]["url"] == "mongodb://***@127.0.0.1:1/app"
    for text in (metrics, ready, gw.logs().encode()):
        assert b"s3cret" not in text


@pytest.mark.postgres
@pytest.mark.parametrize("form", ["url", "keywords"])
async def test_a_connection_string_libpq_reads_streams_and_its_password_shows_nowhere(gateway_factory, pg_cluster,
                                                                                      pg_database, form):
    # libpq (the config check, the replication stream) takes both; the catalog's driver read the
    # '#' as a URL's fragment and said "invalid literal for int() with base 10: 's3cret'" in
    # /readyz and the logs, and refused keyword/value strings: the source was never ready.
    database = pg_database.rsplit("/", 1)[1]
    url = (f"postgresql://{pg_cluster.user}:s3cret#x@127.0.0.1:{pg_cluster.port}/{database}" if form == "url" else
           f"host=127.0.0.1 port={pg_cluster.port} user={pg_cluster.user} password=s3cret#x dbname={database}")
    gw = await gateway_factory(env={"RT_POSTGRES_URL": url, "RT_INSTANCE": "redact"})
    await gw.wait_ready()
    _, metrics = await gw.get("/metrics")
    _, ready = await gw.get("/readyz")
    for text in (metrics, ready, gw.logs().encode()):
        assert b"s3cret" not in text


async def test_each_postgres_source_says_which_database_its_log_lines_are_about(gateway_factory, tmp_path):
    # Two workspaces' databases, both unreachable: their lines said "postgres source:
    # ConnectionRefusedError" with an empty slot and nothing else telling them apart.
    config = tmp_path / "rt.toml"
    config.write_text("[workspaces.a]\npostgres_url = 'postgresql://rt:s3cret@127.0.0.1:1/x'\n"
                      "[workspaces.b]\npostgres_url = 'host=127.0.0.1 port=2 user=rt password=s3cret dbname=y'\n")
    gw = await gateway_factory(args=["--config", str(config)])
    async with ws_connect(gw, "a", token=gw.token("a")), ws_connect(gw, "b", token=gw.token("b")):
        pass  # a granted workspace starts its sources
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        lines = [json.loads(line) for line in gw.logs().splitlines()]
        failed = [rec for rec in lines if rec["msg"].startswith("postgres source: ")]
        urls = {rec.get("url") for rec in failed}
        if len(urls) >= 2 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)
    assert urls == {"postgresql://***@127.0.0.1:1/x", "host=127.0.0.1 port=2 user=rt password=*** dbname=y"}, failed
    assert "s3cret" not in gw.logs()


async def test_each_mongo_source_says_which_server_its_log_lines_are_about(gateway_factory, tmp_path):
    """Two workspaces' databases of one name on two servers, both unreachable: every line said
    'mongo change stream failed, retrying' with the database 'app' only, and an operator could
    not tell which server failed (the postgres source's lines carry their URL). They carry the
    URL too, redacted."""
    config = tmp_path / "rt.toml"
    config.write_text("[workspaces.a]\nmongo_url = 'mongodb://rt:s3cret@127.0.0.1:1/app?serverSelectionTimeoutMS=200'\n"
                      "[workspaces.b]\nmongo_url = 'mongodb://rt:s3cret@127.0.0.1:2/app?serverSelectionTimeoutMS=200'\n")
    gw = await gateway_factory(args=["--config", str(config)])
    async with ws_connect(gw, "a", token=gw.token("a")), ws_connect(gw, "b", token=gw.token("b")):
        pass  # a granted workspace starts its sources
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        lines = [json.loads(line) for line in gw.logs().splitlines()]
        failed = [rec for rec in lines if rec["msg"] == "mongo change stream failed, retrying"]
        urls = {rec.get("url") for rec in failed}
        if len(urls) >= 2 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)
    assert urls == {"mongodb://***@127.0.0.1:1/app?serverSelectionTimeoutMS=200",
                    "mongodb://***@127.0.0.1:2/app?serverSelectionTimeoutMS=200"}, failed
    assert {rec["database"] for rec in failed} == {"app"} and {rec["source"] for rec in failed} == {"mongo"}
    assert "s3cret" not in gw.logs()
