"""The fleet of Docker hosts: heartbeats, reconciling a host with the catalogue, going down,
draining, removing.

Each node calls ``heartbeat`` and ``reconcile`` for its own host. Judging the fleet (which host
is down, which step or operation was orphaned, which service needs healing) is the watcher's
work: ``orchestrator.watcher``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy import bindparam, case, cast, literal, or_, update
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from orchestrator import catalogue, operations, service_types
from orchestrator.db import table
from orchestrator.errors import BadInput, NotFound
from orchestrator.models import (
    ACTIVE_JOB_STATES,
    Host,
    HostState,
    Job,
    JobKind,
    JobState,
    Operation,
    OpKind,
    OpParams,
    OpState,
    OpTrigger,
    Service,
    Step,
    StepAction,
    StepState,
    utcnow,
)
from orchestrator.platform import Platform

# Docker's states of a container that will not run again by itself.
DEAD_CONTAINER_STATES = frozenset({"exited", "dead", "created"})


@dataclass(frozen=True)
class Container:
    """A job's container as the host's Docker lists it."""

    job_id: str
    name: str
    status: str  # Docker's: running, restarting, exited, ...


@dataclass(frozen=True)
class Reconciled:
    remove: list[Container] = field(default_factory=list)  # the catalogue does not want them
    failed: list[str] = field(default_factory=list)  # running jobs that died outside an operation
    adopted: list[str] = field(default_factory=list)  # lost jobs taken back


def heartbeat(p: Platform, *, host: str, cpus: float, memory_mb: int, node: str | None = None,
              working_on: Sequence[int] = (), containers: Sequence[Container] | None = None,
              listed_at: datetime | None = None) -> Reconciled:
    """The node of ``host`` is alive (and its Docker answers), in one short transaction: record
    when and what the host can hold; renew the leases of the steps this node process (``node``)
    works on now and of its overlap waits; with the ``containers`` its Docker listed at
    ``listed_at``, reconcile the host with the catalogue (``reconcile``: only when a read before
    finds them out of step, ``_out_of_step``); a host that was down is up again (a draining one
    stays draining) in that same transaction, so no reader sees it up, and nothing is placed on
    it, before its jobs are in step (its lost jobs: out of step)."""
    now = utcnow()
    lease_until = now + timedelta(seconds=p.settings.step_lease)
    in_step = False
    if containers is not None:
        with p.reader() as s:  # (outside the catalogue's write turn: every host beats every few seconds)
            in_step = not _out_of_step(s, host=host, containers=containers, listed_at=listed_at or now)

    def beat(s: Session) -> Reconciled:
        s.flush()
        connection = s.connection()
        # A host that comes back up is reconciled in the transaction that brings it up, whatever
        # the read before saw (the watcher may have marked it down and its jobs lost meanwhile).
        returning = in_step and connection.execute(_DOWN, {"w_host": host}).first() is not None
        # One statement for the host: alive, what it holds, and (one that was down) up again.
        connection.execute(_BEAT, {"w_host": host, "last_seen": now, "cpus": cpus, "memory_mb": memory_mb})
        if node is not None:
            connection.execute(_RENEW, {"w_node": node, "w_ids": list(working_on), "lease_until": lease_until})
        if containers is None or (in_step and not returning):
            return Reconciled()  # in step as read just before: this beat only says the host lives
        return reconcile(s, host=host, containers=containers, listed_at=listed_at or now)

    # Shared with what the process writes meanwhile: a simulated fleet's beats go together.
    return p.together.run(beat)


# A heartbeat's statements, built once (their values bound by name): every host sends one every
# few seconds, and building a statement costs more than running it.
_HOST = table(Host)
_BACK = case((_HOST.c.drained.is_(True), cast(literal(HostState.draining), _HOST.c.state.type)),
             else_=cast(literal(HostState.up), _HOST.c.state.type))  # (PostgreSQL: an enum type)
_DOWN = sa_select(_HOST.c.id).where(_HOST.c.name == bindparam("w_host"), _HOST.c.state == HostState.down)
_BEAT = (update(_HOST).where(_HOST.c.name == bindparam("w_host"))
         .values(state=case((_HOST.c.state == HostState.down, _BACK), else_=_HOST.c.state)))
_STEP = table(Step)
# The leases of the steps the node works on, and of its overlap waits.
_RENEW = update(_STEP).where(_STEP.c.node == bindparam("w_node"), _STEP.c.state == StepState.running,
                             or_(_STEP.c.id.in_(bindparam("w_ids", expanding=True)),
                                 _STEP.c.action == StepAction.wait))
_JOB = table(Job)
_RUNNING_OR_LOST = (sa_select(_JOB.c.id, _JOB.c.state, _JOB.c.started_at, _JOB.c.service_id, _JOB.c.kind,
                              _JOB.c.target)
                    .where(_JOB.c.host == bindparam("w_host"), _JOB.c.state.in_((JobState.running, JobState.lost))))


class HeldJob(NamedTuple):
    """What reconciling a host needs of each job it holds (the rows' other columns, such as the
    JSON ones, are neither read nor decoded: every heartbeat of every host runs this)."""

    id: str
    state: JobState
    started_at: datetime | None
    service_id: int
    kind: JobKind
    target: str | None


def reconcile(s: Session, *, host: str, containers: Sequence[Container], listed_at: datetime) -> Reconciled:
    """Bring the catalogue and the host's Docker in step, from what Docker listed at ``listed_at``.

    - A running job whose container vanished or exited outside an operation is failed, and its
      service is marked for healing (``watcher``).
    - A lost job (its host was down) whose container still runs is adopted when its service has
      no operation under way and lacks it (nothing replaced it), or when its service keeps its data
      on this host; otherwise its container is removed. Nothing that should run is removed.
    - Containers of stopped and failed jobs are removed. Containers of jobs this catalogue does
      not know are left alone (another platform may own them).
    """
    present = {c.job_id: c for c in containers}
    remove: list[Container] = []
    failed: list[str] = []
    adopted: list[str] = []
    jobs = _held(s, host)
    others = sorted(set(present) - {j.id for j in jobs})
    ended = _ended(s, host, others)
    remove += [present[job_id] for job_id in others if job_id in ended]
    # The services of the lost jobs it may take back, locked first (PostgreSQL; in one order): a
    # recover that claims one meanwhile waits for this commit and sees the job back, or is seen
    # (each read the other before its commit: the job came back and its replacement was placed).
    back = sorted({job.service_id for job in jobs if job.state == JobState.lost
                   and (container := present.get(job.id)) is not None and container.status == "running"})
    if back:
        s.exec(select(Service.id).where(col(Service.id).in_(back)).order_by(col(Service.id))
               .with_for_update(key_share=True)).all()
    for job in jobs:
        container = present.get(job.id)
        if job.state == JobState.running:
            if _died_outside(job, container, listed_at):
                what = "was removed" if container is None else f"stopped ({container.status})"
                _died(s, job, f"its container {what} outside the platform")
                failed.append(job.id)
                if container is not None:
                    remove.append(container)
        elif job.state == JobState.lost:
            if container is not None and container.status == "running" and _wanted_back(s, job, host):
                catalogue.set_job_state(session=s, job_id=job.id, state=JobState.running)
                adopted.append(job.id)
                continue
            s.exec(update(Job).where(col(Job.id) == job.id, col(Job.state) == JobState.lost)
                   .values(state=JobState.stopped, stopped_at=utcnow()))
            if container is not None:
                remove.append(container)
    return Reconciled(remove, failed, adopted)


def _out_of_step(s: Session, *, host: str, containers: Sequence[Container], listed_at: datetime) -> bool:
    """Whether ``reconcile`` would change anything, as read in ``s``: a running job whose
    container died, a lost job, a container of an ended job. A heartbeat reconciles (in its
    write transaction, where it judges again) only then; a change that lands meanwhile is seen
    by the next heartbeat."""
    present = {c.job_id: c for c in containers}
    jobs = _held(s, host)
    if any(job.state == JobState.lost or _died_outside(job, present.get(job.id), listed_at) for job in jobs):
        return True
    return bool(_ended(s, host, sorted(set(present) - {j.id for j in jobs}), first=True))


def _held(s: Session, host: str) -> list[HeldJob]:
    """The host's running and lost jobs. What reconciling reads grows with what runs and what
    Docker lists, not with the host's history (``_ended``: only the ended jobs whose container
    is still there)."""
    s.flush()
    return [HeldJob(*row) for row in s.connection().execute(_RUNNING_OR_LOST, {"w_host": host})]


def _ended(s: Session, host: str, job_ids: Sequence[str], *, first: bool = False) -> set[str]:
    """Of ``job_ids`` (jobs whose containers Docker lists), those stopped or failed (``first``:
    one at most)."""
    if not job_ids:
        return set()
    query = select(Job.id).where(Job.host == host, col(Job.id).in_(job_ids),
                                 col(Job.state).in_((JobState.stopped, JobState.failed)))
    return set(s.exec(query.limit(1) if first else query))


def _died_outside(job: HeldJob, container: Container | None, listed_at: datetime) -> bool:
    """A running job whose container is gone or dead, in a listing made after it started (one
    started since may not show yet)."""
    if job.state != JobState.running or job.started_at is None or job.started_at >= listed_at:
        return False
    return container is None or container.status in DEAD_CONTAINER_STATES


def _died(s: Session, job: HeldJob, error: str) -> None:
    catalogue.set_job_state(session=s, job_id=job.id, state=JobState.failed, error=error)
    catalogue.want_heal(session=s, service_id=job.service_id)


def _wanted_back(s: Session, job: HeldJob, host: str) -> bool:
    """Whether a lost job whose container runs again should be taken back (its service's row is
    locked: ``reconcile``)."""
    svc = s.exec(select(Service).where(col(Service.id) == job.service_id)
                 .execution_options(populate_existing=True)).first()
    if svc is None:
        return False
    if svc.host == host and service_types.profile(svc.type).data_dir:
        return True  # its data lives here: never removed by reconciliation
    if svc.active_op_id is not None:
        return False  # an operation is placing jobs for it: let it finish
    active = Counter((j.kind, j.target) for j in catalogue.active_jobs(session=s, service=svc))
    if job.kind == JobKind.deploy:
        wanted = svc.scale
    else:
        worker = catalogue.find_worker(session=s, service=svc, name=job.target or "")
        wanted = worker.scale if worker is not None else 0
    return active[(job.kind, job.target)] < wanted


def host_lost(p: Platform, host: str) -> list[int]:
    """The host is down: its jobs are lost; every service left below its scale gets a recover
    operation (trigger host-lost) that starts replacements on the other hosts. Nothing when it
    is not down (any more: the watcher found it down in a read, and it beat since)."""
    with p.session() as s:
        try:
            if catalogue.get_host(session=s, name=host, for_update=True).state != HostState.down:
                return []
        except NotFound:  # removed meanwhile (it had no job left then)
            return []
        jobs = list(s.exec(select(Job).where(Job.host == host,
                                             col(Job.state).in_(ACTIVE_JOB_STATES))))
        moved = [j for j in jobs if s.exec(  # one watcher moves each job, whoever runs this
            update(Job).where(col(Job.id) == j.id, col(Job.state).in_(ACTIVE_JOB_STATES))
            .values(state=JobState.lost, error=f"host {host} went down")).rowcount == 1]
        services = sorted({j.service_id for j in moved})
        for service_id in services:  # if the recover below is cut short, a heal makes up for it
            catalogue.want_heal(session=s, service_id=service_id)
        s.commit()
    fail_steps_on_down_hosts(p)
    return _start_for_each(p, services, OpKind.recover, OpTrigger.host_lost, host)


def fail_steps_on_down_hosts(p: Platform) -> None:
    """A step sent to a host that is down never runs: fail it, naming the host, and let the
    operation finish (its service is then free for the next operation, e.g. a recover)."""
    with p.reader() as s:  # (the fleet watcher asks every pass, in every process: a write turn only for a stuck step)
        if s.exec(_STUCK.limit(1)).first() is None:
            return
    with p.session() as s:
        # The down hosts' rows first, in one order (PostgreSQL): one that beats again meanwhile
        # waits, or is up by the time its steps are read, and its node's steps run on.
        s.exec(select(Host.name).where(Host.state == HostState.down).order_by(col(Host.name))
               .with_for_update()).all()
        failed: set[int] = set()
        for step in s.exec(_STUCK).all():
            if not catalogue.end_step(session=s, step_id=step.id or 0, state=StepState.failed,
                                      before=(StepState.pending, StepState.running),
                                      error=f"host {step.host} is down: the step never ran there"):
                continue
            failed.add(step.op_id)  # (only these operations are finished: a finish ends one as it stands)
            if step.job_id:
                job = s.get(Job, step.job_id)
                if job is not None and job.state in ACTIVE_JOB_STATES:
                    catalogue.set_job_state(session=s, job_id=job.id, state=JobState.lost,
                                            error=f"host {step.host} went down")
        s.commit()
    for op_id in sorted(failed):
        operations.finish(p, op_id)


# The steps of running operations waiting on (or running on) a host that is down.
_STUCK = (select(Step).join(Operation, col(Operation.id) == col(Step.op_id))
          .join(Host, col(Host.name) == col(Step.host))
          .where(col(Operation.state) == OpState.running, col(Host.state) == HostState.down,
                 col(Step.state).in_((StepState.pending, StepState.running)))
          .order_by(col(Step.id)))


def drain(p: Platform, *, host: str) -> list[int]:
    """Stop placing jobs on ``host`` and move every job off it (start elsewhere, then stop)."""
    with p.session() as s:
        catalogue.hold_placement(session=s)  # a plan under way commits first: its jobs are seen
        target = catalogue.get_host(session=s, name=host, for_update=True)
        if target.state == HostState.down:
            raise BadInput(f"host {host} is down: its jobs are recovered elsewhere already")
        target.state = HostState.draining
        target.drained = True
        s.add(target)
        services = sorted({j.service_id for j in s.exec(
            select(Job).where(Job.host == host, col(Job.state).in_(ACTIVE_JOB_STATES)))})
        s.commit()
    return _start_for_each(p, services, OpKind.drain, OpTrigger.drain, host)


def _start_for_each(p: Platform, services: list[int], kind: OpKind, trigger: OpTrigger,
                    host: str) -> list[int]:
    """One operation per service about ``host``, each queued behind what the service runs."""
    ops = []
    for service_id in services:
        with p.session() as s:
            svc = s.get(Service, service_id)
            if svc is None:
                continue
            env = catalogue.get_env_by_id(session=s, env_id=svc.env_id)
            op = catalogue.record_operation(session=s, env=env, service=svc, kind=kind,
                                            trigger=trigger, params=OpParams(host=host))
            s.commit()
        operations.start_next(p, service_id)
        ops.append(op.id or 0)
    return ops


def undrain(p: Platform, *, host: str) -> None:
    with p.session() as s:
        target = catalogue.get_host(session=s, name=host, for_update=True)
        if target.state != HostState.draining:
            raise BadInput(f"host {host} is {target.state}, not draining")
        target.state = HostState.up
        target.drained = False
        s.add(target)
        s.commit()


def remove(p: Platform, *, host: str) -> None:
    """Forget a host; refused while any job is active or stopping on it. Its lost jobs (the
    host went down and they were replaced, or not) are forgotten with it: they become stopped."""
    with p.session() as s:
        catalogue.hold_placement(session=s)  # a plan under way commits first: its jobs are seen
        target = catalogue.get_host(session=s, name=host)
        remaining = s.exec(select(Job).where(
            Job.host == host, col(Job.state).in_((*ACTIVE_JOB_STATES, JobState.stopping)))).all()
        if remaining:
            raise BadInput(f"host {host} still has {len(remaining)} jobs: drain it first")
        s.exec(update(Job).where(col(Job.host) == host, col(Job.state) == JobState.lost)
               .values(state=JobState.stopped, stopped_at=utcnow(), error=f"host {host} was removed"))
        s.delete(target)
        s.commit()
