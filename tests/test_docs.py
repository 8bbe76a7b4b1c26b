"""The documentation covers what the code defines: error codes, job and daemon keys, CLI commands.

Each test reads the definitions from the code, so adding an error, a key or a command without documenting
it fails here.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import shlex
from pathlib import Path

import pytest
import yaml

import fedscaled
from fedscaled.binary_entry import choose
from fedscaled.core.config import CLUSTER_KEYS, JOB_KEYS
from fedscaled.ctl.cli import build_parser as ctl_parser
from fedscaled.daemon.cli import build_parser as daemon_parser
from fedscaled.daemon.config import OPTIONS, DaemonConfig, load_config
from fedscaled.errors import FedError, catalog

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


def all_errors() -> list[type[FedError]]:
    """The catalog after importing every module, so that FedError subclasses defined outside
    fedscaled/errors.py (SocketInUse, DataDirLocked, ListenFailed, ...) are registered."""
    for module in pkgutil.walk_packages(fedscaled.__path__, prefix="fedscaled."):
        importlib.import_module(module.name)
    return catalog()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands of an argparse parser, by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def long_options(parser: argparse.ArgumentParser) -> list[str]:
    """The ``--long`` options of a parser, except --help."""
    return [opt for action in parser._actions for opt in action.option_strings
            if opt.startswith("--") and opt != "--help"]


def test_every_error_code_is_documented() -> None:
    text = (DOCS / "errors.md").read_text()
    errors = all_errors()
    codes = {cls.code for cls in errors}
    assert {"socket_in_use", "data_dir_locked", "listen_failed"} <= codes, "start-up errors not found"
    assert len(codes) == len(errors), "two error classes share a code"
    # The overview table: | [`code`](#code) | HTTP | exit | where |
    rows = {m.group(1): (int(m.group(2)), int(m.group(3)))
            for m in re.finditer(r"^\| \[`([a-z_]+)`\]\(#[a-z_]+\) \| (\d+) \| (\d+) \|", text, re.M)}
    for cls in errors:
        assert f"\n### `{cls.code}`\n" in text, f"docs/errors.md has no section for {cls.code}"
        assert cls.code in rows, f"docs/errors.md's overview table has no row for {cls.code}"
        assert rows[cls.code] == (cls.status, cls.exit_code), (
            f"docs/errors.md gives {cls.code} HTTP/exit {rows[cls.code]}, the code {cls.status}/{cls.exit_code}")
    assert set(rows) <= codes, f"documented codes that do not exist: {sorted(set(rows) - codes)}"


def test_every_job_key_is_documented() -> None:
    text = (DOCS / "config.md").read_text()
    text = text[text.index("### Job keys"):]  # data_path is a cluster key too: read the job-key tables only
    for key, spec in JOB_KEYS.items():
        row = re.search(rf"^\| `{re.escape(key)}`( \*\(ignored\)\*)? \|", text, re.M)
        assert row is not None, f"docs/config.md has no table row for job key {key}"
        assert bool(row.group(1)) == (not spec.used), f"docs/config.md marks {key} ignored wrongly"


def test_every_cluster_key_is_documented() -> None:
    text = (DOCS / "config.md").read_text()
    for key in CLUSTER_KEYS:
        assert re.search(rf"^\| `{re.escape(key)}` \|", text, re.M), f"docs/config.md lacks cluster key {key}"


def test_every_daemon_option_is_documented() -> None:
    config_md = (DOCS / "config.md").read_text()
    example = (REPO / "configs" / "daemon.yml").read_text()
    for name in OPTIONS:
        assert f"`{name}`" in config_md, f"docs/config.md lacks daemon option {name}"
        assert f"`FEDSCALED_{name.upper()}`" in config_md, f"docs/config.md lacks FEDSCALED_{name.upper()}"
        assert re.search(rf"^#? ?{name}:", example, re.M), f"configs/daemon.yml lacks option {name}"


def test_example_daemon_config_is_valid_and_sets_the_defaults(tmp_path: Path) -> None:
    path = REPO / "configs" / "daemon.yml"
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    loaded = load_config({"data_dir": str(tmp_path)}, path, environ={})
    assert loaded == DaemonConfig(data_dir=tmp_path.absolute())


def test_every_cli_command_and_option_is_documented() -> None:
    text = (DOCS / "cli.md").read_text()
    commands = subcommands(ctl_parser())
    assert {"submit", "stop", "status", "logs"} <= set(commands)
    for name, sub in commands.items():
        assert re.search(rf"\| `{name}[ `]", text), f"docs/cli.md's command table lacks fedscalectl {name}"
        for option in long_options(sub):
            assert option in text, f"docs/cli.md lacks fedscalectl {name} {option}"
    start = subcommands(daemon_parser())["start"]
    for option in long_options(start):
        assert f"`{option}" in text, f"docs/cli.md lacks fedscaled start {option}"


@pytest.mark.parametrize(("argv", "program", "args"), [
    (["/usr/local/bin/fedscaled", "start", "--data-dir", "x"], "daemon", ["start", "--data-dir", "x"]),
    (["fedscaled", "--version"], "daemon", ["--version"]),
    (["fedscaled", "ctl", "status"], "ctl", ["status"]),
    (["/usr/local/bin/fedscalectl", "status", "--json"], "ctl", ["status", "--json"]),
    (["fedscaled", "device", "simulate"], "device", ["simulate"]),
    (["./fedscaled-device", "simulate"], "device", ["simulate"]),
])
def test_binary_dispatch_is_as_documented(argv: list[str], program: str, args: list[str]) -> None:
    assert choose(argv) == (program, args)


def test_readme_quick_start_is_two_commands_whose_scripts_exist() -> None:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"^```[a-z]*\n(.*?)^```", readme, re.M | re.S)
    assert block is not None, "README.md has no fenced code block"
    commands = [line.split(" #", 1)[0].strip() for line in block.group(1).splitlines()]
    commands = [c for c in commands if c and not c.startswith("#")]
    assert len(commands) == 2, f"README's first code block should hold exactly two commands: {commands}"
    scripts: list[list[str]] = []
    for command in commands:
        steps = [shlex.split(step) for step in command.split("&&")]
        assert all(len(step) == 2 and step[0] == "bash" for step in steps), f"expected 'bash X && bash Y': {command}"
        scripts.append([step[1] for step in steps])
    assert scripts == [["scripts/setup.sh", "scripts/demo.sh"], ["scripts/setup.sh", "scripts/test.sh"]]
    for script in {s for pair in scripts for s in pair}:
        assert (REPO / script).is_file(), f"README names {script}, which does not exist"
