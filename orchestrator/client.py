"""A tiny client for the platform's task API. It needs only ``celery``: copy it anywhere.

Example, from any process that can reach the broker::

    from orchestrator.client import PlatformClient

    client = PlatformClient("redis://127.0.0.1:6379/0")
    op_id = client.redeploy("prod", "web")  # the operation id; follow it with `orchestrator ops watch`
    client.scale("prod", "web", 3)
    client.push("prod", "web", "registry.example/web:42")
    client.worker_scale("prod", "web", "mailer", "+1")

Each call enqueues one task on the ``orchestrator`` queue (a control worker, ``orchestrator
control run``, consumes it) and waits for the operation id. A refused request raises
``RequestRefused`` with the platform's reason; nothing was changed then.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as ResultTimeout

QUEUE = "orchestrator"


class RequestRefused(Exception):
    """The platform refused the request (bad argument, unknown service, ...); nothing changed."""


class PlatformClient:
    def __init__(self, broker_url: str, result_backend: str | None = None, timeout: float = 30.0) -> None:
        self.app = Celery("orchestrator-client", broker=broker_url,
                          backend=result_backend or broker_url, set_as_current=False)
        self.app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
        self.timeout = timeout

    def redeploy(self, env: str, service: str, support: bool = False) -> int:
        return self._call("redeploy", env=env, service=service, support=support)

    def scale(self, env: str, service: str, scale: int) -> int:
        return self._call("scale", env=env, service=service, scale=scale)

    def push(self, env: str, service: str, image: str, support: bool = False) -> int:
        return self._call("push", env=env, service=service, image=image, support=support)

    def worker_scale(self, env: str, service: str, target: str, scale: int | str) -> int:
        """``scale`` is N, or "+N"/"-N" to change the current scale."""
        return self._call("worker_scale", env=env, service=service, target=target, scale=scale)

    def _call(self, name: str, **kwargs: Any) -> int:
        result = self.app.send_task(f"orchestrator.{name}", kwargs=kwargs, queue=QUEUE)
        try:
            op_id = result.get(timeout=self.timeout)
        except ResultTimeout:
            raise  # no control worker answered (is `orchestrator control run` up?)
        except Exception as exc:  # the task failed: the platform's reason, rebuilt by Celery
            raise RequestRefused(f"orchestrator.{name} refused: {exc}") from exc
        result.forget()
        return int(op_id)
