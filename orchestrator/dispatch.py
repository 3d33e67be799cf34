"""Recorded steps -> Celery tasks, a stage at a time. The one place that sends work to the nodes.

Stages run one after the other; the tasks of a stage run in parallel (a group, which Celery
joins with a chord). Each task goes to the queue of the host it touches. A stage's chord calls
back ``advance`` (``orchestrator.control``), which sends the next stage from the catalogue, and
the last stage's calls back the operation's finish: each message carries its own step(s) and that
one small callback, never the rest of the chain (a chain sent whole puts every later stage into
each message of the first: a 1000-job operation's first 1000 messages would hold 1000 steps
each). A task carries one step, or all of a stage's starts (or stops) on one host
(``batches``): one message and two catalogue transactions for the lot, each step still its own
row with its own state, and the task's arguments name every step and job it carries.
``Dispatch`` is the interface the control plane uses; ``workers.inline.InlineDispatch`` is its
in-process twin for unit tests.

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
# alike; every other step (an image check, a route, a build, a wait) is one of a kind.
BATCHED = frozenset({StepAction.start, StepAction.stop})
# Steps in one task at most: the node runs them all at once, and Flower shows a task's arguments
# cut at 1024 characters (each step adds its id and its job's).
MAX_BATCH = 16


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
                   service: str) -> None:
        """Send the operation's stage ``index`` (of ``stages``, all of them) and, to run once
        it succeeded, the advance to the next stage, or after the last the operation's finish."""

    def send_finish(self, op_id: int, *, env: str, service: str, host: str | None) -> None:
        """Ask for the operation to be finished (no stage follows a failed one), on the
        queue of ``host`` (the control queue when None). Both raise SendFailed when nothing
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
                   service: str) -> None:
        from celery import chain, group

        home = _home_queue(stages)
        sigs = [self._steps(batch, env=env, service=service,
                            queue=names.host_queue(batch[0].host) if batch[0].host else home)
                for batch in batches(stages[index])]
        labels = {"env": env, "service": service}
        then = (self.app.signature(names.TASK_ADVANCE, kwargs={"op_id": op_id, "stage": index + 1, **labels},
                                   queue=home, immutable=True)
                if index + 1 < len(stages) else self._finish(op_id, env=env, service=service, queue=home))
        _send(chain(sigs[0] if len(sigs) == 1 else group(sigs), then), self.app)

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
