"""The node's step tasks on fake runtimes: idempotent (a redelivery never doubles a container),
stops that find nothing, and jobs whose port is held by a program outside the platform."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlmodel import select

from orchestrator import catalogue, monitoring, operations, requests
from orchestrator import dispatch as dispatch_module
from orchestrator.dispatch import MAX_BATCH, CeleryDispatch, batches, step_task_id
from orchestrator.models import JobState, OpState, ServiceType, Step, StepAction, StepState
from tests.unit.world import ENV, LOG_IMAGE, PORT_MIN, World
from workers.monitor import MonitorFiles
from workers.tasks import START, STOP, StepFailed, container_spec, run_step, run_steps


def start_step(world: World, op_id: int) -> Step:
    (step,) = world.steps(op_id, StepAction.start)
    return step


# --- idempotence -----------------------------------------------------------------------------------


def test_a_step_that_already_succeeded_is_skipped(world: World) -> None:
    op = world.code_service("web", scale=1)
    step = start_step(world, op.id or 0)
    (job,) = world.jobs("web")
    before = dict(world.runtimes[job.host].containers)

    assert run_step(world.node(job.host), step.id or 0, START) == {"step": step.id, "skipped": True}
    assert world.runtimes[job.host].containers == before
    assert world.job(job.id).state == JobState.running
    assert world.steps(op.id or 0, StepAction.start)[0].state == StepState.succeeded


def test_a_redelivered_step_that_was_failed_stops_the_chain(world: World) -> None:
    """A step the watcher failed (its lease ran out, its host went down) must not count as done
    when its message comes back: the next stage would run after a failed one."""
    world.code_service("web", scale=1)
    op = requests.request_scale(world.platform, env=ENV, service="web", scale=2)
    world.dispatch.sent.clear()  # its chain is never delivered as sent
    step = start_step(world, op.id or 0)
    with world.platform.session() as s:
        catalogue.end_step(session=s, step_id=step.id or 0, state=StepState.failed, error="lease ran out",
                           before=(StepState.pending,))
        s.commit()
    with pytest.raises(StepFailed, match="ended already"):
        run_step(world.node(step.host or ""), step.id or 0, START)
    assert world.steps(op.id or 0, StepAction.start)[0].state == StepState.failed


def test_a_step_failed_while_it_ran_does_not_succeed_afterwards(world: World) -> None:
    """The watcher failed a step whose node was slow; the node's late success must not overwrite
    it (nor mark its job running): the step stays failed and the task fails."""
    world.code_service("web", scale=1)
    op = requests.request_scale(world.platform, env=ENV, service="web", scale=2)
    world.dispatch.sent.clear()
    step = start_step(world, op.id or 0)
    node = world.node(step.host or "")
    real = START.act

    def slow_then_failed(n: object, st: Step, job: object) -> dict[str, object]:
        with world.platform.session() as s:  # meanwhile, the watcher ends it
            catalogue.end_step(session=s, step_id=st.id or 0, state=StepState.failed, error="lease ran out")
            s.commit()
        return real(n, st, job)  # type: ignore[arg-type]

    with pytest.raises(StepFailed, match="was failed while it ran"):
        run_step(node, step.id or 0, replace(START, act=slow_then_failed))
    (after,) = world.steps(op.id or 0, StepAction.start)
    assert (after.state, after.error) == (StepState.failed, "lease ran out")
    assert world.job(after.job_id or "").state != JobState.running


def test_a_redelivered_start_adopts_the_container_of_the_first_delivery(world: World) -> None:
    world.code_service("web", scale=1)
    op = requests.request_scale(world.platform, env=ENV, service="web", scale=2)
    chain = world.take_chain(op.id or 0)
    world.run_stages(chain, 1)  # the image check
    step = start_step(world, op.id or 0)
    assert step.job_id is not None and step.host is not None
    # The first delivery began the step and ran the container, then its node was lost.
    with world.platform.session() as s:
        catalogue.begin_step(session=s, step_id=step.id or 0, node=step.host or "", lease=15)
        s.commit()
    runtime = world.runtimes[step.host]
    first = runtime.run(container_spec(world.job(step.job_id)))

    result = run_step(world.node(step.host), step.id or 0, START)
    assert result["container"] == first.id
    assert [c.id for c in runtime.jobs() if c.labels["orchestrator.job"] == step.job_id] == [first.id]
    job = world.job(step.job_id)
    assert (job.state, job.container_id) == (JobState.running, first.id)
    # Its stage was the last: the node that ended it finished the operation at once.
    assert world.operation(op.id or 0).state == OpState.succeeded
    assert operations.finish(world.platform, op.id or 0) is False  # (ended already)


def test_stopping_a_container_that_is_gone_succeeds(world: World) -> None:
    world.code_service("web", scale=2)
    for job in world.jobs("web"):
        world.runtimes[job.host].stop(job.container_name, timeout=0)
    op = requests.request_scale(world.platform, env=ENV, service="web", scale=0)
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.succeeded
    stops = world.steps(op.id or 0, StepAction.stop)
    assert len(stops) == 2 and {st.state for st in stops} == {StepState.succeeded}
    assert {world.job(st.job_id or "").state for st in stops} == {JobState.stopped}


def test_a_stop_redelivered_after_it_succeeded_is_skipped(world: World) -> None:
    world.code_service("web", scale=1)
    op = requests.request_scale(world.platform, env=ENV, service="web", scale=0)
    world.run_all()
    (stop,) = world.steps(op.id or 0, StepAction.stop)
    assert run_step(world.node(stop.host or ""), stop.id or 0, STOP)["skipped"] is True


def test_a_start_that_never_listens_fails_and_removes_its_container(world: World) -> None:
    world.code_service("web", scale=1)
    for host in world.runtimes:
        world.node(host).accepts = lambda _a, _port: False
    op = requests.request_scale(world.platform, env=ENV, service="web", scale=2)
    world.run_all()
    failed = world.operation(op.id or 0)
    assert failed.state == OpState.failed
    step = start_step(world, op.id or 0)
    assert step.error is not None and step.error.startswith("job did not listen on port")
    assert step.job_id not in world.all_containers()
    assert world.job(step.job_id or "").state == JobState.failed


def test_a_start_whose_container_restarted_fails_even_if_it_listens_by_then(world: World) -> None:
    """Docker restarts a program that crashed (restart policy): by the time its port is checked
    it may listen again. The start looks at the container once more when it is ready."""
    world.code_service("web", scale=1)
    for runtime in world.runtimes.values():
        def restarted(spec: Any, plain: Any = runtime.run, runtime: Any = runtime) -> Any:
            state = replace(plain(spec), restart_count=1)
            runtime.containers[spec.name] = state
            return state
        runtime.run = restarted  # type: ignore[method-assign]
    op = requests.request_scale(world.platform, env=ENV, service="web", scale=2)
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.failed
    step = start_step(world, op.id or 0)
    assert step.error is not None and step.error.startswith("container exited at once")
    assert step.job_id not in world.all_containers()


# --- ports -----------------------------------------------------------------------------------------


def test_move_job_port_moves_port_args_the_kept_port_and_the_step_name(world: World) -> None:
    requests.add_service(world.platform, env=ENV, name="db", type=ServiceType.postgresql, image=None,
                         command=None, scale=1, size="s")
    (job,) = world.jobs("db")  # scheduled: its operation was sent, not run
    assert (job.state, job.port, job.args) == (JobState.scheduled, PORT_MIN, ["-p", str(PORT_MIN)])
    assert world.service("db").port == PORT_MIN
    with world.platform.session() as s:
        moved = catalogue.move_job_port(session=s, job_id=job.id, port=PORT_MIN + 7)
        s.commit()
    new = str(PORT_MIN + 7)
    assert (moved.port, moved.environment["PORT"], moved.args) == (PORT_MIN + 7, new, ["-p", new])
    assert world.job(job.id).port == PORT_MIN + 7
    assert world.service("db").port == PORT_MIN + 7
    step = start_step(world, job.op_id or 0)
    assert step.name.endswith(f"port {new}") and str(PORT_MIN) not in step.name
    assert {k: v for k, v in moved.environment.items() if k != "PORT"} == \
        {k: v for k, v in job.environment.items() if k != "PORT"}


def test_move_job_port_rewrites_flags_of_the_form_name_equals_port(world: World) -> None:
    requests.add_service(world.platform, env=ENV, name="db", type=ServiceType.mysql, image=None,
                         command=None, scale=1, size="s")
    (job,) = world.jobs("db")
    assert job.args == [f"--port={PORT_MIN}"]
    with world.platform.session() as s:
        moved = catalogue.move_job_port(session=s, job_id=job.id, port=PORT_MIN + 3)
        s.commit()
    assert moved.args == [f"--port={PORT_MIN + 3}"]


def test_move_job_port_leaves_the_service_port_of_a_code_service_alone(world: World) -> None:
    requests.add_service(world.platform, env=ENV, name="web", type=ServiceType.code, image=None,
                         command="serve", scale=1, size="s")
    requests.request_push(world.platform, env=ENV, service="web", image="app:1")
    (job,) = world.jobs("web")
    with world.platform.session() as s:
        catalogue.move_job_port(session=s, job_id=job.id, port=PORT_MIN + 1)
        s.commit()
    assert world.service("web").port is None
    assert world.job(job.id).port == PORT_MIN + 1


def test_a_start_whose_port_is_held_outside_the_platform_moves_to_a_free_one(world: World) -> None:
    for host in world.runtimes:
        world.held[host].update({PORT_MIN, PORT_MIN + 1})
    requests.add_service(world.platform, env=ENV, name="cache", type=ServiceType.memcached, image=None,
                         command=None, scale=1, size="s")
    world.run_all()
    (job,) = world.jobs("cache")
    assert job.state == JobState.running
    assert (job.port, job.environment["PORT"]) == (PORT_MIN + 2, str(PORT_MIN + 2))
    assert job.args == ["-p", str(PORT_MIN + 2)]
    assert world.service("cache").port == PORT_MIN + 2  # connection URLs follow
    assert world.runtimes[job.host].ports[job.container_name] == PORT_MIN + 2
    assert start_step(world, job.op_id or 0).name.endswith(f"port {PORT_MIN + 2}")


def test_a_start_fails_when_every_port_of_the_range_is_held_outside(world: World) -> None:
    settings = world.platform.settings
    for host in world.runtimes:
        world.held[host].update(range(settings.port_min, settings.port_max + 1))
    op = world.code_service("web", scale=1)
    assert op.state == OpState.failed
    assert op.error is not None and (
        f"port {PORT_MIN} on host h1 is held by a program outside the platform, "
        "and no other port of the range is free") in op.error
    assert world.all_containers() == {}


def test_a_port_held_by_the_jobs_own_adopted_container_is_not_moved(world: World) -> None:
    world.code_service("web", scale=1)
    op = requests.request_scale(world.platform, env=ENV, service="web", scale=2)
    world.run_stages(world.take_chain(op.id or 0), 1)
    step = start_step(world, op.id or 0)
    job = world.job(step.job_id or "")
    world.runtimes[job.host].run(container_spec(job))  # a first delivery already listens on it
    with world.platform.session() as s:
        catalogue.begin_step(session=s, step_id=step.id or 0, node=step.host or "", lease=15)
        s.commit()
    run_step(world.node(job.host), step.id or 0, START)
    assert world.job(job.id).port == job.port
    with world.platform.reader() as s:
        assert s.exec(select(Step).where(Step.id == step.id)).one().state == StepState.succeeded


# --- what a start does first and the ports its job holds: by its service's type -------------------


def keep_monitor_files(world: World, root: Path) -> None:
    """Every node keeps its monitoring jobs' files under ``root/HOST`` (as a real node does)."""
    for host in world.runtimes:
        world.node(host).monitors = MonitorFiles(str(root / host))


def set_variables_as_before_the_rule(world: World, service: str, values: dict[str, str]) -> None:
    """Variables written straight to the catalogue: ``check_variables`` refuses these names now."""
    with world.platform.session() as s:
        _, svc = catalogue.get_service(session=s, env=ENV, name=service)
        svc.variables = {**svc.variables, **values}
        s.add(svc)
        s.commit()


def test_a_monitoring_job_has_its_files_written_before_it_starts(world: World, tmp_path: Path) -> None:
    keep_monitor_files(world, tmp_path)
    requests.add_service(world.platform, env=ENV, name="monitoring", type=ServiceType.monitoring,
                         image=LOG_IMAGE, command=None, scale=1, size="xs")
    world.run_all()
    (job,) = world.jobs("monitoring")
    assert job.state == JobState.running
    assert (tmp_path / job.host / job.id / monitoring.PROMETHEUS_FILE).is_file()


def test_a_job_of_another_type_with_a_blackbox_port_variable_is_not_a_monitoring_job(
        world: World, tmp_path: Path) -> None:
    """Neither its files nor the port after its own are its: a variable does not make the type."""
    keep_monitor_files(world, tmp_path)
    requests.add_service(world.platform, env=ENV, name="web", type=ServiceType.code, image=None,
                         command="serve", scale=1, size="s")
    set_variables_as_before_the_rule(world, "web", {"BLACKBOX_PORT": str(PORT_MIN + 1)})
    for host in world.runtimes:
        world.held[host].add(PORT_MIN + 1)  # taken outside the platform: not this job's to need
    requests.request_push(world.platform, env=ENV, service="web", image="app:1")
    world.run_all()
    (job,) = world.jobs("web")
    assert job.state == JobState.running and job.environment["BLACKBOX_PORT"] == str(PORT_MIN + 1)
    assert job.port == PORT_MIN  # not moved: it holds one port
    assert not (tmp_path / job.host / job.id).exists()


def test_a_logging_job_whose_second_port_is_held_outside_moves_with_both(world: World) -> None:
    for host in world.runtimes:
        world.held[host].add(PORT_MIN + 1)
    requests.add_service(world.platform, env=ENV, name="logging", type=ServiceType.logging, image=LOG_IMAGE,
                         command=None, scale=1, size="xs")
    world.run_all()
    (job,) = world.jobs("logging")
    assert job.state == JobState.running and job.port == PORT_MIN + 2
    assert (job.environment["PORT"], job.environment["SYSLOG_PORT"]) == (str(PORT_MIN + 2), str(PORT_MIN + 3))


def test_every_step_action_has_a_task_and_its_work() -> None:
    from orchestrator.dispatch import TASK_OF
    from orchestrator.models import StepAction
    from workers.tasks import WORK_OF

    assert set(TASK_OF) == set(StepAction)
    assert set(WORK_OF) == set(StepAction) - {StepAction.wait}
    assert len(set(TASK_OF.values())) == len(TASK_OF)


# --- batches: a host's starts (or stops) of one stage in one task ---------------------------------


def test_a_stage_travels_as_one_task_per_host_for_starts_and_stops_and_one_per_other_step() -> None:
    steps = [Step(id=1, op_id=1, stage=0, action=StepAction.start, host="h1", name="a"),
             Step(id=2, op_id=1, stage=0, action=StepAction.start, host="h2", name="b"),
             Step(id=3, op_id=1, stage=0, action=StepAction.start, host="h1", name="c"),
             Step(id=4, op_id=1, stage=0, action=StepAction.route, host="h1", name="d"),
             Step(id=5, op_id=1, stage=0, action=StepAction.route, host="h1", name="e"),
             Step(id=6, op_id=1, stage=0, action=StepAction.stop, host="h1", name="f"),
             Step(id=7, op_id=1, stage=0, action=StepAction.wait, host=None, name="g")]
    assert [[s.id for s in batch] for batch in batches(steps)] == [[1, 3], [2], [4], [5], [6], [7]]


def test_a_batch_signature_names_every_step_and_job_and_takes_its_first_steps_task_id() -> None:
    app = Celery(set_as_current=False)
    dispatch = CeleryDispatch(app)
    steps = [Step(id=i, op_id=4, stage=1, action=StepAction.stop, host="h1", job_id=f"j{i}", name="x")
             for i in (8, 9)]
    batch = dispatch._steps(steps, env="e", service="s", queue="host.h1")
    assert batch.task == "orchestrator.step.stop_job" and batch.id == step_task_id(8)
    assert batch.kwargs == {"op": 4, "env": "e", "service": "s", "host": "h1", "step_ids": [8, 9], "jobs": ["j8", "j9"]}
    (one,) = [dispatch._steps(steps[:1], env="e", service="s", queue="host.h1")]
    assert one.kwargs == {"op": 4, "env": "e", "service": "s", "host": "h1", "step_id": 8, "job": "j8"}


def test_a_stage_is_sent_alone_its_boxed_steps_as_a_task_per_rung_host_and_what_follows_by_its_end(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain sent whole puts every later stage into each message of the first (a 200-host
    operation's first 200 messages held 200 steps each, 94 KB). A stage goes alone: its boxed
    steps (starts, stops) as one small task to each host rung for them, which takes whatever waits
    for it; any other step as a task of its own. No callback travels with them: the node whose
    step ends a stage sends the next one itself (or finishes the operation); a finish after a
    failed step goes to that step's node."""
    sent: list[Any] = []
    monkeypatch.setattr(dispatch_module, "_send", lambda canvas, _app: sent.append(canvas))
    hosts = 200
    starts = [Step(id=i + 1, op_id=4, stage=0, action=StepAction.start, host=f"h{i}", job_id=f"n{i}", name="x")
              for i in range(hosts)]
    wait = [Step(id=1000, op_id=4, stage=1, action=StepAction.wait, host="h0", name="wait")]
    stops = [Step(id=2000 + i, op_id=4, stage=2, action=StepAction.stop, host=f"h{i}", job_id=f"o{i}", name="x")
             for i in range(hosts)]
    stages = [starts, wait, stops]
    assert dispatch_module.boxed_hosts(starts) == sorted(f"h{i}" for i in range(hosts))
    celery = CeleryDispatch(Celery(set_as_current=False))
    celery.send_stage(4, stages, 0, env="e", service="s", rung=[f"h{i}" for i in range(0, hosts, 2)])
    celery.send_stage(4, stages, 1, env="e", service="s")
    celery.send_stage(4, stages, 2, env="e", service="s", rung=[])  # every host rung already: nothing
    first, middle = sent
    assert [(sig.task, sig.kwargs, sig.options["queue"]) for sig in first.tasks] == \
        [("orchestrator.step.host_steps", {"host": f"h{i}"}, f"host.h{i}") for i in range(0, hosts, 2)]
    assert len(json.dumps(first)) < hosts * 100
    assert (middle.task, middle.kwargs["step_id"], middle.options["queue"]) == ("orchestrator.step.wait", 1000,
                                                                                "host.h0")
    sent.clear()
    celery.send_finish(4, env="e", service="s", host="h3")  # after a failed step: on its node
    celery.send_finish(4, env="e", service="s", host=None)
    (on_node, on_control) = sent
    assert (on_node.task, on_node.kwargs["op_id"], on_node.options["queue"]) == ("orchestrator.op.finish", 4,
                                                                                 "host.h3")
    assert on_control.options["queue"] == "orchestrator"


def a_hosts_starts(world: World) -> tuple[int, str, list[Step]]:
    """A scale 1 -> 7 whose image checks ran: (its operation, a host, that host's start steps,
    pending: the batch one task carries)."""
    world.code_service("web", scale=1)
    op = requests.request_scale(world.platform, env=ENV, service="web", scale=7)
    world.run_stages(world.take_chain(op.id or 0), 1)
    starts = world.steps(op.id or 0, StepAction.start)
    host = starts[0].host or ""
    batch = [s for s in starts if s.host == host]
    assert len(batch) >= 3, starts
    return op.id or 0, host, batch


def test_a_batch_with_one_failed_start_ends_each_step_on_its_own_and_asks_for_one_finish(world: World) -> None:
    op_id, host, batch = a_hosts_starts(world)
    doomed = batch[1]

    def act(node: object, step: Step, job: object) -> dict[str, object]:
        if step.id == doomed.id:
            raise StepFailed("no room")
        return START.act(node, step, job)  # type: ignore[arg-type]

    sent = len(world.dispatch.sent)
    with pytest.raises(StepFailed, match=f"^step {doomed.id}: no room$"):
        run_steps(world.node(host), [s.id or 0 for s in batch], replace(START, act=act))
    after = {s.id: s for s in world.steps(op_id, StepAction.start)}
    assert (after[doomed.id].state, after[doomed.id].error) == (StepState.failed, "no room")
    assert world.job(doomed.job_id or "").state == JobState.failed
    for step in batch:
        if step.id != doomed.id:
            assert after[step.id].state == StepState.succeeded
            job = world.job(step.job_id or "")
            assert job.state == JobState.running and job.container_id in {c.id for c in world.runtimes[host].jobs()}
    assert [type(m).__name__ for m in world.dispatch.sent[sent:]] == ["SentFinish"]


def test_a_redelivered_batch_skips_its_succeeded_steps_and_runs_the_rest(world: World) -> None:
    op_id, host, steps = a_hosts_starts(world)
    batch = [s.id or 0 for s in steps]
    run_step(world.node(host), batch[0], START)  # the first delivery got this far
    results = run_steps(world.node(host), batch, START)
    assert results[0] == {"step": batch[0], "skipped": True}
    assert [r["step"] for r in results] == batch and all("container" in r for r in results[1:])
    assert {s.state for s in world.steps(op_id, StepAction.start) if s.host == host} == {StepState.succeeded}
    assert len(world.runtimes[host].jobs()) == len([j for j in world.jobs("web") if j.host == host])


def test_a_batch_is_at_most_max_batch_steps() -> None:
    steps = [Step(id=i, op_id=1, stage=0, action=StepAction.start, host="h1", name="s") for i in range(1, 21)]
    assert [len(b) for b in batches(steps)] == [MAX_BATCH, 20 - MAX_BATCH]


def test_every_step_of_a_batch_is_held_by_its_node_from_begin_to_end(world: World) -> None:
    """The heartbeat renews the leases of the steps its node works on: a step whose act is done
    (or not yet begun) while a sibling is slow must stay held, or the watcher would fail it."""
    _, host, steps = a_hosts_starts(world)
    batch = [s.id or 0 for s in steps]
    node = world.node(host)
    seen: list[set[int]] = []

    def act(n: object, step: Step, job: object) -> dict[str, object]:
        if step.id != batch[0]:
            time.sleep(0.2)  # slow beside the first, whose act is long done by now
        seen.append(set(node.working_on()))
        return START.act(n, step, job)  # type: ignore[arg-type]

    run_steps(node, batch, replace(START, act=act))
    assert len(seen) == len(batch) and all(held >= set(batch) for held in seen), (batch, seen)
    assert node.working_on() == []
