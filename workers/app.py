"""The Celery app, made from settings. Control processes use it to send; nodes to run tasks."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from orchestrator.db import make_engines
from orchestrator.operations import Platform
from orchestrator.settings import Settings
from workers.runtime.base import Runtime


@dataclass
class NodeContext:
    """What a node's tasks act with: the platform (catalogue, app) and this host's Docker."""

    platform: Platform
    host: str
    address: str
    runtime: Runtime
    port_lock: threading.Lock = field(default_factory=threading.Lock)  # one port move at a time


class OrchestratorCelery(Celery):
    """A Celery app that carries the platform it serves (and, on a node, the node's host)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.platform: Platform | None = None
        self.node: NodeContext | None = None


def create_app(settings: Settings) -> OrchestratorCelery:
    """A Celery app on the configured broker, with the platform's tasks registered."""
    app = OrchestratorCelery("orchestrator", set_as_current=False)
    app.config_from_object("celeryconfig")
    app.conf.broker_url = settings.broker_url
    app.conf.result_backend = settings.backend_url
    from orchestrator.control import register as register_control
    from workers.tasks import register as register_steps

    register_steps(app)
    register_control(app)
    return app


def make_platform(settings: Settings) -> Platform:
    """The catalogue's engine and the Celery app, bound together."""
    app = create_app(settings)
    writer, reader = make_engines(settings.database_url)
    platform = Platform(writer, app, settings, reader)
    app.platform = platform
    return platform
