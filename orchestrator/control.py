"""The stable task API other services call with ``send_task`` on the ``orchestrator`` queue.

Each task validates, records and starts an operation exactly as the CLI does, and returns the
operation id. Bad arguments fail the task with ``InvalidRequest`` and change nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery, Task

from orchestrator import operations
from orchestrator.catalogue import BadInput
from orchestrator.names import (
    TASK_API_PUSH,
    TASK_API_REDEPLOY,
    TASK_API_SCALE,
    TASK_API_WORKER_SCALE,
)


class InvalidRequest(Exception):
    """The request was refused; nothing was changed."""


def _platform(task: Task) -> operations.Platform:
    platform = getattr(task.app, "platform", None)
    if not isinstance(platform, operations.Platform):
        raise InvalidRequest("this worker has no catalogue")
    return platform


def _start(task: Task, request: Callable[..., Any], **kwargs: Any) -> int:
    try:
        op = request(_platform(task), **kwargs)
    except BadInput as exc:
        raise InvalidRequest(str(exc)) from None
    return int(op.id)


def register(app: Celery) -> None:
    """Register the control tasks (consumed by ``orchestrator control run``)."""

    @app.task(name=TASK_API_REDEPLOY, shared=False, bind=True)
    def redeploy(self: Task, env: str, service: str, support: bool = False) -> int:
        return _start(self, operations.request_redeploy, env=env, service=service,
                      support=bool(support))

    @app.task(name=TASK_API_SCALE, shared=False, bind=True)
    def scale(self: Task, env: str, service: str, scale: int) -> int:
        if isinstance(scale, bool) or not isinstance(scale, int):
            raise InvalidRequest(f"scale must be an integer, not {scale!r}")
        return _start(self, operations.request_scale, env=env, service=service, scale=scale)

    @app.task(name=TASK_API_PUSH, shared=False, bind=True)
    def push(self: Task, env: str, service: str, image: str) -> int:
        if not isinstance(image, str):
            raise InvalidRequest("image must be a string")
        return _start(self, operations.request_push, env=env, service=service, image=image)

    @app.task(name=TASK_API_WORKER_SCALE, shared=False, bind=True)
    def worker_scale(self: Task, env: str, service: str, target: str, scale: int | str) -> int:
        return _start(self, operations.request_worker_scale, env=env, service=service,
                      target=target, scale=scale)
