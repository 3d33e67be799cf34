"""Keyword-only queries and mutations of the catalogue: f(*, session, ...).

Callers own the transaction (they commit); these functions add, flush and read. The few
conditional updates (claiming a service, moving a step on) are single UPDATE ... WHERE statements,
so concurrent nodes and CLIs agree on who won without locks of their own.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections import defaultdict
from collections.abc import Iterable, Sequence

from sqlalchemy import func, update
from sqlmodel import Session, col, select

from orchestrator import service_types
from orchestrator.models import (
    ACTIVE_JOB_STATES,
    ApiToken,
    Environment,
    Host,
    HostPublic,
    HostState,
    Job,
    JobPublic,
    JobState,
    Operation,
    OperationPublic,
    OpKind,
    OpState,
    OpTrigger,
    Release,
    Role,
    Service,
    ServicePublic,
    ServiceType,
    Step,
    StepAction,
    StepPublic,
    StepState,
    WorkerTarget,
    utcnow,
)
from orchestrator.placement import HostLoad
from orchestrator.sizes import parse_size


class BadInput(Exception):
    """The request is wrong; nothing was changed. The message is one line for the user."""


class NotFound(BadInput):
    pass


_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def check_name(kind: str, name: str) -> str:
    if not _DNS_LABEL.match(name):
        raise BadInput(f"{kind} name {name!r} is not a DNS label (a-z, 0-9 and '-', at most 63)")
    return name


# --- API tokens -----------------------------------------------------------------------------------


def create_token(*, session: Session, name: str, role: Role) -> str:
    """A new bearer token; only its hash is stored, so the returned value is shown once."""
    check_name("token", name)
    if session.exec(select(ApiToken).where(ApiToken.name == name)).first() is not None:
        raise BadInput(f"token {name} exists already")
    raw = "orch_" + secrets.token_urlsafe(32)
    session.add(ApiToken(name=name, role=role, token_hash=_token_hash(raw)))
    session.flush()
    return raw


def role_of_token(*, session: Session, raw: str) -> Role | None:
    token = session.exec(select(ApiToken).where(ApiToken.token_hash == _token_hash(raw))).first()
    return token.role if token is not None else None


def _token_hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


# --- hosts ----------------------------------------------------------------------------------------


def add_host(*, session: Session, name: str, docker_url: str, address: str) -> Host:
    check_name("host", name)
    if not re.match(r"^(unix|tcp|ssh|http|https)://", docker_url):
        raise BadInput(f"docker URL {docker_url!r} must start with unix://, tcp://, ssh:// or http(s)://")
    if session.exec(select(Host).where(Host.name == name)).first() is not None:
        raise BadInput(f"host {name} exists already")
    host = Host(name=name, docker_url=docker_url, address=address)
    session.add(host)
    session.flush()
    return host


def get_host(*, session: Session, name: str) -> Host:
    host = session.exec(select(Host).where(Host.name == name)).first()
    if host is None:
        raise NotFound(f"no host named {name}")
    return host


def list_hosts(*, session: Session) -> list[Host]:
    return list(session.exec(select(Host).order_by(col(Host.name))))


def host_views(*, session: Session) -> list[HostPublic]:
    """Hosts with their active jobs and the capacity those leave free."""
    loads = {h.name: h for h in host_loads(session=session)}
    counts: dict[str, int] = defaultdict(int)
    for job in session.exec(select(Job).where(col(Job.state).in_(ACTIVE_JOB_STATES))):
        counts[job.host] += 1
    views = []
    for h in list_hosts(session=session):
        load = loads[h.name]
        views.append(HostPublic(
            name=h.name, docker_url=h.docker_url, address=h.address, state=h.state,
            last_seen=h.last_seen, jobs=counts[h.name], cpus=h.cpus, memory_mb=h.memory_mb,
            free_cpus=round(max(0.0, h.cpus - load.used_cpus), 3),
            free_memory_mb=max(0, h.memory_mb - load.used_memory_mb),
        ))
    return views


def host_loads(*, session: Session) -> list[HostLoad]:
    """Every host with the CPU, memory and ports its active jobs hold."""
    used_cpus: dict[str, float] = defaultdict(float)
    used_mem: dict[str, int] = defaultdict(int)
    ports: dict[str, set[int]] = defaultdict(set)
    # A lost job's container may still hold its port on its (unreachable) host: keep it taken.
    holding = (*ACTIVE_JOB_STATES, JobState.stopping, JobState.lost)
    for job in session.exec(select(Job).where(col(Job.state).in_(holding))):
        if job.port is not None:
            ports[job.host].add(job.port)
        if job.state in ACTIVE_JOB_STATES:
            size = parse_size(job.size)
            used_cpus[job.host] += size.cpus
            used_mem[job.host] += size.memory_mb
    hosts = list_hosts(session=session)
    # Hosts that share an address (several daemons on one machine) share its ports.
    by_address: dict[str, set[int]] = defaultdict(set)
    for h in hosts:
        by_address[h.address] |= ports[h.name]
    return [
        HostLoad(
            name=h.name, schedulable=h.state == HostState.up, address=h.address, cpus=h.cpus,
            memory_mb=h.memory_mb, used_cpus=used_cpus[h.name], used_memory_mb=used_mem[h.name],
            used_ports=frozenset(by_address[h.address]),
        )
        for h in hosts
    ]


# --- environments and services --------------------------------------------------------------------


def create_env(*, session: Session, name: str, sandbox: bool) -> Environment:
    check_name("environment", name)
    if session.exec(select(Environment).where(Environment.name == name)).first() is not None:
        raise BadInput(f"environment {name} exists already")
    env = Environment(name=name, sandbox=sandbox)
    session.add(env)
    session.flush()
    return env


def get_env(*, session: Session, name: str) -> Environment:
    env = session.exec(select(Environment).where(Environment.name == name)).first()
    if env is None:
        raise NotFound(f"no environment named {name}")
    return env


def get_env_by_id(*, session: Session, env_id: int) -> Environment:
    env = session.get(Environment, env_id)
    if env is None:
        raise NotFound(f"no environment {env_id}")
    return env


def list_envs(*, session: Session) -> list[Environment]:
    return list(session.exec(select(Environment).order_by(col(Environment.name))))


def add_service(*, session: Session, env: Environment, name: str, type: ServiceType,
                image: str | None, command: str | None, scale: int, size: str) -> Service:
    check_name("service", name)
    if scale < 0:
        raise BadInput(f"scale {scale} is below 0: it must be 0 or more")
    kind = service_types.profile(type)
    if kind.single_job and scale > 1:
        raise BadInput(f"{type} services run one job (one copy of the data, one kept port): "
                       "scale above 1 is refused")
    image = image or kind.default_image
    if not image and type != ServiceType.code:
        raise BadInput(f"a {type} service needs --image")
    try:
        parse_size(size)
    except ValueError as exc:
        raise BadInput(str(exc)) from exc
    exists = select(Service).where(Service.env_id == env.id, Service.name == name)
    if session.exec(exists).first() is not None:
        raise BadInput(f"service {name} exists already in {env.name}")
    service = Service(env_id=env.id or 0, name=name, type=type, image=image, command=command,
                      scale=scale, size=size,
                      credentials=service_types.new_credentials(type, name))
    session.add(service)
    session.flush()
    return service


def get_service(*, session: Session, env: str, name: str) -> tuple[Environment, Service]:
    environment = get_env(session=session, name=env)
    service = session.exec(
        select(Service).where(Service.env_id == environment.id, Service.name == name)
    ).first()
    if service is None:
        raise NotFound(f"no service named {name} in environment {env}")
    return environment, service


def list_services(*, session: Session, env: Environment) -> list[Service]:
    query = select(Service).where(Service.env_id == env.id).order_by(col(Service.name))
    return list(session.exec(query))


def update_service(*, session: Session, service: Service, overlap: int | None,
                   redeployable: bool | None, support: bool) -> Service:
    """The support-only settings: the overlap period and the redeployable flag."""
    if overlap is None and redeployable is None:
        raise BadInput("nothing to update: give the overlap or the redeployable flag")
    if not support:
        raise BadInput("only support may set the overlap period or the redeployable flag")
    if overlap is not None:
        if overlap < 0:
            raise BadInput("overlap must be 0 or more seconds")
        if overlap and service.type != ServiceType.code:
            raise BadInput("an overlap period is for code services only")
        service.overlap = overlap
    if redeployable is not None:
        service.redeployable = redeployable
    session.add(service)
    return service


_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_assignments(pairs: Iterable[str]) -> dict[str, str]:
    """KEY=VALUE words -> a dict; a word without '=' or a bad name is refused."""
    updates = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise BadInput(f"{pair!r} is not KEY=VALUE")
        updates[key] = value
    return updates


def set_variables(*, session: Session, service: Service, values: dict[str, str]) -> None:
    """User variables; they take effect at the next redeploy."""
    if not values:
        raise BadInput("no variables given")
    for key, value in values.items():
        if not _VAR_NAME.match(key):
            raise BadInput(f"variable name {key!r} must be letters, digits and _, not starting with a digit")
        if len(key) > 255 or len(value) > 65536:
            raise BadInput(f"variable {key[:40]}: names take at most 255 characters, values 64 KiB")
        if key == "PORT" or key.startswith("ORCH_"):
            raise BadInput(f"{key} is set by the platform for every job and cannot be overridden")
        if not isinstance(value, str) or "\x00" in value:
            raise BadInput(f"variable {key} must be a string without NUL characters")
    service.variables = {**service.variables, **values}
    session.add(service)


def unset_variables(*, session: Session, service: Service, keys: Iterable[str]) -> None:
    keys = list(keys)
    missing = [k for k in keys if k not in service.variables]
    if missing:
        raise BadInput(f"service {service.name} has no variable {missing[0]}")
    service.variables = {k: v for k, v in service.variables.items() if k not in keys}
    session.add(service)


def service_public(service: Service, env: Environment) -> ServicePublic:
    return ServicePublic(env=env.name, **service.model_dump(exclude={"env_id", "credentials"}))


def workers_of(*, session: Session, service: Service) -> list[WorkerTarget]:
    query = select(WorkerTarget).where(WorkerTarget.service_id == service.id)
    return list(session.exec(query.order_by(col(WorkerTarget.name))))


def find_worker(*, session: Session, service: Service, name: str) -> WorkerTarget | None:
    query = select(WorkerTarget).where(WorkerTarget.service_id == service.id, WorkerTarget.name == name)
    return session.exec(query).first()


def get_worker(*, session: Session, service: Service, name: str) -> WorkerTarget:
    worker = find_worker(session=session, service=service, name=name)
    if worker is None:
        raise NotFound(f"service {service.name} has no worker target {name}")
    return worker


# --- releases -------------------------------------------------------------------------------------


def add_release(*, session: Session, service: Service, image: str) -> Release:
    last = session.exec(
        select(func.max(Release.number)).where(Release.service_id == service.id)
    ).first()
    release = Release(service_id=service.id or 0, number=(last or 0) + 1, image=image)
    session.add(release)
    session.flush()
    return release


MAX_ID = 2**63 - 1  # what the databases' integers hold; a larger number names nothing


def get_release(*, session: Session, service: Service, number: int) -> Release:
    if not 0 < number <= MAX_ID:
        raise NotFound(f"service {service.name} has no release {number}")
    release = session.exec(
        select(Release).where(Release.service_id == service.id, Release.number == number)
    ).first()
    if release is None:
        raise NotFound(f"service {service.name} has no release {number}")
    return release


def list_releases(*, session: Session, service: Service) -> list[Release]:
    query = select(Release).where(Release.service_id == service.id).order_by(col(Release.number))
    return list(session.exec(query))


# --- jobs -----------------------------------------------------------------------------------------


def active_jobs(*, session: Session, service: Service) -> list[Job]:
    query = select(Job).where(Job.service_id == service.id, col(Job.state).in_(ACTIVE_JOB_STATES))
    return list(session.exec(query.order_by(col(Job.created_at), col(Job.id))))


def list_jobs(*, session: Session, env: Environment, service: Service | None = None,
              include_stopped: bool = False) -> list[JobPublic]:
    services = {s.id: s for s in list_services(session=session, env=env)}
    query = select(Job).where(col(Job.service_id).in_(list(services)))
    if service is not None:
        query = query.where(Job.service_id == service.id)
    if not include_stopped:
        query = query.where(col(Job.state).in_((*ACTIVE_JOB_STATES, JobState.stopping)))
    jobs = session.exec(query.order_by(col(Job.service_id), col(Job.created_at), col(Job.id)))
    return [job_public(j, env.name, services[j.service_id].name) for j in jobs]


def job_public(job: Job, env: str, service: str) -> JobPublic:
    return JobPublic(env=env, service=service, **job.model_dump())


def move_job_port(*, session: Session, job_id: str, port: int) -> Job:
    """A job not yet started takes another port: its PORT, its flags and, for a database or
    cache whose kept port it was, the service's port follow."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    old = str(job.port)
    job.port = port
    job.environment = {**job.environment, "PORT": str(port)}
    job.args = [str(port) if a == old else a.replace(f"={old}", f"={port}") for a in job.args]
    for step in session.exec(select(Step).where(Step.job_id == job_id, Step.action == StepAction.start)):
        step.name = step.name.replace(f"port {old}", f"port {port}")
        session.add(step)
    service = session.get(Service, job.service_id)
    if service is not None and service.port is not None and str(service.port) == old:
        service.port = port
        session.add(service)
    session.add(job)
    session.flush()
    return job


def set_job_state(*, session: Session, job_id: str, state: JobState, container_id: str | None = None,
                  error: str | None = None) -> None:
    values: dict[str, object] = {"state": state}
    if container_id is not None:
        values["container_id"] = container_id
    if error is not None:
        values["error"] = error
    if state == JobState.running:
        values["started_at"] = utcnow()
    if state in (JobState.stopped, JobState.failed):
        values["stopped_at"] = utcnow()
    session.exec(update(Job).where(col(Job.id) == job_id).values(**values))


# --- operations -----------------------------------------------------------------------------------


def record_operation(*, session: Session, env: Environment, service: Service, kind: OpKind,
                     trigger: OpTrigger, params: dict[str, object] | None = None) -> Operation:
    op = Operation(kind=kind, env_id=env.id or 0, service_id=service.id or 0, trigger=trigger,
                   params=dict(params or {}))
    session.add(op)
    session.flush()
    return op


def claim_next_operation(*, session: Session, service_id: int) -> Operation | None:
    """Make the oldest queued operation of the service its active one, if none is active.

    Whoever's UPDATE matches wins; everyone else gets None. Called after recording an operation
    and after finishing one, so a queued operation is never left behind."""
    op = session.exec(
        select(Operation)
        .where(Operation.service_id == service_id, Operation.state == OpState.queued)
        .order_by(col(Operation.id))
    ).first()
    if op is None:
        return None
    won = session.exec(
        update(Service)
        .where(col(Service.id) == service_id, col(Service.active_op_id).is_(None))
        .values(active_op_id=op.id)
    ).rowcount
    return op if won == 1 else None


def release_service(*, session: Session, service_id: int, op_id: int) -> None:
    session.exec(
        update(Service)
        .where(col(Service.id) == service_id, col(Service.active_op_id) == op_id)
        .values(active_op_id=None)
    )


def end_operation(*, session: Session, op_id: int, state: OpState, error: str | None) -> bool:
    """Running (or queued) -> succeeded/failed, once; False when another caller already ended it."""
    return session.exec(
        update(Operation)
        .where(col(Operation.id) == op_id,
               col(Operation.state).in_((OpState.running, OpState.queued)))
        .values(state=state, error=error, finished_at=utcnow())
    ).rowcount == 1


def get_operation(*, session: Session, op_id: int) -> Operation:
    op = session.get(Operation, op_id) if 0 < op_id <= MAX_ID else None
    if op is None:
        raise NotFound(f"no operation {op_id}")
    return op


def list_operations(*, session: Session, env: Environment | None = None,
                    limit: int = 50) -> list[Operation]:
    query = select(Operation)
    if env is not None:
        query = query.where(Operation.env_id == env.id)
    return list(session.exec(query.order_by(col(Operation.id).desc()).limit(limit)))


def steps_of(*, session: Session, op_id: int) -> list[Step]:
    query = select(Step).where(Step.op_id == op_id).order_by(col(Step.stage), col(Step.id))
    return list(session.exec(query))


def operation_public(*, session: Session, op: Operation, steps: Sequence[Step] | None = None
                     ) -> OperationPublic:
    env = session.get(Environment, op.env_id)
    service = session.get(Service, op.service_id)
    if steps is None:
        steps = steps_of(session=session, op_id=op.id or 0)
    return OperationPublic(
        env=env.name if env else "?", service=service.name if service else "?",
        steps=[StepPublic(job=s.job_id, **s.model_dump()) for s in steps],
        **op.model_dump(exclude={"env_id", "service_id"}),
    )


# --- steps ----------------------------------------------------------------------------------------


def begin_step(*, session: Session, step_id: int) -> Step | None:
    """pending -> running; None when the step already ran or was skipped (a redelivery)."""
    moved = session.exec(
        update(Step)
        .where(col(Step.id) == step_id, col(Step.state) == StepState.pending)
        .values(state=StepState.running, started_at=utcnow())
    ).rowcount
    return session.get(Step, step_id) if moved == 1 else None


def end_step(*, session: Session, step_id: int, state: StepState, error: str | None = None) -> None:
    session.exec(
        update(Step).where(col(Step.id) == step_id)
        .values(state=state, error=error, finished_at=utcnow())
    )


def skip_pending_steps(*, session: Session, op_id: int) -> None:
    session.exec(
        update(Step).where(col(Step.op_id) == op_id, col(Step.state) == StepState.pending)
        .values(state=StepState.skipped, finished_at=utcnow())
    )
