"""orchestrator logs and status: what an environment's jobs wrote and the platform did, in one
log; and how its services are, from the catalogue and its monitoring."""

from __future__ import annotations

import json
import sys

import click

from orchestrator import logs as env_logs
from orchestrator import status as env_status
from orchestrator.catalogue import LoggingDown
from orchestrator.cli.base import Context, emit, fail, json_option, main, pass_ctx

DEFAULT_LINES = 100


@main.command("logs")
@click.argument("env_name", metavar="ENV")
@click.argument("service", metavar="SVC", required=False)
@click.option("--job", default=None, help="Only this job's lines.")
@click.option("-f", "--follow", is_flag=True, help="Then each new line as it is written, until Ctrl-C.")
@click.option("--since", default=None, help="From a duration back (30s, 10m, 2h, 7d) or a time (ISO 8601, UTC).")
@click.option("--grep", default=None, help="Only lines holding this text (case-sensitive).")
@click.option("-n", "--lines", "limit", type=int, default=None,
              help=f"The last N matching lines, 1-{env_logs.MAX_LINES} "
                   f"(default {DEFAULT_LINES}; with --since, {env_logs.MAX_LINES}).")
@json_option
@pass_ctx
def logs(ctx: Context, env_name: str, service: str | None, job: str | None, follow: bool, since: str | None,
         grep: str | None, limit: int | None, as_json: bool) -> None:
    """Lines of the environment's jobs (of SVC only, when given) and its platform events, oldest first:
    TIME SERVICE JOB LINE, or with --json [{"time","env","service","job","kind","host","release","line"}]
    (with -f, one such object per line)."""
    if limit is None:
        limit = env_logs.MAX_LINES if since is not None else DEFAULT_LINES
    query = env_logs.LogQuery(service=service, job=job, grep=grep, limit=limit,
                              since=env_logs.parse_since(since) if since is not None else None)
    try:
        if not follow:
            found = env_logs.read(ctx.platform, env_name, query)
            if as_json:
                emit(found)
            else:
                for text in env_logs.render(found):
                    click.echo(text)
            return
        for line in env_logs.follow(ctx.platform, env_name, query):
            if line is not None:
                click.echo(json.dumps(line) if as_json else next(env_logs.render([line])))
                sys.stdout.flush()
    except LoggingDown as exc:
        fail(str(exc), code=1)
    except KeyboardInterrupt:
        sys.exit(130)


@main.command("status")
@click.argument("env_name", metavar="ENV")
@json_option
@pass_ctx
def status_(ctx: Context, env_name: str, as_json: bool) -> None:
    """Every service (jobs running/wanted), each job's check and the firing alerts, from the
    environment's monitoring; --json: {"services", "checks", "alerts", "monitoring": why none}."""
    found = env_status.status(ctx.platform, env_name)
    if as_json:
        emit(found)
        return
    click.echo(f"{'SERVICE':20} {'TYPE':14} JOBS")
    for svc in found["services"]:
        click.echo(f"{svc['name']:20} {svc['type']:14} {svc['running']}/{svc['wanted']}")
    if found["monitoring"]:
        click.echo(f"\nno checks: {found['monitoring']}")
        return
    click.echo(f"\n{'CHECK':10} {'SERVICE':20} {'JOB':14} {'STATE':8} {'SINCE':28} DETAIL")
    for check in found["checks"]:
        click.echo(f"{check['check']:10} {check['service']:20} {check['job'] or check['target']:14} "
                   f"{check['state']:8} {check['since'] or '-':28} {check['detail']}")
    firing = [a for a in found["alerts"] if a["state"] == "firing"]
    click.echo(f"\n{len(firing)} alert{'s' if len(firing) != 1 else ''} firing" + (":" if firing else ""))
    for alert in firing:
        click.echo(f"  {alert['name']:24} {alert['service'] or '-':20} {alert['job'] or '-':14} since {alert['since']}")
