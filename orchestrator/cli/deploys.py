"""Commands that start operations: push, redeploy, scale, rollback, worker targets; and
releases. With ``ORCH_API_URL`` set, push of an image, redeploy, scale, rollback and worker scale
ask the API (``remote``) and load no catalogue; each command imports what it uses when it runs."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path
from typing import Any

import click

from orchestrator.cli.base import Context, env_svc, json_option, listing, main, pass_ctx, wait_option
from orchestrator.cli.follow import follow, load_op, started
from orchestrator.cli.remote import quoted, view
from orchestrator.errors import BadInput


def _through_api(ctx: Context, env_name: str, name: str, action: str, body: dict[str, Any]) -> Any | None:
    """The operation the API started for ``POST /envs/ENV/services/SVC/ACTION`` (None: the CLI
    is not the API's client, the caller asks the catalogue itself)."""
    if ctx.remote is None:
        return None
    return view(ctx.remote.post(quoted("envs", env_name, "services", name) + action, body))


@main.command()
@env_svc
@click.argument("source", metavar="IMAGE|DIRECTORY")
@wait_option
@click.option("--support", is_flag=True, help="Act as support (services not redeployable).")
@pass_ctx
def push(ctx: Context, env_name: str, name: str, source: str, wait: bool,
         support: bool) -> None:
    """A new release of a code service: the first push deploys, later ones redeploy. A
    directory is built (its Dockerfile, or its Procfile on the platform's Python image)."""
    path = Path(source)
    op: Any = None
    if not path.is_dir():  # a directory is a build context, recorded here: the API takes images only
        op = _through_api(ctx, env_name, name, "/push", {"image": source, "support": support})
    if op is None:
        from orchestrator import requests

        if path.is_dir():
            op = requests.request_push_source(ctx.platform, env=env_name, service=name,
                                              source=tar_directory(path), support=support)
        else:
            op = requests.request_push(ctx.platform, env=env_name, service=name, image=source, support=support)
    started(ctx, op, wait)


def tar_directory(path: Path) -> bytes:
    """The directory as a tar (its .git left out): the build context."""
    import tarfile  # (here: the commands that send no directory do without it)

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for item in sorted(path.iterdir()):
            if item.name != ".git":
                tar.add(item, arcname=item.name)
    return out.getvalue()


@main.command()
@env_svc
@wait_option
@click.option("--support", is_flag=True, help="Act as support (services not redeployable).")
@pass_ctx
def redeploy(ctx: Context, env_name: str, name: str, wait: bool, support: bool) -> None:
    """Replace every job of the service with new ones from its current spec."""
    op = _through_api(ctx, env_name, name, "/redeploy", {"support": support})
    if op is None:
        from orchestrator import requests

        op = requests.request_redeploy(ctx.platform, env=env_name, service=name, support=support)
    started(ctx, op, wait)


@main.command(context_settings={"ignore_unknown_options": True})
@env_svc
@click.argument("scale", type=int)
@wait_option
@pass_ctx
def scale(ctx: Context, env_name: str, name: str, scale: int, wait: bool) -> None:
    """Start only the extra jobs, or stop only the surplus."""
    op = _through_api(ctx, env_name, name, "/scale", {"scale": scale})
    if op is None:
        from orchestrator import requests

        op = requests.request_scale(ctx.platform, env=env_name, service=name, scale=scale)
    started(ctx, op, wait)


@main.command()
@env_svc
@click.argument("release", type=int)
@wait_option
@pass_ctx
def rollback(ctx: Context, env_name: str, name: str, release: int, wait: bool) -> None:
    """Redeploy an earlier release."""
    op = _through_api(ctx, env_name, name, quoted("rollback", str(release)), {})
    if op is None:
        from orchestrator import requests

        op = requests.request_redeploy(ctx.platform, env=env_name, service=name, release=release)
    started(ctx, op, wait)


@main.group()
def worker() -> None:
    """Worker targets of a code service: jobs without a port, with their own command and scale."""


@worker.command("deploy")
@env_svc
@click.argument("target")
@click.option("--command", default=None,
              help="Run through /bin/sh -c (default: the current release's Procfile line TARGET).")
@wait_option
@pass_ctx
def worker_deploy(ctx: Context, env_name: str, name: str, target: str, command: str | None, wait: bool) -> None:
    """Start (or replace) a worker target's jobs; from then on they redeploy with the service."""
    from orchestrator import requests

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
    """Set a worker target's scale: N, or +N/-N."""
    op = _through_api(ctx, env_name, name, quoted("workers", target, "scale"), {"scale": scale})
    if op is None:
        from orchestrator import requests

        op = requests.request_worker_scale(ctx.platform, env=env_name, service=name, target=target,
                                           scale=scale)
    started(ctx, op, wait)


@worker.command("rm")
@env_svc
@click.argument("target")
@wait_option
@pass_ctx
def worker_rm(ctx: Context, env_name: str, name: str, target: str, wait: bool) -> None:
    """Stop a worker target's jobs and forget the target."""
    from orchestrator import requests

    op = requests.request_worker_rm(ctx.platform, env=env_name, service=name, target=target)
    started(ctx, op, wait)


@worker.command("list")
@env_svc
@json_option
@pass_ctx
def worker_list(ctx: Context, env_name: str, name: str, as_json: bool) -> None:
    """A service's worker targets: command, scale, jobs running."""
    from orchestrator import catalogue
    from orchestrator.models import JobKind, JobState

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
    """A code service's releases: state, image, commit, and which one is current."""
    from orchestrator import catalogue

    with ctx.platform.reader() as s:
        _, svc = catalogue.get_service(session=s, env=env_name, name=name)
        rows = catalogue.release_views(session=s, service=svc)
    listing(rows, as_json=as_json, headers=["RELEASE", "STATE", "IMAGE", "COMMIT", "CREATED", "CURRENT"],
            cells=lambda r: (r.number, r.state or "-", r.image, (r.commit or "-")[:12], r.created_at,
                             "*" if r.current else ""))


@main.group(hidden=True)
def git() -> None:
    """What a service's git repository runs (its hooks)."""


@git.command("receive")
@env_svc
@pass_ctx
def git_receive(ctx: Context, env_name: str, name: str) -> None:
    """The post-receive hook: each pushed branch's commit is built and deployed; the pusher sees
    this output as remote: lines. Reads `OLD NEW REF` lines on stdin, in the bare repository."""
    import subprocess

    from orchestrator import requests

    code = 0
    for line in sys.stdin.read().splitlines():
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("refs/heads/") or set(parts[1]) == {"0"}:
            continue
        commit, branch = parts[1], parts[2].removeprefix("refs/heads/")
        click.echo(f"orchestrator: building {branch} at {commit[:12]} for {env_name}/{name}")
        archive = subprocess.run(["git", "archive", "--format=tar", commit], capture_output=True)
        if archive.returncode != 0:
            click.echo(f"orchestrator: error: git archive failed: {archive.stderr.decode(errors='replace')}")
            code = 1
            continue
        try:
            op = requests.request_push_source(ctx.platform, env=env_name, service=name, source=archive.stdout,
                                              commit=commit)
        except BadInput as exc:
            click.echo(f"orchestrator: error: {exc}")
            code = 1
            continue
        click.echo(f"orchestrator: operation {op.id} ({op.kind}) deploys release {op.parameters.release}")
        code = max(code, follow(ctx, op.id or 0))
    sys.exit(code)


@main.command(context_settings={"ignore_unknown_options": True})
@env_svc
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD...")
@pass_ctx
def run(ctx: Context, env_name: str, name: str, argv: tuple[str, ...]) -> None:
    """A one-off job: CMD in a new container of the service (its current image, variables and
    size) on a placed host; its output streams here, its exit code is ours, its container goes."""
    from orchestrator import requests

    op = requests.request_run(ctx.platform, env=env_name, service=name, argv=list(argv))
    sys.exit(_follow_output(ctx, op.id or 0))


@main.command("exec", context_settings={"ignore_unknown_options": True})
@env_svc
@click.option("--job", default=None, help="The job to run it in (default: the service's first deploy job).")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD...")
@pass_ctx
def exec_(ctx: Context, env_name: str, name: str, job: str | None, argv: tuple[str, ...]) -> None:
    """CMD in a running job's container (docker exec); its output streams here, its exit code is ours."""
    from orchestrator import requests

    op = requests.request_exec(ctx.platform, env=env_name, service=name, argv=list(argv), job=job)
    sys.exit(_follow_output(ctx, op.id or 0))


def _follow_output(ctx: Context, op_id: int) -> int:
    """The command's output as it comes, then its exit code (1 when it never ran: why on stderr)."""
    from orchestrator.models import OpState, StepAction

    shown = 0
    while True:
        op = load_op(ctx, op_id)
        steps = [s for s in op.steps if s.action in (StepAction.run_once, StepAction.exec)]
        text = (steps[0].output or "") if steps else ""
        dropped = steps[0].output_dropped if steps else 0
        if dropped + len(text) > shown:  # counted from the output's start: the catalogue keeps its end
            if dropped > shown:  # it came faster than we read and is no longer kept: say so
                click.echo(f"[... {dropped - shown} characters of output not kept ...]", err=True)
            sys.stdout.write(text[max(0, shown - dropped):])
            sys.stdout.flush()
            shown = dropped + len(text)
        if op.state in (OpState.succeeded, OpState.failed, OpState.cancelled):
            break
        time.sleep(0.1)
    code = steps[0].exit_code if steps else None
    if code is None:
        click.echo(f"error: operation {op_id} {op.state}: {op.error or 'the command never ran'}", err=True)
        return 1
    return code
