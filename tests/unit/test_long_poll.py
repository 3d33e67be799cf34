"""The API's long poll of an operation (``GET /operations/{id}`` with If-None-Match and ?wait=):
it answers ``WAIT_GATHER`` after the first step's change it sees, with what moved meanwhile, and
an operation's own change of state (its end) at once. On a bulk catalogue with the API in this
process; a thread changes the catalogue meanwhile."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlmodel import col, select

from orchestrator.api import app as api_app
from orchestrator.models import Operation, OpState, Step, StepState
from tests.bulk import Catalogue, api_call, make_catalogue


@pytest.fixture
def bulk(tmp_path: Path) -> Iterator[Catalogue]:
    """One operation of two steps, under way: its steps waiting."""
    c = make_catalogue(f"sqlite:///{tmp_path / 'c.db'}", jobs=4, operations=1, services=1, hosts=1)
    with c.platform.session() as s:
        s.exec(update(Operation).values(state=OpState.running, finished_at=None))
        s.exec(update(Step).values(state=StepState.pending, finished_at=None))
        s.commit()
    yield c
    c.close()


def meanwhile(*changes: tuple[float, Callable[[], None]]) -> threading.Thread:
    """Each change made in a thread, its seconds after now."""
    t0 = time.monotonic()

    def run() -> None:
        for at, change in changes:
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            change()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def step_moves(c: Catalogue, index: int, state: StepState) -> Callable[[], None]:
    def change() -> None:
        with c.platform.session() as s:
            step_id = sorted(s.exec(select(Step.id)))[index]
            s.exec(update(Step).where(col(Step.id) == step_id).values(state=state))
            s.commit()
    return change


def operation_ends(c: Catalogue) -> Callable[[], None]:
    def change() -> None:
        with c.platform.session() as s:
            s.exec(update(Operation).values(state=OpState.succeeded))
            s.commit()
    return change


def long_poll(c: Catalogue, wait: float, *changes: tuple[float, Callable[[], None]]) -> tuple[int, Any, float]:
    """The operation as it is (its ETag), then a long poll of it while ``changes`` are made, each
    its seconds after the poll began (0: before it): (status, body, seconds waited)."""
    with c.platform.reader() as s:
        op_id = s.exec(select(Operation.id)).one()
    status, body, headers = api_call(c.api, f"/api/v1/operations/{op_id}", c.filled.token)
    assert status == 200 and [st["state"] for st in body["steps"]] == ["pending", "pending"], body
    for at, change in changes:
        if at <= 0:
            change()
    t0 = time.monotonic()
    changing = meanwhile(*[(at, change) for at, change in changes if at > 0])
    status, body, _ = api_call(c.api, f"/api/v1/operations/{op_id}?wait={wait:g}", c.filled.token,
                               headers={"If-None-Match": headers["etag"]})
    waited = time.monotonic() - t0
    changing.join()
    return status, body, waited


@pytest.mark.parametrize(
    ("gather", "first", "second", "at_least", "below"),
    [
        pytest.param(1.0, 0.05, 0.3, 0.9, 5, id="steps that move together come in one answer"),
        pytest.param(0.6, 1.0, 1.2, 1.5, 6, id="the gathering starts at the first change seen"),
    ],
)
def test_steps_moving_within_the_gathering_come_in_one_answer(
        bulk: Catalogue, monkeypatch: pytest.MonkeyPatch,
        gather: float, first: float, second: float, at_least: float, below: float) -> None:
    monkeypatch.setattr(api_app, "WAIT_GATHER", gather)
    status, body, waited = long_poll(bulk, 10, (first, step_moves(bulk, 0, StepState.running)),
                                     (second, step_moves(bulk, 1, StepState.running)))
    assert status == 200 and [st["state"] for st in body["steps"]] == ["running", "running"], body
    assert at_least <= waited < below, waited


def test_the_operations_end_is_answered_at_once(bulk: Catalogue, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_app, "WAIT_GATHER", 20.0)
    status, body, waited = long_poll(bulk, 30, (0.05, step_moves(bulk, 0, StepState.succeeded)),
                                     (0.1, operation_ends(bulk)))
    assert status == 200 and body["state"] == "succeeded", body
    assert waited < 10, waited


def test_a_poll_without_wait_answers_a_change_at_once(bulk: Catalogue, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_app, "WAIT_GATHER", 20.0)
    status, body, waited = long_poll(bulk, 0, (0.0, step_moves(bulk, 0, StepState.running)))
    assert status == 200 and [st["state"] for st in body["steps"]] == ["running", "pending"], body
    assert waited < 10, waited


def test_a_step_that_moves_while_the_answer_is_read_is_in_its_etag(
        bulk: Catalogue, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ETag is the operation's version read before its body: a step that moved in between is
    in the body, and the ETag must say so (else the next poll answers the same body again, as a
    CI run saw), and never more than the body shows."""
    real = api_app.catalogue.operation_public
    moved: list[bool] = []

    def read_while_a_step_moves(**kwargs: Any) -> Any:
        if not moved:  # the first body only
            moved.append(True)
            step_moves(bulk, 0, StepState.running)()
        return real(**kwargs)

    with bulk.platform.reader() as s:
        op_id = s.exec(select(Operation.id)).one()
    monkeypatch.setattr(api_app.catalogue, "operation_public", read_while_a_step_moves)
    status, body, headers = api_call(bulk.api, f"/api/v1/operations/{op_id}", bulk.filled.token)
    assert status == 200 and [st["state"] for st in body["steps"]] == ["running", "pending"], body
    monkeypatch.setattr(api_app, "WAIT_GATHER", 0.0)
    status, again, _ = api_call(bulk.api, f"/api/v1/operations/{op_id}?wait=0.5", bulk.filled.token,
                                headers={"If-None-Match": headers["etag"]})
    assert status == 304, again  # nothing moved since that body
