"""What the platform's CLI prints, read back, for tests and benchmarks: the operation id in a
command's output, catalogue timestamps, the JSON of ``ops``, ``jobs``, ``hosts`` and ``services``,
and an operation followed to its end.

``cli`` is anything whose ``ok(*args)`` runs the CLI and returns its stdout: the tests' in-process
``Cli``, or a ``harness.Platform`` (a process per call). Nothing here imports the platform.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any, Protocol

from tests.harness import wait_for

ENDED = ("succeeded", "failed", "cancelled")


class RunsCli(Protocol):
    def ok(self, *args: str) -> str: ...


def op_of(output: str, then: str = "") -> int:
    """The N of the first ``operation N`` (followed by ``then``) in a command's output."""
    found = re.search(rf"operation (\d+){re.escape(then)}", output)
    assert found, f"no operation id in {output!r}"
    return int(found.group(1))


def ts(text: str | None) -> datetime:
    """A catalogue timestamp, timezone-aware: the catalogue keeps UTC (SQLite gives it back naive)."""
    assert text, "a timestamp is missing"
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def ts_or_none(text: str | None) -> datetime | None:
    return ts(text) if text else None


def op_json(cli: RunsCli, op_id: int | str) -> dict[str, Any]:
    """``ops show OP --json``: the operation and its steps."""
    return json.loads(cli.ok("ops", "show", str(op_id), "--json"))  # type: ignore[no-any-return]


def ops_json(cli: RunsCli, env: str) -> list[dict[str, Any]]:
    return json.loads(cli.ok("ops", "list", env, "--json"))  # type: ignore[no-any-return]


def jobs_json(cli: RunsCli, env: str, service: str | None = None, *, everything: bool = False) -> list[dict[str, Any]]:
    """``jobs list ENV [SERVICE] --json``: the active jobs, or with ``everything`` all (--all)."""
    args = ["jobs", "list", env, *([service] if service else []), "--json", *(["--all"] if everything else [])]
    return json.loads(cli.ok(*args))  # type: ignore[no-any-return]


def hosts_json(cli: RunsCli) -> dict[str, dict[str, Any]]:
    """``hosts list --json``, by host name."""
    return {h["name"]: h for h in json.loads(cli.ok("hosts", "list", "--json"))}


def service_json(cli: RunsCli, env: str, service: str) -> dict[str, Any]:
    return json.loads(cli.ok("services", "show", env, service, "--json"))  # type: ignore[no-any-return]


def wait_op(cli: RunsCli, op_id: int | str, timeout: float = 60, *, succeed: bool = False) -> dict[str, Any]:
    """Poll ``ops show OP --json`` every 0.2 s until the operation ends, and return it (with
    ``succeed``, it must have succeeded). Still running after ``timeout`` seconds: AssertionError."""
    op = wait_for(f"operation {op_id} ends", lambda: op_json(cli, op_id), timeout, every=0.2,
                  until=lambda o: o["state"] in ENDED, retry=())
    if succeed:
        assert op["state"] == "succeeded", f"operation {op_id} failed: {op['error']}; steps {op['steps']}"
    return op
