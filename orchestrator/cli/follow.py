"""Following an operation a command started: its live progress, ``--wait`` and ``--json``."""

from __future__ import annotations

import sys
import time
from datetime import timedelta

import click

from orchestrator import catalogue, names, progress
from orchestrator.cli.base import Context, emit
from orchestrator.models import Operation, OperationPublic, utcnow


def load_op(ctx: Context, op_id: int) -> OperationPublic:
    with ctx.platform.reader() as s:
        return catalogue.operation_public(session=s, op=catalogue.get_operation(session=s, op_id=op_id))


def follow(ctx: Context, op_id: int) -> int:
    """Live progress until the operation ends; 0 if it succeeded, else 1. When its first
    steps wait for a host whose node has not been heard from, say so (once)."""
    began = time.monotonic()
    warned: set[str] = set()

    def load() -> OperationPublic:
        op = load_op(ctx, op_id)
        if time.monotonic() - began > NO_NODE_HINT_AFTER and op.state in ("queued", "running"):
            waiting = {s.host for s in op.steps if s.state == "pending" and s.host} - warned
            if waiting and not any(s.state == "running" for s in op.steps):
                for host in sorted(waiting - _heard_from(ctx)):
                    warned.add(host)
                    click.echo(f"warning: no node is consuming {names.host_queue(host)}: "
                               f"is `orchestrator node run {host}` running?", err=True)
        return op

    return progress.follow(load, click.echo)


NO_NODE_HINT_AFTER = 3.0  # seconds an operation's first steps may wait before the hint


def _heard_from(ctx: Context) -> set[str]:
    """Hosts whose node sent a heartbeat in the last three intervals (a node that died a moment
    ago still shows its host up until the watcher's verdict)."""
    recent = utcnow() - timedelta(seconds=3 * ctx.settings.heartbeat_interval)
    with ctx.platform.reader() as s:
        return {h.name for h in catalogue.host_views(session=s)
                if h.state in ("up", "draining") and h.last_seen is not None and h.last_seen >= recent}


def started(ctx: Context, op: Operation, wait: bool) -> None:
    """Say which operation a command started (``{"operation": ID}`` with --json); with
    ``--wait``, follow it and exit with its end."""
    as_json = bool(click.get_current_context().meta.get("as_json"))
    if as_json:
        emit({"operation": op.id})
    else:
        click.echo(f"operation {op.id} ({op.kind}) {op.state}")
    if wait:
        code = follow(ctx, op.id or 0) if not as_json else progress.follow(lambda: load_op(ctx, op.id or 0),
                                                                         lambda _line: None)
        sys.exit(code)

