"""A node takes every step waiting for its host (starts, stops, image checks, of every operation)
in one task: ``catalogue.ring_hosts`` (a task is sent to a host only when none is on its way),
``catalogue.claim_host_steps``, ``workers.tasks.run_host_steps``, and the step that ends a stage
asking for what follows (``operations.stage_ended``); ``catalogue.ring_late_hosts`` for a task
whose message was lost."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlmodel import col

from orchestrator import catalogue, requests
from orchestrator.dispatch import BOXED
from orchestrator.models import Host, Job, JobState, OpState, Step, StepAction, StepState, utcnow
from tests.unit.world import ENV, IMAGE_2, World
from workers.inline import SentChain, SentFinish
from workers.tasks import StepFailed, run_host_steps


def two_redeploys(world: World) -> tuple[int, int]:
    """Services a and b of 4 jobs on h1 and h2, then both redeployed at once (stops, then
    starts): their first stages are sent (their hosts rung); the inline twin's own messages for
    them are dropped: the nodes take the steps."""
    world.code_service("a", scale=4)
    world.code_service("b", scale=4)
    a = requests.request_redeploy(world.platform, env=ENV, service="a").id or 0
    b = requests.request_redeploy(world.platform, env=ENV, service="b").id or 0
    world.dispatch.sent = [m for m in world.dispatch.sent if not isinstance(m, SentChain)]
    return a, b


def advanced(world: World, *ops: int) -> list[int]:
    """Of ``ops``, those whose next stage was sent (by the node whose step ended the stage before,
    at once: ``operations.stage_ended``); the inline twin's own messages for their steps are
    dropped (the nodes take them from their boxes)."""
    world.dispatch.sent = [m for m in world.dispatch.sent if not isinstance(m, SentChain)]
    return sorted(op for op in ops if world.operation(op).sent_stage >= 1)


def test_a_host_s_steps_of_two_operations_are_taken_and_run_by_one_task(world: World) -> None:
    a, b = two_redeploys(world)
    stages = {op: {st.stage for st in world.steps(op)} for op in (a, b)}
    assert stages[a] == stages[b] == {0, 1}, stages  # stops, then starts
    assert world.host("h1").rung_at is not None and world.host("h2").rung_at is not None

    for host in ("h1", "h2"):
        ran = run_host_steps(world.node(host))
        stops = [st for op in (a, b) for st in world.steps(op, StepAction.stop) if st.host == host]
        assert sorted(r["step"] for r in ran) == sorted(st.id for st in stops) and len(stops) == 4, ran
        assert {r["op"] for r in ran} == {a, b} and {r["action"] for r in ran} == {"stop"}, ran
        if host == "h1":
            assert world.host(host).rung_at is None  # taken: the next sent step rings it again
            assert advanced(world, a, b) == []
    # The second host's stops ended both first stages: the next stages were sent then, at once,
    # and both hosts rung for their starts.
    assert advanced(world, a, b) == [a, b]
    assert world.host("h1").rung_at is not None and world.host("h2").rung_at is not None
    assert {st.state for op in (a, b) for st in world.steps(op, StepAction.stop)} == {StepState.succeeded}

    for host in ("h1", "h2"):
        ran = run_host_steps(world.node(host))
        starts = [st for op in (a, b) for st in world.steps(op, StepAction.start) if st.host == host]
        assert sorted(r["step"] for r in ran) == sorted(st.id for st in starts), ran
        assert {r["op"] for r in ran} == {a, b} and {r["action"] for r in ran} == {"start"}
        assert {r["job"] for r in ran} == {st.job_id for st in starts}
    assert run_host_steps(world.node("h1")) == []  # nothing waits any more
    # After the last stage, the finish: by the node that ended it, at once (no message).
    assert [world.operation(op).state for op in (a, b)] == [OpState.succeeded, OpState.succeeded]
    assert not [m for m in world.dispatch.sent if isinstance(m, SentFinish)]
    for service in ("a", "b"):
        assert [j.state for j in world.jobs(service)] == [JobState.running] * 4
    assert len(world.all_containers("a")) == len(world.all_containers("b")) == 4


def test_a_host_is_rung_once_until_its_node_takes_its_steps(world: World) -> None:
    with world.platform.session() as s:
        assert catalogue.ring_hosts(session=s, hosts=["h2", "h1", "h1"], stale_after=30) == ["h1", "h2"]
        assert catalogue.ring_hosts(session=s, hosts=["h1", "h2"], stale_after=30) == []  # one on its way
        s.exec(update(Host).where(col(Host.name) == "h1").values(rung_at=utcnow() - timedelta(seconds=31)))
        assert catalogue.ring_hosts(session=s, hosts=["h1", "h2"], stale_after=30) == ["h1"]  # lost? once more
        s.commit()


def test_a_node_takes_at_most_so_many_steps_and_stays_rung_for_the_rest(world: World) -> None:
    a, b = two_redeploys(world)
    node = world.node("h1")
    waiting = [st for op in (a, b) for st in world.steps(op, StepAction.stop) if st.host == "h1"]
    assert len(waiting) == 4
    with world.platform.session() as s:
        first, more = catalogue.claim_host_steps(session=s, host="h1", node=node.node_id, lease=15,
                                           actions=sorted(BOXED), most=1, silent_since=4)
        s.commit()
    assert [st.id for st in first] == [min(st.id or 0 for st in waiting)]  # in the order planned
    assert [(st.action, st.job_id) for st in first] == [(StepAction.stop, w.job_id) for w in waiting
                                                        if w.id == first[0].id]
    began = world.step(first[0].id)
    assert began.state == StepState.running and began.node == node.node_id
    assert more and world.host("h1").rung_at is not None  # more wait: the node sends itself another task
    with world.platform.session() as s:
        rest, more = catalogue.claim_host_steps(session=s, host="h1", node=node.node_id, lease=15,
                                          actions=sorted(BOXED), most=5, silent_since=4)
        s.commit()
    assert [st.id for st in rest] == sorted(st.id or 0 for st in waiting)[1:]
    assert not more and world.host("h1").rung_at is None
    # Nothing of a stage not sent yet (the starts wait for their advance), nor of another host.
    later = [st for op in (a, b) for st in world.steps(op, StepAction.start)]
    assert later and {st.state for st in later} == {StepState.pending}


def test_steps_a_previous_process_of_the_host_s_node_began_are_taken_over_not_those_of_this_one(
        world: World) -> None:
    a, b = two_redeploys(world)
    before = next(st for st in world.steps(a, StepAction.stop) if st.host == "h1")
    mine = next(st for st in world.steps(b, StepAction.stop) if st.host == "h1")
    live = next(st for st in world.steps(b, StepAction.stop) if st.host == "h1" and st.id != mine.id)
    with world.platform.session() as s:
        # Leases are of 15 s, renewed at every heartbeat: one renewed 15 s ago, one just now.
        s.exec(update(Step).where(col(Step.id) == before.id).values(state=StepState.running, node="h1/0ldinc4r",
                                                                   lease_until=utcnow()))
        s.exec(update(Step).where(col(Step.id) == live.id).values(
            state=StepState.running, node="h1/0th3rn0d", lease_until=utcnow() + timedelta(seconds=15)))
        s.exec(update(Step).where(col(Step.id) == mine.id).values(state=StepState.running, node="h1/n3wn0de1"))
        s.exec(update(Step).where(col(Step.id).not_in([before.id, mine.id, live.id]))
               .values(state=StepState.running, node="h1x/0ldinc4r"))  # (not h1's node: h1x's)
        s.commit()
    with world.platform.session() as s:
        taken, _more = catalogue.claim_host_steps(session=s, host="h1", node="h1/n3wn0de1", lease=15,
                                           actions=sorted(BOXED), most=64, silent_since=4)
        s.commit()
    # The silent process's step is this one's now; not the one another process renews (a node
    # started twice), nor its own running step (another of its tasks runs it).
    assert [st.id for st in taken] == [before.id] and world.step(before.id).node == "h1/n3wn0de1"


def test_a_host_rung_long_ago_whose_node_took_nothing_is_rung_again_while_steps_wait(world: World) -> None:
    two_redeploys(world)
    late = world.platform.settings.orphan_after
    long_ago = utcnow() - timedelta(seconds=late + 1)
    with world.platform.session() as s:
        s.exec(update(Host).values(rung_at=long_ago))
        s.commit()
    run_host_steps(world.node("h2"))  # h2's node took its steps (and was no longer rung)
    with world.platform.session() as s:
        s.exec(update(Host).where(col(Host.name) == "h2").values(rung_at=long_ago))
        s.commit()
    with world.platform.session() as s:
        assert catalogue.ring_late_hosts(session=s, stale_after=late, actions=sorted(BOXED)) == ["h1"]
        s.commit()
    assert world.host("h1").rung_at is not None and world.host("h1").rung_at > long_ago
    assert world.host("h2").rung_at is None  # nothing waits for it: no longer rung
    world.watch()  # the watcher's pass does the same (nothing is late now)
    assert world.host("h1").rung_at is not None


def test_a_copy_loaded_in_a_shared_transaction_reads_a_later_state_change_after_the_session_closed(
        world: World) -> None:
    """Works of one shared transaction share its session: a job one work loaded and another moved
    (``db.update_rows``) reads as moved, also once the session closed (it is not expired)."""
    world.code_service("a", scale=1)
    (job,) = world.jobs("a")
    with world.platform.session() as s:
        loaded = s.get(Job, job.id)
        assert loaded is not None and loaded.state == JobState.running
        catalogue.set_job_state(session=s, job_id=job.id, state=JobState.stopping)
        assert loaded.state == JobState.stopping
        s.commit()
    assert (loaded.state, loaded.id) == (JobState.stopping, job.id)  # no DetachedInstanceError
    assert world.job(job.id).state == JobState.stopping


def test_a_box_ends_what_succeeded_together_and_finishes_an_operation_whose_start_failed(world: World) -> None:
    """Steps of two operations in one box: those done end together (one statement for their
    steps, one for their jobs), the stage of the one whose starts all succeeded goes on, and the
    one whose start failed is asked to finish, once; the task fails, naming what succeeded."""
    world.code_service("a", scale=2)
    world.code_service("b", scale=2, image=IMAGE_2)
    a = requests.request_redeploy(world.platform, env=ENV, service="a").id or 0
    b = requests.request_redeploy(world.platform, env=ENV, service="b").id or 0
    world.dispatch.sent = [m for m in world.dispatch.sent if not isinstance(m, SentChain)]
    for host in ("h1", "h2"):
        run_host_steps(world.node(host))
    assert advanced(world, a, b) == [a, b]
    for runtime in world.runtimes.values():
        runtime.crashing.add(IMAGE_2)  # b's new jobs exit at once

    with pytest.raises(StepFailed) as failed:
        run_host_steps(world.node("h1"))
    starts = {op: [st for st in world.steps(op, StepAction.start) if st.host == "h1"] for op in (a, b)}
    assert starts[a] and starts[b]
    assert {st.state for st in starts[a]} == {StepState.succeeded}
    assert {st.state for st in starts[b]} == {StepState.failed} and all(st.error for st in starts[b])
    assert all(f"step {st.id} (operation {b})" in str(failed.value) for st in starts[b]), failed.value
    assert "succeeded: " + ", ".join(f"step {st.id} (operation {a})" for st in starts[a]) in str(failed.value)
    assert [world.job(st.job_id or "").state for st in starts[a]] == [JobState.running] * len(starts[a])
    assert {world.job(st.job_id or "").state for st in starts[b]} == {JobState.failed}
    assert [m.op_id for m in world.dispatch.sent if isinstance(m, SentFinish)] == [b]  # once

    with pytest.raises(StepFailed):  # h2's: b's fail too, a's end its last stage
        run_host_steps(world.node("h2"))
    world.run_all()
    assert world.operation(a).state == OpState.succeeded and world.operation(b).state == OpState.failed


def test_a_box_whose_rows_cannot_be_read_after_its_claim_asks_again_with_its_steps(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim committed (the steps are this node's), then reading their rows failed: the task
    is to ask again with their ids (a claim finds none of them again), their leases renewed."""
    from sqlalchemy.exc import OperationalError

    from workers.tasks import CatalogueFailed

    a, b = two_redeploys(world)
    node = world.node("h1")
    mine = sorted(st.id or 0 for op in (a, b) for st in world.steps(op, StepAction.stop) if st.host == "h1")

    def unreadable(**_kwargs: object) -> list[Step]:
        assert sorted(node.working_on()) == mine  # their leases are renewed meanwhile
        raise OperationalError("SELECT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(catalogue, "steps_by_id", unreadable)
    with pytest.raises(CatalogueFailed) as failed:
        run_host_steps(node)
    monkeypatch.undo()
    assert sorted(failed.value.step_ids) == mine
    assert {world.step(i).state for i in mine} == {StepState.running}
