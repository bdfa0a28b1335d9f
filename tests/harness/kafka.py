"""A throwaway Apache Kafka broker (KRaft, combined broker+controller) for the tests.

The jars come from Maven Central via tests/kafka/pom.xml (scripts/test.d/kafka.sh caches them
in tests/kafka/target/jars; this module runs that script when the cache is missing). The broker
listens on random loopback ports, keeps its data in a temporary directory, and can be stopped
and started again on the same ports and data for outage tests.

Besides its PLAINTEXT listener (`bootstrap`) it has a second one, PROXIED, listening on
`proxied_port` but advertising `proxied_bootstrap` (another loopback port, reserved here, where
nothing listens until a test starts a `TcpProxy(broker.proxied_port).start(port=...)` on it):
a client bootstrapped there is told the broker lives there, so all of its traffic (metadata,
produce, group coordination, fetches) goes through the proxy, and a test can cut off that one
client while every other client reaches the broker directly.

Secured listeners, as managed clusters (Confluent Cloud, MSK, Strimzi) offer them, each with its
bootstrap address on the broker: `sasl_bootstrap` (SASL_PLAINTEXT), `ssl_bootstrap` (SSL) and
`sasl_ssl_bootstrap` (SASL_SSL). The SASL ones take PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 for the user
`SASL_USER` with `SASL_PASSWORD` (the SCRAM credentials are written into the log directory at
format time, as `kafka-storage format --add-scram` does). The SSL ones present a certificate
signed by a CA made at construction, whose PEM file `ca_file` is what a client trusts: the SSL
listener's names 127.0.0.1 and localhost, the SASL_SSL listener's only localhost (it is
advertised, and `sasl_ssl_bootstrap` given, as localhost; reached as 127.0.0.1, the certificate
does not match the address).
`mtls_bootstrap` is SSL requiring a client certificate signed by that CA (ssl.client.auth=required
on that listener only, as MSK's and Strimzi's `tls` authentication): `client_cert` and
`client_key` are one; `foreign_client_cert` and `foreign_client_key` one from another CA.
`reauth_bootstrap` is SASL_PLAINTEXT (SCRAM-SHA-256) with a session lifetime of
`REAUTH_MS` (connections.max.reauth.ms, which a managed cluster may set): the broker
closes a connection used after it without re-authenticating, which aiokafka never does.

Also here: `TopicReader`, a real aiokafka consumer that collects what the audit wrote.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

from tests.harness.certs import ca_and_leaves
from tests.harness.ports import free_ports

ROOT = Path(__file__).resolve().parents[2]
FETCH_SCRIPT = ROOT / "scripts" / "test.d" / "kafka.sh"


SASL_USER = "rt"
SASL_PASSWORD = "rt-kafka+secret/3f9a"  # as cloud API secrets are (+ and /); checked to reach no log line


REAUTH_MS = 2000


class KafkaHarnessError(RuntimeError):
    """The test broker could not be provided (missing Java/Maven, failed start)."""


def jars_dir() -> Path:
    return Path(os.environ.get("RT_KAFKA_JARS") or ROOT / "tests" / "kafka" / "target" / "jars")


def ensure_jars() -> Path:
    """The directory holding the broker's jars, fetching them first when needed."""
    for tool in ("java", "mvn"):
        if shutil.which(tool) is None:
            raise KafkaHarnessError(
                f"{tool} not found on PATH: the Kafka test broker needs Java 17+ and Maven "
                "(Debian: apt-get install openjdk-17-jre-headless maven)"
            )
    # The script is a no-op when the cache matches the pom.
    proc = subprocess.run(["bash", str(FETCH_SCRIPT)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise KafkaHarnessError(f"{FETCH_SCRIPT} failed:\n{proc.stderr.strip()}")
    path = jars_dir()
    if not any(path.glob("kafka_2.13-*.jar")):
        raise KafkaHarnessError(f"no kafka_2.13 jar in {path} after {FETCH_SCRIPT}")
    return path


_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.server.name = org.apache.kafka.server
logger.server.level = INFO
"""


def _cluster_id() -> str:
    """A random KRaft cluster id. Like Kafka's own Uuid.randomUuid, never one starting with "-":
    the storage tool's argument parser would take it for an option (1 run in 64 failed so)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


class KafkaBroker:
    """One KRaft node (broker + controller) on 127.0.0.1; `bootstrap` is its client address,
    `proxied_bootstrap` its address through a test's TCP proxy to `proxied_port` (module doc)."""

    def __init__(self, jars: Path, heap_mb: int = 384, overrides: dict[str, str] | None = None):
        self.jars = jars
        self.overrides = dict(overrides or {})  # broker properties over the harness's own
        self.heap_mb = min(heap_mb, 512)
        self.dir = Path(tempfile.mkdtemp(prefix="rt-kafka-"))
        self.data_dir = self.dir / "data"
        self.log_path = self.dir / "broker.log"
        (self.port, self.controller_port, self.proxied_port, self.proxy_port,
         self.sasl_port, self.ssl_port, self.sasl_ssl_port, self.reauth_port, self.mtls_port) = free_ports(9)
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.sasl_bootstrap = f"127.0.0.1:{self.sasl_port}"
        self.ssl_bootstrap = f"127.0.0.1:{self.ssl_port}"
        self.sasl_ssl_bootstrap = f"localhost:{self.sasl_ssl_port}"
        self.reauth_bootstrap = f"127.0.0.1:{self.reauth_port}"
        self.mtls_bootstrap = f"127.0.0.1:{self.mtls_port}"
        tls_dir = self.dir / "tls"
        tls_dir.mkdir()
        # Key and certificate in one PEM file per listener: Kafka's PEM keystore.
        self.ca_file, self.keystores = ca_and_leaves(str(tls_dir), {"ssl": ["127.0.0.1", "localhost"],
                                                                    "sasl_ssl": ["localhost"]},
                                                     clients=("rtserver-client",))
        self.client_cert = self.keystores["rtserver-client"]
        self.client_key = self.client_cert.removesuffix(".crt") + ".key"
        foreign_dir = tls_dir / "foreign"
        foreign_dir.mkdir()
        _, foreign = ca_and_leaves(str(foreign_dir), {}, clients=("intruder",))
        self.foreign_client_cert = foreign["intruder"]
        self.foreign_client_key = self.foreign_client_cert.removesuffix(".crt") + ".key"
        # The PROXIED listener listens on proxied_port and advertises proxy_port (see the module doc).
        self.proxied_bootstrap = f"127.0.0.1:{self.proxy_port}"
        self.cluster_id = _cluster_id()
        self._proc: subprocess.Popen | None = None
        self._formatted = False
        self._write_config()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start (or restart, same ports and data) and wait until it answers Kafka requests."""
        if self.running:
            return
        if not self._formatted:
            self._java("kafka.tools.StorageTool", "format", "-t", self.cluster_id, "-c", str(self.config_path),
                       "--add-scram", f"SCRAM-SHA-256=[name={SASL_USER},password={SASL_PASSWORD}]",
                       "--add-scram", f"SCRAM-SHA-512=[name={SASL_USER},password={SASL_PASSWORD}]")
            self._formatted = True
        out = open(self.dir / "stdout.log", "ab")
        try:
            self._proc = subprocess.Popen(
                self._java_cmd("kafka.Kafka", str(self.config_path)),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.dir,
            )
        finally:
            out.close()
        _live.add(self)
        self._wait_ready(timeout)

    def stop(self, kill: bool = False, timeout: float = 30.0) -> None:
        """Stop the broker: SIGTERM (controlled shutdown) or SIGKILL; data stays for `start()`."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._proc = None

    async def astop(self, kill: bool = False) -> None:
        """`stop()` without blocking the test's event loop."""
        await asyncio.to_thread(self.stop, kill)

    async def astart(self) -> None:
        """`start()` without blocking the test's event loop."""
        await asyncio.to_thread(self.start)

    def destroy(self) -> None:
        self.stop(kill=True)
        _live.discard(self)
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        chunks = []
        for name in ("stdout.log", "broker.log"):
            path = self.dir / name
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                chunks.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(chunks)

    def set_scram(self, user: str, password: str | None) -> None:
        """Create or change `user`'s SCRAM-SHA-256 credential, or remove it (None), on the running
        broker (kafka-configs --alter), as an operator rotating or revoking a password does."""
        change = (["--add-config", f"SCRAM-SHA-256=[iterations=4096,password={password}]"] if password is not None
                  else ["--delete-config", "SCRAM-SHA-256"])
        self._java("kafka.admin.ConfigCommand", "--bootstrap-server", self.bootstrap, "--alter", *change,
                   "--entity-type", "users", "--entity-name", user)

    # -- helpers ---------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.dir / "server.properties"

    def _write_config(self) -> None:
        plain = (f'org.apache.kafka.common.security.plain.PlainLoginModule required '
                 f'user_{SASL_USER}="{SASL_PASSWORD}";')
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        sasl = {}
        for name in ("sasl_plaintext", "sasl_ssl"):
            sasl[f"listener.name.{name}.plain.sasl.jaas.config"] = plain
            sasl[f"listener.name.{name}.scram-sha-256.sasl.jaas.config"] = scram
            sasl[f"listener.name.{name}.scram-sha-512.sasl.jaas.config"] = scram
        sasl["listener.name.reauth.sasl.enabled.mechanisms"] = "SCRAM-SHA-256"
        sasl["listener.name.reauth.scram-sha-256.sasl.jaas.config"] = scram
        sasl["listener.name.reauth.connections.max.reauth.ms"] = str(REAUTH_MS)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port},"
                         f"PROXIED://127.0.0.1:{self.proxied_port},{self._secured_listeners()}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port},PROXIED://127.0.0.1:{self.proxy_port},"
                                    f"{self._advertised_secured_listeners()}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,PROXIED:PLAINTEXT,"
                                              "SASL_PLAINTEXT:SASL_PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL,REAUTH:SASL_PLAINTEXT,"
                                              "MTLS:SSL",
            "sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
            **sasl,
            "ssl.keystore.type": "PEM",
            "listener.name.ssl.ssl.keystore.location": self.keystores["ssl"],
            "listener.name.sasl_ssl.ssl.keystore.location": self.keystores["sasl_ssl"],
            "ssl.client.auth": "none",
            "listener.name.mtls.ssl.keystore.location": self.keystores["ssl"],
            "listener.name.mtls.ssl.client.auth": "required",
            "listener.name.mtls.ssl.truststore.type": "PEM",
            "listener.name.mtls.ssl.truststore.location": self.ca_file,
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # How often the broker looks for transactions past their timeout and aborts them
            # (10 s by default): a test of such an abort waits for it, not for this period.
            "transaction.abort.timed.out.transaction.cleanup.interval.ms": "1000",
            # Few threads and small buffers: this broker shares 2 cores with the test suite.
            "num.network.threads": "2",
            "num.io.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            "background.threads": "2",
            "log.flush.interval.messages": "9223372036854775807",
            "controlled.shutdown.enable": "true",
        }
        props.update(self.overrides)
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.dir / "log4j2.properties").write_text(_LOG4J2.format(log=self.log_path))

    def _secured_listeners(self) -> str:
        return (f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port},SSL://127.0.0.1:{self.ssl_port},"
                f"SASL_SSL://127.0.0.1:{self.sasl_ssl_port},REAUTH://127.0.0.1:{self.reauth_port},"
                f"MTLS://127.0.0.1:{self.mtls_port}")

    def _advertised_secured_listeners(self) -> str:
        return self._secured_listeners().replace("SASL_SSL://127.0.0.1:", "SASL_SSL://localhost:")

    def _java_cmd(self, main: str, *args: str) -> list[str]:
        return [
            "java",
            f"-Xmx{self.heap_mb}m",
            "-Xms64m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",  # C1 only: faster start, plenty for a test broker
            "-Xshare:auto",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.dir}",
            "-cp",
            f"{self.jars}/*",
            main,
            *args,
        ]

    def _java(self, main: str, *args: str) -> None:
        proc = subprocess.run(self._java_cmd(main, *args), capture_output=True, text=True, cwd=self.dir)
        if proc.returncode != 0:
            raise KafkaHarnessError(f"{main} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise KafkaHarnessError(f"Kafka broker exited during start\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                # Accepting TCP is not enough: wait until a client gets metadata naming this broker.
                _run_async(self._metadata_ok())
                return
            except Exception as exc:
                last = exc
                time.sleep(0.2)
        raise KafkaHarnessError(f"Kafka broker not ready after {timeout}s: {last!r}\n{self.log_tail()}")

    async def _metadata_ok(self) -> None:
        from aiokafka import AIOKafkaClient

        client = AIOKafkaClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        try:
            await client.bootstrap()
            await client.force_metadata_update()
            if not client.cluster.brokers():
                raise KafkaHarnessError("metadata lists no broker yet")
        finally:
            await client.close()


def _run_async(coro) -> None:
    """Run a coroutine to completion on a private loop in a thread (callers may be inside a loop)."""
    result: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coro)
        except BaseException as exc:  # handed to the caller
            result.append(exc)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join()
    if result:
        raise result[0]


_live: set[KafkaBroker] = set()


@atexit.register
def _kill_leftovers() -> None:
    # An interrupted session must not leave a JVM behind.
    for broker in list(_live):
        with contextlib.suppress(Exception):
            broker.destroy()


async def create_topics(bootstrap: str, topics: list[str], partitions: int = 1) -> None:
    """Create topics up front (one partition: a total order the tests can assert)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics])
    finally:
        await admin.close()


class TopicReader:
    """Reads topics from the beginning with a real aiokafka consumer (no group) and keeps every message."""

    def __init__(self, bootstrap: str, topics: list[str]):
        self.bootstrap = bootstrap
        self.topics = topics
        self.messages: list = []  # aiokafka ConsumerRecord, in arrival order
        self._consumer = None

    async def __aenter__(self) -> TopicReader:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        await self._consumer.start()
        self._consumer.assign([TopicPartition(t, 0) for t in self.topics])
        return self

    async def __aexit__(self, *exc) -> None:
        await self._consumer.stop()

    async def poll(self, timeout: float = 0.5) -> None:
        batches = await self._consumer.getmany(timeout_ms=int(timeout * 1000))
        for records in batches.values():
            self.messages.extend(records)

    async def wait_for(self, predicate, timeout: float = 30.0) -> None:
        """Poll until `predicate(self.messages)` is true; AssertionError with what arrived otherwise."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate(self.messages):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s; {len(self.messages)} messages arrived on {self.topics}"
                )
            await self.poll()

    async def count_for(self, seconds: float) -> None:
        """Keep polling for a while (to catch duplicates that would arrive late)."""
        deadline = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < deadline:
            await self.poll(0.2)
