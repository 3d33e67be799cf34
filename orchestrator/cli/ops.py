"""orchestrator jobs / ops: what runs, and what the operations did. ``ops show`` and ``ops watch``
ask the API when the CLI is its client (``remote``); the others read the catalogue."""

from __future__ import annotations

import sys

import click

from orchestrator.cli.base import Context, emit, json_option, listing, main, pass_ctx, table
from orchestrator.cli.follow import follow, load_op


@main.group()
def jobs() -> None:
    """Jobs: one container each."""


@jobs.command("list")
@click.argument("env_name", metavar="ENV")
@click.argument("name", metavar="SVC", required=False)
@click.option("--all", "include_stopped", is_flag=True, help="Include stopped and failed jobs.")
@json_option
@pass_ctx
def jobs_list(ctx: Context, env_name: str, name: str | None, include_stopped: bool,
              as_json: bool) -> None:
    """The jobs of an environment (or of one service): host, port, state, release."""
    from orchestrator import catalogue

    with ctx.platform.reader() as s:
        environment = catalogue.get_env(session=s, name=env_name)
        svc = catalogue.get_service(session=s, env=env_name, name=name)[1] if name else None
        rows = catalogue.list_jobs(session=s, env=environment, service=svc,
                                   include_stopped=include_stopped)
    listing(rows, as_json=as_json,
            headers=["JOB", "SERVICE", "KIND", "TARGET", "HOST", "PORT", "STATE", "RELEASE", "CONTAINER"],
            cells=lambda j: (j.id, j.service, j.kind, j.target, j.host, j.port, j.state, j.release,
                             (j.container_id or "")[:12]))


@main.group()
def ops() -> None:
    """Operations and their steps."""


@ops.command("list")
@click.argument("env_name", metavar="ENV", required=False)
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True,
              help="How many, from the newest.")
@json_option
@pass_ctx
def ops_list(ctx: Context, env_name: str | None, limit: int, as_json: bool) -> None:
    """Operations, newest first (of one environment, or all)."""
    from orchestrator import catalogue

    with ctx.platform.reader() as s:
        environment = catalogue.get_env(session=s, name=env_name) if env_name else None
        rows = catalogue.operations_public(
            session=s, ops=catalogue.list_operations(session=s, env=environment, limit=limit))
    listing(rows, as_json=as_json, headers=["ID", "KIND", "ENV", "SERVICE", "TRIGGER", "STATE", "CREATED"],
            cells=lambda o: (o.id, o.kind, o.env, o.service, o.trigger, o.state, o.created_at))


@ops.command("show")
@click.argument("op_id", metavar="OP", type=int)
@json_option
@pass_ctx
def ops_show(ctx: Context, op_id: int, as_json: bool) -> None:
    """One operation: its state, error and every step."""
    op = load_op(ctx, op_id, ctx.remote)
    if as_json:
        emit(op)
        return
    click.echo(f"operation {op.id}: {op.kind} {op.env}/{op.service} ({op.trigger}) {op.state}")
    if op.error:
        click.echo(f"error: {op.error}")
    table([(st.stage, st.state, st.name, st.error or "") for st in op.steps],
          ["STAGE", "STATE", "STEP", "ERROR"])


@ops.command("watch")
@click.argument("op_id", metavar="OP", type=int)
@pass_ctx
def ops_watch(ctx: Context, op_id: int) -> None:
    """Follow an operation's steps live until it ends."""
    load_op(ctx, op_id, ctx.remote)
    sys.exit(follow(ctx, op_id, ctx.remote))


@ops.command("cancel")
@click.argument("op_id", metavar="OP", type=int)
@json_option
@pass_ctx
def ops_cancel(ctx: Context, op_id: int, as_json: bool) -> None:
    """End a queued or running operation at its next step boundary (state cancelled): steps that
    run finish, the others never start; the service's next operation starts. A redeploy or a
    scale afterwards brings the service back to exactly its scale."""
    from orchestrator import operations

    op = operations.cancel(ctx.platform, op_id)
    if as_json:
        emit(load_op(ctx, op_id))
        return
    click.echo(f"operation {op.id} {op.state}" + (f": {op.error}" if op.error else ""))
