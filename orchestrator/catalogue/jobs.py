"""Jobs: one container each."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, cast

from sqlalchemy import bindparam, update
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from orchestrator import service_types
from orchestrator.catalogue.services import list_services
from orchestrator.db import table, update_rows
from orchestrator.errors import NotFound
from orchestrator.models import (
    ACTIVE_JOB_STATES,
    Environment,
    Job,
    JobKind,
    JobPublic,
    JobState,
    Service,
    ServiceType,
    Step,
    StepAction,
    utcnow,
)


def active_jobs(*, session: Session, service: Service) -> list[Job]:
    query = select(Job).where(Job.service_id == service.id, col(Job.state).in_(ACTIVE_JOB_STATES))
    return list(session.exec(query.order_by(col(Job.created_at), col(Job.id))))


class JobPlace(NamedTuple):
    """What a plan needs of an active job."""

    id: str
    kind: JobKind
    target: str | None
    host: str
    port: int | None
    size: str


def active_job_places(*, session: Session, service_id: int) -> list[JobPlace]:
    """``active_jobs``, in the same order, as the columns a plan needs: read as columns (a plan
    runs in the catalogue's write turn; a row object with its JSON columns costs 50 µs and more)."""
    session.flush()
    return [JobPlace(*row) for row in session.connection().execute(_PLACES, {"w_service": service_id})]


_JOB = table(Job)
_PLACES = (sa_select(_JOB.c.id, _JOB.c.kind, _JOB.c.target, _JOB.c.host, _JOB.c.port, _JOB.c.size)
           .where(_JOB.c.service_id == bindparam("w_service"), _JOB.c.state.in_(ACTIVE_JOB_STATES))
           .order_by(_JOB.c.created_at, _JOB.c.id))


def running_jobs_of(*, session: Session, env: str, host: str | None = None) -> list[tuple[Job, Service]]:
    """The environment's running jobs (on ``host`` only, when given), each with its service."""
    query = (select(Job, Service).join(Service, col(Service.id) == Job.service_id)
             .join(Environment, col(Environment.id) == Service.env_id)
             .where(Environment.name == env, col(Environment.removed_at).is_(None), Job.state == JobState.running))
    if host is not None:
        query = query.where(Job.host == host)
    return [(job, svc) for job, svc in session.exec(query.order_by(col(Job.id)))]


# What a listing shows of a job: its columns but the big ones (environment, args, mounts).
_PUBLIC_COLUMNS = [name for name in JobPublic.model_fields if name not in ("env", "service")]


def list_jobs(*, session: Session, env: Environment, service: Service | None = None,
              include_stopped: bool = False, limit: int | None = None, offset: int = 0) -> list[JobPublic]:
    """The environment's active jobs (or all, ``include_stopped``), of one service when given, by
    service then age: two queries, the second reading only the columns shown."""
    services = {s.id: s.name for s in list_services(session=session, env=env)}
    query = select(col(Job.service_id), *(col(getattr(Job, name)) for name in _PUBLIC_COLUMNS))
    query = query.where(col(Job.service_id).in_([service.id] if service is not None else list(services)))
    if not include_stopped:
        query = query.where(col(Job.state).in_((*ACTIVE_JOB_STATES, JobState.stopping)))
    query = query.order_by(col(Job.service_id), col(Job.created_at), col(Job.id)).offset(offset).limit(limit)
    rows = cast("Iterable[Sequence[Any]]", session.exec(query))  # sqlmodel types a select of many columns as of one
    return [JobPublic(env=env.name, service=services.get(row[0], "?"),
                      **dict(zip(_PUBLIC_COLUMNS, row[1:], strict=True))) for row in rows]


def service_type_of(*, session: Session, job: Job) -> ServiceType:
    """The type of the service a job runs for: what its start prepares and how many ports it
    holds follow from it. A job's row names its service, not the type: one column of one row."""
    kind = session.connection().execute(_TYPE_OF, {"w_id": job.service_id}).scalar()
    if kind is None:
        raise NotFound(f"job {job.id}: no service {job.service_id}")
    return ServiceType(kind)


_TYPE_OF = select(table(Service).c.type).where(table(Service).c.id == bindparam("w_id"))  # built once: every start asks


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
    service = session.get(Service, job.service_id)
    names = service_types.profile(service.type).extra_ports if service is not None else ()
    job.environment = {**job.environment, "PORT": str(port), **{n: str(port + i) for i, n in enumerate(names, 1)}}
    job.args = [str(port) if a == old else a.replace(f"={old}", f"={port}") for a in job.args]
    for step in session.exec(select(Step).where(Step.job_id == job_id, Step.action == StepAction.start)):
        step.name = step.name.replace(f"port {old}", f"port {port}")
        session.add(step)
    if service is not None and service.port is not None and str(service.port) == old:
        service.port = port
        session.add(service)
    session.add(job)
    session.flush()
    return job


def set_job_state(*, session: Session, job_id: str, state: JobState, container_id: str | None = None,
                  error: str | None = None) -> None:
    update_rows(session, _SET_JOB, {"w_id": job_id}, Job, job_id, _job_values(state, container_id, error))


_SET_JOB = update(table(Job)).where(table(Job).c.id == bindparam("w_id"))
_SET_JOBS = update(table(Job)).where(table(Job).c.id.in_(bindparam("w_ids", expanding=True)))


def move_job(*, session: Session, job_id: str, state: JobState) -> Job | None:
    """``set_job_state`` that returns the job as it is now (one statement: UPDATE ... RETURNING,
    the session's copy refreshed); None when there is no such job."""
    moved = session.exec(update(Job).where(col(Job.id) == job_id).values(**_job_values(state, None, None))
                         .returning(Job).execution_options(synchronize_session=False, populate_existing=True))
    return moved.scalars().one_or_none()


def set_jobs_state(*, session: Session, job_ids: Sequence[str], state: JobState) -> None:
    """``set_job_state`` of several jobs in one statement built once (no rows read back)."""
    if job_ids:
        session.flush()
        session.connection().execute(_SET_JOBS, {"w_ids": list(job_ids), **_job_values(state, None, None)})


def set_job_states(*, session: Session, state: JobState, containers: Sequence[tuple[str, str | None]]) -> None:
    """``set_job_state`` of several jobs to one state, each with its container (or None: kept),
    as one statement run for every job (no statement built per job)."""
    groups: dict[tuple[str, ...], list[dict[str, object]]] = {}
    for job_id, container in containers:
        row: dict[str, object] = {"w_id": job_id, **_job_values(state, container, None)}
        groups.setdefault(tuple(sorted(row)), []).append(row)
    if groups:
        session.flush()
    for rows in groups.values():
        session.connection().execute(_SET_JOB, rows)


def jobs_by_id(*, session: Session, job_ids: Sequence[str]) -> dict[str, Job]:
    if not job_ids:
        return {}
    return {job.id: job for job in session.exec(select(Job).where(col(Job.id).in_(list(job_ids))))}


def _job_values(state: JobState, container_id: str | None, error: str | None) -> dict[str, object]:
    values: dict[str, object] = {"state": state}
    if container_id is not None:
        values["container_id"] = container_id
    if error is not None:
        values["error"] = error
    if state == JobState.running:
        values["started_at"] = utcnow()
    if state in (JobState.stopped, JobState.failed):
        values["stopped_at"] = utcnow()
    return values
