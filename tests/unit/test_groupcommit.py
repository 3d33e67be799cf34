"""GroupCommit: concurrent short write transactions of one process committed together, each
caller getting its own result (or its own error), on a real SQLite file."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from orchestrator.groupcommit import GroupCommit, _Waiting


@pytest.fixture
def group(tmp_path: Path) -> GroupCommit:
    engine = create_engine(f"sqlite:///{tmp_path / 'g.db'}", connect_args={"check_same_thread": False})
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER PRIMARY KEY)"))
    return GroupCommit(lambda: Session(engine, expire_on_commit=False))


def rows(group: GroupCommit) -> list[int]:
    with group.open_session() as s:
        return [r[0] for r in s.execute(text("SELECT x FROM t ORDER BY x"))]


def insert(x: int) -> Callable[[Session], int]:
    def work(s: Session) -> int:
        s.execute(text("INSERT INTO t (x) VALUES (:x)"), {"x": x})
        return x * 10
    return work


def test_one_caller_alone_gets_its_own_transaction_and_result(group: GroupCommit) -> None:
    assert group.run(insert(1)) == 10
    assert rows(group) == [1] and (group.transactions, group.works) == (1, 1)


def run_while_the_first_holds(group: GroupCommit, works: dict[int, object]) -> dict[int, object]:
    """The first work waits until every other caller queued behind it: they then go together."""
    release = threading.Event()
    outcomes: dict[int, object] = {}

    def first(s: Session) -> str:
        release.wait(5)
        s.execute(text("INSERT INTO t (x) VALUES (0)"))
        return "first"

    def call(key: int, work: object) -> None:
        try:
            outcomes[key] = group.run(work)  # type: ignore[arg-type]
        except Exception as exc:
            outcomes[key] = exc

    leader = threading.Thread(target=call, args=(0, first))
    leader.start()
    while not group._leading:
        pass
    others = [threading.Thread(target=call, args=(k, w)) for k, w in works.items()]
    for t in others:
        t.start()
    while len(group._queue) < len(works):
        pass
    release.set()
    for t in [leader, *others]:
        t.join(10)
    return outcomes


def test_callers_that_wait_meanwhile_share_the_next_transaction_each_with_its_result(group: GroupCommit) -> None:
    outcomes = run_while_the_first_holds(group, {k: insert(k) for k in range(1, 21)})
    assert outcomes == {0: "first", **{k: k * 10 for k in range(1, 21)}}
    assert rows(group) == list(range(21))
    assert (group.transactions, group.works) == (2, 21)  # the first alone, the twenty together


def test_a_failing_work_fails_alone_and_the_others_of_its_transaction_are_kept(group: GroupCommit) -> None:
    def broken(s: Session) -> int:
        s.execute(text("INSERT INTO t (x) VALUES (100)"))
        raise ValueError("no")

    outcomes = run_while_the_first_holds(group, {1: insert(1), 2: broken, 3: insert(3)})
    assert outcomes[1] == 10 and outcomes[3] == 30 and outcomes[0] == "first"
    assert isinstance(outcomes[2], ValueError)
    assert rows(group) == [0, 1, 3]  # not the broken work's row


def test_a_catalogue_failure_is_everyones_and_nothing_of_that_transaction_is_kept(group: GroupCommit) -> None:
    """Locked, gone, or a commit that may have landed: each caller gets the catalogue's error, as
    it would have alone (and asks again), rather than a second try that could count twice."""
    def duplicate(s: Session) -> int:
        s.execute(text("INSERT INTO t (x) VALUES (1)"))  # 1 is inserted by an earlier work too
        return 0

    outcomes = run_while_the_first_holds(group, {1: insert(1), 2: duplicate, 3: insert(3)})
    assert outcomes[0] == "first"
    assert all(isinstance(outcomes[k], SQLAlchemyError) for k in (1, 2, 3)), outcomes
    assert rows(group) == [0]


def test_a_waiting_caller_interrupted_leaves_no_one_stuck(group: GroupCommit) -> None:
    release = threading.Event()

    def slow(s: Session) -> int:
        release.wait(5)
        return 1

    leader = threading.Thread(target=group.run, args=(slow,))
    leader.start()
    while not group._leading:
        pass
    follower = _Waiting(insert(5))
    group._queue.append(follower)  # as run() queues a caller that then waits
    release.set()
    leader.join(5)
    assert follower.lead and group._leading  # the leader handed it the next transaction...
    group._leave(follower)  # ...just as it was interrupted (KeyboardInterrupt, SystemExit)
    after: list[int] = []
    caller = threading.Thread(target=lambda: after.append(group.run(insert(6))))
    caller.start()
    caller.join(5)
    assert after == [60]  # the next caller leads at once: nobody waits for the gone one
    assert rows(group) == [6]
