"""Commands that start operations: push, redeploy, scale, rollback, worker targets; and
releases."""

from __future__ import annotations

import click

from orchestrator import catalogue, requests
from orchestrator.cli.base import Context, env_svc, json_option, listing, main, pass_ctx, started, wait_option
from orchestrator.models import JobKind, JobState, ReleasePublic


@main.command()
@env_svc
@click.argument("image")
@wait_option
@click.option("--support", is_flag=True, help="Act as support (services not redeployable).")
@pass_ctx
def push(ctx: Context, env_name: str, name: str, image: str, wait: bool,
         support: bool) -> None:
    """A new release of a code service: the first push deploys, later ones redeploy."""
    op = requests.request_push(ctx.platform, env=env_name, service=name, image=image, support=support)
    started(ctx, op, wait)


@main.command()
@env_svc
@wait_option
@click.option("--support", is_flag=True, help="Act as support (services not redeployable).")
@pass_ctx
def redeploy(ctx: Context, env_name: str, name: str, wait: bool, support: bool) -> None:
    """Replace every job of the service with new ones from its current spec."""
    op = requests.request_redeploy(ctx.platform, env=env_name, service=name, support=support)
    started(ctx, op, wait)


@main.command(context_settings={"ignore_unknown_options": True})
@env_svc
@click.argument("scale", type=int)
@wait_option
@pass_ctx
def scale(ctx: Context, env_name: str, name: str, scale: int, wait: bool) -> None:
    """Start only the extra jobs, or stop only the surplus."""
    started(ctx, requests.request_scale(ctx.platform, env=env_name, service=name, scale=scale),
            wait)


@main.command()
@env_svc
@click.argument("release", type=int)
@wait_option
@pass_ctx
def rollback(ctx: Context, env_name: str, name: str, release: int, wait: bool) -> None:
    """Redeploy an earlier release."""
    op = requests.request_redeploy(ctx.platform, env=env_name, service=name, release=release)
    started(ctx, op, wait)


@main.group()
def worker() -> None:
    """Worker targets of a code service: jobs without a port, with their own command and scale."""


@worker.command("deploy")
@env_svc
@click.argument("target")
@click.option("--command", required=True, help="Run through /bin/sh -c.")
@wait_option
@pass_ctx
def worker_deploy(ctx: Context, env_name: str, name: str, target: str, command: str, wait: bool) -> None:
    op = requests.request_worker_deploy(ctx.platform, env=env_name, service=name, target=target,
                                          command=command)
    started(ctx, op, wait)


@worker.command("scale", context_settings={"ignore_unknown_options": True})
@env_svc
@click.argument("target")
@click.argument("scale", metavar="N|+N|-N")
@wait_option
@pass_ctx
def worker_scale(ctx: Context, env_name: str, name: str, target: str, scale: str, wait: bool) -> None:
    op = requests.request_worker_scale(ctx.platform, env=env_name, service=name, target=target,
                                         scale=scale)
    started(ctx, op, wait)


@worker.command("rm")
@env_svc
@click.argument("target")
@wait_option
@pass_ctx
def worker_rm(ctx: Context, env_name: str, name: str, target: str, wait: bool) -> None:
    op = requests.request_worker_rm(ctx.platform, env=env_name, service=name, target=target)
    started(ctx, op, wait)


@worker.command("list")
@env_svc
@json_option
@pass_ctx
def worker_list(ctx: Context, env_name: str, name: str, as_json: bool) -> None:
    with ctx.platform.reader() as s:
        environment, svc = catalogue.get_service(session=s, env=env_name, name=name)
        jobs = catalogue.list_jobs(session=s, env=environment, service=svc)
        rows = [
            {"target": w.name, "command": w.command, "scale": w.scale,
             "running": sum(1 for j in jobs if j.kind == JobKind.worker and j.target == w.name
                            and j.state == JobState.running)}
            for w in catalogue.workers_of(session=s, service=svc)
        ]
    listing(rows, as_json=as_json, headers=["TARGET", "SCALE", "RUNNING", "COMMAND"],
            cells=lambda r: (r["target"], r["scale"], r["running"], r["command"]))


@main.group()
def releases() -> None:
    """Releases of code services."""


@releases.command("list")
@env_svc
@json_option
@pass_ctx
def releases_list(ctx: Context, env_name: str, name: str, as_json: bool) -> None:
    with ctx.platform.reader() as s:
        _, svc = catalogue.get_service(session=s, env=env_name, name=name)
        rows = [ReleasePublic.model_validate(r, from_attributes=True)
                for r in catalogue.list_releases(session=s, service=svc)]
        current = svc.release
    listing(rows, as_json=as_json, headers=["RELEASE", "IMAGE", "CREATED", "CURRENT"],
            cells=lambda r: (r.number, r.image, r.created_at, "*" if r.number == current else ""))
