"""The docs tell the truth about the code: the README's configuration table is the one the
code generates, and the README's two set-up commands are the ones CI and newcomers run."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

import websockets

from rtserver.config import config_table_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts)) as fh:
        return fh.read()


def test_readme_config_table_matches_code():
    readme = _read("README.md")
    m = re.search(r"<!-- config-table:start -->\n(.*?)\n<!-- config-table:end -->", readme, re.S)
    assert m, "config table markers missing"
    assert m.group(1) == config_table_markdown(), "run: rtserver config-table, and paste it into README.md"


def test_ci_runs_the_readme_test_command():
    readme = _read("README.md")
    assert "\n./scripts/test\n" in readme
    assert "exec ./scripts/test" in _read(".ci", "run")


def test_every_setting_documented_with_env_var():
    readme = _read("README.md")
    from rtserver.config import SETTINGS

    for s in SETTINGS:
        assert f"`{s.env}`" in readme, s.env


def test_every_cli_subcommand_and_flag_is_documented():
    """`rtserver --help` and the docs agree: each subcommand is named in the README or docs/,
    and each of its flags in a paragraph (or code block) that names `rtserver <subcommand>`.
    `token --sub/--ttl/--state-dir`, `ingest --config/--state-dir` and `--version` were in the
    help only: a first-day developer minting an expired token for a test could not find --ttl."""
    import argparse

    from rtserver.cli import _parser

    text = "\n\n".join([_read("README.md")] + [_read("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
                                               if f.endswith(".md")])
    paragraphs = re.split(r"\n\s*\n", text)
    parser = _parser()
    assert "rtserver --version" in text
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        named = [p for p in paragraphs if f"rtserver {name}" in p]
        assert named, f"rtserver {name} is documented nowhere"
        for action in sub._actions:
            for flag in (f for f in action.option_strings if f.startswith("--") and f != "--help"):
                assert any(re.search(re.escape(flag) + r"\b", p) for p in named), f"rtserver {name} {flag} undocumented"


def test_license_is_mit():
    assert _read("LICENSE").startswith("MIT License")
    assert 'license = "MIT"' in _read("pyproject.toml")


# -- the README's examples, run as written against a real gateway ------------------------------

def _fenced(text: str, lang: str, after: str) -> str:
    """The first ```lang block of `text` after the line holding `after`."""
    start = text.index(after)
    m = re.compile(rf"^```{lang}\n(.*?)^```", re.S | re.M).search(text, start)
    assert m, f"no ```{lang} block after {after!r}"
    return m.group(1)


def _shown(line: str) -> dict:
    """A message as the docs show it: `…` stands for a value that varies (null here)."""
    return json.loads(re.sub(r"(?<=:)…", "null", line))


def _like(got: dict, shown: dict) -> None:
    """`got` has the members `shown` has, in its order, with its values where they are given."""
    assert list(got) == list(shown), (got, shown)
    for key, value in shown.items():
        if value not in (None, "…"):
            assert got[key] == value, (key, got, shown)
        else:
            assert got[key] is not None, (key, got)


def _cli(*args: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-m", "rtserver", *args], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout.strip()


async def test_readme_quickstart_runs_as_written(gateway_factory):
    """The Quickstart in a zero-configuration (dev mode) gateway: the token command, the two
    client messages and the answers shown, the curl publish and its answer, and the event the
    client prints, member by member."""
    readme = _read("README.md")
    session = _fenced(readme, "sh", "## Quickstart")
    gw = await gateway_factory(env={"RT_AUTH_HS256_SECRET": ""})  # dev mode: a generated secret
    env = {**gw.env}
    token_cmd = re.search(r"TOKEN=\$\((rtserver token [^)]*)\)", session).group(1).split()[1:]
    token = _cli(*token_cmd, env=env)
    path = re.search(r"ws://127\.0\.0\.1:8080(/\S+)", session).group(1)
    sent = [line[2:] for line in session.splitlines() if line.startswith("> ")]
    shown = [_shown(line[2:]) for line in session.splitlines() if line.startswith("< ")]
    sent[0] = sent[0].replace('"eyJ…"', json.dumps(token))
    # The echo line prints the auth message to paste, the token in it.
    echo = re.search(r"^(echo .*?)\s+#", session, re.M).group(1)
    printed = subprocess.run(["bash", "-c", echo], env={**env, "TOKEN": token}, capture_output=True, text=True)
    assert json.loads(printed.stdout) == json.loads(sent[0]), printed
    async with websockets.connect(f"ws://{gw.netloc}{path}") as ws:
        for line, answer in zip(sent, shown, strict=True):
            await ws.send(line)
            _like(json.loads(await ws.recv()), answer)

        publish = _fenced(readme, "sh", "In a third shell in the same directory, publish")
        # The third shell makes its own token, with the same command as the second.
        assert re.search(r"TOKEN=\$\((rtserver token [^)]*)\)", publish).group(1).split()[1:] == token_cmd
        url = re.search(r"http://127\.0\.0\.1:8080(\S+)", publish).group(1)
        headers = dict(h.split(": ", 1) for h in re.findall(r'-H "([^"]+)"', publish))
        headers = {k: v.replace("$TOKEN", token) for k, v in headers.items()}
        body = re.search(r"-d '([^']+)'", publish).group(1).encode()
        status, answer = await gw.post(url, body, headers)
        assert status == 202, answer
        answer = json.loads(answer)
        _like(answer, {**json.loads(re.search(r"^# (\{.*\})$", publish, re.M).group(1)), "seq": None})

        event = json.loads(await ws.recv())
        printed = json.loads(_fenced(readme, "json", "and the client prints"))
        _like(event, {**printed, "timestamp": "…", "seq": answer["seq"]})
        assert event["payload"] == json.loads(body)


async def test_readme_python_client_example_runs_as_written(gateway_factory):
    """The README's Python client example, its URL pointed at a test gateway and its token in
    RT_TOKEN (where its fetch_token reads it), prints the matching event and not the other."""
    gw = await gateway_factory()
    code = _fenced(_read("README.md"), "python", "Python (`rtserver.client`)")
    assert "wss://rt.example.com/workspaces/w1/realtime/connect" in code
    code = code.replace("wss://rt.example.com", f"ws://{gw.netloc}")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-u", "-c", code,
                                                env={**gw.env, "RT_TOKEN": gw.token("w1")},
                                                stdout=asyncio.subprocess.PIPE)
    try:
        # Published until the example prints: events before its subscription are not asked for.
        line = b""
        for _ in range(40):
            await gw.publish("w1", "orders", {"status": "new", "n": 1})
            await gw.publish("w1", "orders", {"status": "paid", "n": 2})
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), 0.5)
                break
            except TimeoutError:
                continue
        assert line.decode().startswith("event ") and "'status': 'paid'" in line.decode(), line
    finally:
        proc.kill()
        await proc.wait()


def test_readme_toml_example_is_a_valid_configuration(tmp_path):
    """The per-workspace TOML example loads (a key it misspelled would be a configuration error)."""
    from rtserver.config import load

    path = tmp_path / "rt.toml"
    path.write_text(_fenced(_read("README.md"), "toml", "## Configuration"))
    cfg = load(str(path), environ={})
    assert cfg.workspaces["acme"].postgres_schemas == ["public", "sales"]


async def test_protocol_doc_client_in_a_few_lines_resumes_as_written(gateway_factory):
    """docs/protocol.md §7's client in a few lines, under Node.js with the `ws` package as its
    WebSocket: it subscribes, renders events, and after its link is cut resumes its session
    with the last seq and renders what was published meanwhile, once each."""
    from tests.test_js_client import JS, require_node

    node = require_node()
    gw = await gateway_factory()
    snippet = _fenced(_read("docs", "protocol.md"), "javascript", "A client in a few lines")
    token = gw.token("w1")
    script = f"""
import WS from {json.dumps(str(JS / "node_modules" / "ws" / "index.js"))};
const sockets = [];
globalThis.WebSocket = class extends WS {{ constructor(u) {{ super(u); sockets.push(this); }} }};
const url = {json.dumps(gw.ws_url("w1"))};
const TOKEN = {json.dumps(token)};
const render = (m) => console.log("render " + JSON.stringify(m.payload));
const reload = () => console.log("reload");
{snippet}
connect();
process.stdin.on("data", () => sockets[sockets.length - 1].terminate());  // a lost link
"""
    proc = await asyncio.create_subprocess_exec(node, "--input-type=module", "-e", script,
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)

    async def rendered(n: int) -> None:
        # Published until it renders: the subscription is sent once auth_ok arrives.
        for _ in range(40):
            await gw.publish("w1", "orders", {"n": n})
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), 0.5)
            except TimeoutError:
                continue
            assert line.decode().strip() == f'render {{"n":{n}}}', line
            return
        raise AssertionError(f"event {n} never rendered")

    try:
        await rendered(1)
        proc.stdin.write(b"cut\n")
        await proc.stdin.drain()
        for n in (2, 3):  # while the link is down, or just back: the resume replays them
            await gw.publish("w1", "orders", {"n": n})
        lines: list[str] = []
        while len(lines) < 2:
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
            if line != 'render {"n":1}':  # a second copy published while the first was on its way
                lines.append(line)
        assert lines == ['render {"n":2}', 'render {"n":3}'], lines
        resumed = await gw.audit_records("session-resumed")
        assert resumed, "the snippet did not resume its session"
    finally:
        proc.kill()
        await proc.wait()


def _metrics_table(readme: str) -> dict[str, tuple[str, set[str]]]:
    """README's ## Metrics table: {metric: (type, label names)}."""
    section = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip("|").split("|")]
        if not row.startswith("| `rt_") or len(cells) != 4:
            continue
        for name in re.findall(r"`(rt_\w+)`", cells[0]):
            documented[name] = (cells[1], set(re.findall(r"`(\w+)`", cells[2])))
    return documented


async def test_every_metric_is_documented_with_its_type_and_labels(gateway_factory):
    """Most of /metrics (rt_connections, rt_subscriptions, rt_events_in_total, rt_auth_failures_total,
    rt_publish_requests_total, the rt_history_* and rt_source_* families, ...) was named in no doc:
    an operator had the HELP line to guess a series' meaning and labels from. README's Metrics
    table names each family the gateway exports, with its type and labels (sources of both kinds
    here, not reachable: their series are there all the same), and names none the code lacks."""
    from tests.harness.prometheus import family_types, parse_exposition

    gw = await gateway_factory(env={"RT_POSTGRES_URL": "postgresql://rt@127.0.0.1:1/app",
                                    "RT_MONGO_URL": "mongodb://127.0.0.1:1/app?serverSelectionTimeoutMS=300"})
    async with websockets.connect(gw.ws_url("a")) as ws:  # a granted workspace starts its sources
        await ws.send(json.dumps({"type": "auth", "token": gw.token("a")}))
        assert json.loads(await ws.recv())["type"] == "auth_ok"
        await ws.send(json.dumps({"type": "subscribe", "channel": "events:x"}))
        await ws.recv()
        await gw.publish("a", "x", {})  # rt_history_* series
        await ws.recv()
        text = (await gw.get("/metrics"))[1].decode()
    documented = _metrics_table(_read("README.md"))
    generic = re.findall(r"^# HELP (rt_source_\w+) Source ", text, re.M)
    assert not generic, f"no help of their own (metrics.SOURCE_HELP): {generic}"
    for name, kind in family_types(text).items():
        assert name in documented, f"{name} is not in README's Metrics table"
        assert documented[name][0] == kind, (name, kind)
    for sample in parse_exposition(text):
        name, _, labels = sample.partition("{")
        assert set(re.findall(r'(\w+)="', labels)) <= documented[name][1], (sample, documented[name][1])
    code = "".join(_read("rtserver", f) for f in os.listdir(os.path.join(ROOT, "rtserver")) if f.endswith(".py"))
    code += "".join(_read("rtserver", "sources", f) for f in ("postgres.py", "mongo.py"))
    for name in documented:  # rt_audit_*, rt_source_*: a key of the audit's or a source's status()
        key = re.sub(r"^rt_(audit|source)_", "", name)
        assert f'"{name}"' in code or key != name and f'"{key}"' in code, name
