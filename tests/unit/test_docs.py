"""The documentation keeps up with the code: each test fails when something is undocumented.

Settings, field types, schema kinds, URL rules, problem codes and CLI commands
are read from the code itself, so adding one without documenting it fails
here with the names that are missing.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import click
import pytest

import metacrm.runtime.api
from metacrm.app import create_app
from metacrm.cli import main
from metacrm.metadata import fieldtypes, schemas
from metacrm.runtime.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
API_SOURCES = Path(metacrm.runtime.api.__file__).resolve().parent
#: Methods every Flask rule answers by itself; they need no documentation.
IMPLICIT_METHODS = {"HEAD", "OPTIONS"}


def read(relative: str) -> str:
    return (ROOT / relative).read_text("utf-8")


def missing(names: Iterable[str], text: str, form: str = "{}") -> list[str]:
    """Return the names whose documented form does not occur in ``text``."""
    return sorted(name for name in names if form.format(name) not in text)


def test_every_setting_is_documented_in_readme_and_admin_guide() -> None:
    variables = {f"{ENV_PREFIX}{f.name.upper()}" for f in dataclasses.fields(Settings)}
    assert missing(variables, read("README.md")) == []
    assert missing(variables, read("docs/admin-guide.md")) == []


def test_every_field_type_is_documented_in_the_metadata_format() -> None:
    assert missing(fieldtypes.names(), read("docs/metadata-format.md"), "`{}`") == []


def test_every_schema_kind_is_documented_in_the_metadata_format() -> None:
    text = read("docs/metadata-format.md")
    undocumented = [k for k in schemas.KINDS if f"`{k}`" not in text and f"{k}.json" not in text]
    assert undocumented == []


def _url_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Return ``METHOD /path`` of every URL rule, converters dropped (``<int:n>`` → ``<n>``)."""
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    app = create_app({"instance_dir": str(tmp_path / "instance")})
    try:
        rules = set()
        for rule in app.url_map.iter_rules():
            if rule.endpoint == "static":
                continue
            path = re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", r"<\1>", rule.rule)
            rules.update(f"{method} {path}" for method in rule.methods - IMPLICIT_METHODS)
        return rules
    finally:
        app.extensions["metacrm"].close()


def test_every_url_rule_is_documented_in_the_api_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = _url_rules(tmp_path, monkeypatch)
    assert "GET /healthz" in rules  # the walk found the application's rules
    assert missing(rules, read("docs/api.md"), "`{}`") == []


def _problem_codes() -> set[str]:
    """Return every ``code`` the API modules pass to abort/ProblemError or map HTTP errors to."""
    codes: set[str] = set()
    for path in sorted(API_SOURCES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                if name in ("abort", "ProblemError"):
                    arguments = node.args[1:2] + [k.value for k in node.keywords if k.arg == "code"]
                elif (
                    isinstance(func, ast.Attribute)
                    and func.attr == "get"
                    and isinstance(func.value, ast.Name)
                    and func.value.id == "_HTTP_CODES"
                ):
                    arguments = node.args[1:2]  # the code for any other status
                else:
                    continue
                codes.update(
                    a.value
                    for a in arguments
                    if isinstance(a, ast.Constant) and isinstance(a.value, str)
                )
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
                if any(isinstance(t, ast.Name) and t.id == "_HTTP_CODES" for t in node.targets):
                    codes.update(
                        v.value
                        for v in node.value.values
                        if isinstance(v, ast.Constant) and isinstance(v.value, str)
                    )
    return codes


def test_every_problem_code_is_documented_in_the_api_reference() -> None:
    codes = _problem_codes()
    # The walk found the three sources: abort calls, the HTTP mapping and its default.
    assert {"would_lock_out", "method_not_allowed", "http_error"} <= codes
    assert missing(codes, read("docs/api.md"), "`{}`") == []


def _commands(group: click.Group, path: str) -> Iterator[tuple[str, click.Command]]:
    for name, command in sorted(group.commands.items()):
        yield f"{path} {name}", command
        if isinstance(command, click.Group):
            yield from _commands(command, f"{path} {name}")


def test_every_cli_command_and_option_is_documented_in_the_admin_guide() -> None:
    text = read("docs/admin-guide.md")
    commands = dict(_commands(main, "metacrm"))
    assert "metacrm meta publish" in commands
    undocumented = [path for path in commands if not re.search(rf"`{re.escape(path)}[` ]", text)]
    assert undocumented == []
    options = {
        opt
        for command in [main, *commands.values()]
        for param in command.params
        if isinstance(param, click.Option)
        for opt in param.opts
        if opt.startswith("--") and opt != "--help"
    }
    assert sorted(o for o in options if not re.search(rf"`{re.escape(o)}[` ]", text)) == []
