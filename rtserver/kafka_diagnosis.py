"""Why a Kafka client could not connect, in the operator's terms: the setting to look at.

aiokafka turns every failed bootstrap into "Unable to bootstrap from [...]" and logs the cause
(a refused password, an untrusted certificate, a listener speaking another protocol) on its own
logger, which rtserver silences (logs.py: it logs an ERROR every few seconds while a broker is
down). A wrong audit.sasl_password thus read exactly like a broker that is down. `explain()`
opens one connection to the bootstrap servers with the same options and says what went wrong.
The password never appears in what it returns.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

# Not the client's 30-40 s: it runs while the caller waits to retry or to stop (a node's bus
# watch stops watching meanwhile). For all the servers probed together.
PROBE_SECONDS = 10.0


def _hosts(bootstrap: str) -> list[tuple[str, int]]:
    from aiokafka.conn import collect_hosts

    return [(host, port) for host, port, _ in collect_hosts(bootstrap, randomize=False)][:3]


async def explain(options: dict[str, Any], error: BaseException | str | None = None, *, bootstrap_setting: str = "",
                  cafile: str = "", certfile: str = "") -> str:
    """What went wrong connecting with `options` (aiokafka client options); `error` is what the
    client raised (or what the caller saw), returned as it is when every bootstrap server takes
    a connection. `bootstrap_setting`, `cafile` (audit.ssl_cafile) and `certfile`
    (audit.ssl_certfile, the client certificate of mutual TLS) are named in the answer."""
    fallback = error if isinstance(error, str) else _text(error) if error is not None else "no error"
    bootstrap = options.get("bootstrap_servers") or ""
    try:
        hosts = _hosts(bootstrap)
    except Exception:  # noqa: BLE001 - an address the client refused too: its own error says so
        return fallback
    try:
        async with asyncio.timeout(PROBE_SECONDS):
            return await _probe(hosts, options, fallback, bootstrap_setting, cafile, certfile)
    except TimeoutError:
        return f"{fallback} (and no answer to a probe within {PROBE_SECONDS:g}s)"


async def _probe(hosts: list[tuple[str, int]], options: dict[str, Any], fallback: str, bootstrap_setting: str,
                 cafile: str, certfile: str) -> str:
    from aiokafka.conn import create_conn
    from aiokafka.protocol.admin import ApiVersionRequest

    for host, port in hosts:
        conn = None
        try:
            conn = await create_conn(
                host, port, client_id="rtserver-diagnosis", request_timeout_ms=int(PROBE_SECONDS * 1000),
                ssl_context=options.get("ssl_context"),
                security_protocol=options.get("security_protocol", "PLAINTEXT"),
                sasl_mechanism=options.get("sasl_mechanism"),
                sasl_plain_username=options.get("sasl_plain_username"),
                sasl_plain_password=options.get("sasl_plain_password"),
            )
            # A listener of another protocol may take the connection and close it at the first
            # request (a PLAINTEXT client on a SASL listener): make one.
            await conn.send(ApiVersionRequest())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - naming it is the point
            return _describe(exc, host, port, options, bootstrap_setting, cafile, certfile)
        finally:
            if conn is not None:
                conn.close()
    return fallback


def _text(exc: BaseException) -> str:
    text = str(exc)
    name = type(exc).__name__
    # aiokafka's errors start their text with their class name already.
    return text if text.startswith(name) else f"{name}: {text}" if text else name


# TLS alerts a broker sends when it refuses the client's certificate, or the lack of one
# (ssl.client.auth=required: MSK's and Strimzi's `tls` authentication). With TLS 1.3 they
# arrive after the client's handshake is done, at the first read: aiokafka then says only
# "Connection ... closed", which read like a listener of another protocol.
_CLIENT_CERT_ALERTS = ("ALERT_BAD_CERTIFICATE", "ALERT_CERTIFICATE_REQUIRED", "ALERT_CERTIFICATE_UNKNOWN",
                       "ALERT_UNKNOWN_CA", "ALERT_CERTIFICATE_EXPIRED", "ALERT_CERTIFICATE_REVOKED",
                       "ALERT_UNSUPPORTED_CERTIFICATE", "ALERT_ACCESS_DENIED")


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, ssl.SSLError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _refused_certificate(exc: BaseException, where: str, certfile: str) -> str | None:
    tls = _ssl_cause(exc)
    if tls is None or isinstance(tls, ssl.SSLCertVerificationError):
        return None
    reason = tls.reason or str(tls)
    if not any(alert in reason for alert in _CLIENT_CERT_ALERTS):
        return None
    if not certfile:
        return (f"{where} refused the TLS handshake ({reason}): it requires a client certificate (mutual TLS); "
                "set audit.ssl_certfile and audit.ssl_keyfile (RT_KAFKA_SSL_CERTFILE, RT_KAFKA_SSL_KEYFILE)")
    return (f"{where} refused the client certificate audit.ssl_certfile {certfile} ({reason}): the broker does "
            "not trust the CA that signed it, or it has expired or been revoked; use one the cluster issued "
            "(audit.ssl_certfile, audit.ssl_keyfile)")


def _describe(exc: BaseException, host: str, port: int, options: dict[str, Any], bootstrap_setting: str,
              cafile: str, certfile: str = "") -> str:
    from aiokafka.errors import (
        AuthenticationFailedError,
        IllegalSaslStateError,
        KafkaConnectionError,
        SaslAuthenticationFailed,
        UnsupportedSaslMechanismError,
    )

    where = f"{host}:{port}"
    protocol = options.get("security_protocol", "PLAINTEXT")
    mechanism = options.get("sasl_mechanism") or ""
    if isinstance(exc, SaslAuthenticationFailed | AuthenticationFailedError):
        password = options.get("sasl_plain_password") or ""
        # Secrets are taken as given (config.py): one read from a file may end with a newline.
        hint = ("; audit.sasl_password ends with whitespace (a newline from a file?)"
                if password != password.rstrip() else
                "; audit.sasl_password starts with whitespace" if password != password.lstrip() else "")
        return (f"{where} refused the SASL credentials ({mechanism}, user {options.get('sasl_plain_username')!r}): "
                f"check audit.sasl_username, audit.sasl_password and audit.sasl_mechanism{hint} ({_text(exc)})")
    if isinstance(exc, UnsupportedSaslMechanismError):
        return (f"{where} does not take SASL mechanism {mechanism} (audit.sasl_mechanism) on this listener "
                f"({_text(exc)})")
    refused = _refused_certificate(exc, where, certfile)
    if refused is not None:
        return refused
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or str(exc)
        if "hostname" in reason.lower() or "ip address mismatch" in reason.lower():
            return (f"the TLS certificate of {where} is not for {host} ({reason}): connect through a name the "
                    f"certificate holds ({bootstrap_setting or 'bootstrap servers'})")
        return (f"the TLS certificate of {where} is not trusted ({reason}): audit.ssl_cafile "
                f"{cafile or '(empty: the system CAs)'} must "
                "hold the CA that signed it")
    if isinstance(exc, ssl.SSLError):
        return (f"TLS with {where} failed ({exc.reason or exc}): audit.security_protocol is {protocol}; is "
                "that listener TLS?")
    if isinstance(exc, IllegalSaslStateError | KafkaConnectionError) or (
        isinstance(exc, ConnectionResetError | ConnectionAbortedError) and protocol in ("SSL", "SASL_SSL")
    ):
        # The broker hangs up on a client speaking another protocol than its listener's.
        return (f"{where} refused the connection ({_text(exc)}): audit.security_protocol is {protocol}; does "
                "that listener expect another one (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL)?")
    if isinstance(exc, OSError):
        setting = f" ({bootstrap_setting})" if bootstrap_setting else ""
        return f"cannot connect to {where}{setting}: {exc.strerror or _text(exc)}"
    return f"{where}: {_text(exc)}"
