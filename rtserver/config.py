"""Gateway configuration: defaults, then a TOML file, then RT_* environment variables, then CLI flags.

Every setting has one entry in `SETTINGS` (section, key, environment variable, type, default,
description); the README's configuration table is generated from the same list
(`rtserver config-table`), so the docs cannot drift from the code.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import ssl
import tomllib
import urllib.parse
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rtserver.redact import redact

WORKSPACE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")  # \Z: `$` would accept a trailing newline
# Kafka's rule for topic names (a producer sending to another name waits for metadata that never
# comes, then fails with an error naming neither the topic nor the setting).
_KAFKA_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}\Z")


# Room for a Kafka record batch's own framing above bus.max_record_bytes of value (rtserver.bus_kafka).
KAFKA_RECORD_OVERHEAD = 64 * 1024
# Kafka's max.message.bytes (the events topic's, sized from bus.max_record_bytes) is a 32-bit int.
_KAFKA_INT_MAX = (1 << 31) - 1


class ConfigError(Exception):
    """A configuration value is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    env: str
    kind: type
    default: Any
    help: str


def _list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]  # as the comma-separated form drops them
    raise ValueError("expected a list of strings or a comma-separated string")


SETTINGS: tuple[Setting, ...] = (
    Setting("server", "host", "RT_HOST", str, "127.0.0.1", "Address to listen on (the ingest's health port too)"),
    Setting("server", "port", "RT_PORT", int, 8080, "Port for WebSocket, publish API, health and metrics"),
    Setting("server", "tls_cert", "RT_TLS_CERT", str, "", "PEM certificate: serve wss:// and https:// (read at start: a renewed one takes a restart; the ingest's health port stays plain http)"),
    Setting("server", "tls_key", "RT_TLS_KEY", str, "", "PEM private key of tls_cert"),
    Setting("server", "state_dir", "RT_STATE_DIR", str, ".rtserver", "Local state: dev secret, source positions, audit spool, the workspaces a default change feed records into, sessions saved at shutdown, the seq reservation"),
    Setting("server", "instance", "RT_INSTANCE", str, "rtserver", "Instance name: replication slot and publication names derive from it (a lower-case letter or _, then lower-case letters, digits and _; 41 characters at most)"),
    Setting("server", "node", "RT_NODE", str, "", "Node name in logs and audit records (default: host name)"),
    Setting("server", "log_level", "RT_LOG_LEVEL", str, "info", "debug, info, warning or error (the audit records logged without Kafka are kept at any level)"),
    Setting("server", "demo", "RT_DEMO", bool, False, "Serve the demo page at /demo (`rtserver serve --demo`)"),
    Setting("server", "shutdown_timeout", "RT_SHUTDOWN_TIMEOUT", float, 10.0, "Seconds to drain on SIGTERM"),
    Setting("server", "gc_freeze", "RT_GC_FREEZE", bool, True, "After start-up and after each full garbage-collector pass, leave the survivors out of later passes (gc.freeze): passes stay short however many connections are open"),
    Setting("auth", "hs256_secret", "RT_AUTH_HS256_SECRET", str, "", "Shared secret for HS256 tokens (development, and services beside a JWKS URL); at least 32 bytes (RFC 7518), a shorter one is warned of at start"),
    Setting("auth", "jwks_url", "RT_AUTH_JWKS_URL", str, "", "JWKS URL, e.g. Keycloak's {issuer}/protocol/openid-connect/certs"),
    Setting("auth", "issuer", "RT_AUTH_ISSUER", str, "", "Required `iss` (checked when set)"),
    Setting("auth", "audience", "RT_AUTH_AUDIENCE", str, "", "Required `aud` or `azp` (checked when set)"),
    Setting("auth", "workspace_claim", "RT_AUTH_WORKSPACE_CLAIM", str, "workspaces", "Claim path listing granted workspaces (`*` = all)"),
    Setting("auth", "workspace_role_prefix", "RT_AUTH_WORKSPACE_ROLE_PREFIX", str, "", "Prefix of role names that grant a workspace, e.g. `workspace:`"),
    Setting("auth", "channel_permissions", "RT_AUTH_CHANNEL_PERMISSIONS", bool, False, "Check channel permissions: a subject may subscribe only to the channel patterns its token lists in auth.channel_claim"),
    Setting("auth", "channel_claim", "RT_AUTH_CHANNEL_CLAIM", str, "realtime_channels", "Claim (a dotted path) listing the channel patterns a subject may subscribe to, when auth.channel_permissions is on"),
    Setting("auth", "publish_claim", "RT_AUTH_PUBLISH_CLAIM", str, "realtime_publish", "Claim granting the publish API when true (or \"true\")"),
    Setting("auth", "publish_role", "RT_AUTH_PUBLISH_ROLE", str, "", "Role (in the workspace claim path) that also grants publishing"),
    Setting("auth", "leeway", "RT_AUTH_LEEWAY", float, 5.0, "Seconds of clock leeway when a token is presented (at most 3600)"),
    Setting("auth", "jwks_refetch_interval", "RT_AUTH_JWKS_REFETCH_INTERVAL", float, 30.0, "Minimum seconds between JWKS refetches on an unknown kid"),
    Setting("limits", "max_subscriptions", "RT_MAX_SUBSCRIPTIONS", int, 100, "Subscriptions per connection (error 4008 beyond)"),
    Setting("limits", "max_connections", "RT_MAX_CONNECTIONS", int, 10000, "Connections per workspace (close 4008 beyond)"),
    Setting("limits", "max_node_connections", "RT_MAX_NODE_CONNECTIONS", int, 0, "WebSocket connections this node holds at most, all workspaces together (further upgrades get 503); 0: the open-files limit (raised to the hard limit at start) less 1024 kept for the gateway's own sockets and files (and 3 per mongo.max_databases when mongo.url names no database), or half of a small limit. Client sockets of any kind (idle or HTTP ones, closed WebSockets whose peer has not read what was queued for it) are held up to 512 more, within the open-files limit less 512; past that a new connection gets 503 at once"),
    Setting("limits", "max_connections_per_subject", "RT_MAX_CONNECTIONS_PER_SUBJECT", int, 1000, "Connections per subject on this node, all workspaces together (close 4008 beyond)"),
    Setting("limits", "max_filter_bytes", "RT_MAX_FILTER_BYTES", int, 128 * 1024, "JSON bytes of the filters of one connection's subscriptions together (error 4008 beyond); a compiled filter takes ~30 times its size in memory"),
    Setting("limits", "max_message_bytes", "RT_MAX_MESSAGE_BYTES", int, 65536, "Largest inbound WebSocket message (at least 1024: a client's auth message carries its token)"),
    Setting("limits", "send_buffer_bytes", "RT_SEND_BUFFER_BYTES", int, 4 * 1024 * 1024, "Per-connection outbound buffer; beyond it the connection is closed with 1013. A frame larger than a quarter of it (a large row) raises that connection's bound by its size: bytes waiting behind the largest frame it was sent count"),
    Setting("limits", "flush_chunk", "RT_FLUSH_CHUNK", int, 16, "Connections written per event-loop iteration, shared in turns by the workspaces waiting; between chunks the loop reads what arrived, and new events join the frames of connections not yet written (one write): smaller, more frames per write under load"),
    Setting("limits", "fanout_backlog", "RT_FANOUT_BACKLOG", int, 65536, "Event frames queued on connections and not yet written beyond which publishers (publish API, change feeds, bus consumer) wait, or fanout_backlog_per_connection times the open connections if more; below it, events join the frames of connections still waiting (fewer, larger writes under load)"),
    Setting("limits", "fanout_backlog_per_connection", "RT_FANOUT_BACKLOG_PER_CONNECTION", int, 32, "Frames per open connection the fan-out backlog may hold on average (see fanout_backlog; 0: the fixed bound only)"),
    Setting("limits", "max_invalid_per_minute", "RT_MAX_INVALID_PER_MINUTE", int, 20, "Invalid messages a minute before close 1008 (a subscribe refused 4010 for a table a catalog lookup found missing counts as one)"),
    Setting("limits", "min_refresh_interval", "RT_MIN_REFRESH_INTERVAL", float, 1.0, "Seconds between two token refreshes (`auth` on an open connection) that the gateway handles; a sooner one waits, and the connection's later messages behind it"),
    Setting("limits", "auth_timeout", "RT_AUTH_TIMEOUT", float, 10.0, "Seconds for a client to send its auth message before close 4002 (verifying it does not count)"),
    Setting("limits", "request_timeout", "RT_REQUEST_TIMEOUT", float, 30.0, "Seconds an HTTP request (head and body; the WebSocket upgrade request too) may take to arrive once its first byte has: beyond, 408 and the connection is closed. With TLS, also the most a TLS handshake may take"),
    Setting("limits", "idle_timeout", "RT_IDLE_TIMEOUT", float, 60.0, "Seconds of peer silence before a WebSocket is closed with 1001 (an HTTP connection with no request in progress or waiting: closed); also how long a closed connection's peer gets to read what was queued for it before it is dropped"),
    Setting("limits", "max_publish_bytes", "RT_MAX_PUBLISH_BYTES", int, 256 * 1024, "Largest custom event payload (413 beyond)"),
    Setting("limits", "pipelined_publish_bytes", "RT_PIPELINED_PUBLISH_BYTES", int, 64 * 1024 * 1024, "Bytes of pipelined HTTP requests (bodies and heads) this node holds queued behind requests that wait (fan-out back-pressure, a JWKS fetch), all connections together; a connection that queues beyond it is not read (the requests it sent wait in the network) until the total is back under half of it. One read of each connection may pass it (up to 256 KiB). At least max_publish_bytes"),
    Setting("history", "events", "RT_HISTORY_EVENTS", int, 10000, "Events kept per workspace for replay (0: none; a reader that missed events gets history_gap)"),
    Setting("history", "seconds", "RT_HISTORY_SECONDS", float, 300.0, "Age limit of retained events"),
    Setting("history", "bytes", "RT_HISTORY_BYTES", int, 64 * 1024 * 1024, "Byte limit of retained events per workspace: each counts its frame, its JSON, and its content decoded (for filtered replays), estimated as 64 bytes per `,` `:` `[` of the JSON"),
    Setting("history", "node_bytes", "RT_HISTORY_NODE_BYTES", int, 1024 * 1024 * 1024, "Byte limit of retained events (counted as for history.bytes) of all workspaces together; beyond it the oldest events of the workspaces retaining the most are evicted (a workspace holding less than the larger ones keeps its events) until 7/8 of it remain, and a reader from before them gets history_gap"),
    Setting("history", "resume_ttl", "RT_RESUME_TTL", float, 120.0, "Seconds a disconnected session stays resumable"),
    Setting("history", "max_suspended_sessions", "RT_MAX_SUSPENDED_SESSIONS", int, 100000, "Suspended sessions kept at most, all workspaces together; beyond it the workspace holding the most loses its oldest (a workspace holding fewer than the others keeps its sessions)"),
    Setting("history", "max_suspended_filter_bytes", "RT_MAX_SUSPENDED_FILTER_BYTES", int, 64 * 1024 * 1024, "Bytes of the subscriptions of all suspended sessions together, each its filter as held decoded (its JSON and 64 bytes per `,` `:` `[` of it, as history.bytes counts an event), its channel's name and 64; beyond it the workspace whose sessions hold the most loses its oldest"),
    Setting("postgres", "url", "RT_POSTGRES_URL", str, "", "PostgreSQL DSN of every workspace without its own"),
    Setting("postgres", "schemas", "RT_POSTGRES_SCHEMAS", list, ["public"], "Schemas whose tables are published"),
    Setting("postgres", "tables", "RT_POSTGRES_TABLES", list, [], "Tables to publish (schema.name); empty = all tables of `schemas`"),
    Setting("postgres", "stream_memory", "RT_POSTGRES_STREAM_MEMORY", int, 32 * 1024 * 1024, "Bytes of streamed in-progress transactions held in memory before spilling to the state directory"),
    Setting("postgres", "receive_timeout", "RT_POSTGRES_RECEIVE_TIMEOUT", float, 60.0, "Seconds the server may leave the source's status update (sent every second) unanswered before the replication link counts as dead and is reopened; also bounds connecting and each catalog query"),
    Setting("mongo", "url", "RT_MONGO_URL", str, "", "MongoDB URL of every workspace without its own"),
    Setting("mongo", "allow_unknown_collections", "RT_MONGO_ALLOW_UNKNOWN_COLLECTIONS", bool, False, "Accept mongo:{collection} for collections that do not exist yet"),
    Setting("mongo", "max_databases", "RT_MONGO_MAX_DATABASES", int, 300, "Workspace databases a gateway reads at most through a `mongo.url` that names no database (each its own change stream and client: 3 sockets, kept out of the client connections' share of the open-files limit, and 3 connections at the MongoDB server); a further workspace's mongo channels get 4010 naming this limit"),
    Setting("audit", "kafka_bootstrap", "RT_KAFKA_BOOTSTRAP", str, "", "Kafka bootstrap servers for the audit trail (log only when empty)"),
    Setting("audit", "topic_prefix", "RT_AUDIT_TOPIC_PREFIX", str, "console.realtime.", "Prefix of the four audit topics"),
    Setting("audit", "security_protocol", "RT_KAFKA_SECURITY_PROTOCOL", str, "PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"),
    Setting("audit", "sasl_mechanism", "RT_KAFKA_SASL_MECHANISM", str, "", "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
    Setting("audit", "sasl_username", "RT_KAFKA_SASL_USERNAME", str, "", "SASL user name"),
    Setting("audit", "sasl_password", "RT_KAFKA_SASL_PASSWORD", str, "", "SASL password"),
    Setting("audit", "ssl_cafile", "RT_KAFKA_SSL_CAFILE", str, "", "CA bundle for SSL"),
    Setting("audit", "ssl_certfile", "RT_KAFKA_SSL_CERTFILE", str, "", "PEM client certificate (chain) for mutual TLS with SSL or SASL_SSL (with audit.ssl_keyfile)"),
    Setting("audit", "ssl_keyfile", "RT_KAFKA_SSL_KEYFILE", str, "", "PEM private key of audit.ssl_certfile, not passphrase-protected"),
    Setting("audit", "queue_size", "RT_AUDIT_QUEUE_SIZE", int, 10000, "Audit records held in memory before spilling to the spool"),
    Setting("audit", "spool_dir", "RT_AUDIT_SPOOL_DIR", str, "", "Audit spool directory (default: state_dir/audit-spool)"),
    Setting("audit", "spool_max_bytes", "RT_AUDIT_SPOOL_MAX_BYTES", int, 256 * 1024 * 1024, "Spool size bound; records beyond it are counted as lost"),
    Setting("bus", "kind", "RT_BUS", str, "memory", "`memory` (one process reads the feeds and serves) or `kafka` (gateway nodes share the events topic; `rtserver ingest` reads the feeds)"),
    Setting("bus", "kafka_bootstrap", "RT_BUS_KAFKA_BOOTSTRAP", str, "", "Kafka bootstrap servers of the events topic (default: audit.kafka_bootstrap)"),
    Setting("bus", "topic", "RT_BUS_TOPIC", str, "realtime.events", "Events topic, keyed by workspace id; the ingest lease topic is `{topic}.lease`"),
    Setting("bus", "partitions", "RT_BUS_PARTITIONS", int, 12, "Partitions of the events topic when rtserver creates it (never change it afterwards: seq is the offset in the workspace's partition)"),
    Setting("bus", "replication_factor", "RT_BUS_REPLICATION_FACTOR", int, 3, "Replication factor of the events topic when rtserver creates it (capped at the broker count)"),
    Setting("bus", "max_lag", "RT_BUS_MAX_LAG", int, 10000, "Events a gateway node may be behind the topic; beyond it new connections get HTTP 503 and /readyz 503"),
    Setting("bus", "max_record_bytes", "RT_BUS_MAX_RECORD_BYTES", int, 4 * 1024 * 1024, "Largest event record on the events topic (the topic is created with max.message.bytes to match); a change beyond it is skipped with history_gap"),
    Setting("bus", "max_replay", "RT_BUS_MAX_REPLAY", int, 100000, "Records one resume may read back from Kafka (older than the node's memory); beyond it history_gap"),
    Setting("bus", "workspaces", "RT_BUS_WORKSPACES", list, [], "Ingest: workspaces fed by the default postgres/mongo URLs (besides [workspaces.*] sections); a node given the list refuses (4010) the database channels of the others (a single process does not read it: every workspace without a section reads the default URLs, warned at start)"),
    Setting("bus", "ingest_port", "RT_INGEST_PORT", int, 0, "Ingest: port of its /healthz, /readyz and /metrics, on server.host (`rtserver ingest --host`; 0 = none); it serves 64 connections at once (a further one gets 503 at once), each given 5 s to send its request"),
    Setting("bus", "publish_timeout", "RT_BUS_PUBLISH_TIMEOUT", float, 5.0, "Seconds Kafka may leave a record unacknowledged or a metadata request unanswered before the bus counts as unavailable: /readyz 503 (nodes and ingest), publish API 503 (not sent) or 504 (sent, not confirmed)"),
    Setting("bus", "lease_timeout", "RT_BUS_LEASE_TIMEOUT", float, 6.0, "Ingest: seconds after which a standby takes over from a dead active ingest (Kafka group session timeout, >= 6)"),
)

# Files and directories: a leading ~ is the home directory, as a shell would take it (TOML has
# no shell: `state_dir = "~/.rtserver"` made a directory named `~` in the working directory).
_PATHS = frozenset({("server", "state_dir"), ("server", "tls_cert"), ("server", "tls_key"),
                    ("audit", "ssl_cafile"), ("audit", "ssl_certfile"), ("audit", "ssl_keyfile"),
                    ("audit", "spool_dir")})

# Settings whose value an error must not repeat: it is shown on the terminal and kept in logs.
_SECRETS = frozenset({("auth", "hs256_secret"), ("audit", "sasl_password")})

_BOOL_TRUE = {"1", "true", "yes", "on"}
# Not "": `RT_GC_FREEZE=` left blank in a template turned off a setting that is on by default.
_BOOL_FALSE = {"0", "false", "no", "off"}
# Every float setting is a duration in seconds: 1e300 passed (a leeway that accepts a token
# expired any time ago, sessions saved with an expiry of 1e300).
_MAX_SECONDS = 365 * 24 * 3600
_MAX_LEEWAY = 3600
_MIN_MESSAGE_BYTES = 1024
_SASL_SETTINGS = ("sasl_mechanism", "sasl_username", "sasl_password")  # of [audit]: used together or not at all


def _coerce(setting: Setting, value: Any, origin: str) -> Any:
    where = f"{origin} ({setting.section}.{setting.key})"
    try:
        if setting.kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _BOOL_TRUE:
                return True
            if text in _BOOL_FALSE:
                return False
            raise ValueError("expected true or false" + (" (it is empty)" if not text else ""))
        if setting.kind is list:
            return _list(value)
        if setting.kind is int:
            # int() would truncate a TOML float (a queue_size of 0.5 became 0) and take a bool
            if (isinstance(value, bool) or not isinstance(value, (int, float, str))
                    or isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            try:
                number = int(value)
            except ValueError:  # not int()'s "invalid literal for int() with base 10"
                raise ValueError("expected an integer") from None
            if number < 0:
                raise ValueError("must not be negative")
            if number >= 1 << 63:
                # Sizes reach C (picows' frame limit, buffer bounds): beyond 64 bits the gateway
                # started, then dropped every WebSocket upgrade with an OverflowError.
                raise ValueError(f"too large (at most {(1 << 63) - 1})")
            return number
        if setting.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError("expected a number")
            try:
                number = float(value)
            except ValueError:  # not "could not convert string to float"
                raise ValueError("expected a number") from None
            if not math.isfinite(number):  # "nan" and "inf" parse; a leeway of inf accepts any token
                raise ValueError("must be a finite number")
            if number < 0:
                raise ValueError("must not be negative")
            if number > _MAX_SECONDS:
                raise ValueError(f"too large (at most {_MAX_SECONDS} seconds, 365 days)")
            return number
        if not isinstance(value, str):
            raise ValueError("expected a string")
        if (setting.section, setting.key) not in _SECRETS:
            # A value from a file (a ConfigMap or env file made with `--from-file`) ends with a
            # newline nobody meant: an issuer or a URL carrying it refused every token or never
            # connected. A secret is taken as given: the other side may hold the same bytes.
            value = value.strip()
            if "\0" in value:
                # Only TOML can write one ("\u0000"); a path holding it stopped the start with
                # a traceback ("embedded null byte"), a host name went into the log as written.
                raise ValueError("holds a NUL character")
        if (setting.section, setting.key) in _PATHS:
            if _is_pem_text(value):
                raise ValueError("holds PEM text, not a file's path: write it to a file and give that file's path")
            return os.path.expanduser(value)  # a file name may be any bytes: used as given
        _check_utf8(value)
        return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: invalid value {_shown_value(setting, value)}: {exc}") from None


def _is_pem_text(value: str) -> bool:
    """Whether a path setting holds a PEM file's text instead of its name (a Kubernetes secret
    put in RT_TLS_KEY itself): every error repeats a path, and that would be the private key."""
    return "-----BEGIN" in value


def _shown_value(setting: Setting, value: Any) -> str:
    """`value` as an error about `setting` may repeat it: never a secret, a path setting's PEM
    text (a private key) or a URL's credentials; an array or a table given for a text setting
    not at all (a URL in it, `url = ["postgresql://rt:pw@db/app"]`, came out with its password)."""
    if (setting.section, setting.key) in _SECRETS:
        return "(not shown: a secret)"
    if setting.kind is str and isinstance(value, (list, dict)):
        return f"(not shown: a TOML {'array' if isinstance(value, list) else 'table'})"
    if isinstance(value, str) and (setting.section, setting.key) in _PATHS and _is_pem_text(value):
        return "(not shown: PEM text)"
    # A URL without its credentials (a database URL not UTF-8 is refused here).
    return repr(redact(value) if isinstance(value, str) else value)


def _check_utf8(value: str) -> None:
    """ValueError for a value that is not UTF-8 text. An environment variable's bytes that are
    not UTF-8 reach Python as lone surrogates, which every encoding of the value refuses: a
    database URL, a secret or a host name carrying them stopped the start with a traceback
    (exit 1), printed as plain text when it came before the log began."""
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        byte = os.fsencode(value[exc.start])[0]
        raise ValueError(f"not UTF-8 text (byte 0x{byte:02x} at character {exc.start + 1})") from None


@dataclass
class WorkspaceSources:
    """Source URLs of one workspace (from [workspaces.W] or the defaults)."""

    postgres_url: str = ""
    postgres_schemas: list[str] = field(default_factory=lambda: ["public"])
    postgres_tables: list[str] = field(default_factory=list)
    mongo_url: str = ""


@dataclass
class Config:
    values: dict[str, dict[str, Any]]
    workspaces: dict[str, WorkspaceSources]
    path: str = ""
    # RT_* environment variables that are no setting (a typo: RT_KAFKA_BOOTSTRAP_SERVERS would
    # leave the audit trail in the log), each with the setting it most resembles or "".
    unknown_env: list[tuple[str, str]] = field(default_factory=list)
    # "section.key" -> where its value came from (a file, a variable, an option), when not the default
    origins: dict[str, str] = field(default_factory=dict)

    def explain(self, message: str) -> str:
        """`message`, about settings it names, with where each of them was set."""
        return _with_origins(message, self.origins)

    def get(self, section: str, key: str) -> Any:
        return self.values[section][key]

    def __getattr__(self, name: str) -> Any:
        # `config.server`, `config.auth`... give a namespace of that section, made on first use
        # and kept as an attribute: a connection reads ~10 settings (each read went through
        # here and made a namespace). It reads the section's dict itself, so a value changed in
        # `values` shows through it.
        values = self.__dict__.get("values")
        if values is not None and name in values:
            section = self.__dict__[name] = _Section(name, values[name])
            return section
        raise AttributeError(name)

    def sources_for(self, workspace: str) -> WorkspaceSources:
        """The sources of `workspace`: its own section, else the defaults (RT_POSTGRES_URL...)."""
        own = self.workspaces.get(workspace)
        if own is not None:
            return own
        return WorkspaceSources(
            postgres_url=self.values["postgres"]["url"],
            postgres_schemas=list(self.values["postgres"]["schemas"]),
            postgres_tables=list(self.values["postgres"]["tables"]),
            mongo_url=self.values["mongo"]["url"],
        )

    def postgres_urls(self) -> list[str]:
        """Every PostgreSQL URL configured: the default one and the workspaces' own."""
        urls = [self.values["postgres"]["url"], *(ws.postgres_url for ws in self.workspaces.values())]
        return list(dict.fromkeys(url for url in urls if url))

    @property
    def dev_mode(self) -> bool:
        return not self.values["auth"]["hs256_secret"] and not self.values["auth"]["jwks_url"]


class _Section:
    """One section's settings as attributes: its instance dict is the section's dict in
    Config.values, so a read is a plain attribute lookup."""

    __slots__ = ("_name", "__dict__")

    def __init__(self, name: str, values: dict[str, Any]):
        self._name = name
        self.__dict__ = values

    def __getattr__(self, key: str) -> Any:
        raise AttributeError(f"{self._name}.{key}")


BUS_KINDS = ("memory", "kafka")


def load(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    override_origins: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration. `overrides` maps "section.key" to CLI values (None = unset);
    errors say a value came from `option --key`, or from what `override_origins` names for it."""
    environ = os.environ if environ is None else environ
    values: dict[str, dict[str, Any]] = {}
    for s in SETTINGS:
        default = list(s.default) if isinstance(s.default, list) else s.default
        values.setdefault(s.section, {})[s.key] = default

    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                # A byte-order mark (Notepad saves one) is no TOML statement: tomllib refused
                # the file at "line 1, column 1" without saying why.
                data = tomllib.loads(fh.read().decode().removeprefix("\ufeff"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        except UnicodeDecodeError as exc:  # tomllib decodes the bytes first: not a TOMLDecodeError
            raise ConfigError(f"config file {path}: not UTF-8 text (byte {exc.start}): TOML files are UTF-8") from None
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from None

    known = {(s.section, s.key): s for s in SETTINGS}
    sections = {s.section for s in SETTINGS}
    origins: dict[str, str] = {}  # "section.key" -> where its value came from, when not the default
    workspaces_raw = data.pop("workspaces", {})
    for section, table in data.items():
        if section not in sections:
            raise ConfigError(f"config file {path}: {_misplaced(section, table, sections)}")
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: [{section}] must be a table")
        for key, value in table.items():
            setting = known.get((section, key))
            if setting is None:
                homes = _homes(key)  # written in the wrong section
                hint = (f" ({key} is a setting of {homes})" if homes else
                        _resembles(f"{section}.{key}", [f"{s.section}.{s.key}" for s in SETTINGS]))
                raise ConfigError(f"config file {path}: unknown setting {section}.{key}{hint}")
            values[section][key] = _coerce(setting, value, f"config file {path}")
            origins[f"{section}.{key}"] = f"config file {path}"

    for s in SETTINGS:
        if s.env in environ:
            values[s.section][s.key] = _coerce(s, environ[s.env], f"environment {s.env}")
            origins[f"{s.section}.{s.key}"] = f"environment {s.env}"
    known_env = [s.env for s in SETTINGS]
    unknown_env = [
        (name, next(iter(difflib.get_close_matches(name, known_env, n=1, cutoff=0.7)), ""))
        for name in sorted(environ)
        if name.startswith("RT_") and name not in known_env
    ]

    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, key = dotted.split(".", 1)
        option = (override_origins or {}).get(dotted) or f"option --{key.replace('_', '-')}"
        replaced = values[section][key]
        if dotted == "bus.kind" and dotted in origins and replaced not in BUS_KINDS:
            # `rtserver ingest` always writes to Kafka, but the gateway nodes given the same
            # settings refuse this value: said here, before they are started with it.
            raise ConfigError(f"bus.kind: {replaced!r} ({origins[dotted]}) is not memory or kafka: the ingest "
                              "always writes to Kafka, but a gateway node given these settings would not start")
        values[section][key] = _coerce(known[(section, key)], value, option)
        origins[dotted] = option

    workspaces: dict[str, WorkspaceSources] = {}
    if not isinstance(workspaces_raw, dict):
        raise ConfigError(f"config file {path}: [workspaces] must be a table of tables")
    for ws, table in workspaces_raw.items():
        if not WORKSPACE_ID_RE.match(ws):
            raise ConfigError(f"config file {path}: workspace id {ws!r} must be 1-64 of [A-Za-z0-9_-]")
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: [workspaces.{ws}] must be a table")
        allowed = {"postgres_url", "postgres_schemas", "postgres_tables", "mongo_url"}
        unknown = set(table) - allowed
        if unknown:
            raise ConfigError(f"config file {path}: [workspaces.{ws}] unknown keys {sorted(unknown)}")
        lists: dict[str, list[str]] = {}
        for key, default in (("postgres_schemas", ["public"]), ("postgres_tables", [])):
            try:
                lists[key] = _list(table.get(key, default))
            except ValueError as exc:
                raise ConfigError(f"config file {path}: [workspaces.{ws}] {key}: {exc}") from None
        for key in ("postgres_url", "mongo_url"):
            if not isinstance(table.get(key, ""), str):  # str() made `postgres_url = 5` the URL "5"
                raise ConfigError(f"config file {path}: [workspaces.{ws}] {key}: expected a string")
        workspaces[ws] = WorkspaceSources(
            postgres_url=table.get("postgres_url", "").strip(), postgres_schemas=lists["postgres_schemas"],
            postgres_tables=lists["postgres_tables"], mongo_url=table.get("mongo_url", "").strip())
        if workspaces[ws].postgres_url and not lists["postgres_schemas"] and not lists["postgres_tables"]:
            raise ConfigError(f"config file {path}: [workspaces.{ws}] postgres_schemas and postgres_tables are both "
                              "empty: no table would be published")
        _check_mongo_url(f"config file {path}: [workspaces.{ws}] mongo_url", workspaces[ws].mongo_url)
        _check_mongo_database(f"config file {path}: [workspaces.{ws}] mongo_url", workspaces[ws].mongo_url, [ws])
        _check_postgres_url(f"config file {path}: [workspaces.{ws}] postgres_url", workspaces[ws].postgres_url)

    try:
        _validate(values, path or "")
    except ConfigError as exc:
        raise ConfigError(_with_origins(str(exc), origins)) from None
    _check_shared_postgres(path or "", workspaces, values["postgres"])  # every URL one libpq reads
    _check_shared_mongo(path or "", workspaces, values["mongo"]["url"], values["bus"]["workspaces"])
    return Config(values=values, workspaces=workspaces, path=path or "", unknown_env=unknown_env, origins=origins)


def _check_shared_postgres(path: str, workspaces: dict[str, WorkspaceSources], default: dict[str, Any]) -> None:
    """Sections naming one postgres_url share one source, one slot and one publication, made
    with the first one's schemas and tables: a second asking for others got the first's
    silently (its tables answered 4010, or it got tables it had not asked for). One database
    named by URLs spelled differently (an option, the default port written out) would be two
    sources on one slot, whose name holds the database's only: the second never streamed."""
    from rtserver.sources.pg_catalog import database_location

    first: dict[Any, tuple[str, list[str], list[str], str]] = {}
    named = [("[postgres]", default["url"], list(default["schemas"]), list(default["tables"]))]
    named += [(f"[workspaces.{ws}]", s.postgres_url, s.postgres_schemas, s.postgres_tables) for ws, s in workspaces.items()]
    for section, url, schemas, tables in named:
        if not url:
            continue
        mine = (section, schemas, tables, url)
        other = first.setdefault(database_location(url) or url, mine)
        if other[3] != url:
            host, port, database = database_location(url) or ("", "", "")
            raise ConfigError(
                f"config file {path}: {section} postgres_url names the database of {other[0]} ({database} on "
                f"{host or 'the local socket'}:{port}) by another URL ({redact(url)} against {redact(other[3])}): "
                "one database is one source with one replication slot; give both the same URL")
        if other[1:3] != mine[1:3]:
            raise ConfigError(
                f"config file {path}: {section} names the postgres_url of {other[0]} ({redact(url)}), one source "
                f"with one publication, but other postgres_schemas/postgres_tables ({mine[1]}/{mine[2]} against "
                f"{other[1]}/{other[2]}): give both the same, or use another database")


def _check_shared_mongo(path: str, workspaces: dict[str, WorkspaceSources], default_url: str,
                        listed: list[str]) -> None:
    """A MongoDB database is one feed with one resume token file, named by its deployment and
    database whatever the URL's options: named by URLs spelled differently (an option added,
    the default port written out), it would be two feeds writing one file, and a restart would
    resume the one behind after the other's token, losing what it had not read. A default URL
    naming no database reads the database of each workspace: of those bus.workspaces lists here;
    any other that would read a section's database is refused at run time (App.why_no_source):
    refused here, a section naming any database of that deployment was an error no URL could
    mend."""
    from rtserver.sources.mongo import database_for, deployment_of

    named = [(f"[workspaces.{ws}]", s.mongo_url, database_for(s.mongo_url, ws)) for ws, s in workspaces.items()
             if s.mongo_url]
    if default_url:
        # A default URL naming no database gives each workspace without a section its own.
        database = database_for(default_url, "")
        databases = [database] if database else [w for w in listed if w not in workspaces]
        named = [("[mongo]", default_url, db) for db in databases] + named
    first: dict[tuple[str, str], tuple[str, str]] = {}
    for section, url, database in named:
        other = first.setdefault((deployment_of(url), database), (section, url))
        if other[1] != url:
            raise ConfigError(
                f"config file {path}: {section} mongo_url names MongoDB database {database!r} of {other[0]} by "
                f"another URL ({redact(url)} against {redact(other[1])}): one database is one feed with one "
                "resume token; give both the same URL")


def _resembles(name: str, names: list[str]) -> str:
    """The hint " (did you mean X?)" naming what `name` most resembles, as for RT_* variables."""
    like = difflib.get_close_matches(name, names, n=1, cutoff=0.7)
    return f" (did you mean {like[0]}?)" if like else ""


def _homes(key: str) -> str:
    """The sections holding a setting named `key` ("[postgres] or [mongo]" for url), or ""."""
    return " or ".join(f"[{s.section}]" for s in SETTINGS if s.key == key)


def _misplaced(name: str, value: Any, sections: set[str]) -> str:
    """What is wrong with a top-level `name` of the file that is no section: a setting written
    above every section header (TOML puts `port = 9000` there) was an "unknown section [port]"."""
    if not isinstance(value, dict):
        homes = _homes(name)
        if homes:
            return f"{name} is outside any section: it belongs under {homes}"
        return f"{name} is outside any section (settings go under [server], [auth], [limits]...)"
    like = difflib.get_close_matches(name, sorted(sections), n=1, cutoff=0.7)
    return f"unknown section [{name}]" + (f" (did you mean [{like[0]}]?)" if like else "")


def _with_origins(message: str, origins: Mapping[str, str]) -> str:
    """`message` of a check that weighs settings together, with where each setting it names was
    set: "server.port: 70000 is not a TCP port" left the operator of a file plus RT_*
    variables (plus flags) to look in all of them."""
    named = sorted((m.start(), name) for name in origins
                   if (m := re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", message)) is not None
                   and origins[name].removeprefix("environment ") not in message)  # "mongo.url (RT_MONGO_URL)"
    if not named:
        return message
    return f"{message} ({'; '.join(f'{name} from {origins[name]}' for _, name in named)})"


def _validate(values: dict[str, dict[str, Any]], path: str) -> None:
    server = values["server"]
    if not server["host"].strip():
        # asyncio takes "" for every interface: RT_HOST= left blank in a compose file or template
        # would open the gateway to the network instead of the loopback default.
        raise ConfigError("server.host is empty: give an address (127.0.0.1; 0.0.0.0 or :: for every interface)")
    if not server["state_dir"].strip():
        # "" would be the working directory: the dev secret and the spool written among its files
        raise ConfigError("server.state_dir is empty: give a directory (default .rtserver)")
    for setting, port in (("server.port", server["port"]), ("bus.ingest_port", values["bus"]["ingest_port"])):
        if not 0 <= port <= 65535:  # beyond, the bind raises OverflowError: a traceback
            raise ConfigError(f"{setting}: {port} is not a TCP port")
    if bool(server["tls_cert"]) != bool(server["tls_key"]):
        raise ConfigError("server.tls_cert and server.tls_key must be set together")
    if server["log_level"].lower() not in {"debug", "info", "warning", "error"}:
        raise ConfigError(f"server.log_level: {server['log_level']!r} is not debug, info, warning or error")
    # \Z: `$` let a trailing newline through (an env file, a ConfigMap's value), which the slot
    # name then carried: PostgreSQL refused it at every attempt, the feed never started.
    if not re.match(r"^[a-z_][a-z0-9_]{0,40}\Z", server["instance"]):
        raise ConfigError(
            f"server.instance: {server['instance']!r} must be a lower-case letter or _, then lower-case letters, digits "
            "and _, 41 characters at most (it names a replication slot, which PostgreSQL limits to 63)"
        )
    auth = values["auth"]
    _check_jwks_url(auth["jwks_url"])
    if auth["leeway"] > _MAX_LEEWAY:
        # Clock skew is seconds; an hour's leeway already accepts a token that long expired.
        raise ConfigError(f"auth.leeway {auth['leeway']:g} is more than {_MAX_LEEWAY} seconds: it would accept "
                          "tokens expired that long ago (a leeway is for clock skew)")
    if not auth["workspace_claim"].strip():
        # No claim path grants anything: every token would be refused (4003).
        raise ConfigError("auth.workspace_claim is empty: name the claim listing the granted workspaces "
                          "(default workspaces; Keycloak roles: realm_access.roles)")
    if auth["channel_permissions"] and not auth["channel_claim"]:
        raise ConfigError("auth.channel_permissions is on but auth.channel_claim names no claim")
    if auth["channel_claim"] != "realtime_channels" and not auth["channel_permissions"]:
        # Naming a claim suggests the check is wanted: refuse rather than silently not check.
        raise ConfigError(
            f"auth.channel_claim is {auth['channel_claim']!r} but auth.channel_permissions is off: "
            "set auth.channel_permissions (RT_AUTH_CHANNEL_PERMISSIONS) to true to check channel permissions"
        )
    audit = values["audit"]
    if audit["security_protocol"] not in {"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"}:
        raise ConfigError(f"audit.security_protocol: {audit['security_protocol']!r} is not supported")
    if audit["sasl_mechanism"] not in {"", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"}:
        raise ConfigError(
            f"audit.sasl_mechanism: {audit['sasl_mechanism']!r} is not PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
        )
    # Checked here, not by the Kafka client: it refuses these when the first record is sent (the
    # audit sender then failed with a traceback every second), or ignores the credentials.
    if audit["security_protocol"].startswith("SASL_"):
        missing = [f"audit.{k}" for k in _SASL_SETTINGS if not audit[k]]
        if missing:
            raise ConfigError(f"audit.security_protocol {audit['security_protocol']} needs {', '.join(missing)}")
    elif set_ := [f"audit.{k}" for k in _SASL_SETTINGS if audit[k]]:
        raise ConfigError(
            f"{' and '.join(set_)} {'is' if len(set_) == 1 else 'are'} set but audit.security_protocol is "
            f"{audit['security_protocol']}: the credentials would not be sent (SASL_SSL or SASL_PLAINTEXT uses them)"
        )
    if audit["ssl_cafile"]:
        if audit["security_protocol"] not in ("SSL", "SASL_SSL"):
            raise ConfigError(
                f"audit.ssl_cafile is set but audit.security_protocol is {audit['security_protocol']}: "
                "it would not be used (SSL or SASL_SSL uses it)"
            )
        # Loaded when the first Kafka client starts: a missing or malformed bundle then read
        # '[Errno 2] No such file or directory', naming neither the file nor the setting.
        try:
            ssl.create_default_context(cafile=audit["ssl_cafile"])
        except OSError as exc:  # ssl.SSLError included
            raise ConfigError(f"audit.ssl_cafile {audit['ssl_cafile']}: cannot load: {exc.strerror or exc}") from None
    _check_client_certificate(audit)
    _check_bootstrap("audit.kafka_bootstrap (RT_KAFKA_BOOTSTRAP)", audit["kafka_bootstrap"])
    # The longest topic names each setting makes: an audit event's, the ingest lease topic.
    _check_topic("audit.topic_prefix", audit["topic_prefix"] + "session-suspended")
    bus = values["bus"]
    for wid in bus["workspaces"]:
        # Any other name fed a workspace no client can connect to: its events went nowhere.
        if not WORKSPACE_ID_RE.match(wid):
            raise ConfigError(f"bus.workspaces: {wid!r} is not a workspace id (1-64 of [A-Za-z0-9_-])")
    _check_bootstrap("bus.kafka_bootstrap (RT_BUS_KAFKA_BOOTSTRAP)", bus["kafka_bootstrap"])
    _check_topic("bus.topic", bus["topic"])
    _check_topic("bus.topic", bus["topic"] + ".lease")
    if bus["kind"] not in BUS_KINDS:
        raise ConfigError(f"bus.kind: {bus['kind']!r} is not memory or kafka")
    if bus["kind"] == "kafka" and not (bus["kafka_bootstrap"] or audit["kafka_bootstrap"]):
        raise ConfigError("bus.kind kafka needs bus.kafka_bootstrap (RT_BUS_KAFKA_BOOTSTRAP) or audit.kafka_bootstrap")
    if bus["partitions"] < 1 or bus["replication_factor"] < 1:
        raise ConfigError("bus.partitions and bus.replication_factor must be at least 1")
    if bus["lease_timeout"] < 6:
        # It was raised to 6 without a word, and check-config showed the value not in effect.
        raise ConfigError(f"bus.lease_timeout {bus['lease_timeout']:g} must be at least 6 (seconds): it is the Kafka "
                          "group session timeout, which brokers refuse under group.min.session.timeout.ms (6 s)")
    if bus["publish_timeout"] <= 0:
        raise ConfigError("bus.publish_timeout must be positive")
    if not 0 < bus["max_record_bytes"] <= _KAFKA_INT_MAX - KAFKA_RECORD_OVERHEAD:
        # The topic is made with max.message.bytes = this + 64 KiB: beyond a 32-bit int, Kafka
        # refused the topic ("Not a number of type INT") and the ingest stopped at its start.
        raise ConfigError(f"bus.max_record_bytes {bus['max_record_bytes']} must be from 1 to "
                          f"{_KAFKA_INT_MAX - KAFKA_RECORD_OVERHEAD}: the events topic is made with "
                          f"max.message.bytes {KAFKA_RECORD_OVERHEAD} larger, and Kafka takes a 32-bit integer")
    limits = values["limits"]
    for key in ("max_message_bytes", "max_filter_bytes", "send_buffer_bytes", "max_publish_bytes", "flush_chunk",
                "fanout_backlog"):
        if limits[key] <= 0:
            raise ConfigError(f"limits.{key} must be positive")
    if limits["max_message_bytes"] < _MIN_MESSAGE_BYTES:
        raise ConfigError(f"limits.max_message_bytes {limits['max_message_bytes']} is under {_MIN_MESSAGE_BYTES}: "
                          "a client's auth message, which carries its token, would not fit")
    if limits["request_timeout"] <= 0:
        raise ConfigError("limits.request_timeout must be positive")
    if values["auth"]["jwks_refetch_interval"] <= 0:
        # 0 lifts the bound on refetches for unknown kids: each forged token would cost a fetch.
        raise ConfigError("auth.jwks_refetch_interval must be positive: it bounds the key-set fetches tokens with "
                          "unknown key ids cause")
    pg = values["postgres"]
    if pg["url"] and not pg["schemas"] and not pg["tables"]:
        # The publication was made with no table, and the source said it was ready.
        raise ConfigError("postgres.schemas and postgres.tables are both empty: no table would be published")
    if values["postgres"]["receive_timeout"] <= 0:
        raise ConfigError("postgres.receive_timeout must be positive")
    # 0 is no "unlimited" here: the gateway would start and then refuse or drop every client.
    for key in ("max_connections", "max_connections_per_subject", "max_subscriptions", "auth_timeout",
                "idle_timeout"):
        if limits[key] <= 0:
            raise ConfigError(f"limits.{key} must be positive: 0 would refuse or close every client")
    if values["mongo"]["max_databases"] <= 0:
        raise ConfigError("mongo.max_databases must be positive")
    for key in ("node_bytes", "max_suspended_filter_bytes"):
        if values["history"][key] <= 0:
            raise ConfigError(f"history.{key} must be positive")
    if limits["pipelined_publish_bytes"] < limits["max_publish_bytes"]:
        raise ConfigError(f"limits.pipelined_publish_bytes ({limits['pipelined_publish_bytes']}) must be at least "
                          f"limits.max_publish_bytes ({limits['max_publish_bytes']}): one request's body")
    if limits["fanout_backlog_per_connection"] < 0:
        raise ConfigError("limits.fanout_backlog_per_connection must not be negative")
    _check_mongo_url("mongo.url (RT_MONGO_URL)", values["mongo"]["url"])
    _check_mongo_database("mongo.url (RT_MONGO_URL)", values["mongo"]["url"], values["bus"]["workspaces"])
    _check_postgres_url("postgres.url (RT_POSTGRES_URL)", values["postgres"]["url"])


_BOOTSTRAP_ENTRY_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(\d{1,5}))?\Z")


def no_passphrase() -> bytes:
    """`password` of `SSLContext.load_cert_chain`: without one, OpenSSL asks for an encrypted
    key's passphrase on the terminal (a service has none: it hung, or read a blank line)."""
    raise ssl.SSLError("the private key is encrypted (passphrase-protected)")


def _check_client_certificate(audit: dict[str, Any]) -> None:
    """audit.ssl_certfile and audit.ssl_keyfile (mutual TLS): both or neither, only with TLS,
    and a pair that loads. Checked here: the Kafka client loads them when it starts, where a
    missing key read '[Errno 2] No such file or directory', naming neither file nor setting."""
    certfile, keyfile = audit["ssl_certfile"], audit["ssl_keyfile"]
    if not certfile and not keyfile:
        return
    if not certfile or not keyfile:
        given, missing = ("ssl_certfile", "ssl_keyfile") if certfile else ("ssl_keyfile", "ssl_certfile")
        raise ConfigError(f"audit.{given} is set but audit.{missing} is not: a client certificate needs both "
                          "(RT_KAFKA_SSL_CERTFILE, RT_KAFKA_SSL_KEYFILE)")
    if audit["security_protocol"] not in ("SSL", "SASL_SSL"):
        raise ConfigError(
            f"audit.ssl_certfile is set but audit.security_protocol is {audit['security_protocol']}: "
            "it would not be used (SSL or SASL_SSL uses it)"
        )
    check_pem_pair("audit.ssl_certfile", certfile, "audit.ssl_keyfile", keyfile, ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))


def check_pem_pair(cert_setting: str, certfile: str, key_setting: str, keyfile: str,
                   context: ssl.SSLContext) -> None:
    """Load the certificate `certfile` and its private key `keyfile` into `context`;
    ConfigError naming the setting and the file, and saying what is wrong, when they cannot
    be (OpenSSL's own word for most of it is "PEM lib")."""
    texts = {}
    for setting, path in ((cert_setting, certfile), (key_setting, keyfile)):
        try:
            with open(path, "rb") as fh:
                texts[setting] = fh.read(1 << 20)
        except OSError as exc:
            raise ConfigError(f"{setting} {path}: cannot read: {exc.strerror or exc}") from None
    # Said from the PEM markers. Never the files' contents (the key's would end up on a
    # terminal and in logs).
    if b"-----BEGIN CERTIFICATE-----" not in texts[cert_setting]:
        raise ConfigError(f"{cert_setting} {certfile}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    key_text = texts[key_setting]
    if b"ENCRYPTED PRIVATE KEY-----" in key_text or b"Proc-Type: 4,ENCRYPTED" in key_text:
        raise ConfigError(f"{key_setting} {keyfile}: the private key is encrypted (passphrase-protected); give "
                          "it without a passphrase (openssl pkey -in KEY -out PLAIN-KEY)")
    if b"PRIVATE KEY-----" not in key_text:
        raise ConfigError(f"{key_setting} {keyfile}: holds no PEM private key (-----BEGIN PRIVATE KEY-----)")
    try:
        context.load_cert_chain(certfile, keyfile, password=no_passphrase)
    except OSError as exc:  # ssl.SSLError included
        if "encrypted" in str(exc):
            reason = "the private key is encrypted (passphrase-protected); give it without a passphrase"
        elif "KEY_VALUES_MISMATCH" in str(exc):
            reason = "the private key is not the certificate's (KEY_VALUES_MISMATCH)"
        else:
            reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        raise ConfigError(f"{cert_setting} {certfile} / {key_setting} {keyfile}: cannot load: {reason}") from None


def _check_bootstrap(setting: str, value: str) -> None:
    """host[:port][,host[:port]...], as Kafka clients take it. A malformed one (a URL, a port
    that is no number) started the gateway, then failed every delivery attempt."""
    if not value:
        return
    for entry in value.split(","):
        m = _BOOTSTRAP_ENTRY_RE.match(entry.strip())
        if m is None or m.group(2) is not None and not 0 < int(m.group(2)) < 65536:
            shown, hint = entry.strip(), ""
            if "@" in shown:  # user info written in (rt:pw@kafka:9092): not repeated
                shown = "***@" + shown.rpartition("@")[2]
                hint = "; credentials go in audit.sasl_username and audit.sasl_password"
            raise ConfigError(f"{setting}: {shown!r} is not host:port (a list of them: host1:9092,host2:9092{hint})")


def _check_jwks_url(url: str) -> None:
    """http(s)://host/...: without its scheme (or with another) the gateway started, said it
    was ready and refused every client, with a warning per fetch ("unknown url type")."""
    if not url:
        return
    try:
        parts = urllib.parse.urlsplit(url)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # an unclosed [IPv6] bracket
        usable = False
    if not usable:
        raise ConfigError(f"auth.jwks_url: {redact(url)!r} is not an http:// or https:// URL with a host "
                          "(e.g. https://idp.example.com/realms/R/protocol/openid-connect/certs)")
    if parts.username is not None or parts.password is not None:
        # Not sent: the key set is fetched without authentication, so every fetch failed with a
        # misleading error ("Name or service not known") and every client was refused.
        raise ConfigError(f"auth.jwks_url: {redact(url)!r} holds user info, which the gateway does not send "
                          "(the key set is fetched without authentication): give the URL without it")


def _check_topic(setting: str, longest: str) -> None:
    if not _KAFKA_TOPIC_RE.match(longest):
        raise ConfigError(
            f"{setting}: makes the Kafka topic name {longest!r}, which Kafka refuses "
            "(topic names are 1-249 of A-Z a-z 0-9 . _ -)"
        )


def _check_postgres_url(where: str, url: str) -> None:
    """A PostgreSQL connection string libpq cannot parse, refused at start with the setting's
    name (else the source would retry it forever)."""
    if not url:
        return
    import psycopg.conninfo

    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as exc:
        # libpq's message quotes the string, which may hold a password: only a parameter's name
        # it refuses is repeated.
        unknown = re.search(r'(?:invalid URI query parameter: |invalid connection option )"([\w.-]{1,64})"', str(exc))
        raise ConfigError(
            f"{where}: not a valid PostgreSQL connection string (postgresql://user@host:port/db or key=value pairs)"
            + (f": libpq has no parameter {unknown.group(1)!r}" if unknown else "")
        ) from None
    for key, instead in _LIBPQ_NOT_HONOURED.items():
        if key in params and (key not in LIBPQ_CLIENT_ONLY or params[key] == "require"):
            raise ConfigError(f"{where}: {key}={params[key]} cannot be honoured: the gateway's catalog connection "
                              f"(asyncpg) has no such setting{instead}")
    for key, allowed in (("target_session_attrs", _TARGET_SESSION_ATTRS), ("gsslib", ("gssapi", "sspi"))):
        if key in params and params[key] not in allowed:  # the driver's message showed Python internals
            raise ConfigError(f"{where}: {key} {params[key]!r} is not one of {', '.join(allowed)}")
    port = str(params.get("port", "5432"))
    # "h1,h2" (the default port for both) parses to the port ","
    if not all(not p or p.isdigit() and 0 < int(p) < 65536 for p in port.split(",")):
        if "@" in url:
            # libpq reads a URL's user info up to the first '/': with one in the password,
            # "user:password" is taken for host:port, and the "port" is the password.
            raise ConfigError(f"{where}: its port is not a TCP port (in a URL, a '/' in the user name or "
                              "password must be written %2F)")
        raise ConfigError(f"{where}: port {port!r} is not a TCP port")
    # Parsed, not checked, by libpq's parser: a typo in sslmode, or a TLS file not there (a
    # secret mounted elsewhere), failed the feed at every attempt for good, the latter with
    # 'No such file or directory' naming no file.
    sslmode = str(params.get("sslmode") or os.environ.get("PGSSLMODE") or "prefer")
    if sslmode not in _SSLMODES:
        raise ConfigError(f"{where}: sslmode {sslmode!r} is not one of {', '.join(_SSLMODES)}")
    if sslmode == "disable":
        return
    for key in ("sslrootcert", "sslcert", "sslkey", "sslcrl"):
        file = str(params.get(key, ""))
        if not file or key == "sslrootcert" and file == "system":  # "system": the system's CAs
            continue
        try:
            with open(file, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{where}: {key} {file}: {exc.strerror or exc}") from None


_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_TARGET_SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")

# libpq parameters only the client reads: the replication link (libpq) takes them, the catalog
# connection (asyncpg) is not given them. asyncpg sends any parameter it does not know to the
# server as a setting, which refused it ('unrecognized configuration parameter
# "connect_timeout"') at every attempt: the source never started. client_encoding: both
# connections talk UTF-8 whatever it says.
LIBPQ_CLIENT_ONLY = frozenset({
    "connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout",
    "fallback_application_name", "client_encoding", "sslcompression", "sslsni", "sslcertmode", "load_balance_hosts",
    "gssencmode", "channel_binding",
})
# libpq parameters the catalog connection cannot honour, refused (with what to do instead):
# dropped, they would silently not hold there. gssencmode and channel_binding only as `require`.
_LIBPQ_NOT_HONOURED = {
    "hostaddr": "; give the address as host", "require_auth": "", "requirepeer": "", "gssdelegation": "",
    "sslcrldir": "; give a CRL file as sslcrl", "replication": "; the source opens its replication link itself",
    "gssencmode": "", "channel_binding": "",
}


def _check_mongo_url(where: str, url: str) -> None:
    """A MongoDB URL the driver would refuse, refused at start with the setting's name (the
    driver's own message names no setting). Of a mongodb+srv:// URL what needs no DNS lookup is
    checked: the lookup is the driver's when it connects."""
    if not url:
        return
    with warnings.catch_warnings():
        # The driver warns of an option it drops all the same (compressors=snappy without its
        # module): here, before the log begins, that was plain text on stderr, twice. The
        # feed's own client warns again at start, in the JSON log.
        warnings.simplefilter("ignore")
        bad = _bad_mongo_option(url)
    if bad:
        raise ConfigError(f"{where}: not a valid MongoDB URL (option {bad[0]}): {bad[1]}")
    from pymongo import AsyncMongoClient, MongoClient, uri_parser
    from pymongo.errors import PyMongoError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # as above; what parse_uri let through raises nothing here
            if url.startswith("mongodb+srv://"):
                # The async client checks the rest (one host, no port, options that SRV forbids)
                # without the DNS lookup, which it defers to connecting: `serve` made the same
                # client at start and died with its traceback ("must not include a port number").
                AsyncMongoClient(url, connect=False)
                return
            # warn=False: the driver itself only warns about an unknown option or a bad value and
            # drops it, so `tls=ture` or `tsl=true` connected without TLS, credentials in clear.
            uri_parser.parse_uri(url, warn=False)
            # The client checks the credentials against the mechanism (MONGODB-X509 with a
            # password, GSSAPI without a user) when it is made, not when parsing: the feed's
            # start raised then, a traceback and exit 1. Without connecting nothing is started.
            MongoClient(url, connect=False).close()
    except (PyMongoError, ValueError) as exc:
        raise ConfigError(f"{where}: not a valid MongoDB URL: {exc}") from None


def _check_mongo_database(where: str, url: str, workspaces: list[str]) -> None:
    """The database of `url` (or of each of `workspaces` when it names none) is one MongoDB takes."""
    if not url:
        return
    from rtserver.sources.mongo import database_problem

    for workspace in workspaces or [""]:
        problem = database_problem(url, workspace)
        if problem:
            raise ConfigError(f"{where}: {problem}")


def _bad_mongo_option(url: str) -> tuple[str, str] | None:
    """(name, why) of the first query option of `url` the driver refuses on its own: the
    driver's message for an unknown one does not name it. Never the value: it may be a
    credential (authMechanismProperties)."""
    from pymongo import uri_parser
    from pymongo.errors import PyMongoError

    # The options follow the hosts: a '?' in user info not escaped is no option's start (its
    # "name" was the rest of the password), so the user info goes first, up to the last '@'
    # before the path, as the driver and redact() read it.
    hosts = re.sub(r"^([^:/]*://)[^/]*@", r"\1", url, count=1)
    for name, value in urllib.parse.parse_qsl(hosts.partition("?")[2], keep_blank_values=True):
        try:
            uri_parser.parse_uri("mongodb://localhost/?" + urllib.parse.urlencode({name: value}), warn=False)
        except (PyMongoError, ValueError, OSError) as exc:  # OSError: a tlsCAFile not there (a traceback)
            return name, str(exc)
    return None


def config_table_markdown() -> str:
    """The README's configuration table."""
    rows = ["| setting (TOML) | environment | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = ",".join(s.default) if isinstance(s.default, list) else s.default
        if isinstance(default, bool):  # as TOML writes it: `True` copied into a file was refused
            default = str(default).lower()
        if default == "":
            default = "(empty)"
        rows.append(f"| `{s.section}.{s.key}` | `{s.env}` | `{default}` | {s.help} |")
    return "\n".join(rows)
