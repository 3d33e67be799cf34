"""orchestrator hosts ...: the Docker hosts jobs run on."""

from __future__ import annotations

import click

from orchestrator import catalogue, fleet
from orchestrator.cli.base import Context, json_option, listing, main, pass_ctx


@main.group()
def hosts() -> None:
    """Docker hosts the platform runs jobs on."""


@hosts.command("add")
@click.argument("name")
@click.option("--docker-url", required=True, help="e.g. unix:///var/run/docker.sock")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Where this host's jobs are reached.")
@pass_ctx
def hosts_add(ctx: Context, name: str, docker_url: str, address: str) -> None:
    """Register a Docker host (its node then runs with `orchestrator node run NAME`)."""
    with ctx.platform.session() as s:
        catalogue.add_host(session=s, name=name, docker_url=docker_url, address=address)
        s.commit()
    click.echo(f"host {name} added")


@hosts.command("list")
@json_option
@pass_ctx
def hosts_list(ctx: Context, as_json: bool) -> None:
    """Every host: state, jobs, free capacity, last heartbeat."""
    with ctx.platform.reader() as s:
        rows = catalogue.host_views(session=s)
    listing(rows, as_json=as_json,
            headers=["NAME", "STATE", "JOBS", "FREE CPU", "FREE MB", "ADDRESS", "LAST SEEN"],
            cells=lambda h: (h.name, h.state, h.jobs, f"{h.free_cpus:g}/{h.cpus:g}",
                             f"{h.free_memory_mb}/{h.memory_mb}", h.address, h.last_seen))


@hosts.command("drain")
@click.argument("name")
@pass_ctx
def hosts_drain(ctx: Context, name: str) -> None:
    """Move every job off the host (start elsewhere first) and place nothing new there."""
    started_ops = fleet.drain(ctx.platform, host=name)
    click.echo(f"host {name} draining; operations {', '.join(map(str, started_ops)) or '(none)'}")


@hosts.command("undrain")
@click.argument("name")
@pass_ctx
def hosts_undrain(ctx: Context, name: str) -> None:
    """Let a drained host take new jobs again."""
    fleet.undrain(ctx.platform, host=name)
    click.echo(f"host {name} takes jobs again")


@hosts.command("rm")
@click.argument("name")
@pass_ctx
def hosts_rm(ctx: Context, name: str) -> None:
    """Forget a host; refused while jobs remain on it."""
    fleet.remove(ctx.platform, host=name)
    click.echo(f"host {name} removed")
