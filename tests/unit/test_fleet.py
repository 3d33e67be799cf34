"""The fleet on the inline dispatch and fake runtimes: heartbeats, hosts going down and coming
back, steps stuck on a down host or whose lease ran out, forgotten finishes, drain and remove, and
a node reconciling its runtime with the catalogue."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from unittest.mock import patch

import pytest
from sqlalchemy import update
from sqlalchemy.exc import OperationalError
from sqlmodel import col, select

from orchestrator import catalogue, fleet, requests, watcher
from orchestrator.errors import BadInput
from orchestrator.models import (
    Host,
    HostState,
    JobKind,
    JobState,
    Operation,
    OpKind,
    OpParams,
    OpState,
    OpTrigger,
    Service,
    ServiceType,
    Step,
    StepAction,
    StepState,
    WatchPass,
    utcnow,
)
from tests.unit.world import ENV, IMAGE, IMAGE_2, World
from workers.runtime.base import ContainerSpec


def operations_of(world: World, service: str, kind: OpKind) -> list[Operation]:
    with world.platform.reader() as s:
        query = select(Operation).where(Operation.service_id == world.service(service).id,
                                        Operation.kind == kind)
        return list(s.exec(query.order_by(col(Operation.id))))


def age_steps(world: World, op_id: int, seconds: float) -> None:
    """Make the operation's ended steps end ``seconds`` ago."""
    with world.platform.session() as s:
        s.exec(update(Step).where(col(Step.op_id) == op_id, col(Step.finished_at).is_not(None))
               .values(finished_at=utcnow() - timedelta(seconds=seconds)))
        s.commit()


def lose(world: World, host: str) -> None:
    """``host``'s node dies and stays silent; the watcher notices."""
    world.kill_node(host)
    world.silence(host)
    world.watch()
    assert world.host(host).state == HostState.down


def start_step_of(world: World, op_id: int) -> Step:
    (step,) = world.steps(op_id, StepAction.start)
    return step


def expire_lease(world: World, step_id: int) -> None:
    with world.platform.session() as s:
        s.exec(update(Step).where(col(Step.id) == step_id)
               .values(lease_until=utcnow() - timedelta(seconds=1)))
        s.commit()


def with_workers(world: World, service: str, *, scale: int, workers: int) -> None:
    world.code_service(service, scale=scale)
    requests.request_worker_deploy(world.platform, env=ENV, service=service, target="q", command="work")
    requests.request_worker_scale(world.platform, env=ENV, service=service, target="q", scale=workers)
    world.run_all()


# --- heartbeats and hosts going down ---------------------------------------------------------------


def test_a_new_host_is_down_until_its_first_heartbeat(world: World) -> None:
    with world.platform.session() as s:
        catalogue.add_host(session=s, name="h3", docker_url="unix:///nowhere", address="10.0.0.9")
        s.commit()
    assert world.host("h3").state == HostState.down
    world.code_service("web", scale=3)
    assert "h3" not in {j.host for j in world.jobs("web")}
    fleet.heartbeat(world.platform, host="h3", cpus=2.0, memory_mb=1024)
    h3 = world.host("h3")
    assert (h3.state, h3.cpus, h3.memory_mb) == (HostState.up, 2.0, 1024)


def test_a_heartbeat_brings_a_down_host_up_and_leaves_a_draining_one_draining(world: World) -> None:
    lose(world, "h1")
    assert world.host("h1").state == HostState.down
    fleet.drain(world.platform, host="h2")
    seen = world.host("h2").last_seen
    for host in ("h1", "h2"):
        fleet.heartbeat(world.platform, host=host, cpus=2.0, memory_mb=1024)
    h1, h2 = world.host("h1"), world.host("h2")
    assert (h1.state, h2.state) == (HostState.up, HostState.draining)
    assert seen is not None and h2.last_seen is not None and h2.last_seen > seen


def test_a_node_whose_docker_does_not_answer_sends_no_heartbeat(world: World) -> None:
    world.silence("h2")
    world.runtimes["h2"].answering = False
    world.beat("h2")
    world.watch()
    assert world.host("h2").state == HostState.down


def test_a_silent_host_is_marked_down_once(world: World) -> None:
    world.silence("h2")
    assert watcher.silent_hosts(world.platform, time.monotonic()) == ["h2"]
    assert watcher.silent_hosts(world.platform, time.monotonic()) == []
    assert world.host("h2").state == HostState.down and world.host("h1").state == HostState.up


def test_judging_a_fleet_that_beats_takes_no_write_turn(world: World) -> None:
    """Silent hosts are looked for in a read; only one silent as read gets a write transaction
    (a pass took one per host)."""
    with world.write_turns() as writes:
        assert watcher.silent_hosts(world.platform, time.monotonic()) == []
        assert writes == []
        world.silence("h2")
        writes.clear()
        assert watcher.silent_hosts(world.platform, time.monotonic()) == ["h2"]
        assert len(writes) == 1


@contextmanager
def write_turn_held(world: World, seconds: float) -> Iterator[None]:
    """Another thread holds the catalogue's write turn (a long writer) from now for ``seconds``."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with world.platform.session() as s:
            s.connection()  # (the write turn)
            held.set()
            release.wait(10)
            s.commit()

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    threading.Timer(seconds, release.set).start()
    try:
        yield
    finally:
        release.set()
        holder.join()


def test_a_pass_that_waits_for_the_write_turn_judges_nothing_by_the_clock(world: World) -> None:
    """A pass looks in reads and may have nothing to write; it still sees a catalogue whose
    writes stall (heartbeats waited as long) and then judges nothing by the clock for a while."""
    with write_turn_held(world, watcher.SLOW_WRITE + 0.3):
        world.watch()
    assert world.watcher.trust_after > time.monotonic()
    world.silence("h2")
    world.watch()
    assert world.host("h2").state == HostState.up  # not judged while the catalogue is distrusted


def test_a_watcher_pass_over_operations_under_way_takes_no_write_turn(world: World) -> None:
    """Leases, orphans, lost messages and steps on down hosts are looked for in reads; a pass
    that finds none writes nothing. One that finds a step never picked up fails it."""
    world.code_service("web", scale=1)
    op = requests.request_scale(world.platform, env=ENV, service="web", scale=3)
    world.take_chain(op.id or 0)  # its first stage sent, no node took it yet
    started = time.monotonic()
    with world.write_turns() as writes:
        watcher.expire_leases(world.platform, started)
        watcher.end_orphans(world.platform, started)
        fleet.fail_steps_on_down_hosts(world.platform)
        assert writes == []
        assert {st.state for st in world.steps(op.id or 0)} == {StepState.pending}
        with world.platform.session() as s:  # its message was lost: no node began it in time
            s.exec(update(Operation).where(col(Operation.id) == op.id).values(
                sent_at=utcnow() - timedelta(seconds=world.platform.settings.pickup_timeout + 5)))
            s.commit()
        writes.clear()
        watcher.end_orphans(world.platform, started)
        assert writes
    ended = world.operation(op.id or 0)
    assert ended.state == OpState.failed and ended.error is not None and "never picked up" in ended.error


def _date_the_fleets_pass(world: World, seconds_ago: float) -> None:
    with world.platform.session() as s:
        s.merge(WatchPass(id=1, passed_at=utcnow() - timedelta(seconds=seconds_ago), by="a test"))
        s.commit()


def test_one_watcher_passes_for_the_fleet_each_heartbeat_interval(world: World,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Every process runs a watcher; one pass per interval is made for them all, by the first
    whose turn comes: the others find it made (in a read) and pass nothing. Once a pass is as
    old as most of an interval, the next watcher whose turn comes makes the next. A pass dated
    ahead (a process whose clock runs fast) keeps nobody from the turn."""
    interval = 5.0
    monkeypatch.setattr(world.platform.settings, "heartbeat_interval", interval)
    watchers = [watcher.Watcher(world.platform) for _ in range(3)]
    passes: list[int] = []
    for i, w in enumerate(watchers):
        w.trust_after = 0.0
        w.run_once = lambda i=i: passes.append(i)  # type: ignore[method-assign]
    with world.write_turns() as writes:
        assert [w.run_when_due() for w in watchers] == [True, False, False]
        assert len(writes) == 1  # the claim; the others only read
    _date_the_fleets_pass(world, interval * watcher.PASS_TURN - 0.5)  # not yet due
    assert [w.run_when_due() for w in watchers] == [False, False, False]
    _date_the_fleets_pass(world, interval * watcher.PASS_TURN + 0.5)
    assert [w.run_when_due() for w in reversed(watchers)] == [True, False, False]
    _date_the_fleets_pass(world, -interval * 3)  # in the future
    assert [w.run_when_due() for w in watchers] == [True, False, False]
    assert passes == [0, 2, 0]


def test_a_watcher_whose_turn_waits_or_fails_distrusts_the_clock(world: World) -> None:
    """Looking for the fleet's turn is a pass's first touch of the catalogue: a claim that waited
    long for the write turn (a long writer: heartbeats waited as long) or that fails makes the
    watcher judge nothing by the clock for a while, as a pass would have."""
    w = watcher.Watcher(world.platform)
    w.trust_after = 0.0
    _date_the_fleets_pass(world, 60)  # (the row made, and due)
    world.silence("h2")
    with write_turn_held(world, watcher.SLOW_WRITE + 0.3):
        assert w.run_when_due()
    assert w.trust_after > time.monotonic()
    assert world.host("h2").state == HostState.up  # not judged: the catalogue stalled

    trusting = watcher.Watcher(world.platform)
    trusting.trust_after = 0.0
    _date_the_fleets_pass(world, 60)
    with patch.object(catalogue, "claim_watch_pass", side_effect=OperationalError("claim", {}, Exception("gone"))), \
            pytest.raises(OperationalError):
        trusting.run_when_due()
    assert trusting.trust_after > time.monotonic()


def test_a_watcher_that_does_not_trust_the_clock_passes_alone_and_leaves_the_fleets_turn(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A watcher just started (or after a stalled catalogue) judges nothing by the clock: its
    pass does the rest, and does not count as the fleet's, which a trusted watcher then makes."""
    monkeypatch.setattr(world.platform.settings, "heartbeat_interval", 5.0)
    new, trusted = watcher.Watcher(world.platform), watcher.Watcher(world.platform)
    trusted.trust_after = 0.0
    world.silence("h2")
    assert new.run_when_due()
    assert world.host("h2").state == HostState.up  # not judged by a watcher that distrusts
    assert trusted.run_when_due()
    assert world.host("h2").state == HostState.down
    assert not trusted.run_when_due() and new.run_when_due()  # (the fleet's pass made: the new one passes alone)


def test_the_watcher_recovers_the_jobs_of_a_silent_host_elsewhere(world: World) -> None:
    with_workers(world, "web", scale=2, workers=2)
    on_h2 = {j.id for j in world.jobs("web") if j.host == "h2"}
    assert {j.kind for j in world.jobs("web") if j.host == "h2"} == {JobKind.deploy, JobKind.worker}

    lose(world, "h2")
    world.watch()  # a second pass changes nothing
    assert world.host("h2").state == HostState.down
    lost = world.jobs("web", states=[JobState.lost])
    assert {j.id for j in lost} == on_h2 and {j.error for j in lost} == {"host h2 went down"}

    (recover,) = operations_of(world, "web", OpKind.recover)
    assert (recover.trigger, recover.parameters) == (OpTrigger.host_lost, OpParams(host="h2"))
    world.run_all()
    assert world.operation(recover.id or 0).state == OpState.succeeded
    jobs = world.jobs("web")
    assert {j.host for j in jobs} == {"h1"}
    assert sorted(j.kind for j in jobs) == [JobKind.deploy] * 2 + [JobKind.worker] * 2
    assert world.containers("h1", "web").keys() == {j.id for j in jobs}
    assert world.steps(recover.id or 0, StepAction.stop) == []  # it only starts what is missing


def test_steps_on_a_down_host_fail_naming_it_and_the_operation_finishes(world: World) -> None:
    world.code_service("web", scale=2)
    world.kill_node("h2")
    op = requests.request_push(world.platform, env=ENV, service="web", image=IMAGE_2)
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.running  # its check on h2 never runs

    world.silence("h2")
    world.watch()
    failed = world.operation(op.id or 0)
    assert failed.state == OpState.failed
    assert failed.error is not None and failed.error.startswith(
        f"check image {IMAGE_2} on h2: host h2 is down: the step never ran there.")
    (check,) = [st for st in world.steps(op.id or 0, StepAction.check_image) if st.host == "h2"]
    assert (check.state, check.error) == (StepState.failed, "host h2 is down: the step never ran there")
    assert world.service("web").release == 1

    # The service is free again: the recover queued behind it runs.
    (recover,) = operations_of(world, "web", OpKind.recover)
    world.run_all()
    assert world.operation(recover.id or 0).state == OpState.succeeded
    jobs = world.jobs("web")
    assert [(j.host, j.release) for j in jobs] == [("h1", 1), ("h1", 1)]


def test_failing_the_steps_on_a_down_host_finishes_their_operation_itself(world: World) -> None:
    world.code_service("web", scale=2)
    world.kill_node("h2")
    op = requests.request_scale(world.platform, env=ENV, service="web", scale=4)
    world.run_all()
    with world.platform.session() as s:
        s.exec(update(Host).where(col(Host.name) == "h2").values(state=HostState.down))
        s.commit()
    fleet.fail_steps_on_down_hosts(world.platform)  # no sweep of forgotten operations needed
    failed = world.operation(op.id or 0)
    assert failed.state == OpState.failed
    assert failed.error is not None and "Its scale stays 2." in failed.error
    assert world.service("web").active_op_id != op.id  # it ended: the service is free for what comes next


def test_a_step_on_a_dead_host_does_not_keep_its_stage_siblings_from_running(world: World) -> None:
    world.code_service("web", scale=2)
    world.kill_node("h1")  # h1's check comes first in the stage
    op = requests.request_push(world.platform, env=ENV, service="web", image=IMAGE_2)
    world.run_all()
    (check_h2,) = [st for st in world.steps(op.id or 0, StepAction.check_image) if st.host == "h2"]
    assert check_h2.state == StepState.succeeded
    world.silence("h1")
    world.watch()
    assert world.operation(op.id or 0).state == OpState.failed


def test_an_operation_whose_home_host_dies_during_its_overlap_wait_finishes(world: World) -> None:
    world.code_service("web", scale=2)
    with world.platform.session() as s:
        catalogue.update_service(session=s, service=world.service("web"), overlap=30, redeployable=None,
                                 support=True)
        s.commit()
    op = requests.request_redeploy(world.platform, env=ENV, service="web")
    chain = world.take_chain(op.id or 0)
    before_wait = next(i for i, stage in enumerate(chain.stages) if stage[0].action == StepAction.wait)
    world.run_stages(chain, before_wait)  # new jobs started; the wait is queued on h1
    lose(world, "h1")
    assert world.operation(op.id or 0).state == OpState.failed
    (wait,) = world.steps(op.id or 0, StepAction.wait)
    assert (wait.host, wait.state) == ("h1", StepState.failed)
    (recover,) = operations_of(world, "web", OpKind.recover)  # free to run: nothing waits on h1
    world.run_all()
    assert world.operation(recover.id or 0).state == OpState.succeeded
    assert [j.host for j in world.jobs("web")] == ["h2", "h2"]


def test_a_step_whose_lease_runs_out_fails_unless_its_node_renews_it(world: World) -> None:
    world.code_service("web", scale=1)
    op = requests.request_scale(world.platform, env=ENV, service="web", scale=2)
    world.run_stages(world.take_chain(op.id or 0), 1)
    step = start_step_of(world, op.id or 0)
    node = world.node(step.host or "")
    with world.platform.session() as s:  # its node began it, and a task of it still works on it
        catalogue.begin_step(session=s, step_id=step.id or 0, node=node.node_id, lease=15)
        s.commit()
    node.inflight.add(step.id or 0)
    expire_lease(world, step.id or 0)
    world.beat(step.host or "")  # the node is alive and works on it: its heartbeat renews the lease
    world.watch()
    assert world.operation(op.id or 0).state == OpState.running

    # No task works on it any more (it gave up): the live node does not renew it either.
    node.inflight.clear()
    expire_lease(world, step.id or 0)
    world.beat(step.host or "")
    with world.platform.reader() as s:
        lease = s.get(Step, step.id)
        assert lease is not None and lease.lease_until is not None and lease.lease_until < utcnow()

    # The host's node started again: the new process does not renew what the dead one held.
    node.inflight.add(step.id or 0)
    node.incarnation = "restarted"
    expire_lease(world, step.id or 0)
    world.beat(step.host or "")
    world.watch()
    failed = world.operation(op.id or 0)
    assert failed.state == OpState.failed
    assert failed.error is not None and failed.error.startswith(
        f"{step.name}: the node running it ({step.host}/"), failed.error
    assert "stopped answering (its lease ran out)" in failed.error
    assert world.job(step.job_id or "").state == JobState.failed


# --- operations whose finish was lost --------------------------------------------------------------


def test_finish_forgotten_ends_an_operation_whose_finish_was_lost(world: World) -> None:
    world.code_service("web", scale=1)
    op = requests.request_scale(world.platform, env=ENV, service="web", scale=3)
    world.run_stages(world.take_chain(op.id or 0))  # every step ran; its finish never came
    assert world.operation(op.id or 0).state == OpState.running

    watcher.finish_forgotten(world.platform)
    assert world.operation(op.id or 0).state == OpState.running  # young: its finish may still come

    age_steps(world, op.id or 0, 60)
    watcher.finish_forgotten(world.platform)
    assert world.operation(op.id or 0).state == OpState.succeeded
    assert world.service("web").active_op_id is None


def test_finish_forgotten_ends_an_operation_with_a_failed_step_at_once(world: World) -> None:
    world.code_service("web", scale=2)
    world.runtimes["h2"].images.discard(IMAGE_2)
    op = requests.request_push(world.platform, env=ENV, service="web", image=IMAGE_2)
    world.run_stages(world.take_chain(op.id or 0), 1)  # the check on h2 fails; its finish is lost
    watcher.finish_forgotten(world.platform)
    failed = world.operation(op.id or 0)
    assert failed.state == OpState.failed
    assert failed.error is not None and "is not on host h2" in failed.error
    assert world.service("web").release == 1


def test_finish_forgotten_leaves_an_operation_with_steps_to_run_alone(world: World) -> None:
    world.code_service("web", scale=1)
    op = requests.request_scale(world.platform, env=ENV, service="web", scale=3)
    chain = world.take_chain(op.id or 0)
    world.run_stages(chain, 1)  # images checked; the starts are still to come
    age_steps(world, op.id or 0, 60)
    watcher.finish_forgotten(world.platform)
    assert world.operation(op.id or 0).state == OpState.running


# --- drain and remove ------------------------------------------------------------------------------


def test_drain_starts_every_job_elsewhere_first_then_stops_it(world: World) -> None:
    with_workers(world, "web", scale=2, workers=2)
    world.code_service("api", scale=1)
    leaving = {j.id for j in world.jobs("web") + world.jobs("api") if j.host == "h2"}
    assert leaving

    op_ids = fleet.drain(world.platform, host="h2")
    assert world.host("h2").state == HostState.draining
    world.run_all()
    for op_id in op_ids:
        op = world.operation(op_id)
        assert (op.kind, op.trigger, op.state) == (OpKind.drain, OpTrigger.drain, OpState.succeeded)
        starts = world.steps(op_id, StepAction.start)
        stops = world.steps(op_id, StepAction.stop)
        assert len(starts) == len(stops) and {st.host for st in starts} == {"h1"}
        assert max(st.stage for st in starts) < min(st.stage for st in stops)
    assert {j.host for j in world.jobs("web") + world.jobs("api")} == {"h1"}
    assert (len(world.jobs("web")), len(world.jobs("api"))) == (4, 1)
    assert {world.job(job_id).state for job_id in leaving} == {JobState.stopped}
    assert world.containers("h2") == {}

    fleet.remove(world.platform, host="h2")
    with world.platform.reader() as s:
        assert [h.name for h in catalogue.list_hosts(session=s)] == ["h1"]


def test_drain_moves_a_cache_to_its_new_port(world: World) -> None:
    requests.add_service(world.platform, env=ENV, name="cache", type=ServiceType.memcached, image=None,
                         command=None, scale=1, size="s")
    world.run_all()
    (old,) = world.jobs("cache")
    (op_id,) = fleet.drain(world.platform, host=old.host)
    world.run_all()
    assert world.operation(op_id).state == OpState.succeeded
    (new,) = world.jobs("cache")
    assert new.host != old.host and world.service("cache").port == new.port
    assert new.args == ["-p", str(new.port)] and new.environment["PORT"] == str(new.port)


def test_drain_refuses_to_move_a_database_off_the_host_that_holds_its_data(world: World) -> None:
    requests.add_service(world.platform, env=ENV, name="db", type=ServiceType.postgresql, image=None,
                         command=None, scale=1, size="s")
    world.run_all()
    (job,) = world.jobs("db")
    assert world.service("db").host == job.host
    (op_id,) = fleet.drain(world.platform, host=job.host)
    op = world.operation(op_id)
    assert op.state == OpState.failed
    assert op.error == f"service db keeps its data on host {job.host}: move it by hand"
    assert [j.id for j in world.jobs("db")] == [job.id]


def test_drain_refuses_a_down_host_and_undrain_a_host_that_is_not_draining(world: World) -> None:
    lose(world, "h2")
    with pytest.raises(BadInput, match="host h2 is down"):
        fleet.drain(world.platform, host="h2")
    with pytest.raises(BadInput, match="not draining"):
        fleet.undrain(world.platform, host="h1")
    fleet.drain(world.platform, host="h1")
    fleet.undrain(world.platform, host="h1")
    assert world.host("h1").state == HostState.up


def test_remove_refuses_a_host_with_jobs(world: World) -> None:
    world.code_service("web", scale=4)
    with pytest.raises(BadInput, match="host h2 still has 2 jobs: drain it first"):
        fleet.remove(world.platform, host="h2")
    assert world.host("h2").name == "h2"


def test_removing_a_down_host_forgets_its_lost_jobs(world: World) -> None:
    world.code_service("web", scale=2)
    (lost,) = [j for j in world.jobs("web") if j.host == "h2"]
    lose(world, "h2")
    world.run_all()
    fleet.remove(world.platform, host="h2")
    job = world.job(lost.id)
    assert (job.state, job.error) == (JobState.stopped, "host h2 was removed")
    with world.platform.reader() as s:
        assert [h.name for h in catalogue.list_hosts(session=s)] == ["h1"]


# --- a node's reconciliation -----------------------------------------------------------------------


def test_a_job_whose_container_vanished_fails_and_is_healed(world: World) -> None:
    world.code_service("web", scale=4)
    gone, kept = [j for j in world.jobs("web") if j.host == "h1"]
    world.runtimes["h1"].stop(gone.container_name, timeout=0)
    world.beat("h1")
    job = world.job(gone.id)
    assert (job.state, job.error) == (JobState.failed, "its container was removed outside the platform")
    assert world.job(kept.id).state == JobState.running and len(world.jobs("web")) == 3

    world.watch()  # the service is healed: back to its scale
    (heal,) = operations_of(world, "web", OpKind.recover)
    assert heal.trigger == OpTrigger.heal
    world.run_all()
    assert world.operation(heal.id or 0).state == OpState.succeeded
    assert len(world.jobs("web")) == 4


def test_a_drained_host_that_went_down_comes_back_draining(world: World) -> None:
    world.code_service("web", scale=2)
    fleet.drain(world.platform, host="h2")
    world.run_all()
    lose(world, "h2")
    world.start_node("h2")
    world.beat("h2")
    assert world.host("h2").state == HostState.draining  # still takes no new job
    fleet.undrain(world.platform, host="h2")
    assert world.host("h2").state == HostState.up and not world.host("h2").drained


def test_a_host_lost_recover_that_finds_no_room_asks_for_a_heal(world: World) -> None:
    world.code_service("web", scale=2)
    lose(world, "h1")  # h2 is down too: nowhere to go
    lose(world, "h2")
    world.run_all()
    recovers = operations_of(world, "web", OpKind.recover)
    assert recovers and {o.state for o in recovers} == {OpState.failed}
    assert world.service("web").heal_wanted  # the service is below its scale: heal it later

    # h2 comes back, its containers gone (a reboot): a heal brings the service back to scale.
    world.runtimes["h2"].containers.clear()
    world.start_node("h2")
    world.beat("h2")
    with world.platform.session() as s:  # its back-off has passed
        s.exec(update(Service).values(heal_after=None))
        s.commit()
    world.watch()
    world.run_all()
    heals = [o for o in operations_of(world, "web", OpKind.recover) if o.trigger == OpTrigger.heal]
    assert heals and world.operation(heals[-1].id or 0).state == OpState.succeeded
    assert sorted(j.host for j in world.jobs("web")) == ["h2", "h2"]


def test_a_host_that_beats_again_before_its_jobs_are_recovered_keeps_them(world: World) -> None:
    """The watcher finds the down hosts that still have jobs in a read, then recovers each: a
    host that beat again in between is up, and its jobs are not lost."""
    world.code_service("web", scale=2)  # a job on each host
    world.silence("h1", 60)
    assert watcher.silent_hosts(world.platform, time.monotonic()) == ["h1"]
    world.beat("h1")  # back, before the recover of its jobs
    assert world.host("h1").state == HostState.up
    assert fleet.host_lost(world.platform, "h1") == []
    assert {j.state for j in world.jobs("web")} == {JobState.running}
    assert not operations_of(world, "web", OpKind.recover)


def test_a_job_whose_container_exited_fails_and_its_container_is_removed(world: World) -> None:
    world.code_service("web", scale=2)
    (job,) = [j for j in world.jobs("web") if j.host == "h1"]
    runtime = world.runtimes["h1"]
    runtime.containers[job.container_name] = replace(runtime.containers[job.container_name], status="exited")
    world.beat("h1")
    assert world.job(job.id).error == "its container stopped (exited) outside the platform"
    assert job.id not in world.containers("h1")


def test_a_returning_host_removes_the_containers_of_its_replaced_jobs(world: World) -> None:
    world.code_service("web", scale=2)
    (lost,) = [j for j in world.jobs("web") if j.host == "h2"]
    lose(world, "h2")
    world.run_all()
    assert world.containers("h2") == {lost.id: lost.container_name}  # still there: h2 was away
    stranger = world.runtimes["h2"].run(ContainerSpec(
        name="someone-else", image=IMAGE, labels={"orchestrator.job": "not-ours"}, environment={}))

    world.start_node("h2")
    world.beat("h2")
    assert world.host("h2").state == HostState.up
    assert world.job(lost.id).state == JobState.stopped
    assert world.containers("h2") == {"not-ours": stranger.name}  # another platform's job is left alone
    assert {j.host for j in world.jobs("web")} == {"h1"}
    fleet.remove(world.platform, host="h2")  # nothing of this platform is left there


def test_a_returning_host_is_reconciled_as_it_comes_up_whatever_its_beat_read_before(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A heartbeat reads whether its host is out of step before its write transaction; a host
    marked down (its jobs lost) after that read is still reconciled as the beat brings it up."""
    world.code_service("web", scale=2)
    (lost,) = [j for j in world.jobs("web") if j.host == "h2"]
    world.runtimes["h1"].images.discard(IMAGE)  # the recover cannot start a replacement
    lose(world, "h2")
    world.run_all()
    monkeypatch.setattr(fleet, "_out_of_step", lambda *_a, **_k: False)  # read before it went down

    world.start_node("h2")
    world.beat("h2")
    assert world.host("h2").state == HostState.up
    assert world.job(lost.id).state == JobState.running  # taken back in that transaction
    world.beat("h2")  # up, and in step as read: it only beats
    assert world.job(lost.id).state == JobState.running


def test_a_returning_host_takes_back_a_lost_job_nothing_replaced(world: World) -> None:
    world.code_service("web", scale=2)
    (lost,) = [j for j in world.jobs("web") if j.host == "h2"]
    world.runtimes["h1"].images.discard(IMAGE)  # the recover cannot start a replacement
    lose(world, "h2")
    world.run_all()
    (recover,) = operations_of(world, "web", OpKind.recover)
    assert world.operation(recover.id or 0).state == OpState.failed

    world.start_node("h2")
    world.beat("h2")
    assert world.job(lost.id).state == JobState.running
    assert world.containers("h2") == {lost.id: lost.container_name}
    assert len(world.jobs("web")) == 2
