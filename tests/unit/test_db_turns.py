"""Writers of a SQLite catalogue take turns on a lock file beside it (``db.TurnTaking``): held
from BEGIN IMMEDIATE to commit or rollback, so a waiting writer wakes as the turn is let go
instead of sleeping in SQLite's busy handler."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from sqlalchemy import text

from orchestrator.db import TurnTaking, make_engine, session


def turn_is_free(db_path: Path) -> bool:
    fd = os.open(f"{db_path}-turn", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # (closing lets go of a lock this probe took)
    return True


def test_a_write_transaction_holds_the_turn_until_commit_or_rollback(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    engine = make_engine(f"sqlite:///{path}")
    with session(engine) as s:
        s.execute(text("CREATE TABLE t (n INTEGER)"))
        s.commit()
        assert turn_is_free(path)
        s.execute(text("INSERT INTO t VALUES (1)"))
        assert isinstance(s.connection().connection.dbapi_connection, TurnTaking)
        assert not turn_is_free(path)
        s.commit()
        assert turn_is_free(path)
        s.execute(text("INSERT INTO t VALUES (2)"))
        assert not turn_is_free(path)
        s.rollback()
        assert turn_is_free(path)
    with session(engine) as s:  # a session closed without commit lets it go too
        s.execute(text("INSERT INTO t VALUES (3)"))
        assert not turn_is_free(path)
    assert turn_is_free(path)
    with session(engine) as s:
        assert s.execute(text("SELECT n FROM t")).scalars().all() == [1]
    engine.dispose()


def test_a_second_writer_waits_for_the_turn_and_goes_on_when_it_is_let_go(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    first, second = make_engine(f"sqlite:///{path}"), make_engine(f"sqlite:///{path}")  # as two processes
    with session(first) as s:
        s.execute(text("CREATE TABLE t (n INTEGER)"))
        s.commit()
    done = threading.Event()

    def write() -> None:
        with session(second) as s2:
            s2.execute(text("INSERT INTO t VALUES (2)"))
            s2.commit()
        done.set()

    with session(first) as s:
        s.execute(text("INSERT INTO t VALUES (1)"))
        writer = threading.Thread(target=write)
        writer.start()
        assert not done.wait(0.3)  # waiting for its turn
        s.commit()
    assert done.wait(5)
    writer.join(5)
    with session(first) as s:
        assert sorted(s.execute(text("SELECT n FROM t")).scalars().all()) == [1, 2]
    first.dispose()
    second.dispose()

