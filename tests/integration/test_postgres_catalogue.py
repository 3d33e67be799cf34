"""Push, redeploy, scale and concurrent redeploys with a PostgreSQL catalogue.

A fresh database per test session, its own node process (own host name, Redis database and port
range, so it never meets the SQLite platform of the other tests), real containers checked in Docker.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any
from unittest.mock import patch

import docker
import psycopg
import pytest
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import col

from orchestrator import catalogue, fleet, operations, requests, watcher
from orchestrator.catalogue import hosts as catalogue_hosts
from orchestrator.catalogue import operations as catalogue_operations
from orchestrator.db import make_engines
from orchestrator.dispatch import BOXED, MAX_BOX
from orchestrator.errors import BadInput
from orchestrator.models import (
    Host,
    HostState,
    Job,
    JobState,
    Operation,
    OpKind,
    OpState,
    OpTrigger,
    ServiceType,
    Step,
    StepState,
    utcnow,
)
from orchestrator.settings import Settings
from tests.conftest import DOCKER_URL, Cli, containers
from tests.harness import (
    HTTPD,
    SAMPLE_IMAGE,
    Platform,
    PlatformEnv,
    fresh_database,
    remove_containers,
    retire,
)
from tests.helpers import jobs_json, op_json, op_of, ts
from tests.unit.world import ENV, IMAGE, World, make_settings, make_world

pytestmark = pytest.mark.e2e

PG_REDIS_DB = 13
PG_PORT_MIN, PG_PORT_MAX = 30750, 30999


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with fresh_database("orch_test") as url:
        yield url


@pytest.fixture(scope="module")
def pg_platform(pg_url: str, docker_client: docker.DockerClient,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cli, str]]:
    """The platform env with the PostgreSQL catalogue, a host and its node running."""
    env = PlatformEnv(pg_url, PG_REDIS_DB, (PG_PORT_MIN, PG_PORT_MAX))
    env.flush()
    platform = Platform(env, tmp_path_factory.mktemp("pgnode"))
    cli = Cli(env.variables())
    host = f"pg{uuid.uuid4().hex[:6]}"
    cli.ok("hosts", "add", host, "--docker-url", DOCKER_URL, "--address", "127.0.0.1")
    try:
        platform.start_node(host)
        yield cli, host
    finally:
        platform.stop_nodes()


@pytest.fixture
def pg_env(pg_platform: tuple[Cli, str], docker_client: docker.DockerClient) -> Iterator[str]:
    cli, _ = pg_platform
    name = f"p{uuid.uuid4().hex[:8]}"
    cli.ok("env", "create", name, "--sandbox", "--no-defaults")
    yield name
    retire(cli.env["ORCH_DATABASE_URL"], name)
    remove_containers(docker_client, name)


def in_postgres(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def blocked_or_ended(world: World, thread: threading.Thread, timeout: float = 15.0) -> None:
    """Until ``thread`` ended, or a transaction of the world's database waits for a lock: the
    race tests below hold one transaction open while another runs, which must either wait for it
    (mended) or get through (the race), not merely be slow to get there."""
    deadline = time.monotonic() + timeout
    while thread.is_alive() and time.monotonic() < deadline:
        if in_postgres(world.platform.settings.database_url,
                       "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                       "AND wait_event_type = 'Lock'")[0][0]:
            return
        time.sleep(0.02)
    assert not thread.is_alive() or time.monotonic() < deadline, "it neither ended nor waited for a lock"


@contextmanager
def meanwhile(world: World, owner: Any, name: str, action: Callable[[], object], *,
              before: bool = False) -> Iterator[None]:
    """``owner.name`` patched so that at its first call (after it, or ``before`` it) ``action``
    runs in another thread until it ends or waits for a lock (``blocked_or_ended``): the caller's
    transaction is still open, and goes on then. On leaving, the action ran, and ended."""
    real = getattr(owner, name)
    threads: list[threading.Thread] = []

    def start_once() -> None:
        if not threads:
            threads.append(threading.Thread(target=action))
            threads[0].start()
            blocked_or_ended(world, threads[0])

    def hooked(*args: Any, **kwargs: Any) -> Any:
        if before:
            start_once()
        result = real(*args, **kwargs)
        start_once()
        return result

    with patch.object(owner, name, hooked):
        yield
        assert threads, f"{name} was not called"
        threads[0].join(timeout=30)
    assert not threads[0].is_alive()


def test_push_redeploy_scale_with_postgres(pg_platform: tuple[Cli, str], pg_env: str, pg_url: str,
                                           docker_client: docker.DockerClient) -> None:
    cli, host = pg_platform
    cli.ok("services", "add", pg_env, "web", "--type", "code", "--command", HTTPD, "--scale", "2")
    assert containers(docker_client, pg_env) == {}

    op_id = op_of(cli.ok("push", pg_env, "web", SAMPLE_IMAGE, "--wait"))
    first = containers(docker_client, pg_env, "web")
    assert len(first) == 2
    jobs = jobs_json(cli, pg_env, "web")
    assert {j["id"]: j["container_id"] for j in jobs} == first
    assert all(j["state"] == "running" and j["release"] == 1 and j["host"] == host for j in jobs)
    for j in jobs:
        assert PG_PORT_MIN <= j["port"] <= PG_PORT_MAX
    op = op_json(cli, op_id)
    assert op["state"] == "succeeded" and op["trigger"] == "push"
    assert all(s["state"] == "succeeded" and s["started_at"] and s["finished_at"] for s in op["steps"])

    # The catalogue really is this PostgreSQL database.
    rows = in_postgres(pg_url, "SELECT id, container_id, state FROM job WHERE state = 'running'")
    assert {r[0]: r[1] for r in rows} == first
    assert in_postgres(pg_url, "SELECT state FROM operation WHERE id = %s", op_id) == [("succeeded",)]

    cli.ok("vars", "set", pg_env, "web", "GREETING=from-postgres")
    cli.ok("redeploy", pg_env, "web", "--wait")
    second = containers(docker_client, pg_env, "web")
    assert len(second) == 2 and not set(second.values()) & set(first.values())
    for cid in second.values():
        out = docker_client.containers.get(cid).exec_run(["sh", "-c", "echo $GREETING"]).output
        assert isinstance(out, bytes) and out.decode().strip() == "from-postgres"
    assert len(containers(docker_client, pg_env, "web", running=False)) == 2

    cli.ok("scale", pg_env, "web", "3", "--wait")
    third = containers(docker_client, pg_env, "web")
    assert len(third) == 3 and set(second.items()) <= set(third.items())
    cli.ok("scale", pg_env, "web", "1", "--wait")
    fourth = containers(docker_client, pg_env, "web")
    assert len(fourth) == 1 and set(fourth.items()) <= set(third.items())
    assert {j["id"]: j["container_id"] for j in jobs_json(cli, pg_env, "web")} == fourth


def test_overlap_redeploy_with_postgres(pg_platform: tuple[Cli, str], pg_env: str,
                                        docker_client: docker.DockerClient) -> None:
    """The overlap wait reads its step's start time back from the catalogue: PostgreSQL too."""
    cli, _ = pg_platform
    cli.ok("services", "add", pg_env, "web", "--type", "code", "--command", HTTPD, "--scale", "2")
    cli.ok("push", pg_env, "web", SAMPLE_IMAGE, "--wait")
    old = set(containers(docker_client, pg_env, "web").values())
    cli.ok("services", "update", pg_env, "web", "--overlap", "3", "--support")
    proc = cli.popen("redeploy", pg_env, "web", "--wait")
    seen_both_at = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        now = set(containers(docker_client, pg_env, "web").values())
        if len(now) == 4 and old <= now:
            seen_both_at = time.monotonic()
            break
        time.sleep(0.1)
    assert seen_both_at is not None, "old and new jobs never ran side by side"
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    assert time.monotonic() - seen_both_at >= 2.5  # the old jobs lived on for the overlap period
    final = set(containers(docker_client, pg_env, "web").values())
    assert len(final) == 2 and not final & old
    wait = [s for s in op_json(cli, op_of(out))["steps"] if s["action"] == "wait"]
    assert len(wait) == 1 and wait[0]["state"] == "succeeded"
    assert (ts(wait[0]["finished_at"]) - ts(wait[0]["started_at"])).total_seconds() >= 3


def test_concurrent_redeploys_are_serialized_with_postgres(pg_platform: tuple[Cli, str],
                                                           pg_env: str,
                                                           docker_client: docker.DockerClient
                                                           ) -> None:
    """The one-operation-per-service claim is an UPDATE ... WHERE: it must hold on PostgreSQL too."""
    cli, _ = pg_platform
    cli.ok("services", "add", pg_env, "web", "--type", "code", "--command", HTTPD, "--scale", "2")
    cli.ok("push", pg_env, "web", SAMPLE_IMAGE, "--wait")
    original = containers(docker_client, pg_env, "web")

    procs = [cli.popen("redeploy", pg_env, "web", "--wait") for _ in range(3)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    ops = sorted((op_json(cli, op_of(out)) for out, _ in outputs), key=lambda o: o["id"])
    for earlier, later in pairwise(ops):
        earlier_end = max(ts(s["finished_at"]) for s in earlier["steps"])
        later_start = min(ts(s["started_at"]) for s in later["steps"])
        assert later_start >= earlier_end, (earlier["steps"], later["steps"])
        assert {s["job"] for s in later["steps"] if s["action"] == "stop"} == \
            {s["job"] for s in earlier["steps"] if s["action"] == "start"}

    final = containers(docker_client, pg_env, "web")
    assert len(final) == 2 and not set(final.values()) & set(original.values())
    assert len(containers(docker_client, pg_env, "web", running=False)) == 2
    assert {j["id"]: j["container_id"] for j in jobs_json(cli, pg_env, "web")} == final


@pytest.fixture
def pg_world(tmp_path: Path) -> Iterator[World]:
    """The unit tests' world (fake runtimes, inline dispatch) on a PostgreSQL catalogue of its own."""
    with fresh_database("orch_world") as url:
        engines: list[Engine] = []
        try:
            engines.extend(make_engines(url))
            yield make_world(Settings(**{**make_settings(tmp_path / "unused.db").model_dump(), "database_url": url}),
                             *engines)
        finally:
            for engine in engines:
                engine.dispose()


def test_a_request_racing_a_finish_never_leaves_its_operation_queued(pg_world: World) -> None:
    """A request records its operation and claims the service in one transaction. Its claim
    fails while another operation runs; if that one's finish freed the service and looked for the
    next before the request committed, the new operation would wait with nobody to start it. The
    request locks the service's row first: the finish's release waits for its commit."""
    world = pg_world
    world.code_service("web", scale=1)
    first = requests.request_redeploy(world.platform, env=ENV, service="web")  # running, steps not run yet
    claim_tried, releasing, finished = threading.Event(), threading.Event(), threading.Event()
    real_claim, real_release = catalogue.claim_next_operation, catalogue.release_service

    def claim_then_linger(**kwargs: Any) -> Any:
        claimed = real_claim(**kwargs)
        if threading.current_thread().name == "request":
            claim_tried.set()
            releasing.wait(timeout=10)  # the finish frees the service now...
            finished.wait(timeout=1)  # ...and ends (unlocked, it would commit and look for the next)
        return claimed

    def release(**kwargs: Any) -> None:
        releasing.set()
        real_release(**kwargs)

    second: list[Any] = []
    with patch.object(catalogue, "claim_next_operation", claim_then_linger), \
            patch.object(catalogue, "release_service", release):
        request = threading.Thread(target=lambda: second.append(
            requests.request_redeploy(world.platform, env=ENV, service="web")), name="request")
        request.start()
        assert claim_tried.wait(timeout=10)
        world.run_all()  # the first operation's steps, then its finish (which frees the service)
        finished.set()
        request.join(timeout=30)
    assert releasing.is_set()  # the finish did meet the request's open transaction
    assert not request.is_alive() and len(second) == 1
    world.run_all()
    assert world.operation(first.id or 0).state == OpState.succeeded
    assert world.operation(second[0].id or 0).state == OpState.succeeded


def test_a_cancel_racing_the_claim_of_its_operation_never_holds_the_service(pg_world: World) -> None:
    """A finish claims the service for the next queued operation: it reads the oldest queued one,
    then claims. A cancel of that one committing in between must not leave the service held by
    an operation that ended (until the watcher's stranded pass): the claim sees it ended and lets
    the service go."""
    world = pg_world
    world.code_service("web", scale=1)
    first = requests.request_redeploy(world.platform, env=ENV, service="web")  # running, steps not run yet
    second = requests.request_redeploy(world.platform, env=ENV, service="web")
    assert world.operation(second.id or 0).state == OpState.queued
    real_oldest = catalogue_operations._oldest_queued
    cancelled: list[Any] = []

    def oldest_then_cancelled(*args: Any) -> Any:
        op = real_oldest(*args)
        if op is not None and op.id == second.id and not cancelled:  # read as queued; cancelled now
            canceller = threading.Thread(target=lambda: cancelled.append(
                operations.cancel(world.platform, second.id or 0)))
            canceller.start()
            canceller.join(timeout=30)
            assert cancelled, "the cancel did not end"
        return op

    with patch.object(catalogue_operations, "_oldest_queued", oldest_then_cancelled):
        world.run_all()  # the first operation's steps, then its finish (which claims the next)
    assert cancelled and cancelled[0].state == OpState.cancelled
    assert world.operation(first.id or 0).state == OpState.succeeded
    assert world.service("web").active_op_id is None
    third = requests.request_redeploy(world.platform, env=ENV, service="web")  # the service is free at once
    assert world.operation(third.id or 0).state == OpState.running
    world.run_all()
    assert world.operation(third.id or 0).state == OpState.succeeded


def test_two_plans_at_once_never_place_two_jobs_on_one_port(pg_world: World) -> None:
    """Two services' deploys planned at once: the second reads the hosts' loads while the first
    has placed its job and not committed. Each would choose the same port of the same host (and
    count the same room free); placements take turns instead: the second waits for the first's
    commit, and sees its job."""
    world = pg_world
    for name in ("a", "b"):
        requests.add_service(world.platform, env=ENV, name=name, type=ServiceType.code, image=None,
                             command="serve", scale=1, size="s")
    # The first plan has read the loads; the second one runs now, to its commit if it can.
    with meanwhile(world, catalogue_hosts, "host_loads",
                   lambda: requests.request_push(world.platform, env=ENV, service="b", image=IMAGE)):
        requests.request_push(world.platform, env=ENV, service="a", image=IMAGE)
    (a,), (b,) = world.jobs("a"), world.jobs("b")
    assert (a.host, a.port) != (b.host, b.port), (a.host, a.port)
    world.run_all()
    assert {j.state for j in world.jobs("a") + world.jobs("b")} == {JobState.running}


def test_a_drain_while_a_plan_places_on_its_host_moves_that_job_too(pg_world: World) -> None:
    """A drain marks its host and moves the jobs it has. A plan that read the host as up and
    placed a job there, not committed yet, would leave that job on the drained host; the drain
    waits for the plan's commit instead, and moves it."""
    world = pg_world
    requests.add_service(world.platform, env=ENV, name="b", type=ServiceType.code, image=None,
                         command="serve", scale=1, size="s")
    # The plan has read the loads (h1 up, and the lightest: it places there); a drain of h1 now.
    with meanwhile(world, catalogue_hosts, "host_loads", lambda: fleet.drain(world.platform, host="h1")):
        requests.request_push(world.platform, env=ENV, service="b", image=IMAGE)
    world.run_all()  # the push, then the drain queued behind it
    (job,) = world.jobs("b")
    assert job.host == "h2" and job.state == JobState.running, (job.host, job.state)


def test_a_host_removed_while_a_plan_places_on_it_is_refused(pg_world: World) -> None:
    """A host's removal is refused while it has jobs: one a plan placed there, not committed
    yet, counts (the removal waits for the plan's commit)."""
    world = pg_world
    requests.add_service(world.platform, env=ENV, name="b", type=ServiceType.code, image=None,
                         command="serve", scale=1, size="s")
    removal: list[BaseException | None] = []  # what the removal came to: None, or its refusal

    def remove_h1() -> None:
        try:
            fleet.remove(world.platform, host="h1")
            removal.append(None)
        except BadInput as exc:
            removal.append(exc)

    with meanwhile(world, catalogue_hosts, "host_loads", remove_h1):
        requests.request_push(world.platform, env=ENV, service="b", image=IMAGE)
    assert isinstance(removal[0], BadInput) and "still has 1 jobs" in str(removal[0]), removal
    (job,) = world.jobs("b")
    with world.platform.reader() as s:
        assert job.host == "h1" and "h1" in {h.name for h in catalogue.list_hosts(session=s)}


def test_two_variable_changes_at_once_both_stay(pg_world: World) -> None:
    """Two `vars set` at once (one key each): the second reads the variables while the first
    has written its key and not committed. It would write its own over them and drop the first's;
    the service's row is locked until each commits instead."""
    world = pg_world
    world.code_service("web", scale=1)
    with meanwhile(world, catalogue, "set_variables",
                   lambda: requests.change_variables(world.platform, env=ENV, service="web", values={"B": "2"})):
        requests.change_variables(world.platform, env=ENV, service="web", values={"A": "1"})
    assert world.service("web").variables == {"A": "1", "B": "2"}


def test_a_lease_renewed_while_the_watcher_judges_it_keeps_its_step(pg_world: World) -> None:
    """The watcher reads the steps whose lease ran out, then fails each. A node's renewal that
    commits in between keeps its step running: the watcher's update looks at the lease again."""
    world = pg_world
    world.code_service("web", scale=1)
    op = requests.request_redeploy(world.platform, env=ENV, service="web")
    step = world.steps(op.id or 0)[0]
    with world.platform.session() as s:  # begun by a node whose lease ran out a minute ago
        s.exec(update(Step).where(col(Step.id) == step.id).values(
            state=StepState.running, node="h1/late", lease_until=utcnow() - timedelta(seconds=60)))
        s.commit()
    real_end = catalogue.end_step

    def renewed_meanwhile(**kwargs: Any) -> bool:
        with world.platform.session() as s:  # the node's heartbeat renews it, and commits
            s.exec(update(Step).where(col(Step.id) == step.id).values(lease_until=utcnow() + timedelta(seconds=15)))
            s.commit()
        return real_end(**kwargs)

    with patch.object(catalogue, "end_step", renewed_meanwhile):
        assert watcher.expire_leases(world.platform, time.monotonic()) == []  # (read as ran out: renewed)
    assert world.steps(op.id or 0)[0].state == StepState.running
    assert world.operation(op.id or 0).state == OpState.running


def test_a_host_marked_down_while_it_is_undrained_stays_down(pg_world: World) -> None:
    """An undrain reads its host (draining), then writes it up. The watcher marking the host
    down in between (its heartbeats stopped) is not written over: the undrain holds the host's
    row, and the watcher's mark comes after it."""
    world = pg_world
    fleet.drain(world.platform, host="h1")
    world.silence("h1", 60)
    # The undrain has read its host; the watcher's pass marks it down now.
    with meanwhile(world, catalogue, "get_host", lambda: watcher.silent_hosts(world.platform, time.monotonic())):
        fleet.undrain(world.platform, host="h1")
    with world.platform.reader() as s:
        assert catalogue.get_host(session=s, name="h1").state == HostState.down


def test_a_step_picked_up_while_the_watcher_judges_it_lost_keeps_its_operation(pg_world: World) -> None:
    """The watcher reads the steps never picked up, then fails each. A node that began one in
    between keeps it (the end looks at its state again); and the operation, none of whose steps
    failed, is not finished: a finish ends an operation as its steps stand (it would have ended
    as succeeded, its steps still running)."""
    world = pg_world
    world.code_service("web", scale=1)
    op = requests.request_redeploy(world.platform, env=ENV, service="web")  # stage 0 sent, not run
    with world.platform.session() as s:  # sent an hour ago, and never picked up
        s.exec(update(Operation).where(col(Operation.id) == op.id).values(sent_at=utcnow() - timedelta(hours=1)))
        s.commit()
    first = world.steps(op.id or 0)[0]
    real_end = catalogue.end_step

    def picked_up_meanwhile(**kwargs: Any) -> bool:
        with world.platform.session() as s:  # a node begins it, and commits
            s.exec(update(Step).where(col(Step.id) == kwargs["step_id"]).values(
                state=StepState.running, node=f"{first.host}/slow", lease_until=utcnow() + timedelta(seconds=15)))
            s.commit()
        return real_end(**kwargs)

    with patch.object(catalogue, "end_step", picked_up_meanwhile):
        watcher.end_orphans(world.platform, time.monotonic())
    assert {st.state for st in world.steps(op.id or 0) if st.stage == 0} <= {StepState.running}
    assert world.operation(op.id or 0).state == OpState.running


def test_an_operation_sent_while_the_watcher_judges_it_unsent_is_not_abandoned(pg_world: World) -> None:
    """The watcher finds an operation started long ago and never sent (the process that started
    it stopped, it seems), then abandons it. Sent in between by that process after all (it was
    only slow), it runs on."""
    world = pg_world
    world.code_service("web", scale=1)
    op = requests.request_redeploy(world.platform, env=ENV, service="web")
    with world.platform.session() as s:
        s.exec(update(Operation).where(col(Operation.id) == op.id).values(
            sent_at=None, started_at=utcnow() - timedelta(hours=1)))
        s.commit()
    real_abandon = operations.abandon

    def sent_meanwhile(*args: Any, **kwargs: Any) -> bool:
        with world.platform.session() as s:
            catalogue.mark_sent(session=s, op_id=op.id or 0)
            s.commit()
        return real_abandon(*args, **kwargs)

    with patch.object(operations, "abandon", sent_meanwhile):
        watcher.end_orphans(world.platform, time.monotonic())
    assert world.operation(op.id or 0).state == OpState.running
    assert world.run_all() and world.operation(op.id or 0).state == OpState.succeeded


def test_the_same_source_pushed_twice_at_once_is_one_row(pg_world: World) -> None:
    """Two pushes of the same source (to two services) at once: the second's row clashes with the
    first's on its content's digest once the first commits; it takes that row (it failed the
    push, as "the catalogue is unavailable")."""
    world = pg_world
    data = b"the same directory, as a tar" * 100
    stored: list[int | BaseException] = []

    def store() -> None:
        try:
            with world.platform.session() as s:
                source = catalogue.store_source(session=s, data=data)
                s.commit()
                stored.append(source.id or 0)
        except Exception as exc:
            stored.append(exc)

    with world.platform.session() as s:
        first = catalogue.store_source(session=s, data=data)
        second = threading.Thread(target=store)
        second.start()
        blocked_or_ended(world, second)  # (it waits for this transaction on the digest's unique index)
        s.commit()
        first_id = first.id
    second.join(timeout=30)
    assert stored == [first_id]


def test_a_host_back_while_its_jobs_recover_is_planned_runs_no_job_too_many(pg_world: World) -> None:
    """A host comes back with its lost job still running: its heartbeat takes the job back when
    the service has no operation under way. A recover claiming and planning that service
    meanwhile must see the job back (and place nothing), or be seen (and the job not taken):
    each read the other before its commit, and the service ran a job more than its scale."""
    world = pg_world
    world.code_service("web", scale=1)
    (job,) = world.jobs("web")
    with world.platform.session() as s:  # its host went down, the job lost; no recover yet
        s.exec(update(Host).where(col(Host.name) == job.host).values(state=HostState.down))
        s.exec(update(Job).where(col(Job.id) == job.id).values(state=JobState.lost))
        s.commit()
    service_id = world.service("web").id or 0
    # The heartbeat judges the job wanted back; a recover starts now.
    with meanwhile(world, catalogue, "active_jobs", lambda: fleet._start_for_each(
            world.platform, [service_id], OpKind.recover, OpTrigger.host_lost, job.host)):
        world.beat(job.host)
    world.run_all()
    assert [(j.id, j.state) for j in world.jobs("web")] == [(job.id, JobState.running)]


def test_two_services_added_at_once_see_each_other(pg_world: World) -> None:
    """A redis service named "database" and a first postgresql service would both set
    DATABASE_URL in code services: the second added is refused. Added at once, each read the
    environment's services without the other; the environment's row is locked instead."""
    world = pg_world
    refused: list[BaseException] = []

    def add_cache() -> None:
        try:
            requests.add_service(world.platform, env=ENV, name="database", type=ServiceType.redis, image=None,
                                 command=None, scale=1, size="s")
        except BadInput as exc:
            refused.append(exc)

    with meanwhile(world, catalogue, "add_service", add_cache):
        requests.add_service(world.platform, env=ENV, name="orders", type=ServiceType.postgresql, image=None,
                             command=None, scale=1, size="s")
    assert len(refused) == 1 and "DATABASE_URL" in str(refused[0]), refused


def test_a_step_claimed_by_a_host_back_while_the_watcher_fails_it_is_not_both(pg_world: World) -> None:
    """The watcher fails the steps waiting for a host that is down. The host beating again and
    its node claiming one of them meanwhile must not leave a step the node runs and the watcher
    failed: the watcher holds the down hosts' rows (a claim locks its host's row first), so the
    node's claim comes after and finds the step failed."""
    world = pg_world
    world.code_service("web", scale=1)
    op = requests.request_redeploy(world.platform, env=ENV, service="web")  # stage 0 sent, not run
    step = world.steps(op.id or 0)[0]
    assert step.host is not None and step.state == StepState.pending
    with world.platform.session() as s:
        s.exec(update(Host).where(col(Host.name) == step.host).values(state=HostState.down))
        s.commit()
    claimed: list[list[Any]] = []

    def claim() -> None:  # the host's node, back: its claim of the host's waiting steps
        with world.platform.session() as s:
            taken, _more = catalogue.claim_host_steps(session=s, host=step.host or "", node=f"{step.host}/back",
                                                      lease=15, actions=sorted(BOXED), most=MAX_BOX,
                                                      silent_since=4)
            s.commit()
            claimed.append(list(taken))

    with meanwhile(world, catalogue, "end_step", claim, before=True):  # (it read the step stuck)
        fleet.fail_steps_on_down_hosts(world.platform)
    failed = world.step(step.id or 0).state == StepState.failed
    assert not (failed and claimed[0]), (claimed, world.step(step.id or 0).state)


def test_a_site_added_while_its_service_is_removed_goes_with_it(pg_world: World) -> None:
    """A service's removal ends by deleting its sites. A site added meanwhile (the service read as
    live, the removal's end not seeing the site yet) would stay, routed to a removed service, its
    name taken for good; the site's request holds the service's row instead."""
    world = pg_world
    world.code_service("web", scale=1)
    requests.request_remove_service(world.platform, env=ENV, service="web")  # sent, not run
    with meanwhile(world, catalogue, "add_site", world.run_all):  # (the removal runs to its end now)
        requests.add_site(world.platform, env=ENV, site="shop.example", service="web")
    assert in_postgres(world.platform.settings.database_url, "SELECT count(*) FROM site")[0][0] == 0
