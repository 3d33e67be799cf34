"""orchestrator plan / apply: an environment declared in a YAML file (orchestrator/manifest.py
parses it and computes the changes; here they are read from the catalogue and made, each as the
request the other commands make)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import click

from orchestrator import catalogue, manifest, requests, rules
from orchestrator.cli.base import Context, fail, main, pass_ctx
from orchestrator.cli.follow import follow
from orchestrator.errors import BadInput, NotFound
from orchestrator.manifest import (
    AddService,
    AddSite,
    Change,
    ChangeSite,
    CreateEnv,
    DeployWorker,
    EnvState,
    Plan,
    Push,
    RecordScale,
    Redeploy,
    RemoveService,
    RemoveSite,
    RemoveWorker,
    Scale,
    ScaleWorker,
    ServiceState,
    SetVariables,
    SiteState,
    UnsetVariables,
    UpdateService,
    WorkerState,
)
from orchestrator.models import Operation, OpKind, OpState
from orchestrator.platform import Platform

MAX_MANIFEST = 1024 * 1024
WORKER_WAIT = 600.0  # seconds apply waits for a new worker target's deploy to start, to scale it

prune_option = click.option("--prune", is_flag=True,
                            help="Remove what the file leaves out: services, worker targets, sites, variables.")
support_option = click.option("--support", is_flag=True,
                              help="Act as support (the overlap; services not redeployable).")
wait_option = click.option("--wait", is_flag=True,
                           help="Follow every operation it starts to its end (exit 1 if one fails).")


def read_manifest(file: str) -> manifest.Manifest:
    """The file, parsed and validated; certificate files are read relative to its directory."""
    path = Path(file)
    try:
        if path.stat().st_size > MAX_MANIFEST:
            raise BadInput(f"{file}: a manifest takes at most {MAX_MANIFEST // 1024} KiB")
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}") from None
    return manifest.load(text, file, read=lambda name: (path.parent / name).read_text())


def snapshot(p: Platform, env: str) -> EnvState | None:
    """The environment as the catalogue has it (None: there is none), with what its queued
    operations will change (their scale, image, worker targets)."""
    with p.reader() as s:
        try:
            environment = catalogue.get_env(session=s, name=env)
        except NotFound:
            return None
        services = {}
        for svc in catalogue.list_services(session=s, env=environment):
            image, scale = svc.image, svc.scale
            workers = {w.name: WorkerState(w.command, w.scale) for w in catalogue.workers_of(session=s, service=svc)}
            unfinished = catalogue.unfinished_operations(session=s, service=svc)
            for op in unfinished:
                if op.state != OpState.queued:
                    continue  # a running one has made its changes
                params = op.parameters
                if params.image is not None and params.release is not None:
                    image = params.image
                if op.kind == OpKind.scale and params.scale is not None:
                    scale = params.scale
                target = params.target or ""
                if op.kind == OpKind.worker_deploy:
                    before = workers.get(target)
                    workers[target] = WorkerState(params.command or "", before.scale if before else 1)
                elif op.kind == OpKind.worker_scale and params.worker_scale is not None and target in workers:
                    before = workers[target]
                    workers[target] = WorkerState(before.command, params.worker_scale.applied_to(before.scale))
                elif op.kind == OpKind.worker_rm:
                    workers.pop(target, None)
            current = (catalogue.get_release(session=s, service=svc, number=svc.release)
                       if svc.release else None)
            services[svc.name] = ServiceState(
                type=svc.type, image=image, command=svc.command, scale=scale, size=svc.size,
                overlap=svc.overlap, health_path=svc.health_path, redeployable=svc.redeployable,
                released=bool(catalogue.list_releases(session=s, service=svc)),
                variables=dict(svc.variables), workers=workers,
                processes=dict(current.processes) if current is not None else {}, busy=bool(unfinished))
        sites = {}
        for public in catalogue.list_sites(session=s, env=environment):
            site = catalogue.get_site(session=s, env=environment, name=public.name)
            tls = manifest.tls_fingerprint(site.cert, site.key) if site.cert and site.key else None
            sites[public.name] = SiteState(public.service, tls)
        return EnvState(environment.name, environment.sandbox, services, sites, removing=environment.removing)


def make_plan(p: Platform, m: manifest.Manifest, *, prune: bool, support: bool) -> Plan:
    images = {kind: image(p.settings) for kind, image in requests.INCLUDED_IMAGES.items()}
    return manifest.diff(m, snapshot(p, m.environment), prune=prune, support=support, included_images=images)


class NotDeployed(Exception):
    """A change waited for an operation that ended without making what it needs (exit 1)."""


def apply_change(p: Platform, env: str, change: Change, *, support: bool,
                 pause: Callable[[], None] = lambda: time.sleep(0.2),
                 echo: Callable[[str], None] = lambda _line: None) -> list[Operation]:
    """Make one change through the request the matching command makes; the operations it started.
    ``pause`` is how it waits for a worker target whose deploy is queued (see ``_await_worker``)."""
    match change:
        case CreateEnv():
            return requests.create_env(p, name=change.name, sandbox=change.sandbox, defaults=True)
        case AddService():
            op = requests.add_service(p, env=env, name=change.service, type=change.type, image=change.image,
                                      command=change.command, scale=change.scale, size=change.size)
            return [op] if op is not None else []
        case UpdateService():
            requests.update_service(p, env=env, service=change.service, image=change.image, command=change.command,
                                    size=change.size, health_path=change.health_path, overlap=change.overlap,
                                    support=support)
            return []
        case SetVariables() | UnsetVariables() | RecordScale():
            _change_service_row(p, env, change)
            return []
        case Scale():
            return [requests.request_scale(p, env=env, service=change.service, scale=change.scale)]
        case Push():
            return [requests.request_push(p, env=env, service=change.service, image=change.image, support=support)]
        case Redeploy():
            return [requests.request_redeploy(p, env=env, service=change.service, support=support)]
        case DeployWorker():
            return [requests.request_worker_deploy(p, env=env, service=change.service, target=change.target,
                                                   command=change.command)]
        case ScaleWorker():
            _await_worker(p, env, change.service, change.target, pause, echo)
            return [requests.request_worker_scale(p, env=env, service=change.service, target=change.target,
                                                  scale=change.scale)]
        case RemoveWorker():
            return [requests.request_worker_rm(p, env=env, service=change.service, target=change.target)]
        case RemoveService():
            return [requests.request_remove_service(p, env=env, service=change.service)]
        case AddSite() | ChangeSite():
            ops = []
            if isinstance(change, ChangeSite):
                ops.append(requests.remove_site(p, env=env, site=change.site))
            tls = change.tls
            ops.append(requests.add_site(p, env=env, site=change.site, service=change.service,
                                         cert=tls.chain if tls else None, key=tls.key if tls else None))
            return [op for op in ops if op is not None]
        case RemoveSite():
            op = requests.remove_site(p, env=env, site=change.site)
            return [op] if op is not None else []


def _await_worker(p: Platform, env: str, service: str, target: str, pause: Callable[[], None],
                  echo: Callable[[str], None], timeout: float = WORKER_WAIT) -> None:
    """A worker target exists once its deploy operation starts (it may wait behind the push that
    makes the release); only then can it be scaled. NotDeployed if that operation ends without it."""
    deadline = time.monotonic() + timeout
    said = False
    while True:
        with p.reader() as s:
            _, svc = catalogue.get_service(session=s, env=env, name=service)
            if catalogue.find_worker(session=s, service=svc, name=target) is not None:
                return
            pending = [op for op in catalogue.unfinished_operations(session=s, service=svc)
                       if op.kind == OpKind.worker_deploy and op.parameters.target == target]
        if not pending:
            raise NotDeployed(f"worker target {service}/{target} was not deployed: its operation failed "
                              f"(`orchestrator ops list {env}`)")
        if time.monotonic() > deadline:
            raise NotDeployed(f"worker target {service}/{target} is not deployed yet (operation {pending[0].id} "
                              "waits): apply again once it runs")
        if not said:
            echo(f"  waiting for operation {pending[0].id} to deploy worker target {target} first")
            said = True
        pause()


def _change_service_row(p: Platform, env: str, change: SetVariables | UnsetVariables | RecordScale) -> None:
    """What no operation carries: variables (the next redeploy takes them), and the scale of a
    code service that runs nothing yet (its first push starts that many)."""
    if isinstance(change, SetVariables):
        requests.change_variables(p, env=env, service=change.service, values=dict(change.values))
        return
    if isinstance(change, UnsetVariables):
        requests.change_variables(p, env=env, service=change.service, unset=change.keys)
        return
    with p.session() as s:  # (the row locked: a push at once waits, and is seen)
        _, svc = catalogue.get_service(session=s, env=env, name=change.service, for_update=True)
        if catalogue.list_releases(session=s, service=svc):
            raise BadInput(f"service {svc.name} was pushed meanwhile: apply again")
        svc.scale = rules.check_scale(svc.type, change.scale)
        s.add(svc)
        s.commit()


def apply_plan(p: Platform, plan: Plan, *, support: bool, echo: Callable[[str], None],
               pause: Callable[[], None] = lambda: time.sleep(0.2)) -> list[Operation]:
    """Make the plan's changes in order, saying each; the operations started. A change refused
    on the way (something changed since the plan) stops there, saying how far it got."""
    started: list[Operation] = []
    for done, change in enumerate(plan.changes):
        echo(change.describe())
        try:
            ops = apply_change(p, plan.environment, change, support=support, pause=pause, echo=echo)
        except (BadInput, NotDeployed) as exc:
            made = f"the {done} before it were made" if done else "nothing was changed"
            kind = NotDeployed if isinstance(exc, NotDeployed) else BadInput
            raise kind(f"{exc} (change {done + 1} of {len(plan.changes)}; {made})") from None
        for op in ops:
            echo(f"  operation {op.id} ({op.kind}) {op.state}")
        started += ops
    return started


@main.command()
@click.argument("file", metavar="FILE")
@prune_option
@support_option
@pass_ctx
def plan(ctx: Context, file: str, prune: bool, support: bool) -> None:
    """Print what `apply FILE` would change (create, change, remove, redeploy); change nothing."""
    m = read_manifest(file)
    found = make_plan(ctx.platform, m, prune=prune, support=support)
    for line in found.lines():
        click.echo(line)
    if found.changes:
        n = len(found.changes)
        click.echo(f"{n} change{'s' if n > 1 else ''} to environment {m.environment}; "
                   f"nothing changed (`orchestrator apply {file}` makes {'them' if n > 1 else 'it'})")
    else:
        click.echo(f"no changes: environment {m.environment} matches {file}")


@main.command()
@click.argument("file", metavar="FILE")
@wait_option
@prune_option
@support_option
@pass_ctx
def apply(ctx: Context, file: str, wait: bool, prune: bool, support: bool) -> None:
    """Make the environment what FILE declares: each change as the matching command would make
    it (operations visible in `ops`); only what changed is redeployed."""
    m = read_manifest(file)
    found = make_plan(ctx.platform, m, prune=prune, support=support)
    if not found.changes:
        for note in found.notes:
            click.echo(f"# {note}")
        click.echo(f"no changes: environment {m.environment} matches {file}")
        return
    try:
        started = apply_plan(ctx.platform, found, support=support, echo=click.echo)
    except NotDeployed as exc:
        fail(str(exc), code=1)
        return
    for note in found.notes:
        click.echo(f"# {note}")
    n = len(found.changes)
    click.echo(f"{n} change{'s' if n > 1 else ''} made to environment {m.environment}; "
               f"{len(started)} operation{'s' if len(started) != 1 else ''} started")
    if wait:
        sys.exit(max((follow(ctx, op.id or 0) for op in started), default=0))
