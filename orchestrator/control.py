"""The control plane's Celery tasks, registered by the processes that consume their queues.

- The task API other services call with ``send_task`` on the ``orchestrator`` queue: each task
  validates, records and starts an operation exactly as the CLI does, and returns its id. Bad
  arguments fail the task with ``InvalidRequest`` and change nothing.
- The tasks that carry an operation on when the node that ended a stage did not (it does so
  itself, at once: ``operations.stage_ended``): finish, sent after a failed step (to that
  step's node) or when a finish must wait for steps still running; advance, which older nodes
  send (the fleet watcher advances a stage whose advance was lost, in its own process).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from sqlalchemy.exc import SQLAlchemyError

from orchestrator import operations, requests, who
from orchestrator.errors import BadInput
from orchestrator.names import (
    TASK_ADVANCE,
    TASK_API_PUSH,
    TASK_API_REDEPLOY,
    TASK_API_SCALE,
    TASK_API_WORKER_SCALE,
    TASK_FINISH,
)
from orchestrator.platform import Platform

ADVANCE_RETRIES = 20  # asks of an advance whose stage before has not ended; then the watcher's


class InvalidRequest(Exception):
    """The request was refused; nothing was changed."""


def register_operation_tasks(app: Celery, platform: Platform) -> None:
    """An operation's advance (sends its next stage) and finish tasks, on ``app`` (a node's or
    the control worker's)."""

    @app.task(name=TASK_ADVANCE, shared=False, bind=True, max_retries=None, ignore_result=True)
    def advance(self: Task, op_id: int, stage: int, env: str = "", service: str = "",
                **_labels: Any) -> dict[str, Any]:
        try:
            sent = operations.advance(platform, op_id, stage, env=env, service=service)
        except SQLAlchemyError:  # the catalogue failed for a while: ask again (the watcher would too)
            raise self.retry(countdown=1.0) from None
        if sent is None:  # a step before it has not ended yet (its end is being written): soon
            raise self.retry(countdown=0.5, max_retries=ADVANCE_RETRIES)
        return {"op": op_id, "stage": stage, "sent": sent}

    @app.task(name=TASK_FINISH, shared=False, bind=True, max_retries=None, ignore_result=True)
    def finish(self: Task, op_id: int, **_labels: Any) -> dict[str, Any]:
        try:
            ended = operations.finish(platform, op_id)
        except SQLAlchemyError:  # the catalogue failed for a while: ask again (the watcher would too)
            raise self.retry(countdown=1.0) from None
        if ended is None:  # steps sent beside a failed one are still running: ask again soon
            raise self.retry(countdown=0.5)
        return {"op": op_id, "ended": ended}


def register_api(app: Celery, platform: Platform) -> None:
    """The task API (consumed by ``orchestrator control run``)."""

    def start(request: Callable[..., Any], **kwargs: Any) -> int:
        asked = who.asker.set("send_task")
        try:
            op = request(platform, **kwargs)
        except BadInput as exc:
            raise InvalidRequest(str(exc)) from None
        finally:
            who.asker.reset(asked)
        return int(op.id)

    @app.task(name=TASK_API_REDEPLOY, shared=False)
    def redeploy(env: str, service: str, support: bool = False) -> int:
        return start(requests.request_redeploy, env=env, service=service, support=bool(support))

    @app.task(name=TASK_API_SCALE, shared=False)
    def scale(env: str, service: str, scale: int) -> int:
        return start(requests.request_scale, env=env, service=service, scale=scale)

    @app.task(name=TASK_API_PUSH, shared=False)
    def push(env: str, service: str, image: str, support: bool = False) -> int:
        return start(requests.request_push, env=env, service=service, image=image, support=bool(support))

    @app.task(name=TASK_API_WORKER_SCALE, shared=False)
    def worker_scale(env: str, service: str, target: str, scale: int | str) -> int:
        return start(requests.request_worker_scale, env=env, service=service, target=target,
                     scale=scale)
