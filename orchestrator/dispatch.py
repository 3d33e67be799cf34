"""Recorded steps -> one Celery chain. The one place that sends work to the nodes.

Stages run one after the other; the steps of a stage run in parallel (a group, which Celery
joins with a chord before the next stage). Each step goes to the queue of the host it touches;
the chain ends with the operation's finish task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Celery, chain, group
from celery.canvas import Signature

from orchestrator import names
from orchestrator.models import Step, StepAction

_TASK_OF = {
    StepAction.check_image: names.TASK_CHECK_IMAGE,
    StepAction.start: names.TASK_START_JOB,
    StepAction.stop: names.TASK_STOP_JOB,
    StepAction.wait: names.TASK_WAIT,
}


def step_signature(app: Celery, step: Step, *, env: str, service: str, queue: str) -> Signature:
    """A step's task: its id, plus arguments that tell a Flower reader what it serves."""
    kwargs: dict[str, Any] = {
        "step_id": step.id, "op": step.op_id, "env": env, "service": service,
        "host": step.host, "job": step.job_id,
    }
    return app.signature(_TASK_OF[step.action], kwargs=kwargs, queue=queue, immutable=True)


def finish_signature(app: Celery, op_id: int, *, env: str, service: str, queue: str) -> Signature:
    return app.signature(
        names.TASK_FINISH, kwargs={"op_id": op_id, "env": env, "service": service},
        queue=queue, immutable=True,
    )


def send_operation(app: Celery, op_id: int, stages: Sequence[Sequence[Step]], *, env: str,
                   service: str) -> str:
    """Send the operation's chain; returns the Celery id of its last task."""
    home = _home_queue(stages)
    parts: list[Signature] = []
    for stage in stages:
        sigs = [
            step_signature(app, s, env=env, service=service,
                           queue=names.host_queue(s.host) if s.host else home)
            for s in stage
        ]
        parts.append(sigs[0] if len(sigs) == 1 else group(sigs))
    parts.append(finish_signature(app, op_id, env=env, service=service, queue=home))
    result = chain(*parts).apply_async()
    return str(result.id)


def send_finish(app: Celery, op_id: int, *, env: str, service: str, queue: str) -> None:
    """Ask for the operation to be finished (the chain stops at a failed step)."""
    finish_signature(app, op_id, env=env, service=service, queue=queue).apply_async()


def _home_queue(stages: Sequence[Sequence[Step]]) -> str:
    """Where the host-less tasks (waits, the finish) run: the node of the first host touched."""
    for stage in stages:
        for step in stage:
            if step.host:
                return names.host_queue(step.host)
    return names.CONTROL_QUEUE
