"""The ``orchestrator`` command: a thin adapter over the catalogue and operations.

Exit status: 0 success, 1 the operation failed, 2 bad input (one line on stderr, nothing changed).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from functools import cached_property, wraps
from typing import Any, TypeVar

import click
from pydantic import BaseModel

from orchestrator import catalogue, operations, progress
from orchestrator.catalogue import BadInput
from orchestrator.models import (
    EnvironmentPublic,
    OperationPublic,
    ReleasePublic,
    Role,
    ServiceType,
)
from orchestrator.service_types import mask
from orchestrator.settings import Settings, get_settings

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    """Built lazily so ``--help`` and bad input need no database or broker."""

    @cached_property
    def settings(self) -> Settings:
        return get_settings()

    @cached_property
    def platform(self) -> operations.Platform:
        from workers.app import make_platform

        return make_platform(self.settings)


pass_ctx = click.make_pass_decorator(Context, ensure=True)


def fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def bad_input_exits_2(fn: F) -> F:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BadInput as exc:
            fail(str(exc))
    return wrapper  # type: ignore[return-value]


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


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
wait_option = click.option("--wait", is_flag=True, help="Follow the operation to its end.")


class OneLineGroup(click.Group):
    """Usage errors end as one line on stderr and exit 2, like every other bad input."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("standalone_mode", False)
        try:
            return super().main(*args, **kwargs)
        except click.UsageError as exc:
            fail(" ".join(exc.format_message().split()))
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """A small platform-as-a-service control plane."""


# --- hosts ----------------------------------------------------------------------------------------


@main.group()
def hosts() -> None:
    """Docker hosts the platform runs jobs on."""


@hosts.command("add")
@click.argument("name")
@click.option("--docker-url", required=True, help="e.g. unix:///var/run/docker.sock")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Where this host's jobs are reached.")
@pass_ctx
@bad_input_exits_2
def hosts_add(ctx: Context, name: str, docker_url: str, address: str) -> None:
    with ctx.platform.session() as s:
        catalogue.add_host(session=s, name=name, docker_url=docker_url, address=address)
        s.commit()
    click.echo(f"host {name} added")


@hosts.command("list")
@json_option
@pass_ctx
def hosts_list(ctx: Context, as_json: bool) -> None:
    with ctx.platform.reader() as s:
        rows = catalogue.host_views(session=s)
    if as_json:
        emit(rows)
    else:
        table([(h.name, h.state, h.jobs, f"{h.free_cpus:g}/{h.cpus:g}",
                f"{h.free_memory_mb}/{h.memory_mb}", h.address, h.last_seen) for h in rows],
              ["NAME", "STATE", "JOBS", "FREE CPU", "FREE MB", "ADDRESS", "LAST SEEN"])


@hosts.command("drain")
@click.argument("name")
@pass_ctx
@bad_input_exits_2
def hosts_drain(ctx: Context, name: str) -> None:
    """Move every job off the host (start elsewhere first) and place nothing new there."""
    from orchestrator import fleet

    started_ops = fleet.drain(ctx.platform, host=name)
    click.echo(f"host {name} draining; operations {', '.join(map(str, started_ops)) or '(none)'}")


@hosts.command("undrain")
@click.argument("name")
@pass_ctx
@bad_input_exits_2
def hosts_undrain(ctx: Context, name: str) -> None:
    from orchestrator import fleet

    fleet.undrain(ctx.platform, host=name)
    click.echo(f"host {name} takes jobs again")


@hosts.command("rm")
@click.argument("name")
@pass_ctx
@bad_input_exits_2
def hosts_rm(ctx: Context, name: str) -> None:
    """Forget a host; refused while jobs remain on it."""
    from orchestrator import fleet

    fleet.remove(ctx.platform, host=name)
    click.echo(f"host {name} removed")


# --- node -----------------------------------------------------------------------------------------


@main.group()
def node() -> None:
    """The Celery worker node of a Docker host."""


@node.command("run")
@click.argument("name")
@click.option("--concurrency", type=int, default=None, help="Steps run at once (threads).")
@click.option("--loglevel", default="INFO", show_default=True)
@pass_ctx
@bad_input_exits_2
def node_run(ctx: Context, name: str, concurrency: int | None, loglevel: str) -> None:
    """Consume queue host.NAME and drive that host's Docker engine."""
    from workers.node import run_node

    run_node(ctx.platform, name, concurrency=concurrency or ctx.settings.node_concurrency,
             loglevel=loglevel)


@main.group()
def control() -> None:
    """The control worker: runs the task API other services call (queue orchestrator)."""


@control.command("run")
@click.option("--concurrency", type=int, default=4, show_default=True)
@click.option("--loglevel", default="INFO", show_default=True)
@pass_ctx
def control_run(ctx: Context, concurrency: int, loglevel: str) -> None:
    from workers.node import run_control

    run_control(ctx.platform, concurrency=concurrency, loglevel=loglevel)


@main.command()
@click.option("--port", type=int, default=None, help="Serve the HTTP API on this port.")
@click.option("--demo", is_flag=True, help="Run a push, a redeploy and an overlap redeploy, then exit.")
def dev(port: int | None, demo: bool) -> None:
    """The whole platform in one process: catalogue, broker, a node for local Docker, the API."""
    from workers.embedded import dev_settings, run_dev

    sys.exit(run_dev(dev_settings(), api_port=port, demo=demo, echo=click.echo))


@main.command()
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--host", "bind", default="127.0.0.1", show_default=True, help="Address to bind.")
@pass_ctx
def api(ctx: Context, port: int, bind: str) -> None:
    """Serve the HTTP API under /api/v1 (OpenAPI at /api/v1/openapi.json)."""
    from orchestrator.api.serve import serve

    serve(ctx.platform, port, bind)


@main.group()
def tokens() -> None:
    """Bearer tokens for the HTTP API."""


@tokens.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice([r.value for r in Role]), default="user", show_default=True)
@pass_ctx
@bad_input_exits_2
def tokens_create(ctx: Context, name: str, role: str) -> None:
    """Print a new token once; only its hash is kept."""
    with ctx.platform.session() as s:
        raw = catalogue.create_token(session=s, name=name, role=Role(role))
        s.commit()
    click.echo(raw)


@main.command()
@click.option("--port", type=int, default=5555, show_default=True)
@click.option("--basic-auth", required=True, metavar="USER:PASS", help="Flower's login.")
@click.option("--address", default="127.0.0.1", show_default=True)
@pass_ctx
@bad_input_exits_2
def flower(ctx: Context, port: int, basic_auth: str, address: str) -> None:
    """Flower on the platform's broker, behind basic auth: every step of every operation."""
    user, sep, password = basic_auth.partition(":")
    if not sep or not user or not password:
        raise BadInput("--basic-auth must be USER:PASS")
    ctx.platform.app.start([
        "flower", f"--port={port}", f"--address={address}", f"--basic-auth={basic_auth}",
        "--persistent=False", "--purge_offline_workers=60",
    ])


# --- environments ---------------------------------------------------------------------------------


@main.group()
def env() -> None:
    """Environments: named sets of services."""


@env.command("create")
@click.argument("name")
@click.option("--sandbox", is_flag=True, help="A sandbox gets no monitoring service.")
@click.option("--no-defaults", is_flag=True, help="Skip the auto-included services.")
@pass_ctx
@bad_input_exits_2
def env_create(ctx: Context, name: str, sandbox: bool, no_defaults: bool) -> None:
    ops_started = operations.create_env(ctx.platform, name=name, sandbox=sandbox,
                                        defaults=not no_defaults)
    click.echo(f"environment {name} created")
    for op in ops_started:
        click.echo(f"operation {op.id} deploys {op_service(ctx, op)}")


@env.command("list")
@json_option
@pass_ctx
def env_list(ctx: Context, as_json: bool) -> None:
    with ctx.platform.reader() as s:
        rows = [EnvironmentPublic.model_validate(e, from_attributes=True)
                for e in catalogue.list_envs(session=s)]
    if as_json:
        emit(rows)
    else:
        table([(e.name, "yes" if e.sandbox else "no") for e in rows], ["NAME", "SANDBOX"])


# --- services -------------------------------------------------------------------------------------


@main.group()
def services() -> None:
    """Services: how an environment's jobs start."""


@services.command("add")
@click.argument("env_name", metavar="ENV")
@click.argument("name", metavar="SVC")
@click.option("--type", "type_", required=True, type=click.Choice([t.value for t in ServiceType]))
@click.option("--image", default=None)
@click.option("--command", default=None, help="Run through /bin/sh -c; $PORT is set.")
@click.option("--scale", type=int, default=1, show_default=True)
@click.option("--size", default="s", show_default=True, help="xs, s, m, l, xl or MEM[:CPUS]")
@pass_ctx
@bad_input_exits_2
def services_add(ctx: Context, env_name: str, name: str, type_: str, image: str | None,
                 command: str | None, scale: int, size: str) -> None:
    kind = ServiceType(type_)
    op = operations.add_service(ctx.platform, env=env_name, name=name, type=kind, image=image,
                                command=command, scale=scale, size=size)
    click.echo(f"service {name} added to {env_name}")
    if op is not None:
        click.echo(f"operation {op.id} deploys it")
    elif image:
        click.echo("code services run their releases: `orchestrator push` deploys an image")


@services.command("list")
@click.argument("env_name", metavar="ENV")
@json_option
@pass_ctx
@bad_input_exits_2
def services_list(ctx: Context, env_name: str, as_json: bool) -> None:
    with ctx.platform.reader() as s:
        environment = catalogue.get_env(session=s, name=env_name)
        rows = [catalogue.service_public(svc, environment)
                for svc in catalogue.list_services(session=s, env=environment)]
    if as_json:
        emit(rows)
    else:
        table([(r.name, r.type, r.image, r.scale, r.size, r.overlap, r.redeployable) for r in rows],
              ["NAME", "TYPE", "IMAGE", "SCALE", "SIZE", "OVERLAP", "REDEPLOYABLE"])


@services.command("show")
@click.argument("env_name", metavar="ENV")
@click.argument("name", metavar="SVC")
@json_option
@pass_ctx
@bad_input_exits_2
def services_show(ctx: Context, env_name: str, name: str, as_json: bool) -> None:
    with ctx.platform.reader() as s:
        environment, svc = catalogue.get_service(session=s, env=env_name, name=name)
        public = catalogue.service_public(svc, environment)
        jobs = catalogue.list_jobs(session=s, env=environment, service=svc)
    data = {**public.model_dump(mode="json"), "jobs": [j.model_dump(mode="json") for j in jobs]}
    if as_json:
        emit(data)
        return
    for key, value in public.model_dump().items():
        click.echo(f"{key:13} {value}")
    click.echo(f"{'jobs':13} {len(jobs)}")


@services.command("update")
@click.argument("env_name", metavar="ENV")
@click.argument("name", metavar="SVC")
@click.option("--overlap", type=int, default=None, help="Seconds (support only).")
@click.option("--redeployable/--not-redeployable", default=None, help="(support only)")
@click.option("--support", is_flag=True, help="Act as the support role.")
@pass_ctx
@bad_input_exits_2
def services_update(ctx: Context, env_name: str, name: str, overlap: int | None,
                    redeployable: bool | None, support: bool) -> None:
    with ctx.platform.session() as s:
        _, svc = catalogue.get_service(session=s, env=env_name, name=name)
        catalogue.update_service(session=s, service=svc, overlap=overlap, redeployable=redeployable,
                                 support=support)
        s.commit()
    click.echo(f"service {name} updated")


# --- variables ------------------------------------------------------------------------------------


@main.group("vars")
def vars_() -> None:
    """User variables of a service (they take effect at the next redeploy)."""


@vars_.command("set")
@click.argument("env_name", metavar="ENV")
@click.argument("name", metavar="SVC")
@click.argument("pairs", nargs=-1, required=True, metavar="KEY=VALUE...")
@pass_ctx
@bad_input_exits_2
def vars_set(ctx: Context, env_name: str, name: str, pairs: tuple[str, ...]) -> None:
    updates = catalogue.parse_assignments(pairs)
    with ctx.platform.session() as s:
        _, svc = catalogue.get_service(session=s, env=env_name, name=name)
        catalogue.set_variables(session=s, service=svc, values=updates)
        s.commit()
    click.echo(f"set {', '.join(updates)} on {name}: redeploy to apply")


@vars_.command("unset")
@click.argument("env_name", metavar="ENV")
@click.argument("name", metavar="SVC")
@click.argument("keys", nargs=-1, required=True, metavar="KEY...")
@pass_ctx
@bad_input_exits_2
def vars_unset(ctx: Context, env_name: str, name: str, keys: tuple[str, ...]) -> None:
    with ctx.platform.session() as s:
        _, svc = catalogue.get_service(session=s, env=env_name, name=name)
        catalogue.unset_variables(session=s, service=svc, keys=keys)
        s.commit()
    click.echo(f"unset {', '.join(keys)} on {name}: redeploy to apply")


@vars_.command("list")
@click.argument("env_name", metavar="ENV")
@click.argument("name", metavar="SVC")
@click.option("--show-secrets", is_flag=True, help="Show passwords and credentials in URLs.")
@json_option
@pass_ctx
@bad_input_exits_2
def vars_list(ctx: Context, env_name: str, name: str, show_secrets: bool, as_json: bool) -> None:
    """User and automatic variables with their source (secrets masked)."""
    with ctx.platform.reader() as s:
        environment, svc = catalogue.get_service(session=s, env=env_name, name=name)
        found = operations.variables_for(s, environment, svc)
    rows = [{"name": v.name, "source": v.source, "secret": v.secret,
             "value": v.value if show_secrets or not v.secret else mask(v.value)} for v in found]
    if as_json:
        emit(rows)
    else:
        table([(r["name"], r["value"], r["source"]) for r in rows], ["NAME", "VALUE", "SOURCE"])


# --- operations -----------------------------------------------------------------------------------


def started(ctx: Context, op: Any, wait: bool) -> None:
    click.echo(f"operation {op.id} ({op.kind}) {op.state}")
    if wait:
        sys.exit(follow(ctx, op.id))


@main.command()
@click.argument("env_name", metavar="ENV")
@click.argument("name", metavar="SVC")
@click.argument("image")
@wait_option
@pass_ctx
@bad_input_exits_2
def push(ctx: Context, env_name: str, name: str, image: str, wait: bool) -> None:
    """A new release of a code service: the first push deploys, later ones redeploy."""
    started(ctx, operations.request_push(ctx.platform, env=env_name, service=name, image=image), wait)


@main.command()
@click.argument("env_name", metavar="ENV")
@click.argument("name", metavar="SVC")
@wait_option
@click.option("--support", is_flag=True, help="Act as support (services not redeployable).")
@pass_ctx
@bad_input_exits_2
def redeploy(ctx: Context, env_name: str, name: str, wait: bool, support: bool) -> None:
    """Replace every job of the service with new ones from its current spec."""
    op = operations.request_redeploy(ctx.platform, env=env_name, service=name, support=support)
    started(ctx, op, wait)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("env_name", metavar="ENV")
@click.argument("name", metavar="SVC")
@click.argument("scale", type=int)
@wait_option
@pass_ctx
@bad_input_exits_2
def scale(ctx: Context, env_name: str, name: str, scale: int, wait: bool) -> None:
    """Start only the extra jobs, or stop only the surplus."""
    started(ctx, operations.request_scale(ctx.platform, env=env_name, service=name, scale=scale),
            wait)


@main.command()
@click.argument("env_name", metavar="ENV")
@click.argument("name", metavar="SVC")
@click.argument("release", type=int)
@wait_option
@pass_ctx
@bad_input_exits_2
def rollback(ctx: Context, env_name: str, name: str, release: int, wait: bool) -> None:
    """Redeploy an earlier release."""
    op = operations.request_redeploy(ctx.platform, env=env_name, service=name, release=release)
    started(ctx, op, wait)


@main.group()
def worker() -> None:
    """Worker targets of a code service: jobs without a port, with their own command and scale."""


@worker.command("deploy")
@click.argument("env_name", metavar="ENV")
@click.argument("name", metavar="SVC")
@click.argument("target")
@click.option("--command", required=True, help="Run through /bin/sh -c.")
@wait_option
@pass_ctx
@bad_input_exits_2
def worker_deploy(ctx: Context, env_name: str, name: str, target: str, command: str, wait: bool) -> None:
    op = operations.request_worker_deploy(ctx.platform, env=env_name, service=name, target=target,
                                          command=command)
    started(ctx, op, wait)


@worker.command("scale", context_settings={"ignore_unknown_options": True})
@click.argument("env_name", metavar="ENV")
@click.argument("name", metavar="SVC")
@click.argument("target")
@click.argument("scale", metavar="N|+N|-N")
@wait_option
@pass_ctx
@bad_input_exits_2
def worker_scale(ctx: Context, env_name: str, name: str, target: str, scale: str, wait: bool) -> None:
    op = operations.request_worker_scale(ctx.platform, env=env_name, service=name, target=target,
                                         scale=scale)
    started(ctx, op, wait)


@worker.command("rm")
@click.argument("env_name", metavar="ENV")
@click.argument("name", metavar="SVC")
@click.argument("target")
@wait_option
@pass_ctx
@bad_input_exits_2
def worker_rm(ctx: Context, env_name: str, name: str, target: str, wait: bool) -> None:
    op = operations.request_worker_rm(ctx.platform, env=env_name, service=name, target=target)
    started(ctx, op, wait)


@worker.command("list")
@click.argument("env_name", metavar="ENV")
@click.argument("name", metavar="SVC")
@json_option
@pass_ctx
@bad_input_exits_2
def worker_list(ctx: Context, env_name: str, name: str, as_json: bool) -> None:
    with ctx.platform.reader() as s:
        environment, svc = catalogue.get_service(session=s, env=env_name, name=name)
        jobs = catalogue.list_jobs(session=s, env=environment, service=svc)
        rows = [
            {"target": w.name, "command": w.command, "scale": w.scale,
             "running": sum(1 for j in jobs if j.kind == "worker" and j.target == w.name
                            and j.state == "running")}
            for w in catalogue.workers_of(session=s, service=svc)
        ]
    if as_json:
        emit(rows)
    else:
        table([(r["target"], r["scale"], r["running"], r["command"]) for r in rows],
              ["TARGET", "SCALE", "RUNNING", "COMMAND"])


@main.group()
def releases() -> None:
    """Releases of code services."""


@releases.command("list")
@click.argument("env_name", metavar="ENV")
@click.argument("name", metavar="SVC")
@json_option
@pass_ctx
@bad_input_exits_2
def releases_list(ctx: Context, env_name: str, name: str, as_json: bool) -> None:
    with ctx.platform.reader() as s:
        _, svc = catalogue.get_service(session=s, env=env_name, name=name)
        rows = [ReleasePublic.model_validate(r, from_attributes=True)
                for r in catalogue.list_releases(session=s, service=svc)]
        current = svc.release
    if as_json:
        emit(rows)
    else:
        table([(r.number, r.image, r.created_at, "*" if r.number == current else "") for r in rows],
              ["RELEASE", "IMAGE", "CREATED", "CURRENT"])


@main.group()
def jobs() -> None:
    """Jobs: one container each."""


@jobs.command("list")
@click.argument("env_name", metavar="ENV")
@click.argument("name", metavar="SVC", required=False)
@click.option("--all", "include_stopped", is_flag=True, help="Include stopped and failed jobs.")
@json_option
@pass_ctx
@bad_input_exits_2
def jobs_list(ctx: Context, env_name: str, name: str | None, include_stopped: bool,
              as_json: bool) -> None:
    with ctx.platform.reader() as s:
        environment = catalogue.get_env(session=s, name=env_name)
        svc = catalogue.get_service(session=s, env=env_name, name=name)[1] if name else None
        rows = catalogue.list_jobs(session=s, env=environment, service=svc,
                                   include_stopped=include_stopped)
    if as_json:
        emit(rows)
    else:
        table([(j.id, j.service, j.kind, j.target, j.host, j.port, j.state, j.release,
                (j.container_id or "")[:12]) for j in rows],
              ["JOB", "SERVICE", "KIND", "TARGET", "HOST", "PORT", "STATE", "RELEASE", "CONTAINER"])


@main.group()
def ops() -> None:
    """Operations and their steps."""


@ops.command("list")
@click.argument("env_name", metavar="ENV", required=False)
@json_option
@pass_ctx
@bad_input_exits_2
def ops_list(ctx: Context, env_name: str | None, as_json: bool) -> None:
    with ctx.platform.reader() as s:
        environment = catalogue.get_env(session=s, name=env_name) if env_name else None
        rows = [catalogue.operation_public(session=s, op=op)
                for op in catalogue.list_operations(session=s, env=environment)]
    if as_json:
        emit(rows)
    else:
        table([(o.id, o.kind, o.env, o.service, o.trigger, o.state, o.created_at) for o in rows],
              ["ID", "KIND", "ENV", "SERVICE", "TRIGGER", "STATE", "CREATED"])


@ops.command("show")
@click.argument("op_id", metavar="OP", type=int)
@json_option
@pass_ctx
@bad_input_exits_2
def ops_show(ctx: Context, op_id: int, as_json: bool) -> None:
    op = load_op(ctx, op_id)
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
@bad_input_exits_2
def ops_watch(ctx: Context, op_id: int) -> None:
    """Follow an operation's steps live until it ends."""
    load_op(ctx, op_id)
    sys.exit(follow(ctx, op_id))


def op_service(ctx: Context, op: Any) -> str:
    return load_op(ctx, op.id).service


def load_op(ctx: Context, op_id: int) -> OperationPublic:
    with ctx.platform.reader() as s:
        return catalogue.operation_public(session=s, op=catalogue.get_operation(session=s, op_id=op_id))


def follow(ctx: Context, op_id: int) -> int:
    """Live progress until the operation ends; 0 if it succeeded, else 1."""
    return progress.follow(lambda: load_op(ctx, op_id), click.echo)


def run() -> None:
    """The console script. Ends the process at once when the command is done: Celery's result
    backend otherwise spends a fraction of a second tearing down connections at exit."""
    try:
        main.main(prog_name="orchestrator")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
