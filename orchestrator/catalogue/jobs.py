"""Jobs: one container each."""

from __future__ import annotations

from sqlalchemy import update
from sqlmodel import Session, col, select

from orchestrator.catalogue.services import list_services
from orchestrator.errors import NotFound
from orchestrator.models import (
    ACTIVE_JOB_STATES,
    Environment,
    Job,
    JobPublic,
    JobState,
    Service,
    Step,
    StepAction,
    utcnow,
)


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
