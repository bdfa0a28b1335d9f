"""The docs tell the truth about the code: the README's configuration table is the one the
code generates, and the README's two set-up commands are the ones CI and newcomers run."""

from __future__ import annotations

import os
import re

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


def test_license_is_mit():
    assert _read("LICENSE").startswith("MIT License")
    assert 'license = "MIT"' in _read("pyproject.toml")
