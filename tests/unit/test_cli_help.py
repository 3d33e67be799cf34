"""The CLI's manners: every command and group says what it does; bare `orchestrator` prints its
usage on stdout."""

from __future__ import annotations

import subprocess
import sys

import click

from orchestrator.cli import main
from tests.harness import ROOT


def commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    found = []
    ctx = click.Context(group)
    for name in group.list_commands(ctx):  # the top group loads its commands' modules as it is asked
        command = group.get_command(ctx, name)
        assert command is not None, name
        if command.hidden:
            continue
        found.append(((*path, name), command))
        if isinstance(command, click.Group):
            found += commands(command, (*path, name))
    return found


def test_every_command_and_group_has_a_description() -> None:
    missing = [" ".join(path) for path, command in commands(main) if not (command.help or "").strip()]
    assert missing == []
    assert len(commands(main)) > 50


def test_bare_orchestrator_prints_its_usage_on_stdout() -> None:
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith("Usage: orchestrator [OPTIONS] COMMAND [ARGS]...")
    assert "\n  push " in done.stdout and "\n  sites " in done.stdout
