"""The CLI starts fast: `orchestrator --help` imports no heavy library, a command that reads the
catalogue no Celery, web framework or Docker client, and the command table `--help` prints from
says what the commands themselves say."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from orchestrator.cli import main
from orchestrator.cli.base import COMMANDS, load_commands
from tests.harness import ROOT

HEAVY = {"celery", "kombu", "redis", "fastapi", "starlette", "uvicorn", "docker", "sqlalchemy", "sqlmodel",
         "pydantic", "prometheus_client", "cryptography", "yaml", "psycopg"}


def imported(*args: str, env: dict[str, str] | None = None) -> set[str]:
    """The top-level packages `python -m orchestrator.cli ARGS` imports (from -X importtime)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "orchestrator.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-2000:]
    return {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines()
            if line.startswith("import time:")}


def test_help_imports_no_heavy_library() -> None:
    assert imported("--help") & HEAVY == set()


def test_a_catalogue_command_imports_no_celery_web_framework_or_docker(tmp_path: Path) -> None:
    env = {"ORCH_DATABASE_URL": f"sqlite:///{tmp_path / 'orchestrator.db'}", "ORCH_BROKER_URL": "redis://127.0.0.1:1/0"}
    loaded = imported("hosts", "list", env=env)
    assert "sqlalchemy" in loaded  # it did read the catalogue
    assert loaded & {"celery", "kombu", "redis", "fastapi", "starlette", "uvicorn", "docker", "yaml"} == set()


def test_the_command_table_says_what_the_commands_say() -> None:
    load_commands()
    ctx = click.Context(main)
    actual = {name: (command.callback.__module__.rsplit(".", 1)[-1] if command.callback else "?",
                     None if command.hidden else command.get_short_help_str(limit=10_000))
              for name, command in main.commands.items()}
    assert actual == COMMANDS, "update orchestrator.cli.base.COMMANDS"
    assert main.list_commands(ctx) == sorted(COMMANDS)


def test_an_unknown_command_is_still_one_line_and_exit_2() -> None:
    """A name not in the table loads every command module (one may add it), then click refuses it."""
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "no-such-command"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "No such command 'no-such-command'" in done.stderr
