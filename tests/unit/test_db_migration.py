"""An older catalogue file gets the columns added since, and its rows stay readable."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import select

from orchestrator import db
from orchestrator.db import add_missing_columns, make_engine, session
from orchestrator.models import Job, Service


def test_older_catalogue_is_migrated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript("""
        create table job (id varchar primary key, service_id int, kind varchar, host varchar,
                          container_name varchar, state varchar, image varchar, size varchar,
                          environment json not null);
        insert into job values ('a', 1, 'deploy', 'h1', 'c', 'stopped', 'img', 's', '{}');
    """)
    conn.close()
    added: list[list[str]] = []  # what each start's add_missing_columns reported

    def recording(engine: Engine) -> list[str]:
        added.append(add_missing_columns(engine))
        return added[-1]

    monkeypatch.setattr(db, "add_missing_columns", recording)
    engine = make_engine(f"sqlite:///{path}")
    assert len(added) == 1 and {"job.args", "job.mounts", "job.port"} <= set(added[0]), added
    with session(engine) as s:
        job = s.exec(select(Job)).one()
        assert (job.id, job.args, job.mounts, job.port) == ("a", [], {}, None)
        assert s.exec(select(Service)).all() == []  # missing tables are made too
    engine.dispose()

    # A second start finds nothing to add: whatever it runs adds nothing, and neither does a
    # migration run against the file it left.
    added.clear()
    again = make_engine(f"sqlite:///{path}")
    assert all(a == [] for a in added), added
    assert add_missing_columns(again) == []


def test_a_catalogue_made_before_an_index_gets_it_at_the_next_start(tmp_path: Path) -> None:
    """Indexes added to the models since a catalogue was made (its tables and columns all there)
    are created by the next start, and the start after finds nothing to do."""
    path = tmp_path / "c.db"
    make_engine(f"sqlite:///{path}").dispose()
    conn = sqlite3.connect(path)
    conn.executescript("drop index ix_job_service_id_state; drop index ix_operation_state; drop index ix_step_state;")
    conn.close()

    make_engine(f"sqlite:///{path}").dispose()
    conn = sqlite3.connect(path)
    indexes = {name for (name,) in conn.execute("select name from sqlite_master where type = 'index'")}
    plan = conn.execute("explain query plan select * from job where service_id = 1 and state = 'running'").fetchall()
    conn.close()
    assert {"ix_job_service_id_state", "ix_operation_state", "ix_step_state"} <= indexes
    assert "ix_job_service_id_state" in str(plan)
    assert add_missing_columns(make_engine(f"sqlite:///{path}")) == []
