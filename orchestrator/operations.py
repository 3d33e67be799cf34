"""Operations from claim to end: claim the service, apply the spec changes, plan, record, send
the first stage; advance, stage after stage; and, when the steps are done, finish: end the
operation, free the service, start the next.

Requests (``orchestrator.requests``) record operations, claim the free service in the same
transaction and call ``start_claimed`` (or ``start_next``); the finish task
(``orchestrator.control``) and the fleet watcher call ``finish``, which starts the next.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col, select

from orchestrator import builds, catalogue, planner, rules, spec
from orchestrator.db import insert_rows
from orchestrator.dispatch import SendFailed, boxed_hosts
from orchestrator.errors import BadInput
from orchestrator.models import (
    ACTIVE_JOB_STATES,
    Environment,
    Job,
    JobKind,
    JobState,
    Operation,
    OpKind,
    OpParams,
    OpState,
    OpTrigger,
    ReleaseBefore,
    ReleaseState,
    RouteState,
    Service,
    ServiceType,
    Step,
    StepAction,
    StepState,
    WorkerBefore,
    WorkerTarget,
    utcnow,
)
from orchestrator.placement import HostLoad
from orchestrator.platform import Platform
from orchestrator.service_types import profile

log = logging.getLogger(__name__)

# --- start: claim, change the spec, plan, record, send ---------------------------------------------


def start_next(p: Platform, service_id: int) -> None:
    """Start queued operations of the service while it has none running (one at a time)."""
    while True:
        with p.session() as s:
            op = catalogue.claim_next_operation(session=s, service_id=service_id)
            s.commit()
        if op is None:
            return
        if _start(p, op):
            return


def _start(p: Platform, op: Operation) -> bool:
    """Plan and send a claimed operation. False when it ended at once (nothing to do, or it
    could not be planned or sent), so the caller moves on to the next queued one."""
    op_id = op.id or 0
    try:
        with p.session() as s:
            # The placement turn (PostgreSQL) is this transaction's first lock: a drain, a host's
            # removal and a node's move of a port take it first too, and then rows this one would
            # hold (the operation's, the service's) while waiting for it.
            catalogue.hold_placement(session=s)
            if not catalogue.begin_operation(session=s, op_id=op_id):
                return True  # another process started it (the watcher resumed a slow claim)
            svc = s.get(Service, op.service_id)
            env = s.get(Environment, op.env_id)
            running = s.get(Operation, op_id)
            assert svc is not None and env is not None and running is not None
            if svc.removed_at is not None:
                raise BadInput(f"the service was removed (operation {op_id} waited behind its removal)")
            running.parameters = _apply_changes(s, running.parameters, op.kind, svc)
            plan = _plan(p, s, op, svc, env)
            stages = _record_plan(s, op, svc, plan)
            running.sent_stage = 0  # sent a stage at a time, the first now (before its advance can come)
            rung = catalogue.ring_hosts(session=s, hosts=boxed_hosts(stages[0]) if stages else [],
                                        stale_after=p.settings.orphan_after)
            if not stages:
                running.state = OpState.succeeded
                running.finished_at = utcnow()
                catalogue.release_service(session=s, service_id=svc.id or 0, op_id=op_id)
                _end_release(s, op, succeeded=True)
                if op.kind == OpKind.remove:
                    catalogue.mark_service_removed(session=s, service=svc,
                                                   data_deleted=bool(op.parameters.delete_data))
            s.add(running)
            s.commit()
            env_name, svc_name = env.name, svc.name
    except (planner.PlanError, BadInput) as exc:
        _fail_unstarted(p, op, str(exc))
        return False
    if not stages:
        return False
    try:
        p.dispatch.send_stage(op_id, stages, 0, env=env_name, service=svc_name, rung=rung)
    except SendFailed as exc:  # nothing ran: say so and free the service
        _unring(p, rung)
        abandon(p, op_id, f"could not send the operation to the broker: {exc}", start=False)
        return False
    with p.session() as s:
        catalogue.mark_sent(session=s, op_id=op_id)
        s.commit()
    return True


def advance(p: Platform, op_id: int, stage: int, *, env: str, service: str) -> bool | None:
    """Send stage ``stage`` of a running operation once every step before it succeeded: its
    chord calls this back (the advance task), and the fleet watcher does when that callback was
    lost. Each stage is sent once (``catalogue.claim_stage``). False when nothing is to be sent:
    the operation ended or was cancelled, the stage was sent already (a redelivered advance), or
    a step of the operation failed (it is ending: no later stage runs, e.g. no stop of old jobs
    after a failed start). None when a step before it has not ended yet: ask again.

    A broker that cannot be reached leaves the stage claimed and unsent (False): part of it may
    have gone out, and sending it again could run a step twice; the watcher fails its steps as
    never picked up, which ends the operation."""
    # The steps are read before the write transaction (outside the catalogue's write turn): a
    # step seen succeeded stays so, and the claim itself sees any failure or cancel meanwhile.
    with p.reader() as s:
        steps = catalogue.steps_of(session=s, op_id=op_id)
    if not steps or any(st.state in (StepState.failed, StepState.skipped) for st in steps):
        return False
    if any(st.stage < stage and st.state != StepState.succeeded for st in steps):
        return None
    stages = _stages(steps)
    with p.session() as s:
        if not catalogue.claim_stage(session=s, op_id=op_id, stage=stage):
            return False
        rung = catalogue.ring_hosts(session=s, hosts=boxed_hosts(stages[stage]),
                                    stale_after=p.settings.orphan_after)
        s.commit()
    try:
        p.dispatch.send_stage(op_id, stages, stage, env=env, service=service, rung=rung)
    except SendFailed as exc:
        log.warning("operation %s: stage %s could not be sent (%s); its steps will be failed as never "
                    "picked up", op_id, stage, exc)
        _unring(p, rung)
        return False
    return True


def _unring(p: Platform, hosts: Sequence[str]) -> None:
    """Hosts rung for a send that failed: no task is on its way (the next sent step rings them)."""
    if hosts:
        with p.session() as s:
            catalogue.unring_hosts(session=s, hosts=hosts)
            s.commit()


def stage_ended(p: Platform, op_id: int, stage: int) -> None:
    """Stage ``stage`` of the operation succeeded (its last step just ended, as seen by the one
    transaction that ended it: ``catalogue.stage_left``): what follows is done at once, in this
    process: the next stage claimed and sent (``advance``), or after the last the operation
    finished (``finish``). No message to wait for: an advance sent to a node waited 0.7-1.9 s
    behind that node's other tasks at 100 hosts, per stage. A catalogue or broker that fails
    meanwhile is logged by the caller: the fleet watcher sends a stage whose advance never came,
    and finishes an operation whose every step ended."""
    with p.reader() as s:
        op = s.get(Operation, op_id)
        last = catalogue.last_stage(session=s, op_id=op_id)
        if op is None or last is None:
            return
        env, svc = s.get(Environment, op.env_id), s.get(Service, op.service_id)
    env_name, svc_name = env.name if env else "", svc.name if svc else ""
    if stage < last:
        if advance(p, op_id, stage + 1, env=env_name, service=svc_name) is None:
            log.warning("operation %s: stage %s ended but an earlier one has not: the fleet watcher "
                        "sends stage %s", op_id, stage, stage + 1)
    elif finish(p, op_id) is None:  # (steps run still: not after a last stage that succeeded)
        with p.reader() as s:
            home = catalogue.home_host(session=s, op_id=op_id)
        try:  # asked again later by a task on the node of its first host, as after a failed step
            p.dispatch.send_finish(op_id, env=env_name, service=svc_name, host=home)
        except SendFailed as exc:
            log.warning("operation %s: its finish could not be sent (%s); the fleet watcher will", op_id, exc)


def _stages(steps: Sequence[Step]) -> list[list[Step]]:
    """An operation's steps (all of them) by stage."""
    return [[st for st in steps if st.stage == n] for n in range(max(st.stage for st in steps) + 1)]


def start_claimed(p: Platform, op: Operation) -> None:
    """Start an operation already claimed: by the request that recorded it, in the same
    transaction, or by a process that stopped before starting it (the watcher's). If it ended at
    once, the service's next queued ones are started."""
    if not _start(p, op):
        start_next(p, op.service_id)


def _fail_unstarted(p: Platform, op: Operation, error: str) -> None:
    with p.session() as s:
        if catalogue.end_operation(session=s, op_id=op.id or 0, state=OpState.failed, error=error):
            _keep_healing_account(s, op, succeeded=False)
            _end_release(s, op, succeeded=False)
        catalogue.release_service(session=s, service_id=op.service_id, op_id=op.id or 0)
        s.commit()


def abandon(p: Platform, op_id: int, error: str, *, start: bool = True, heal: bool = False,
            state: OpState = OpState.failed, unless_sent: bool = False) -> bool:
    """End an operation whose steps will never all run (never sent, interrupted, cancelled):
    what did not start is skipped, the spec is put back, the service is free. With ``start``,
    the service's next queued operation starts; with ``heal``, the service is healed back to its
    scale afterwards (a fault, not the request, ended it). False when it had ended already, or
    (``unless_sent``: it was found never sent) its first stage was sent since, by a slow process."""
    with p.session() as s:
        op = catalogue.get_operation(session=s, op_id=op_id, for_update=True)
        if op.state not in (OpState.running, OpState.queued) or (unless_sent and op.sent_at is not None):
            return False
        catalogue.skip_pending_steps(session=s, op_id=op_id)
        _forget_unstarted_jobs(s, op_id)
        note = _restore_spec(s, op_id)
        ended = catalogue.end_operation(session=s, op_id=op_id, state=state,
                                        error=f"{error}. {service_summary(s, op.service_id)}{note}")
        if not ended:
            s.rollback()
            return False
        _end_release(s, op, succeeded=False)
        _serve_survivors(s, op.service_id)
        catalogue.release_service(session=s, service_id=op.service_id, op_id=op_id)
        if heal:
            catalogue.want_heal(session=s, service_id=op.service_id)
        s.commit()
    if start:
        start_next(p, op.service_id)
    return True


def cancel(p: Platform, op_id: int) -> Operation:
    """End a queued or running operation at the next step boundary: steps that run finish,
    the others never start (their tasks find them skipped), the spec is put back and the
    service's next operation starts. The next redeploy or scale brings the service back to
    exactly its scale."""
    with p.session() as s:
        op = catalogue.get_operation(session=s, op_id=op_id, for_update=True)
        if op.state not in (OpState.queued, OpState.running):
            raise BadInput(f"operation {op_id} has ended already ({op.state})")
        claimed = op.state == OpState.running or op.claimed_at is not None
        if not claimed:  # queued, never started: nothing ran, nothing to put back
            catalogue.skip_pending_steps(session=s, op_id=op_id)
            catalogue.end_operation(session=s, op_id=op_id, state=OpState.cancelled, error="cancelled")
            _end_release(s, op, succeeded=False)
            s.commit()
    if claimed:
        abandon(p, op_id, "cancelled", state=OpState.cancelled)
    with p.reader() as s:
        skipped = [st.id or 0 for st in catalogue.steps_of(session=s, op_id=op_id) if st.state == StepState.skipped]
        ended = catalogue.get_operation(session=s, op_id=op_id)
    p.dispatch.revoke(skipped)  # their tasks are dropped (and would find them skipped anyway)
    return ended


def _apply_changes(s: Session, params: OpParams, kind: OpKind, svc: Service) -> OpParams:
    """Spec changes the operation carries take effect when it starts. Returns its parameters
    with what they replaced, so a failure can put it back (``_restore_spec``)."""
    if params.release is not None:
        params = params.model_copy(update={"release_before": ReleaseBefore(release=svc.release,
                                                                           image=svc.image)})
        svc.release, svc.image = params.release, params.image
    scale = params.scale
    if kind == OpKind.scale and scale is not None:
        params = params.model_copy(update={"scale_before": svc.scale})
        svc.scale = scale
    if kind in (OpKind.worker_deploy, OpKind.worker_scale, OpKind.worker_rm):
        params = params.model_copy(update={"worker_before": _change_worker(s, params, kind, svc)})
    s.add(svc)
    s.flush()
    return params


def _change_worker(s: Session, params: OpParams, kind: OpKind, svc: Service) -> WorkerBefore:
    """Make, change or remove the operation's worker target; returns what it was."""
    target = params.target or ""
    worker = catalogue.find_worker(session=s, service=svc, name=target)
    if worker is None:
        if kind != OpKind.worker_deploy:
            raise BadInput(f"service {svc.name} has no worker target {target}")
        before = WorkerBefore(existed=False)
        worker = WorkerTarget(service_id=svc.id or 0, name=target, command="", scale=1)
    else:
        before = WorkerBefore(command=worker.command, scale=worker.scale)
    if kind == OpKind.worker_rm:
        s.delete(worker)  # from now on redeploys leave this target out
        return before
    if kind == OpKind.worker_deploy:
        worker.command = params.command or ""
    elif params.worker_scale is not None:
        # Checked when asked, and again now: queued relative changes add up.
        worker.scale = rules.check_scale(svc.type, params.worker_scale.applied_to(worker.scale),
                                         what=f"worker target {target} scale")
    s.add(worker)
    return before


@dataclass(frozen=True)
class PlanInput:
    """Everything a plan function reads: the wanted spec, the jobs and hosts as they are."""

    spec: planner.ServiceSpec
    jobs: list[planner.ObservedJob]
    hosts: list[HostLoad]
    ports: planner.PortRange
    params: OpParams


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


def _plan_worker_scale(i: PlanInput) -> planner.Plan:
    target = i.params.target
    worker = next(w for w in i.spec.workers if w.name == target)
    return planner.plan_scale(i.spec, i.jobs, i.hosts, _new_id, kind=JobKind.worker, target=target,
                              scale=worker.scale, ports=i.ports)


def _plan_worker_deploy(i: PlanInput) -> planner.Plan:
    """A redeploy restricted to one target: its old jobs go, target.scale new ones come."""
    target = i.params.target
    only = replace(i.spec, scale=0, workers=tuple(w for w in i.spec.workers if w.name == target))
    mine = [j for j in i.jobs if j.kind == JobKind.worker and j.target == target]
    return planner.plan_redeploy(only, mine, i.hosts, _new_id, i.ports)


PLANS: dict[OpKind, Callable[[PlanInput], planner.Plan]] = {
    OpKind.deploy: lambda i: planner.plan_redeploy(i.spec, i.jobs, i.hosts, _new_id, i.ports),
    OpKind.redeploy: lambda i: planner.plan_redeploy(i.spec, i.jobs, i.hosts, _new_id, i.ports),
    OpKind.scale: lambda i: planner.plan_scale(i.spec, i.jobs, i.hosts, _new_id, kind=JobKind.deploy,
                                               target=None, scale=i.spec.scale, ports=i.ports),
    OpKind.recover: lambda i: planner.plan_recover(i.spec, i.jobs, i.hosts, _new_id, i.ports),
    OpKind.drain: lambda i: planner.plan_move(i.spec, i.jobs, i.hosts, _new_id,
                                              away_from=i.params.host or "", ports=i.ports),
    OpKind.worker_scale: _plan_worker_scale,
    OpKind.worker_deploy: _plan_worker_deploy,
    OpKind.worker_rm: lambda i: planner.plan_stop(i.jobs, kind=JobKind.worker, target=i.params.target),
    OpKind.routes: lambda i: planner.plan_routes(i.spec),
    OpKind.remove: lambda i: planner.plan_remove(i.spec, i.jobs, delete_data=bool(i.params.delete_data)),
    OpKind.run: lambda i: planner.plan_run(i.spec, i.hosts),
    OpKind.exec: lambda i: planner.plan_exec(i.jobs, i.params.job),
    OpKind.revert: lambda i: planner.plan_revert(i.spec, i.jobs, i.hosts, _new_id, failed=i.params.jobs or (),
                                                 restart=bool(i.params.restart), ports=i.ports),
}


def _plan(p: Platform, s: Session, op: Operation, svc: Service, env: Environment) -> planner.Plan:
    # CPU limits cap a container, they reserve nothing: a host takes more than its cores.
    hosts = [replace(h, cpus=h.cpus * p.settings.cpu_overcommit)
             for h in catalogue.placement_loads(session=s)]
    plan = PLANS.get(op.kind)
    if plan is None:
        raise planner.PlanError(f"operation kind {op.kind} is not supported yet")
    if op.kind in (OpKind.revert, OpKind.remove) and not svc.image:
        # A failed first push: nothing to go back to, only its jobs to stop.
        svc = svc.model_copy(update={"image": "-", "scale": 0})
    wanted = spec.service_spec(s, env, svc)
    if op.kind == OpKind.remove and env.removing:
        wanted = replace(wanted, proxies=())  # the whole environment goes, its proxy with it
    source = op.parameters.source_id
    if source is not None and op.kind in (OpKind.deploy, OpKind.redeploy):
        wanted = replace(wanted, build=planner.BuildSpec(source, push=bool(p.settings.registry)))
    return plan(PlanInput(wanted, spec.observed_jobs(s, svc), hosts,
                          planner.PortRange(p.settings.port_min, p.settings.port_max), op.parameters))


def _record_plan(s: Session, op: Operation, svc: Service,
                 plan: planner.Plan) -> list[list[Step]]:
    """Jobs the plan starts become catalogue rows (scheduled); each step becomes a Step row.
    Written as plain INSERTs of many rows (this runs in the catalogue's write turn: making and
    flushing a row object per step and job cost more than the rest of the request), then the
    steps read back."""
    job_rows: list[dict[str, Any]] = []
    step_rows: list[dict[str, Any]] = []
    # Host-less steps (an overlap's wait) run on the node of the first host the plan touches.
    home = next((h for item in plan.steps if (h := _host_of(item)) is not None), None)
    kind = profile(svc.type)
    for index, stage in enumerate(plan.stages):
        for item in stage:
            step = _step_values(op.id or 0, index, svc.name, item, home)
            if isinstance(item, planner.StartJob):
                j = item.job
                mounts = dict([j.volume.split(":", 1)]) if j.volume else {}
                routed = kind.routed and j.kind == JobKind.deploy
                job_rows.append(dict(
                    id=j.id, service_id=svc.id or 0, kind=j.kind, target=j.target,
                    host=j.host, port=j.port, container_name=j.container_name,
                    state=JobState.scheduled, release=j.release, image=j.image, command=j.command,
                    size=j.size_name, environment=dict(j.environment), args=list(j.args),
                    mounts=mounts, op_id=op.id,
                    # In the proxy once it passes there (or when the operation succeeds).
                    route=RouteState.pending if routed else RouteState.serving,
                    health_path=svc.health_path if j.kind == JobKind.deploy else None,
                ))
                if svc.type == ServiceType.service_proxy:
                    step["action"] = StepAction.start_proxy
                if j.kind == JobKind.deploy:
                    _remember_placement(svc, j, moved=op.kind == OpKind.drain)
            step_rows.append(step)
    insert_rows(s, Job, job_rows)
    insert_rows(s, Step, step_rows)
    return _stages(catalogue.steps_of(session=s, op_id=op.id or 0)) if step_rows else []


def _remember_placement(svc: Service, job: planner.NewJob, *, moved: bool = False) -> None:
    """Databases and caches keep their first port (connection URLs stay true); databases keep
    their first host (their data volume is there). A drain moves a cache to a new port."""
    kind = profile(svc.type)
    if kind.stable_port and (svc.port is None or moved):
        svc.port = job.port
    if kind.data_dir and svc.host is None:
        svc.host = job.host


def _host_of(item: planner.Step) -> str | None:
    if isinstance(item, planner.StartJob):
        return item.job.host
    return None if isinstance(item, planner.Wait) else item.host


def _step_values(op_id: int, stage: int, service: str, item: planner.Step, home: str | None) -> dict[str, Any]:
    """A step's row, as values (``_record_plan``)."""
    if isinstance(item, planner.CheckImage):
        return dict(op_id=op_id, stage=stage, action=StepAction.check_image, host=item.host,
                    image=item.image, name=f"check image {item.image} on {item.host}")
    if isinstance(item, planner.Build):
        pushed = f", pushed to {builds.repository_of(item.image).split('/', 1)[0]}" if item.push else ""
        return dict(op_id=op_id, stage=stage, action=StepAction.build, host=item.host, image=item.image,
                    source_id=item.source_id, name=f"build {item.image} on {item.host}{pushed}")
    if isinstance(item, planner.StartJob):
        j = item.job
        what = f"{service} {j.kind}" + (f" {j.target}" if j.target else "")
        port = f" port {j.port}" if j.port is not None else ""
        return dict(op_id=op_id, stage=stage, action=StepAction.start, host=j.host, job_id=j.id,
                    name=f"start {what} job {j.id} on {j.host}{port}")
    if isinstance(item, planner.StopJob):
        return dict(op_id=op_id, stage=stage, action=StepAction.stop, host=item.host,
                    job_id=item.job_id, name=f"stop {service} job {item.job_id} on {item.host}")
    if isinstance(item, planner.RunOnce):
        return dict(op_id=op_id, stage=stage, action=StepAction.run_once, host=item.host,
                    name=f"run a one-off {service} container on {item.host}")
    if isinstance(item, planner.Exec):
        return dict(op_id=op_id, stage=stage, action=StepAction.exec, host=item.host, job_id=item.job_id,
                    name=f"exec in {service} job {item.job_id} on {item.host}")
    if isinstance(item, planner.DeleteVolume):
        return dict(op_id=op_id, stage=stage, action=StepAction.delete_volume, host=item.host,
                    image=item.volume, name=f"delete volume {item.volume} on {item.host}")
    if isinstance(item, planner.Route):
        return dict(op_id=op_id, stage=stage, action=StepAction.route, host=item.host,
                    job_id=item.proxy, targets=list(item.jobs), route=item.to,
                    name=_route_name(service, item))
    return dict(op_id=op_id, stage=stage, action=StepAction.wait, seconds=item.seconds, host=home,
                name=f"overlap: old jobs live {item.seconds}s more")


def _route_name(service: str, r: planner.Route) -> str:
    jobs = ", ".join(r.jobs)
    what = {
        RouteState.serving: f"proxy: {service} jobs {jobs} in, once they pass",
        RouteState.draining: f"proxy: drain {service} jobs {jobs}",
        RouteState.out: f"proxy: {service} jobs {jobs} out (drained first)",
    }.get(r.to, "proxy: sites and certificates in line")  # type: ignore[arg-type]
    return f"{what} on {r.host} (proxy job {r.proxy})"


# --- finish -------------------------------------------------------------------------------------


def unfinished_steps(steps: Sequence[Step], failed_stage: int, sent_stage: int = -1) -> list[Step]:
    """Steps that were sent and have not ended yet: of the stages up to the failed one (no stage
    after it is sent), and up to the last stage sent (``sent_stage``; -1: an operation an older
    version sent whole, as one chain)."""
    last = failed_stage if sent_stage < 0 else min(failed_stage, sent_stage)
    return [st for st in steps if st.stage <= last and st.state in (StepState.pending, StepState.running)]


def finish(p: Platform, op_id: int) -> bool | None:
    """End the operation from its steps' states, free its service, start the next queued one.

    Returns None while steps sent alongside a failed one are still running (the caller asks
    again later), else whether this call ended the operation."""
    with p.session() as s:
        op = catalogue.get_operation(session=s, op_id=op_id, for_update=True)
        if op.state not in (OpState.running, OpState.queued):
            return False
        failed = catalogue.failed_steps(session=s, op_id=op_id)  # (the others read only when one failed)
        # The chain stops at the first failed stage: later stages were never sent.
        if failed and unfinished_steps(catalogue.steps_of(session=s, op_id=op_id), failed[0].stage, op.sent_stage):
            return None
        if not failed and s.exec(select(Step.id).where(col(Step.op_id) == op_id, col(Step.state).in_(
                (StepState.pending, StepState.running))).limit(1)).first() is not None:
            # Never "succeeded" with steps still to run: whoever asked was mistaken (the stage's end
            # or the watcher's nets finish it once they ended).
            log.warning("operation %s: asked to finish with steps still to run and none failed: not yet", op_id)
            return None
        error = None
        if failed:
            catalogue.skip_pending_steps(session=s, op_id=op_id)
            _forget_unstarted_jobs(s, op_id)
            summary = service_summary(s, op.service_id)  # against the scale this operation wanted
            error = f"{failed[0].name}: {failed[0].error}. {summary}{_restore_spec(s, op_id)}"
        ended = catalogue.end_operation(session=s, op_id=op_id,
                                        state=OpState.failed if failed else OpState.succeeded,
                                        error=error)
        catalogue.release_service(session=s, service_id=op.service_id, op_id=op_id)
        if ended:
            _keep_healing_account(s, op, succeeded=not failed)
            _end_release(s, op, succeeded=not failed)
            removed = s.get(Service, op.service_id)
            if not failed and op.kind == OpKind.remove and removed is not None:
                catalogue.mark_service_removed(session=s, service=removed,
                                               data_deleted=bool(op.parameters.delete_data))
            if failed:
                # What runs and is not to be stopped by a revert serves again: jobs the
                # operation started, and old ones it had drained or taken out before it failed
                # (the heartbeat brings every proxy in line).
                _serve_survivors(s, op.service_id, keep_out=_queue_revert(s, op))
            else:  # jobs it started that no proxy took in (none runs): they serve from now on
                s.exec(update(Job).where(col(Job.op_id) == op_id, col(Job.route) == RouteState.pending)
                       .values(route=RouteState.serving))
        s.commit()
    start_next(p, op.service_id)
    return ended


USER_TRIGGERS = frozenset({OpTrigger.manual, OpTrigger.push, OpTrigger.support, OpTrigger.rollback,
                           OpTrigger.create})


REVERTED = USER_TRIGGERS  # a drain's replacement jobs stay: the old ones are on a host to leave


def _serve_survivors(s: Session, service_id: int, keep_out: Sequence[str] = ()) -> None:
    """Active jobs of the service left pending, draining or out by an operation that ended
    before it stopped them serve again, but those in ``keep_out`` (a revert stops them)."""
    query = update(Job).where(col(Job.service_id) == service_id, col(Job.state).in_(ACTIVE_JOB_STATES),
                              col(Job.route).in_((RouteState.pending, RouteState.draining, RouteState.out)))
    if keep_out:
        query = query.where(col(Job.id).not_in(list(keep_out)))
    s.exec(query.values(route=RouteState.serving))


def _queue_revert(s: Session, op: Operation) -> list[str]:
    """A user's operation failed: queue a revert (it goes first) that puts the service back on
    the jobs it had: with its old jobs still there (an overlap, a scale up), the jobs it started
    stop; with its old jobs stopped by a push or rollback, the kept release's jobs start first.
    A failed change that stopped old jobs and cannot go back (a manual redeploy after a change
    of variables) keeps the jobs it started. The jobs the revert stops (none: no revert)."""
    if op.trigger not in REVERTED or op.kind in (OpKind.revert, OpKind.routes, OpKind.remove, OpKind.run,
                                                 OpKind.exec):
        return []
    svc = s.get(Service, op.service_id)
    env = s.get(Environment, op.env_id)
    if svc is None or env is None:
        return []
    started = [j.id for j in s.exec(select(Job).where(col(Job.op_id) == op.id,
                                                      col(Job.state).in_(ACTIVE_JOB_STATES)))]
    # Jobs it stopped before it failed (a redeploy without overlap): the service had them.
    stopped = any(st.action == StepAction.stop and st.state == StepState.succeeded
                  for st in catalogue.steps_of(session=s, op_id=op.id or 0))
    active = catalogue.active_jobs(session=s, service=svc)
    below = sum(1 for j in active if j.kind == JobKind.deploy and j.id not in started) < svc.scale
    # Back to scale only on the release kept: a failed change of variables would fail again.
    restart = stopped and below and bool(svc.image) and op.parameters.release_before is not None
    if stopped and not restart:
        return []  # stopping what it started would leave the service with less than it has
    if not started and not restart:
        return []
    catalogue.record_operation(session=s, env=env, service=svc, kind=OpKind.revert,
                               trigger=OpTrigger.revert,
                               params=OpParams(jobs=started, failed_op=op.id, restart=restart))
    return started


def _end_release(s: Session, op: Operation, *, succeeded: bool) -> None:
    """The release a push deployed takes the operation's outcome; a rollback that succeeds
    marks its release succeeded, one that fails leaves it as it was (it ran before)."""
    number = op.parameters.release
    if number is not None and op.kind in (OpKind.deploy, OpKind.redeploy):
        catalogue.set_release_state(session=s, service_id=op.service_id, number=number,
                                    state=ReleaseState.succeeded if succeeded else ReleaseState.failed,
                                    only_from=None if succeeded else ReleaseState.building)


def _keep_healing_account(s: Session, op: Operation, *, succeeded: bool) -> None:
    """A user's operation that succeeds starts the healing count afresh; a heal or a host-lost
    recover that fails asks for a heal (after its back-off): the service is below its scale."""
    if succeeded and op.trigger in USER_TRIGGERS:
        s.exec(update(Service).where(col(Service.id) == op.service_id)
               .values(heal_attempts=0, heal_gave_up=False, heal_after=None))
    elif not succeeded and op.trigger in (OpTrigger.heal, OpTrigger.host_lost, OpTrigger.revert):
        catalogue.want_heal(session=s, service_id=op.service_id)


def _forget_unstarted_jobs(s: Session, op_id: int) -> None:
    """Jobs the operation planned but never got to start hold no port, memory or count."""
    for step in catalogue.steps_of(session=s, op_id=op_id):
        if step.action == StepAction.start and step.state == StepState.skipped and step.job_id:
            catalogue.set_job_state(session=s, job_id=step.job_id, state=JobState.failed,
                                    error=f"never started: operation {op_id} failed first")


def _restore_spec(s: Session, op_id: int) -> str:
    """A failed operation leaves the spec as it was: the last good release stays current, and a
    failed scale change keeps the old scale. Returns what it kept, in words, for the error."""
    op = s.get(Operation, op_id)
    svc = s.get(Service, op.service_id) if op is not None else None
    if op is None or svc is None:
        return ""
    params = op.parameters
    note = ""
    if params.release_before is not None:
        svc.release, svc.image = params.release_before.release, params.release_before.image
        if svc.release is not None:
            note += f" Release {svc.release} stays current."
    if params.scale_before is not None:
        svc.scale = params.scale_before
        note += f" Its scale stays {svc.scale}."
    if params.worker_before is not None:
        note += _restore_worker(s, svc, params.target or "", params.worker_before)
    s.add(svc)
    return note


def _restore_worker(s: Session, svc: Service, target: str, before: WorkerBefore) -> str:
    worker = catalogue.find_worker(session=s, service=svc, name=target)
    if not before.existed:
        if worker is not None:
            s.delete(worker)
        return f" Worker target {target} is not kept."
    if worker is None:
        worker = WorkerTarget(service_id=svc.id or 0, name=target, command=before.command, scale=before.scale)
    worker.command, worker.scale = before.command, before.scale
    s.add(worker)
    return f" Worker target {target} stays at scale {before.scale}."


def service_summary(s: Session, service_id: int) -> str:
    """What the service runs now, in words, for a failed operation's error."""
    svc = s.get(Service, service_id)
    if svc is None:
        return ""
    jobs = catalogue.active_jobs(session=s, service=svc)
    running = sum(1 for j in jobs if j.kind == JobKind.deploy and j.state in ACTIVE_JOB_STATES)
    note = f"Service {svc.name} now runs {running} of {svc.scale} deploy jobs"
    workers = [j for j in jobs if j.kind == JobKind.worker]
    if workers:
        note += f" and {len(workers)} worker jobs"
    return note + "."
