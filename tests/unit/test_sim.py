"""Simulated hosts in process: registered like real ones, each with its own runtime and node,
the same step tasks and heartbeats as a real node; a task finds its host from its queue. (The
process itself, ``orchestrator sim run``, is tested end to end in tests/integration/test_sim.py.)"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery.exceptions import Reject
from sqlalchemy.engine import Engine

from orchestrator import catalogue
from orchestrator.errors import BadInput
from orchestrator.models import JobState, OpState, StepAction, StepState
from orchestrator.settings import Settings
from tests.unit.world import FakeClock, World, make_world
from workers import tasks
from workers.heartbeat import NodeHeartbeat
from workers.node import node_context
from workers.runtime.sim import INJECTED_OUTPUT
from workers.sim import SimFleet, SimOptions, register_hosts


@pytest.fixture
def bare(catalogue_file: tuple[Settings, Engine, Engine], monkeypatch: pytest.MonkeyPatch) -> World:
    """A world with no host at all."""
    monkeypatch.setattr(tasks, "time", FakeClock())
    return make_world(*catalogue_file, hosts=())


def serve(world: World, options: SimOptions) -> SimFleet:
    """The simulated hosts registered, their nodes serving their queues, one heartbeat each."""
    fleet = SimFleet(world.platform, options)
    register_hosts(world.platform, fleet.nodes)
    for node in fleet.nodes.values():
        world.dispatch.add_node(node)
    fleet.beat_all()
    return fleet


@pytest.fixture
def fleet(bare: World) -> Iterator[SimFleet]:
    fleet = serve(bare, SimOptions(hosts=3))
    yield fleet
    fleet.stop()


def task_from(queue: str) -> Any:
    return SimpleNamespace(name="orchestrator.step.start_job", request=SimpleNamespace(
        delivery_info={"exchange": "", "routing_key": queue}))


def test_simulated_hosts_are_real_hosts_that_nothing_can_reach(bare: World, fleet: SimFleet) -> None:
    with bare.platform.reader() as s:
        hosts = {h.name: h for h in catalogue.list_hosts(session=s)}
    assert sorted(hosts) == ["sim1", "sim2", "sim3"]
    assert {(h.docker_url, h.address, h.state, h.cpus, h.memory_mb) for h in hosts.values()} == {
        (f"sim://{n}", f"{n}.sim.invalid", "up", 16.0, 65536) for n in hosts}
    node = fleet.nodes["sim2"]
    assert (node.shipper, node.node_exporter, node.monitors) == (None, None, None)
    register_hosts(bare.platform, fleet.nodes)  # a sim started again finds them: nothing doubled
    with bare.platform.reader() as s:
        assert len(catalogue.list_hosts(session=s)) == 3


def test_a_real_host_of_the_same_name_is_refused(bare: World) -> None:
    with bare.platform.session() as s:
        catalogue.add_host(session=s, name="sim1", docker_url="unix:///var/run/docker.sock", address="127.0.0.1")
        s.commit()
    with pytest.raises(BadInput, match="sim1 exists and is not simulated"):
        register_hosts(bare.platform, ["sim1", "sim2"])


def test_a_task_runs_for_the_host_of_its_queue(fleet: SimFleet) -> None:
    assert fleet.node_of(task_from("host.sim2")) is fleet.nodes["sim2"]
    assert fleet.node_of(task_from("host.sim3")).runtime is fleet.runtimes["sim3"]
    with pytest.raises(RuntimeError, match="no simulated host"):
        fleet.node_of(task_from("host.elsewhere"))
    fleet.runtimes["sim2"].die()
    with pytest.raises(Reject) as rejected:  # back to its queue, as a dead node's message
        fleet.node_of(task_from("host.sim2"))
    assert rejected.value.requeue


def test_a_deploy_runs_each_job_on_its_own_hosts_runtime(bare: World, fleet: SimFleet) -> None:
    op = bare.code_service("web", scale=6)
    assert op.state == OpState.succeeded, op.error
    jobs = bare.jobs("web")
    assert Counter(j.host for j in jobs) == {"sim1": 2, "sim2": 2, "sim3": 2}
    for host, runtime in fleet.runtimes.items():
        assert {c.labels["orchestrator.job"] for c in runtime.jobs()} == {j.id for j in jobs if j.host == host}
        assert all(runtime.listening(j.port or 0) for j in jobs if j.host == host)
    for node in fleet.nodes.values():  # each heartbeat reconciles its own runtime: nothing to fix
        NodeHeartbeat(node).beat()
    assert {j.state for j in bare.jobs("web", states=list(JobState))} == {JobState.running}


def test_injected_start_failures_are_reported_as_real_ones(bare: World) -> None:
    fleet = serve(bare, SimOptions(hosts=2, fail_rate=1.0))
    op = bare.code_service("web", scale=2)
    assert op.state == OpState.failed
    starts = bare.steps(op.id or 0, StepAction.start)
    assert [s.state for s in starts] == [StepState.failed, StepState.failed]
    assert {s.error for s in starts} == {f"container exited at once (exit code 1); last output: {INJECTED_OUTPUT}"}
    assert all(runtime.jobs() == [] for runtime in fleet.runtimes.values())  # a failed start removes its container


def test_a_simulated_host_is_no_real_nodes_to_serve(bare: World, fleet: SimFleet) -> None:
    with pytest.raises(BadInput, match="sim1 is simulated"):
        node_context(bare.platform, "sim1", pool_size=1)
