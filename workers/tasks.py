"""The tasks a node runs: thin and idempotent, a step id in, a small result out.

Every step moves its catalogue row pending -> running -> succeeded/failed. A failed step also
asks for the operation's finish (the chain stops at a failure), then raises so Flower shows it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from celery import Celery, Task
from celery.exceptions import Retry
from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from orchestrator import builds, catalogue, names, operations, service_types, spec
from orchestrator.dispatch import BOXED, MAX_BOX, TASK_OF, SendFailed
from orchestrator.errors import one_line
from orchestrator.models import (
    Environment,
    Job,
    JobState,
    RouteState,
    Service,
    ServiceType,
    Step,
    StepAction,
    StepState,
    utcnow,
)
from orchestrator.placement import free_port
from orchestrator.platform import Platform
from orchestrator.proxy import ProxyConfig
from orchestrator.sizes import parse_size
from workers import monitor
from workers.context import NodeContext
from workers.proxy import ProxyError
from workers.proxy import passed as proxy_passed
from workers.proxy import wanted as wanted_config
from workers.runtime.base import ContainerError, ContainerSpec

log = logging.getLogger(__name__)


MAX_WAIT_COUNTDOWN = 60.0  # seconds an overlap wait sleeps in the broker before asking again
CATALOGUE_RETRIES = 30  # a step asks again every second while the catalogue fails, this often
# The threads a box's steps act in, side by side: the process's, kept between boxes (a simulated
# fleet's process runs thousands of boxes a minute: a pool made per box started a thread per step).
# Room for every step of every box at once up to 256 tasks at once (a node runs 16 by default, a
# sim process 32): a claimed step must never wait for a thread. Threads are made as needed.
STEP_THREADS = ThreadPoolExecutor(max_workers=256 * MAX_BOX, thread_name_prefix="step")


class StepFailed(Exception):
    """A step could not do its work; the message is the reason shown in ``ops show``."""


@dataclass(frozen=True)
class Work:
    """What a step does on the host, and what it makes of its job in the catalogue. The job's
    state moves in the same transactions that begin and end the step (``run_steps``)."""

    act: Callable[[NodeContext, Step, Job | None], dict[str, Any]]
    job_on_begin: JobState | None = None
    job_on_done: JobState | None = None
    job_on_failure: JobState | None = None


def run_step(node: NodeContext, step_id: int, work: Work, *, env: str = "",
             service: str = "") -> dict[str, Any]:
    """Run ``work`` as step ``step_id`` on ``node`` (``run_steps`` of one step)."""
    return run_steps(node, [step_id], work, env=env, service=service)[0]


def run_steps(node: NodeContext, step_ids: Sequence[int], work: Work, *, env: str = "",
              service: str = "") -> list[dict[str, Any]]:
    """Run ``work`` as each of ``step_ids`` (one task's batch) on ``node``: all begin in one
    catalogue transaction, act side by side, and end in one more (each shared with what the
    process's other tasks write meanwhile: ``Platform.together``), each step (and its job) with
    its own state and error. A failure asks for the operation's finish once (the chain stops
    there), after every step of the batch ended, then raises."""
    p = node.platform
    begun, skipped, refused = p.together.run(lambda s: _begin_all(s, node, step_ids, work))
    with node.working(*(step.id or 0 for step, _ in begun)):  # their leases renewed until they end
        outcomes = _act_all(node, begun, work)
        ended = _end_all(node, begun, outcomes, work)
    if ended.failed:
        p.dispatch.send_finish(begun[0][0].op_id, env=env, service=service, host=node.host)
    _stages_ended(p, ended, step_ids)
    if ended.failed or ended.lost or refused:  # (whoever failed a lost step asked for the finish)
        raise StepFailed("; ".join(ended.failed + ended.lost + refused))
    return [skipped.get(i) or ended.results[i] for i in step_ids]


Begun = list[tuple[Step, Job | None]]


def _begin_all(s: Session, node: NodeContext, step_ids: Sequence[int],
               work: Work) -> tuple[Begun, dict[int, dict[str, Any]], list[str]]:
    """pending (or running: a redelivery) -> running on this node, and each step's job moved:
    the steps begun, those that succeeded already, and why the others cannot run."""
    lease = node.platform.settings.step_lease
    begun: Begun = []
    skipped: dict[int, dict[str, Any]] = {}
    refused: list[str] = []
    here = set(node.working_on())
    for step_id in step_ids:
        if step_id in here:  # another task of this process runs it right now: not twice at once
            skipped[step_id] = {"step": step_id, "skipped": True, "running": True}
            continue
        step = catalogue.begin_step(session=s, step_id=step_id, node=node.node_id, lease=lease)
        if step is None:
            # Already running: a redelivery after a lost node, or a wait asking again. Run again
            # (the work is idempotent) and hold its lease from now on.
            step = catalogue.take_over_step(session=s, step_id=step_id, node=node.node_id, lease=lease)
        if step is None:  # it ended already: a succeeded one lets the chain go on, no other does
            ended = s.get(Step, step_id)
            if ended is not None and ended.state == StepState.succeeded:
                skipped[step_id] = {"step": step_id, "skipped": True}
            else:
                refused.append(f"step {step_id} ended already ({ended.state if ended else 'unknown'})")
            continue
        job = None
        if step.job_id and work.job_on_begin is not None:
            job = catalogue.move_job(session=s, job_id=step.job_id, state=work.job_on_begin)
        elif step.job_id:
            job = s.get(Job, step.job_id)
        begun.append((step, job))
    return begun, skipped, refused


Outcome = tuple[dict[str, Any], None] | tuple[None, str]  # (result, None) or (None, error)


def _act_all(node: NodeContext, begun: Begun, work: Work) -> list[Outcome]:
    """Each begun step's work, side by side (a lone one in this thread)."""

    def act(begun_step: tuple[Step, Job | None]) -> Outcome:
        step, job = begun_step
        try:
            return work.act(node, step, job), None
        except Retry:
            raise
        except Exception as exc:
            return None, one_line(exc) or type(exc).__name__

    if len(begun) <= 1:
        return [act(b) for b in begun]
    acting = [STEP_THREADS.submit(act, b) for b in begun]
    wait(acting)  # all of them, also when one raises (Retry)
    return [future.result() for future in acting]


@dataclass
class Ended:
    """What ending a task's steps came to: the results of those that succeeded by step id, the
    errors of those that failed, those failed meanwhile by another (their lease ran out), the
    (operation, stage) pairs whose last step this was (the stage succeeded), and those whose
    other steps had not all succeeded as this transaction saw them."""

    results: dict[int, dict[str, Any]]
    failed: list[str]
    lost: list[str]
    stages_done: list[tuple[int, int]]
    stages_left: list[tuple[int, int]]


def _end_all(node: NodeContext, begun: Begun, outcomes: Sequence[Outcome], work: Work) -> Ended:
    """End every begun step (and move its job) in one transaction, and see which stages that
    ended (``catalogue.stage_left``). On SQLite, whose writers take turns, the transaction that
    ends a stage's last step is the one that sees it end. PostgreSQL (read committed) lets two
    transactions that end a stage's last two steps at once each miss the other's: there, a
    stage left unfinished is looked at again once the transaction committed (then both may see
    it end; the advance sends the stage once either way: ``catalogue.claim_stage``)."""
    several = len(begun) > 1

    def end(s: Session) -> Ended:
        results: dict[int, dict[str, Any]] = {}
        errors: list[str] = []
        lost: list[str] = []
        done = [(step, job, result) for (step, job), (result, _error) in zip(begun, outcomes, strict=True)
                if result is not None]
        # Those that succeeded end together: one statement for the steps, one for their jobs.
        won = catalogue.end_steps(session=s, step_ids=[step.id or 0 for step, _, _ in done],
                                  state=StepState.succeeded, node=node.node_id)
        moved: list[tuple[str, str | None]] = []
        for step, job, result in done:
            step_id = step.id or 0
            if step_id in won:
                results[step_id] = {"step": step_id, **result}
                if job is not None and work.job_on_done is not None:
                    moved.append((job.id, result.get("container")))
            else:  # the watcher failed it meanwhile (its lease ran out): the chain stops here
                lost.append(f"step {step_id} was failed while it ran (its lease ran out)")
        if work.job_on_done is not None:
            catalogue.set_job_states(session=s, state=work.job_on_done, containers=moved)
        for (step, job), (outcome, error) in zip(begun, outcomes, strict=True):
            if outcome is not None:
                continue
            step_id = step.id or 0
            if catalogue.end_step(session=s, step_id=step_id, state=StepState.failed, error=error,
                                  node=node.node_id) and job is not None and work.job_on_failure is not None:
                catalogue.set_job_state(session=s, job_id=job.id, state=work.job_on_failure, error=error)
            errors.append(f"step {step_id}: {error}" if several else str(error))
        stages = sorted({(step.op_id, step.stage) for step, _ in begun if (step.id or 0) in results})
        left = {pair: catalogue.stage_left(session=s, op_id=pair[0], stage=pair[1]) for pair in stages}
        return Ended(results, errors, lost, [pair for pair, n in left.items() if n == 0],
                     [pair for pair, n in left.items() if n > 0])

    p = node.platform
    ended = p.together.run(end)
    if ended.stages_left and p.engine.dialect.name != "sqlite":
        try:
            with p.reader() as s:
                ended.stages_done += [pair for pair in ended.stages_left
                                      if catalogue.stage_left(session=s, op_id=pair[0], stage=pair[1]) == 0]
        except SQLAlchemyError as exc:  # the steps ended: the fleet watcher sends what follows
            log.warning("stages %s: could not be looked at again (%s)", ended.stages_left, one_line(exc))
    return ended


def _stages_ended(p: Platform, ended: Ended, step_ids: Sequence[int]) -> None:
    """Do what follows each stage these steps ended (``operations.stage_ended``: the next stage
    sent, or the finish); whatever fails there is logged and left to the fleet watcher's nets
    (the steps ended, and the task's other steps still end)."""
    for op_id, stage in ended.stages_done:
        try:
            operations.stage_ended(p, op_id, stage)
        except Exception as exc:  # the steps ended: the fleet watcher advances or finishes it
            log.warning("operation %s: what follows stage %s failed (%s); the fleet watcher will see to it",
                        op_id, stage, one_line(exc))


def run_host_steps(node: NodeContext) -> list[dict[str, Any]]:
    """Take every step waiting for this node's host (``dispatch.BOXED``: of every operation,
    ``MAX_BOX`` at most; another task is sent for the rest) and run them side by side, each
    ended as soon as its work is done, and then at once asking for its operation's finish if it
    failed, or for what follows its stage if it was the stage's last (a slow start holds up no
    other step, of its operation or another). Returns each step's result, with its operation,
    job and action; raises StepFailed (after all ended) if any failed."""
    p = node.platform
    lease = p.settings.step_lease

    more = False  # more wait than were taken

    def claim(s: Session) -> list[catalogue.Claimed]:
        nonlocal more
        taken, more = catalogue.claim_host_steps(session=s, host=node.host, node=node.node_id, lease=lease,
                                                 actions=sorted(BOXED), most=MAX_BOX,
                                                 silent_since=2 * p.settings.heartbeat_interval)
        moves: dict[JobState, list[str]] = {}  # each job moved as its step begins: one statement per state
        for step in taken:
            state = WORK_OF[step.action].job_on_begin
            if step.job_id and state is not None:
                moves.setdefault(state, []).append(step.job_id)
        for state, job_ids in moves.items():
            catalogue.set_jobs_state(session=s, job_ids=job_ids, state=state)
        return taken

    taken = p.together.run(claim)
    step_ids = [step.id for step in taken]
    with node.working(*step_ids):  # their leases renewed from now on (the read and send below may be slow)
        try:  # their rows, read after the claim's transaction: outside the catalogue's write turn
            with p.reader() as s:
                steps = catalogue.steps_by_id(session=s, step_ids=step_ids)
                jobs = catalogue.jobs_by_id(session=s, job_ids=[step.job_id for step in taken if step.job_id])
        except SQLAlchemyError as exc:  # they are this node's now: the task asks again with their ids
            raise CatalogueFailed(step_ids) from exc
        begun = [(step, jobs.get(step.job_id) if step.job_id else None) for step in steps]
        if more:  # another task takes the rest (the host stays rung)
            try:
                p.dispatch.send_host_steps([node.host])
            except SendFailed as exc:
                log.warning("host %s: the task for its remaining steps could not be sent (%s)", node.host, exc)
        if not begun:
            return []
        return _run_box(node, begun, step_ids)


def _run_box(node: NodeContext, begun: Sequence[tuple[Step, Job | None]],
             step_ids: Sequence[int]) -> list[dict[str, Any]]:
    """The steps a node took from its box, run side by side (see ``run_host_steps``): each is
    ended as soon as its work is done, together with those done by then (one transaction, one
    statement for their steps and one for their jobs, per action), and then at once what
    follows is asked for: another operation's slow step in this box holds up nothing of this one."""
    p = node.platform
    ends: dict[int, tuple[Ended, Outcome]] = {}  # step id -> how its batch ended, its own outcome

    def end_batch(batch: Sequence[tuple[tuple[Step, Job | None], Outcome]]) -> None:
        by_action: dict[StepAction, list[tuple[tuple[Step, Job | None], Outcome]]] = {}
        for item in batch:
            by_action.setdefault(item[0][0].action, []).append(item)
        for action, items in by_action.items():
            ended = _end_all(node, [b for b, _ in items], [o for _, o in items], WORK_OF[action])
            for (step, _job), outcome in items:
                ends[step.id or 0] = (ended, outcome)
            for op_id in sorted({step.op_id for (step, _job), (result, _e) in items if result is None}):
                try:
                    p.dispatch.send_finish(op_id, env="", service="", host=node.host)
                except SendFailed as exc:  # the fleet watcher finishes an operation with a failed step
                    log.warning("operation %s: its finish could not be sent (%s)", op_id, exc)
            _stages_ended(p, ended, [step.id or 0 for (step, _job), _ in items])

    try:
        if len(begun) == 1:  # (a lone one in this thread)
            end_batch([(begun[0], _act_all(node, [begun[0]], WORK_OF[begun[0][0].action])[0])])
        else:
            acting = {STEP_THREADS.submit(_act_all, node, [b], WORK_OF[b[0].action]): b for b in begun}
            try:
                while acting:
                    done, _ = wait(acting, return_when=FIRST_COMPLETED)
                    end_batch([(acting.pop(future), future.result()[0]) for future in done])
            finally:  # none left acting behind a failure: the task asks again for them all
                wait(acting)
    except SQLAlchemyError as exc:
        raise CatalogueFailed(step_ids) from exc
    results, problems = [], []
    for step, _job in begun:
        ended, (_result, error) = ends[step.id or 0]
        about = {"op": step.op_id, "job": step.job_id, "action": step.action.value}
        if error is not None:
            results.append({"step": step.id, **about, "failed": error})
            problems.append(f"step {step.id} (operation {step.op_id}): {error}")
        elif (step.id or 0) not in ended.results:
            problems.append(f"step {step.id} was failed while it ran (its lease ran out)")
        else:
            results.append({**ended.results[step.id or 0], **about})
    if problems:  # Flower shows the task failed: with what failed, and what else it ran
        succeeded = [f"step {r['step']} (operation {r['op']})" for r in results if "failed" not in r]
        raise StepFailed("; ".join(problems) + (f"; succeeded: {', '.join(succeeded)}" if succeeded else ""))
    return results


class CatalogueFailed(Exception):
    """The catalogue failed after a node took these steps from its box: they are running, on
    this node; the task asks again with their ids (``run_steps`` takes them over)."""

    def __init__(self, step_ids: Sequence[int]) -> None:
        super().__init__(f"steps {', '.join(map(str, step_ids))}")
        self.step_ids = list(step_ids)


# --- step bodies ----------------------------------------------------------------------------------


def check_image(node: NodeContext, step: Step, _job: Job | None) -> dict[str, Any]:
    """The image is on the host, or pulled now (from the platform's registry or any registry
    the host's Docker reaches): before anything stops, so a failed pull touches nothing."""
    if not step.image:
        raise StepFailed(f"step {step.id} names no image")
    if node.runtime.has_image(step.image):
        return {"image": step.image}
    try:
        node.runtime.pull(step.image)
    except ContainerError as exc:
        raise StepFailed(f"image {step.image} is not on host {node.host} and could not be pulled: {exc}") from None
    return {"image": step.image, "pulled": True}


def build(node: NodeContext, step: Step, _job: Job | None) -> dict[str, Any]:
    """Build the pushed source into the release's image on this host, its output kept with the
    step as it comes; with a registry, push it there and record the release by digest."""
    p = node.platform
    if step.source_id is None or not step.image:
        raise StepFailed(f"step {step.id} names no source or image")
    with p.reader() as s:
        context = catalogue.get_source(session=s, source_id=step.source_id).data
    output = BuildOutput(node, step.id or 0)
    try:
        node.runtime.build(context, step.image, output)
        digest = node.runtime.push(step.image, output) if p.settings.registry else None
    except ContainerError as exc:
        output.flush()
        raise StepFailed(f"the build failed: {exc}") from None
    output.flush()
    if digest is None:
        return {"image": step.image}
    pinned = f"{builds.repository_of(step.image)}@{digest}"
    with p.session() as s:
        op = catalogue.get_operation(session=s, op_id=step.op_id)
        if op.parameters.release is not None:
            catalogue.record_image(session=s, service_id=op.service_id, number=op.parameters.release, image=pinned)
        s.commit()
    return {"image": step.image, "digest": digest}


class BuildOutput:
    """A build's lines, written to its step every half second (and at the end)."""

    def __init__(self, node: NodeContext, step_id: int, every: float = 0.5) -> None:
        self.node, self.step_id, self.every = node, step_id, every
        self.pending: list[str] = []
        self.last = time.monotonic()

    def __call__(self, line: str) -> None:
        self.pending.append(line)
        if time.monotonic() - self.last >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        text, self.pending, self.last = "".join(f"{line}\n" for line in self.pending), [], time.monotonic()
        try:
            with self.node.platform.session() as s:
                catalogue.append_output(session=s, step_id=self.step_id, text=text)
                s.commit()
        except SQLAlchemyError as exc:  # the build goes on; its output is only for people
            log.warning("step %s: its build output could not be kept: %s", self.step_id, one_line(exc))


def start_job(node: NodeContext, step: Step, job: Job | None) -> dict[str, Any]:
    """Start the job's container (adopting one of the same name) and wait until it is ready.
    Its service's type says how many ports it holds and what comes first: a monitoring job's
    files (never a variable the job happens to have)."""
    job = _need(job, step)
    try:
        with node.platform.reader() as s:
            kind = catalogue.service_type_of(session=s, job=job)
        port, span = job.port, service_types.ports_held(kind)
        if port is not None and any(node.accepts(node.address, port + i) for i in range(span)) \
                and node.runtime.inspect(job.container_name) is None:
            job = move_port(node, job, span)  # a program outside the platform holds it
        spec = container_spec(job)
        if kind == ServiceType.monitoring and node.monitors is not None:  # its files first
            files = node.monitors.prepare(job.id, wanted_monitoring(node, job))
            spec = replace(spec, volumes={**spec.volumes, **files})
        state = node.runtime.run(spec)
        wait_ready(node, job)
    except Exception as exc:
        _remove_failed(node, job, exc)
        raise
    return {"job": job.id, "container": state.id, "port": job.port}


def _remove_failed(node: NodeContext, job: Job, exc: Exception) -> None:
    """Leave Docker as true as the catalogue, without hiding why the start failed."""
    try:
        node.runtime.stop(job.container_name, timeout=0)
    except Exception as cleanup:
        log.warning("job %s: removing its container after a failed start failed too: %s", job.id, cleanup)
        exc.add_note(f"removing the container failed too: {cleanup}")


def move_port(node: NodeContext, job: Job, span: int) -> Job:
    """Give the job another free port of the range, with the ``span - 1`` after it: ports no job
    holds and nothing answers on."""
    p = node.platform
    with node.port_lock, p.session() as s:
        load = next(h for h in catalogue.placement_loads(session=s) if h.name == node.host)
        port = free_port(load.used_ports, p.settings.port_min, p.settings.port_max,
                         usable=lambda candidate: not node.accepts(node.address, candidate),
                         span=span)
        if port is not None:
            moved = catalogue.move_job_port(session=s, job_id=job.id, port=port)
            s.commit()
            return moved
    raise StepFailed(f"port {job.port} on host {node.host} is held by a program outside the platform, "
                     "and no other port of the range is free")


def stop_job(node: NodeContext, step: Step, job: Job | None) -> dict[str, Any]:
    """Stop and remove the job's container; one that is already gone counts as stopped. A
    proxy or monitoring job's files go with it."""
    job = _need(job, step)
    node.runtime.stop(job.container_name, timeout=node.platform.settings.stop_timeout)
    node.proxies.remove(job.id)
    if node.monitors is not None:
        node.monitors.remove(job.id)
    return {"job": job.id}


def wanted_monitoring(node: NodeContext, job: Job) -> dict[str, str]:
    """A monitoring job's directory as the catalogue says now."""
    with node.platform.reader() as s:
        env = catalogue.get_env(session=s, name=job.environment.get("ORCH_ENV", ""))
    return monitor.wanted(node.platform, env, int(job.environment["BLACKBOX_PORT"]))


# --- the service proxy ----------------------------------------------------------------------------


def wanted_proxy(node: NodeContext, proxy_job: Job) -> Callable[[], ProxyConfig]:
    return wanted_config(node.platform, proxy_job.environment.get("ORCH_ENV", ""), node.address)


def _gone(node: NodeContext, proxy_job_id: str) -> bool:
    """Whether a proxy job stops or stopped (a new proxy job took over its ports)."""
    with node.platform.reader() as s:
        job = s.get(Job, proxy_job_id)
        return job is None or job.state not in (JobState.running, JobState.starting, JobState.scheduled)


def start_proxy(node: NodeContext, step: Step, job: Job | None) -> dict[str, Any]:
    """A service proxy job: its files first (the whole wanted state), then its container, ready
    when HAProxy answers on its admin socket. It binds its environment's ports beside any
    proxy job already there (SO_REUSEPORT), which then stops."""
    job = _need(job, step)
    mounts = node.proxies.prepare(job.id, wanted_proxy(node, job)())
    spec = container_spec(job)
    spec = replace(spec, volumes={**spec.volumes, **mounts})
    try:
        state = node.runtime.run(spec)
        _wait(node, job, lambda: node.proxies.ready(job.id), "did not answer on its admin socket")
    except Exception as exc:
        _remove_failed(node, job, exc)
        raise
    return {"job": job.id, "container": state.id}


def route(node: NodeContext, step: Step, proxy_job: Job | None) -> dict[str, Any]:
    """On one proxy job: jobs in (once they pass the proxy's check), drained, or out (drained,
    then removed); with no jobs, sites and certificates brought in line. The catalogue says the
    jobs' new route first, so every proxy (and one that starts meanwhile) agrees."""
    proxy_job = _need(proxy_job, step)
    p, targets, to = node.platform, list(step.targets), step.route
    if to is not None and targets:  # first: a proxy that takes over from this one reads it
        with p.session() as s:
            catalogue.set_route(session=s, job_ids=targets, state=to)
            s.commit()
    if _gone(node, proxy_job.id):
        return {"proxy": proxy_job.id, "skipped": "the proxy job is stopping"}
    wanted = wanted_proxy(node, proxy_job)
    drain = p.settings.drain_timeout if to == RouteState.out else 0.0
    try:
        node.proxies.apply(proxy_job.id, wanted, drain_timeout=drain)
    except ProxyError:
        if _gone(node, proxy_job.id):  # replaced meanwhile (the proxy's own redeploy): its successor
            return {"proxy": proxy_job.id, "skipped": "the proxy job stopped"}  # read the catalogue
        raise
    if to != RouteState.serving or not targets:
        return {"proxy": proxy_job.id, "jobs": targets, "route": to}
    timeout = p.settings.start_timeout
    deadline = time.monotonic() + timeout
    while True:
        missing = set(targets) - proxy_passed(node.proxies.servers(proxy_job.id), targets)
        if not missing:
            return {"proxy": proxy_job.id, "jobs": targets, "route": to}
        if time.monotonic() >= deadline:
            raise StepFailed(f"job{'s' if len(missing) > 1 else ''} {', '.join(sorted(missing))} did not "
                             f"pass the proxy's health check within {timeout:g}s")
        time.sleep(0.05)


def _need(job: Job | None, step: Step) -> Job:
    if job is None:
        raise StepFailed(f"step {step.id} names no known job")
    return job


def container_spec(job: Job) -> ContainerSpec:
    """The container of a job: its image, command, variables, size, volumes and labels."""
    size = parse_size(job.size)
    labels = {
        names.LABEL_ENV: job.environment.get("ORCH_ENV", ""),
        names.LABEL_SERVICE: job.environment.get("ORCH_SERVICE", ""),
        names.LABEL_JOB: job.id,
        names.LABEL_KIND: job.kind,
    }
    if job.target:
        labels[names.LABEL_TARGET] = job.target
    if job.release is not None:
        labels[names.LABEL_RELEASE] = str(job.release)
    return ContainerSpec(
        name=job.container_name, image=job.image, labels=labels,
        environment=dict(job.environment), command=job.command, args=tuple(job.args),
        memory_mb=size.memory_mb, cpus=size.cpus, volumes=dict(job.mounts),
    )


def wait_ready(node: NodeContext, job: Job) -> None:
    """Ready = still running and, for a job with a port, accepting TCP connections on it (with
    a health path: answering it with 2xx/3xx), never having restarted. A container that exits
    or restarts meanwhile fails (within ``LOOK_EVERY``), with its last log lines."""
    if job.port is None:
        _wait(node, job, None, "")
    elif job.health_path:
        path, port = job.health_path, job.port
        _wait(node, job, lambda: node.answers(node.address, port, path),
              f"did not answer GET {path} on port {port} with 2xx/3xx")
    else:
        port = job.port
        _wait(node, job, lambda: node.accepts(node.address, port), f"did not listen on port {port}")


READY_POLL = 0.05  # seconds between two readiness checks of a starting job (a TCP connect, an HTTP GET)
LOOK_EVERY = 0.25  # seconds between two looks at its container in Docker meanwhile


def _wait(node: NodeContext, job: Job, ready: Callable[[], bool] | None, failure: str) -> None:
    """Until ``ready()`` (None: still running after 0.3 s), for the start timeout. Its container
    is looked at in Docker (to fail if it exits or restarts) every ``LOOK_EVERY`` seconds and
    once more when ready, not at every check: the jobs of a redeploy start side by side, and
    each look is work for dockerd while it starts the others (at every check, a 10-job start
    asked about a hundred)."""
    timeout = node.platform.settings.start_timeout
    now = time.monotonic()
    deadline, settle, look = now + timeout, now + 0.3, now + READY_POLL
    while True:
        answered = ready is not None and ready()
        now = time.monotonic()
        settled = answered or (ready is None and now >= settle)
        if now >= look or settled or now >= deadline:  # (once more when ready: it may have restarted)
            _still_running(node, job)
            if settled:
                return
            if now >= deadline:
                raise StepFailed(f"job {failure} within {timeout:g}s")
            look = now + LOOK_EVERY
        time.sleep(READY_POLL)


def _still_running(node: NodeContext, job: Job) -> None:
    """Its container runs and has not restarted (a program that crashed and was restarted by
    Docker may listen again by the time it is looked at); else the step fails with its last lines."""
    state = node.runtime.inspect(job.container_name)
    if state is None:
        raise StepFailed(f"container {job.container_name} vanished while starting")
    if state.status != "running" or state.restart_count > 0:
        logs = " | ".join(node.runtime.logs(job.container_name, tail=5).splitlines())
        raise StepFailed(
            f"container exited at once (exit code {state.exit_code})"
            + (f"; last output: {logs}" if logs else "")
        )


def delete_volume(node: NodeContext, step: Step, _job: Job | None) -> dict[str, Any]:
    """A removed service's data volume, asked for with --delete-data."""
    if not step.image:
        raise StepFailed(f"step {step.id} names no volume")
    node.runtime.remove_volume(step.image)
    return {"volume": step.image}


def run_once(node: NodeContext, step: Step, _job: Job | None) -> dict[str, Any]:
    """A one-off container of the service: its current image, variables and size, the
    operation's command; its output kept with the step as it comes, its exit code the step's
    (not zero: the step fails)."""
    p = node.platform
    with p.reader() as s:
        op = catalogue.get_operation(session=s, op_id=step.op_id)
        svc = s.get(Service, op.service_id)
        env = s.get(Environment, op.env_id)
        assert svc is not None and env is not None
        wanted = spec.service_spec(s, env, svc)
    params = op.parameters
    size = wanted.size
    run_id = f"run{step.op_id}"
    environment = {**wanted.variables, "ORCH_ENV": env.name, "ORCH_SERVICE": svc.name, "ORCH_JOB": run_id,
                   "ORCH_KIND": "run", "ORCH_HOST": node.host}
    if wanted.release is not None:
        environment["ORCH_RELEASE"] = str(wanted.release)
    container = ContainerSpec(
        name=names.container_name(env.name, svc.name, run_id), image=wanted.image,
        labels={names.LABEL_ENV: env.name, names.LABEL_SERVICE: svc.name, names.LABEL_KIND: "run"},
        environment=environment, command=params.command, args=tuple(params.argv or ()) if not params.command else (),
        memory_mb=size.memory_mb, cpus=size.cpus,
    )
    timeout = p.settings.run_timeout
    return _finished(node, step, lambda output: node.runtime.run_once(container, output, timeout))


def exec_in_job(node: NodeContext, step: Step, job: Job | None) -> dict[str, Any]:
    """The operation's command in a running job's container, its output and exit code kept."""
    job = _need(job, step)
    with node.platform.reader() as s:
        params = catalogue.get_operation(session=s, op_id=step.op_id).parameters
    argv = list(params.argv or ["/bin/sh", "-c", params.command or "true"])
    return _finished(node, step, lambda output: node.runtime.exec(job.container_name, argv, output))


def _finished(node: NodeContext, step: Step, act: Callable[[Callable[[str], None]], int]) -> dict[str, Any]:
    output = BuildOutput(node, step.id or 0)
    try:
        code = act(output)
    except ContainerError as exc:
        output.flush()
        raise StepFailed(str(exc)) from None
    output.flush()
    with node.platform.session() as s:
        s.exec(update(Step).where(col(Step.id) == step.id).values(exit_code=code))
        s.commit()
    if code != 0:
        raise StepFailed(f"the command exited with code {code}")
    return {"exit_code": code}


CHECK_IMAGE = Work(check_image)
RUN_ONCE = Work(run_once)
EXEC = Work(exec_in_job)
DELETE_VOLUME = Work(delete_volume)
BUILD = Work(build)
START = Work(start_job, job_on_begin=JobState.starting, job_on_done=JobState.running,
             job_on_failure=JobState.failed)
STOP = Work(stop_job, job_on_begin=JobState.stopping, job_on_done=JobState.stopped)
START_PROXY = Work(start_proxy, job_on_begin=JobState.starting, job_on_done=JobState.running,
                   job_on_failure=JobState.failed)
ROUTE = Work(route)  # its job is the proxy job, whose state it leaves alone

# The work of each step action (waits, which ask again later, are registered on their own).
WORK_OF: dict[StepAction, Work] = {
    StepAction.check_image: CHECK_IMAGE, StepAction.build: BUILD, StepAction.start: START,
    StepAction.stop: STOP, StepAction.start_proxy: START_PROXY, StepAction.route: ROUTE,
    StepAction.delete_volume: DELETE_VOLUME, StepAction.run_once: RUN_ONCE, StepAction.exec: EXEC,
}


# --- registration ---------------------------------------------------------------------------------


NodeOf = Callable[[Task], NodeContext]  # the node a task runs for, from its request


def register(app: Celery, node: NodeContext) -> None:
    """Register the step tasks of ``node`` on ``app`` under their stable names. Their keyword
    arguments besides ``step_id`` only tell a Flower reader what the step serves."""
    register_for(app, lambda _task: node)


def register_for(app: Celery, node_of: NodeOf) -> None:
    """Register the step tasks on ``app``, each running for the node ``node_of(task)`` names: a
    process that serves many hosts' queues (``workers.sim``) finds it from the task's queue.

    Their results are not stored (``ignore_result``): nobody reads them there (the catalogue has
    each step's; Flower has them from the task events)."""

    def steps(task: Task, step_ids: Sequence[int], work: Work, env: str, service: str) -> list[dict[str, Any]]:
        node = node_of(task)
        try:
            return run_steps(node, step_ids, work, env=env, service=service)
        except SQLAlchemyError as exc:
            # The catalogue failed (locked, read-only, restarting, no free connection) before the
            # steps could begin or be recorded: ask again soon. Steps are idempotent.
            log.warning("step%s %s: the catalogue is unavailable (%s): trying again",
                        "s" if len(step_ids) > 1 else "", ", ".join(map(str, step_ids)), one_line(exc))
            raise task.retry(countdown=1.0, max_retries=CATALOGUE_RETRIES) from None

    def step(task: Task, step_id: int, work: Work, env: str, service: str) -> dict[str, Any]:
        return steps(task, [step_id], work, env, service)[0]

    def register_work(action: StepAction, work: Work) -> None:
        @app.task(name=TASK_OF[action], shared=False, bind=True, ignore_result=True)
        def work_task(self: Task, step_id: int | None = None, env: str = "", service: str = "",
                      step_ids: list[int] | None = None, **_labels: Any) -> dict[str, Any]:
            """One step (``step_id``) or a batch of a host's steps of one stage (``step_ids``)."""
            if step_ids is not None:
                return {"steps": steps(self, step_ids, work, env, service)}
            if step_id is None:
                raise StepFailed("the task names no step")
            return step(self, step_id, work, env, service)

    for action, work in WORK_OF.items():
        register_work(action, work)

    # Flower shows a result's repr cut at the task's resultrepr_maxsize: room for every step it ran.
    @app.task(name=names.TASK_HOST_STEPS, shared=False, bind=True, ignore_result=True,
              resultrepr_maxsize=200 * MAX_BOX)
    def host_steps(self: Task, host: str = "", step_ids: list[int] | None = None,
                   **_labels: Any) -> dict[str, Any]:
        """The steps waiting for this node's host, of every operation (``run_host_steps``); with
        ``step_ids``, those it took before the catalogue failed, asked for again."""
        node = node_of(self)
        try:
            if step_ids is not None:
                return {"steps": _run_again(node, step_ids)}
            return {"steps": run_host_steps(node)}
        except CatalogueFailed as exc:
            log.warning("host %s: the catalogue failed while its steps ran (%s): trying again", host,
                        one_line(exc.__cause__ or exc))
            raise self.retry(countdown=1.0, max_retries=CATALOGUE_RETRIES,
                             kwargs={"host": host, "step_ids": exc.step_ids}) from None
        except SQLAlchemyError as exc:
            log.warning("host %s: the catalogue is unavailable (%s): trying again", host, one_line(exc))
            raise self.retry(countdown=1.0, max_retries=CATALOGUE_RETRIES,
                             kwargs={"host": host, "step_ids": step_ids}) from None

    @app.task(name=TASK_OF[StepAction.wait], shared=False, bind=True, max_retries=None, ignore_result=True)
    def wait_task(self: Task, step_id: int, env: str = "", service: str = "",
                  **_labels: Any) -> dict[str, Any]:
        def body(_node: NodeContext, step_row: Step, _job: Job | None) -> dict[str, Any]:
            remaining = wait_remaining(step_row)
            if remaining > 0.05:
                # Ask again later instead of sleeping: the wait holds no worker slot. At most a
                # minute at a time: a broker gives back an unacknowledged message after its
                # visibility timeout, and a long wait must never outlast it.
                raise self.retry(countdown=min(remaining, MAX_WAIT_COUNTDOWN))
            return {"waited": step_row.seconds}

        return step(self, step_id, Work(body), env, service)


def _run_again(node: NodeContext, step_ids: Sequence[int]) -> list[dict[str, Any]]:
    """Steps a node took from its box, run again as ``run_steps`` runs a redelivered task's:
    taken over (or skipped if they ended), a batch per action."""
    with node.platform.reader() as s:
        actions = {step.id: (step.op_id, step.action)
                   for step in s.exec(select(Step).where(col(Step.id).in_(list(step_ids))))}
    results: list[dict[str, Any]] = []
    problems: list[str] = []
    for op_id, action in sorted(set(actions.values())):  # a batch as run_steps knows them: one operation's
        mine = [i for i in step_ids if actions.get(i) == (op_id, action)]
        try:
            results += run_steps(node, mine, WORK_OF[action])
        except StepFailed as exc:
            problems.append(str(exc))
    if problems:
        raise StepFailed("; ".join(problems))
    return results


def wait_remaining(step: Step) -> float:
    """Seconds an overlap wait step has still to wait, from when it started."""
    started = step.started_at or utcnow()
    return (started + timedelta(seconds=step.seconds or 0) - utcnow()).total_seconds()
