"""`rtserver check-config`: the configuration as `serve` or `ingest` would take it, checked without
starting anything; run as an operator runs it (the CLI in a process of its own)."""

from __future__ import annotations

import json
import os
import socket

from tests.test_lifecycle import _run

SECRET = "check-config-secret-0123456789abcdef"


def test_zero_config_is_reported_as_serve_takes_it_and_nothing_is_written(tmp_path):
    out = _run(["check-config"], cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["command"] == "serve" and report["config_file"] is None
    assert (report["settings"]["server"]["host"], report["settings"]["server"]["port"]) == ("127.0.0.1", 8080)
    assert report["settings"]["bus"]["kind"] == "memory"
    assert any(w.startswith("dev mode:") for w in report["warnings"]), report["warnings"]
    assert "rtserver: warning: dev mode:" in out.stderr
    assert os.listdir(tmp_path) == []  # no state directory, no dev secret: a check changes nothing


def test_file_variables_and_secrets_are_shown_as_they_take_effect_secrets_masked(tmp_path):
    (tmp_path / "rt.toml").write_text(
        '[server]\nport = 9001\n[limits]\nmax_connections = 7\n'
        '[workspaces.acme]\npostgres_url = "postgresql://rt:pg-pass-1@db/acme"\n')
    env = {"RT_AUTH_HS256_SECRET": SECRET, "RT_PORT": "9002", "RT_POSTGRES_URL": "postgresql://rt:pg-pass-2@db/app",
           "RT_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "RT_KAFKA_SASL_MECHANISM": "PLAIN",
           "RT_KAFKA_SASL_USERNAME": "rt", "RT_KAFKA_SASL_PASSWORD": "sasl-pass-3"}
    out = _run(["check-config", "--config", "rt.toml", "--state-dir", "st"], env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["config_file"] == str(tmp_path / "rt.toml")
    settings = report["settings"]
    assert settings["server"]["port"] == 9002  # the variable over the file
    assert settings["server"]["state_dir"] == "st"  # the flag over both
    assert settings["limits"]["max_connections"] == 7
    assert settings["auth"]["hs256_secret"] == "(set)" and settings["audit"]["sasl_password"] == "(set)"
    assert settings["postgres"]["url"] == "postgresql://***@db/app"
    assert report["workspaces"]["acme"]["postgres_url"] == "postgresql://***@db/acme"
    assert report["warnings"] == []
    for secret in (SECRET, "pg-pass-1", "pg-pass-2", "sasl-pass-3"):
        assert secret not in out.stdout + out.stderr


def test_what_would_stop_the_start_is_one_line_and_exit_2(tmp_path):
    """Exit 2 and one line, "configuration error:", naming the setting and where it was set.
    What stops serve itself at its start (the state directory, the TLS files) it says in the
    same line, before any log line: serve said "File exists" where the check said "not a
    directory", named neither the variable nor the file that set a certificate, and logged
    its stop first."""
    from tests.harness.certs import self_signed

    cases = [
        # the reason in words, not int()'s "invalid literal for int() with base 10: 'http'"
        (["check-config"], {"RT_PORT": "http"}, "RT_PORT (server.port): invalid value 'http': expected an integer"),
        (["check-config"], {"RT_HISTORY_SECONDS": "five"},
         "RT_HISTORY_SECONDS (history.seconds): invalid value 'five': expected a number"),
        (["check-config", "--ingest"], {}, "bus.kafka_bootstrap"),
        (["check-config", "--ingest"], {"RT_KAFKA_BOOTSTRAP": "127.0.0.1:9"}, "no feeds to read"),
    ]
    (tmp_path / "a-file").write_text("")
    (tmp_path / "other").mkdir()
    cert, key = self_signed(str(tmp_path))
    _, other_key = self_signed(str(tmp_path / "other"))
    (tmp_path / "rt.toml").write_text(f'[server]\ntls_cert = "{tmp_path / "none.pem"}"\ntls_key = "{key}"\n')
    serve_too = [
        (["--state-dir", "a-file"], {}, f"state directory {tmp_path / 'a-file'} (server.state_dir): not a directory "
                                        "(server.state_dir from option --state-dir)"),
        (["--state-dir", "a-file/st"], {}, f"state directory {tmp_path / 'a-file/st'} (server.state_dir): cannot be "
                                           f"made: {tmp_path / 'a-file'} is not a directory"),
        # As root every mode bit passes: /proc's were taken for writable, and check-config said
        # nothing of a directory serve could not make.
        (["--state-dir", "/proc/rtserver-state"], {}, "state directory /proc/rtserver-state (server.state_dir): "
                                                      "cannot be made: /proc is not writable"),
        ([], {"RT_TLS_CERT": str(tmp_path / "none.pem"), "RT_TLS_KEY": str(tmp_path / "none.key")},
         f"server.tls_cert {tmp_path / 'none.pem'}: cannot read: No such file or directory "
         "(server.tls_cert from environment RT_TLS_CERT)"),
        (["--config", "rt.toml"], {}, f"server.tls_cert {tmp_path / 'none.pem'}: cannot read: No such file or "
                                      f"directory (server.tls_cert from config file rt.toml)"),
        ([], {"RT_TLS_CERT": cert, "RT_TLS_KEY": other_key},
         f"server.tls_cert {cert} / server.tls_key {other_key}: cannot load: the private key is not the "
         "certificate's (KEY_VALUES_MISMATCH) (server.tls_cert from environment RT_TLS_CERT; "
         "server.tls_key from environment RT_TLS_KEY)"),
    ]
    cases += [(["check-config", *args], env, said) for args, env, said in serve_too]
    for args, env, said in cases:
        out = _run(args, env, cwd=str(tmp_path))
        assert out.returncode == 2 and out.stdout == "", (args, env, out.stdout, out.stderr)
        assert out.stderr.startswith("rtserver: configuration error: ") and said in out.stderr, (args, env, out.stderr)
        assert len(out.stderr.splitlines()) == 1, out.stderr
    for args, env, _ in serve_too:
        checked = _run(["check-config", *args], env, cwd=str(tmp_path))
        served = _run(["serve", *args], {**env, "RT_PORT": "0"}, cwd=str(tmp_path))
        assert served.returncode == 2 and served.stderr == checked.stderr, (args, env, served.stderr, checked.stderr)
    out = _run(["check-config"], {"RT_TLS_CERT": cert, "RT_TLS_KEY": key}, cwd=str(tmp_path))
    assert out.returncode == 0 and json.loads(out.stdout)["settings"]["server"]["tls_cert"] == cert, out.stderr


def test_an_ingest_is_shown_its_feeds(tmp_path):
    env = {"RT_KAFKA_BOOTSTRAP": "127.0.0.1:9", "RT_POSTGRES_URL": "postgresql://rt:pg-pass@db/app",
           "RT_BUS_WORKSPACES": "w1,w2"}
    out = _run(["check-config", "--ingest"], env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["command"] == "ingest" and report["settings"]["bus"]["kind"] == "kafka"
    assert report["feeds"] == [{"kind": "postgres", "url": "postgresql://***@db/app", "database": "", "schemas": ["public"],
                                "tables": [], "workspaces": ["w1", "w2"]}]
    assert "pg-pass" not in out.stdout + out.stderr


def test_its_warnings_are_those_serve_logs_at_start(tmp_path):
    """The same words, from the same code: a check that warns of nothing means a start that
    warns of nothing of these."""
    env = {"RT_AUTH_HS256_SECRET": "too-short", "RT_KAFKA_BOOTSTRAP_SERVERS": "k:9092",
           "RT_AUTH_WORKSPACE_CLAIM": "realm_access.roles"}
    checked = _run(["check-config"], env, cwd=str(tmp_path))
    assert checked.returncode == 0, checked.stderr
    warnings = json.loads(checked.stdout)["warnings"]
    assert len(warnings) == 3, warnings
    with socket.socket() as taken:  # the start then ends at once, after its warnings
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        served = _run(["serve"], {**env, "RT_PORT": str(taken.getsockname()[1])}, cwd=str(tmp_path))
    assert served.returncode == 2
    logged = [line["msg"] for line in map(json.loads, served.stderr.splitlines()[:-1]) if line["level"] == "warning"]
    assert set(warnings) <= set(logged), (warnings, logged)
    assert "too-short" not in checked.stdout + checked.stderr


def test_a_kafka_node_with_default_databases_and_no_workspace_list_is_warned(tmp_path):
    """A node given no bus.workspaces cannot refuse the database channels of a workspace the
    ingest does not feed (they are answered `subscribed`, and nothing comes): said at start."""
    env = {"RT_BUS": "kafka", "RT_BUS_KAFKA_BOOTSTRAP": "k:9092", "RT_POSTGRES_URL": "postgresql://db/app"}
    checked = _run(["check-config"], env, cwd=str(tmp_path))
    assert checked.returncode == 0, checked.stderr
    warnings = json.loads(checked.stdout)["warnings"]
    assert any(w.startswith("bus.workspaces is empty, with postgres.url set: this node cannot tell") for w in warnings), \
        warnings
    for quiet in ({**env, "RT_BUS_WORKSPACES": "acme"}, {**env, "RT_BUS": "memory"}):
        checked = _run(["check-config"], quiet, cwd=str(tmp_path))
        assert checked.returncode == 0, checked.stderr
        assert not any("bus.workspaces" in w for w in json.loads(checked.stdout)["warnings"]), checked.stdout


def test_what_stops_serve_at_start_stops_the_check_in_the_same_words(tmp_path):
    """An audit spool directory that is a file, and a dev secret in the state directory that
    serve cannot use (not ASCII, too short), passed check-config (exit 0); serve then stopped
    with exit 2 ("audit spool /etc/passwd (audit.spool_dir): File exists", "'ascii' codec can't
    decode byte 0xff..."). The check now refuses them as serve does, in the same line."""
    (tmp_path / "a-file").write_text("x")
    spool = {"RT_KAFKA_BOOTSTRAP": "127.0.0.1:1", "RT_AUDIT_SPOOL_DIR": str(tmp_path / "a-file"),
             "RT_AUTH_HS256_SECRET": SECRET}
    secret_dir = tmp_path / "st"
    secret_dir.mkdir(mode=0o700)
    for env, content, said in (
        (spool, None, f"audit spool {tmp_path / 'a-file'} (audit.spool_dir): not a directory"),
        ({}, b"garbage\xff", "dev-secret is not ASCII text (a generated one is 64 hex digits); delete it to regenerate"),
        ({}, b"abc\n", "dev-secret is shorter than 32 characters; delete it to regenerate"),
    ):
        if content is not None:
            (secret_dir / "dev-secret").write_bytes(content)
        checked = _run(["check-config", "--state-dir", "st"], env, cwd=str(tmp_path))
        assert checked.returncode == 2 and said in checked.stderr, checked.stderr
        served = _run(["serve", "--state-dir", "st"], {**env, "RT_PORT": "0"}, cwd=str(tmp_path))
        assert served.returncode == 2, served.stderr
        assert served.stderr.strip().splitlines()[-1] == checked.stderr.strip(), (served.stderr, checked.stderr)
    out = _run(["check-config", "--config", ""], cwd=str(tmp_path))
    assert out.returncode == 2 and "--config is empty" in out.stderr, out.stderr


def test_a_state_directory_or_dev_secret_other_users_can_touch_is_refused(tmp_path):
    """A state directory made before the gateway, writable by other users (mode 777), was
    taken as it was: another local user replaced dev-secret with their own and signed tokens
    the gateway accepted (packaging audit). Such a directory is refused, as is a dev secret
    other users may read or that another user owns; serve and check-config say it alike."""
    state = tmp_path / "st"
    state.mkdir()
    state.chmod(0o777)
    checked = _run(["check-config", "--state-dir", str(state)], cwd=str(tmp_path))
    assert checked.returncode == 2 and "writable by other users (mode 0777)" in checked.stderr, checked.stderr
    served = _run(["serve", "--state-dir", str(state)], {"RT_PORT": "0"}, cwd=str(tmp_path))
    assert served.returncode == 2 and served.stderr.strip().splitlines()[-1] == checked.stderr.strip(), served.stderr
    state.chmod(0o700)
    secret = state / "dev-secret"
    secret.write_text("a" * 64 + "\n")
    secret.chmod(0o644)
    for args in (["check-config"], ["token", "--workspace", "w1"]):
        out = _run([*args, "--state-dir", str(state)], cwd=str(tmp_path))
        assert out.returncode == 2 and "is open to other users (mode 0644): chmod 600 it" in out.stderr, out.stderr
    secret.chmod(0o600)
    assert _run(["token", "--workspace", "w1", "--state-dir", str(state)], cwd=str(tmp_path)).returncode == 0
    if os.geteuid() == 0:  # as root, a file another user owns can be made
        os.chown(secret, 65534, 65534)
        out = _run(["token", "--workspace", "w1", "--state-dir", str(state)], cwd=str(tmp_path))
        assert out.returncode == 2 and "belongs to another user (uid 65534)" in out.stderr, out.stderr


def test_a_private_key_given_in_place_of_its_path_is_not_repeated(tmp_path):
    """RT_TLS_KEY (or RT_KAFKA_SSL_KEYFILE) set to the key's PEM text, as a secret mounted into
    a variable is, instead of a file's path: serve and check-config said 'server.tls_key
    -----BEGIN PRIVATE KEY----- MII...: cannot read', the whole private key on the terminal and
    in the service's log. The setting is refused without repeating its value."""
    from tests.harness.certs import self_signed

    cert, key = self_signed(str(tmp_path))
    pem = open(key).read()
    body = pem.splitlines()[1]  # a line of the key itself
    for command in (["check-config"], ["serve", "--port", "0"]):
        for env in ({"RT_TLS_CERT": cert, "RT_TLS_KEY": pem},
                    {"RT_KAFKA_BOOTSTRAP": "127.0.0.1:9", "RT_KAFKA_SECURITY_PROTOCOL": "SSL",
                     "RT_KAFKA_SSL_CERTFILE": cert, "RT_KAFKA_SSL_KEYFILE": pem}):
            out = _run([*command, "--state-dir", "st"], {"RT_AUTH_HS256_SECRET": SECRET, **env}, cwd=str(tmp_path))
            assert out.returncode == 2, out.stderr
            assert body not in out.stdout + out.stderr and "BEGIN" not in out.stderr, out.stderr
            assert "holds PEM text, not a file's path" in out.stderr, out.stderr


def test_a_url_in_an_array_or_table_is_not_repeated_with_its_password(tmp_path):
    """`url = ["postgresql://rt:pw@db/app"]` (an array, or a table, where a string belongs) was
    refused with the value repeated as written: 'invalid value ['postgresql://rt:pw@db/app']',
    the password on the terminal, where the same URL as a string has its credentials masked."""
    for text in ('[postgres]\nurl = ["postgresql://rt:arr-pass-1@db/app"]\n',
                 '[mongo]\nurl = {url = "mongodb://rt:arr-pass-1@db/app"}\n',
                 '[auth]\njwks_url = ["https://idp/certs?code=arr-pass-1"]\n'):
        (tmp_path / "rt.toml").write_text(text)
        out = _run(["check-config", "--config", "rt.toml"], {"RT_AUTH_HS256_SECRET": SECRET}, cwd=str(tmp_path))
        assert out.returncode == 2, out.stderr
        assert "arr-pass-1" not in out.stdout + out.stderr, out.stderr
        assert "expected a string" in out.stderr and "(not shown: a TOML" in out.stderr, out.stderr


def test_a_nul_character_in_a_setting_is_one_line_and_exit_2(tmp_path):
    """TOML can write a NUL ("\\u0000") into a value: in server.tls_cert serve and check-config
    ended with Python's plain traceback ('ValueError: embedded null byte', exit 1, before the
    log began), in audit.spool_dir with an 'uncaught exception' line; a host went into the
    'cannot listen' line with the NUL as written. Each is a configuration error, one line."""
    for text in ('[server]\ntls_cert = "c\\u0000.pem"\ntls_key = "k.pem"\n',
                 '[audit]\nkafka_bootstrap = "127.0.0.1:9"\nspool_dir = "sp\\u0000ool"\n',
                 '[server]\nhost = "local\\u0000host"\n'):
        (tmp_path / "rt.toml").write_text(text)
        for command in (["check-config"], ["serve", "--port", "0"]):
            out = _run([*command, "--config", "rt.toml", "--state-dir", "st"], {"RT_AUTH_HS256_SECRET": SECRET},
                       cwd=str(tmp_path))
            assert out.returncode == 2, (text, out.stderr)
            assert "Traceback" not in out.stderr and "\0" not in out.stderr, out.stderr
            assert out.stderr.count("\n") == 1 and "holds a NUL character" in out.stderr, out.stderr
