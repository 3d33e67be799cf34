"""The control plane's handle on the world: the catalogue's engines, the Celery app it sends
with, the dispatcher and the settings. ``make_platform`` builds it; everything that acts is
passed one. The app it builds only sends: a process that consumes a queue registers the tasks
it runs (``workers.node`` for a host's steps, ``orchestrator.control`` for the control queue).
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine
from sqlmodel import Session

from orchestrator.db import make_engines
from orchestrator.db import session as new_session
from orchestrator.dispatch import CeleryDispatch, Dispatch
from orchestrator.groupcommit import GroupCommit
from orchestrator.settings import Settings

if TYPE_CHECKING:
    from celery import Celery


class Platform:
    """What the control side needs to act: the catalogue, a way to send work, settings. The
    Celery app, when none is given, is made when first used: a command that only reads the
    catalogue never imports Celery."""

    def __init__(self, engine: Engine, app: Celery | None, settings: Settings, *,
                 reader: Engine | None = None, dispatch: Dispatch | None = None) -> None:
        self.engine = engine
        self.reader_engine = reader or engine
        self.settings = settings
        if app is not None:
            self.app = app
        if dispatch is not None:
            self.dispatch = dispatch

    @cached_property
    def app(self) -> Celery:
        return create_app(self.settings)

    @cached_property
    def dispatch(self) -> Dispatch:
        return CeleryDispatch(self.app)

    def session(self) -> Session:
        return new_session(self.engine)

    @cached_property
    def together(self) -> GroupCommit:
        """Short write transactions of this process's threads, committed together (a node's
        step begins and ends, its heartbeats): ``p.together.run(work)``."""
        return GroupCommit(self.session)

    def reader(self) -> Session:
        """A session for reads only (listings, progress): it never waits for the writer."""
        return new_session(self.reader_engine)


def create_app(settings: Settings) -> Celery:
    """A Celery app on the configured broker, with no tasks: it sends by task name."""
    from celery import Celery

    app = Celery("orchestrator", set_as_current=False)
    app.config_from_object("celeryconfig")
    app.conf.broker_url = settings.broker_url
    app.conf.result_backend = settings.backend_url
    return app


def make_platform(settings: Settings) -> Platform:
    """The catalogue's engines (schema made or migrated); its Celery app is made when first used."""
    writer, reader = make_engines(settings.database_url)
    return Platform(writer, None, settings, reader=reader)
