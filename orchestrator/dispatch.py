"""Recorded steps -> Celery tasks, a stage at a time. The one place that sends work to the nodes.

Stages run one after the other; the steps of a stage run in parallel, each on the node of the
host it touches. A stage ends when its last step ends: whoever ends that step (its node, in the
transaction that ends it: ``catalogue.stage_left``) does what comes next, at once
(``operations.stage_ended``): the next stage claimed and sent from the catalogue
(``operations.advance``), or after the last stage the operation's finish. The advance task
(``orchestrator.control``) is what the fleet watcher's net and older nodes send.

How a stage's steps travel:

- The steps that are many and alike (``BOXED``: a job's start or stop, a host's image check)
  wait in the catalogue for their host's node, which takes every one waiting for it, of every
  operation, in one task (``orchestrator.step.host_steps``; ``catalogue.claim_host_steps``). Its
  host is "rung" (``catalogue.ring_hosts``, in the transaction that makes the stage sent): a
  task is sent to a host only when none is on its way. Twenty operations redeploying at once on
  a hundred hosts are then a few tasks per host and stage, not one per job. Each step keeps its
  own row, state and error; the task's result names every step it ran, with its operation and
  job (Flower shows it).
- Every other step (a wait, a route, a build, ...) is a task of its own on its host's queue,
  named by its step id (``step_task_id``; a cancel revokes it), with arguments that tell a
  Flower reader what it serves. ``batches`` groups the boxed ones the same way for the in-process
  twin (``workers.inline.InlineDispatch``, for unit tests).

Celery is imported by ``CeleryDispatch`` as it sends, not with this module: what only reads the
catalogue (``orchestrator hosts list``, ``jobs list``) never loads it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from orchestrator import names, service_types
from orchestrator.errors import one_line
from orchestrator.models import Step, StepAction

if TYPE_CHECKING:
    from celery import Celery
    from celery.canvas import Signature

log = logging.getLogger(__name__)

TASK_OF = {
    StepAction.check_image: names.TASK_CHECK_IMAGE,
    StepAction.start: names.TASK_START_JOB,
    StepAction.stop: names.TASK_STOP_JOB,
    StepAction.wait: names.TASK_WAIT,
    StepAction.start_proxy: names.TASK_START_PROXY,
    StepAction.route: names.TASK_ROUTE,
    StepAction.build: names.TASK_BUILD,
    StepAction.delete_volume: names.TASK_DELETE_VOLUME,
    StepAction.run_once: names.TASK_RUN_ONCE,
    StepAction.exec: names.TASK_EXEC,
}


# Actions whose steps of one stage and host travel together: they are many (a job each) and
# alike; every other step (a route, a build, a wait) is one of a kind.
BATCHED = frozenset({StepAction.start, StepAction.stop})
# Steps in one task at most: the node runs them all at once, and Flower shows a task's arguments
# cut at 1024 characters (each step adds its id and its job's).
MAX_BATCH = 16
# Actions whose steps wait in the catalogue for their host's node (the steps of a host, of
# every operation, taken together): those of ``BATCHED``, and a host's image check.
BOXED = frozenset({StepAction.start, StepAction.stop, StepAction.check_image})
# Steps a node takes from its box in one task at most (it sends itself another for the rest):
# as many as it runs at once, so that none is marked running while it waits for a thread (a
# cancel skips what has not begun). A host rung (a task sent to it) whose node has taken
# nothing ``orphan_after`` seconds later is rung again: the task's message may have been lost,
# with a node that died holding it or a process that died between ringing and sending.
MAX_BOX = MAX_BATCH


def boxed(step: Routed) -> bool:
    """Whether the step waits in the catalogue for its host's node (not a task of its own)."""
    return step.action in BOXED and bool(step.host)


def boxed_hosts(stage: Sequence[Step]) -> list[str]:
    """The hosts whose node takes steps of ``stage`` from its box (to be rung)."""
    return sorted({step.host for step in stage if boxed(step) and step.host})


class Routed(Protocol):
    """A step as far as where it goes: a ``Step``, or what ``InlineDispatch`` keeps of one."""

    @property
    def action(self) -> StepAction: ...

    @property
    def host(self) -> str | None: ...


R = TypeVar("R", bound=Routed)


def batches(stage: Sequence[R]) -> list[list[R]]:
    """A stage's steps as the tasks that carry them, in the stage's order: a host's starts
    together, its stops together (``MAX_BATCH`` at most in one task), every other step alone."""
    tasks: list[list[R]] = []
    together: dict[tuple[StepAction, str], list[R]] = {}
    for step in stage:
        if step.action in BATCHED and step.host:
            key = (step.action, step.host)
            if key not in together or len(together[key]) == MAX_BATCH:
                together[key] = []
                tasks.append(together[key])
            together[key].append(step)
        else:
            tasks.append([step])
    return tasks


class SendFailed(Exception):
    """Nothing was sent: the broker could not be reached."""


class Dispatch(Protocol):
    def send_stage(self, op_id: int, stages: Sequence[Sequence[Step]], index: int, *, env: str,
                   service: str, rung: Sequence[str] = ()) -> None:
        """Send the operation's stage ``index`` (of ``stages``, all of them): a task for each
        step that is not ``BOXED``, and one to the node of each host in ``rung`` (the boxed
        steps' hosts that ``catalogue.ring_hosts`` rang) to take its waiting steps."""

    def send_host_steps(self, hosts: Sequence[str]) -> None:
        """A task to each host's node to take the steps waiting for it."""

    def send_finish(self, op_id: int, *, env: str, service: str, host: str | None) -> None:
        """Ask for the operation to be finished (no stage follows a failed one), on the
        queue of ``host`` (the control queue when None). Each raises SendFailed when nothing
        could be sent."""

    def revoke(self, step_ids: Sequence[int]) -> None:
        """Tell the nodes to drop these steps' tasks (a cancel); best effort: a task that runs
        anyway finds its step skipped and does nothing."""


def step_task_id(step_id: int) -> str:
    """A step's Celery task id (a batch's is its first step's): the same for its retries and
    redeliveries, and known to cancel."""
    return f"orch-step-{step_id}"


class CeleryDispatch:
    def __init__(self, app: Celery) -> None:
        self.app = app

    def send_stage(self, op_id: int, stages: Sequence[Sequence[Step]], index: int, *, env: str,
                   service: str, rung: Sequence[str] = ()) -> None:
        from celery import group

        home = _home_queue(stages)
        alone = [step for step in stages[index] if not boxed(step)]
        sigs = [self._steps(batch, env=env, service=service,
                            queue=names.host_queue(batch[0].host) if batch[0].host else home)
                for batch in batches(alone)]
        sigs += [self._host_steps(host) for host in rung]
        if sigs:
            _send(sigs[0] if len(sigs) == 1 else group(sigs), self.app)

    def send_host_steps(self, hosts: Sequence[str]) -> None:
        from celery import group

        if hosts:
            sigs = [self._host_steps(host) for host in hosts]
            _send(sigs[0] if len(sigs) == 1 else group(sigs), self.app)

    def _host_steps(self, host: str) -> Signature:
        return self.app.signature(names.TASK_HOST_STEPS, kwargs={"host": host}, queue=names.host_queue(host),
                                  immutable=True)

    def send_finish(self, op_id: int, *, env: str, service: str, host: str | None) -> None:
        queue = names.host_queue(host) if host else names.CONTROL_QUEUE
        _send(self._finish(op_id, env=env, service=service, queue=queue), self.app)

    def _steps(self, steps: Sequence[Step], *, env: str, service: str, queue: str) -> Signature:
        """The task of one step (``step_id``, ``job``) or of a batch (``step_ids``, ``jobs``),
        plus arguments that tell a Flower reader what it serves. Its id is its first step's."""
        first = steps[0]
        kwargs: dict[str, Any] = {"op": first.op_id, "env": env, "service": service, "host": first.host}
        if len(steps) == 1:
            kwargs.update(step_id=first.id, job=first.job_id)
        else:
            kwargs.update(step_ids=[s.id for s in steps], jobs=[s.job_id for s in steps])
        return self.app.signature(TASK_OF[first.action], kwargs=kwargs, queue=queue, immutable=True,
                                  task_id=step_task_id(first.id or 0))

    def revoke(self, step_ids: Sequence[int]) -> None:
        from kombu.exceptions import OperationalError

        if not step_ids:
            return
        try:
            self.app.control.revoke([step_task_id(i) for i in step_ids])
        except (OperationalError, OSError) as exc:  # the steps are skipped in the catalogue anyway
            log.warning("revoking the tasks of steps %s failed: %s", list(step_ids), one_line(exc))

    def _finish(self, op_id: int, *, env: str, service: str, queue: str) -> Signature:
        return self.app.signature(
            names.TASK_FINISH, kwargs={"op_id": op_id, "env": env, "service": service},
            queue=queue, immutable=True,
        )


def _send(signature: Signature, app: Celery) -> None:
    from kombu.exceptions import OperationalError

    try:
        signature.apply_async()
    except (OperationalError, OSError, RuntimeError) as exc:
        # RuntimeError: Celery's result store (the broker's Redis) could not be reached either
        where = f"broker {masked(str(app.conf.broker_url))}, results {masked(str(app.conf.result_backend))}"
        raise SendFailed(f"{where}: {one_line(exc) or type(exc).__name__}") from exc


def masked(url: str) -> str:
    """A URL with its credentials hidden (``service_types.mask``); one without them as it is."""
    _scheme, sep, rest = url.partition("://")
    return service_types.mask(url) if sep and "@" in rest else url


def _home_queue(stages: Sequence[Sequence[Step]]) -> str:
    """Where the host-less tasks (waits, the finish) run: the node of the first host touched."""
    for stage in stages:
        for step in stage:
            if step.host:
                return names.host_queue(step.host)
    return names.CONTROL_QUEUE
