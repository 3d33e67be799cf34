"""Operations from request to dispatch: record, claim the service, plan, send.

Every way in (CLI, API, control tasks) calls ``request_*`` here; the finish task calls
``finish`` and the next queued operation of the service starts from there.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from celery import Celery
from sqlalchemy.engine import Engine
from sqlmodel import Session

from orchestrator import catalogue, dispatch, planner, service_types
from orchestrator.catalogue import BadInput
from orchestrator.db import session as new_session
from orchestrator.models import (
    ACTIVE_JOB_STATES,
    Environment,
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
    WorkerTarget,
    utcnow,
)
from orchestrator.names import volume_name
from orchestrator.settings import Settings
from orchestrator.sizes import parse_size


class Platform:
    """What the control side needs to act: the catalogue's engine, the Celery app, settings."""

    def __init__(self, engine: Engine, app: Celery, settings: Settings,
                 reader: Engine | None = None) -> None:
        self.engine = engine
        self.reader_engine = reader or engine
        self.app = app
        self.settings = settings

    def session(self) -> Session:
        return new_session(self.engine)

    def reader(self) -> Session:
        """A session for reads only (listings, progress): it never waits for the writer."""
        return new_session(self.reader_engine)


# --- requests (validate, record, start) ------------------------------------------------------------


Decision = tuple[OpKind, OpTrigger, dict[str, object]]  # what to record: kind, trigger, params


def _request(p: Platform, *, env: str, service: str,
             decide: Callable[[Session, Service], Decision]) -> Operation:
    """The one way an operation is asked for: find the service, let ``decide`` validate the
    request (raising BadInput changes nothing) and say what to record, record it, start it."""
    with p.session() as s:
        environment, svc = catalogue.get_service(session=s, env=env, name=service)
        kind, trigger, params = decide(s, svc)
        op = catalogue.record_operation(session=s, env=environment, service=svc,
                                        kind=kind, trigger=trigger, params=params)
        s.commit()
    start_next(p, op.service_id)
    with p.reader() as s:
        return catalogue.get_operation(session=s, op_id=op.id or 0)


def request_push(p: Platform, *, env: str, service: str, image: str) -> Operation:
    """A new release of a code service: the first push deploys it, later ones redeploy it."""

    def decide(s: Session, svc: Service) -> Decision:
        if svc.type != ServiceType.code:
            raise BadInput(f"service {service} is a {svc.type} service: only code services take pushes")
        if not image.strip() or any(c.isspace() for c in image):
            raise BadInput(f"image {image!r} is not an image reference")
        release = catalogue.add_release(session=s, service=svc, image=image)
        kind = OpKind.deploy if release.number == 1 else OpKind.redeploy
        return kind, OpTrigger.push, {"release": release.number, "image": image}

    return _request(p, env=env, service=service, decide=decide)


def request_redeploy(p: Platform, *, env: str, service: str, support: bool = False,
                     release: int | None = None) -> Operation:
    """A manual redeploy, a support redeploy, or (with ``release``) a rollback."""

    def decide(s: Session, svc: Service) -> Decision:
        if not service_types.profile(svc.type).user_redeploy:
            raise BadInput(f"{svc.type} services cannot be redeployed through the CLI or API")
        if not svc.redeployable and not support:
            raise BadInput(f"service {service} is marked not redeployable: only support may redeploy it (--support)")
        if release is not None:
            rel = catalogue.get_release(session=s, service=svc, number=release)
            trigger = OpTrigger.support if support else OpTrigger.rollback
            return OpKind.redeploy, trigger, {"release": rel.number, "image": rel.image}
        _require_release(s, svc)
        return OpKind.redeploy, OpTrigger.support if support else OpTrigger.manual, {}

    return _request(p, env=env, service=service, decide=decide)


def create_env(p: Platform, *, name: str, sandbox: bool, defaults: bool = True) -> list[Operation]:
    """A new environment; unless ``defaults`` is off, its auto-included services (logging, the
    service proxy and, outside sandboxes, monitoring) are created and deployed."""
    images = {ServiceType.logging: p.settings.image_logging,
              ServiceType.service_proxy: p.settings.image_service_proxy,
              ServiceType.monitoring: p.settings.image_monitoring}
    with p.session() as s:
        environment = catalogue.create_env(session=s, name=name, sandbox=sandbox)
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
    with p.session() as s:
        environment = catalogue.get_env(session=s, name=env)
        catalogue.add_service(session=s, env=environment, name=name, type=type,
                              image=image if type != ServiceType.code else None,
                              command=command, scale=scale, size=size)
        s.commit()
    if not service_types.profile(type).deploys_on_create:
        return None
    return request_deploy(p, env=env, service=name, trigger=OpTrigger.create)


def request_deploy(p: Platform, *, env: str, service: str, trigger: OpTrigger) -> Operation:
    return _request(p, env=env, service=service, decide=lambda s, svc: (OpKind.deploy, trigger, {}))


def request_scale(p: Platform, *, env: str, service: str, scale: int) -> Operation:
    def decide(s: Session, svc: Service) -> Decision:
        if scale < 0:
            raise BadInput(f"scale {scale} is below 0: it must be 0 or more")
        _require_release(s, svc)
        if service_types.profile(svc.type).single_job and scale > 1:
            raise BadInput(f"{svc.type} services run one job (one copy of the data, one kept port): "
                           "scale above 1 is refused")
        return OpKind.scale, OpTrigger.manual, {"scale": scale}

    return _request(p, env=env, service=service, decide=decide)


def request_worker_deploy(p: Platform, *, env: str, service: str, target: str,
                          command: str) -> Operation:
    """Start (or replace) the worker jobs of a target; from then on they redeploy with the service."""
    catalogue.check_name("worker target", target)
    if not command.strip():
        raise BadInput("a worker target needs a --command")

    def decide(s: Session, svc: Service) -> Decision:
        if svc.type != ServiceType.code:
            raise BadInput(f"worker targets are for code services; {svc.name} is a {svc.type} service")
        _require_release(s, svc)
        return OpKind.worker_deploy, OpTrigger.manual, {"target": target, "command": command}

    return _request(p, env=env, service=service, decide=decide)


def parse_worker_scale(text: str) -> tuple[str, int]:
    """'N' sets the scale, '+N'/'-N' change it: returns ("set"|"add", number)."""
    body = text.strip()
    sign = body[:1] if body[:1] in "+-" else ""
    digits = body[len(sign):]
    if not digits.isdigit():
        raise BadInput(f"worker scale {text!r} is not N, +N or -N")
    number = int(digits)
    if sign == "-":
        return "add", -number
    return ("add", number) if sign == "+" else ("set", number)


def request_worker_scale(p: Platform, *, env: str, service: str, target: str,
                         scale: str | int) -> Operation:
    mode, number = parse_worker_scale(str(scale))

    def decide(s: Session, svc: Service) -> Decision:
        worker = catalogue.get_worker(session=s, service=svc, name=target)
        if (number if mode == "set" else worker.scale + number) < 0:
            raise BadInput(f"worker target {target} would go below 0 (it has {worker.scale})")
        return OpKind.worker_scale, OpTrigger.manual, {"target": target, mode: number}

    return _request(p, env=env, service=service, decide=decide)


def request_worker_rm(p: Platform, *, env: str, service: str, target: str) -> Operation:
    def decide(s: Session, svc: Service) -> Decision:
        catalogue.get_worker(session=s, service=svc, name=target)
        return OpKind.worker_rm, OpTrigger.manual, {"target": target}

    return _request(p, env=env, service=service, decide=decide)


def _require_release(s: Session, svc: Service) -> None:
    """A code service runs nothing, and so can be neither redeployed nor scaled, before a push."""
    if svc.type == ServiceType.code and not catalogue.list_releases(session=s, service=svc):
        raise BadInput(f"service {svc.name} has no release yet: push an image first")


# --- start: claim, plan, record, send ---------------------------------------------------------------


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
    could not be planned), so the caller moves on to the next queued one."""
    op_id = op.id or 0
    try:
        with p.session() as s:
            svc = s.get(Service, op.service_id)
            env = s.get(Environment, op.env_id)
            assert svc is not None and env is not None
            previous = _apply_params(s, op, svc)
            plan = _plan(p, s, op, svc, env)
            stages = _record_plan(s, op, env, svc, plan)
            running = s.get(Operation, op_id)
            assert running is not None
            running.state = OpState.running if stages else OpState.succeeded
            running.started_at = utcnow()
            if previous:
                running.params = {**running.params, **previous}
            if not stages:
                running.finished_at = running.started_at
                catalogue.release_service(session=s, service_id=svc.id or 0, op_id=op_id)
            s.commit()
            env_name, svc_name = env.name, svc.name
    except (planner.PlanError, BadInput) as exc:
        _fail_unstarted(p, op, str(exc))
        return False
    if not stages:
        return False
    try:
        dispatch.send_operation(p.app, op_id, stages, env=env_name, service=svc_name)
    except Exception as exc:  # the broker is down: nothing ran, say so and free the service
        with p.session() as s:
            catalogue.skip_pending_steps(session=s, op_id=op_id)
            _forget_unstarted_jobs(s, op_id)
            s.commit()
        _fail_unstarted(p, op, f"could not send the operation to the broker: {exc}")
        return False
    return True


def _fail_unstarted(p: Platform, op: Operation, error: str) -> None:
    with p.session() as s:
        catalogue.end_operation(session=s, op_id=op.id or 0, state=OpState.failed, error=error)
        catalogue.release_service(session=s, service_id=op.service_id, op_id=op.id or 0)
        s.commit()


def _apply_params(s: Session, op: Operation, svc: Service) -> dict[str, object]:
    """Spec changes the operation carries take effect when it starts; returns what they replaced."""
    previous: dict[str, object] = {}
    if "release" in op.params:
        previous = {"previous_release": svc.release, "previous_image": svc.image}
        svc.release = int(op.params["release"])
        svc.image = str(op.params["image"])
    if op.kind == OpKind.scale:
        previous = {"previous_scale": svc.scale}
        svc.scale = int(op.params["scale"])
    if op.kind in (OpKind.worker_deploy, OpKind.worker_scale):
        target = str(op.params["target"])
        worker = catalogue.find_worker(session=s, service=svc, name=target)
        if worker is None:
            if op.kind == OpKind.worker_scale:
                raise BadInput(f"service {svc.name} has no worker target {target}")
            worker = WorkerTarget(service_id=svc.id or 0, name=target, command="", scale=1)
        if op.kind == OpKind.worker_deploy:
            worker.command = str(op.params["command"])
        elif "set" in op.params:
            worker.scale = int(op.params["set"])
        else:
            worker.scale = max(0, worker.scale + int(op.params["add"]))
        s.add(worker)
    s.add(svc)
    s.flush()
    return previous


@dataclass(frozen=True)
class Variable:
    name: str
    value: str
    source: str  # user, connection, platform, job (computed per job at start)
    secret: bool


def variables_for(s: Session, env: Environment, svc: Service) -> list[Variable]:
    """The variables the service's next jobs get, with where each comes from. Which wins:
    connection variables < user variables < the platform's own (the type's image variables and
    the per-job PORT and ORCH_*), so a user can point DATABASE_URL elsewhere but cannot break
    the credentials the platform keeps or the port it assigns."""
    merged: dict[str, tuple[str, str]] = {}
    if svc.type == ServiceType.code:
        for name, value in service_types.connection_variables(_endpoints(s, env)).items():
            merged[name] = (value, "connection")
    for name, value in svc.variables.items():
        merged[name] = (value, "user")
    for name, value in service_types.container_variables(svc.type, svc.credentials).items():
        merged[name] = (value, "platform")
    result = [Variable(n, v, src, service_types.is_secret(n, v)) for n, (v, src) in merged.items()]
    job_vars = ["ORCH_ENV", "ORCH_SERVICE", "ORCH_JOB", "ORCH_KIND", "ORCH_HOST", "ORCH_RELEASE"]
    if svc.type not in planner.PORTLESS_TYPES:
        job_vars.insert(0, "PORT")
    result += [Variable(n, "(set per job)", "job", False) for n in job_vars]
    return sorted(result, key=lambda v: v.name)


def _endpoints(s: Session, env: Environment) -> list[service_types.Endpoint]:
    """The environment's deployed databases and caches, where code services reach them."""
    addresses = {h.name: h.address for h in catalogue.list_hosts(session=s)}
    endpoints = []
    for other in catalogue.list_services(session=s, env=env):
        if service_types.profile(other.type).url_variable is None or other.port is None:
            continue
        jobs = catalogue.active_jobs(session=s, service=other)
        host = other.host or (jobs[0].host if jobs else None)
        if host is None:
            continue
        endpoints.append(service_types.Endpoint(other.name, other.type, addresses.get(host, host),
                                                other.port, other.credentials))
    return endpoints


def service_spec(s: Session, env: Environment, svc: Service) -> planner.ServiceSpec:
    workers = tuple(
        planner.WorkerSpec(w.name, w.command, w.scale)
        for w in catalogue.workers_of(session=s, service=svc)
    )
    if not svc.image:
        raise BadInput(f"service {svc.name} has no image to run")
    kind = service_types.profile(svc.type)
    variables = {v.name: v.value for v in variables_for(s, env, svc) if v.source != "job"}
    return planner.ServiceSpec(
        env=env.name, name=svc.name, type=svc.type, image=svc.image, command=svc.command,
        size_name=svc.size, size=parse_size(svc.size), scale=svc.scale, overlap=svc.overlap,
        variables=variables, release=svc.release, workers=workers,
        volume=f"{volume_name(env.name, svc.name)}:{kind.data_dir}" if kind.data_dir else None,
        port=svc.port, pinned_host=svc.host if kind.data_dir else None,
        args=service_types.entrypoint_args(svc.type, svc.credentials),
    )


def _plan(p: Platform, s: Session, op: Operation, svc: Service, env: Environment) -> planner.Plan:
    spec = service_spec(s, env, svc)
    jobs = [
        planner.ObservedJob(j.id, j.kind, j.target, j.host, j.port, parse_size(j.size))
        for j in catalogue.active_jobs(session=s, service=svc)
    ]
    # CPU limits cap a container, they reserve nothing: a host takes more than its cores.
    hosts = [replace(h, cpus=h.cpus * p.settings.cpu_overcommit)
             for h in catalogue.host_loads(session=s)]
    ports = planner.PortRange(p.settings.port_min, p.settings.port_max)
    if op.kind in (OpKind.deploy, OpKind.redeploy):
        return planner.plan_redeploy(spec, jobs, hosts, _new_id, ports)
    if op.kind == OpKind.scale:
        return planner.plan_scale(spec, jobs, hosts, _new_id, kind=JobKind.deploy, target=None,
                                  scale=svc.scale, ports=ports)
    if op.kind == OpKind.recover:
        return planner.plan_recover(spec, jobs, hosts, _new_id, ports)
    if op.kind == OpKind.drain:
        return planner.plan_move(spec, jobs, hosts, _new_id, away_from=str(op.params["host"]),
                                 ports=ports)
    target = str(op.params.get("target"))
    if op.kind == OpKind.worker_scale:
        worker = next(w for w in spec.workers if w.name == target)
        return planner.plan_scale(spec, jobs, hosts, _new_id, kind=JobKind.worker, target=target,
                                  scale=worker.scale, ports=ports)
    if op.kind == OpKind.worker_deploy:
        # A redeploy restricted to this target: its old jobs go, target.scale new ones come.
        only = replace(spec, scale=0, workers=tuple(w for w in spec.workers if w.name == target))
        mine = [j for j in jobs if j.kind == JobKind.worker and j.target == target]
        return planner.plan_redeploy(only, mine, hosts, _new_id, ports)
    if op.kind == OpKind.worker_rm:
        worker_row = catalogue.find_worker(session=s, service=svc, name=target)
        if worker_row is not None:
            s.delete(worker_row)  # from now on redeploys leave this target out
        return planner.plan_stop(jobs, kind=JobKind.worker, target=target)
    raise planner.PlanError(f"operation kind {op.kind} is not supported yet")


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


def _record_plan(s: Session, op: Operation, env: Environment, svc: Service,
                 plan: planner.Plan) -> list[list[Step]]:
    """Jobs the plan starts become catalogue rows (scheduled); each step becomes a Step row."""
    stages: list[list[Step]] = []
    for index, stage in enumerate(plan.stages):
        rows = []
        for item in stage:
            step = _step_row(op.id or 0, index, svc.name, item)
            if isinstance(item, planner.StartJob):
                j = item.job
                mounts = dict([j.volume.split(":", 1)]) if j.volume else {}
                s.add(Job(
                    id=j.id, service_id=svc.id or 0, kind=JobKind(j.kind), target=j.target,
                    host=j.host, port=j.port, container_name=j.container_name,
                    state=JobState.scheduled, release=j.release, image=j.image, command=j.command,
                    size=j.size_name, environment=dict(j.environment), args=list(j.args),
                    mounts=mounts, op_id=op.id,
                ))
                if j.kind == JobKind.deploy:
                    _remember_placement(svc, j, moved=op.kind == OpKind.drain)
            s.add(step)
            rows.append(step)
        stages.append(rows)
    s.flush()
    return stages


def _remember_placement(svc: Service, job: planner.NewJob, *, moved: bool = False) -> None:
    """Databases and caches keep their first port (connection URLs stay true); databases keep
    their first host (their data volume is there). A drain moves a cache to a new port."""
    kind = service_types.profile(svc.type)
    if kind.stable_port and (svc.port is None or moved):
        svc.port = job.port
    if kind.data_dir and svc.host is None:
        svc.host = job.host


def _step_row(op_id: int, stage: int, service: str, item: planner.Step) -> Step:
    if isinstance(item, planner.CheckImage):
        return Step(op_id=op_id, stage=stage, action=StepAction.check_image, host=item.host,
                    image=item.image, name=f"check image {item.image} on {item.host}")
    if isinstance(item, planner.StartJob):
        j = item.job
        what = f"{service} {j.kind}" + (f" {j.target}" if j.target else "")
        port = f" port {j.port}" if j.port is not None else ""
        return Step(op_id=op_id, stage=stage, action=StepAction.start, host=j.host, job_id=j.id,
                    name=f"start {what} job {j.id} on {j.host}{port}")
    if isinstance(item, planner.StopJob):
        return Step(op_id=op_id, stage=stage, action=StepAction.stop, host=item.host,
                    job_id=item.job_id, name=f"stop {service} job {item.job_id} on {item.host}")
    return Step(op_id=op_id, stage=stage, action=StepAction.wait, seconds=item.seconds,
                name=f"overlap: old jobs live {item.seconds}s more")


# --- finish -------------------------------------------------------------------------------------


def unfinished_steps(steps: Sequence[Step], failed_stage: int) -> list[Step]:
    """Steps that were sent (stage up to the failed one) and have not ended yet."""
    return [st for st in steps if st.stage <= failed_stage
            and st.state in (StepState.pending, StepState.running)]


def finish(p: Platform, op_id: int) -> bool | None:
    """End the operation from its steps' states, free its service, start the next queued one.

    Returns None while steps sent alongside a failed one are still running (the caller asks
    again later), else whether this call ended the operation."""
    with p.session() as s:
        op = catalogue.get_operation(session=s, op_id=op_id)
        if op.state not in (OpState.running, OpState.queued):
            return False
        steps = catalogue.steps_of(session=s, op_id=op_id)
        failed = [st for st in steps if st.state == StepState.failed]
        # The chain stops at the first failed stage: later stages were never sent.
        if failed and unfinished_steps(steps, min(st.stage for st in failed)):
            return None
        error = None
        if failed:
            catalogue.skip_pending_steps(session=s, op_id=op_id)
            _forget_unstarted_jobs(s, op_id)
            summary = service_summary(s, op.service_id)  # against the scale this operation wanted
            error = f"{failed[0].name}: {failed[0].error}. {summary}{_restore_params(s, op)}"
        ended = catalogue.end_operation(session=s, op_id=op_id,
                                        state=OpState.failed if failed else OpState.succeeded,
                                        error=error)
        catalogue.release_service(session=s, service_id=op.service_id, op_id=op_id)
        s.commit()
    start_next(p, op.service_id)
    return ended


def _forget_unstarted_jobs(s: Session, op_id: int) -> None:
    """Jobs the operation planned but never got to start hold no port, memory or count."""
    for step in catalogue.steps_of(session=s, op_id=op_id):
        if step.action == StepAction.start and step.state == StepState.skipped and step.job_id:
            catalogue.set_job_state(session=s, job_id=step.job_id, state=JobState.failed,
                                    error=f"never started: operation {op_id} failed first")


def _restore_params(s: Session, op: Operation) -> str:
    """A failed operation leaves the spec as it was: the last good release stays current, and a
    failed scale change keeps the old scale (the error says how many jobs run)."""
    svc = s.get(Service, op.service_id)
    if svc is None:
        return ""
    note = ""
    if "previous_image" in op.params:
        svc.release = op.params.get("previous_release")
        svc.image = op.params.get("previous_image")
        if svc.release is not None:
            note += f" Release {svc.release} stays current."
    if "previous_scale" in op.params:
        svc.scale = int(op.params["previous_scale"])
        note += f" Its scale stays {svc.scale}."
    s.add(svc)
    return note


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
