"""Many hosts: a redeploy on two Docker hosts against one, and the time from a host's death to its
jobs running elsewhere, in one run.

    .venv/bin/python benchmarks/hosts.py [--jobs 8] [--rounds 5] [--deaths 3]

Starts a second Docker daemon (`scripts/dockerd-up hbench`, unix:///var/run/orch-docker-hbench.sock)
and copies orch/busybox:1 and orch/sample-app:1 into it, then runs three throwaway platforms (each
its own temp SQLite catalogue; all on Redis database 15, flushed before and after; ports
31500-31749 split between them and the baseline; hosts registered with --address 127.0.0.1, one
node process each):

  one-host   host A on the default daemon: a code service of N busybox-httpd jobs (N on A);
  two-host   host A on the default daemon and host B on hbench: the same service (N/2 + N/2).
             Their redeploys alternate, round after round: `orchestrator redeploy --wait` (CLI
             wall time) and the operation's own finished_at - created_at (`ops show --json`),
             next to a docker-py baseline doing the same Docker work in the same layout;
  death      two hosts again, nodes with ORCH_HEARTBEAT_INTERVAL=0.5 and ORCH_HOST_DOWN_AFTER=3:
             SIGKILL host B's node and its dockerd, then poll every 100 ms the default daemon (N
             containers of the service running) and the catalogue (N jobs running on A), and take
             the recover operation (trigger host-lost) apart. Between rounds B's daemon and node come
             back, the node removes the replaced containers, and the service is rebalanced.

Everything it made is removed at the end, also on failure or Ctrl-C/SIGTERM: containers (by label
orchestrator.env) on both daemons, node processes, Redis database 15, the temp dir; the hbench
daemon is stopped (its data root /var/lib/orch-docker-hbench stays, with the images, for the next
run).
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
from docker.models.containers import Container
from redeploy import log, median, platform_container_options, process_cpu, terminated_as_exit, undo_all, wait_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the test harness runs the platforms here too

from tests import harness  # noqa: E402
from tests.harness import (  # noqa: E402
    BUSYBOX_IMAGE,
    DEFAULT_DOCKER_URL,
    HTTPD,
    LABEL_ENV,
    SAMPLE_IMAGE,
    Daemon,
    PlatformEnv,
    pid_alive,
    remove_containers,
    wait_for,
)
from tests.helpers import hosts_json, op_json, op_of, ops_json, ts, ts_or_none  # noqa: E402

LABEL_SERVICE = "orchestrator.service"
IMAGES = (BUSYBOX_IMAGE, SAMPLE_IMAGE)
REDIS_DB = 15
PORTS = {"one": (31500, 31569), "two": (31570, 31639), "death": (31640, 31709)}  # the platforms' ranges
BASELINE_PORTS = (31710, 31749)  # the docker-py baseline's containers
HEARTBEAT_INTERVAL, DOWN_AFTER = 0.5, 3.0  # the death rounds' settings
POLL = 0.1  # seconds between polls of Docker and the catalogue after a host's death


# --- a throwaway platform ------------------------------------------------------------------------------


@dataclass
class Platform(harness.Platform):
    """A harness platform with a name, the hosts it has and the environments it made."""

    name: str = ""
    urls: dict[str, str] = field(default_factory=dict)  # host -> docker url
    envs: list[str] = field(default_factory=list)

    @property
    def db(self) -> Path:
        return self.workdir / "catalogue.db"

    def add_host(self, host: str, url: str) -> None:
        self.ok("hosts", "add", host, "--docker-url", url, "--address", "127.0.0.1")
        self.urls[host] = url

    def start_node(self, host: str, timeout: float = 60) -> subprocess.Popen[bytes]:
        """`orchestrator node run HOST`, ready when its log says ` ready.` and the host is up with
        a heartbeat from it."""
        started = time.time()
        proc = super().start_node(host, timeout)

        def beating() -> bool:
            row = hosts_json(self).get(host, {})
            seen = ts_or_none(row.get("last_seen"))
            return row.get("state") == "up" and seen is not None and seen.timestamp() >= started
        wait_for(f"host {host} up with a heartbeat from its new node", beating, 30, every=0.2)
        return proc

    def new_env(self) -> str:
        name = f"hb{self.name[:3]}{uuid.uuid4().hex[:6]}"
        self.ok("env", "create", name, "--sandbox", "--no-defaults")
        self.envs.append(name)
        return name

    def run_op(self, *args: str) -> tuple[int, float]:
        """An operation through `orchestrator ... --wait`: its id and the CLI's wall time."""
        t0 = time.perf_counter()
        out = self.ok(*args, "--wait")
        took = time.perf_counter() - t0
        return op_of(out), took

    def catalogue(self) -> sqlite3.Connection:
        """A read-only connection (WAL: it never blocks the platform's writers)."""
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        return conn


def running_per_host(clients: dict[str, docker.DockerClient], env: str, svc: str) -> dict[str, dict[str, str]]:
    """Per host: name -> id of the service's running containers, as Docker lists them (one call
    per daemon: the high-level list inspects each container and fails on one removed meanwhile)."""
    labels = [f"{LABEL_ENV}={env}", f"{LABEL_SERVICE}={svc}"]
    return {host: {c["Names"][0].lstrip("/"): c["Id"] for c in client.api.containers(filters={"label": labels})}
            for host, client in clients.items()}


# --- the docker-py baseline: the same Docker work on one daemon and on two -------------------------------


@dataclass
class Baseline:
    """N containers with the platform's options (copied from one it made), placed like the
    platform's layout (N on one daemon, or N/2 on each); a round = N parallel stop+remove, then N
    parallel create+start, until each port accepts a TCP connection (the platform's readiness)."""

    label: str  # their orchestrator.env label (cleanup finds them by it)
    layout: str
    placement: list[docker.DockerClient]  # one daemon per container
    options: dict[str, Any]
    stop_timeout: int
    pool: ThreadPoolExecutor
    live: list[Container] = field(default_factory=list)
    generation: int = 0
    phases: list[tuple[float, float]] = field(default_factory=list)  # (stop all, start all) per round

    @property
    def first_port(self) -> int:
        return BASELINE_PORTS[0] + (0 if self.layout == "one" else len(self.placement))

    def _start(self, i: int) -> Container:
        port = self.first_port + i
        environment = {**self.options["environment"], "PORT": str(port), "ORCH_JOB": f"base{i}"}
        labels = {LABEL_ENV: self.label, LABEL_SERVICE: "baseline", "bench.job": f"base{i}"}  # no orchestrator.job
        container: Container = self.placement[i].containers.create(
            SAMPLE_IMAGE, name=f"{self.label}-{self.layout}-{self.generation}-{i}", labels=labels,
            **{**self.options, "environment": environment})
        container.start()
        wait_port(port, 30)
        return container

    def _stop(self, container: Container) -> None:
        container.stop(timeout=self.stop_timeout)
        container.remove(v=True)

    def up(self) -> None:
        self.generation += 1
        self.live = list(self.pool.map(self._start, range(len(self.placement))))

    def round(self) -> float:
        t0 = time.perf_counter()
        list(self.pool.map(self._stop, self.live))
        t1 = time.perf_counter()
        self.live = []
        self.up()
        t2 = time.perf_counter()
        self.phases.append((t1 - t0, t2 - t1))
        return t2 - t0


# --- redeploys: one host against two --------------------------------------------------------------------


def stage_spans(op: dict[str, Any]) -> list[dict[str, Any]]:
    """Per stage: action, steps, hosts, and per host the span from the stage's first step begin to
    that host's last step end, from the catalogue's step timestamps (seconds)."""
    stages: dict[int, list[dict[str, Any]]] = {}
    for step in op["steps"]:
        stages.setdefault(step["stage"], []).append(step)
    out = []
    previous_end = ts_or_none(op["started_at"]) or ts(op["created_at"])
    for index in sorted(stages):
        steps = [s for s in stages[index] if s["started_at"] and s["finished_at"]]
        if not steps:
            continue
        begin = min(ts(s["started_at"]) for s in steps)
        end = max(ts(s["finished_at"]) for s in steps)
        per_host: dict[str, float] = {}
        for host in sorted({s["host"] or "-" for s in steps}):
            mine = [s for s in steps if (s["host"] or "-") == host]
            per_host[host] = (max(ts(s["finished_at"]) for s in mine) - begin).total_seconds()
        durations = [(ts(s["finished_at"]) - ts(s["started_at"])).total_seconds() for s in steps]
        out.append({"stage": index, "action": steps[0]["action"], "steps": len(steps),
                    "span": (end - begin).total_seconds(), "per_host": per_host,
                    "step_median": median(durations), "begin": begin, "end": end,
                    "gap": (begin - previous_end).total_seconds()})
        previous_end = end
    return out


@dataclass
class RedeployRound:
    cli_s: float
    op_s: float
    claim_s: float  # created -> started: claim, plan, send
    stages: list[dict[str, Any]]
    finish_s: float  # last step end -> finished_at
    node_cpu: float  # CPU seconds of all this platform's nodes during the CLI call


def redeploy_round(p: Platform, clients: dict[str, docker.DockerClient], env: str, svc: str,
                   spread: dict[str, int]) -> RedeployRound:
    before = running_per_host(clients, env, svc)
    cpu0 = sum(process_cpu(n.pid) for n in p.nodes.values())
    op_id, cli_s = p.run_op("redeploy", env, svc)
    node_cpu = sum(process_cpu(n.pid) for n in p.nodes.values()) - cpu0
    op = op_json(p, op_id)
    if op["state"] != "succeeded":
        raise RuntimeError(f"[{p.name}] operation {op_id} {op['state']}: {op.get('error')}")
    after = running_per_host(clients, env, svc)
    counts = {h: len(c) for h, c in after.items()}
    old = {cid for c in before.values() for cid in c.values()}
    if counts != spread or old & {cid for c in after.values() for cid in c.values()}:
        raise RuntimeError(f"[{p.name}] after redeploy {op_id} Docker runs {counts} (want {spread}, all new)")
    created, started, finished = ts(op["created_at"]), ts(op["started_at"]), ts(op["finished_at"])
    stages = stage_spans(op)
    last_end = max((s["end"] for s in stages), default=started)
    return RedeployRound(cli_s, (finished - created).total_seconds(), (started - created).total_seconds(), stages,
                         (finished - last_end).total_seconds(), node_cpu)


def idle_cpu(p: Platform, seconds: float = 4.0) -> float:
    """CPU seconds per second this platform's nodes use while nothing happens (heartbeats, the
    Celery consumers)."""
    pids = [n.pid for n in p.nodes.values()]
    cpu0, t0 = sum(process_cpu(pid) for pid in pids), time.perf_counter()
    time.sleep(seconds)
    return (sum(process_cpu(pid) for pid in pids) - cpu0) / (time.perf_counter() - t0)


def report_redeploys(results: dict[str, list[RedeployRound]], base: dict[str, list[float]],
                     baselines: dict[str, Baseline], hosts: dict[str, dict[str, str]], idle: dict[str, float],
                     jobs: int) -> None:
    one, two = results["one"], results["two"]
    log("")
    log(f"Redeploy of {jobs} jobs, one host ({jobs}) against two hosts ({jobs // 2}+{jobs - jobs // 2}), "
        f"{len(one)} rounds each, alternating (median; every round in brackets); both daemons on this machine")
    rows = [
        ("CLI `orchestrator redeploy --wait`", [r.cli_s for r in one], [r.cli_s for r in two]),
        ("operation (ops show: finished - created)", [r.op_s for r in one], [r.op_s for r in two]),
    ]
    if base["one"]:
        rows.append(("docker-py baseline, the same Docker work", base["one"], base["two"]))
    log(f"  {'':<42}{'one host':>10}{'two hosts':>11}{'two/one':>9}")
    for name, a, b in rows:
        log(f"  {name:<42}{median(a):9.2f}s{median(b):10.2f}s{median(b) / median(a):9.2f}")
        log(f"  {'':<42}[{' '.join(f'{x:.2f}' for x in a)}]  [{' '.join(f'{x:.2f}' for x in b)}]")
    if base["one"]:
        for i, phase in enumerate(("stop+remove all", "create+start all, ready")):
            log(f"  {f'  docker-py: {phase}':<42}{median([x[i] for x in baselines['one'].phases]):9.2f}s"
                f"{median([x[i] for x in baselines['two'].phases]):10.2f}s")
        for label, (_, a, b) in zip(("CLI", "op"), rows[:2], strict=True):
            log(f"  {f'ratio platform {label} / docker-py':<42}{median(a) / median(base['one']):9.2f} "
                f"{median(b) / median(base['two']):10.2f}")
    log("Where the operation's time goes (median seconds, catalogue step timestamps):")
    log(f"  {'':<42}{'one host':>10}{'two hosts':>11}")
    log(f"  {'claim + plan + send (created -> started)':<42}{median([r.claim_s for r in one]):9.2f}s"
        f"{median([r.claim_s for r in two]):10.2f}s")
    for index in range(max(len(r.stages) for r in one + two)):
        a = [r.stages[index] for r in one if len(r.stages) > index]
        b = [r.stages[index] for r in two if len(r.stages) > index]
        if not a or not b:
            continue
        label = f"stage {a[0]['stage']} {a[0]['action']} (x{a[0]['steps']} / x{b[0]['steps']})"
        log(f"  {'gap before it':<42}{median([s['gap'] for s in a]):9.2f}s{median([s['gap'] for s in b]):10.2f}s")
        log(f"  {label:<42}{median([s['span'] for s in a]):9.2f}s{median([s['span'] for s in b]):10.2f}s")
        log(f"  {'  one step (median)':<42}{median([s['step_median'] for s in a]):9.2f}s"
            f"{median([s['step_median'] for s in b]):10.2f}s")
        for role, host in hosts["two"].items():
            values = [s["per_host"].get(host) for s in b if host in s["per_host"]]
            if values:
                log(f"  {f'  two hosts: host {role} done after':<42}{'':>10}{median(values):10.2f}s")
    log(f"  {'last step end -> operation finished':<42}{median([r.finish_s for r in one]):9.2f}s"
        f"{median([r.finish_s for r in two]):10.2f}s")
    log(f"  {'CPU seconds of the node process(es)':<42}{median([r.node_cpu for r in one]):9.2f}s"
        f"{median([r.node_cpu for r in two]):10.2f}s")
    log(f"  {'  of which idle (idle rate x CLI time)':<42}{idle['one'] * median([r.cli_s for r in one]):9.2f}s"
        f"{idle['two'] * median([r.cli_s for r in two]):10.2f}s")


# --- a host's death ------------------------------------------------------------------------------------


@dataclass
class DeathRound:
    silence: float  # kill - the dead host's last heartbeat
    down_seen: float | None  # kill -> the catalogue says the host is down (100 ms polls)
    detected: float  # kill -> the recover operation recorded (created_at)
    op_s: float  # the recover operation: created -> finished
    op_claim: float  # created -> started
    op_start_stage: float  # its start steps: first begin -> last end
    op_done: float  # kill -> the recover operation finished
    docker_full: float  # kill -> N containers running on the surviving daemon (100 ms polls)
    catalogue_full: float  # kill -> N jobs running on the surviving host in the catalogue (100 ms polls)
    restart: dict[str, float]  # the dead host coming back, for the next round


def death_round(p: Platform, daemon: Daemon, clients: dict[str, docker.DockerClient], env: str, svc: str,
                alive: str, dying: str, jobs: int, timeout: float = 90) -> DeathRound:
    """SIGKILL ``dying``'s node and dockerd; poll Docker and the catalogue every 100 ms until the
    service runs at full scale on ``alive``; then bring ``dying`` back and rebalance."""
    spread = {h: len(c) for h, c in running_per_host(clients, env, svc).items()}
    if sorted(spread.values()) != [jobs // 2, jobs - jobs // 2]:
        raise RuntimeError(f"before the kill Docker runs {spread}, want {jobs // 2}+{jobs - jobs // 2}")
    survivor = clients[alive]
    conn = p.catalogue()
    lost = {r["id"] for r in conn.execute("SELECT id FROM job WHERE host = ? AND state = 'running'", (dying,))}
    if len(lost) != spread[dying]:
        conn.close()
        raise RuntimeError(f"the catalogue has {len(lost)} jobs running on {dying}, Docker {spread}")
    by_state = ("SELECT h.state AS host_state, (SELECT count(*) FROM job j JOIN service s ON s.id = j.service_id "
                "JOIN environment e ON e.id = s.env_id WHERE e.name = ? AND s.name = ? AND j.host = ? "
                "AND j.state = 'running') AS running FROM host h WHERE h.name = ?")
    labels = [f"{LABEL_ENV}={env}", f"{LABEL_SERVICE}={svc}"]
    down_seen = docker_full = catalogue_full = None
    try:
        t_kill = time.time()
        p.kill_node(dying)
        dockerd_pid = daemon.kill()
        tick = 0
        while docker_full is None or catalogue_full is None:
            now = time.time()
            if now - t_kill > timeout:
                raise RuntimeError(f"not back at full scale {timeout:g}s after the kill: Docker "
                                   f"{docker_full}, catalogue {catalogue_full}; ops {ops_json(p, env)}")
            if docker_full is None and len(survivor.api.containers(filters={"label": labels})) == jobs:
                docker_full = time.time() - t_kill
            row = conn.execute(by_state, (env, svc, alive, dying)).fetchone()
            seen = time.time() - t_kill
            if down_seen is None and row["host_state"] == "down":
                down_seen = seen
            if catalogue_full is None and row["running"] == jobs:
                catalogue_full = seen
            tick += 1
            time.sleep(max(0.0, t_kill + tick * POLL - time.time()))
    finally:
        conn.close()

    def recover_op() -> dict[str, Any] | None:
        for o in ops_json(p, env):
            if o["trigger"] == "host-lost" and ts(o["created_at"]).timestamp() >= t_kill - 1:
                return o if o["state"] in ("succeeded", "failed") else None
        return None

    summary = wait_for("the host-lost recover operation ends", recover_op, 60, every=0.2)
    assert summary is not None
    if summary["state"] != "succeeded":
        raise RuntimeError(f"recover operation {summary['id']} failed: {summary['error']}")
    op = op_json(p, summary["id"])
    last_seen = ts(hosts_json(p)[dying]["last_seen"])
    created, started, finished = ts(op["created_at"]), ts(op["started_at"]), ts(op["finished_at"])
    starts = [s for s in stage_spans(op) if s["action"] == "start"]
    result = DeathRound(
        silence=t_kill - last_seen.timestamp(), down_seen=down_seen, detected=created.timestamp() - t_kill,
        op_s=(finished - created).total_seconds(), op_claim=(started - created).total_seconds(),
        op_start_stage=starts[0]["span"] if starts else float("nan"), op_done=finished.timestamp() - t_kill,
        docker_full=docker_full, catalogue_full=catalogue_full, restart={},
    )
    result.restart = bring_back(p, daemon, clients, env, svc, dying, dockerd_pid, lost, jobs)
    return result


def bring_back(p: Platform, daemon: Daemon, clients: dict[str, docker.DockerClient], env: str, svc: str,
               host: str, dockerd_pid: int, lost: set[str], jobs: int) -> dict[str, float]:
    """The dead host returns: its dockerd, then a new node, whose first heartbeat removes the
    containers of the replaced (``lost``) jobs and marks them stopped; then scale N/2 and N to get
    N/2+N/2 again. Seconds of each part."""
    wait_for("the killed dockerd gone", lambda: not pid_alive(dockerd_pid), 30, every=0.1)
    t0 = time.perf_counter()
    times = {"dockerd up (scripts/dockerd-up)": daemon.up()}
    clients[host].close()
    clients[host] = daemon.client()
    node_started = time.time()
    t1 = time.perf_counter()
    p.start_node(host)
    times["node ready (log ` ready.`, first heartbeat)"] = time.perf_counter() - t1
    conn = p.catalogue()
    try:
        marks = ",".join("?" * len(lost))

        def stopped() -> list[Any]:
            rows = conn.execute(f"SELECT state, stopped_at FROM job WHERE id IN ({marks})", sorted(lost)).fetchall()
            return [ts_or_none(r["stopped_at"]) for r in rows] if all(r["state"] == "stopped" for r in rows) else []
        ends = wait_for("the lost jobs stopped (their containers removed)", stopped, 60, every=0.2)
    finally:
        conn.close()
    labels = {"label": f"{LABEL_ENV}={env}"}
    wait_for(f"no container of {env} left on {host}",
             lambda: not clients[host].api.containers(all=True, filters=labels), 30, every=0.2)
    times["node started -> replaced containers removed"] = max(e.timestamp() for e in ends) - node_started
    times["back, total"] = time.perf_counter() - t0
    half = jobs // 2
    p.run_op("scale", env, svc, str(half))
    p.run_op("scale", env, svc, str(jobs))
    spread = {h: len(c) for h, c in running_per_host(clients, env, svc).items()}
    if spread.get(host) != jobs - half or sum(spread.values()) != jobs:
        raise RuntimeError(f"rebalancing after the return gave {spread}")
    return times


def report_deaths(rounds: list[DeathRound], jobs: int) -> None:
    log("")
    log(f"A host's death: {jobs} jobs ({jobs // 2}+{jobs - jobs // 2}), SIGKILL of host B's node and dockerd; "
        f"ORCH_HEARTBEAT_INTERVAL={HEARTBEAT_INTERVAL:g}, ORCH_HOST_DOWN_AFTER={DOWN_AFTER:g}; polls every "
        f"{POLL * 1000:.0f} ms; {len(rounds)} rounds (median; every round in brackets); seconds from the kill")

    def row(name: str, xs: Sequence[float | None]) -> None:
        values = [x for x in xs if x is not None]
        log(f"  {name:<58}{median(values):7.2f}s   [{' '.join(f'{x:.2f}' for x in values)}]")

    row("its last heartbeat before the kill (silence already)", [-r.silence for r in rounds])
    row("catalogue: host B down", [r.down_seen for r in rounds])
    row("detection: recover operation (host-lost) recorded", [r.detected for r in rounds])
    row(f"  of which beyond last heartbeat + {DOWN_AFTER:g}s (watch lag)",
        [r.detected + r.silence - DOWN_AFTER for r in rounds])
    row("recover operation finished", [r.op_done for r in rounds])
    row(f"Docker: {jobs} containers running on host A", [r.docker_full for r in rounds])
    row(f"catalogue: {jobs} jobs running on host A  <- the figure", [r.catalogue_full for r in rounds])
    log("  split:")
    row("  detection (kill -> recover operation recorded)", [r.detected for r in rounds])
    row("  recover operation's own time (created -> finished)", [r.op_s for r in rounds])
    row("    of which claim + plan + send (created -> started)", [r.op_claim for r in rounds])
    row(f"    of which its start stage ({jobs - jobs // 2} start steps, on host A)", [r.op_start_stage for r in rounds])
    log(f"  expected detection: {DOWN_AFTER:g}s minus the silence already, plus up to one heartbeat interval "
        f"({HEARTBEAT_INTERVAL:g}s) until the surviving node's watch looks, plus its catalogue writes")
    log("The dead host coming back between rounds (untimed for the figures above):")
    for key in rounds[0].restart:
        row(f"  {key}", [r.restart.get(key) for r in rounds])


# --- the run -------------------------------------------------------------------------------------------


def platform_env(workdir: Path, ports: tuple[int, int], stop_timeout: int, death: bool) -> PlatformEnv:
    """A platform's variables: its own catalogue and ports, the shared Redis database; the death
    rounds' platform heartbeats every HEARTBEAT_INTERVAL and marks a host down after DOWN_AFTER."""
    workdir.mkdir(parents=True, exist_ok=True)
    return PlatformEnv(f"sqlite:///{workdir / 'catalogue.db'}", REDIS_DB, ports, stop_timeout=stop_timeout,
                       start_timeout=30, result_backend="", heartbeat_interval=HEARTBEAT_INTERVAL if death else None,
                       host_down_after=DOWN_AFTER if death else None)


def preflight(client: docker.DockerClient) -> None:
    client.ping()
    for name in IMAGES:
        client.images.get(name)  # missing: scripts/build-images
    low, high = PORTS["one"][0], BASELINE_PORTS[1]
    busy = []
    for port in range(low, high + 1):
        with socket.socket() as s:
            s.settimeout(0.05)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                busy.append(port)
    if busy:
        raise SystemExit(f"ports already in use on 127.0.0.1: {busy[:10]}: stop what holds them first")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=8, help="scale of the service (even, default 8)")
    parser.add_argument("--rounds", type=int, default=5, help="redeploy rounds of each layout (default 5)")
    parser.add_argument("--deaths", type=int, default=3, help="host deaths (default 3; 0 skips them)")
    parser.add_argument("--size", default="64m:0.2", help="job size (default 64m:0.2: 8 fit 2 CPUs)")
    parser.add_argument("--stop-timeout", type=int, default=10, help="ORCH_STOP_TIMEOUT (default 10)")
    parser.add_argument("--daemon", default="hbench", help="name for scripts/dockerd-up (default hbench)")
    parser.add_argument("--src", type=Path, default=ROOT,
                        help="tree whose orchestrator/ and workers/ run (default: this checkout)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the docker-py baseline")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (catalogues, node logs)")
    args = parser.parse_args(argv)
    if args.jobs < 2 or args.jobs % 2 or args.jobs > 60 or args.rounds < 1 or args.deaths < 0:
        parser.error("--jobs must be even, 2..60; --rounds at least 1; --deaths at least 0")

    default = docker.DockerClient(base_url=DEFAULT_DOCKER_URL, version="auto", timeout=60)
    preflight(default)
    daemon = Daemon(args.daemon)
    workdir = Path(tempfile.mkdtemp(prefix="orch-bench-hosts-"))
    src = args.src.resolve()
    tag = uuid.uuid4().hex[:5]
    base_label = f"hbbase{tag}"
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    platforms = {name: Platform(platform_env(workdir / name, PORTS[name], args.stop_timeout, name == "death"),
                                workdir / name, src, name=name) for name in PORTS}
    clients: dict[str, docker.DockerClient] = {}
    svc = "web"
    try:
        with terminated_as_exit():
            platforms["one"].env.flush()  # the three share it
            log(f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
                f"temp dir {workdir}; Redis db {REDIS_DB}; ports {PORTS}; code from {src}")
            took = daemon.up()
            stale = daemon.load_images(IMAGES, DEFAULT_DOCKER_URL)
            log(f"dockerd {daemon.name} up at {daemon.url} in {took:.1f}s; images copied: {stale or 'none needed'}")

            # --- redeploys: one host against two, alternating --------------------------------------
            one, two = platforms["one"], platforms["two"]
            hosts = {"one": {"A": f"one{tag}a"}, "two": {"A": f"two{tag}a", "B": f"two{tag}b"}}
            one.add_host(hosts["one"]["A"], DEFAULT_DOCKER_URL)
            two.add_host(hosts["two"]["A"], DEFAULT_DOCKER_URL)
            two.add_host(hosts["two"]["B"], daemon.url)
            for p in (one, two):
                for host in p.urls:
                    p.start_node(host)
            clients_of = {
                "one": {hosts["one"]["A"]: default},
                "two": {hosts["two"]["A"]: default, hosts["two"]["B"]: daemon.client()},
            }
            clients.update(clients_of["two"])
            spreads = {"one": {hosts["one"]["A"]: args.jobs},
                       "two": {hosts["two"]["A"]: args.jobs // 2, hosts["two"]["B"]: args.jobs // 2}}
            envs = {}
            for name, p in (("one", one), ("two", two)):
                envs[name] = p.new_env()
                p.ok("services", "add", envs[name], svc, "--type", "code", "--command", HTTPD,
                      "--scale", str(args.jobs), "--size", args.size)
                _, took = p.run_op("push", envs[name], svc, SAMPLE_IMAGE)
                counts = {h: len(c) for h, c in running_per_host(clients_of[name], envs[name], svc).items()}
                if counts != spreads[name]:
                    raise RuntimeError(f"[{name}] deployed as {counts}, want {spreads[name]}")
                log(f"[{name}-host] {args.jobs} jobs of size {args.size} deployed in {took:.2f}s: {counts}")
            baselines: dict[str, Baseline] = {}
            if not args.no_baseline:
                options = platform_container_options(default, envs["one"], svc)
                for name in ("one", "two"):
                    placement = [c for host, c in clients_of[name].items() for _ in range(spreads[name][host])]
                    baselines[name] = Baseline(base_label, name, placement, options, args.stop_timeout, pool)
                    baselines[name].up()
                log(f"docker-py baseline: {args.jobs} containers per layout with the options of a platform "
                    f"container, {args.jobs} threads, ports {BASELINE_PORTS[0]}-{BASELINE_PORTS[1]}")
            idle = {name: idle_cpu(platforms[name]) for name in ("one", "two")}  # CPU seconds per second
            results: dict[str, list[RedeployRound]] = {"one": [], "two": []}
            base: dict[str, list[float]] = {"one": [], "two": []}
            for n in range(1, args.rounds + 1):
                order = ("one", "two") if n % 2 else ("two", "one")
                line = []
                for name in order:
                    r = redeploy_round(platforms[name], clients_of[name], envs[name], svc, spreads[name])
                    results[name].append(r)
                    line.append(f"{name} host{'s' if name == 'two' else ''}: CLI {r.cli_s:.2f}s, op {r.op_s:.2f}s")
                for name in order if baselines else ():
                    base[name].append(baselines[name].round())
                    line.append(f"docker-py {name}: {base[name][-1]:.2f}s")
                log(f"round {n}: " + "; ".join(line) + f"  (load {os.getloadavg()[0]:.1f})")
            report_redeploys(results, base, baselines, hosts, idle, args.jobs)
            for p in (one, two):  # done with them: their nodes and containers go now
                p.stop_nodes()
            remove_containers(default, envs["one"], envs["two"], base_label)
            remove_containers(clients[hosts["two"]["B"]], envs["two"], base_label)

            # --- a host's death --------------------------------------------------------------------
            if args.deaths:
                dp = platforms["death"]
                alive, dying = f"dth{tag}a", f"dth{tag}b"
                dp.add_host(alive, DEFAULT_DOCKER_URL)
                dp.add_host(dying, daemon.url)
                dp.start_node(alive)
                dp.start_node(dying)
                death_clients = {alive: default, dying: clients.pop(hosts["two"]["B"])}
                env = dp.new_env()
                dp.ok("services", "add", env, svc, "--type", "code", "--command", HTTPD,
                       "--scale", str(args.jobs), "--size", args.size)
                dp.run_op("push", env, svc, SAMPLE_IMAGE)
                log("")
                log(f"[death] {args.jobs} jobs on {alive} (default daemon) and {dying} ({daemon.name}); nodes with "
                    f"ORCH_HEARTBEAT_INTERVAL={HEARTBEAT_INTERVAL:g} ORCH_HOST_DOWN_AFTER={DOWN_AFTER:g}")
                deaths = []
                try:
                    for n in range(1, args.deaths + 1):
                        time.sleep(1.0)  # a few heartbeats in between
                        d = death_round(dp, daemon, death_clients, env, svc, alive, dying, args.jobs)
                        deaths.append(d)
                        log(f"death {n}: detected {d.detected:.2f}s (silence {d.silence:.2f}s), recover op "
                            f"{d.op_s:.2f}s, Docker full {d.docker_full:.2f}s, catalogue full "
                            f"{d.catalogue_full:.2f}s; back in {d.restart['back, total']:.1f}s  "
                            f"(load {os.getloadavg()[0]:.1f})")
                finally:
                    clients.update(death_clients)
                report_deaths(deaths, args.jobs)
            log("")
            log(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
        return 0
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}): cleaning up")
        return 130
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        cleanup(platforms, daemon, default, clients, workdir, [base_label], keep=args.keep)


def cleanup(platforms: dict[str, Platform], daemon: Daemon, default: docker.DockerClient,
            clients: dict[str, docker.DockerClient], workdir: Path, labels: list[str],
            keep: bool) -> None:
    """Undo everything, each part on its own so that one failure does not skip the rest."""
    envs = [e for p in platforms.values() for e in p.envs] + labels

    def second_daemon() -> None:
        if not daemon.used:
            return
        if not daemon.answers():  # killed by a round that failed half-way: start it to clean it
            daemon.up()
        client = daemon.client()
        try:
            remove_containers(client, *envs)
        finally:
            client.close()
        daemon.stop()

    steps: list[tuple[str, Callable[[], object]]] = [
        ("nodes", lambda: [p.stop_nodes() for p in platforms.values()]),
        ("containers on the default daemon", lambda: remove_containers(default, *envs)),
        (f"dockerd {daemon.name}", second_daemon),
        ("redis", platforms["one"].env.flush),
    ]
    undo_all(steps, workdir, keep=keep, clients=[*clients.values(), default])


if __name__ == "__main__":
    sys.exit(main())
