"""What every command shares: the lazy context, the one place bad input becomes exit 2,
output helpers, the ENV SVC arguments, and following an operation."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from functools import cached_property
from typing import Any, TypeVar

import click
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from orchestrator import catalogue, names, progress
from orchestrator.dispatch import masked
from orchestrator.errors import BadInput, one_line
from orchestrator.models import Operation, OperationPublic, utcnow
from orchestrator.platform import Platform, make_platform
from orchestrator.settings import Settings, get_settings

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    """Built lazily so ``--help`` and bad input need no database or broker."""

    @cached_property
    def settings(self) -> Settings:
        return get_settings()

    @cached_property
    def platform(self) -> Platform:
        return make_platform(self.settings)


pass_ctx = click.make_pass_decorator(Context, ensure=True)


def fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class OneLineGroup(click.Group):
    """Usage errors and refused requests end as one line on stderr and exit 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("standalone_mode", False)
        argv = args[0] if args else kwargs.get("args")
        if (argv is None and len(sys.argv) <= 1) or argv == []:
            # Bare `orchestrator`: its usage, readable, on stdout.
            click.echo(self.get_help(click.Context(self, info_name=kwargs.get("prog_name") or "orchestrator")))
            sys.exit(0)
        try:
            return super().main(*args, **kwargs)
        except click.UsageError as exc:
            fail(" ".join(exc.format_message().split()))
        except BadInput as exc:
            fail(str(exc))
        except SQLAlchemyError as exc:  # not the request's fault: exit 1, as a failed operation
            url = masked(get_settings().database_url)
            fail(f"the catalogue is unavailable ({url}): "
                 f"{one_line(exc.orig if isinstance(exc, DBAPIError) else exc)}", code=1)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """A small platform-as-a-service control plane."""


def env_svc(fn: F) -> F:
    """The ENV SVC arguments, as ``env_name`` and ``name``."""
    fn = click.argument("name", metavar="SVC")(fn)
    return click.argument("env_name", metavar="ENV")(fn)


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def _remember_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    ctx.meta["as_json"] = value
    return value


def wait_option(fn: F) -> F:
    """--wait (follow the operation to its end) and --json (print {"operation": ID}) of the
    commands that start an operation."""
    fn = click.option("--json", "as_json", is_flag=True, expose_value=False, callback=_remember_json,
                      help='Print {"operation": ID} (with --wait: only that, then the exit status).')(fn)
    return click.option("--wait", is_flag=True, help="Follow the operation to its end.")(fn)


def emit(data: Any) -> None:
    def plain(x: Any) -> Any:
        if isinstance(x, BaseModel):
            return x.model_dump(mode="json")
        if isinstance(x, list):
            return [plain(i) for i in x]
        return x

    click.echo(json.dumps(plain(data), indent=2, default=str))


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    cells = [[("" if c is None else str(c)) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


R = TypeVar("R")


def listing(rows: Sequence[R], *, as_json: bool, headers: Sequence[str],
            cells: Callable[[R], Sequence[Any]]) -> None:
    """Rows as JSON, or as a table with one line per row."""
    if as_json:
        emit(list(rows))
    else:
        table([cells(r) for r in rows], headers)


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

