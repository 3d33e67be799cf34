"""Requests: every way in (CLI, API, control tasks) asks for changes here. Each request is
validated (a refusal raises BadInput and changes nothing), recorded as an operation (the service
claimed in the same transaction when it is free), and started (``operations.start_claimed``; a
routes operation: ``operations.start_next``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlmodel import Session

from orchestrator import builds, catalogue, operations, rules, service_types
from orchestrator.errors import BadInput
from orchestrator.models import (
    Environment,
    JobState,
    Operation,
    OpKind,
    OpParams,
    OpTrigger,
    Service,
    ServiceType,
)
from orchestrator.platform import Platform
from orchestrator.settings import Settings
from orchestrator.who import asker

# The images of the auto-included services, from the settings.
INCLUDED_IMAGES: dict[ServiceType, Callable[[Settings], str]] = {
    ServiceType.logging: lambda s: s.image_logging,
    ServiceType.service_proxy: lambda s: s.image_service_proxy,
    ServiceType.monitoring: lambda s: s.image_monitoring,
}


@dataclass(frozen=True)
class Decision:
    """What a valid request records: the operation's kind, trigger and parameters."""

    kind: OpKind
    trigger: OpTrigger
    params: OpParams = field(default_factory=OpParams)


def _request(p: Platform, *, env: str, service: str,
             decide: Callable[[Session, Service], Decision]) -> Operation:
    """The one way an operation is asked for: find the service, let ``decide`` validate the
    request and say what to record, record it, start it. The service is claimed in the
    transaction that records the operation (one write turn, not two): for this operation, or for
    an older one queued before it; none when another is running, whose finish starts the next.
    The service's row is locked first (PostgreSQL): a finish that frees the service meanwhile
    either commits before this claim looks (which then wins) or waits for this commit (and its
    ``start_next`` then sees this operation queued); without the lock, it could do neither."""
    with p.session() as s:
        environment, svc = catalogue.get_service(session=s, env=env, name=service, for_update=True)
        decision = decide(s, svc)
        params = decision.params
        if params.requested_by is None and asker.get() is not None:
            params = params.model_copy(update={"requested_by": asker.get()})
        op = catalogue.record_operation(session=s, env=environment, service=svc, kind=decision.kind,
                                        trigger=decision.trigger, params=params)
        claimed = catalogue.claim_next_operation(session=s, service_id=svc.id or 0)
        s.commit()
    if claimed is not None:
        operations.start_claimed(p, claimed)
    with p.reader() as s:
        return catalogue.get_operation(session=s, op_id=op.id or 0)


def request_push(p: Platform, *, env: str, service: str, image: str, support: bool = False) -> Operation:
    """A new release of a code service: the first push deploys it, later ones redeploy it. Only
    support may push to a service marked not redeployable."""
    image = rules.check_image_reference(image)

    def decide(s: Session, svc: Service) -> Decision:
        if svc.type != ServiceType.code:
            raise BadInput(f"service {service} is a {svc.type} service: only code services take pushes")
        _check_redeployable(svc, support)
        release = catalogue.add_release(session=s, service=svc, image=image)
        kind = OpKind.deploy if release.number == 1 else OpKind.redeploy
        return Decision(kind, OpTrigger.push, OpParams(release=release.number, image=image))

    return _request(p, env=env, service=service, decide=decide)


def request_push_source(p: Platform, *, env: str, service: str, source: bytes, commit: str | None = None,
                        support: bool = False) -> Operation:
    """A new release of a code service built from a pushed directory (a tar of it): with its
    Dockerfile, or on the platform's Python image after its Procfile. The build is the
    operation's first step; with ``ORCH_REGISTRY`` set, the image is pushed there and the
    release recorded by digest."""
    built = builds.source_from_tar(source)
    if commit is not None and not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", commit):
        raise BadInput(f"commit {commit!r} is not a git object name")

    def decide(s: Session, svc: Service) -> Decision:
        if svc.type != ServiceType.code:
            raise BadInput(f"service {service} is a {svc.type} service: only code services take pushes")
        _check_redeployable(svc, support)
        env_row = catalogue.get_env_by_id(session=s, env_id=svc.env_id)
        number = catalogue.next_release_number(session=s, service=svc)
        image = builds.image_name(p.settings.registry, env_row.name, svc.name, number)
        stored = catalogue.store_source(session=s, data=built.context)
        release = catalogue.add_release(session=s, service=svc, image=image, build=built.kind,
                                        source_id=stored.id, commit=commit, command=built.web,
                                        processes=built.processes)
        kind = OpKind.deploy if release.number == 1 else OpKind.redeploy
        return Decision(kind, OpTrigger.push, OpParams(release=release.number, image=image, source_id=stored.id))

    return _request(p, env=env, service=service, decide=decide)


def _up_to_date(p: Platform, svc: Service) -> None:
    """An included service made by an older platform (logging and monitoring were placeholders:
    busybox, no credentials) takes the current image and entrypoint, and credentials, at its
    support redeploy."""
    if "password" in svc.credentials or svc.type not in INCLUDED_IMAGES:
        return
    svc.credentials = service_types.new_credentials(ServiceType(svc.type), svc.name)
    svc.image = INCLUDED_IMAGES[ServiceType(svc.type)](p.settings)
    svc.command = None


def request_redeploy(p: Platform, *, env: str, service: str, support: bool = False,
                     release: int | None = None) -> Operation:
    """A manual redeploy, a support redeploy, or (with ``release``) a rollback."""

    def decide(s: Session, svc: Service) -> Decision:
        if not service_types.profile(svc.type).user_redeploy:
            if not support:
                raise BadInput(f"{svc.type} services cannot be redeployed through the CLI or API (support can, "
                               "with --support)")
            _up_to_date(p, svc)
        _check_redeployable(svc, support)
        if release is not None:
            rel = catalogue.get_release(session=s, service=svc, number=release)
            trigger = OpTrigger.support if support else OpTrigger.rollback
            return Decision(OpKind.redeploy, trigger, OpParams(release=rel.number, image=rel.image))
        _require_release(s, svc)
        return Decision(OpKind.redeploy, OpTrigger.support if support else OpTrigger.manual)

    return _request(p, env=env, service=service, decide=decide)


def create_env(p: Platform, *, name: str, sandbox: bool, defaults: bool = True,
               http_port: int | None = None, https_port: int | None = None) -> list[Operation]:
    """A new environment with its proxy ports (asked for, or the first free ones of the range);
    unless ``defaults`` is off, its auto-included services (logging, the service proxy and,
    outside sandboxes, monitoring) are created and deployed."""
    images = {kind: image(p.settings) for kind, image in INCLUDED_IMAGES.items()}
    with p.session() as s:
        environment = catalogue.create_env(session=s, name=name, sandbox=sandbox)
        if defaults or http_port is not None or https_port is not None:
            # An environment without a proxy (--no-defaults) takes its ports when it gets one.
            _proxy_ports(p, s, environment, http_port, https_port)
        included = [i for i in service_types.INCLUDED_SERVICES
                    if defaults and (i.sandbox_too or not sandbox)]
        for item in included:
            catalogue.add_service(session=s, env=environment, name=item.name, type=item.type,
                                  image=images[item.type], command=item.command, scale=1, size="xs")
        s.commit()
    return [request_deploy(p, env=name, service=i.name, trigger=OpTrigger.create) for i in included]


def add_service(p: Platform, *, env: str, name: str, type: ServiceType, image: str | None,
                command: str | None, scale: int, size: str) -> Operation | None:
    """A new service; databases, caches and the included types deploy at once, code services
    wait for their first push."""
    with p.session() as s:  # (the environment's row locked: two services added at once see each other)
        environment = catalogue.get_env(session=s, name=env, for_update=True)
        others = [(o.name, o.type) for o in catalogue.list_services(session=s, env=environment)]
        clashes = service_types.connection_clashes([*others, (name, type)])
        if clashes:
            raise BadInput(f"{clashes[0]}: one would shadow the other in code services; "
                           "choose another name")
        catalogue.add_service(session=s, env=environment, name=name, type=type,
                              image=image if type != ServiceType.code else None,
                              command=command, scale=scale, size=size)
        if type == ServiceType.service_proxy and environment.http_port is None:
            _proxy_ports(p, s, environment)
        s.commit()
    if not service_types.profile(type).deploys_on_create:
        return None
    return request_deploy(p, env=env, service=name, trigger=OpTrigger.create)


def request_deploy(p: Platform, *, env: str, service: str, trigger: OpTrigger) -> Operation:
    return _request(p, env=env, service=service, decide=lambda _s, _svc: Decision(OpKind.deploy, trigger))


def request_scale(p: Platform, *, env: str, service: str, scale: int) -> Operation:
    def decide(s: Session, svc: Service) -> Decision:
        rules.check_scale(svc.type, scale)
        _require_release(s, svc)
        return Decision(OpKind.scale, OpTrigger.manual, OpParams(scale=scale))

    return _request(p, env=env, service=service, decide=decide)


def request_worker_deploy(p: Platform, *, env: str, service: str, target: str,
                          command: str | None) -> Operation:
    """Start (or replace) the worker jobs of a target; from then on they redeploy with the
    service. Without a command: the current release's Procfile line of that name."""
    rules.check_name("worker target", target)

    def decide(s: Session, svc: Service) -> Decision:
        if svc.type != ServiceType.code:
            raise BadInput(f"worker targets are for code services; {svc.name} is a {svc.type} service")
        _require_release(s, svc)
        chosen = command
        if not (chosen or "").strip():
            current = catalogue.get_release(session=s, service=svc, number=svc.release) if svc.release else None
            chosen = current.processes.get(target) if current is not None else None
            if not chosen:
                raise BadInput(f"a worker target needs a --command (the current release has no Procfile "
                               f"line {target})")
        return Decision(OpKind.worker_deploy, OpTrigger.manual, OpParams(target=target, command=chosen))

    return _request(p, env=env, service=service, decide=decide)


def request_worker_scale(p: Platform, *, env: str, service: str, target: str,
                         scale: str | int) -> Operation:
    """``scale`` is N, or +N/-N to change the target's scale."""
    change = rules.parse_scale_change(str(scale))

    def decide(s: Session, svc: Service) -> Decision:
        worker = catalogue.get_worker(session=s, service=svc, name=target)
        rules.check_scale(svc.type, change.applied_to(worker.scale), what=f"worker target {target} scale")
        return Decision(OpKind.worker_scale, OpTrigger.manual,
                        OpParams(target=target, worker_scale=change))

    return _request(p, env=env, service=service, decide=decide)


def request_worker_rm(p: Platform, *, env: str, service: str, target: str) -> Operation:
    def decide(s: Session, svc: Service) -> Decision:
        catalogue.get_worker(session=s, service=svc, name=target)
        return Decision(OpKind.worker_rm, OpTrigger.manual, OpParams(target=target))

    return _request(p, env=env, service=service, decide=decide)


def add_site(p: Platform, *, env: str, site: str, service: str, cert: str | None = None,
             key: str | None = None) -> Operation | None:
    """Route the host name ``site`` to a code service's deploy jobs (with a certificate and its
    key: on the HTTPS port too, chosen by SNI). The environment's proxy takes it live: returns
    the operation that updates it (None when no proxy runs there)."""
    name = rules.check_site_name(site)
    if (cert is None) != (key is None):
        raise BadInput("a TLS site needs both --cert and --key")
    chain = rules.check_certificate(name, cert, key) if cert is not None and key is not None else None
    with p.session() as s:  # (the row locked: the service's removal, ending meanwhile, sees the site)
        environment, svc = catalogue.get_service(session=s, env=env, name=service, for_update=True)
        if svc.type != ServiceType.code:
            raise BadInput(f"sites route to code services; {service} is a {svc.type} service")
        if environment.http_port is None:
            _proxy_ports(p, s, environment)
        catalogue.add_site(session=s, env=environment, name=name, service=svc, cert=chain,
                           key=key.strip() + "\n" if key is not None else None)
        op = _record_routes(s, environment)
        s.commit()
    return _started(p, op)


def remove_site(p: Platform, *, env: str, site: str) -> Operation | None:
    with p.session() as s:
        environment = catalogue.get_env(session=s, name=env)
        s.delete(catalogue.get_site(session=s, env=environment, name=site))
        op = _record_routes(s, environment)
        s.commit()
    return _started(p, op)


def _proxy_ports(p: Platform, s: Session, env: Environment, http_port: int | None = None,
                 https_port: int | None = None) -> None:
    catalogue.assign_proxy_ports(
        session=s, env=env, http_port=http_port, https_port=https_port,
        job_ports=(p.settings.port_min, p.settings.port_max),
        proxy_ports=(p.settings.proxy_port_min, p.settings.proxy_port_max))


def _record_routes(s: Session, env: Environment) -> Operation | None:
    """The operation that brings the environment's proxy in line with its sites."""
    svc = catalogue.proxy_service(session=s, env=env)
    if svc is None:
        return None
    return catalogue.record_operation(session=s, env=env, service=svc, kind=OpKind.routes,
                                      trigger=OpTrigger.manual, params=OpParams(requested_by=asker.get()))


def _started(p: Platform, op: Operation | None) -> Operation | None:
    if op is None:
        return None
    operations.start_next(p, op.service_id)
    with p.reader() as s:
        return catalogue.get_operation(session=s, op_id=op.id or 0)


def set_health_path(p: Platform, *, env: str, service: str, path: str | None) -> None:
    """The path the platform and the proxy GET to know a code service's deploy job is healthy
    (2xx/3xx); None: a TCP connect. Takes effect at the next redeploy, like variables."""
    update_service(p, env=env, service=service, health_path=path or "")


def change_variables(p: Platform, *, env: str, service: str, values: dict[str, str] | None = None,
                     unset: Sequence[str] = ()) -> None:
    """Unset, then set, a service's user variables (the next redeploy takes them). The service's
    row is locked until the commit: on PostgreSQL two changes at once each read the variables
    before the other's commit, and the later write dropped what the earlier one set."""
    if not values and not unset:
        raise BadInput("give variables to set or unset")
    with p.session() as s:
        _, svc = catalogue.get_service(session=s, env=env, name=service, for_update=True)
        if unset:
            catalogue.unset_variables(session=s, service=svc, keys=unset)
        if values:
            catalogue.set_variables(session=s, service=svc, values=values)
        s.commit()


def update_service(p: Platform, *, env: str, service: str, image: str | None = None, command: str | None = None,
                   size: str | None = None, health_path: str | None = None, overlap: int | None = None,
                   redeployable: bool | None = None, support: bool = False) -> list[str]:
    """Change how the service's next jobs start; each takes effect at its next redeploy, like
    variables. ``command`` and ``health_path`` "" go back to none (the image's own command, a
    TCP check). The overlap and the redeployable flag are support's. Returns what changed."""
    changes: dict[str, object] = {}
    if image is not None:
        changes["image"] = rules.check_image_reference(image)
    if command is not None:
        changes["command"] = command if command.strip() else None
    if size is not None:
        rules.check_size(size)
        changes["size"] = size
    if health_path is not None:
        changes["health_path"] = rules.check_health_path(health_path) if health_path else None
    if not changes and overlap is None and redeployable is None:
        raise BadInput("nothing to update: give --image, --command, --size, --health-path, --overlap "
                       "or --redeployable")
    with p.session() as s:
        _, svc = catalogue.get_service(session=s, env=env, name=service)
        if "image" in changes and svc.type == ServiceType.code:
            raise BadInput(f"{service} is a code service: its image is its release's (`orchestrator push`)")
        if "health_path" in changes and svc.type != ServiceType.code:
            raise BadInput(f"a health path is for code services; {service} is a {svc.type} service")
        if overlap is not None or redeployable is not None:
            catalogue.update_service(session=s, service=svc, overlap=overlap, redeployable=redeployable,
                                     support=support)
        changed = [name for name, value in changes.items() if getattr(svc, name) != value]
        for name, value in changes.items():
            setattr(svc, name, value)
        s.add(svc)
        s.commit()
    return changed + [n for n, v in (("overlap", overlap), ("redeployable", redeployable)) if v is not None]


MAX_ARGV = 64 * 1024  # bytes of a one-off command's words


def _check_argv(argv: list[str]) -> list[str]:
    if not argv or not argv[0].strip():
        raise BadInput("give the command after --, e.g. `orchestrator run ENV SVC -- python manage.py migrate`")
    if sum(len(a) + 1 for a in argv) > MAX_ARGV or any("\0" in a for a in argv):
        raise BadInput(f"the command is longer than {MAX_ARGV // 1024} KiB or holds a NUL")
    return argv


def request_run(p: Platform, *, env: str, service: str, argv: list[str], requested_by: str | None = None
                ) -> Operation:
    """A one-off container of the service (its current image, variables and size) on a placed
    host, running ``argv`` until it exits; recorded as an operation (who asked is its trigger,
    what ran its parameters, its output and exit code its step's)."""
    argv = _check_argv(argv)

    def decide(s: Session, svc: Service) -> Decision:
        if not svc.image:
            raise BadInput(f"service {svc.name} has no image yet: push one first")
        return Decision(OpKind.run, OpTrigger.manual, OpParams(argv=argv, requested_by=requested_by))

    return _request(p, env=env, service=service, decide=decide)


def request_exec(p: Platform, *, env: str, service: str, argv: list[str], job: str | None = None,
                 requested_by: str | None = None) -> Operation:
    """``argv`` in a running job of the service (``job``, or its first deploy job)."""
    argv = _check_argv(argv)

    def decide(s: Session, svc: Service) -> Decision:
        jobs = [j for j in catalogue.active_jobs(session=s, service=svc) if j.state == JobState.running]
        if job is not None and job not in {j.id for j in jobs}:
            raise BadInput(f"service {svc.name} has no running job {job}")
        if not jobs:
            raise BadInput(f"service {svc.name} runs no job")
        return Decision(OpKind.exec, OpTrigger.manual, OpParams(argv=argv, job=job, requested_by=requested_by))

    return _request(p, env=env, service=service, decide=decide)


def request_remove_service(p: Platform, *, env: str, service: str, delete_data: bool = False,
                           whole_env: bool = False) -> Operation:
    """Stop every job of the service (drained out of the proxy first), then remove it: its
    worker targets and sites go, its releases and operations stay as history (under the name
    NAME.removed.ID). A database's data volume is kept (a service added again under that name
    finds it) unless ``delete_data``. Refused while an operation of the service runs or waits."""

    def decide(s: Session, svc: Service) -> Decision:
        if not whole_env and svc.type in INCLUDED_TYPES:
            raise BadInput(f"{svc.name} is included in every environment: `orchestrator env rm` removes it")
        busy = catalogue.unfinished_operations(session=s, service=svc)
        if busy:
            raise BadInput(f"service {svc.name} has operation {busy[0].id} {busy[0].state}: wait for it to end, "
                           f"or `orchestrator ops cancel {busy[0].id}`")
        return Decision(OpKind.remove, OpTrigger.manual, OpParams(delete_data=delete_data or None))

    return _request(p, env=env, service=service, decide=decide)


def request_remove_env(p: Platform, *, env: str, delete_data: bool = False) -> list[tuple[str, Operation]]:
    """Remove every service of the environment (each an operation), then the environment (its
    proxy ports go back to the range). Refused while any of its services has an operation."""
    with p.session() as s:
        environment = catalogue.get_env(session=s, name=env)
        services = catalogue.list_services(session=s, env=environment)
        for svc in services:
            busy = catalogue.unfinished_operations(session=s, service=svc)
            if busy:
                raise BadInput(f"service {svc.name} has operation {busy[0].id} {busy[0].state}: wait for it to "
                               f"end, or `orchestrator ops cancel {busy[0].id}`")
        environment.removing = True
        s.add(environment)
        if not services:
            catalogue.mark_env_removed(session=s, env=environment)
        s.commit()
    return [(svc.name, request_remove_service(p, env=env, service=svc.name, delete_data=delete_data,
                                              whole_env=True)) for svc in services]


INCLUDED_TYPES = frozenset(i.type for i in service_types.INCLUDED_SERVICES)


def _check_redeployable(svc: Service, support: bool) -> None:
    if not svc.redeployable and not support:
        raise BadInput(f"service {svc.name} is marked not redeployable: only support may redeploy it (--support)")


def _require_release(s: Session, svc: Service) -> None:
    """A code service runs nothing, and so can be neither redeployed nor scaled, before a push."""
    if svc.type == ServiceType.code and not catalogue.list_releases(session=s, service=svc):
        raise BadInput(f"service {svc.name} has no release yet: push an image first")
