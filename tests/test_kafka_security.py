"""SASL and TLS to Kafka against a real broker (the harness's SASL_PLAINTEXT, SSL, SASL_SSL,
MTLS (client certificate required) and short-session REAUTH listeners): the audit trail of a real
gateway process, the scale-out bus (which shares the [audit] client settings), what an operator
sees when the password, the CA, the certificate's name, the client certificate or the protocol is
wrong or a credential is revoked while running, sessions
the broker ends, and closing TLS connections under uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid

import pytest

from rtserver.audit import EVENTS
from tests.harness.certs import self_signed
from tests.harness.fixtures_gateway import free_port
from tests.harness.kafka import REAUTH_MS, SASL_PASSWORD, SASL_USER, TopicReader, create_topics
from tests.harness.wsclient import ws_connect

pytestmark = pytest.mark.kafka


def secured(broker, protocol: str, mechanism: str = "", password: str = SASL_PASSWORD, cafile: str = "") -> dict:
    """The RT_KAFKA_* settings of a client of `broker`'s `protocol` listener. "MTLS": SSL to
    the listener requiring a client certificate, with the harness's (signed by its CA)."""
    if protocol == "MTLS":
        return {"RT_KAFKA_BOOTSTRAP": broker.mtls_bootstrap, "RT_KAFKA_SECURITY_PROTOCOL": "SSL",
                "RT_KAFKA_SSL_CAFILE": broker.ca_file, "RT_KAFKA_SSL_CERTFILE": broker.client_cert,
                "RT_KAFKA_SSL_KEYFILE": broker.client_key}
    bootstrap = {"SASL_PLAINTEXT": broker.sasl_bootstrap, "SSL": broker.ssl_bootstrap,
                 "SASL_SSL": broker.sasl_ssl_bootstrap}[protocol]
    env = {"RT_KAFKA_BOOTSTRAP": bootstrap, "RT_KAFKA_SECURITY_PROTOCOL": protocol}
    if mechanism:
        env.update(RT_KAFKA_SASL_MECHANISM=mechanism, RT_KAFKA_SASL_USERNAME=SASL_USER,
                   RT_KAFKA_SASL_PASSWORD=password)
    if cafile:
        env["RT_KAFKA_SSL_CAFILE"] = cafile
    return env


async def audited(gateway_factory, broker, env: dict):
    prefix = f"s{uuid.uuid4().hex[:10]}.console.realtime."
    topics = [prefix + e for e in EVENTS]
    await create_topics(broker.bootstrap, topics)  # the harness's own PLAINTEXT listener
    gw = await gateway_factory(env={"RT_AUDIT_TOPIC_PREFIX": prefix, "RT_NODE": "gw-sec", **env})
    return gw, prefix, topics


async def granted(gw, subject: str) -> str:
    async with ws_connect(gw, "w1", token=gw.token("w1", sub=subject)) as c:
        await c.send({"type": "auth", "token": gw.token("w1", sub=subject)})
        return (await c.recv_type("auth_ok"))["sessionId"]


async def audit_status(gw) -> dict:
    _, body = await gw.get("/readyz")
    return json.loads(body)["audit"]


def key_lines(path: str) -> list[str]:
    """The base64 lines of a PEM private key (what must never reach a log)."""
    with open(path) as fh:
        return [line for line in fh.read().splitlines() if line and not line.startswith("-----")]


def assert_no_secret(gw, logs: str | None = None) -> None:
    """Neither the SASL password nor (any line of) the client's private key is in `gw`'s log
    (or `logs`, another process's with the same settings)."""
    logs = gw.logs() if logs is None else logs
    assert SASL_PASSWORD not in logs, "the SASL password is in the log"
    if keyfile := gw.env.get("RT_KAFKA_SSL_KEYFILE"):
        assert not any(line in logs for line in key_lines(keyfile)), "the client's private key is in the log"


@pytest.mark.parametrize(("protocol", "mechanism"), [
    ("SASL_PLAINTEXT", "PLAIN"),
    ("SASL_PLAINTEXT", "SCRAM-SHA-256"),
    ("SASL_PLAINTEXT", "SCRAM-SHA-512"),  # the SCRAM of Amazon MSK
    ("SSL", ""),
    ("SASL_SSL", "SCRAM-SHA-256"),
    ("MTLS", ""),  # a client certificate, as MSK's and Strimzi's `tls` authentication require
])
async def test_the_audit_trail_reaches_a_secured_listener(gateway_factory, kafka_broker, protocol, mechanism):
    cafile = kafka_broker.ca_file if protocol.endswith("SSL") else ""
    gw, prefix, topics = await audited(gateway_factory, kafka_broker,
                                       secured(kafka_broker, protocol, mechanism, cafile=cafile))
    async with TopicReader(kafka_broker.bootstrap, topics) as reader:
        session = await granted(gw, f"alice-{protocol}-{mechanism}")
        await reader.wait_for(lambda ms: any(m.topic == prefix + "auth-granted" for m in ms), timeout=30)
    record = json.loads(next(m.value for m in reader.messages if m.topic == prefix + "auth-granted"))
    assert record["sessionId"] == session and record["subject"] == f"alice-{protocol}-{mechanism}"
    # A record is readable before the broker's acknowledgement reaches the gateway.
    status = await audit_status(gw)
    for _ in range(100):
        if status["connected"]:
            break
        await asyncio.sleep(0.1)
        status = await audit_status(gw)
    assert status["connected"] is True and status["lost"] == 0, status
    assert await gw.stop() == 0
    assert_no_secret(gw)



@pytest.mark.parametrize(("protocol", "mechanism"), [("SASL_PLAINTEXT", "SCRAM-SHA-256"), ("SASL_SSL", "SCRAM-SHA-512"),
                                                     ("MTLS", "")])
async def test_the_event_bus_runs_over_sasl_or_mutual_tls(kafka_broker, pg_database, gateway_factory, protocol,
                                                          mechanism):
    """An ingest and a gateway node whose bus is a SASL listener, or one requiring a client
    certificate (the admin client creating the topic, producers, consumers, the lease's group):
    an event published on the node and a row change reach a client through Kafka."""
    import asyncpg

    from tests.test_scaleout import IngestProcess, events, subscribed_client, wait_ready

    db = await asyncpg.connect(pg_database)
    await db.execute("CREATE TABLE orders (id int PRIMARY KEY, note text)")
    sec = secured(kafka_broker, protocol, mechanism, cafile=kafka_broker.ca_file if protocol == "SASL_SSL" else "")
    env = {"RT_BUS": "kafka", "RT_BUS_KAFKA_BOOTSTRAP": sec.pop("RT_KAFKA_BOOTSTRAP"), **sec,
           "RT_BUS_TOPIC": f"rt.events.{uuid.uuid4().hex[:8]}", "RT_BUS_PARTITIONS": "1",
           "RT_BUS_WORKSPACES": "w1", "RT_POSTGRES_URL": pg_database, "RT_INSTANCE": "sasl", "RT_LOG_LEVEL": "info"}
    ingest = IngestProcess({**{k: v for k, v in os.environ.items() if not k.startswith("RT_")}, **env})
    try:
        await ingest.start()
        await ingest.wait_active()
        node = await gateway_factory(env=env)
        ready = await wait_ready(node)
        assert ready["bus"]["kind"] == "kafka", ready
        async with contextlib.AsyncExitStack() as stack:
            c = await subscribed_client(stack, node, "postgres:orders", "events:x")
            await db.execute("INSERT INTO orders VALUES (1, 'n')")
            published = await node.publish("w1", "x", {"n": 1})
            got = await events(c, 2)
        assert {e["channel"] for e in got} == {"postgres:orders", "events:x"}
        assert [e["seq"] for e in got if e["channel"] == "events:x"] == [published["seq"]]
        assert await node.stop() == 0
        await ingest.stop()  # SIGTERM: it stops by itself (SIGKILL after 15 s otherwise)
        assert ingest.proc.returncode == 0, ingest.logs()
        assert_no_secret(node)
        assert_no_secret(node, ingest.logs())
    finally:
        await ingest.stop(signal.SIGKILL)
        ingest.tmp.cleanup()
        await db.close()



async def logged(gw, text: str, timeout: float = 30) -> dict:
    """The first JSON log line of `gw` whose message holds `text` (waited for)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        for line in gw.logs().splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if text in rec.get("msg", ""):
                    return rec
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no log line with {text!r}:\n{gw.logs()}")
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
async def test_a_refused_password_is_named_and_the_records_wait_in_the_spool(gateway_factory, kafka_broker,
                                                                                mechanism):
    """A wrong audit.sasl_password: the gateway serves, says which setting Kafka refused (not
    "Unable to bootstrap", which reads like a broker that is down), /readyz and /metrics say
    the audit is not connected, SIGTERM stops it with the records spooled, and a restart with
    the right password delivers them."""
    wrong = "wrong-password-91c2"
    gw, prefix, topics = await audited(gateway_factory, kafka_broker, secured(
        kafka_broker, "SASL_PLAINTEXT", mechanism, password=wrong))
    session = await granted(gw, "bob")
    warning = await logged(gw, "audit: cannot deliver to Kafka")
    assert warning["level"] == "warning"
    assert "refused the SASL credentials" in warning["msg"] and "audit.sasl_password" in warning["msg"], warning
    assert f"{mechanism}, user '{SASL_USER}'" in warning["msg"], warning
    status = await audit_status(gw)
    assert status["connected"] is False and status["backlog"] >= 1 and status["lost"] == 0, status
    _, metrics = await gw.get("/metrics")
    assert b"\nrt_audit_connected 0\n" in metrics
    assert await gw.stop() == 0
    await logged(gw, "kept in the spool")
    assert wrong not in gw.logs()

    gw.env["RT_KAFKA_SASL_PASSWORD"] = SASL_PASSWORD
    async with TopicReader(kafka_broker.bootstrap, topics) as reader:
        await gw.start()
        await reader.wait_for(lambda ms: any(json.loads(m.value).get("sessionId") == session for m in ms))
    assert_no_secret(gw)



async def test_a_password_ending_in_a_newline_is_pointed_out(gateway_factory, kafka_broker):
    """A password read from a file (a Kubernetes secret made with --from-file, an env file) often
    ends with a newline nobody meant; the password is taken as given, so Kafka refuses it, and
    the warning says it ends with whitespace (without showing it)."""
    gw, _, _ = await audited(gateway_factory, kafka_broker, secured(
        kafka_broker, "SASL_PLAINTEXT", "SCRAM-SHA-512", password=SASL_PASSWORD + "\n"))
    await granted(gw, "erin")
    warning = await logged(gw, "audit: cannot deliver to Kafka")
    assert "audit.sasl_password ends with whitespace" in warning["msg"], warning
    assert await gw.stop() == 0
    assert_no_secret(gw)

async def test_an_untrusted_certificate_names_the_ca_file(gateway_factory, kafka_broker, tmp_path):
    other_ca, _ = self_signed(str(tmp_path))
    gw, _, _ = await audited(gateway_factory, kafka_broker, secured(kafka_broker, "SSL", cafile=other_ca))
    await granted(gw, "carol")
    warning = await logged(gw, "audit: cannot deliver to Kafka")
    assert "not trusted" in warning["msg"] and f"audit.ssl_cafile {other_ca}" in warning["msg"], warning
    assert (await audit_status(gw))["connected"] is False
    assert await gw.stop() == 0



def without_client_certificate(broker, client: str) -> dict:
    """MTLS settings with no client certificate ("none") or one from another CA ("foreign")."""
    env = secured(broker, "MTLS")
    if client == "none":
        del env["RT_KAFKA_SSL_CERTFILE"], env["RT_KAFKA_SSL_KEYFILE"]
    else:
        env.update(RT_KAFKA_SSL_CERTFILE=broker.foreign_client_cert, RT_KAFKA_SSL_KEYFILE=broker.foreign_client_key)
    return env


@pytest.mark.parametrize("client", ["none", "foreign"])
async def test_a_missing_or_refused_client_certificate_is_named(gateway_factory, kafka_broker, client):
    """A listener requiring a client certificate (mutual TLS) given none, or one signed by a CA
    the broker does not trust: the broker ends the connection at the first read, which read
    like a listener of another protocol. The warning says the broker refused the handshake and
    names audit.ssl_certfile/ssl_keyfile (and the certificate given); the key is in no log line."""
    gw, _, _ = await audited(gateway_factory, kafka_broker, without_client_certificate(kafka_broker, client))
    await granted(gw, f"grace-{client}")
    warning = await logged(gw, "audit: cannot deliver to Kafka")
    if client == "none":
        assert "refused the TLS handshake" in warning["msg"], warning
        assert "requires a client certificate" in warning["msg"], warning
        assert "audit.ssl_certfile and audit.ssl_keyfile" in warning["msg"], warning
    else:
        assert f"refused the client certificate audit.ssl_certfile {kafka_broker.foreign_client_cert}" in \
            warning["msg"], warning
    assert (await audit_status(gw))["connected"] is False
    assert await gw.stop() == 0
    assert_no_secret(gw)


async def test_a_certificate_for_another_name_is_named(gateway_factory, kafka_broker):
    """The SASL_SSL listener's certificate names localhost only: reached as 127.0.0.1 (an IP
    address, a load balancer's name), the warning says the certificate is not for that address,
    not that the CA is wrong."""
    env = secured(kafka_broker, "SASL_SSL", "SCRAM-SHA-256", cafile=kafka_broker.ca_file)
    env["RT_KAFKA_BOOTSTRAP"] = env["RT_KAFKA_BOOTSTRAP"].replace("localhost:", "127.0.0.1:")
    gw, _, _ = await audited(gateway_factory, kafka_broker, env)
    await granted(gw, "dave")
    warning = await logged(gw, "audit: cannot deliver to Kafka")
    assert "is not for 127.0.0.1" in warning["msg"] and "audit.kafka_bootstrap" in warning["msg"], warning
    assert await gw.stop() == 0
    assert_no_secret(gw)


@pytest.mark.parametrize(("protocol", "listener"), [
    ("PLAINTEXT", "sasl_bootstrap"),  # security_protocol forgotten
    ("SASL_PLAINTEXT", "sasl_ssl_bootstrap"),  # TLS forgotten
    ("SSL", "bootstrap"),  # a plaintext port given for a TLS one
])
async def test_a_listener_of_another_protocol_is_named(gateway_factory, kafka_broker, protocol, listener):
    env = secured(kafka_broker, "SASL_PLAINTEXT" if protocol == "SASL_PLAINTEXT" else "SSL",
                  "PLAIN" if protocol == "SASL_PLAINTEXT" else "", cafile=kafka_broker.ca_file if protocol == "SSL" else "")
    env.update(RT_KAFKA_BOOTSTRAP=getattr(kafka_broker, listener), RT_KAFKA_SECURITY_PROTOCOL=protocol)
    gw, _, _ = await audited(gateway_factory, kafka_broker, env)
    await granted(gw, "frank")
    warning = await logged(gw, "audit: cannot deliver to Kafka")
    assert f"audit.security_protocol is {protocol}; does that listener expect another one" in warning["msg"], warning
    assert await gw.stop() == 0

async def test_a_bus_node_or_ingest_refused_by_kafka_at_start_names_the_setting(kafka_broker, tmp_path):
    """A wrong password or CA, or a client certificate missing or refused, on the bus stops
    `serve` and `ingest` at start (exit 2) with one line naming the [audit] setting to fix; it named bus.kafka_bootstrap with aiokafka's
    "Unable to bootstrap", as if the address were wrong or Kafka down."""
    from tests.test_lifecycle import _run

    wrong = "wrong-password-5e07"
    other_ca, _ = self_signed(str(tmp_path))
    cases = [(secured(kafka_broker, "SASL_PLAINTEXT", "SCRAM-SHA-256", password=wrong), "audit.sasl_password"),
             (secured(kafka_broker, "SSL", cafile=other_ca), f"audit.ssl_cafile {other_ca}"),
             (without_client_certificate(kafka_broker, "none"), "requires a client certificate"),
             (without_client_certificate(kafka_broker, "foreign"),
              f"refused the client certificate audit.ssl_certfile {kafka_broker.foreign_client_cert}")]
    for sec, named in cases:
        env = {"RT_BUS": "kafka", "RT_BUS_KAFKA_BOOTSTRAP": sec.pop("RT_KAFKA_BOOTSTRAP"), **sec,
               "RT_BUS_TOPIC": f"rt.events.{uuid.uuid4().hex[:8]}", "RT_PORT": str(free_port()),
               "RT_STATE_DIR": str(tmp_path),
               # a feed: an ingest with none stops before it reaches Kafka
               "RT_POSTGRES_URL": "postgresql://rt@127.0.0.1:9/app", "RT_BUS_WORKSPACES": "w1"}
        for args in (["serve"], ["ingest"]):
            out = await asyncio.to_thread(_run, args, env, str(tmp_path))
            problems = [line for line in out.stderr.splitlines() if not line.startswith("{")]
            assert out.returncode == 2 and len(problems) == 1, out.stderr
            assert named in problems[0] and "(bus.kafka_bootstrap)" in problems[0], out.stderr
            assert wrong not in out.stderr
            assert not any(line in out.stderr for line in key_lines(kafka_broker.foreign_client_key))


async def test_sessions_the_broker_expires_cost_no_event_record_or_lease(kafka_broker, pg_database, gateway_factory):
    """A listener with a SASL session lifetime (connections.max.reauth.ms, which a managed
    cluster may set): the broker closes each connection used past it, since aiokafka never
    re-authenticates. Over several lifetimes, with an ingest, a node and its audit trail all on
    it: every publish is accepted, every event and row change reaches the client once and in
    order, every audit record arrives, and the ingest keeps its lease."""
    import asyncpg

    from tests.test_scaleout import IngestProcess, events, subscribed_client, wait_ready

    db = await asyncpg.connect(pg_database)
    await db.execute("CREATE TABLE orders (id int PRIMARY KEY, note text)")
    sec = secured(kafka_broker, "SASL_PLAINTEXT", "SCRAM-SHA-256")
    sec["RT_KAFKA_BOOTSTRAP"] = kafka_broker.reauth_bootstrap
    prefix = f"r{uuid.uuid4().hex[:10]}.console.realtime."
    topics = [prefix + e for e in EVENTS]
    await create_topics(kafka_broker.bootstrap, topics)
    env = {"RT_BUS": "kafka", "RT_BUS_KAFKA_BOOTSTRAP": kafka_broker.reauth_bootstrap, **sec,
           "RT_BUS_TOPIC": f"rt.events.{uuid.uuid4().hex[:8]}", "RT_BUS_PARTITIONS": "1",
           "RT_BUS_WORKSPACES": "w1", "RT_POSTGRES_URL": pg_database, "RT_INSTANCE": "reauth",
           "RT_AUDIT_TOPIC_PREFIX": prefix, "RT_LOG_LEVEL": "info"}
    ingest = IngestProcess({**{k: v for k, v in os.environ.items() if not k.startswith("RT_")}, **env})
    try:
        await ingest.start()
        await ingest.wait_active()
        node = await gateway_factory(env=env)
        await wait_ready(node)
        rounds = 4 * REAUTH_MS // 250
        async with contextlib.AsyncExitStack() as stack, TopicReader(kafka_broker.bootstrap, topics) as reader:
            c = await subscribed_client(stack, node, "postgres:orders", "events:x")
            for i in range(rounds):
                await node.publish("w1", "x", {"n": i})  # asserts 202
                await db.execute("INSERT INTO orders VALUES ($1, 'n')", i)
                if i % 4 == 0:
                    await granted(node, f"user-{i}")
                await asyncio.sleep(0.25)
            got = await events(c, 2 * rounds, timeout=30)
            await reader.wait_for(lambda ms: sum(m.topic == prefix + "auth-granted" for m in ms) >= rounds // 4 + 1)
        assert [e["payload"]["n"] for e in got if e["channel"] == "events:x"] == list(range(rounds))
        assert [e["record"]["id"] for e in got if e["channel"] == "postgres:orders"] == list(range(rounds))
        assert (await ingest.status())["role"] == "active"
        assert ingest.logs().count('"lease acquired"') == 1, ingest.logs()
        assert (await audit_status(node))["lost"] == 0
        # Nothing for an operator to look into: no "bus: Kafka ... unavailable", no lease lost.
        noise = [line for line in (node.logs() + ingest.logs()).splitlines()
                 if '"level":"warning"' in line or '"level":"error"' in line]
        assert not noise, noise
    finally:
        await ingest.stop(signal.SIGKILL)
        ingest.tmp.cleanup()
        await db.close()



async def test_a_password_revoked_while_running_is_named_and_the_trail_resumes_when_restored(gateway_factory,
                                                                                            kafka_broker):
    """The SCRAM credential removed while the gateway runs (a rotation done in the wrong order, a
    revoked key): once the broker ends the session, the audit's warning names the refused
    credentials; it said only "1 records waiting for acks", then nothing more. Restored, the
    trail resumes by itself, the waiting record included."""
    user, password = f"rot-{uuid.uuid4().hex[:6]}", "rotated-pw-77aa"
    await asyncio.to_thread(kafka_broker.set_scram, user, password)
    gw, prefix, topics = await audited(gateway_factory, kafka_broker, {
        "RT_KAFKA_BOOTSTRAP": kafka_broker.reauth_bootstrap, "RT_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "RT_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256", "RT_KAFKA_SASL_USERNAME": user, "RT_KAFKA_SASL_PASSWORD": password})
    async with TopicReader(kafka_broker.bootstrap, topics) as reader:
        first = await granted(gw, "before")
        await reader.wait_for(lambda ms: any(json.loads(m.value).get("sessionId") == first for m in ms))
        await asyncio.to_thread(kafka_broker.set_scram, user, None)
        await asyncio.sleep(REAUTH_MS / 1000)  # the session the gateway holds ends
        second = await granted(gw, "after")
        warning = await logged(gw, "audit: cannot deliver to Kafka")
        assert "refused the SASL credentials" in warning["msg"] and f"user '{user}'" in warning["msg"], warning
        assert (await audit_status(gw))["connected"] is False
        await asyncio.to_thread(kafka_broker.set_scram, user, password)
        await reader.wait_for(lambda ms: any(json.loads(m.value).get("sessionId") == second for m in ms), timeout=60)
    for _ in range(100):  # acknowledged just after the reader sees it
        if (await audit_status(gw))["connected"]:
            break
        await asyncio.sleep(0.1)
    assert (await audit_status(gw))["connected"] is True
    assert password not in gw.logs()


async def test_a_bus_password_revoked_while_running_is_named_and_the_node_recovers(gateway_factory, kafka_broker):
    """The same on the bus: once the broker ends the node's session, the node is not ready and
    answers publishes 503, and its warning names the refused credentials (it said "no broker
    answered a metadata request", as for a broker that is down). Restored, it recovers by itself."""
    from tests.test_scaleout import wait_ready

    user, password = f"bus-{uuid.uuid4().hex[:6]}", "bus-pw-31d4"
    await asyncio.to_thread(kafka_broker.set_scram, user, password)
    node = await gateway_factory(env={
        "RT_BUS": "kafka", "RT_BUS_KAFKA_BOOTSTRAP": kafka_broker.reauth_bootstrap,
        "RT_BUS_TOPIC": f"rt.events.{uuid.uuid4().hex[:8]}", "RT_BUS_PARTITIONS": "1",
        "RT_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "RT_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        "RT_KAFKA_SASL_USERNAME": user, "RT_KAFKA_SASL_PASSWORD": password})
    await wait_ready(node)
    await node.publish("w1", "x", {"n": 1})
    await asyncio.to_thread(kafka_broker.set_scram, user, None)
    warning = await logged(node, "bus: Kafka at")
    assert "refused the SASL credentials" in warning["msg"] and f"user '{user}'" in warning["msg"], warning
    status, _ = await node.get("/readyz")
    assert status == 503
    await asyncio.to_thread(kafka_broker.set_scram, user, password)
    await wait_ready(node)
    await node.publish("w1", "x", {"n": 2})
    assert password not in node.logs()


async def test_a_publisher_refused_for_kafka_is_not_told_its_brokers_or_credentials(gateway_factory, kafka_broker):
    """While Kafka refused the node (its SASL credentials revoked), a publish's 503 said why as
    /readyz does: 'event bus unavailable (Kafka at 127.0.0.1:P unavailable for topic T: no
    broker answered a metadata request)', the brokers' hosts and ports told to the publisher
    of any workspace, where a WebSocket upgrade refused then is told only that the node is cut
    off, and a client only the kind of a database's error. The 503 says the bus is unavailable
    and the event not published; the log (which names the refused SASL user) and /readyz keep
    the cause."""
    from tests.test_scaleout import wait_ready

    user, password = f"bus-{uuid.uuid4().hex[:6]}", "bus-pw-52e1"
    await asyncio.to_thread(kafka_broker.set_scram, user, password)
    node = await gateway_factory(env={
        "RT_BUS": "kafka", "RT_BUS_KAFKA_BOOTSTRAP": kafka_broker.reauth_bootstrap,
        "RT_BUS_TOPIC": f"rt.events.{uuid.uuid4().hex[:8]}", "RT_BUS_PARTITIONS": "1",
        "RT_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "RT_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        "RT_KAFKA_SASL_USERNAME": user, "RT_KAFKA_SASL_PASSWORD": password})
    await wait_ready(node)
    await node.publish("w1", "x", {"n": 1})
    await asyncio.to_thread(kafka_broker.set_scram, user, None)
    try:
        await logged(node, "bus: Kafka at")
        headers = {"Authorization": f"Bearer {node.token('w1', publish=True)}", "Content-Type": "application/json"}
        answers = [await node.post("/workspaces/w1/realtime/events/x", b'{"n":2}', headers),
                   await node.post("/workspaces/w1/realtime/events", b'{"events":[{"topic":"x","payload":3}]}', headers)]
        host = kafka_broker.reauth_bootstrap.rpartition(":")[0]
        for status, body in answers:
            assert status == 503 and b"event bus unavailable" in body, (status, body)
            for told in (user, host, "SASL", "sasl_username"):
                assert told.encode() not in body, (told, body)
        _, ready = await node.get("/readyz")
        assert f"Kafka at {kafka_broker.reauth_bootstrap}" in json.loads(ready)["bus"]["last_error"], ready
    finally:
        await asyncio.to_thread(kafka_broker.set_scram, user, password)
    await wait_ready(node)
    await node.publish("w1", "x", {"n": 4})


def test_closing_a_kafka_client_over_tls_under_uvloop_does_not_wait_30_seconds(kafka_broker, tmp_path):
    """uvloop's TLS transport does not read while it shuts down (MagicStack/uvloop#471): a
    response arriving after close() (a consumer's fetch was in flight) left it waiting 30 s
    (its ssl_shutdown_timeout) for the broker's close_notify. aiokafka awaits that closure in
    stop(): an ingest taking over over SSL/SASL_SSL sat for 30 s after its scan of the topic
    before reading its feeds, about one takeover in three. The bus's clients (client_options)
    now abort a TLS connection still closing after a grace period."""
    import uvloop
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from rtserver.bus_kafka import client_options, stop_client
    from tests.test_churn import _cfg

    cfg = _cfg(tmp_path, RT_BUS="kafka", **secured(kafka_broker, "SSL", cafile=kafka_broker.ca_file))

    async def scans() -> None:
        options = await client_options(cfg)
        await create_topics(kafka_broker.bootstrap, [topic := f"scan.{uuid.uuid4().hex[:8]}"])
        for _ in range(20):  # as the ingest's takeover scan: assigned, offsets read, paused
            consumer = AIOKafkaConsumer(**options, group_id=None, enable_auto_commit=False,
                                        isolation_level="read_committed", fetch_max_wait_ms=100)
            await consumer.start()
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.beginning_offsets([tp])
            await consumer.end_offsets([tp])
            await consumer.offsets_for_times({tp: int((time.time() - 60) * 1000)})
            consumer.pause(tp)
            await asyncio.wait_for(stop_client(consumer, "scan", {}), 10)  # raises TimeoutError if stuck

    uvloop.run(scans())
