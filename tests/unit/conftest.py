"""The ``world`` fixture: an empty catalogue, the inline dispatch and two hosts (h1, h2) with
fake runtimes, for unit tests of operations, the fleet and the node's tasks (see world.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine

from orchestrator.db import make_engines
from orchestrator.settings import Settings
from tests.unit.world import FakeClock, World, make_settings, make_world
from workers import tasks


@pytest.fixture(scope="session")
def catalogue_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Engine, Engine]]:
    """One SQLite catalogue for the session, emptied before each test: new engines per test
    would compile every statement again."""
    settings = make_settings(tmp_path_factory.mktemp("catalogue") / "c.db")
    writer, reader = make_engines(settings.database_url)
    yield settings, writer, reader
    writer.dispose()
    reader.dispose()


@pytest.fixture
def world(catalogue_file: tuple[Settings, Engine, Engine], monkeypatch: pytest.MonkeyPatch) -> World:
    monkeypatch.setattr(tasks, "time", FakeClock())
    return make_world(*catalogue_file)
