"""Following an operation a command started: its live progress, ``--wait`` and ``--json``; from
the catalogue, or through the API when the CLI is its client (``remote``). The catalogue is
imported only on the first path."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import click

from orchestrator import progress
from orchestrator.cli.base import Context, emit
from orchestrator.cli.remote import view

if TYPE_CHECKING:
    from orchestrator.cli.remote import Remote
    from orchestrator.models import OperationPublic


def load_op(ctx: Context, op_id: int, remote: Remote | None = None) -> OperationPublic:
    """The operation and its steps: the catalogue's model, or (``remote``) the API's JSON read alike."""
    if remote is not None:
        return view(remote.get(f"/operations/{op_id}"))  # type: ignore[no-any-return]
    from orchestrator import catalogue

    with ctx.platform.reader() as s:
        return catalogue.operation_public(session=s, op=catalogue.get_operation(session=s, op_id=op_id))


def follow(ctx: Context, op_id: int, remote: Remote | None = None) -> int:
    """Live progress until the operation ends; 0 if it succeeded, else 1; from the catalogue,
    or through the API (``remote``: a command that started it there, ``ops watch``). When its
    first steps wait for a host whose node has not been heard from, say so (once; from the
    catalogue only: the API does not say when nodes were last heard from)."""
    began = time.monotonic()
    warned: set[str] = set()

    def load() -> OperationPublic:
        op = load_op(ctx, op_id)
        if time.monotonic() - began > NO_NODE_HINT_AFTER \
                and op.state in ("queued", "running"):
            waiting = {s.host for s in op.steps if s.state == "pending" and s.host} - warned
            if waiting and not any(s.state == "running" for s in op.steps):
                from orchestrator import names

                for host in sorted(waiting - _heard_from(ctx)):
                    warned.add(host)
                    click.echo(f"warning: no node is consuming {names.host_queue(host)}: "
                               f"is `orchestrator node run {host}` running?", err=True)
        return op

    if remote is not None:
        return progress.follow(_long_poll(remote, op_id), click.echo, poll=0)
    return progress.follow(load, click.echo, poll=POLL)


NO_NODE_HINT_AFTER = 3.0  # seconds an operation's first steps may wait before the hint
POLL = 0.1  # seconds between two reads of the catalogue
LONG_POLL = 10.0  # seconds the API may hold a poll of an operation that does not change


def _long_poll(remote: Remote, op_id: int) -> Callable[[], OperationPublic]:
    """Through the API: each call answers as soon as the operation changed since the last (a
    long poll on its ETag), or with the last answer after ``LONG_POLL`` seconds of no change. An
    answer that comes back at once unchanged (an API that does not wait) is followed by a pause,
    not by the next request."""
    last: list[Any] = [None, None]  # the last answer, its ETag

    def load() -> OperationPublic:
        asked = time.monotonic()
        data, etag = remote.poll(f"/operations/{op_id}", last[1], LONG_POLL)
        if data is not None and etag != last[1]:
            last[:] = [view(data), etag]
        elif time.monotonic() - asked < POLL:
            time.sleep(POLL)
        return last[0]  # type: ignore[no-any-return]

    return load


def _heard_from(ctx: Context) -> set[str]:
    """Hosts whose node sent a heartbeat in the last three intervals (a node that died a moment
    ago still shows its host up until the watcher's verdict)."""
    from datetime import timedelta

    from orchestrator import catalogue
    from orchestrator.models import utcnow

    recent = utcnow() - timedelta(seconds=3 * ctx.settings.heartbeat_interval)
    with ctx.platform.reader() as s:
        return {h.name for h in catalogue.host_views(session=s)
                if h.state in ("up", "draining") and h.last_seen is not None and h.last_seen >= recent}


def started(ctx: Context, op: Any, wait: bool) -> None:
    """Say which operation a command started (``{"operation": ID}`` with --json); with
    ``--wait``, follow it and exit with its end. ``op`` has ``id``, ``kind`` and ``state``: the
    catalogue's operation, or the API's answer (``remote.view``)."""
    as_json = bool(click.get_current_context().meta.get("as_json"))
    # Followed where it was started: through the API (its answer, read as attributes) or not.
    remote = ctx.remote if isinstance(op, SimpleNamespace) else None
    if as_json:
        emit({"operation": op.id})
    else:
        click.echo(f"operation {op.id} ({op.kind}) {op.state}")
    if wait:
        if not as_json:
            code = follow(ctx, op.id or 0, remote)
        elif remote is not None:
            code = progress.follow(_long_poll(remote, op.id or 0), lambda _line: None, poll=0)
        else:
            code = progress.follow(lambda: load_op(ctx, op.id or 0), lambda _line: None)
        sys.exit(code)
