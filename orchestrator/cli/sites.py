"""orchestrator sites: host names the environment's service proxy routes to code services."""

from __future__ import annotations

from pathlib import Path

import click

from orchestrator import catalogue, requests
from orchestrator.cli.base import Context, json_option, listing, main, pass_ctx, wait_option
from orchestrator.cli.follow import started
from orchestrator.errors import BadInput


@main.group()
def sites() -> None:
    """Sites: host names served by the environment's service proxy (HTTP, and HTTPS by SNI)."""


def _read(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read the {what} {path}: {getattr(exc, 'strerror', None) or exc}") from None


@sites.command("add")
@click.argument("env_name", metavar="ENV")
@click.argument("site", metavar="SITE")
@click.option("--service", required=True, help="The code service whose deploy jobs serve it.")
@click.option("--cert", default=None, help="PEM certificate (chain) for HTTPS: served by SNI.")
@click.option("--key", default=None, help="PEM private key of the certificate (kept as a secret).")
@wait_option
@pass_ctx
def sites_add(ctx: Context, env_name: str, site: str, service: str, cert: str | None,
              key: str | None, wait: bool) -> None:
    """Route host name SITE to a code service's deploy jobs (HTTPS too, with --cert and --key)."""
    op = requests.add_site(ctx.platform, env=env_name, site=site, service=service,
                           cert=_read(cert, "certificate"), key=_read(key, "key"))
    if not click.get_current_context().meta.get("as_json"):
        click.echo(f"site {site.lower()} routes to {service}" + (" (HTTPS too)" if cert else ""))
    if op is not None:
        started(ctx, op, wait)


@sites.command("rm")
@click.argument("env_name", metavar="ENV")
@click.argument("site", metavar="SITE")
@wait_option
@pass_ctx
def sites_rm(ctx: Context, env_name: str, site: str, wait: bool) -> None:
    """Stop routing host name SITE."""
    op = requests.remove_site(ctx.platform, env=env_name, site=site)
    if not click.get_current_context().meta.get("as_json"):
        click.echo(f"site {site.lower()} removed")
    if op is not None:
        started(ctx, op, wait)


@sites.command("list")
@click.argument("env_name", metavar="ENV")
@json_option
@pass_ctx
def sites_list(ctx: Context, env_name: str, as_json: bool) -> None:
    """An environment's sites: name, service, TLS."""
    with ctx.platform.reader() as s:
        rows = catalogue.list_sites(session=s, env=catalogue.get_env(session=s, name=env_name))
    listing(rows, as_json=as_json, headers=["NAME", "SERVICE", "TLS"],
            cells=lambda r: (r.name, r.service, "yes" if r.tls else "no"))
