"""The fleet of Docker hosts: heartbeats, going down and coming back, draining, removing.

Each node records its own host's heartbeat (``heartbeat``, ``vanished``, ``leftovers``). The
fleet watcher (``watcher``: ``watch`` every heartbeat interval) is control-plane work; it runs
in the control worker and in every node, so hosts are watched while any platform process
lives, and its conditional updates make sure each change happens once.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import update
from sqlmodel import col, select

from orchestrator import catalogue, operations
from orchestrator.errors import BadInput
from orchestrator.models import (
    ACTIVE_JOB_STATES,
    Host,
    HostState,
    Job,
    JobState,
    Operation,
    OpKind,
    OpParams,
    OpState,
    OpTrigger,
    Service,
    Step,
    StepState,
    utcnow,
)
from orchestrator.periodic import Periodic
from orchestrator.platform import Platform


def heartbeat(p: Platform, *, host: str, cpus: float, memory_mb: int) -> None:
    """The node of ``host`` is alive: record when, and what the host can hold. A host that was
    down is up again (a draining one stays draining)."""
    with p.session() as s:
        s.exec(update(Host).where(col(Host.name) == host)
               .values(last_seen=utcnow(), cpus=cpus, memory_mb=memory_mb))
        s.exec(update(Host).where(col(Host.name) == host, col(Host.state) == HostState.down)
               .values(state=HostState.up))
        s.commit()


def leftovers(p: Platform, *, host: str, job_ids: list[str]) -> list[str]:
    """Of the jobs whose containers run on ``host``, those the catalogue no longer wants there
    (lost and replaced, stopped, failed): the node removes their containers. Containers of jobs
    this catalogue does not know are left alone (another platform may own them)."""
    if not job_ids:
        return []
    gone = (JobState.lost, JobState.stopped, JobState.failed)
    with p.session() as s:
        jobs = s.exec(select(Job).where(col(Job.id).in_(job_ids), col(Job.state).in_(gone)))
        return [j.id for j in jobs if j.host == host]


def vanished(p: Platform, *, host: str, present: set[str], listed_at: datetime) -> list[str]:
    """Running jobs of ``host`` whose containers were not among those listed at ``listed_at``
    (removed outside the platform) are failed, so the catalogue stays true and their room is
    free again. Only jobs running since before the listing count: a newer one may not show yet."""
    with p.session() as s:
        running = s.exec(select(Job).where(Job.host == host, Job.state == JobState.running))
        gone = [j.id for j in running
                if j.id not in present and j.started_at is not None and j.started_at < listed_at]
        for job_id in gone:
            catalogue.set_job_state(session=s, job_id=job_id, state=JobState.failed,
                                    error="its container was removed outside the platform")
        s.commit()
    return gone


def forget_lost(p: Platform, *, job_ids: list[str]) -> None:
    """Lost jobs whose containers were removed on the host's return are now stopped."""
    with p.session() as s:
        for job_id in job_ids:
            s.exec(update(Job).where(col(Job.id) == job_id, col(Job.state) == JobState.lost)
                   .values(state=JobState.stopped, stopped_at=utcnow()))
        s.commit()


def watcher(p: Platform) -> Periodic:
    """The fleet watcher: ``watch`` every heartbeat interval, in a thread of its own."""
    down_after = p.settings.host_down_after
    return Periodic("fleet-watch", p.settings.heartbeat_interval,
                    lambda: watch(p, down_after=down_after))


def watch(p: Platform, *, down_after: float) -> list[str]:
    """Mark silent hosts down and act on it; unstick operations waiting on down hosts.
    Returns the hosts this call marked down."""
    cutoff = utcnow() - timedelta(seconds=down_after)
    with p.session() as s:
        silent = [h.name for h in catalogue.list_hosts(session=s)
                  if h.state != HostState.down and h.last_seen is not None and h.last_seen < cutoff]
    marked = []
    for name in silent:
        with p.session() as s:
            won = s.exec(update(Host).where(col(Host.name) == name,
                                            col(Host.state) != HostState.down,
                                            col(Host.last_seen) < cutoff)
                         .values(state=HostState.down)).rowcount == 1
            s.commit()
        if won:
            marked.append(name)
            host_lost(p, name)
    fail_steps_on_down_hosts(p)
    finish_forgotten(p)
    return marked


def finish_forgotten(p: Platform, *, grace: float = 10.0) -> None:
    """Finish what no task will: an operation still running whose steps have all ended lost its
    finish task (e.g. queued on a host that died just after); one with a failed step may wait on
    a stage that never completes (a step on a down host). ``finish`` ends each once, when it can."""
    cutoff = utcnow() - timedelta(seconds=grace)
    with p.session() as s:
        running = list(s.exec(select(Operation).where(Operation.state == OpState.running)))
        forgotten = []
        for op in running:
            steps = catalogue.steps_of(session=s, op_id=op.id or 0)
            ends = [st.finished_at for st in steps if st.finished_at is not None]
            has_failed = any(st.state == StepState.failed for st in steps)
            if steps and (has_failed or (len(ends) == len(steps) and max(ends) < cutoff)):
                forgotten.append(op.id or 0)
    for op_id in forgotten:
        operations.finish(p, op_id)


def host_lost(p: Platform, host: str) -> list[int]:
    """The host is down: its jobs are lost; every service left below its scale gets a recover
    operation (trigger host-lost) that starts replacements on the other hosts."""
    with p.session() as s:
        jobs = list(s.exec(select(Job).where(Job.host == host,
                                             col(Job.state).in_(ACTIVE_JOB_STATES))))
        services = sorted({j.service_id for j in jobs})
        for job in jobs:
            catalogue.set_job_state(session=s, job_id=job.id, state=JobState.lost,
                                    error=f"host {host} went down")
        s.commit()
    fail_steps_on_down_hosts(p)
    return _start_for_each(p, services, OpKind.recover, OpTrigger.host_lost, host)


def fail_steps_on_down_hosts(p: Platform) -> None:
    """A step sent to a host that is down never runs: fail it, naming the host, and let the
    operation finish (its service is then free for the next operation, e.g. a recover)."""
    with p.session() as s:
        down = {h.name for h in catalogue.list_hosts(session=s) if h.state == HostState.down}
        if not down:
            return
        stuck = list(s.exec(
            select(Step).join(Operation, col(Operation.id) == col(Step.op_id))
            .where(col(Operation.state) == OpState.running, col(Step.host).in_(down),
                   col(Step.state).in_((StepState.pending, StepState.running)))
        ))
        for step in stuck:
            catalogue.end_step(session=s, step_id=step.id or 0, state=StepState.failed,
                               error=f"host {step.host} is down: the step never ran there")
            if step.job_id:
                job = s.get(Job, step.job_id)
                if job is not None and job.state in ACTIVE_JOB_STATES:
                    catalogue.set_job_state(session=s, job_id=job.id, state=JobState.lost,
                                            error=f"host {step.host} went down")
        op_ids = sorted({st.op_id for st in stuck})
        s.commit()
    for op_id in op_ids:
        operations.finish(p, op_id)


def drain(p: Platform, *, host: str) -> list[int]:
    """Stop placing jobs on ``host`` and move every job off it (start elsewhere, then stop)."""
    with p.session() as s:
        target = catalogue.get_host(session=s, name=host)
        if target.state == HostState.down:
            raise BadInput(f"host {host} is down: its jobs are recovered elsewhere already")
        target.state = HostState.draining
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
        target = catalogue.get_host(session=s, name=host)
        if target.state != HostState.draining:
            raise BadInput(f"host {host} is {target.state}, not draining")
        target.state = HostState.up
        s.add(target)
        s.commit()


def remove(p: Platform, *, host: str) -> None:
    """Forget a host; refused while any job is active (or lost and not yet cleaned) on it."""
    with p.session() as s:
        target = catalogue.get_host(session=s, name=host)
        remaining = s.exec(select(Job).where(
            Job.host == host, col(Job.state).in_((*ACTIVE_JOB_STATES, JobState.stopping)))).all()
        if remaining:
            raise BadInput(f"host {host} still has {len(remaining)} jobs: drain it first")
        s.delete(target)
        s.commit()


