"""The fleet watcher: control-plane work that judges by the clock. Every heartbeat interval it

- marks hosts whose heartbeats stopped down (their jobs are lost and recovered elsewhere),
- fails steps whose lease ran out (their node died or hangs) and steps on down hosts,
- ends what no process will: an operation claimed or planned but never sent, a step whose
  message never reached its node, a finish that was lost; sends a stage whose advance was lost
  (its message, or the node of the operation's first host); and starts operations left queued,
- heals services whose jobs died outside an operation, with a back-off.

It runs in the control worker and in every node (``workers.node``), so the fleet is watched while
any platform process lives; one pass per heartbeat interval is made for the whole fleet, by the
process whose turn comes first (``run_when_due``: a pass reads every step of every running
operation, and a hundred nodes each passing would read them a hundred times); conditional updates
make each change happen once. A slow or failing
catalogue is not a silent host: after a pass that could not write in time, the watcher judges
nothing by the clock until heartbeats have had ``host_down_after`` seconds to land again.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import case, func, update
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from orchestrator import catalogue, fleet, operations
from orchestrator.db import table
from orchestrator.dispatch import BOXED, SendFailed
from orchestrator.models import (
    ACTIVE_JOB_STATES,
    ENDED_OP_STATES,
    Environment,
    Host,
    HostState,
    Job,
    JobKind,
    JobState,
    Operation,
    OpKind,
    OpState,
    OpTrigger,
    Service,
    ServiceType,
    Step,
    StepAction,
    StepState,
    utcnow,
)
from orchestrator.periodic import Periodic
from orchestrator.platform import Platform
from orchestrator.settings import Settings

log = logging.getLogger(__name__)

SLOW_WRITE = 1.0  # seconds to get the catalogue's write lock that mean "the catalogue stalls"
MAX_HEAL_ATTEMPTS = 5  # heals in a row before the platform gives up on a service
LOST_ADVANCE_AFTER = 5.0  # seconds a stage ended with the next one unsent: its advance was lost
# A process's turn to pass for the fleet comes this share of a heartbeat interval after the last
# pass began (under 1: the process that passed last passes again, its ticks an interval apart).
PASS_TURN = 0.8
PROCESS = f"{socket.gethostname()}:{os.getpid()}"


class Stalled(Exception):
    """The catalogue was too slow to judge by the clock (its writers waited)."""


class Watcher:
    def __init__(self, p: Platform) -> None:
        self.p = p
        self.trust_after = 0.0
        self.distrust()  # a watcher that just started has seen no heartbeat yet

    def periodic(self) -> Periodic:
        return Periodic("fleet-watch", self.p.settings.heartbeat_interval, self.run_when_due)

    def run_when_due(self) -> bool:
        """The fleet's pass, if no process began one within (most of) the heartbeat interval;
        whether this one passed. A watcher that does not trust the clock yet (just started, or
        after a stalled catalogue) passes on its own, judging nothing by the clock, and leaves
        the fleet's turn to the others. Looking for the turn is a pass's first touch of the
        catalogue: if it fails, or its claim waited long for the write turn (heartbeats waited as
        long), this watcher distrusts the clock as a pass would."""
        began = time.monotonic()
        if began >= self.trust_after:
            try:
                mine = self._fleet_turn()
            except Exception:
                self.distrust()
                raise
            if time.monotonic() - began > SLOW_WRITE:
                self.distrust()
            elif not mine:
                return False
        self.run_once()
        return True

    def _fleet_turn(self) -> bool:
        every = PASS_TURN * self.p.settings.heartbeat_interval
        with self.p.reader() as s:  # (a read: the write turn only for the process that claims)
            if catalogue.watch_passed_since(session=s, seconds=every):
                return False
        try:
            with self.p.session() as s:
                mine = catalogue.claim_watch_pass(session=s, by=PROCESS, every=every)
                s.commit()
        except IntegrityError:  # another made the first pass's row at the same time
            return False
        return mine

    def distrust(self) -> None:
        self.trust_after = time.monotonic() + self.p.settings.host_down_after

    def run_once(self) -> None:
        started = time.monotonic()
        try:
            if started >= self.trust_after:
                self.judge(started)
            recover_down_hosts(self.p)
            fleet.fail_steps_on_down_hosts(self.p)
            start_stranded(self.p)
            ring_late(self.p)
            heal(self.p)
            purge_removed(self.p)
        except Exception:
            self.distrust()
            raise
        if time.monotonic() - started > max(self.p.settings.heartbeat_interval, SLOW_WRITE):
            self.distrust()

    def judge(self, started: float) -> None:
        """What is decided by elapsed time: silent hosts, ran-out leases, orphans."""
        try:
            writes_flow(self.p, started)
            silent_hosts(self.p, started)
            expire_leases(self.p, started)
            end_orphans(self.p, started)
        except Stalled:
            log.warning("the catalogue is slow: hosts and leases are not judged for %gs",
                        self.p.settings.host_down_after)
            self.distrust()


def _write_lock(s: Session, pass_started: float) -> datetime:
    """Begin the write transaction; the time then. Raises Stalled if the pass has taken long to
    get here: its writes waited (SQLite: BEGIN IMMEDIATE waits for the writer lock) or its reads
    did (PostgreSQL: a lock on a table), so heartbeats may have waited as long."""
    s.connection()
    if time.monotonic() - pass_started > SLOW_WRITE:
        raise Stalled()
    return utcnow()


def writes_flow(p: Platform, pass_started: float) -> None:
    """A write turn taken and let go at once: Stalled if it took long to come (heartbeats and
    lease renewals waited as long). Judging looks in reads first and may find nothing to write:
    this is how every pass still sees a catalogue that stalls, before it judges by the clock."""
    with p.session() as s:
        _write_lock(s, pass_started)
        s.commit()


def silent_hosts(p: Platform, pass_started: float) -> list[str]:
    """Mark down the hosts whose last heartbeat is older than ``host_down_after``; returns them
    (``recover_down_hosts`` then recovers their jobs)."""
    # Only the hosts silent as read now are looked at again, each in a write transaction of its
    # own (its verdict made on what the writer sees, heartbeats that waited included): a pass
    # over a fleet that beats takes no write turn at all (it took one per host).
    seen_before = utcnow() - timedelta(seconds=p.settings.host_down_after)
    with p.reader() as s:
        candidates = [h.name for h in catalogue.list_hosts(session=s)
                      if h.state != HostState.down and h.last_seen is not None and h.last_seen < seen_before]
    marked = []
    for name in candidates:
        with p.session() as s:
            cutoff = _write_lock(s, pass_started) - timedelta(seconds=p.settings.host_down_after)
            won = s.exec(update(Host).where(col(Host.name) == name, col(Host.state) != HostState.down,
                                            col(Host.last_seen) < cutoff)
                         .values(state=HostState.down)).rowcount == 1
            s.commit()
        if won:
            log.warning("host %s is down: no heartbeat for %gs", name, p.settings.host_down_after)
            marked.append(name)
    return marked


def ring_late(p: Platform) -> None:
    """Send again the task of each host rung ``orphan_after`` seconds ago whose node took nothing
    since, while steps wait for it: that task's message was lost (with a node that died holding
    it, a process that died between ringing and sending, a send that failed part-way)."""
    late = p.settings.orphan_after
    cutoff = utcnow() - timedelta(seconds=late)
    with p.reader() as s:
        if s.exec(select(Host.id).where(col(Host.rung_at) < cutoff)).first() is None:
            return
    with p.session() as s:
        hosts = catalogue.ring_late_hosts(session=s, stale_after=late, actions=sorted(BOXED))
        s.commit()
    if not hosts:
        return
    log.warning("hosts %s: no step taken %gs after their node was sent a task for them: sending it again",
                ", ".join(hosts), late)
    try:
        p.dispatch.send_host_steps(hosts)
    except SendFailed as exc:
        log.warning("hosts %s: could not send their task again (%s)", ", ".join(hosts), exc)


def recover_down_hosts(p: Platform) -> None:
    """Every down host that still has active jobs: they are lost, and recovered elsewhere. A
    state, not a moment: a pass that marked a host down and stopped before this is made up for."""
    with p.reader() as s:
        down = {h.name for h in catalogue.list_hosts(session=s) if h.state == HostState.down}
        hosts = sorted({j.host for j in s.exec(select(Job).where(col(Job.host).in_(down),
                                                                 col(Job.state).in_(ACTIVE_JOB_STATES)))})
    for host in hosts:
        fleet.host_lost(p, host)


def expire_leases(p: Platform, pass_started: float) -> list[int]:
    """Fail running steps whose lease ran out and end their operations; returns the steps failed."""
    with p.reader() as s:  # (a write turn only when one is seen: every process watches, every pass)
        if s.exec(select(Step.id).where(Step.state == StepState.running,
                                        col(Step.lease_until) < utcnow())).first() is None:
            return []
    with p.session() as s:
        now = _write_lock(s, pass_started)
        seen = list(s.exec(select(Step).where(Step.state == StepState.running, col(Step.lease_until) < now)))
        expired = []
        for step in seen:
            error = (f"the node running it ({step.node}) stopped answering (its lease ran out)")
            if not catalogue.end_step(session=s, step_id=step.id or 0, state=StepState.failed,
                                      error=error, node=step.node, lease_ended_by=now):
                continue  # it ended, another node took it over, or its node renewed it, meanwhile
            expired.append(step)  # (only these end their operations: a finish ends one as it stands)
            _heal_later(s, step.op_id)
            if step.job_id and step.action in (StepAction.start, StepAction.stop):
                catalogue.set_job_state(session=s, job_id=step.job_id, state=JobState.failed, error=error)
        s.commit()
    for op_id in sorted({st.op_id for st in expired}):
        operations.finish(p, op_id)
    return [st.id or 0 for st in expired]


def end_orphans(p: Platform, pass_started: float) -> None:
    """End or resume the operations no process will carry on. They are looked for in a read,
    and only what is found takes a write turn, to be looked for again and judged under the lock
    (every process watches, every pass: the steps of every running operation were read under
    the write lock, 43 ms of it at 20 operations of 50 jobs)."""
    with p.reader() as s:
        seen = _orphans(s, utcnow(), p.settings)
    if seen:
        _end_orphans(p, pass_started)
    finish_forgotten(p)


@dataclass(frozen=True)
class Orphans:
    unsent: list[Operation]  # started, never sent: the process that started it stopped
    claimed: list[Operation]  # claimed, never started: likewise
    lost_steps: list[PendingStep]  # sent, never picked up: their message was lost
    late_stages: list[tuple[int, int, str, str]]  # (operation, stage, env, service): their advance was lost

    def __bool__(self) -> bool:
        return bool(self.unsent or self.claimed or self.lost_steps or self.late_stages)


def _orphans(s: Session, now: datetime, settings: Settings) -> Orphans:
    cutoff = now - timedelta(seconds=settings.orphan_after)
    unsent = list(s.exec(select(Operation).where(
        Operation.state == OpState.running, col(Operation.sent_at).is_(None), col(Operation.started_at) < cutoff)))
    claimed = list(s.exec(select(Operation).join(Service, col(Service.active_op_id) == col(Operation.id))
                          .where(Operation.state == OpState.queued, col(Operation.claimed_at) < cutoff)))
    lost_steps, late_stages = _never_picked_up(s, now - timedelta(seconds=settings.pickup_timeout),
                                               now - timedelta(seconds=LOST_ADVANCE_AFTER))
    return Orphans(unsent, claimed, lost_steps, late_stages)


def _end_orphans(p: Platform, pass_started: float) -> None:
    settings = p.settings
    failed: set[int] = set()  # the operations of the steps failed here (one picked up meanwhile: not)
    with p.session() as s:
        found = _orphans(s, _write_lock(s, pass_started), settings)
        for step in found.lost_steps:
            if catalogue.end_step(session=s, step_id=step.id or 0, state=StepState.failed,
                                  before=(StepState.pending,),
                                  error=f"never picked up by the node of host {step.host} within "
                                        f"{settings.pickup_timeout:g}s: its message was lost"):
                failed.add(step.op_id)
                _heal_later(s, step.op_id)
                if step.action in (StepAction.start, StepAction.start_proxy) and step.job_id:
                    catalogue.set_job_state(session=s, job_id=step.job_id, state=JobState.failed,
                                            error="never started: its step's message was lost")
        s.commit()
    for op in found.unsent:
        operations.abandon(p, op.id or 0, "interrupted before its steps reached the broker (the process "
                                          "that started it stopped)", heal=True, unless_sent=True)
    for op in found.claimed:
        operations.start_claimed(p, op)
    for op_id in sorted(failed):  # (a finish ends an operation as its steps stand)
        operations.finish(p, op_id)
    for op_id, stage, env, service in found.late_stages:
        log.warning("operation %s: no advance sent stage %s (lost with its message or its node): "
                    "sending it now", op_id, stage)
        operations.advance(p, op_id, stage, env=env, service=service)


def _heal_later(s: Session, op_id: int) -> None:
    """An operation that a fault ended half-way may leave its service below scale: heal it."""
    op = s.get(Operation, op_id)
    if op is not None:
        catalogue.want_heal(session=s, service_id=op.service_id)


class PendingStep(NamedTuple):
    """What the watcher needs of a step of a running operation (columns, not row objects: it
    reads every step of every running operation, every pass, in every process)."""

    id: int
    op_id: int
    stage: int
    state: StepState
    finished_at: datetime | None
    host: str | None
    action: StepAction
    job_id: str | None


_STEP = table(Step)
_OP = table(Operation)
_RUNNING_STEPS = (
    sa_select(_STEP.c.id, _STEP.c.op_id, _STEP.c.stage, _STEP.c.state, _STEP.c.finished_at, _STEP.c.host,
              _STEP.c.action, _STEP.c.job_id, _OP.c.sent_at, _OP.c.sent_stage, _OP.c.env_id, _OP.c.service_id)
    .select_from(_STEP.join(_OP, _OP.c.id == _STEP.c.op_id))
    .where(_OP.c.state == OpState.running, _OP.c.sent_at.is_not(None))
    .order_by(_STEP.c.op_id, _STEP.c.id))


def _never_picked_up(s: Session, cutoff: datetime,
                     advance_cutoff: datetime) -> tuple[list[PendingStep], list[tuple[int, int, str, str]]]:
    """Pending steps of running operations whose turn came before ``cutoff``: their stage was
    sent (the first, or the next by its advance once the stage before it ended) and no node began
    them since; and the stages whose turn came before ``advance_cutoff`` that no advance sent
    (its message or its node was lost): (operation, stage, environment, service) to send now."""
    found: list[PendingStep] = []
    unsent: list[tuple[int, int, str, str]] = []
    s.flush()
    by_op: dict[int, list[Any]] = {}
    for row in s.connection().execute(_RUNNING_STEPS):
        by_op.setdefault(row.op_id, []).append(row)
    for op_id, rows in by_op.items():
        steps = [PendingStep(*(getattr(row, name) for name in PendingStep._fields)) for row in rows]
        op = rows[0]  # (every row has its operation's columns too)
        ending = any(st.state == StepState.failed for st in steps)  # no stage is sent after a failed step
        turn_came = op.sent_at
        for stage in sorted({st.stage for st in steps}):
            mine = [st for st in steps if st.stage == stage]
            if any(st.state == StepState.pending for st in mine):
                if turn_came is None:
                    break
                if 0 <= op.sent_stage < stage:  # not sent yet: its advance is late, or lost
                    if turn_came < advance_cutoff and not ending:
                        env, svc = s.get(Environment, op.env_id), s.get(Service, op.service_id)
                        unsent.append((op_id, stage, env.name if env else "", svc.name if svc else ""))
                elif turn_came < cutoff:
                    found += [st for st in mine if st.state == StepState.pending]
                break
            if any(st.state != StepState.succeeded for st in mine):
                break
            ends = [st.finished_at for st in mine if st.finished_at is not None]
            turn_came = max(ends) if ends else None
    return found, unsent


def finish_forgotten(p: Platform, *, grace: float = 10.0) -> None:
    """Finish what no task will: an operation still running whose steps have all ended lost its
    finish task (e.g. queued on a host that died just after); one with a failed step may wait on
    a stage that never completes (a step on a down host). ``finish`` ends each once, when it can."""
    cutoff = utcnow() - timedelta(seconds=grace)
    with p.reader() as s:  # one aggregate over the running operations' steps
        forgotten = [op_id for op_id, steps, ended, last_end, failed in s.connection().execute(_STEPS_ENDED)
                     if failed or (ended == steps and last_end is not None and last_end < cutoff)]
    for op_id in forgotten:
        operations.finish(p, op_id)


_STEPS_ENDED = (
    sa_select(_STEP.c.op_id, func.count(), func.count(_STEP.c.finished_at), func.max(_STEP.c.finished_at),
              func.sum(case((_STEP.c.state == StepState.failed, 1), else_=0)))
    .select_from(_STEP.join(_OP, _OP.c.id == _STEP.c.op_id))
    .where(_OP.c.state == OpState.running)
    .group_by(_STEP.c.op_id))


def purge_removed(p: Platform) -> None:
    """Rows of services and environments removed longer ago than ``removed_grace`` go."""
    before = utcnow() - timedelta(seconds=p.settings.removed_grace)
    with p.reader() as s:
        due = s.exec(select(Service.id).where(col(Service.removed_at).is_not(None),
                                              col(Service.removed_at) < before)).first()
        due = due or s.exec(select(Environment.id).where(col(Environment.removed_at).is_not(None),
                                                         col(Environment.removed_at) < before)).first()
    if due is None:  # the common case: nothing to write
        return
    with p.session() as s:
        purged = catalogue.purge_removed(session=s, before=before)
        s.commit()
    if purged:
        log.info("removed long enough ago, their rows deleted: %s", ", ".join(purged))


def start_stranded(p: Platform) -> None:
    """Start queued operations nobody started (their requester stopped between recording and
    starting them), and free services held by an operation that has ended."""
    with p.reader() as s:
        queued = set(s.exec(select(Operation.service_id).where(Operation.state == OpState.queued)))
        services = list(s.exec(select(Service).where(col(Service.id).in_(queued))))
        held = list(s.exec(select(Service, Operation).join(Operation, col(Service.active_op_id) == col(Operation.id))
                           .where(col(Operation.state).in_(ENDED_OP_STATES))))
    for svc, op in held:
        with p.session() as s:
            catalogue.release_service(session=s, service_id=svc.id or 0, op_id=op.id or 0)
            s.commit()
        operations.start_next(p, svc.id or 0)
    for svc in services:
        if svc.active_op_id is None:
            operations.start_next(p, svc.id or 0)


def _below_scale(s: Session, svc: Service) -> bool:
    """Fewer active deploy jobs than its scale, or fewer of a worker target than the target's."""
    active = Counter((j.kind, j.target) for j in catalogue.active_jobs(session=s, service=svc))
    if active[(JobKind.deploy, None)] < svc.scale:
        return True
    return any(active[(JobKind.worker, w.name)] < w.scale for w in catalogue.workers_of(session=s, service=svc))


def heal(p: Platform) -> list[int]:
    """A heal operation for each service whose jobs died outside an operation, once its back-off
    has passed; after MAX_HEAL_ATTEMPTS in a row, the service is left as it is (``heal_gave_up``)
    until a user's operation succeeds. Returns the operations started."""
    now = utcnow()
    started = []
    with p.reader() as s:
        wanted = [svc.id or 0 for svc in s.exec(select(Service).where(
            col(Service.heal_wanted).is_(True), col(Service.heal_gave_up).is_(False),
            col(Service.active_op_id).is_(None)))
            if svc.heal_after is None or svc.heal_after <= now]
    for service_id in wanted:
        with p.session() as s:
            claimed = s.exec(update(Service).where(  # one watcher heals it
                col(Service.id) == service_id, col(Service.heal_wanted).is_(True),
                col(Service.active_op_id).is_(None)).values(heal_wanted=False)).rowcount == 1
            svc = s.get(Service, service_id)
            if not claimed or svc is None or not _below_scale(s, svc):
                s.commit()  # at its scale after all (a recover made up for it): nothing to heal
                continue
            if svc.heal_attempts >= MAX_HEAL_ATTEMPTS or (svc.type == ServiceType.code and svc.image is None):
                svc.heal_gave_up = svc.heal_attempts >= MAX_HEAL_ATTEMPTS
                s.add(svc)
                s.commit()
                continue
            svc.heal_attempts += 1
            svc.heal_after = now + timedelta(seconds=p.settings.heal_backoff * 2 ** svc.heal_attempts)
            env = catalogue.get_env_by_id(session=s, env_id=svc.env_id)
            op = catalogue.record_operation(session=s, env=env, service=svc, kind=OpKind.recover,
                                            trigger=OpTrigger.heal)
            s.add(svc)
            s.commit()
        log.warning("service %s: jobs died outside an operation; heal operation %s (attempt %s)",
                    svc.name, op.id, svc.heal_attempts)
        operations.start_next(p, service_id)
        started.append(op.id or 0)
    return started

