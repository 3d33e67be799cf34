"""Operations and their steps. The conditional updates (claiming a service, moving a step on)
are single UPDATE ... WHERE statements, so concurrent nodes and CLIs agree on who won."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy import Update, and_, bindparam, case, func, or_, update
from sqlmodel import Session, col, select

from orchestrator.db import table, update_rows
from orchestrator.errors import NotFound
from orchestrator.models import (
    Environment,
    Host,
    Operation,
    OperationPublic,
    OpKind,
    OpParams,
    OpState,
    OpTrigger,
    Service,
    Step,
    StepAction,
    StepPublic,
    StepState,
    utcnow,
)
from orchestrator.rules import MAX_ID

# The tables, for the statements built once below (their values bound by name).
_STEP = table(Step)
_OP = table(Operation)
_HOST = table(Host)


def record_operation(*, session: Session, env: Environment, service: Service, kind: OpKind,
                     trigger: OpTrigger, params: OpParams | None = None) -> Operation:
    op = Operation(kind=kind, env_id=env.id or 0, service_id=service.id or 0, trigger=trigger)
    op.parameters = params or OpParams()
    session.add(op)
    session.flush()
    return op


def claim_next_operation(*, session: Session, service_id: int) -> Operation | None:
    """Make the oldest queued operation of the service (a revert first) its active one, if
    none is active.

    Whoever's UPDATE matches wins; everyone else gets None. Called in the transaction that
    records an operation (its service's row locked first: ``requests._request``) and after
    finishing one, so a queued operation is never left behind. An operation cancelled between
    this read and the claim (on PostgreSQL: committed meanwhile) is not claimed: the service is
    let go again and the next queued one is tried (``cancel`` locks the operation's row, so it
    either commits before the claim's update looks, or sees the claim and abandons it)."""
    passed: list[int] = []
    connection = session.connection()
    while True:
        op = _oldest_queued(session, service_id, passed)
        if op is None:
            return None
        if connection.execute(_CLAIM_SERVICE, {"w_service": service_id, "w_op": op.id}).rowcount != 1:
            return None
        if connection.execute(_MARK_CLAIMED, {"w_op": op.id, "w_now": utcnow()}).rowcount == 1:
            return op
        release_service(session=session, service_id=service_id, op_id=op.id or 0)  # it ended meanwhile
        passed.append(op.id or 0)


def _oldest_queued(session: Session, service_id: int, passed: Sequence[int]) -> Operation | None:
    return session.exec(_OLDEST_QUEUED, params={"w_service": service_id, "w_passed": list(passed)}).first()


# Built once (their values bound by name): every request runs them, in the catalogue's write turn.
_OLDEST_QUEUED = (
    select(Operation)
    .where(col(Operation.service_id) == bindparam("w_service"), col(Operation.state) == OpState.queued,
           col(Operation.id).not_in(bindparam("w_passed", expanding=True)))
    # A revert puts the service back after a failure: it goes before what was asked since.
    .order_by(case((col(Operation.kind) == OpKind.revert, 0), else_=1), col(Operation.id)))
_SERVICE = table(Service)
_CLAIM_SERVICE = (update(_SERVICE).where(_SERVICE.c.id == bindparam("w_service"), _SERVICE.c.active_op_id.is_(None))
                  .values(active_op_id=bindparam("w_op")))
_MARK_CLAIMED = (update(_OP).where(_OP.c.id == bindparam("w_op"), _OP.c.state == OpState.queued)
                 .values(claimed_at=bindparam("w_now")))


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


def begin_operation(*, session: Session, op_id: int) -> bool:
    """Queued -> running, once: False when another process started it already."""
    return session.connection().execute(_BEGIN, {"w_op": op_id, "w_now": utcnow()}).rowcount == 1


def mark_sent(*, session: Session, op_id: int) -> None:
    session.connection().execute(_MARK_SENT, {"w_op": op_id, "w_now": utcnow()})


_BEGIN = (update(_OP).where(_OP.c.id == bindparam("w_op"), _OP.c.state == OpState.queued)
          .values(state=OpState.running, started_at=bindparam("w_now")))
_MARK_SENT = update(_OP).where(_OP.c.id == bindparam("w_op")).values(sent_at=bindparam("w_now"))


def claim_stage(*, session: Session, op_id: int, stage: int) -> bool:
    """Stage ``stage`` of a running operation sent a stage at a time is to be sent by this caller:
    False when the operation ended (or was cancelled), was sent whole, has a failed (or skipped)
    step, as seen by this very statement (on PostgreSQL a failure committed since the caller's
    read counts too), or another caller sent that stage (a redelivered advance, the watcher's)."""
    return session.connection().execute(_CLAIM_STAGE, {"w_op": op_id, "w_stage": stage}).rowcount == 1


_CLAIM_STAGE = (update(_OP).where(
    _OP.c.id == bindparam("w_op"), _OP.c.state == OpState.running, _OP.c.sent_stage >= 0,
    _OP.c.sent_stage < bindparam("w_stage"),
    ~select(_STEP.c.id).where(_STEP.c.op_id == bindparam("w_op"),
                              _STEP.c.state.in_((StepState.failed, StepState.skipped))).exists())
                .values(sent_stage=bindparam("w_stage")))


def failed_steps(*, session: Session, op_id: int) -> list[Step]:
    """The operation's failed steps, first stage first (most often none: read without its others)."""
    return list(session.exec(_FAILED_STEPS, params={"w_op": op_id}))


_FAILED_STEPS = (select(Step).where(col(Step.op_id) == bindparam("w_op"), col(Step.state) == StepState.failed)
                 .order_by(col(Step.stage), col(Step.id)))


def ring_hosts(*, session: Session, hosts: Sequence[str], stale_after: float) -> list[str]:
    """The hosts (of ``hosts``) whose node is to be sent a task that runs its waiting steps,
    marked as sent one (``Host.rung_at``): those with none sent, or with one sent longer than
    ``stale_after`` seconds ago and not taken yet (its message lost, or far behind: one more does
    no harm, it finds nothing to run). Called in the transaction that makes their steps sent, so
    a node that takes its steps in between (``claim_host_steps``) takes these too.

    On PostgreSQL a host's row is locked before it is looked at, so that a node taking its steps
    meanwhile (``claim_host_steps`` locks it first too) is not missed: its "taken, no longer
    rung" is what this sees, not the mark before. A row another transaction holds (a claim, a
    shared transaction's heartbeat) is not waited for (that could deadlock): that host is sent a
    task anyway, unmarked (one more does no harm; none too few). SQLite's writer holds the file."""
    if not hosts:
        return []
    wanted = sorted(set(hosts))
    connection = session.connection()
    locked = {name for (name,) in connection.execute(_LOCK_HOSTS, {"w_names": wanted})}
    now = utcnow()
    rung = connection.execute(_RING_HOSTS, {"w_names": sorted(locked), "rung_at": now,
                                            "w_stale": now - timedelta(seconds=stale_after)})
    return sorted({name for (name,) in rung} | (set(wanted) - locked))


_LOCK_HOSTS = (select(_HOST.c.name).where(_HOST.c.name.in_(bindparam("w_names", expanding=True)))
               .order_by(_HOST.c.name).with_for_update(skip_locked=True))
_RING_HOSTS = (update(_HOST).where(_HOST.c.name.in_(bindparam("w_names", expanding=True)),
                                   or_(_HOST.c.rung_at.is_(None), _HOST.c.rung_at < bindparam("w_stale")))
               .returning(_HOST.c.name))


def unring_hosts(*, session: Session, hosts: Sequence[str]) -> None:
    """Take down the ring of hosts whose task could not be sent (the next sent step rings again)."""
    if hosts:
        session.exec(update(Host).where(col(Host.name).in_(sorted(set(hosts)))).values(rung_at=None)
                     .execution_options(synchronize_session=False))


def ring_late_hosts(*, session: Session, stale_after: float, actions: Sequence[StepAction]) -> list[str]:
    """Hosts rung longer than ``stale_after`` seconds ago whose node took nothing since, and for
    which steps (of ``actions``, of a stage sent) wait: rung again now, to be sent their task
    again (its message was lost, or a send failed part-way). Those stale with nothing waiting
    are no longer rung."""
    now = utcnow()
    # (Rows another transaction holds are left to the next pass: no waiting, no deadlock.)
    stale = sorted(session.exec(select(Host.name).where(col(Host.rung_at) < now - timedelta(seconds=stale_after))
                                .order_by(col(Host.name)).with_for_update(skip_locked=True)))
    if not stale:
        return []
    waiting = (select(Step.host).join(Operation, col(Operation.id) == col(Step.op_id))
               .where(col(Step.state) == StepState.pending, col(Step.action).in_(list(actions)),
                      col(Operation.state) == OpState.running, col(Operation.sent_stage) >= col(Step.stage)))
    rung = session.exec(update(Host).where(col(Host.name).in_(stale), col(Host.name).in_(waiting.scalar_subquery()))
                        .values(rung_at=now).returning(col(Host.name)).execution_options(synchronize_session=False))
    names = sorted(name for (name,) in rung)
    unring_hosts(session=session, hosts=[name for name in stale if name not in names])
    return names


class Claimed(NamedTuple):
    """A step a node took from its box: what the claim itself needs of it (the rows are read
    after the claim's transaction, outside the catalogue's write turn: ``steps_by_id``)."""

    id: int
    action: StepAction
    job_id: str | None


def claim_host_steps(*, session: Session, host: str, node: str, lease: float, actions: Sequence[StepAction],
                     most: int, silent_since: float) -> tuple[list[Claimed], bool]:
    """The steps of ``actions`` waiting for ``host``'s node, begun by ``node`` (running, leased),
    in the order they were planned, ``most`` at most: those of a stage already sent (of a running
    operation sent a stage at a time), and those another process of this host's node began and
    has not renewed the lease of for ``silent_since`` seconds (it stopped: its message comes
    again, or a later one takes them over), and whether more wait. The host's mark of a task
    sent (``ring_hosts``) is taken down with them, or kept when more wait (the caller sends
    another task). The host's row is locked first (PostgreSQL): claims of one host, and a ring,
    go one after the other. Plain SQL built once: every claim holds the catalogue's write turn
    (SQLite's one writer) while it runs."""
    now = utcnow()
    params = {"w_host": host, "w_node": node, "w_node_prefix": _like_escaped(host) + "/", "w_actions": list(actions),
              "w_most": most, "w_now": now, "w_lease_until": now + timedelta(seconds=lease),
              "w_renewed_before": now + timedelta(seconds=lease - silent_since)}  # its lease_until if renewed then
    session.flush()
    connection = session.connection()
    connection.execute(_RING, {"w_host": host, "rung_at": None})
    # ``free`` again on the row itself: on PostgreSQL, a task of this node taking the same rows at
    # once makes this statement wait, then see each row as that one left it (running, this node's).
    taken = sorted(Claimed(*row) for row in connection.execute(_CLAIM, params))
    # More may wait than were taken: ``most`` were, or a row picked changed meanwhile (a cancel).
    more = connection.execute(_SENT_ONE, params).first() is not None
    if more:
        connection.execute(_RING, {"w_host": host, "rung_at": now})
    return taken, more


def steps_by_id(*, session: Session, step_ids: Sequence[int]) -> list[Step]:
    """The steps, in the order of ``step_ids``."""
    if not step_ids:
        return []
    found = {st.id: st for st in session.exec(select(Step).where(col(Step.id).in_(list(step_ids))))}
    return [found[i] for i in step_ids if i in found]


def _like_escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# claim_host_steps' statements, built once (their values bound by name).
_RING = update(_HOST).where(_HOST.c.name == bindparam("w_host"))
# (state IN (...) first: the host's pending and running steps are found by ix_step_host_state, not
# by reading every step its host ever ran.)
_FREE = and_(col(Step.state).in_((StepState.pending, StepState.running)),
             or_(col(Step.state) == StepState.pending,
                 and_(col(Step.state) == StepState.running, col(Step.node) != bindparam("w_node"),
                      col(Step.node).startswith(bindparam("w_node_prefix"), escape="\\"),
                      col(Step.lease_until) < bindparam("w_renewed_before"))))
_SENT = (select(Step.id).join(Operation, col(Operation.id) == col(Step.op_id))
         .where(col(Step.host) == bindparam("w_host"), col(Step.action).in_(bindparam("w_actions", expanding=True)),
                _FREE, col(Operation.state) == OpState.running, col(Operation.sent_stage) >= col(Step.stage))
         .order_by(col(Step.id)))
_SENT_ONE = _SENT.limit(1)
_CLAIM = (update(_STEP).where(_STEP.c.id.in_(_SENT.limit(bindparam("w_most")).scalar_subquery()), _FREE)
          .values(state=StepState.running, started_at=bindparam("w_now"), node=bindparam("w_node"),
                  lease_until=bindparam("w_lease_until"))
          .returning(_STEP.c.id, _STEP.c.action, _STEP.c.job_id))


def stage_left(*, session: Session, op_id: int, stage: int) -> int:
    """Steps of the operation's stage not succeeded yet (as this session sees them)."""
    session.flush()
    return int(session.connection().execute(_STAGE_LEFT, {"w_op": op_id, "w_stage": stage}).scalar_one())


_STAGE_LEFT = select(func.count()).select_from(_STEP).where(
    _STEP.c.op_id == bindparam("w_op"), _STEP.c.stage == bindparam("w_stage"),
    _STEP.c.state != StepState.succeeded)


def operation_version(*, session: Session, op_id: int) -> str:
    """A short mark that changes whenever the operation or one of its steps does: its state,
    and of its steps their number, how far their states moved (pending < running < ended: a step
    only moves forward) and their output's length. One aggregate query (the API's long poll asks
    it every few milliseconds); NotFound when there is no such operation."""
    row = session.connection().execute(_VERSION, {"w_op": op_id}).first() if 0 < op_id <= MAX_ID else None
    if row is None:
        raise NotFound(f"no operation {op_id}")
    return ":".join(str(x) for x in row)


def version_state(version: str) -> str:
    """The operation's state in a mark of ``operation_version`` ("" for none)."""
    return version.split(":", 1)[0]


_VERSION = (
    select(_OP.c.state, func.count(_STEP.c.id),
           func.coalesce(func.sum(case((_STEP.c.state == StepState.pending, 0),
                                       (_STEP.c.state == StepState.running, 1), else_=2)), 0),
           func.coalesce(func.sum(func.coalesce(func.length(_STEP.c.output), 0)
                                  + _STEP.c.output_dropped), 0))
    .select_from(_OP.outerjoin(_STEP, _STEP.c.op_id == _OP.c.id))
    .where(_OP.c.id == bindparam("w_op"))
    .group_by(_OP.c.id, _OP.c.state))


def get_operation(*, session: Session, op_id: int, for_update: bool = False) -> Operation:
    """The operation; with ``for_update``, its row is locked until the transaction ends
    (PostgreSQL; SQLite's writer holds the whole file already), so one process ends it."""
    op = None
    if 0 < op_id <= MAX_ID:
        query = select(Operation).where(Operation.id == op_id)
        op = session.exec(query.with_for_update() if for_update else query).first()
    if op is None:
        raise NotFound(f"no operation {op_id}")
    return op


def list_operations(*, session: Session, env: Environment | None = None,
                    limit: int = 50, offset: int = 0) -> list[Operation]:
    """A page of operations, newest first (of one environment, or all)."""
    query = select(Operation)
    if env is not None:
        query = query.where(Operation.env_id == env.id)
    return list(session.exec(query.order_by(col(Operation.id).desc()).offset(offset).limit(limit)))


def last_stage(*, session: Session, op_id: int) -> int | None:
    """The operation's last stage (None: it has no step)."""
    return session.connection().execute(_LAST_STAGE, {"w_op": op_id}).scalar()


_LAST_STAGE = select(func.max(_STEP.c.stage)).where(_STEP.c.op_id == bindparam("w_op"))


def home_host(*, session: Session, op_id: int) -> str | None:
    """The first host the operation touches (its host-less steps' and its finish's node)."""
    return session.exec(select(Step.host).where(col(Step.op_id) == op_id, col(Step.host).is_not(None))
                        .order_by(col(Step.stage), col(Step.id)).limit(1)).first()


def steps_of(*, session: Session, op_id: int) -> list[Step]:
    query = select(Step).where(Step.op_id == op_id).order_by(col(Step.stage), col(Step.id))
    return list(session.exec(query))


def operation_public(*, session: Session, op: Operation) -> OperationPublic:
    return operations_public(session=session, ops=[op])[0]


def operations_public(*, session: Session, ops: Sequence[Operation]) -> list[OperationPublic]:
    """Operations as the CLI and the API show them, with their steps: three queries (names of
    environments, of services, the steps) whatever their number."""
    if not ops:
        return []
    env_ids = {op.env_id for op in ops}
    service_ids = {op.service_id for op in ops}
    envs = dict(session.exec(select(Environment.id, Environment.name).where(col(Environment.id).in_(env_ids))).all())
    services = dict(session.exec(select(Service.id, Service.name).where(col(Service.id).in_(service_ids))).all())
    steps: dict[int, list[StepPublic]] = {op.id or 0: [] for op in ops}
    query = select(Step).where(col(Step.op_id).in_(list(steps)))
    for step in session.exec(query.order_by(col(Step.op_id), col(Step.stage), col(Step.id))):
        steps[step.op_id].append(StepPublic(job=step.job_id, **step.model_dump()))
    return [OperationPublic(env=envs.get(op.env_id, "?"), service=services.get(op.service_id, "?"),
                            steps=steps[op.id or 0], **op.model_dump(exclude={"env_id", "service_id"}))
            for op in ops]


def begin_step(*, session: Session, step_id: int, node: str, lease: float) -> Step | None:
    """pending -> running on ``node``, leased for ``lease`` seconds (the node's heartbeat renews
    it while the node works on it); None when the step already began (a redelivery)."""
    now = utcnow()
    return _moved_step(session, update(Step).where(col(Step.id) == step_id, col(Step.state) == StepState.pending)
                       .values(state=StepState.running, started_at=now, node=node,
                               lease_until=now + timedelta(seconds=lease)))


def take_over_step(*, session: Session, step_id: int, node: str, lease: float) -> Step | None:
    """A running step carried on by ``node`` (a redelivered message): its lease is now ``node``'s.
    None when the step is not running (it ended, or never began)."""
    return _moved_step(session, update(Step).where(col(Step.id) == step_id, col(Step.state) == StepState.running)
                       .values(node=node, lease_until=utcnow() + timedelta(seconds=lease)))


def _moved_step(session: Session, query: Update) -> Step | None:
    """The step a conditional UPDATE moved, as it is now (one statement: UPDATE ... RETURNING,
    the session's copy refreshed), or None when its condition did not hold."""
    moved = session.exec(query.returning(Step).execution_options(synchronize_session=False,
                                                                  populate_existing=True))
    return moved.scalars().one_or_none()


def end_step(*, session: Session, step_id: int, state: StepState, error: str | None = None,
             node: str | None = None, before: Sequence[StepState] = (StepState.running,),
             lease_ended_by: datetime | None = None) -> bool:
    """End a step that is in one of the ``before`` states (and, with ``node``, run by that node
    process; with ``lease_ended_by``, whose lease ran out by then: a renewal that committed since
    it was read keeps it); False when it was not: another process ended it, or its lease passed
    to another node, or was renewed. Whoever ends a step also moves its job."""
    where: dict[str, object] = {"w_id": step_id, "w_before": list(before)}
    if node is not None:
        where["w_node"] = node
    if lease_ended_by is not None:
        where["w_lease_ended_by"] = lease_ended_by
    statement = _END_STEP_BY[node is not None, lease_ended_by is not None]
    return update_rows(session, statement, where, Step, step_id,
                       {"state": state, "error": error, "finished_at": utcnow()}) == 1


def end_steps(*, session: Session, step_ids: Sequence[int], state: StepState, node: str) -> set[int]:
    """``end_step`` of several running steps of ``node`` in one statement (one state, no error):
    the ids it ended (the others were ended meanwhile by another, or passed to another node)."""
    if not step_ids:
        return set()
    session.flush()
    ended = session.connection().execute(_END_STEPS, {
        "w_ids": list(step_ids), "w_before": [StepState.running], "w_node": node,
        "state": state, "error": None, "finished_at": utcnow()})
    return {step_id for (step_id,) in ended}


_END_STEP = update(_STEP).where(_STEP.c.id == bindparam("w_id"),
                                _STEP.c.state.in_(bindparam("w_before", expanding=True)))
_END_STEP_OF = _END_STEP.where(_STEP.c.node == bindparam("w_node"))
_EXPIRED = _STEP.c.lease_until < bindparam("w_lease_ended_by")
_END_STEP_BY = {(False, False): _END_STEP, (True, False): _END_STEP_OF,  # (by node, by lease)
                (False, True): _END_STEP.where(_EXPIRED), (True, True): _END_STEP_OF.where(_EXPIRED)}
_END_STEPS = (update(_STEP).where(_STEP.c.id.in_(bindparam("w_ids", expanding=True)),
                                  _STEP.c.state.in_(bindparam("w_before", expanding=True)),
                                  _STEP.c.node == bindparam("w_node"))
              .returning(_STEP.c.id))


def skip_pending_steps(*, session: Session, op_id: int) -> None:
    session.exec(
        update(Step).where(col(Step.op_id) == op_id, col(Step.state) == StepState.pending)
        .values(state=StepState.skipped, finished_at=utcnow())
    )
