"""The Celery app, made from settings. Control processes use it to send; nodes to run tasks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery import Celery

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


class OrchestratorCelery(Celery):
    node: NodeContext | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.node = None


def create_app(settings: Settings) -> OrchestratorCelery:
    """A Celery app on the configured broker, with the platform's tasks registered."""
    app = OrchestratorCelery("orchestrator", set_as_current=False)
    app.config_from_object("celeryconfig")
    app.conf.broker_url = settings.broker_url
    app.conf.result_backend = settings.backend_url
    from workers import tasks

    tasks.register(app)
    return app
