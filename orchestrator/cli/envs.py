"""orchestrator env / services / vars: what an environment is made of."""

from __future__ import annotations

import sys

import click

from orchestrator import catalogue, requests, rules, spec
from orchestrator.cli.base import Context, emit, env_svc, json_option, listing, main, pass_ctx, wait_option
from orchestrator.cli.follow import follow, load_op, started
from orchestrator.models import EnvironmentPublic, ServiceType


@main.group()
def env() -> None:
    """Environments: named sets of services."""


@env.command("create")
@click.argument("name")
@click.option("--sandbox", is_flag=True, help="A sandbox gets no monitoring service.")
@click.option("--no-defaults", is_flag=True, help="Skip the auto-included services.")
@click.option("--http-port", type=int, default=None, help="The proxy's HTTP port (default: the first free one).")
@click.option("--https-port", type=int, default=None, help="The proxy's HTTPS port (default: the first free one).")
@pass_ctx
def env_create(ctx: Context, name: str, sandbox: bool, no_defaults: bool, http_port: int | None,
               https_port: int | None) -> None:
    """A new environment; its included services (logging, the proxy, monitoring) deploy."""
    ops_started = requests.create_env(ctx.platform, name=name, sandbox=sandbox,
                                      defaults=not no_defaults, http_port=http_port, https_port=https_port)
    with ctx.platform.reader() as s:
        environment = catalogue.get_env(session=s, name=name)
    ports = (f"; its proxy's ports: http {environment.http_port}, https {environment.https_port}"
             if environment.http_port is not None else "")
    click.echo(f"environment {name} created{ports}")
    for op in ops_started:
        click.echo(f"operation {op.id} deploys {load_op(ctx, op.id or 0).service}")


@env.command("list")
@json_option
@pass_ctx
def env_list(ctx: Context, as_json: bool) -> None:
    """Every environment."""
    with ctx.platform.reader() as s:
        rows = [EnvironmentPublic.model_validate(e, from_attributes=True)
                for e in catalogue.list_envs(session=s)]
    listing(rows, as_json=as_json, headers=["NAME", "SANDBOX"],
            cells=lambda e: (e.name, "yes" if e.sandbox else "no"))



@env.command("rm")
@click.argument("name")
@click.option("--delete-data", is_flag=True, help="Delete databases' data volumes too (kept by default).")
@wait_option
@pass_ctx
def env_rm(ctx: Context, name: str, delete_data: bool, wait: bool) -> None:
    """Remove every service of the environment (each an operation), then the environment."""
    ops_started = requests.request_remove_env(ctx.platform, env=name, delete_data=delete_data)
    for service, op in ops_started:
        click.echo(f"operation {op.id} removes {service}")
    if not ops_started:
        click.echo(f"environment {name} removed")
    if wait:
        codes = [follow(ctx, op.id or 0) for _, op in ops_started]
        sys.exit(max(codes, default=0))


@env.command("show")
@click.argument("name")
@json_option
@click.option("--show-secrets", is_flag=True, help="Show dashboards' passwords.")
@pass_ctx
def env_show(ctx: Context, name: str, as_json: bool, show_secrets: bool) -> None:
    """An environment: its proxy's ports, services and sites."""
    with ctx.platform.reader() as s:
        environment = catalogue.get_env(session=s, name=name)
        services_ = [catalogue.service_public(svc, environment).model_dump(mode="json")
                     for svc in catalogue.list_services(session=s, env=environment)]
        sites_ = [site.model_dump(mode="json") for site in catalogue.list_sites(session=s, env=environment)]
        boards = {kind: board.model_dump(mode="json") for kind, board in
                  catalogue.dashboards(session=s, env=environment, show_secrets=show_secrets).items()}
    data = {"name": environment.name, "sandbox": environment.sandbox,
            "proxy": {"http_port": environment.http_port, "https_port": environment.https_port},
            "services": services_, "sites": sites_, "dashboards": boards}
    if as_json:
        emit(data)
        return
    click.echo(f"{'name':13} {environment.name}")
    click.echo(f"{'sandbox':13} {'yes' if environment.sandbox else 'no'}")
    click.echo(f"{'proxy':13} http port {environment.http_port}, https port {environment.https_port}")
    click.echo(f"{'services':13} {', '.join(str(x['name']) for x in services_) or '-'}")
    click.echo(f"{'sites':13} {', '.join(str(x['name']) for x in sites_) or '-'}")
    for kind, board in boards.items():
        click.echo(f"{kind:13} {board['url']} (user {board['user']}, password {board['password']})")


@main.group()
def services() -> None:
    """Services: how an environment's jobs start."""


@services.command("add")
@env_svc
@click.option("--type", "type_", required=True, type=click.Choice([t.value for t in ServiceType]))
@click.option("--image", default=None)
@click.option("--command", default=None, help="Run through /bin/sh -c; $PORT is set.")
@click.option("--scale", type=int, default=1, show_default=True)
@click.option("--size", default="s", show_default=True, help="xs, s, m, l, xl or MEM[:CPUS]")
@pass_ctx
def services_add(ctx: Context, env_name: str, name: str, type_: str, image: str | None,
                 command: str | None, scale: int, size: str) -> None:
    """A new service; databases, caches and included types deploy now, code services at their first push."""
    kind = ServiceType(type_)
    op = requests.add_service(ctx.platform, env=env_name, name=name, type=kind, image=image,
                                command=command, scale=scale, size=size)
    click.echo(f"service {name} added to {env_name}")
    if op is not None:
        click.echo(f"operation {op.id} deploys it")
    elif image:
        click.echo("code services run their releases: `orchestrator push` deploys an image")


@services.command("rm")
@env_svc
@click.option("--delete-data", is_flag=True, help="Delete a database's data volume too (kept by default).")
@wait_option
@pass_ctx
def services_rm(ctx: Context, env_name: str, name: str, delete_data: bool, wait: bool) -> None:
    """Stop every job of the service (out of the proxy first), then remove it."""
    op = requests.request_remove_service(ctx.platform, env=env_name, service=name, delete_data=delete_data)
    started(ctx, op, wait)


@services.command("list")
@click.argument("env_name", metavar="ENV")
@json_option
@pass_ctx
def services_list(ctx: Context, env_name: str, as_json: bool) -> None:
    """An environment's services."""
    with ctx.platform.reader() as s:
        environment = catalogue.get_env(session=s, name=env_name)
        rows = [catalogue.service_public(svc, environment)
                for svc in catalogue.list_services(session=s, env=environment)]
    listing(rows, as_json=as_json, headers=["NAME", "TYPE", "IMAGE", "SCALE", "SIZE", "OVERLAP", "REDEPLOYABLE"],
            cells=lambda r: (r.name, r.type, r.image, r.scale, r.size, r.overlap, r.redeployable))


@services.command("show")
@env_svc
@json_option
@pass_ctx
def services_show(ctx: Context, env_name: str, name: str, as_json: bool) -> None:
    """A service and its jobs."""
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
@env_svc
@click.option("--image", default=None, help="Databases, caches and included services (code services: push).")
@click.option("--command", default=None, help="Run through /bin/sh -c ('' for the image's own).")
@click.option("--size", default=None, help="xs, s, m, l, xl or MEM[:CPUS]")
@click.option("--health-path", default=None,
              help="GET it on a deploy job: 2xx/3xx is healthy (code services; '' for a TCP check).")
@click.option("--overlap", type=int, default=None, help="Seconds (support only).")
@click.option("--redeployable/--not-redeployable", default=None, help="(support only)")
@click.option("--support", is_flag=True, help="Act as the support role.")
@pass_ctx
def services_update(ctx: Context, env_name: str, name: str, image: str | None, command: str | None,
                    size: str | None, health_path: str | None, overlap: int | None,
                    redeployable: bool | None, support: bool) -> None:
    """Change how the service's next jobs start: they take effect at its next redeploy."""
    changed = requests.update_service(ctx.platform, env=env_name, service=name, image=image, command=command,
                                      size=size, health_path=health_path, overlap=overlap,
                                      redeployable=redeployable, support=support)
    what = ", ".join(changed) if changed else "nothing changed"
    later = " (takes effect at its next redeploy)" if set(changed) - {"overlap", "redeployable"} else ""
    click.echo(f"service {name} updated: {what}{later}")



@main.group("vars")
def vars_() -> None:
    """User variables of a service (they take effect at the next redeploy)."""


@vars_.command("set")
@env_svc
@click.argument("pairs", nargs=-1, required=True, metavar="KEY=VALUE...")
@pass_ctx
def vars_set(ctx: Context, env_name: str, name: str, pairs: tuple[str, ...]) -> None:
    """Set user variables (KEY=VALUE...); a redeploy applies them."""
    updates = rules.parse_assignments(pairs)
    requests.change_variables(ctx.platform, env=env_name, service=name, values=updates)
    click.echo(f"set {', '.join(updates)} on {name}: redeploy to apply")


@vars_.command("unset")
@env_svc
@click.argument("keys", nargs=-1, required=True, metavar="KEY...")
@pass_ctx
def vars_unset(ctx: Context, env_name: str, name: str, keys: tuple[str, ...]) -> None:
    """Remove user variables; a redeploy applies it."""
    requests.change_variables(ctx.platform, env=env_name, service=name, unset=keys)
    click.echo(f"unset {', '.join(keys)} on {name}: redeploy to apply")


@vars_.command("list")
@env_svc
@click.option("--show-secrets", is_flag=True, help="Show passwords and credentials in URLs.")
@json_option
@pass_ctx
def vars_list(ctx: Context, env_name: str, name: str, show_secrets: bool, as_json: bool) -> None:
    """User and automatic variables with their source (secrets masked)."""
    with ctx.platform.reader() as s:
        environment, svc = catalogue.get_service(session=s, env=env_name, name=name)
        rows = spec.shown(spec.variables_for(s, environment, svc), show_secrets=show_secrets)
    listing(rows, as_json=as_json, headers=["NAME", "VALUE", "SOURCE"],
            cells=lambda r: (r.name, r.value, r.source))
