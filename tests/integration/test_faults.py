"""The fault suite: faults injected on real processes (a Redis server, a SQLite catalogue, a node
and a control worker of this suite's own, the real dockerd, and a dockerd of its own for a second
host). After each fault: the operation ends within a bound, the service is back at its scale, no
running job was removed, the catalogue matches Docker. The bounds and the times measured are in
the README's table ("Faults and recovery"); each test prints what it measured."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest
import requests

from tests.harness import (
    SAMPLE_IMAGE,
    Daemon,
    Platform,
    PlatformEnv,
    RedisServer,
    free_port,
    orchestrator,
    platform_process,
    remove_containers,
    retire,
    says_ready,
    start_process,
    stop_process,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.fault]

DOWN_AFTER = 3.0
LEASE = 3.0
ORPHAN_AFTER = 3.0
PICKUP = 8.0
PORTS = (32500, 32749)  # between the other test platforms' ranges and Linux's ephemeral ones
HTTPD = "httpd -f -p $PORT -h /var/www"
# Jobs that take a while to listen, so a fault can land while their start step runs.
SLOW_HTTPD = "sleep 3 && exec httpd -f -p $PORT -h /var/www"
ENDED = ("succeeded", "failed")


@dataclass
class Faulty:
    platform: Platform
    broker: RedisServer
    catalogue: Path
    host: str
    docker: docker.DockerClient
    envs: list[str] = field(default_factory=list)

    def cli(self, *args: str, timeout: float = 120) -> str:
        return self.platform.ok(*args, timeout=timeout)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The CLI, whatever its exit status."""
        return subprocess.run(orchestrator(*args), env=self.platform.environ, cwd=self.platform.workdir,
                              capture_output=True, text=True, timeout=120)

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json"))

    def new_env(self) -> str:
        name = f"f{uuid.uuid4().hex[:8]}"
        self.cli("env", "create", name, "--sandbox", "--no-defaults")
        self.envs.append(name)
        return name

    def web(self, env: str, scale: int, command: str = HTTPD, name: str = "web") -> None:
        self.cli("services", "add", env, name, "--type", "code", "--command", command, "--scale", str(scale))
        self.cli("push", env, name, SAMPLE_IMAGE, "--wait")

    def running(self, env: str, clients: list[docker.DockerClient] | None = None) -> dict[str, str]:
        """Job id -> container id of the env's running containers, as Docker says."""
        found = [c for client in clients or [self.docker]
                 for c in client.containers.list(filters={"label": f"orchestrator.env={env}"})]
        return {c.labels["orchestrator.job"]: c.id for c in found}

    def jobs(self, env: str) -> dict[str, str]:
        """Job id -> container id of the env's active jobs, as the catalogue says."""
        return {j["id"]: j["container_id"] for j in self.json("jobs", "list", env)}

    def op(self, op_id: int) -> dict[str, Any]:
        return self.json("ops", "show", str(op_id))  # type: ignore[no-any-return]

    def ops(self, env: str) -> list[dict[str, Any]]:
        return self.json("ops", "list", env)  # type: ignore[no-any-return]

    def settled(self, env: str, scale: int, timeout: float,
                clients: list[docker.DockerClient] | None = None) -> float:
        """Wait until every operation of ``env`` ended and it runs ``scale`` jobs, Docker and the
        catalogue agreeing; the seconds it took."""
        t0 = time.monotonic()

        def probe() -> tuple[bool, Any]:
            ops = self.ops(env)
            jobs, running = self.jobs(env), self.running(env, clients)
            done = all(o["state"] in ENDED for o in ops)
            return done and len(jobs) == scale and jobs == running, (
                [(o["id"], o["kind"], o["trigger"], o["state"]) for o in ops], jobs, running)

        wait_for(f"{env} settles at {scale} jobs", probe, timeout, every=0.3, until=lambda r: r[0], retry=())
        return time.monotonic() - t0

    def host_state(self, name: str | None = None) -> str:
        (host,) = [h for h in self.json("hosts", "list") if h["name"] == (name or self.host)]
        return str(host["state"])

    def sql(self, statement: str, *args: object) -> list[tuple[Any, ...]]:
        """Write to the catalogue as a process that then dies would have (fault injection)."""
        conn = sqlite3.connect(self.catalogue, timeout=30)
        try:
            rows = conn.execute(statement, args).fetchall()
            conn.commit()
            return rows
        finally:
            conn.close()

    def service_id(self, env: str, name: str = "web") -> int:
        ((sid,),) = self.sql("SELECT s.id FROM service s JOIN environment e ON e.id = s.env_id "
                             "WHERE e.name = ? AND s.name = ?", env, name)
        return int(sid)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faulty]:
    workdir = tmp_path_factory.mktemp("faults")
    catalogue_dir = workdir / "catalogue"
    catalogue_dir.mkdir()
    broker = RedisServer(free_port(), workdir)
    broker.start()
    env = PlatformEnv(
        database_url=f"sqlite:///{catalogue_dir / 'catalogue.db'}", redis_db=0, ports=PORTS,
        stop_timeout=2, start_timeout=10, heartbeat_interval=0.5, host_down_after=DOWN_AFTER,
        redis_port=broker.port,
        extra=(("ORCH_STEP_LEASE", str(LEASE)), ("ORCH_ORPHAN_AFTER", str(ORPHAN_AFTER)),
               ("ORCH_PICKUP_TIMEOUT", str(PICKUP)), ("ORCH_HEAL_BACKOFF", "1")),
    )
    platform = Platform(env, workdir)
    host = f"fh{uuid.uuid4().hex[:6]}"
    platform.ok("hosts", "add", host, "--docker-url", "unix:///var/run/docker.sock")
    platform.start_node(host)
    # The control worker watches the fleet too: the watcher lives while any platform process does.
    control = start_process(orchestrator("control", "run"), platform.environ, workdir / "control.log",
                            says_ready, cwd=workdir)
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock", version="auto")
    faults = Faulty(platform, broker, catalogue_dir / "catalogue.db", host, client)
    try:
        yield faults
    finally:
        retire(env.database_url, *faults.envs)
        stop_process(control)
        platform.stop_nodes()
        for name in faults.envs:
            remove_containers(client, name)
        broker.stop()
        client.close()


def test_a_broker_restart_during_steps(faulty: Faulty) -> None:
    """Finding 4: the node died when Redis restarted during steps. Now it reconnects, and the
    redeploy (whose messages the restart lost) ends and the service is back at its scale."""
    env = faulty.new_env()
    faulty.web(env, 3, SLOW_HTTPD)
    node = faulty.platform.nodes[faulty.host]
    faulty.cli("redeploy", env, "web")
    time.sleep(0.5)  # the old jobs are stopped, the new ones starting
    faulty.broker.kill()
    time.sleep(2.0)
    faulty.broker.start()
    took = faulty.settled(env, 3, 30)
    assert node.poll() is None, "the node died with the broker"
    print(f"broker restart: settled {took:.1f}s after Redis came back")


@contextmanager
def api(faulty: Faulty) -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    """``orchestrator api`` of the fault platform; (base URL, a support token, its process)."""
    token = faulty.cli("tokens", "create", f"t{uuid.uuid4().hex[:6]}", "--role", "support").strip()
    port = free_port()
    base = f"http://127.0.0.1:{port}/api/v1"

    def serving(_: str) -> bool:
        try:
            return requests.get(f"{base}/openapi.json", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    log = faulty.platform.workdir / f"api-{port}.log"
    with platform_process(["api", "--port", str(port)], faulty.platform.env.variables(), log, serving) as proc:
        yield base, token, proc


def test_the_api_killed_during_a_burst_of_requests(faulty: Faulty) -> None:
    """Finding 1: an API killed during a burst left operations queued or running for good, and
    every later operation of their services queued behind them."""
    env = faulty.new_env()
    names = [f"w{i}" for i in range(4)]
    for name in names:
        faulty.web(env, 1, name=name)
    with api(faulty) as (base, token, proc):
        headers = {"Authorization": f"Bearer {token}"}

        def ask(name: str) -> None:
            with suppress(requests.RequestException):  # the API dies under it
                requests.post(f"{base}/envs/{env}/services/{name}/redeploy", headers=headers, timeout=10)

        burst = [threading.Thread(target=ask, args=(n,)) for n in names * 3]
        for t in burst:
            t.start()
        time.sleep(0.15)
        stop_process(proc, signal.SIGKILL)
        for t in burst:
            t.join(15)
    t0 = time.monotonic()
    wait_for("every operation ends", lambda: [o for o in faulty.ops(env) if o["state"] not in ENDED],
             ORPHAN_AFTER + 20, every=0.3, until=lambda left: not left, retry=())
    took = time.monotonic() - t0
    for name in names:  # nothing blocks: a new operation of each service runs and succeeds
        faulty.cli("redeploy", env, name, "--wait")
    faulty.settled(env, len(names), 20)
    print(f"API killed in a burst: every operation ended {took:.1f}s after")


def test_operations_a_dead_process_left_behind(faulty: Faulty) -> None:
    """Finding 1, each place a process can die: after recording an operation (never claimed),
    after claiming it (never started), after starting it (never sent)."""
    env = faulty.new_env()
    faulty.web(env, 1)
    faulty.web(env, 1, name="api")
    faulty.web(env, 1, name="db")
    web, other, third = (faulty.service_id(env, n) for n in ("web", "api", "db"))
    ((env_id,),) = faulty.sql("SELECT id FROM environment WHERE name = ?", env)
    long_ago = "2020-01-01 00:00:00.000000"
    insert = ("INSERT INTO operation (kind, env_id, service_id, \"trigger\", state, params, created_at, "
              "claimed_at, started_at) VALUES ('redeploy', ?, ?, 'manual', ?, '{}', ?, ?, ?)")
    faulty.sql(insert, env_id, web, "queued", long_ago, None, None)  # recorded, never claimed
    faulty.sql(insert, env_id, other, "queued", long_ago, long_ago, None)  # claimed, never started
    ((claimed,),) = faulty.sql("SELECT max(id) FROM operation")
    faulty.sql("UPDATE service SET active_op_id = ? WHERE id = ?", claimed, other)
    faulty.sql(insert, env_id, third, "running", long_ago, long_ago, long_ago)  # started, never sent
    ((unsent,),) = faulty.sql("SELECT max(id) FROM operation")
    faulty.sql("UPDATE service SET active_op_id = ? WHERE id = ?", unsent, third)
    t0 = time.monotonic()
    faulty.settled(env, 3, ORPHAN_AFTER + 15)
    took = time.monotonic() - t0
    ops = {o["id"]: o for o in faulty.ops(env)}
    assert ops[claimed]["state"] == "succeeded" and ops[claimed]["steps"], ops[claimed]
    assert (ops[unsent]["state"] == "failed" and "never" in ops[unsent]["error"]) or \
        "interrupted" in ops[unsent]["error"], ops[unsent]
    recorded = [o for o in ops.values() if o["service"] == "web" and o["kind"] == "redeploy"]
    assert [o["state"] for o in recorded] == ["succeeded"], recorded
    for name in ("web", "api", "db"):  # none of them is blocked
        faulty.cli("redeploy", env, name, "--wait")
    print(f"orphaned operations: all ended or run {took:.1f}s after")


@contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """The catalogue's files cannot be written or opened for writing (``chattr +i``)."""
    existing = [p for p in paths if p.exists()]
    subprocess.run(["chattr", "+i", *map(str, existing)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, existing)], check=True)


def test_a_catalogue_that_cannot_be_written_for_a_while(faulty: Faulty) -> None:
    """Findings 1 and 11: a catalogue made read-only blocked services for good; the API answered
    500 until restarted and the CLI printed a traceback."""
    env = faulty.new_env()
    faulty.web(env, 2)
    before = faulty.running(env)
    # The database and its log: writes fail, and connections opened meanwhile are read-only. (Not
    # the -shm file: processes map it, and a write fault on an immutable mapped page is a SIGBUS.)
    files = [faulty.catalogue, faulty.catalogue.with_name("catalogue.db-wal")]
    with api(faulty) as (base, token, proc):
        headers = {"Authorization": f"Bearer {token}"}
        with immutable(*files):
            refused = faulty.run("scale", env, "web", "3")
            during = requests.get(f"{base}/envs/{env}/services", headers=headers, timeout=10).status_code
            time.sleep(4)
        assert refused.returncode == 1, refused
        assert refused.stderr.count("\n") == 1 and "catalogue is unavailable" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr + refused.stdout
        assert during in (200, 503), during
        answers = wait_for("the API answers again", lambda: requests.patch(
            f"{base}/envs/{env}/services/web/variables", json={"set": {"AFTER": "1"}}, headers=headers,
            timeout=10).status_code, 10, until=lambda code: code == 200)
        assert answers == 200 and proc.poll() is None
    assert faulty.host_state() == "up"
    faulty.cli("scale", env, "web", "3", "--wait")
    faulty.settled(env, 3, 20)
    assert set(before.items()) <= set(faulty.running(env).items())  # nothing that ran was removed


def test_a_catalogue_that_stalls(faulty: Faulty) -> None:
    """Finding 3: a catalogue stall of 10 s or more stopped heartbeats, the host was marked down,
    its jobs lost, and the returning heartbeats removed every container on it."""
    env = faulty.new_env()
    faulty.web(env, 2)
    before = faulty.running(env)
    stall = sqlite3.connect(faulty.catalogue, timeout=30, isolation_level=None)
    stall.execute("BEGIN IMMEDIATE")  # a long writer: every other writer waits
    try:
        asked = subprocess.Popen(orchestrator("scale", env, "web", "3"), env=faulty.platform.environ,
                                 cwd=faulty.platform.workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(4 * DOWN_AFTER)
    finally:
        stall.execute("ROLLBACK")
        stall.close()
    assert asked.wait(30) == 0, asked.communicate()
    t0 = time.monotonic()
    faulty.settled(env, 3, 20)
    took = time.monotonic() - t0
    assert faulty.host_state() == "up"
    assert not [o for o in faulty.ops(env) if o["trigger"] == "host-lost"]
    assert set(before.items()) <= set(faulty.running(env).items())  # nothing that ran was removed
    print(f"catalogue stall of {4 * DOWN_AFTER:g}s: no host down, scale done {took:.1f}s after")


def test_a_node_killed_mid_step_and_back_later(faulty: Faulty) -> None:
    """Finding 2: a node SIGKILLed mid-step and back after the host was marked down removed the
    service's running containers (0 of 4)."""
    env = faulty.new_env()
    faulty.web(env, 2, SLOW_HTTPD)
    before = faulty.running(env)
    faulty.cli("scale", env, "web", "4")
    time.sleep(1.0)  # the new jobs' start steps run
    faulty.platform.kill_node(faulty.host)
    t0 = time.monotonic()
    wait_for("the scale ends", lambda: [o for o in faulty.ops(env) if o["state"] not in ENDED],
             DOWN_AFTER + LEASE + 10, every=0.3, until=lambda left: not left, retry=())
    ended = time.monotonic() - t0
    time.sleep(max(0.0, 2 * DOWN_AFTER - (time.monotonic() - t0)))  # the host is down by now
    assert faulty.host_state() == "down"
    faulty.platform.start_node(faulty.host)
    back = time.monotonic()
    faulty.settled(env, 2, 20)
    took = time.monotonic() - back
    assert faulty.running(env) == before  # the two that ran were taken back, not removed
    scale = faulty.json("services", "show", env, "web")["scale"]
    assert scale == 2  # the scale change failed: the scale stays
    print(f"node killed mid-step: operation ended {ended:.1f}s after; back at scale {took:.1f}s "
          "after the node returned, same containers")


def test_a_host_that_never_sent_a_heartbeat_gets_no_job(faulty: Faulty) -> None:
    """Finding 6: a host that never sent a heartbeat was up and got jobs."""
    ghost = f"g{uuid.uuid4().hex[:6]}"
    faulty.cli("hosts", "add", ghost, "--docker-url", "unix:///var/run/orch-no-such.sock")
    try:
        assert faulty.host_state(ghost) == "unknown"  # never seen: listed as such, treated as down
        env = faulty.new_env()
        faulty.web(env, 4)
        assert {j["host"] for j in faulty.json("jobs", "list", env)} == {faulty.host}
    finally:
        faulty.cli("hosts", "rm", ghost)


def test_a_dead_docker_under_a_live_node(faulty: Faulty) -> None:
    """Finding 5: a dead Docker daemon under a live node went unnoticed (the host stayed up)."""
    daemon = Daemon("faults")
    daemon.up()
    daemon.load_images([SAMPLE_IMAGE])
    second = f"d{uuid.uuid4().hex[:6]}"
    faulty.cli("hosts", "add", second, "--docker-url", daemon.url)
    faulty.platform.start_node(second)
    other = daemon.client()
    clients = [faulty.docker, other]
    try:
        env = faulty.new_env()
        faulty.web(env, 4)
        on_second = {j["id"] for j in faulty.json("jobs", "list", env) if j["host"] == second}
        assert on_second, "the jobs spread over both hosts"
        node = faulty.platform.nodes[second]
        daemon.kill()
        t0 = time.monotonic()
        wait_for("the host goes down", lambda: faulty.host_state(second), DOWN_AFTER + 10,
                 until=lambda state: state == "down", retry=())
        down = time.monotonic() - t0
        faulty.settled(env, 4, 30, clients=[faulty.docker])
        recovered = time.monotonic() - t0
        assert node.poll() is None  # the node lives: only its Docker died
        daemon.up()
        wait_for("the host is up again", lambda: faulty.host_state(second), 30,
                 until=lambda state: state == "up", retry=())
        # Its containers were replaced meanwhile: the node removes them, the rest stays.
        wait_for("the replaced containers are gone", lambda: faulty.running(env, [other]), 30,
                 until=lambda found: not found, retry=(docker.errors.DockerException,))
        faulty.settled(env, 4, 20, clients=clients)
        print(f"dead Docker: host down {down:.1f}s after, jobs elsewhere {recovered:.1f}s after")
    finally:
        retire(faulty.platform.env.database_url, *faulty.envs)
        remove_containers(other, *faulty.envs)
        other.close()
        stop_process(faulty.platform.nodes.pop(second))
        daemon.stop()

