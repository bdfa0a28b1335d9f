"""Process lifecycle: zero-config start with dev tokens, config errors, SIGTERM drain."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator

import pytest
import websockets

from rtserver.audit_spool import Spool
from rtserver.config import ConfigError, config_table_markdown, load
from tests.harness.fixtures_gateway import free_port
from tests.harness.http_wire import read_answer
from tests.harness.wsclient import ws_connect


def _run(args: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RT_")}
    base.update(env or {})
    return subprocess.run([sys.executable, "-m", "rtserver", *args], capture_output=True, text=True, env=base,
                          cwd=cwd, timeout=60)


def test_bad_kafka_client_certificate_settings_are_one_line_and_exit_2(tmp_path):
    """audit.ssl_certfile/ssl_keyfile (mutual TLS with Kafka) are checked at start: the Kafka
    client loaded them only when it started, with an error naming neither file nor setting, and
    OpenSSL asked for an encrypted key's passphrase on the terminal. The key never appears."""
    from cryptography.hazmat.primitives import serialization

    from tests.harness.certs import self_signed

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cert, key = self_signed(str(tmp_path / "a"))
    _, other_key = self_signed(str(tmp_path / "b"))
    encrypted = tmp_path / "encrypted.key"
    plain = serialization.load_pem_private_key((tmp_path / "a" / "key.pem").read_bytes(), None)
    encrypted.write_bytes(plain.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.BestAvailableEncryption(b"pass")))
    ssl_env = {"RT_KAFKA_SECURITY_PROTOCOL": "SSL"}
    for env, says in (
        ({**ssl_env, "RT_KAFKA_SSL_CERTFILE": cert}, "audit.ssl_certfile is set but audit.ssl_keyfile is not"),
        ({**ssl_env, "RT_KAFKA_SSL_KEYFILE": key}, "audit.ssl_keyfile is set but audit.ssl_certfile is not"),
        ({"RT_KAFKA_SSL_CERTFILE": cert, "RT_KAFKA_SSL_KEYFILE": key},
         "audit.security_protocol is PLAINTEXT: it would not be used"),
        ({"RT_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "RT_KAFKA_SASL_MECHANISM": "PLAIN",
          "RT_KAFKA_SASL_USERNAME": "rt", "RT_KAFKA_SASL_PASSWORD": "pw", "RT_KAFKA_SSL_CERTFILE": cert,
          "RT_KAFKA_SSL_KEYFILE": key}, "audit.security_protocol is SASL_PLAINTEXT: it would not be used"),
        ({**ssl_env, "RT_KAFKA_SSL_CERTFILE": cert, "RT_KAFKA_SSL_KEYFILE": str(tmp_path / "none.key")},
         f"audit.ssl_keyfile {tmp_path / 'none.key'}: cannot read: No such file or directory"),
        ({**ssl_env, "RT_KAFKA_SSL_CERTFILE": cert, "RT_KAFKA_SSL_KEYFILE": other_key},
         "the private key is not the certificate's"),
        ({**ssl_env, "RT_KAFKA_SSL_CERTFILE": cert, "RT_KAFKA_SSL_KEYFILE": str(encrypted)},
         "the private key is encrypted (passphrase-protected)"),
        ({**ssl_env, "RT_KAFKA_SSL_CERTFILE": key, "RT_KAFKA_SSL_KEYFILE": cert},  # swapped
         f"audit.ssl_certfile {key}: holds no PEM certificate"),
    ):
        out = _run(["serve"], env, cwd=str(tmp_path))
        assert out.returncode == 2, (env, out.stdout, out.stderr)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "configuration error" in lines[0] and says in lines[0], out.stderr
        for keyfile in (key, other_key, str(encrypted)):
            body = [line for line in open(keyfile).read().splitlines() if not line.startswith("-----")]
            assert not any(line in out.stderr for line in body), out.stderr
    # Both, with SSL: accepted (what a broker requiring client certificates gets; tested there).
    from rtserver.config import load

    cfg = load(None, environ={**ssl_env, "RT_KAFKA_SSL_CERTFILE": cert, "RT_KAFKA_SSL_KEYFILE": key})
    assert (cfg.audit.ssl_certfile, cfg.audit.ssl_keyfile) == (cert, key)


def test_version():
    out = _run(["--version"])
    assert out.returncode == 0 and out.stdout.startswith("rtserver ")


def test_bad_config_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = 'eighty'\n")
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("[server]\nnode = 'nœud-é'\n".encode("latin-1", "replace"))  # TOML is UTF-8
    for args, env in (
        (["serve", "--config", str(bad)], {}),
        (["serve", "--config", str(latin1)], {}),
        (["serve", "--config", str(tmp_path / "missing.toml")], {}),
        (["serve"], {"RT_PORT": "99999"}),
        (["serve"], {"RT_MAX_SUBSCRIPTIONS": "many"}),
        (["serve"], {"RT_INSTANCE": "Bad-Name"}),
        (["serve"], {"RT_INSTANCE": "rt\nserver"}),  # the slot name would carry the newline
        (["serve"], {"RT_TLS_CERT": "/x.pem"}),
        (["serve"], {"RT_MONGO_URL": "mongodb://rt:secret@db:port/app"}),
        # parsed, but refused by the driver's client when the feed started: a traceback, exit 1
        (["serve"], {"RT_MONGO_URL": "mongodb://rt:secret@db/app?authMechanism=MONGODB-X509"}),
        (["serve"], {"RT_MONGO_URL": "mongodb://db/app?authMechanism=GSSAPI"}),
        (["serve"], {"RT_AUTH_CHANNEL_CLAIM": "rt.channels"}),
        (["serve"], {"RT_POSTGRES_URL": "postgresql//rt:secret@db/app"}),
        (["serve"], {"RT_POSTGRES_URL": "postgresql://rt:secret@db:port/app"}),
        (["serve"], {"RT_AUTH_LEEWAY": "inf"}),
        # 0: no bound on the key-set fetches that tokens with forged key ids cause
        (["serve"], {"RT_AUTH_JWKS_REFETCH_INTERVAL": "0"}),
        (["serve"], {"RT_KAFKA_SASL_MECHANISM": "BOGUS"}),
        (["serve"], {"RT_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "RT_KAFKA_SASL_MECHANISM": "PLAIN"}),  # no user
        (["serve"], {"RT_KAFKA_SASL_MECHANISM": "PLAIN", "RT_KAFKA_SASL_USERNAME": "rt",
                     "RT_KAFKA_SASL_PASSWORD": "secret"}),  # PLAINTEXT would not send them
        (["serve"], {"RT_KAFKA_SECURITY_PROTOCOL": "SSL", "RT_KAFKA_SSL_CAFILE": str(tmp_path / "none.pem")}),
        (["serve"], {"RT_KAFKA_SECURITY_PROTOCOL": "SSL", "RT_KAFKA_SSL_CAFILE": str(not_pem)}),
        (["serve"], {"RT_KAFKA_SSL_CAFILE": str(not_pem)}),  # PLAINTEXT would not use it
        (["serve"], {"RT_AUDIT_TOPIC_PREFIX": "console realtime."}),  # no Kafka topic has a space
        (["serve"], {"RT_HOST": ""}),  # blank: asyncio would listen on every interface
        # 0 as "unlimited": every client would be refused (4008, 4002) or closed (1001)
        (["serve"], {"RT_MAX_CONNECTIONS": "0"}),
        (["serve"], {"RT_MAX_CONNECTIONS_PER_SUBJECT": "0"}),
        (["serve"], {"RT_MAX_SUBSCRIPTIONS": "0"}),
        (["serve"], {"RT_AUTH_TIMEOUT": "0"}),
        (["serve"], {"RT_IDLE_TIMEOUT": "0"}),
        # under one request's body (limits.max_publish_bytes): the bound would pause every pipeline
        (["serve"], {"RT_PIPELINED_PUBLISH_BYTES": "1000"}),
        (["serve"], {"RT_KAFKA_BOOTSTRAP": "kafka1:9092,kafka2:port"}),
        (["serve"], {"RT_KAFKA_BOOTSTRAP": "http://kafka:9092"}),
        (["serve"], {"RT_KAFKA_BOOTSTRAP": "rt:secret@kafka:9092"}),  # credentials go in the SASL settings
        (["serve"], {"RT_BUS_KAFKA_BOOTSTRAP": "kafka1:9092,SASL_SSL://rt:secret@kafka2:9092"}),
        (["serve"], {"RT_BUS_KAFKA_BOOTSTRAP": "127.0.0.1:99999"}),
        (["serve"], {"RT_STATE_DIR": " "}),  # blank: the state would land in the working directory
        (["serve"], {"RT_BUS_TOPIC": ""}),
        (["serve"], {"RT_BUS_TOPIC": "events/" + "x" * 10}),
        (["serve"], {"RT_AUDIT_TOPIC_PREFIX": "p" * 240}),  # beyond Kafka's 249 characters
        (["serve", "--config", ""], {}),  # `--config "$CFG"`, CFG unset: was a dev-mode gateway on defaults
        (["serve"], {"RT_GC_FREEZE": ""}),  # blank: was "false", turning off what is on by default
        (["serve"], {"RT_AUTH_LEEWAY": "7200"}),  # accepts tokens expired two hours ago
        (["serve"], {"RT_IDLE_TIMEOUT": "1e300"}),
        (["serve"], {"RT_KAFKA_SASL_USERNAME": "rt", "RT_KAFKA_SASL_PASSWORD": "secret"}),  # PLAINTEXT: unused
        (["serve"], {"RT_MAX_MESSAGE_BYTES": "7"}),  # no auth message fits
        (["serve"], {"RT_POSTGRES_URL": "postgresql://rt:secret@db/app", "RT_POSTGRES_SCHEMAS": ""}),
        # passed, then the feed failed at every attempt ('expected to be one of <built-in method...')
        (["serve"], {"RT_POSTGRES_URL": "postgresql://rt:secret@db/app?target_session_attrs=bogus"}),
        (["serve"], {"RT_POSTGRES_URL": "host=db password=secret hostaddr=10.0.0.1"}),  # asyncpg has none
        (["serve"], {"RT_MONGO_URL": "mongodb+srv://rt:secret@cluster.example.com:27017/app"}),  # was a traceback
    ):
        out = _run(args, env, cwd=str(tmp_path))
        assert out.returncode == 2, (args, env, out.stdout, out.stderr)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "configuration error" in lines[0], out.stderr
        assert "secret" not in out.stderr
    ws = tmp_path / "ws.toml"
    ws.write_text("[workspaces.acme]\nmongo_url = 'mongodb://db:99999/app'\n")
    out = _run(["serve", "--config", str(ws)], cwd=str(tmp_path))
    assert out.returncode == 2 and "[workspaces.acme] mongo_url: not a valid MongoDB URL" in out.stderr, out.stderr


def test_configuration_errors_say_what_to_change(tmp_path):
    """From a black-box audit: errors that showed Python internals or no key, a file with a
    byte-order mark refused at "line 1, column 1", a setting written in the wrong section, a
    PostgreSQL URL refused without naming its parameter, and valid forms refused or empties kept."""
    def refused(text: str | None = None, environ: dict[str, str] | None = None, data: bytes | None = None) -> str:
        cfg = tmp_path / "c.toml"
        if data is not None:
            cfg.write_bytes(data)
        elif text is not None:
            cfg.write_text(text)
        with pytest.raises(ConfigError) as info:
            load(str(cfg) if text is not None or data is not None else None, environ=environ or {})
        return str(info.value)

    assert refused("[limits]\nport = 1\n").endswith("unknown setting limits.port (port is a setting of [server])")
    assert refused("[server]\nport = [1]\n").endswith("(server.port): invalid value [1]: expected an integer")
    assert refused("[auth]\nleeway = {a = 1}\n").endswith("invalid value {'a': 1}: expected a number")
    assert "[workspaces.a] postgres_schemas: expected a list" in refused("[workspaces.a]\npostgres_schemas = 5\n")
    assert "[workspaces.a] postgres_url: expected a string" in refused("[workspaces.a]\npostgres_url = 5\n")
    assert "postgres_schemas and postgres_tables are both empty" in refused(
        "[workspaces.a]\npostgres_url = 'postgresql://db/a'\npostgres_schemas = []\n")
    assert "postgres.schemas and postgres.tables are both empty" in refused(
        "[postgres]\nurl = 'postgresql://db/a'\nschemas = ['', ' ']\n")
    assert "set auth.channel_permissions (RT_AUTH_CHANNEL_PERMISSIONS) to true" in refused(
        "[auth]\nchannel_claim = 'x'\n")
    assert refused(environ={"RT_DEMO": ""}).endswith("invalid value '': expected true or false (it is empty)")
    assert refused(environ={"RT_RESUME_TTL": "1e300"}).endswith("too large (at most 31536000 seconds, 365 days)")
    assert "auth.leeway 3601 is more than 3600 seconds" in refused(environ={"RT_AUTH_LEEWAY": "3601"})
    assert load(environ={"RT_AUTH_LEEWAY": "3600", "RT_RESUME_TTL": "31536000"}).auth.leeway == 3600
    assert refused(environ={"RT_KAFKA_SASL_PASSWORD": "p"}).startswith(
        "audit.sasl_password is set but audit.security_protocol is PLAINTEXT: the credentials would not be sent")
    assert "limits.max_message_bytes 1023 is under 1024" in refused(environ={"RT_MAX_MESSAGE_BYTES": "1023"})
    assert "must be a lower-case letter or _, then lower-case letters, digits and _, 41 characters at most" in \
        refused(environ={"RT_INSTANCE": "a" * 42})
    pg = {"RT_POSTGRES_URL": "postgresql://rt:pw@db/app?bogus=1"}
    assert refused(environ=pg).endswith("libpq has no parameter 'bogus'") and "pw" not in refused(environ=pg)
    for query, said in (("target_session_attrs=bogus", "target_session_attrs 'bogus' is not one of any, read-write"),
                        ("gsslib=bogus", "gsslib 'bogus' is not one of gssapi, sspi"),
                        ("hostaddr=10.0.0.1", "hostaddr=10.0.0.1 cannot be honoured: the gateway's catalog connection"),
                        ("channel_binding=require", "channel_binding=require cannot be honoured")):
        assert said in refused(environ={"RT_POSTGRES_URL": f"postgresql://db/app?{query}"}), query
    assert "must not include a port number" in refused(environ={"RT_MONGO_URL": "mongodb+srv://cl.example.com:1/a"})
    assert "one, and only one, hostname" in refused(environ={"RT_MONGO_URL": "mongodb+srv://a.example.com,b.example.com/a"})
    # Accepted: a BOM, libpq's client-only parameters, hosts without ports, an SRV URL without DNS.
    cfg = tmp_path / "bom.toml"
    cfg.write_bytes(b"\xef\xbb\xbf[server]\nport = 9000\n[postgres]\nschemas = ['', 'a']\n")
    taken = load(str(cfg), environ={
        "RT_POSTGRES_URL": "postgresql://rt@h1,h2/app?connect_timeout=10&keepalives_idle=30&channel_binding=prefer",
        "RT_MONGO_URL": "mongodb+srv://cluster.example.com/app"})
    assert (taken.server.port, taken.postgres.schemas) == (9000, ["a"])
    assert "| `server.gc_freeze` | `RT_GC_FREEZE` | `true` |" in config_table_markdown()


def test_a_setting_whose_bytes_are_not_utf8_is_one_line_and_exit_2(tmp_path):
    """An environment variable whose bytes are not UTF-8 (a Latin-1 database name or password)
    reaches Python as lone surrogates: a PostgreSQL or MongoDB URL carrying them ended the
    start with a plain-text traceback before the log began (exit 1), a secret or a host with an
    'uncaught exception' line. Each is a configuration error naming the variable, one line,
    exit 2, the secret not shown; a path may be any bytes and is taken as it is."""
    latin1 = os.fsdecode(b"caf\xe9")
    for env in ({"RT_POSTGRES_URL": f"postgresql://rt:s3cret@127.0.0.1:1/{latin1}"},
                {"RT_MONGO_URL": f"mongodb://rt:s3cret@127.0.0.1:1/{latin1}"},
                {"RT_AUTH_HS256_SECRET": f"s3cret-0123456789abcdef0123456789-{latin1}"},
                {"RT_HOST": f"{latin1}.example"}):
        out = _run(["serve"], env, cwd=str(tmp_path))
        assert out.returncode == 2, (env, out.stderr)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "configuration error" in lines[0], out.stderr
        (name,) = env
        assert f"environment {name}" in lines[0] and "not UTF-8 text (byte 0xe9" in lines[0], lines[0]
        assert "s3cret" not in out.stderr


def test_sections_sharing_a_postgres_url_with_other_tables_are_refused(tmp_path):
    """Sections naming one postgres_url share one source and publication, made with the first
    section's schemas and tables: the second's were ignored without a word. Asking for others
    is a configuration error naming both sections; asking for the same still starts."""
    url = "postgresql://rt:s3cret@db/app"
    cfg = tmp_path / "rt.toml"
    cfg.write_text(f"[workspaces.a]\npostgres_url = '{url}'\npostgres_tables = ['public.orders']\n"
                   f"[workspaces.b]\npostgres_url = '{url}'\n")
    out = _run(["serve", "--config", str(cfg)], cwd=str(tmp_path))
    assert out.returncode == 2 and "[workspaces.b] names the postgres_url of [workspaces.a]" in out.stderr, out.stderr
    assert "s3cret" not in out.stderr
    out = _run(["serve", "--config", str(cfg)], {"RT_POSTGRES_URL": url, "RT_POSTGRES_TABLES": "public.orders"},
               cwd=str(tmp_path))
    assert out.returncode == 2 and "[workspaces.b] names the postgres_url of [postgres]" in out.stderr, out.stderr
    cfg.write_text(f"[workspaces.a]\npostgres_url = '{url}'\n[workspaces.b]\npostgres_url = '{url}'\n")
    loaded = load(path=str(cfg), environ={})
    assert [loaded.workspaces[w].postgres_url for w in "ab"] == [url, url]



def test_one_postgres_database_named_by_two_spellings_is_refused(tmp_path):
    """Two sections naming one database by URLs spelled differently (an option added, the
    default port written out) made two sources on one replication slot, whose name holds the
    database's only: the second found the slot in use and retried for ever, its workspace's
    subscribers accepted and given nothing, /readyz 503 for good. A configuration error now."""
    url = "postgresql://rt:s3cret@db/app"
    cfg = tmp_path / "rt.toml"
    for other in (url + "?application_name=b", "postgresql://rt:s3cret@DB:5432/app", "host=db dbname=app user=x"):
        cfg.write_text(f"[workspaces.a]\npostgres_url = '{url}'\n[workspaces.b]\npostgres_url = '{other}'\n")
        out = _run(["serve", "--config", str(cfg)], cwd=str(tmp_path))
        assert out.returncode == 2, (other, out.stderr)
        assert "[workspaces.b] postgres_url names the database of [workspaces.a] (app on db:5432)" in out.stderr, out.stderr
        assert "s3cret" not in out.stderr
    cfg.write_text(f"[workspaces.b]\npostgres_url = '{url}?sslmode=disable'\n")
    out = _run(["serve", "--config", str(cfg)], {"RT_POSTGRES_URL": url}, cwd=str(tmp_path))
    assert out.returncode == 2 and "[workspaces.b] postgres_url names the database of [postgres]" in out.stderr
    # Other databases, or one server's databases with other users, are other sources.
    cfg.write_text(f"[workspaces.a]\npostgres_url = '{url}'\n[workspaces.b]\npostgres_url = 'postgresql://rt:s3cret@db/app2'\n"
                   "[workspaces.c]\npostgres_url = 'postgresql://rt:s3cret@db2/app'\n"
                   "[workspaces.d]\npostgres_url = 'postgresql://other:pw@db/app3?sslmode=require'\n")
    loaded = load(path=str(cfg), environ={})
    assert sorted(loaded.workspaces) == ["a", "b", "c", "d"]


def test_one_mongodb_database_named_by_two_spellings_is_refused(tmp_path):
    """A MongoDB feed's resume token file is named by deployment and database, not by the whole
    URL (adding an option would lose the changes made during the restart): two spellings of
    one database would be two feeds writing one file. A configuration error, as for PostgreSQL."""
    url = "mongodb://rt:s3cret@m1,m2/app?replicaSet=rs0"
    cfg = tmp_path / "rt.toml"
    for other in (url + "&appname=b", "mongodb://rt:s3cret@M2:27017,m1/app?replicaSet=rs0"):
        cfg.write_text(f"[workspaces.a]\nmongo_url = '{url}'\n[workspaces.b]\nmongo_url = '{other}'\n")
        with pytest.raises(ConfigError, match=r"\[workspaces.b\] mongo_url names MongoDB database 'app' of "
                                              r"\[workspaces.a\] by another URL") as err:
            load(path=str(cfg), environ={})
        assert "s3cret" not in str(err.value)
    # The default URL naming no database: workspace shop, which bus.workspaces lists (the ingest
    # feeds it), reads shop on it. Not listed, it may never connect: accepted (a section naming
    # any database of that deployment was refused, with advice no URL could follow), and its
    # mongo channels are refused at run time (test_mongo_e2e).
    cfg.write_text("[workspaces.a]\nmongo_url = 'mongodb://m1:27017/shop?appname=a'\n")
    with pytest.raises(ConfigError, match=r"\[workspaces.a\] mongo_url names MongoDB database 'shop' of \[mongo\]"):
        load(path=str(cfg), environ={"RT_MONGO_URL": "mongodb://m1/", "RT_BUS_WORKSPACES": "shop"})
    assert list(load(path=str(cfg), environ={"RT_MONGO_URL": "mongodb://m1/"}).workspaces) == ["a"]
    # Other databases, deployments, or users of one deployment's databases are other feeds.
    cfg.write_text(f"[workspaces.a]\nmongo_url = '{url}'\n[workspaces.b]\nmongo_url = 'mongodb://u2:pw@m1,m2/app2'\n"
                   f"[workspaces.c]\nmongo_url = 'mongodb://m3/app'\n[workspaces.shop]\nmongo_url = 'mongodb://m1/'\n")
    loaded = load(path=str(cfg), environ={"RT_MONGO_URL": "mongodb://m1/?appname=default"})
    assert sorted(loaded.workspaces) == ["a", "b", "c", "shop"]


def test_mongo_max_databases_must_be_positive(tmp_path):
    """0 would refuse every workspace's database while the URL says to read them."""
    for value, said in (("0", "must be positive"), ("-1", "must not be negative")):
        with pytest.raises(ConfigError, match=rf"mongo.max_databases.*{said}"):
            load(environ={"RT_STATE_DIR": str(tmp_path), "RT_MONGO_MAX_DATABASES": value})
    assert load(environ={"RT_STATE_DIR": str(tmp_path), "RT_MONGO_MAX_DATABASES": "1"}).mongo.max_databases == 1


def test_a_lease_timeout_under_the_brokers_minimum_is_refused(tmp_path):
    """bus.lease_timeout (the ingest lease's Kafka group session timeout) under 6 s was raised to
    6 without a word, and check-config showed the value that was not in effect."""
    with pytest.raises(ConfigError, match=r"bus.lease_timeout 3 must be at least 6 .* \(bus.lease_timeout from "
                                          r"environment RT_BUS_LEASE_TIMEOUT\)"):
        load(environ={"RT_STATE_DIR": str(tmp_path), "RT_BUS_LEASE_TIMEOUT": "3"})
    assert load(environ={"RT_STATE_DIR": str(tmp_path), "RT_BUS_LEASE_TIMEOUT": "6"}).bus.lease_timeout == 6


def test_a_record_size_kafka_cannot_make_a_topic_for_is_refused(tmp_path):
    """bus.max_record_bytes near 2 GiB passed check-config, then the ingest stopped at its start:
    the topic's max.message.bytes (64 KiB more) is past the 32-bit integer Kafka takes."""
    env = {"RT_STATE_DIR": str(tmp_path)}
    for value in ("2147483647", "2147418112", "0"):
        with pytest.raises(ConfigError, match=r"bus.max_record_bytes \d+ must be from 1 to 2147418111: .* "
                                              r"\(bus.max_record_bytes from environment RT_BUS_MAX_RECORD_BYTES\)"):
            load(environ={**env, "RT_BUS_MAX_RECORD_BYTES": value})
    assert load(environ={**env, "RT_BUS_MAX_RECORD_BYTES": "2147418111"}).bus.max_record_bytes == 2147418111


def test_a_configured_mongodb_database_name_longer_than_mongodb_takes_is_refused(tmp_path):
    """A URL naming no database reads the database named like the workspace, and a workspace id
    may be 64 characters where MongoDB takes 63: a feed that would fail at every attempt."""
    long_id = "w" * 64
    cfg_file = tmp_path / "ws.toml"
    cfg_file.write_text(f"[workspaces.{long_id}]\nmongo_url = 'mongodb://db/'\n")
    env = {"RT_STATE_DIR": str(tmp_path)}
    with pytest.raises(ConfigError, match=rf"\[workspaces.{long_id}\] mongo_url: MongoDB database '{long_id}'"):
        load(str(cfg_file), environ=env)
    with pytest.raises(ConfigError, match="mongo.url .*: MongoDB database .* is longer than MongoDB takes"):
        load(environ={**env, "RT_MONGO_URL": "mongodb://db/", "RT_BUS_WORKSPACES": f"w1,{long_id}"})
    with pytest.raises(ConfigError, match="longer than MongoDB takes"):
        load(environ={**env, "RT_MONGO_URL": "mongodb://db/" + "d" * 64})
    load(environ={**env, "RT_MONGO_URL": "mongodb://db/", "RT_BUS_WORKSPACES": "w" * 63})


def test_a_mongodb_url_whose_database_has_a_dot_is_refused_at_start(tmp_path):
    """`mongodb://db/app.orders`: the driver reads database `app` (and a collection `orders`),
    the feed read `app.orders`, which MongoDB and the driver refuse (InvalidName): the URL was
    accepted, then the node stayed not ready for good and every `mongo:` subscribe got 4010."""
    env = {"RT_STATE_DIR": str(tmp_path)}
    with pytest.raises(ConfigError) as internal:  # the URL's database: no workspace to name ("of workspace )")
        load(environ={**env, "RT_MONGO_URL": "mongodb://db/admin"})
    assert "MongoDB database 'admin' is internal to MongoDB" in str(internal.value), str(internal.value)
    for url in ("mongodb://db/app.orders", "mongodb://db/app%2Eorders?replicaSet=rs0"):
        with pytest.raises(ConfigError, match=r"mongo.url .*: MongoDB database 'app.orders' cannot contain '\.'"):
            load(environ={**env, "RT_MONGO_URL": url})
    cfg_file = tmp_path / "ws.toml"
    cfg_file.write_text("[workspaces.a]\nmongo_url = 'mongodb://db/app.orders'\n")
    with pytest.raises(ConfigError, match=r"\[workspaces.a\] mongo_url: MongoDB database 'app.orders'"):
        load(str(cfg_file), environ=env)
    load(environ={**env, "RT_MONGO_URL": "mongodb://db/app-orders_2"})


@pytest.mark.parametrize("url", ["mongodb://rt:pa?s3cretTail@db/app", "mongodb://rt:pa?s3cretTail@db/app?tls=true"])
def test_a_mongo_url_refused_for_its_user_info_does_not_repeat_the_password(tmp_path, url):
    """A '?' in a password not escaped was read as the start of the options: the error named
    the "option" `s3cretTail@db/app`, the password's tail, on stderr and in the service's log."""
    with pytest.raises(ConfigError) as refused:
        load(environ={"RT_STATE_DIR": str(tmp_path), "RT_MONGO_URL": url})
    assert "s3cret" not in str(refused.value), refused.value


def test_a_postgres_url_refused_for_its_user_info_does_not_repeat_the_password(tmp_path):
    """libpq reads the user info up to the first '/': a '/' in a password not escaped makes
    `rt:s3cretHead` the host and port, and the error said "port 's3cretHead' is not a TCP port"."""
    with pytest.raises(ConfigError) as refused:
        load(environ={"RT_STATE_DIR": str(tmp_path), "RT_POSTGRES_URL": "postgresql://rt:s3cretHead/tail@db/app"})
    assert "s3cret" not in str(refused.value) and "%2F" in str(refused.value), refused.value
    with pytest.raises(ConfigError, match="port '54e2' is not a TCP port"):  # a port written as such is named
        load(environ={"RT_STATE_DIR": str(tmp_path), "RT_POSTGRES_URL": "host=db port=54e2 dbname=app"})


def test_a_value_ending_with_a_newline_is_taken_without_it_but_a_secret_as_given(tmp_path):
    """Values from a file (a ConfigMap or env file made with --from-file) end with a newline:
    an issuer carrying it refused every token, an instance name made a slot name PostgreSQL
    refused. Surrounding whitespace is dropped, except from secrets."""
    cfg = load(environ={"RT_STATE_DIR": f" {tmp_path}\n", "RT_AUTH_ISSUER": "https://idp/realms/acme\n",
                        "RT_INSTANCE": "blue\n", "RT_POSTGRES_URL": "postgresql://rt@db/app\r\n",
                        "RT_AUTH_HS256_SECRET": "s3cr3t\n", "RT_KAFKA_SASL_PASSWORD": " pw\n",
                        "RT_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "RT_KAFKA_SASL_MECHANISM": "PLAIN",
                        "RT_KAFKA_SASL_USERNAME": "rt"})
    assert cfg.server.state_dir == str(tmp_path) and cfg.server.instance == "blue"
    assert cfg.auth.issuer == "https://idp/realms/acme" and cfg.postgres.url == "postgresql://rt@db/app"
    assert cfg.auth.hs256_secret == "s3cr3t\n" and cfg.audit.sasl_password == " pw\n"
    toml = tmp_path / "ws.toml"
    toml.write_text('[postgres]\nschemas = ["public ", "sales\\n"]\n'
                    '[workspaces.acme]\npostgres_url = "postgresql://rt@db/acme\\n"\nmongo_url = " mongodb://db/acme "\n')
    cfg = load(str(toml), environ={"RT_STATE_DIR": str(tmp_path)})
    assert cfg.postgres.schemas == ["public", "sales"]
    acme = cfg.sources_for("acme")
    assert (acme.postgres_url, acme.mongo_url) == ("postgresql://rt@db/acme", "mongodb://db/acme")


def test_a_mongo_url_option_the_driver_would_drop_is_a_configuration_error(tmp_path):
    """The driver only warns about an unknown option or a bad value and drops it: `tls=ture` or
    `tsl=true` connected without TLS. Refused at start, naming the option, never its value."""
    env = {"RT_STATE_DIR": str(tmp_path)}
    for query, option in (("tls=ture", "tls"), ("tsl=true", "tsl"), ("replicaSet=rs0&readPreference=secondry",
                          "readPreference"), ("authMechanismProperties=AWS_SESSION_TOKEN:s3cr3t&maxPoolSize=x",
                                              "maxPoolSize")):
        with pytest.raises(ConfigError) as refused:
            load(environ={**env, "RT_MONGO_URL": f"mongodb://db/app?{query}"})
        message = str(refused.value)
        assert message.startswith("mongo.url (RT_MONGO_URL): not a valid MongoDB URL"), message
        assert f"(option {option})" in message and "s3cr3t" not in message, message
    # the options of a mongodb+srv:// URL too (the rest of it needs DNS: the driver's, later)
    with pytest.raises(ConfigError, match=r"\(option tsl\)"):
        load(environ={**env, "RT_MONGO_URL": "mongodb+srv://cluster0.example.net/app?tsl=true"})
    load(environ={**env, "RT_MONGO_URL": "mongodb+srv://cluster0.example.net/app?retryWrites=true"})
    cfg = load(environ={**env, "RT_MONGO_URL": "mongodb://db/app?replicaSet=rs0&tls=true&readPreference=secondary"})
    assert cfg.mongo.url.endswith("readPreference=secondary")


def test_config_sections_read_the_values_they_hold(tmp_path):
    """cfg.limits (any section) is made once and kept, and reads its section's dict itself: a
    value set in cfg.values shows through it; an unknown key or section is an AttributeError
    naming it."""
    cfg = load(environ={"RT_STATE_DIR": str(tmp_path), "RT_MAX_CONNECTIONS": "7"})
    limits = cfg.limits
    assert cfg.limits is limits and limits.max_connections == 7 == cfg.get("limits", "max_connections")
    cfg.values["limits"]["max_connections"] = 9
    assert cfg.limits.max_connections == 9
    with pytest.raises(AttributeError, match="limits.no_such_key"):
        _ = cfg.limits.no_such_key
    with pytest.raises(AttributeError, match="no_such_section"):
        _ = cfg.no_such_section
    assert vars(cfg.server) is cfg.values["server"] and "_name" not in cfg.values["server"]


def test_unknown_config_setting_is_an_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[server]\nprot = 1\n")
    out = _run(["serve", "--config", str(cfg)], cwd=str(tmp_path))
    assert out.returncode == 2 and "server.prot" in out.stderr


def test_a_misplaced_or_misspelt_config_key_says_what_was_meant():
    """A setting written above every section (`port = 9000`) was refused as an "unknown section
    [port]", and a misspelt key or section with no hint, while a misspelt RT_* variable is
    named with the setting it resembles. Each now says where the setting belongs."""
    for text, said in (
        ("port = 9000\n[server]\nhost = '0.0.0.0'\n", "port is outside any section: it belongs under [server]"),
        ("[limits]\nmax_conections = 5\n", "unknown setting limits.max_conections (did you mean limits.max_connections?)"),
        ("[limit]\nmax_connections = 5\n", "unknown section [limit] (did you mean [limits]?)"),
        ("[server]\nprot = 1\n", "unknown setting server.prot (did you mean server.port?)"),
        ("[server]\nzzz = 1\n", "unknown setting server.zzz"),
    ):
        with tempfile.NamedTemporaryFile("w", suffix=".toml") as fh:
            fh.write(text)
            fh.flush()
            with pytest.raises(ConfigError) as err:
                load(fh.name, environ={})
        assert str(err.value) == f"config file {fh.name}: {said}", str(err.value)


async def test_zero_config_serve_and_dev_token(tmp_path):
    """`rtserver serve` with no configuration; `rtserver token` in the same directory agrees."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RT_")}
    env["RT_PORT"] = str(port)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def low_soft_limit() -> None:  # as a service manager's usual 1024, lower still
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "rtserver", "serve", cwd=str(tmp_path), env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                preexec_fn=low_soft_limit)
    try:
        class _GW:
            def ws_url(self, ws: str) -> str:
                return f"ws://127.0.0.1:{port}/workspaces/{ws}/realtime/connect"

        deadline = time.monotonic() + 15
        while True:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                assert time.monotonic() < deadline, "gateway did not start"
                await asyncio.sleep(0.1)
        # The open-files limit is raised to the hard one: a soft 1024 would stop it near 1000 clients.
        with open(f"/proc/{proc.pid}/limits") as fh:
            soft = next(line.split()[3] for line in fh if line.startswith("Max open files"))
        assert soft == ("unlimited" if hard == resource.RLIM_INFINITY else str(hard)), soft
        token = _run(["token", "--workspace", "demo", "--publish"], cwd=str(tmp_path)).stdout.strip()
        assert token.count(".") == 2
        async with ws_connect(_GW(), "demo", token=token) as c:
            await c.subscribe("events:hello")
        assert (tmp_path / ".rtserver" / "dev-secret").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0
    assert b"dev mode" in out
    # The state directory and all in it (secret, session ids) are private. No default change
    # feed records into workspaces here: none is remembered (Gateway._remember).
    state = tmp_path / ".rtserver"
    assert {p.name for p in state.iterdir()} >= {"dev-secret", "sessions.json"}
    assert not (state / "workspaces").exists()
    for path in [state, *state.iterdir()]:
        assert path.stat().st_mode & 0o077 == 0, (path, oct(path.stat().st_mode))


def test_unusable_state_directory_is_one_line(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    # the ingest too: it said only `rtserver ingest: .../state: Not a directory`, not which setting
    for args in (["serve"], ["token", "--workspace", "w1"], ["ingest"]):
        out = _run(args, {"RT_STATE_DIR": str(blocked / "state"), "RT_KAFKA_BOOTSTRAP": "127.0.0.1:9"}, cwd=str(tmp_path))
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and len(lines) == 1, out.stderr
        assert f"state directory {blocked / 'state'} (server.state_dir)" in lines[0], out.stderr


async def test_sigterm_drains_with_1001_and_exits_0(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as a, ws_connect(
        gateway, "w1", token=gateway.token("w1", sub="b")
    ) as b:
        await a.subscribe("events:x")
        await b.subscribe("events:x")
        t0 = time.monotonic()
        gateway.proc.send_signal(signal.SIGTERM)
        assert await a.expect_close(10) == (1001, "going_away")
        assert await b.expect_close(10) == (1001, "going_away")
        code = await asyncio.wait_for(gateway.proc.wait(), 12)
        assert code == 0 and time.monotonic() - t0 < 10


async def _slow_subscriber(gw, frames: int):
    """A subscribed client that stops reading, with `frames` ~60 KB events queued for it."""
    ws = await websockets.connect(gw.ws_url("w1"), max_size=None, max_queue=1)
    await ws.send(json.dumps({"type": "auth", "token": gw.token("w1")}))
    await ws.recv()
    await ws.send(json.dumps({"type": "subscribe", "channel": "events:big"}))
    await ws.recv()
    ws.transport.pause_reading()
    for i in range(frames):
        await gw.publish("w1", "big", {"blob": "x" * 60000, "i": i})
    return ws


async def test_drain_waits_for_a_slow_reader_to_take_its_frames(gateway_factory):
    """A client behind on reading gets what was queued for it, then the 1001, when it catches
    up within the shutdown timeout."""
    # a send buffer large enough that the gateway does not give up on it first (1013)
    gw = await gateway_factory(env={"RT_SHUTDOWN_TIMEOUT": "10", "RT_SEND_BUFFER_BYTES": str(32 << 20)})
    ws = await _slow_subscriber(gw, 100)  # ~6 MB: more than the socket buffers take
    gw.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(1.0)  # the gateway is draining, the client not reading yet
    ws.transport.resume_reading()
    got = []
    try:
        while True:
            got.append(json.loads(await asyncio.wait_for(ws.recv(), 10))["payload"]["i"])
    except websockets.ConnectionClosed as exc:
        assert exc.rcvd is not None and exc.rcvd.code == 1001
    assert got == list(range(100))
    assert await asyncio.wait_for(gw.proc.wait(), 15) == 0


async def test_second_signal_ends_a_stuck_drain_at_once(gateway_factory):
    gw = await gateway_factory(env={"RT_SHUTDOWN_TIMEOUT": "30", "RT_SEND_BUFFER_BYTES": str(32 << 20)})
    ws = await _slow_subscriber(gw, 100)  # never reads: the drain would wait ~28 s
    gw.proc.send_signal(signal.SIGTERM)
    # The drain begun before the second signal: a loaded machine could take the SIGINT first.
    deadline = time.monotonic() + 20
    while '"draining"' not in gw.logs() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert gw.proc.returncode is None  # still draining
    t0 = time.monotonic()
    gw.proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(gw.proc.wait(), 5) == 1
    assert time.monotonic() - t0 < 3
    assert "did not stop cleanly (a second signal)" in gw.logs()
    ws.transport.abort()


def test_unusable_audit_spool_is_one_line(tmp_path):
    """An audit spool the gateway cannot use (a file in the way, or another process holding its
    lock) is a one-line start-up error naming audit.spool_dir, exit 2: no traceback."""
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    held = Spool(str(tmp_path / "held"), 1 << 20)
    held.open()  # as a second gateway sharing the spool would
    try:
        # A file in the way is foreseen before the start, as check-config foresees it.
        for spool_dir, why in ((blocked / "spool", f"cannot be made: {blocked} is not a directory"),
                               (tmp_path / "held", "in use by another process")):
            env = {"RT_KAFKA_BOOTSTRAP": "127.0.0.1:9", "RT_AUDIT_SPOOL_DIR": str(spool_dir),
                   "RT_PORT": str(free_port())}  # the spool opens before any Kafka connection
            out = _run(["serve"], env, cwd=str(tmp_path))
            problems = [line for line in out.stderr.splitlines() if not line.startswith("{")]
            assert out.returncode == 2 and len(problems) == 1, out.stderr
            assert re.sub(r"^rtserver: (configuration error: )?", "", problems[0]).startswith(
                f"audit spool {spool_dir} (audit.spool_dir): {why}"), out.stderr
            assert "Traceback" not in out.stderr
    finally:
        held.close()


def test_start_up_errors_say_what_failed(tmp_path):
    """A port in use says so; a state file the gateway cannot read says which file, not that the
    port could not be listened on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _run(["serve"], {"RT_PORT": str(port), "RT_STATE_DIR": str(tmp_path / "a")}, cwd=str(tmp_path))
    problems = [line for line in out.stderr.splitlines() if not line.startswith("{")]
    assert out.returncode == 2 and len(problems) == 1, out.stderr
    assert problems[0].startswith(f"rtserver: cannot listen on 127.0.0.1:{port}: "), out.stderr

    state = tmp_path / "b"
    (state / "sessions.json").mkdir(parents=True)  # in the way of the sessions saved at shutdown
    out = _run(["serve"], {"RT_PORT": str(free_port()), "RT_STATE_DIR": str(state)}, cwd=str(tmp_path))
    problems = [line for line in out.stderr.splitlines() if not line.startswith("{")]
    assert out.returncode == 2 and len(problems) == 1, out.stderr
    assert problems[0] == f"rtserver: {state / 'sessions.json'}: Is a directory", out.stderr


async def test_a_failed_start_keeps_the_saved_sessions_and_stops_what_it_began(gateway):
    """The sessions a drained stop saved survive a start that fails (here: the port taken by
    another process) and are resumed at the next one. What the failed start began is stopped
    as at a clean stop before the error is reported: its seq reservation, 30 s ahead of the
    clock, was left, so the quick restart warned "the clock is behind positions handed out
    before" and handed out positions that far ahead."""
    token = gateway.token("w1")
    async with ws_connect(gateway, "w1", token=token) as c:
        await c.subscribe("events:t")
        await c.send({"type": "auth", "token": token})
        session = (await c.recv_type("auth_ok"))["sessionId"]
        assert await gateway.stop() == 0  # SIGTERM: drained, the session saved
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the closed connections' TIME_WAIT
        taken.bind(("127.0.0.1", gateway.port))
        taken.listen()
        with pytest.raises(RuntimeError, match="exited with 2"):
            await gateway.start()
    assert f"cannot listen on 127.0.0.1:{gateway.port}" in gateway.logs()
    await gateway.start()
    async with ws_connect(gateway, "w1") as c:
        ok = await c.auth(token, resume=session)
        assert ok["resumed"] is True and ok["sessionId"] == session
    seq = (await gateway.publish("w1", "t", {"n": 1}))["seq"]
    assert seq < time.time_ns() // 1000 + 5_000_000  # not 30 s ahead of the clock
    assert "clock is behind" not in gateway.logs()


_WITHOUT_EXTENSIONS = """
import sys

class NotBuilt:
    # As in a checkout where the rtcore extensions were never compiled.
    def find_spec(self, name, path=None, target=None):
        if name in ("rtcore.fanout", "rtcore.frames", "rtcore.index", "rtcore.predicate", "rtcore.mongo",
                    "rtcore.pgoutput"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotBuilt())
from rtserver.cli import main
sys.exit(main(["serve"]))
"""


def _log_until_listening(script: str, tmp_path) -> list[dict]:
    """Run `script` (a gateway start) until it logs "listening", stop it; its log lines, each
    one JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RT_")}
    env["RT_PORT"] = str(free_port())
    log_path = tmp_path / "gateway.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=str(tmp_path), env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while b'"listening"' not in log_path.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    return [json.loads(line) for line in log_path.read_text().splitlines()]


def test_without_the_compiled_core_every_line_is_json(tmp_path):
    """The gateway runs on the pure-Python engine when the extensions are not built, and says
    so in the JSON log like everything else (not as a bare line on stderr before it)."""
    lines = _log_until_listening(_WITHOUT_EXTENSIONS, tmp_path)
    engine = next(line for line in lines if line["logger"] == "rtserver.engine")
    assert "pure-Python reference engine" in engine["msg"] and "rtcore." in engine["error"]
    assert next(line for line in lines if line["msg"] == "listening")["compiled_core"] is False


def test_decoders_not_built_are_named_at_start(tmp_path):
    """The PostgreSQL and MongoDB decoders fell back to their references without a word, and
    the start-up line said compiled_core true (packaging audit): it says false now, naming
    the modules whose references run, after a warning that names them."""
    script = _WITHOUT_EXTENSIONS.replace('"rtcore.fanout", "rtcore.frames", "rtcore.index", "rtcore.predicate", ', "")
    lines = _log_until_listening(script, tmp_path)
    listening = next(line for line in lines if line["msg"] == "listening")
    assert (listening["compiled_core"], listening["reference_modules"]) == (False, ["pgoutput", "mongo"]), listening
    warned = next(line for line in lines if line["msg"].startswith("rtcore modules not built"))
    assert warned["level"] == "warning" and warned["modules"] == ["pgoutput", "mongo"], warned


def test_a_fraction_for_an_integer_setting_is_refused(tmp_path):
    """TOML has floats: `port = 8080.5` or `queue_size = 0.5` is a mistake to name, not a
    value to truncate (to 8080, or to a queue of 0)."""
    cfg = tmp_path / "c.toml"
    for section, key, value in (("server", "port", "8080.5"), ("audit", "queue_size", "0.5")):
        cfg.write_text(f"[{section}]\n{key} = {value}\n")
        with pytest.raises(ConfigError, match=rf"\({section}\.{key}\): invalid value {value}: expected an integer"):
            load(str(cfg), environ={})
    cfg.write_text("[server]\nport = 8080.0\n")  # a whole number written as a float is still that number
    assert load(str(cfg), environ={}).server.port == 8080


def test_an_integer_beyond_64_bits_is_refused_at_start(tmp_path):
    """limits.max_message_bytes or limits.send_buffer_bytes of 10**19 or more (an "unlimited"
    written as a row of 9s, or `1e300` in TOML) started a gateway that said it was ready, then
    dropped every WebSocket upgrade (OverflowError converting it to a C size: an error line per
    client, 1011 or no answer). Such a value is a configuration error, one line, exit 2."""
    for env in ("RT_MAX_MESSAGE_BYTES", "RT_SEND_BUFFER_BYTES"):
        out = _run(["serve"], {env: "99999999999999999999", "RT_PORT": "0"}, cwd=str(tmp_path))
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and len(lines) == 1 and f"environment {env}" in lines[0], out.stderr
        assert "too large" in lines[0], out.stderr
    cfg = tmp_path / "c.toml"
    cfg.write_text("[limits]\nmax_message_bytes = 1e300\n")
    with pytest.raises(ConfigError, match=r"\(limits\.max_message_bytes\): invalid value .*too large"):
        load(str(cfg), environ={})
    assert load(environ={"RT_SEND_BUFFER_BYTES": str(2**63 - 1)}).limits.send_buffer_bytes == 2**63 - 1


def test_a_mongo_url_naming_a_missing_tls_file_is_one_line(tmp_path):
    """A MongoDB URL whose tlsCAFile or tlsCertificateKeyFile is not there (a secret mounted at
    another path) crashed `rtserver serve` with the driver's traceback (FileNotFoundError, exit
    1), naming neither the setting nor the option. It is a configuration error: one line naming
    the setting and the option, exit 2, in [workspaces.W] mongo_url too."""
    missing = tmp_path / "nowhere" / "ca.pem"
    for option in ("tlsCAFile", "tlsCertificateKeyFile"):
        url = f"mongodb://127.0.0.1:9/app?replicaSet=rs0&tls=true&{option}={missing}"
        out = _run(["serve"], {"RT_MONGO_URL": url, "RT_PORT": "0"}, cwd=str(tmp_path))
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and len(lines) == 1, out.stderr
        assert "mongo.url (RT_MONGO_URL)" in lines[0] and f"option {option}" in lines[0], out.stderr
    cfg = tmp_path / "rt.toml"
    cfg.write_text(f'[workspaces.acme]\nmongo_url = "mongodb://127.0.0.1:9/app?tls=true&tlsCAFile={missing}"\n')
    with pytest.raises(ConfigError, match=r"\[workspaces.acme\] mongo_url: not a valid MongoDB URL \(option tlsCAFile\)"):
        load(str(cfg), environ={})


def test_a_state_file_the_disk_refuses_is_named_at_start(tmp_path):
    """A state directory on a full disk (here: a file-size limit, EFBIG as ENOSPC would be)
    stopped `rtserver serve` with `rtserver: [Errno 27] File too large`: an error of the write,
    not of the open, names no file, so nothing said which disk or setting to look at. The line
    names the state file now."""
    import resource

    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RT_")}
    env.update({"RT_STATE_DIR": str(state), "RT_PORT": "0", "RT_AUTH_HS256_SECRET": "s" * 40})
    out = subprocess.run([sys.executable, "-m", "rtserver", "serve"], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path), timeout=60,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4, 4)))
    plain = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert out.returncode == 2 and len(plain) == 1, out.stderr
    assert plain[0] == f"rtserver: {state / 'seq-reservation'}: File too large", out.stderr


def test_a_postgres_url_naming_a_missing_tls_file_or_no_sslmode_is_one_line(tmp_path):
    """A PostgreSQL URL with sslmode=verify-ful (a typo) or an sslrootcert/sslcert/sslkey that is
    not there (a secret mounted at another path) started the gateway, whose feed then failed
    every few seconds for good, with 'FileNotFoundError: [Errno 2] No such file or directory'
    (naming no file) in the log and /readyz. Each is a configuration error at start, naming
    the setting, the parameter and the file, as for MongoDB URLs and audit.ssl_cafile."""
    missing = tmp_path / "nowhere" / "ca.pem"
    for query, said in ((f"sslmode=verify-full&sslrootcert={missing}", f"sslrootcert {missing}: "),
                        (f"sslmode=require&sslcert={missing}&sslkey={missing}", f"sslcert {missing}: "),
                        ("sslmode=verify-ful", "sslmode 'verify-ful' is not one of")):
        url = f"postgresql://rt:pw@127.0.0.1:9/app?{query}"
        out = _run(["serve"], {"RT_POSTGRES_URL": url, "RT_PORT": "0"}, cwd=str(tmp_path))
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and len(lines) == 1, out.stderr
        assert "postgres.url (RT_POSTGRES_URL)" in lines[0] and said in lines[0], out.stderr
        assert ":pw@" not in lines[0]
    cfg = tmp_path / "rt.toml"
    cfg.write_text(f'[workspaces.acme]\npostgres_url = "host=db dbname=app sslmode=verify-ca sslrootcert={missing}"\n')
    with pytest.raises(ConfigError, match=r"\[workspaces.acme\] postgres_url: sslrootcert .*No such file"):
        load(str(cfg), environ={})
    # what libpq takes without a file: the system's CAs, and files it would not read
    load(environ={"RT_POSTGRES_URL": "postgresql://db/app?sslmode=verify-full&sslrootcert=system"})
    load(environ={"RT_POSTGRES_URL": f"postgresql://db/app?sslmode=disable&sslrootcert={missing}"})


def test_an_inconsistent_value_names_where_it_was_set(tmp_path):
    """A value each source of settings could have given (the file, an RT_* variable, a flag)
    that the checks after loading refuse says where it came from: `server.port: 70000 is not a
    TCP port` sent the operator of a file plus an environment looking in both."""
    cfg = tmp_path / "rt.toml"
    cfg.write_text("[server]\nport = 70000\nlog_level = 'info'\n")
    out = _run(["serve", "--config", str(cfg)], cwd=str(tmp_path))
    assert out.returncode == 2 and f"server.port from config file {cfg}" in out.stderr, out.stderr
    out = _run(["serve", "--config", str(cfg)], {"RT_PORT": "8080", "RT_LOG_LEVEL": "verbose"}, cwd=str(tmp_path))
    assert out.returncode == 2 and "server.log_level from environment RT_LOG_LEVEL" in out.stderr, out.stderr
    out = _run(["serve", "--config", str(cfg), "--port", "99999"], cwd=str(tmp_path))
    assert out.returncode == 2 and "server.port from option --port" in out.stderr, out.stderr
    out = _run(["serve"], {"RT_TLS_CERT": "/x.pem"}, cwd=str(tmp_path))  # two settings named: the one set
    assert out.returncode == 2 and out.stderr.strip().endswith("(server.tls_cert from environment RT_TLS_CERT)"), out.stderr
    # The ingest's flags: no --ingest-port or --kind exists.
    out = _run(["ingest", "--health-port", "-1"], cwd=str(tmp_path))
    assert out.returncode == 2 and "option --health-port (bus.ingest_port)" in out.stderr, out.stderr
    out = _run(["ingest"], cwd=str(tmp_path))
    assert out.returncode == 2 and "(bus.kind from rtserver ingest)" in out.stderr, out.stderr
    # A bus.kind the ingest replaces with kafka is still checked: the gateway nodes given the
    # same settings refuse it (it went unsaid by the ingest and by check-config --ingest).
    feeds = {"RT_BUS": "kafak", "RT_BUS_KAFKA_BOOTSTRAP": "127.0.0.1:1", "RT_POSTGRES_URL": "postgresql://db/app",
             "RT_BUS_WORKSPACES": "acme"}
    for argv in (["ingest"], ["check-config", "--ingest"]):
        out = _run(argv, feeds, cwd=str(tmp_path))
        assert out.returncode == 2 and "bus.kind: 'kafak' (environment RT_BUS) is not memory or kafka" in out.stderr, \
            out.stderr
    out = _run(["check-config", "--ingest"], {**feeds, "RT_BUS": "memory"}, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    cfg.write_text("[mongo]\nurl = 'mongodb://rt:secret@db:port/app'\n")
    out = _run(["serve", "--config", str(cfg)], cwd=str(tmp_path))
    assert out.returncode == 2 and f"mongo.url from config file {cfg}" in out.stderr and "secret" not in out.stderr


def test_an_ingest_health_port_beyond_65535_is_a_configuration_error(tmp_path):
    """bus.ingest_port was not checked as server.port is: the ingest failed once Kafka
    answered, when it bound the port, with a traceback (OverflowError) and exit 1."""
    for args, env in ((["ingest", "--health-port", "70000"], {}), (["ingest"], {"RT_INGEST_PORT": "70000"})):
        out = _run(args, {"RT_BUS_KAFKA_BOOTSTRAP": "127.0.0.1:9", **env}, cwd=str(tmp_path))
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("rtserver: configuration error: bus.ingest_port: 70000 is not a TCP port"), out.stderr


def test_kafka_unreachable_at_start_names_the_setting(tmp_path):
    """A node or ingest whose Kafka does not answer at start stops (exit 2) with one line that
    names the setting holding the address: it said only `KafkaConnectionError: Unable to
    bootstrap from [('127.0.0.1', 9, <AddressFamily.AF_INET: 2>)]`."""
    port = free_port()  # nothing listens there
    for args, env, setting in (
        (["serve"], {"RT_BUS": "kafka", "RT_BUS_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}"}, "bus.kafka_bootstrap"),
        (["ingest"], {"RT_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}", "RT_POSTGRES_URL": "postgresql://rt@127.0.0.1:9/app",
                      "RT_BUS_WORKSPACES": "w1"}, "audit.kafka_bootstrap"),  # a feed: no feeds stops it before Kafka
    ):
        out = _run(args, {"RT_PORT": str(free_port()), **env}, cwd=str(tmp_path))
        problems = [line for line in out.stderr.splitlines() if not line.startswith("{")]
        assert out.returncode == 2 and len(problems) == 1, out.stderr
        assert f"Kafka at 127.0.0.1:{port} ({setting})" in problems[0], out.stderr


def test_a_malformed_secret_is_not_repeated_in_the_error(tmp_path):
    """A secret written as a TOML number (or a list) is refused, naming the setting, without
    its value: the error line goes to the terminal and into the service's log."""
    cfg = tmp_path / "c.toml"
    for section, key, value in (("auth", "hs256_secret", "31415926535897"), ("audit", "sasl_password", "[271828, 1828]")):
        cfg.write_text(f"[{section}]\n{key} = {value}\n")
        out = _run(["serve", "--config", str(cfg)], cwd=str(tmp_path))
        assert out.returncode == 2 and f"({section}.{key}): invalid value" in out.stderr, out.stderr
        assert "31415926535897" not in out.stderr and "271828" not in out.stderr, out.stderr


def test_a_jwks_url_that_is_no_http_url_is_a_configuration_error(tmp_path):
    """A JWKS URL without its scheme (or another scheme than http/https) started a gateway that
    reported ready and refused every client, a warning per fetch ('unknown url type'). It is a
    configuration error naming the setting; a good one still starts."""
    with socket.socket() as taken:  # a start that gets past the configuration ends here, at once
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for url in ("keycloak.example.com/realms/acme/protocol/openid-connect/certs", "ftp://idp/certs",
                    "https:///certs", "https://user:s3cret@/certs", "https://[::1/certs",
                    "https://user:s3cret@idp.example.com/certs"):
            out = _run(["serve"], {"RT_PORT": port, "RT_AUTH_JWKS_URL": url}, cwd=str(tmp_path))
            assert out.returncode == 2 and "configuration error: auth.jwks_url" in out.stderr, (url, out.stderr)
            assert "s3cret" not in out.stderr
        out = _run(["serve"], {"RT_PORT": port, "RT_AUTH_JWKS_URL": "http://127.0.0.1:9/certs"}, cwd=str(tmp_path))
        assert out.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in out.stderr, out.stderr


def test_a_misspelt_environment_variable_is_named_in_the_log(tmp_path):
    """RT_* variables that are no setting are ignored, but said so at start, with the setting
    they most resemble: RT_KAFKA_BOOTSTRAP_SERVERS would otherwise leave the audit trail in
    the log without a word. Their values are never logged."""
    with socket.socket() as taken:  # the start then ends at once, after the warnings
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {"RT_PORT": str(taken.getsockname()[1]), "RT_KAFKA_BOOTSTRAP_SERVERS": "kafka-secret-host:9092",
               "RT_WHATEVER": "x"}
        out = _run(["serve"], env, cwd=str(tmp_path))
    assert out.returncode == 2
    warned = {line["variable"]: line for line in map(json.loads, out.stderr.splitlines()[:-1])
              if line["logger"] == "rtserver.config"}
    assert set(warned) == {"RT_KAFKA_BOOTSTRAP_SERVERS", "RT_WHATEVER"}, out.stderr
    assert warned["RT_KAFKA_BOOTSTRAP_SERVERS"]["did_you_mean"] == "RT_KAFKA_BOOTSTRAP"
    assert "did you mean RT_KAFKA_BOOTSTRAP?" in warned["RT_KAFKA_BOOTSTRAP_SERVERS"]["msg"]
    assert warned["RT_WHATEVER"]["did_you_mean"] is None
    assert "kafka-secret-host" not in out.stderr


def test_a_token_signed_with_a_new_dev_secret_says_so(tmp_path):
    """`rtserver token` run elsewhere than the gateway made a dev secret of its own and printed a
    token the gateway refused ("bad token signature"), with nothing said. It says so on stderr
    when it makes the secret (the token alone on stdout, for TOKEN=$(...)), not once it exists."""
    first = _run(["token", "--workspace", "w1"], cwd=str(tmp_path))
    assert first.returncode == 0 and first.stdout.count(".") == 2, first
    assert f"made a new dev secret in {tmp_path / '.rtserver'}" in first.stderr, first.stderr
    again = _run(["token", "--workspace", "w1"], cwd=str(tmp_path))
    assert again.returncode == 0 and again.stderr == "", again.stderr
    secret = _run(["token", "--workspace", "w1"], {"RT_AUTH_HS256_SECRET": "s" * 32}, cwd=str(tmp_path / ".rtserver"))
    assert secret.returncode == 0 and secret.stderr == "", secret.stderr


def test_token_refuses_a_lifetime_that_makes_no_token(tmp_path):
    """`rtserver token --ttl` nan or inf crashed with a traceback; 0 or less minted a token
    already expired. Each is a usage error now (exit 2), and a good one still mints."""
    for ttl in ("nan", "inf", "0", "-5", "soon", "1e30", "99999999999999999999"):  # an exp past 9999: no date
        out = _run(["token", "--workspace", "w1", f"--ttl={ttl}"], cwd=str(tmp_path))
        assert out.returncode == 2 and "argument --ttl" in out.stderr, (ttl, out.stderr)
        assert "Traceback" not in out.stderr and not out.stdout
    out = _run(["token", "--workspace", "w1", "--ttl", "60"], cwd=str(tmp_path))
    assert out.returncode == 0 and out.stdout.count(".") == 2


def test_an_ingest_workspace_that_is_no_workspace_id_is_refused():
    """bus.workspaces took anything: `acme,*` (all of them, one might think) or `glo bex` fed a
    workspace of that name, which no client can connect to: the feed's events went nowhere,
    silently. Each entry is a workspace id, as in [workspaces.W]."""
    for value, shown in (("acme,*", "'*'"), ("acme, glo bex", "'glo bex'")):
        with pytest.raises(ConfigError, match=rf"bus.workspaces: {re.escape(shown)} is not a workspace id"):
            load(environ={"RT_BUS_WORKSPACES": value})
    assert load(environ={"RT_BUS_WORKSPACES": "acme, globex_2"}).bus.workspaces == ["acme", "globex_2"]


def test_an_empty_workspace_claim_is_refused():
    """RT_AUTH_WORKSPACE_CLAIM left blank (an env template) started a gateway that refused
    every token with 4003, as no claim path granted any workspace."""
    with pytest.raises(ConfigError, match="auth.workspace_claim is empty"):
        load(environ={"RT_AUTH_WORKSPACE_CLAIM": " "})


def test_a_home_relative_path_in_the_config_file_is_under_home(tmp_path):
    """TOML has no shell to expand `~`: `state_dir = "~/.rtserver"` made a directory named `~`
    in the working directory (with the dev secret in it, and `rm -rf ~` to clean it up). Paths
    in settings start at the home directory, as on a command line."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    cfg = work / "rt.toml"
    cfg.write_text('[server]\nstate_dir = "~/rtstate"\n')
    out = _run(["token", "--workspace", "w1", "--config", str(cfg)], {"HOME": str(home)}, cwd=str(work))
    assert out.returncode == 0, out.stderr
    assert (home / "rtstate" / "dev-secret").is_file() and not (work / "~").exists()
    assert load(str(cfg), environ={}).server.state_dir == os.path.expanduser("~/rtstate")


def test_an_unusable_dev_secret_is_one_line_for_token_as_for_serve(tmp_path):
    """A dev-secret file cut short (a disk full when it was written, an editor) or not a file:
    `rtserver serve` said so in one line, exit 2; `rtserver token` on the same state directory
    crashed with a traceback (exit 1). Both say it in one line now."""
    short, folder = tmp_path / "short", tmp_path / "folder"
    short.mkdir()
    (short / "dev-secret").write_text("abc\n")
    (folder / "dev-secret").mkdir(parents=True)
    for state, said in ((short, "is shorter than 32 characters"), (folder, "cannot read")):
        out = _run(["token", "--workspace", "w1", "--state-dir", str(state)], cwd=str(tmp_path))
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and len(lines) == 1 and not out.stdout, out.stderr
        assert f"dev secret {state / 'dev-secret'}" in lines[0] and said in lines[0], out.stderr


def test_token_refuses_an_empty_subject(tmp_path):
    """`rtserver token --sub ""` minted a token every gateway refuses ('token has no sub',
    4002), without a word; it is a usage error now."""
    out = _run(["token", "--workspace", "w1", "--sub", ""], cwd=str(tmp_path))
    assert out.returncode == 2 and "argument --sub" in out.stderr and not out.stdout, out.stderr


async def test_a_dev_token_passes_the_checks_of_the_configuration_it_was_minted_with(gateway_factory, tmp_path):
    """`rtserver token` signed with the configured secret but always wrote the default claims
    (`workspaces`, `realtime_publish`, no iss or aud): with an HS256 secret beside a Keycloak
    set-up (issuer, audience, roles with a prefix, channel permissions), the gateway refused the
    token the same configuration minted (4002, 4003). It now writes what that configuration
    checks; `--channel` lists the channel patterns when channel permissions are on."""
    env = {
        "RT_AUTH_ISSUER": "https://idp.example.com/realms/acme",
        "RT_AUTH_AUDIENCE": "realtime",
        "RT_AUTH_WORKSPACE_CLAIM": "resource_access.my.app.roles",  # a client id with dots
        "RT_AUTH_WORKSPACE_ROLE_PREFIX": "workspace:",
        "RT_AUTH_PUBLISH_CLAIM": "rt.publish",
        "RT_AUTH_CHANNEL_PERMISSIONS": "true",
        "RT_AUTH_CHANNEL_CLAIM": "rt.channels",
    }
    gw = await gateway_factory(env=env)
    minted = _run(["token", "--workspace", "w1", "--publish", "--channel", "events:*"],
                  {**env, "RT_AUTH_HS256_SECRET": gw.env["RT_AUTH_HS256_SECRET"]}, cwd=str(tmp_path))
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    async with ws_connect(gw, "w1", token=token) as c:
        await c.subscribe("events:x")
        await gw.publish("w1", "x", {"n": 1}, token=token)
        assert (await c.recv_event())["payload"] == {"n": 1}
        await c.send({"type": "subscribe", "channel": "postgres:orders", "id": "p"})
        assert (await c.recv_type("error"))["code"] == 4003  # not among its --channel patterns


async def test_the_logged_audit_trail_is_kept_at_any_log_level(gateway_factory):
    """Without Kafka the audit records are log lines at INFO; RT_LOG_LEVEL=warning (to quieten
    the log) must not drop the trail while its status counts the records delivered."""
    gw = await gateway_factory(env={"RT_LOG_LEVEL": "warning"})
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await c.subscribe("events:x")
    granted = await gw.audit_records("auth-granted")
    suspended = await gw.audit_records("session-suspended")
    assert len(granted) == 1 and len(suspended) == 1, gw.logs()
    assert '"msg":"listening"' not in gw.logs()  # the rest of INFO stays quiet
    status, body = await gw.get("/readyz")
    audit = json.loads(body)["audit"]
    assert (audit["backend"], audit["emitted"], audit["delivered"]) == ("log", 2, 2)


async def test_a_second_gateway_on_the_same_state_directory_is_refused(gateway, tmp_path):
    """Two `rtserver serve` on one state directory would overwrite each other's saved sessions
    and known workspaces; without Kafka (no audit spool lock) nothing stopped the second."""
    out = _run(["serve"], {"RT_STATE_DIR": gateway.state_dir, "RT_PORT": str(free_port())}, cwd=str(tmp_path))
    problems = [line for line in out.stderr.splitlines() if not line.startswith("{")]
    assert out.returncode == 2 and len(problems) == 1, out.stderr
    assert problems[0].startswith(f"rtserver: state directory {gateway.state_dir} (server.state_dir): in use"), out.stderr
    status, _ = await gateway.get("/healthz")  # the first one carries on
    assert status == 200


@contextlib.asynccontextmanager
async def _starting_on_a_silent_idp(tmp_path) -> AsyncIterator[asyncio.subprocess.Process]:
    """`rtserver serve` (stdout and stderr piped) once it is fetching its JWKS from an identity
    provider that accepted the connection and says nothing (the fetch's timeout is 10 s)."""
    connected = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        connected.set()

    idp = await asyncio.start_server(silent, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{idp.sockets[0].getsockname()[1]}/certs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RT_")}
    env.update({"RT_PORT": str(free_port()), "RT_AUTH_JWKS_URL": url})
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "rtserver", "serve", cwd=str(tmp_path), env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await asyncio.wait_for(connected.wait(), 30)  # starting: the JWKS prefetch waits for an answer
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        for w in held:
            w.close()
        idp.close()


async def test_sigterm_during_start_up_stops_it_with_exit_0(tmp_path):
    """A stop signal while the gateway starts (here: fetching the JWKS from an identity
    provider that says nothing) killed the process: no stop handler was installed yet, so exit
    143 and not a log line. It stops now: start-up abandoned, what it began stopped, exit 0,
    every line JSON."""
    async with _starting_on_a_silent_idp(tmp_path) as proc:
        proc.send_signal(signal.SIGTERM)
        seen = b""
        while b"asked to stop during start-up" not in seen:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, seen.decode()
            seen += line
        rest, _ = await asyncio.wait_for(proc.communicate(), 30)
        out = seen + rest
    assert proc.returncode == 0, out.decode()
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert lines[-1]["msg"] == "stopped"
    assert not any(line["msg"] == "listening" for line in lines)


async def test_a_hung_jwks_fetch_does_not_hold_the_exit(tmp_path):
    """The key set's fetch ran in the loop's default executor, whose threads the loop's close
    and the interpreter's exit wait for: stopped with a fetch hung on an identity provider
    that says nothing, the gateway logged "stopped" and then lived on until the fetch's own
    10 s timeout (its DNS lookup has none), past what server.shutdown_timeout promises."""
    async with _starting_on_a_silent_idp(tmp_path) as proc:
        proc.send_signal(signal.SIGTERM)
        # Well within the fetch's 10 s: the stop itself takes a fraction of a second.
        out, _ = await asyncio.wait_for(proc.communicate(), 7)
    assert proc.returncode == 0, out.decode()
    assert json.loads(out.decode().splitlines()[-1])["msg"] == "stopped"


async def test_sighup_is_left_ignored_under_nohup(tmp_path):
    """Started with SIGHUP ignored (`nohup rtserver serve &`), the gateway outlives the closed
    terminal's SIGHUP; SIGTERM still drains it, exit 0."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RT_")}
    env["RT_PORT"] = str(port)

    def as_nohup() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "rtserver", "serve", cwd=str(tmp_path), env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                preexec_fn=as_nohup)
    lines: list[bytes] = []
    try:
        while not any(b'"listening"' in line for line in lines):
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, b"".join(lines).decode()
            lines.append(line)
        proc.send_signal(signal.SIGHUP)
        # Still serving: a WebSocket client authenticates after the SIGHUP was delivered.
        token = _run(["token", "--workspace", "w1"], cwd=str(tmp_path)).stdout.strip()

        class _GW:
            def ws_url(self, ws: str) -> str:
                return f"ws://127.0.0.1:{port}/workspaces/{ws}/realtime/connect"

        async with ws_connect(_GW(), "w1", token=token) as c:
            await c.subscribe("events:x")
        assert proc.returncode is None
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    assert b"draining" in out


async def test_a_publish_during_the_drain_is_refused_not_accepted_for_nobody(gateway_factory):
    """Once the gateway drains, every subscriber has been closed with 1001 and the workspace's
    history ends with the process: an event accepted then reaches no one (a resumed client gets
    a history_gap for it). A publisher on a keep-alive connection got 202 all the same; it gets
    503 now, as a WebSocket upgrade does (JSON, as every refusal), and publishes to another
    node or after the restart."""
    import http.client

    gw = await gateway_factory(env={"RT_SHUTDOWN_TIMEOUT": "30", "RT_SEND_BUFFER_BYTES": str(32 << 20)})
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    headers = {"Authorization": f"Bearer {gw.token('w1', publish=True)}", "Content-Type": "application/json"}

    def publish() -> tuple[int, bytes]:
        conn.request("POST", "/workspaces/w1/realtime/events/t", b'{"n":1}', headers)
        r = conn.getresponse()
        return r.status, r.read()

    # A client that opened its connection before the stop and asks for the upgrade during it.
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        assert (await asyncio.to_thread(publish))[0] == 202  # the connection is open before the stop
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_answer(reader))[0] == 200
        ws = await _slow_subscriber(gw, 100)  # holds the drain open while the publish is sent
        gw.proc.send_signal(signal.SIGTERM)
        while '"draining"' not in gw.logs():
            await asyncio.sleep(0.05)
        conn.request("POST", "/workspaces/w1/realtime/events/t", b'{"n":2}', headers)
        answer = await asyncio.to_thread(conn.getresponse)
        status, body = answer.status, answer.read()
        assert status == 503 and b"shutting down" in body, (status, body)
        # and the connection closes after it: the publisher's next attempt connects anew
        assert answer.getheader("Connection") == "close"
        key = base64.b64encode(os.urandom(16))
        writer.write(b"GET /workspaces/w1/realtime/connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % key)
        status, head, body = await read_answer(reader)
        assert status == 503 and b"shutting down" in json.loads(body)["error"].encode(), (status, head, body)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed after it
        ws.transport.abort()
    finally:
        conn.close()
        writer.close()
    assert await asyncio.wait_for(gw.proc.wait(), 30) == 0


async def test_an_ingest_with_no_feeds_stops_instead_of_joining_the_lease_group(kafka_broker, tmp_path):
    """An ingest with no source to read (bus.workspaces unset, no [workspaces.*] section) only
    warned, and joined the lease group: when the active ingest died it could win the lease, and
    nothing streamed while a standby that had the feeds waited. It stops now, one line, exit 2,
    before reaching Kafka: it made the events topic first, with this configuration's partition
    count for good (black-box audit)."""
    from aiokafka.admin import AIOKafkaAdminClient

    topic = f"rt.events.nofeeds.{os.getpid()}"
    env = {"RT_KAFKA_BOOTSTRAP": kafka_broker.bootstrap, "RT_BUS_TOPIC": topic,
           "RT_POSTGRES_URL": "postgresql://rt@127.0.0.1:9/app"}  # a URL, but no workspace fed by it
    out = await asyncio.to_thread(_run, ["ingest"], env, str(tmp_path))
    problems = [line for line in out.stderr.splitlines() if not line.startswith("{")]
    assert out.returncode == 2 and problems == [
        "rtserver ingest: no feeds to read: set postgres.url/mongo.url with bus.workspaces, or"
        " [workspaces.*] sections naming sources"], out.stderr
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    await admin.start()
    try:
        assert topic not in await admin.list_topics()
    finally:
        await admin.close()
