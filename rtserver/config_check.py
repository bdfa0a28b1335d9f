"""What a configuration gives and what is said of it before anything runs: the warnings the
gateway logs at start, the server's TLS context, and `rtserver check-config`'s report (the
settings as they take effect, secrets masked).

`serve` and `ingest` log the same warnings and load the same certificate, so a check that
passes here passes there (what needs the network, a database or Kafka, is not checked)."""

from __future__ import annotations

import os
import ssl
from typing import Any

from rtserver.auth import MIN_HS256_SECRET
from rtserver.config import _SECRETS, Config, ConfigError, check_pem_pair
from rtserver.redact import redact

# (message, fields): a warning as the log line gives it.
Warning_ = tuple[str, dict[str, Any]]


def env_warnings(cfg: Config) -> list[Warning_]:
    """RT_* variables that are no setting. A warning, not an error: RT_ is a short prefix other
    tools may use too. The value is not shown (it may be a secret)."""
    return [(f"environment variable {name} is not a setting: ignored" + (f" (did you mean {like}?)" if like else ""),
             {"variable": name, "did_you_mean": like or None})
            for name, like in cfg.unknown_env]


def auth_warnings(cfg: Config, state_dir: str) -> list[Warning_]:
    """What a gateway node says of its token settings at start."""
    out: list[Warning_] = []
    if cfg.dev_mode:
        out.append(("dev mode: no auth.hs256_secret or auth.jwks_url configured; tokens are signed with a generated "
                    "secret kept in the state directory. Mint one with `rtserver token --workspace W`.",
                    {"state_dir": state_dir}))
    secret = cfg.auth.hs256_secret.encode()
    if secret and len(secret) < MIN_HS256_SECRET:
        # Never the secret itself: its length, and what to do.
        out.append((f"auth.hs256_secret is {len(secret)} bytes; HS256 wants at least {MIN_HS256_SECRET} (RFC 7518 "
                    "section 3.2): a short secret can be guessed from any token, and whoever guesses it mints "
                    "tokens for every workspace", {"bytes": len(secret), "minimum": MIN_HS256_SECRET}))
    claim = cfg.auth.workspace_claim
    if claim.rsplit(".", 1)[-1] in ("roles", "scope") and not cfg.auth.workspace_role_prefix:
        # Every entry of such a claim grants the workspace of its name: the roles Keycloak gives
        # every user (offline_access, uma_authorization, default-roles-<realm>) or the scopes
        # (openid, email) would grant workspaces of those names to anyone.
        out.append((f"auth.workspace_claim {claim} lists roles or scopes and auth.workspace_role_prefix is empty: "
                    "every role a token carries grants the workspace of that name (offline_access, "
                    "default-roles-..., a publish role): set a prefix such as `workspace:` and give workspace roles "
                    "that prefix", {"workspace_claim": claim}))
    return out


def bus_warnings(cfg: Config) -> list[Warning_]:
    """What a gateway node says at start of the default databases' feeds: on the Kafka bus
    without bus.workspaces; on the memory bus with it, which a single process does not read."""
    defaults = [name for name, url in (("postgres.url", cfg.postgres.url), ("mongo.url", cfg.mongo.url)) if url]
    if not defaults:
        return []
    if cfg.bus.kind != "kafka":
        if not cfg.bus.workspaces:
            return []
        # The same settings on a Kafka node refuse the other workspaces' database channels
        # (4010); here every workspace a token grants reads the default databases, listed or not,
        # without a word (tenant-isolation audit).
        return [(f"bus.workspaces ({', '.join(cfg.bus.workspaces)}) is not read by a single process (bus.kind "
                 f"memory): every workspace without a [workspaces.*] section reads {' and '.join(defaults)}, "
                 "listed or not; give the others sections of their own, or leave the default URLs unset",
                 {"settings": defaults, "workspaces": list(cfg.bus.workspaces)})]
    if cfg.bus.workspaces:
        return []
    return [(f"bus.workspaces is empty, with {' and '.join(defaults)} set: this node cannot tell which workspaces "
             "the ingest feeds from the default databases, and answers `subscribed` to their channels in any "
             "workspace (no event comes to one the ingest does not feed); give it the ingest's RT_BUS_WORKSPACES",
             {"settings": defaults})]


def serve_warnings(cfg: Config, state_dir: str) -> list[Warning_]:
    """What a gateway node (`serve`) says of its settings at start, and check-config with it."""
    return auth_warnings(cfg, state_dir) + bus_warnings(cfg)


def server_tls_context(cfg: Config) -> ssl.SSLContext | None:
    """The context of wss:// and https:// (server.tls_cert, server.tls_key), or None;
    RuntimeError saying which setting, set where, which file and why, when it cannot be made."""
    if not cfg.server.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        # A passphrase-protected key would make OpenSSL prompt on the terminal: refused.
        check_pem_pair("server.tls_cert", cfg.server.tls_cert, "server.tls_key", cfg.server.tls_key, ctx)
    except ConfigError as exc:
        raise RuntimeError(cfg.explain(str(exc))) from None
    return ctx


def _shown(section: str, key: str, value: Any) -> Any:
    if (section, key) in _SECRETS:
        return "(set)" if value else ""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [redact(v) if isinstance(v, str) else v for v in value]
    return value


def report(cfg: Config, command: str) -> dict[str, Any]:
    """`rtserver check-config`'s answer: the settings `command` (serve or ingest) would run
    with, each section's values as they take effect (secrets "(set)", credentials in URLs
    masked), the workspaces' own sources, an ingest's feeds, and the warnings it would log."""
    state_dir = os.path.abspath(cfg.server.state_dir)
    warnings = env_warnings(cfg) + (serve_warnings(cfg, state_dir) if command == "serve" else [])
    out: dict[str, Any] = {
        "command": command,
        "config_file": os.path.abspath(cfg.path) if cfg.path else None,
        "settings": {section: {key: _shown(section, key, value) for key, value in values.items()}
                     for section, values in cfg.values.items()},
        "workspaces": {wid: {"postgres_url": redact(ws.postgres_url), "postgres_schemas": ws.postgres_schemas,
                             "postgres_tables": ws.postgres_tables, "mongo_url": redact(ws.mongo_url)}
                       for wid, ws in cfg.workspaces.items()},
        "warnings": [message for message, _ in warnings],
    }
    if command == "ingest":
        from rtserver.ingest import plan_sources

        out["feeds"] = [{k: redact(v) if k == "url" else v for k, v in feed.items()} for feed in plan_sources(cfg)]
    return out
