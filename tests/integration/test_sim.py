"""Simulated hosts end to end: ``orchestrator sim run --hosts 20`` in a process of its own (one
Celery worker serving twenty hosts' queues, each host with its in-memory runtime), a throwaway
platform of its own (SQLite catalogue, Redis DB 5, ports 31000-31249), and everything else done
through the CLI, as on real hosts: a push of 60 jobs spread evenly, a drain, a host's death
(its heartbeats stop, its queue is no longer consumed: the watcher marks it down and its jobs
run again elsewhere), and injected start failures reported as real ones.

Nothing here listens on the jobs' ports, and nothing may try to reach a simulated host: the sim
process refuses (and logs) any lookup of or connection to a ``*.sim.invalid`` address.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

import pytest
from celery import Celery

from tests.conftest import Cli
from tests.harness import Platform, PlatformEnv, orchestrator, says_ready, start_process, stop_process, wait_for
from tests.helpers import hosts_json, jobs_json, op_of, wait_op
from workers.sim import GUARD

pytestmark = pytest.mark.e2e

REDIS_DB = 5
PORTS = (31000, 31249)
HOSTS = 20
SCALE = 60
ENV = "big"


@dataclass
class Sim:
    cli: Cli
    platform: Platform
    proc: Popen[bytes]
    control: Path
    log: Path

    def running(self, service: str = "web") -> list[dict[str, str]]:
        return [j for j in jobs_json(self.cli, ENV, service) if j["state"] == "running"]


def start_sim(platform: Platform, log: Path, *args: str) -> Popen[bytes]:
    return start_process(orchestrator("sim", "run", "--loglevel", "INFO", *args), platform.environ, log,
                         says_ready, 60, cwd=platform.workdir)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    workdir = tmp_path_factory.mktemp("sim")
    env = PlatformEnv(f"sqlite:///{workdir / 'catalogue.db'}", REDIS_DB, PORTS, stop_timeout=2,
                      heartbeat_interval=0.5, host_down_after=3.0)
    env.flush()
    platform = Platform(env, workdir)
    control, log = workdir / "control", workdir / "sim.log"
    proc = start_sim(platform, log, "--hosts", str(HOSTS), "--control", str(control))
    try:
        cli = Cli(env.variables())
        cli.ok("env", "create", ENV, "--sandbox", "--no-defaults")
        cli.ok("services", "add", ENV, "web", "--type", "code", "--command", "serve", "--scale", str(SCALE),
               "--size", "xs")
        yield Sim(cli, platform, proc, control, log)
    finally:
        stop_process(proc)
        env.flush()


def spread(jobs: list[dict[str, str]], hosts: list[str]) -> dict[str, int]:
    counts = Counter(j["host"] for j in jobs)
    return {h: counts[h] for h in hosts}


def test_a_push_runs_every_job_spread_evenly(sim: Sim) -> None:
    hosts = hosts_json(sim.cli)
    assert sorted(hosts) == sorted(f"sim{i}" for i in range(1, HOSTS + 1))
    assert all(h["state"] == "up" and h["address"] == f"{n}.sim.invalid" and h["docker_url"] == f"sim://{n}"
               and h["cpus"] == 16 and h["memory_mb"] == 65536 for n, h in hosts.items())

    op = wait_op(sim.cli, op_of(sim.cli.ok("push", ENV, "web", "sim/app:1")), 60, succeed=True)
    assert op["kind"] == "deploy"
    running = sim.running()
    assert len(running) == SCALE
    counts = spread(running, list(hosts))
    assert max(counts.values()) - min(counts.values()) <= 2, counts
    ports = [int(j["port"]) for j in running]
    assert all(PORTS[0] <= p <= PORTS[1] for p in ports)
    assert len({(j["host"], j["port"]) for j in running}) == SCALE  # no two jobs of a host share a port
    # Each host's heartbeats reconcile its own runtime: a container started on another host's
    # runtime would fail its job there ("removed outside the platform").
    time.sleep(3 * 0.5)
    states = Counter(j["state"] for j in jobs_json(sim.cli, ENV, "web", everything=True))
    assert states == {"running": SCALE}, states


def test_a_drained_host_is_left_with_no_job(sim: Sim) -> None:
    before = {j["id"] for j in sim.running() if j["host"] == "sim1"}
    assert before, "sim1 runs nothing to move"
    out = sim.cli.ok("hosts", "drain", "sim1")
    for op_id in re.findall(r"\d+", out.split("operations", 1)[1]):
        wait_op(sim.cli, op_id, 60, succeed=True)
    after = jobs_json(sim.cli, ENV, "web")
    assert [j for j in after if j["host"] == "sim1"] == []
    running = [j for j in after if j["state"] == "running"]
    assert len(running) == SCALE and not before & {j["id"] for j in running}
    assert hosts_json(sim.cli)["sim1"]["state"] == "draining"


def test_a_dead_host_goes_down_and_its_jobs_run_elsewhere(sim: Sim) -> None:
    victim = "sim2"
    lost = {j["id"] for j in sim.running() if j["host"] == victim}
    assert lost, f"{victim} runs nothing"
    (sim.control / f"kill-{victim}").touch()
    t0 = time.monotonic()
    wait_for(f"{victim} marked down", lambda: hosts_json(sim.cli)[victim]["state"], 15, every=0.2,
             until=lambda state: state == "down")
    down_after = time.monotonic() - t0
    running = wait_for("the lost jobs running elsewhere", sim.running, 30, every=0.3,
                       until=lambda jobs: len(jobs) == SCALE and not any(j["host"] == victim for j in jobs))
    recovered = time.monotonic() - t0
    assert not lost & {j["id"] for j in running}
    alive = [h for h, v in hosts_json(sim.cli).items() if v["state"] == "up"]
    assert len(alive) == HOSTS - 2  # sim1 drained, sim2 down, none else touched
    assert down_after >= 2.5 and recovered < 20, (down_after, recovered)
    # Its queue is no longer consumed: the sim's worker lists every other host's, not its own.
    app = Celery(broker=sim.platform.env.variables()["ORCH_BROKER_URL"], set_as_current=False)
    try:
        (queues,) = (app.control.inspect(timeout=2.0).active_queues() or {}).values()
    finally:
        app.close()
    consumed = {q["name"] for q in queues}
    assert "host.sim3" in consumed and f"host.{victim}" not in consumed


def test_injected_start_failures_fail_the_operation_like_real_ones(sim: Sim) -> None:
    log = sim.platform.workdir / "sim-bad.log"
    bad = start_sim(sim.platform, log, "--hosts", "1", "--prefix", "bad", "--fail-rate", "1")
    try:
        wait_for("bad1 up", lambda: hosts_json(sim.cli).get("bad1", {}).get("state"), 10,
                 until=lambda state: state == "up")
        sim.cli.ok("services", "add", ENV, "flaky", "--type", "code", "--command", "serve", "--scale", "1",
                   "--size", "xs")
        op = wait_op(sim.cli, op_of(sim.cli.ok("push", ENV, "flaky", "sim/app:1")), 30)
        assert op["state"] == "failed"
        (start,) = [s for s in op["steps"] if s["action"] == "start"]
        assert start["host"] == "bad1" and start["state"] == "failed"
        assert start["error"] == "container exited at once (exit code 1); last output: sim: injected start failure"
        assert "container exited at once (exit code 1)" in (op["error"] or "")
    finally:
        stop_process(bad)
    assert bad.returncode == 0


def test_nothing_reached_a_simulated_host_and_sim_run_stops_cleanly(sim: Sim) -> None:
    stop_process(sim.proc)
    assert sim.proc.returncode == 0
    text = sim.log.read_text(errors="replace")
    assert "Warm shutdown" in text
    assert GUARD not in text
    assert "Traceback" not in text, text[-3000:]
