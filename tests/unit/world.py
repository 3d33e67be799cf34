"""A small world for unit tests of operations, the fleet and the node's tasks: a catalogue on
SQLite, ``InlineDispatch`` in place of the broker (dramatiq's StubBroker is the model), and
hosts each with a ``FakeRuntime`` and a ``NodeContext``. Nothing here needs Docker, Redis or a
broker: what is sent waits in ``world.dispatch.sent`` until ``world.run_all()`` runs it through
the real step bodies.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from unittest.mock import patch

from celery import Celery
from sqlalchemy import event, update
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel, col, select

from orchestrator import catalogue, operations, requests
from orchestrator.dispatch import batches
from orchestrator.models import (
    ACTIVE_JOB_STATES,
    Host,
    Job,
    JobState,
    Operation,
    Service,
    ServiceType,
    Step,
    StepAction,
    WorkerTarget,
    utcnow,
)
from orchestrator.platform import Platform
from orchestrator.settings import Settings
from orchestrator.watcher import Watcher
from workers.context import NodeContext
from workers.heartbeat import NodeHeartbeat
from workers.inline import WORK_OF, InlineDispatch, SentChain, SentFinish
from workers.runtime.fake import FakeRuntime
from workers.tasks import StepFailed, run_steps

ENV = "e"
IMAGE = "app:1"
IMAGE_2 = "app:2"
CRASHING = "app:crash"  # present on every host; its containers exit at once
LOG_IMAGE = "logs:1"
IMAGES = frozenset({IMAGE, IMAGE_2, CRASHING, LOG_IMAGE, "orch/logging:1", "postgres:16", "mysql:8.4", "memcached:1.6"})
PORT_MIN = 20000


class FakeClock:
    """Stands in for ``time`` in ``workers.tasks``: a job without a port is ready once it has
    run for a moment (0.3 s of settling per job); here that moment passes at once."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class World:
    platform: Platform
    dispatch: InlineDispatch
    watcher: Watcher
    runtimes: dict[str, FakeRuntime] = field(default_factory=dict)
    # Ports a program outside the platform holds, per host: the node sees them answer.
    held: dict[str, set[int]] = field(default_factory=dict)

    # --- building -------------------------------------------------------------------------------

    def add_host(self, name: str, *, images: Iterable[str] = IMAGES) -> FakeRuntime:
        """A host in the catalogue, its runtime, and its node serving its queue (one heartbeat)."""
        with self.platform.session() as s:
            catalogue.add_host(session=s, name=name, docker_url="unix:///nowhere",
                               address=f"10.0.0.{len(self.runtimes) + 1}")
            s.commit()
        runtime = FakeRuntime(images=set(images), crashing={CRASHING})
        self.runtimes[name] = runtime
        self.held[name] = set()
        self.start_node(name)
        self.beat(name)
        return runtime

    def start_node(self, host: str) -> NodeContext:
        """(Again) serve ``host``'s queue with a node on its runtime."""
        runtime, held = self.runtimes[host], self.held[host]
        node = NodeContext(platform=self.platform, host=host, address=f"addr-{host}", runtime=runtime,
                           accepts=lambda _a, port: runtime.listening(port) or port in held)
        self.dispatch.add_node(node)
        return node

    def kill_node(self, host: str) -> None:
        """The node of ``host`` dies: what is sent to its queue from now on never runs."""
        del self.dispatch.nodes[host]

    def silence(self, host: str, seconds: float = 60) -> None:
        """Make ``host``'s last heartbeat ``seconds`` old."""
        with self.platform.session() as s:
            s.exec(update(Host).where(col(Host.name) == host)
                   .values(last_seen=utcnow() - timedelta(seconds=seconds)))
            s.commit()

    def code_service(self, name: str, *, scale: int, image: str = IMAGE) -> Operation:
        """A code service pushed and deployed (everything sent has run)."""
        requests.add_service(self.platform, env=ENV, name=name, type=ServiceType.code, image=None,
                             command="serve", scale=scale, size="s")
        op = requests.request_push(self.platform, env=ENV, service=name, image=image)
        self.run_all()
        return self.operation(op.id or 0)

    # --- running --------------------------------------------------------------------------------

    def node(self, host: str) -> NodeContext:
        return self.dispatch.nodes[host]

    def beat(self, host: str) -> None:
        """One heartbeat of ``host``'s node (which reconciles its runtime with the catalogue)."""
        heartbeat = NodeHeartbeat(self.node(host))
        heartbeat.beat()
        heartbeat.wait_for_removals()  # removals run beside the heartbeat

    def watch(self) -> None:
        """One pass of the fleet watcher (it trusts the clock: heartbeats have had time to land)."""
        self.watcher.run_once()

    def run_all(self) -> int:
        return self.dispatch.run_all()

    def take_chain(self, op_id: int) -> SentChain:
        """Take the operation's chain out of what was sent: the test runs it by hand."""
        chain = next(m for m in self.dispatch.sent if isinstance(m, SentChain) and m.op_id == op_id)
        self.dispatch.sent.remove(chain)
        return chain

    def run_stages(self, chain: SentChain, count: int | None = None) -> None:
        """Run the chain's first ``count`` stages (all by default) as the nodes would, up to a
        failed one, and lose what follows them: neither the next stage's advance nor the finish
        (the chain's or a failed step's) is run, as if each node stopped right after its steps."""
        home = next(host for stage in chain.stages for _, _, host in stage if host)
        with patch.object(operations, "stage_ended", lambda *_args: None):
            for stage in chain.stages[:count]:
                failed = False
                for batch in batches(stage):
                    try:
                        run_steps(self.node(batch[0].host or home), [s.id for s in batch],
                                  WORK_OF[batch[0].action], env=chain.env, service=chain.service)
                    except StepFailed:
                        failed = True
                if failed:
                    break
        self.dispatch.sent = [m for m in self.dispatch.sent
                              if not (isinstance(m, SentFinish) and m.op_id == chain.op_id)]

    # --- reading --------------------------------------------------------------------------------

    @contextmanager
    def write_turns(self) -> Iterator[list[object]]:
        """The write transactions begun meanwhile (SQLite's one writer is the fleet's bottleneck:
        each is a turn every process waits for)."""
        writes: list[object] = []

        def began(connection: object) -> None:
            writes.append(connection)

        event.listen(self.platform.engine, "begin", began)
        try:
            yield writes
        finally:
            event.remove(self.platform.engine, "begin", began)

    def service(self, name: str) -> Service:
        with self.platform.reader() as s:
            return catalogue.get_service(session=s, env=ENV, name=name)[1]

    def worker(self, service: str, target: str) -> WorkerTarget | None:
        with self.platform.reader() as s:
            return catalogue.find_worker(session=s, service=self.service(service), name=target)

    def jobs(self, service: str, *, states: Iterable[JobState] = ACTIVE_JOB_STATES) -> list[Job]:
        """The service's jobs in ``states`` (active by default), oldest first."""
        with self.platform.reader() as s:
            query = select(Job).where(Job.service_id == self.service(service).id,
                                      col(Job.state).in_(list(states)))
            return list(s.exec(query.order_by(col(Job.created_at), col(Job.id))))

    def job(self, job_id: str) -> Job:
        with self.platform.reader() as s:
            job = s.get(Job, job_id)
            assert job is not None, f"no job {job_id}"
            return job

    def operation(self, op_id: int) -> Operation:
        with self.platform.reader() as s:
            return catalogue.get_operation(session=s, op_id=op_id)

    def operations(self, service: str) -> list[Operation]:
        """The service's operations, oldest first."""
        with self.platform.reader() as s:
            query = select(Operation).where(Operation.service_id == self.service(service).id)
            return list(s.exec(query.order_by(col(Operation.id))))

    def steps(self, op_id: int, action: StepAction | None = None) -> list[Step]:
        with self.platform.reader() as s:
            steps = catalogue.steps_of(session=s, op_id=op_id)
        return [st for st in steps if action is None or st.action == action]

    def step(self, step_id: int) -> Step:
        with self.platform.reader() as s:
            (step,) = catalogue.steps_by_id(session=s, step_ids=[step_id])
            return step

    def host(self, name: str) -> Host:
        with self.platform.reader() as s:
            return catalogue.get_host(session=s, name=name)

    def containers(self, host: str, service: str | None = None) -> dict[str, str]:
        """Job id -> container name of the jobs' containers on ``host``'s runtime."""
        return {c.labels["orchestrator.job"]: c.name for c in self.runtimes[host].jobs()
                if service is None or c.labels.get("orchestrator.service") == service}

    def all_containers(self, service: str | None = None) -> dict[str, str]:
        """Job id -> host of the jobs' containers on every runtime."""
        return {job: host for host in self.runtimes for job in self.containers(host, service)}


def make_settings(path: Path) -> Settings:
    return Settings(database_url=f"sqlite:///{path}", start_timeout=2, stop_timeout=0,
                    port_min=PORT_MIN, port_max=PORT_MIN + 99)


def empty_catalogue(engine: Engine) -> None:
    """Delete every row, so one catalogue file (and its engines' compiled statements) serves
    many tests."""
    with engine.begin() as conn:
        for table in reversed(SQLModel.metadata.sorted_tables):
            conn.execute(table.delete())


def make_world(settings: Settings, writer: Engine, reader: Engine,
               hosts: Iterable[str] = ("h1", "h2")) -> World:
    """A world on an empty catalogue with ``hosts`` up and an environment ``ENV`` without
    included services."""
    empty_catalogue(writer)
    dispatch = InlineDispatch()
    platform = Platform(writer, Celery(set_as_current=False), settings, reader=reader, dispatch=dispatch)
    watcher = Watcher(platform)
    watcher.trust_after = 0.0
    world = World(platform, dispatch, watcher)
    for name in hosts:
        world.add_host(name)
    requests.create_env(world.platform, name=ENV, sandbox=True, defaults=False)
    return world
