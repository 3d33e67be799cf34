"""Many hosts: two real Docker daemons, one real node process per host, checked in Docker itself
(containers listed on each daemon by label) and in the catalogue.

The second daemon is an independent dockerd started by ``scripts/dockerd-up`` (its own socket, data
root, exec root, pid file and containerd namespace). Both daemons run on this machine, so both hosts
are registered with the address 127.0.0.1 and share one port space.

Bounds (with ORCH_HEARTBEAT_INTERVAL=0.5 and ORCH_HOST_DOWN_AFTER=3, set below):
- a lost host's jobs run again at full scale on the other host within RECOVERY_BOUND (10 s);
- after the host returns, the replaced containers are gone within RETURN_BOUND (30 s);
- an operation with a step on a down host ends within STUCK_OP_BOUND (20 s).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import docker
import pytest

from orchestrator.names import LABEL_ENV, LABEL_JOB, LABEL_SERVICE
from tests.conftest import DOCKER_URL, Cli
from tests.harness import (
    BUSYBOX_IMAGE,
    HTTPD,
    SAMPLE_IMAGE,
    Daemon,
    Platform,
    PlatformEnv,
    pid_alive,
    remove_containers,
    wait_for,
)
from tests.helpers import hosts_json, jobs_json, op_of, ops_json, ts, wait_op

pytestmark = pytest.mark.e2e

REDIS_DB = int(os.environ.get("ORCH_TEST_REDIS_DB", "14"))
PORT_MIN = int(os.environ.get("ORCH_TEST_MULTIHOST_PORT_MIN", "30250"))
PORT_MAX = PORT_MIN + 249
DAEMON = os.environ.get("ORCH_TEST_MULTIHOST_DAEMON", "h2test")
IMAGES = (BUSYBOX_IMAGE, SAMPLE_IMAGE)

HEARTBEAT_INTERVAL = 0.5
DOWN_AFTER = 3.0
RECOVERY_BOUND = 10.0  # host death -> full scale on the other host (DOWN_AFTER + a start, + slack)
RETURN_BOUND = 30.0  # new node on the returned host -> replaced containers removed there
STUCK_OP_BOUND = 20.0  # an operation with a step on a host that died ends by then
OP_BOUND = 60.0  # any ordinary operation


# --- helpers --------------------------------------------------------------------------------------


def listing(client: docker.DockerClient, env: str, service: str | None = None,
            running: bool = True) -> list[dict[str, Any]]:
    """The env's containers on one daemon, in one call (the high-level list inspects each one
    after listing, which fails when one is removed in between)."""
    labels = [f"{LABEL_ENV}={env}"] + ([f"{LABEL_SERVICE}={service}"] if service else [])
    return client.api.containers(all=not running, filters={"label": labels})  # type: ignore[no-any-return]


@dataclass
class Fleet:
    """Two hosts (the default daemon and a second one), their nodes, and how to reach them."""

    cli: Cli
    platform: Platform
    daemon: Daemon
    h1: str
    h2: str
    clients: dict[str, docker.DockerClient] = field(default_factory=dict)
    envs: list[str] = field(default_factory=list)

    def url(self, host: str) -> str:
        return DOCKER_URL if host == self.h1 else self.daemon.url

    def client(self, host: str) -> docker.DockerClient:
        if host not in self.clients:
            self.clients[host] = docker.DockerClient(base_url=self.url(host), version="auto", timeout=30)
        return self.clients[host]

    def reconnect(self, host: str) -> None:
        old = self.clients.pop(host, None)
        if old is not None:
            old.close()

    def containers(self, host: str, env: str, service: str | None = None,
                   running: bool = True) -> dict[str, str]:
        """Job id -> container id on that host's daemon, as Docker reports them."""
        return {c["Labels"][LABEL_JOB]: c["Id"] for c in listing(self.client(host), env, service, running)}

    def spread(self, env: str, service: str | None = None) -> dict[str, int]:
        """Running containers per host."""
        return {h: len(self.containers(h, env, service)) for h in (self.h1, self.h2)}

    def assert_spread(self, env: str, expected: dict[str, int], service: str = "web") -> None:
        """Running containers per host as expected; if not, say what the platform did (a host
        marked down by a late heartbeat shows as a host-lost operation)."""
        found = self.spread(env, service)
        if found != expected:
            hosts = {n: (h["state"], h["last_seen"]) for n, h in hosts_json(self.cli).items()}
            ops = [(o["id"], o["kind"], o["trigger"], o["state"], o["error"]) for o in ops_json(self.cli, env)]
            raise AssertionError(f"spread {found} != {expected}; hosts {hosts}; ops {ops}; "
                                 f"jobs {[(j['id'], j['host'], j['state']) for j in jobs_json(self.cli, env)]}")

    def run_op(self, *args: str, timeout: float = OP_BOUND) -> dict[str, Any]:
        """Start an operation through the CLI (no --wait: its follow has no bound) and wait for it
        to succeed."""
        return wait_op(self.cli, op_of(self.cli.ok(*args)), timeout, succeed=True)

    def drain(self, host: str) -> list[int]:
        """``hosts drain HOST``: the ids of the operations that move its jobs."""
        out = self.cli.ok("hosts", "drain", host)
        return [int(x) for x in re.findall(r"\d+", out.split("operations", 1)[1])]

    def new_env(self) -> str:
        name = f"m{uuid.uuid4().hex[:8]}"
        self.cli.ok("env", "create", name, "--sandbox", "--no-defaults")
        self.envs.append(name)
        return name

    def web(self, env: str, scale: int) -> None:
        """A code service ``web`` (busybox httpd) of ``scale`` jobs, deployed."""
        self.cli.ok("services", "add", env, "web", "--type", "code", "--command", HTTPD,
                    "--scale", str(scale))
        self.run_op("push", env, "web", SAMPLE_IMAGE)

    def remove_containers(self, env: str) -> None:
        for host in (self.h1, self.h2):
            try:
                remove_containers(self.client(host), env)
            except docker.errors.DockerException:
                self.reconnect(host)

    def restore(self) -> None:
        """Both hosts registered, up and heartbeating, whatever an earlier (failed) test left."""
        if not self.daemon.answers():
            self.daemon.up()
            self.reconnect(self.h2)
        hosts = hosts_json(self.cli)
        for host in (self.h1, self.h2):
            if host not in hosts:
                self.cli.ok("hosts", "add", host, "--docker-url", self.url(host), "--address", "127.0.0.1")
            elif hosts[host]["state"] == "draining":
                self.cli.ok("hosts", "undrain", host)
            if self.platform.nodes[host].poll() is not None:
                self.platform.start_node(host)

        def fresh(h: dict[str, Any]) -> bool:
            seen = h["last_seen"]
            return h["state"] == "up" and seen is not None and (datetime.now(UTC) - ts(seen)).total_seconds() < 2

        wait_for("both hosts up and heartbeating", lambda: hosts_json(self.cli), 15,
                 until=lambda hs: all(fresh(hs[n]) for n in (self.h1, self.h2)))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    daemon = Daemon(DAEMON)
    daemon.up()
    daemon.load_images(IMAGES, DOCKER_URL)
    workdir = tmp_path_factory.mktemp("multihost")
    # Its Redis database is not flushed: other modules' nodes may share it; our queues
    # (host.<name>) have names of their own.
    env = PlatformEnv(f"sqlite:///{workdir / 'catalogue.db'}", REDIS_DB, (PORT_MIN, PORT_MAX),
                      heartbeat_interval=HEARTBEAT_INTERVAL, host_down_after=DOWN_AFTER)
    platform = Platform(env, workdir)
    tag = uuid.uuid4().hex[:5]
    fl = Fleet(cli=Cli(env.variables()), platform=platform, daemon=daemon, h1=f"mh1{tag}", h2=f"mh2{tag}")
    try:
        for host in (fl.h1, fl.h2):
            fl.cli.ok("hosts", "add", host, "--docker-url", fl.url(host), "--address", "127.0.0.1")
            platform.start_node(host)
        yield fl
    finally:
        platform.stop_nodes()
        if not daemon.answers():
            daemon.up()  # killed by a test that failed half-way: start it to clean it up
        for name in fl.envs:  # after a failed test: whatever it left
            fl.remove_containers(name)
        for client in fl.clients.values():
            client.close()
        daemon.stop()
        broker = env.redis()
        for host in (fl.h1, fl.h2):  # steps sent to a dead node were never consumed
            for key in broker.scan_iter(match=f"host.{host}*"):
                broker.delete(key)
        broker.close()


@pytest.fixture
def env_name(fleet: Fleet) -> Iterator[str]:
    """Both hosts up, and a fresh sandbox environment; afterwards its services are scaled to 0
    (so the catalogue holds no job of it on any host) and its containers are removed from both
    daemons by label."""
    fleet.restore()
    name = fleet.new_env()
    yield name
    try:
        for svc in json.loads(fleet.cli.ok("services", "list", name, "--json")):
            wait_op(fleet.cli, op_of(fleet.cli.ok("scale", name, svc["name"], "0")), timeout=20)
    except AssertionError as exc:
        print(f"cleanup of {name}: {exc}")
    fleet.remove_containers(name)


# --- tests ----------------------------------------------------------------------------------------


def test_hosts_report_heartbeats_and_capacity(fleet: Fleet) -> None:
    """Both nodes heartbeat: hosts are up, last seen within a few intervals, with the capacity
    their daemon reports and nothing committed yet."""
    hosts = wait_for("both hosts report capacity", lambda: hosts_json(fleet.cli), 10,
                     until=lambda h: all(h[n]["cpus"] > 0 for n in (fleet.h1, fleet.h2)))
    first_seen = {n: ts(hosts[n]["last_seen"]) for n in (fleet.h1, fleet.h2)}
    for name in (fleet.h1, fleet.h2):
        host = hosts[name]
        info = fleet.client(name).info()
        assert host["state"] == "up"
        assert host["docker_url"] == fleet.url(name) and host["address"] == "127.0.0.1"
        assert (datetime.now(UTC) - first_seen[name]).total_seconds() < 3 * HEARTBEAT_INTERVAL + 1
        assert host["jobs"] == 0
        assert host["cpus"] == float(info["NCPU"])
        assert host["memory_mb"] == info["MemTotal"] // (1024 * 1024)
        assert host["free_cpus"] == host["cpus"] and host["free_memory_mb"] == host["memory_mb"]
    time.sleep(3 * HEARTBEAT_INTERVAL)
    later = hosts_json(fleet.cli)
    assert all(ts(later[n]["last_seen"]) > first_seen[n] for n in first_seen), "heartbeats stopped"


def test_scale_4_lands_2_and_2(fleet: Fleet, env_name: str) -> None:
    fleet.web(env_name, 1)
    fleet.run_op("scale", env_name, "web", "4")
    fleet.assert_spread(env_name, {fleet.h1: 2, fleet.h2: 2})
    jobs = jobs_json(fleet.cli, env_name)
    for host in (fleet.h1, fleet.h2):
        in_docker = fleet.containers(host, env_name, "web")
        in_catalogue = {j["id"]: j["container_id"] for j in jobs if j["host"] == host}
        assert in_catalogue == in_docker and all(j["state"] == "running" for j in jobs)
    hosts = hosts_json(fleet.cli)
    for host in (fleet.h1, fleet.h2):  # size s: 256 MB and 0.5 CPU per job
        assert hosts[host]["jobs"] == 2
        assert hosts[host]["free_memory_mb"] == hosts[host]["memory_mb"] - 2 * 256
        assert hosts[host]["free_cpus"] == pytest.approx(hosts[host]["cpus"] - 2 * 0.5)


def test_redeploy_keeps_spread_and_runs_on_both_hosts_at_once(fleet: Fleet, env_name: str) -> None:
    fleet.web(env_name, 4)
    before = {h: fleet.containers(h, env_name, "web") for h in (fleet.h1, fleet.h2)}
    assert {h: len(c) for h, c in before.items()} == {fleet.h1: 2, fleet.h2: 2}

    op = fleet.run_op("redeploy", env_name, "web")
    after = {h: fleet.containers(h, env_name, "web") for h in (fleet.h1, fleet.h2)}
    assert {h: len(c) for h, c in after.items()} == {fleet.h1: 2, fleet.h2: 2}
    for host in (fleet.h1, fleet.h2):
        assert not set(after[host].values()) & set(before[host].values())

    # The stops of both hosts share a stage, so do the starts: and they really ran side by side.
    for action in ("stop", "start"):
        steps = [s for s in op["steps"] if s["action"] == action]
        assert {s["host"] for s in steps} == {fleet.h1, fleet.h2}
        assert len({s["stage"] for s in steps}) == 1, f"{action} steps in several stages: {steps}"
    starts = [s for s in op["steps"] if s["action"] == "start"]
    spans = {h: [(ts(s["started_at"]), ts(s["finished_at"])) for s in starts if s["host"] == h]
             for h in (fleet.h1, fleet.h2)}
    overlapping = [(a, b) for a in spans[fleet.h1] for b in spans[fleet.h2] if a[0] < b[1] and b[0] < a[1]]
    origin = min(a for span in spans.values() for a, _ in span)
    print("\nredeploy start steps, seconds from the first: " + "; ".join(
        f"{h}: " + " ".join(f"[{(a - origin).total_seconds():.2f}-{(b - origin).total_seconds():.2f}]"
                            for a, b in span) for h, span in spans.items()))
    assert overlapping, f"start steps on the two hosts never overlapped: {spans}"


def test_drain_moves_jobs_without_dropping_below_scale(fleet: Fleet, env_name: str) -> None:
    scale = 4
    fleet.web(env_name, scale)
    fleet.assert_spread(env_name, {fleet.h1: 2, fleet.h2: 2})

    # Count running containers on both daemons every ~50 ms while the drain runs. The drained
    # host is listed first: jobs only move from it to the other one (started there before they
    # stop here), so a sample taken over two calls never counts fewer than ran at its start.
    counts: list[int] = []
    done = threading.Event()
    watchers = {h: docker.DockerClient(base_url=fleet.url(h), version="auto", timeout=10)
                for h in (fleet.h2, fleet.h1)}

    errors: list[Exception] = []

    def poll() -> None:
        while not done.is_set():
            try:
                counts.append(sum(len(listing(c, env_name, "web")) for c in watchers.values()))
            except Exception as exc:
                errors.append(exc)
                return
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        t0 = time.monotonic()
        ops = fleet.drain(fleet.h2)
        assert len(ops) == 1, ops
        op = wait_op(fleet.cli, ops[0])
        took = time.monotonic() - t0
        time.sleep(0.3)  # a few samples after the end too
    finally:
        done.set()
        poller.join(timeout=10)
        for c in watchers.values():
            c.close()
    assert not errors, f"counting containers failed: {errors}"
    assert op["state"] == "succeeded" and op["trigger"] == "drain", op
    print(f"\ndrain: moved in {took:.2f}s; {len(counts)} samples of running containers, "
          f"min {min(counts)}, max {max(counts)} (scale {scale})")
    assert len(counts) >= 5
    assert min(counts) >= scale, f"the service dropped to {min(counts)} running containers (scale {scale})"

    assert fleet.containers(fleet.h2, env_name, running=False) == {}
    assert len(fleet.containers(fleet.h1, env_name, "web")) == scale
    assert {j["host"] for j in jobs_json(fleet.cli, env_name)} == {fleet.h1}
    hosts = hosts_json(fleet.cli)
    assert hosts[fleet.h2]["state"] == "draining" and hosts[fleet.h2]["jobs"] == 0

    fleet.run_op("scale", env_name, "web", "6")  # nothing new on a draining host
    fleet.assert_spread(env_name, {fleet.h1: 6, fleet.h2: 0})

    refused = fleet.cli("hosts", "rm", fleet.h1)  # it holds jobs
    assert refused.exit_code == 2, refused.output
    assert "jobs" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert fleet.h1 in hosts_json(fleet.cli)

    fleet.cli.ok("hosts", "undrain", fleet.h2)
    assert hosts_json(fleet.cli)[fleet.h2]["state"] == "up"
    fleet.run_op("scale", env_name, "web", "8")  # it takes jobs again: the spread favours it
    fleet.assert_spread(env_name, {fleet.h1: 6, fleet.h2: 2})

    fleet.run_op("scale", env_name, "web", "6")  # the surplus leaves the fullest host
    fleet.assert_spread(env_name, {fleet.h1: 4, fleet.h2: 2})

    # Drain, then remove: refused while jobs remain there, done once it is empty.
    refused = fleet.cli("hosts", "rm", fleet.h2)
    assert refused.exit_code == 2 and "jobs" in refused.stderr, refused.output
    (again,) = fleet.drain(fleet.h2)
    assert wait_op(fleet.cli, again)["state"] == "succeeded"
    fleet.assert_spread(env_name, {fleet.h1: 6, fleet.h2: 0})
    fleet.cli.ok("hosts", "rm", fleet.h2)
    assert fleet.h2 not in hosts_json(fleet.cli)
    # Added back for the next tests (its node kept running all along): up again at its next beat.
    fleet.cli.ok("hosts", "add", fleet.h2, "--docker-url", fleet.daemon.url, "--address", "127.0.0.1")
    wait_for("the re-added host heartbeats", lambda: hosts_json(fleet.cli)[fleet.h2], 10,
             until=lambda h: h["state"] == "up" and h["last_seen"] is not None)


def test_losing_a_host_recovers_its_jobs_and_cleans_up_on_return(fleet: Fleet, env_name: str) -> None:
    scale = 4
    fleet.web(env_name, scale)
    fleet.assert_spread(env_name, {fleet.h1: 2, fleet.h2: 2})
    lost = set(fleet.containers(fleet.h2, env_name, "web"))

    pid = fleet.daemon.pid()
    assert pid is not None and pid_alive(pid)
    t0 = time.monotonic()
    fleet.platform.kill_node(fleet.h2)
    fleet.daemon.kill()
    fleet.reconnect(fleet.h2)

    wait_for(f"{scale} containers running on {fleet.h1}",
             lambda: len(fleet.containers(fleet.h1, env_name, "web")) == scale, RECOVERY_BOUND, every=0.05)
    recovery = time.monotonic() - t0
    print(f"\nrecovery: host death -> {scale} jobs running on {fleet.h1} in {recovery:.2f}s "
          f"(ORCH_HOST_DOWN_AFTER={DOWN_AFTER:g}, heartbeat {HEARTBEAT_INTERVAL:g}s, bound {RECOVERY_BOUND:g}s)")

    recover = wait_for("a succeeded host-lost operation",
                       lambda: next((o for o in ops_json(fleet.cli, env_name) if o["trigger"] == "host-lost"
                                     and o["state"] == "succeeded"), None), 15)
    assert recover["service"] == "web" and recover["kind"] == "recover"
    assert hosts_json(fleet.cli)[fleet.h2]["state"] == "down"
    states = {j["id"]: j for j in jobs_json(fleet.cli, env_name, everything=True)}
    assert {states[j]["state"] for j in lost} == {"lost"}
    active = [j for j in jobs_json(fleet.cli, env_name) if j["state"] == "running"]
    assert len(active) == scale and {j["host"] for j in active} == {fleet.h1}
    assert {j["id"]: j["container_id"] for j in active} == fleet.containers(fleet.h1, env_name, "web")

    # The host comes back: its daemon, then a new node.
    wait_for("the killed dockerd is gone", lambda: not pid_alive(pid), 15)
    t1 = time.monotonic()
    fleet.daemon.up()
    fleet.platform.start_node(fleet.h2)
    wait_for(f"the replaced containers removed from {fleet.h2}",
             lambda: not fleet.containers(fleet.h2, env_name, running=False), RETURN_BOUND, every=0.2)
    print(f"return: daemon and node restarted, replaced containers removed in {time.monotonic() - t1:.2f}s")
    wait_for("the lost jobs stopped",
             lambda: {j["state"] for j in jobs_json(fleet.cli, env_name, everything=True) if j["id"] in lost},
             10, until=lambda states: states == {"stopped"})
    wait_for(f"{fleet.h2} up", lambda: hosts_json(fleet.cli)[fleet.h2]["state"] == "up", 10)
    for svc in json.loads(fleet.cli.ok("services", "list", env_name, "--json")):
        running = sum(len(fleet.containers(h, env_name, svc["name"])) for h in (fleet.h1, fleet.h2))
        assert running == svc["scale"], f"{svc['name']}: {running} running containers, scale {svc['scale']}"


def test_step_on_a_down_host_does_not_hang_the_operation(fleet: Fleet, env_name: str) -> None:
    scale = 4
    fleet.web(env_name, scale)
    fleet.assert_spread(env_name, {fleet.h1: 2, fleet.h2: 2})
    stranded = set(fleet.containers(fleet.h2, env_name, "web"))

    fleet.platform.kill_node(fleet.h2)  # its dockerd stays up: the containers there keep running
    t0 = time.monotonic()
    op_id = op_of(fleet.cli.ok("redeploy", env_name, "web"))
    op = wait_op(fleet.cli, op_id, STUCK_OP_BOUND)
    print(f"\nredeploy with steps on a dead node ended {op['state']} in {time.monotonic() - t0:.2f}s")
    assert any(s["host"] == fleet.h2 for s in op["steps"]), "the redeploy had no step on the dead host"
    if op["state"] == "failed":
        failed = [s for s in op["steps"] if s["state"] == "failed"]
        assert failed and all(s["host"] == fleet.h2 and fleet.h2 in (s["error"] or "") for s in failed), failed
        assert fleet.h2 in op["error"]

    # The service is at its scale again, on the host that is left (a host-lost recover, if needed).
    wait_for(f"{scale} containers running on {fleet.h1}",
             lambda: len(fleet.containers(fleet.h1, env_name, "web")) == scale, RECOVERY_BOUND)
    assert hosts_json(fleet.cli)[fleet.h2]["state"] == "down"
    last = wait_for("no operation of web running", lambda: ops_json(fleet.cli, env_name), STUCK_OP_BOUND,
                    until=lambda ops: all(o["state"] in ("succeeded", "failed") for o in ops))
    assert any(o["trigger"] == "host-lost" and o["state"] == "succeeded" for o in last), last

    # The node returns: the containers it ran for replaced jobs go, nothing runs above scale.
    fleet.platform.start_node(fleet.h2)
    wait_for(f"stranded containers removed from {fleet.h2}",
             lambda: not set(fleet.containers(fleet.h2, env_name, running=False)) & stranded, RETURN_BOUND)
    wait_for(f"{fleet.h2} up", lambda: hosts_json(fleet.cli)[fleet.h2]["state"] == "up", 10)
    running = sum(len(fleet.containers(h, env_name, "web")) for h in (fleet.h1, fleet.h2))
    assert running == scale
    active = jobs_json(fleet.cli, env_name)
    assert len(active) == scale and all(j["state"] == "running" for j in active)
