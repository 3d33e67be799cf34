"""An older catalogue file gets the columns added since, and its rows stay readable."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlmodel import select

from orchestrator.db import make_engine, session
from orchestrator.models import Job, Service


def test_older_catalogue_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript("""
        create table job (id varchar primary key, service_id int, kind varchar, host varchar,
                          container_name varchar, state varchar, image varchar, size varchar,
                          environment json not null);
        insert into job values ('a', 1, 'deploy', 'h1', 'c', 'stopped', 'img', 's', '{}');
    """)
    conn.close()
    engine = make_engine(f"sqlite:///{path}")
    with session(engine) as s:
        job = s.exec(select(Job)).one()
        assert (job.id, job.args, job.mounts, job.port) == ("a", [], {}, None)
        assert s.exec(select(Service)).all() == []  # missing tables are made too
    make_engine(f"sqlite:///{path}")  # a second start finds nothing to add
