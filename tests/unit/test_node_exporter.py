"""The host's node exporter follows the catalogue at each beat: it runs while some environment
has a monitoring service, and stops (its port forgotten) when the last one goes."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlmodel import select

from orchestrator.models import Environment, Host, Service, ServiceType
from tests.unit.world import IMAGE, World
from workers.exporter import NodeExporter
from workers.heartbeat import NodeHeartbeat


def exporter_port(world: World) -> int | None:
    with world.platform.reader() as s:
        return s.exec(select(Host.node_exporter_port).where(Host.name == "h1")).one()


def test_the_node_exporter_runs_while_some_environment_is_monitored_and_stops_after(world: World) -> None:
    node, runtime = world.node("h1"), world.runtimes["h1"]
    node.node_exporter = exporter = NodeExporter(runtime, "h1", "127.0.0.1", platform_key="k", image=IMAGE)
    beat = NodeHeartbeat(node)

    beat.reconcile_node_exporter()
    assert runtime.inspect(exporter.name) is None and exporter_port(world) is None

    with world.platform.session() as s:
        env = s.exec(select(Environment)).first()
        assert env is not None
        s.add(Service(env_id=env.id or 0, name="mon", type=ServiceType.monitoring, size="xs"))
        s.commit()
    beat.reconcile_node_exporter()
    state = runtime.inspect(exporter.name)
    assert state is not None and state.status == "running"
    assert exporter_port(world) is not None

    with world.platform.session() as s:
        svc = s.exec(select(Service).where(Service.name == "mon")).one()
        svc.removed_at = datetime.now(UTC)
        s.add(svc)
        s.commit()
    beat.reconcile_node_exporter()
    assert runtime.inspect(exporter.name) is None  # the last monitoring service went: so did it
    assert exporter_port(world) is None
