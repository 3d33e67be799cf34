"""The control plane's handle on the world: the catalogue's engines, the Celery app it sends
with, the dispatcher and the settings. ``make_platform`` builds it; everything that acts is
passed one. The app it builds only sends: a process that consumes a queue registers the tasks
it runs (``workers.node`` for a host's steps, ``orchestrator.control`` for the control queue).
"""

from __future__ import annotations

from celery import Celery
from sqlalchemy.engine import Engine
from sqlmodel import Session

from orchestrator.db import make_engines
from orchestrator.db import session as new_session
from orchestrator.dispatch import CeleryDispatch, Dispatch
from orchestrator.settings import Settings


class Platform:
    """What the control side needs to act: the catalogue, a way to send work, settings."""

    def __init__(self, engine: Engine, app: Celery, settings: Settings, *,
                 reader: Engine | None = None, dispatch: Dispatch | None = None) -> None:
        self.engine = engine
        self.reader_engine = reader or engine
        self.app = app
        self.settings = settings
        self.dispatch: Dispatch = dispatch or CeleryDispatch(app)

    def session(self) -> Session:
        return new_session(self.engine)

    def reader(self) -> Session:
        """A session for reads only (listings, progress): it never waits for the writer."""
        return new_session(self.reader_engine)


def create_app(settings: Settings) -> Celery:
    """A Celery app on the configured broker, with no tasks: it sends by task name."""
    app = Celery("orchestrator", set_as_current=False)
    app.config_from_object("celeryconfig")
    app.conf.broker_url = settings.broker_url
    app.conf.result_backend = settings.backend_url
    return app


def make_platform(settings: Settings) -> Platform:
    """The catalogue's engines (schema made or migrated) and a Celery app, bound together."""
    writer, reader = make_engines(settings.database_url)
    return Platform(writer, create_app(settings), settings, reader=reader)
