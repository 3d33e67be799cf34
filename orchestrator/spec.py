"""From the catalogue to what the planner needs: a service's spec and its variables."""

from __future__ import annotations

from sqlmodel import Session

from orchestrator import catalogue, planner, rules, service_types
from orchestrator.errors import BadInput
from orchestrator.models import Environment, JobKind, Service, ServiceType, VariableSource, VariableView
from orchestrator.names import legacy_volume_name
from orchestrator.sizes import parse_size

# The types whose services a code service is given a URL of (DATABASE_URL, REDIS_URL, ...).
REACHED_TYPES = tuple(t for t in ServiceType if service_types.profile(t).url_variable is not None)
JOB_VARIABLES = ("ORCH_ENV", "ORCH_SERVICE", "ORCH_JOB", "ORCH_KIND", "ORCH_HOST", "ORCH_RELEASE")


def variables_for(s: Session, env: Environment, svc: Service) -> list[VariableView]:
    """The variables the service's next jobs get, with where each comes from. Which wins:
    connection variables < user variables < the platform's own (the type's image variables and
    the per-job PORT and ORCH_*), so a user can point DATABASE_URL elsewhere but cannot break
    the credentials the platform keeps or the port it assigns."""
    merged: dict[str, tuple[str, VariableSource]] = {}
    if svc.type == ServiceType.code:
        for name, value in service_types.connection_variables(_endpoints(s, env)).items():
            merged[name] = (value, VariableSource.connection)
    for name, value in svc.variables.items():
        merged[name] = (value, VariableSource.user)
    for name, value in service_types.container_variables(svc.type, svc.credentials).items():
        merged[name] = (value, VariableSource.platform)
    result = [VariableView(name=n, value=v, source=src, secret=service_types.is_secret(n, v))
              for n, (v, src) in merged.items()]
    kind = service_types.profile(svc.type)
    per_job = [*(["PORT", *kind.extra_ports] if kind.has_port else []), *JOB_VARIABLES]
    result += [VariableView(name=n, value="(set per job)", source=VariableSource.job, secret=False)
               for n in per_job]
    return sorted(result, key=lambda v: v.name)


def shown(variables: list[VariableView], *, show_secrets: bool) -> list[VariableView]:
    """Variables as people see them: secrets masked unless asked for."""
    if show_secrets:
        return variables
    return [v.model_copy(update={"value": service_types.mask(v.value)}) if v.secret else v
            for v in variables]


def _endpoints(s: Session, env: Environment) -> list[service_types.Endpoint]:
    """The environment's deployed databases and caches, where code services reach them."""
    reached = [other for other in catalogue.list_services(session=s, env=env, types=REACHED_TYPES)
               if other.port is not None]
    if not reached:  # (every plan of a code service asks: the fleet's hosts are not read for nothing)
        return []
    addresses = {h.name: h.address for h in catalogue.list_hosts(session=s)}
    endpoints = []
    for other in reached:
        jobs = catalogue.active_jobs(session=s, service=other)
        host = other.host or (jobs[0].host if jobs else None)
        if host is None or other.port is None:
            continue
        endpoints.append(service_types.Endpoint(other.name, other.type, addresses.get(host, host),
                                                other.port, other.credentials))
    return endpoints


def service_spec(s: Session, env: Environment, svc: Service) -> planner.ServiceSpec:
    """What the service's next jobs are made of, from its row, its workers and its variables."""
    workers = tuple(
        planner.WorkerSpec(w.name, w.command, w.scale)
        for w in catalogue.workers_of(session=s, service=svc)
    )
    if not svc.image:
        raise BadInput(f"service {svc.name} has no image to run")
    kind = service_types.profile(svc.type)
    variables = {v.name: v.value for v in variables_for(s, env, svc)
                 if v.source != VariableSource.job}
    rules.check_variables_total(variables)  # refused before anything stops
    release = catalogue.get_release(session=s, service=svc, number=svc.release) \
        if svc.release is not None and svc.type == ServiceType.code else None
    return planner.ServiceSpec(
        env=env.name, name=svc.name, type=svc.type, image=svc.image,
        command=release.command if release is not None and release.command else svc.command,
        size_name=svc.size, size=parse_size(svc.size), scale=svc.scale, overlap=svc.overlap,
        variables=variables, release=svc.release, workers=workers, has_port=kind.has_port,
        extra_ports=kind.extra_ports,
        volume=f"{svc.volume or legacy_volume_name(env.name, svc.name)}:{kind.data_dir}"
        if kind.data_dir else None,
        port=svc.port, pinned_host=svc.host if kind.data_dir else None,
        args=service_types.entrypoint_args(svc.type),
        routed=kind.routed, start_first=kind.start_first,
        proxies=tuple(planner.ProxyJob(j.id, j.host)
                      for j in catalogue.proxy_jobs(session=s, env_id=env.id or 0))
        if kind.routed or svc.type == ServiceType.service_proxy else (),
    )


def observed_jobs(s: Session, svc: Service) -> list[planner.ObservedJob]:
    """The service's active jobs as the planner sees them, oldest first."""
    return [
        planner.ObservedJob(j.id, JobKind(j.kind), j.target, j.host, j.port, parse_size(j.size))
        for j in catalogue.active_job_places(session=s, service_id=svc.id or 0)
    ]
