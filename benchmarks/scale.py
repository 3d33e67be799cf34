"""The control plane at fleet scale, on simulated hosts: deploy and redeploy rates at 10, 100
and 1000 hosts.

    .venv/bin/python benchmarks/scale.py                      # 10, 100, 1000 hosts; 20 services x 50 jobs
    .venv/bin/python benchmarks/scale.py --hosts 100 --py-spy .venv/bin/py-spy
    .venv/bin/python benchmarks/scale.py --hosts 100,1000 --broker amqp://guest:guest@127.0.0.1:5672/scale

For each fleet size, a throwaway platform of its own (temp SQLite catalogue, Redis database 6
flushed before and after, job ports 34000-34949, which nothing ever listens on) runs
`orchestrator sim run --hosts N/K --concurrency C` in K processes (--sims, default 2: one per
core of this machine; each node process serves its share of the simulated hosts, see
workers/sim.py; --concurrency, default 4 threads each) and
`orchestrator control run` (the control worker: the task API). Then:

  setup     `env create --sandbox --no-defaults` (no logging, no proxy: nothing to reach), then
            `orchestrator apply` of a manifest: S code services of J jobs each (size xs), never pushed;
  deploy    S pushes sent at once through the task API (orchestrator.push on the control queue),
            timed from the first send to the end of the last operation (the catalogue's
            finished_at); every job must then run, no host more than 2 jobs above another;
  idle      the sim processes' CPU over a few idle seconds: the N heartbeats' cost;
  redeploy  S redeploys sent at once (orchestrator.redeploy), timed the same way.

It prints a table: jobs/second of the deploy and the redeploy, the CPU seconds per job of the
control worker (requests, planning, dispatch), of the sim processes together (the steps, the operations'
finish, the fleet watcher and N heartbeats) and of Redis (the broker and result store; a shared
server: other users count too), the catalogue's size (bytes, rows), Redis memory (INFO memory),
and writes a plot of the rates against the fleet size to benchmarks/out/scale.png.

Bounded: each phase has --timeout seconds (a fleet size that does not finish in time is
reported as such and the next one runs); --budget bounds the whole run. Everything it started is
stopped at the end, also on failure or Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import sqlalchemy
from celery import Celery
from redeploy import cpu_reference, log, process_cpu, summarise_profile, terminated_as_exit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the test harness runs the platform here too

from tests.harness import (  # noqa: E402
    POSTGRES_ADMIN_URL,
    PlatformEnv,
    fresh_database,
    orchestrator,
    says_ready,
    start_process,
    stop_process,
)

REDIS_DB = 6
PORTS = (34000, 34999)  # job ports 34000-34949 (the last 50: proxies, never used here)
ENV = "scale"
IMAGE = "sim/app:1"
OUT = ROOT / "benchmarks" / "out"


@dataclass
class Phase:
    seconds: float | None = None  # None: it did not end in time
    ops_failed: int = 0
    op_seconds: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds used


@dataclass
class Result:
    hosts: int
    jobs: int
    heartbeat_interval: float
    sim_ready: float = 0.0
    deploy: Phase = field(default_factory=Phase)
    redeploy: Phase = field(default_factory=Phase)
    idle_cpu: float = 0.0  # sim process CPU seconds per wall second, idle
    catalogue_bytes: int = 0  # its database file
    wal_bytes: int = 0  # and its write-ahead log (SQLite)
    rows: dict[str, int] = field(default_factory=dict)
    redis_memory: int = 0
    redis_keys: int = 0
    tasks: int = 0  # Celery tasks the nodes ran for both phases: step tasks (a batch is one) and finishes
    note: str = ""
    # What the platform did by itself meanwhile: operations it started (kind/trigger -> count),
    # hosts it marked down (their jobs were lost). Under a slow catalogue these are false alarms.
    own_ops: dict[str, int] = field(default_factory=dict)
    hosts_down: int = 0
    cpu_reference_ms: float = 0.0  # this machine's speed as the size began (redeploy.cpu_reference)

    def rate(self, phase: Phase) -> float | None:
        return self.jobs / phase.seconds if phase.seconds else None


class Fleet:
    """One fleet size's throwaway platform: its sim and control processes, its catalogue."""

    def __init__(self, workdir: Path, hosts: int, heartbeat_interval: float, down_after: float,
                 concurrency: int, sims: int, postgres: str | None, broker: str | None = None) -> None:
        self.workdir = workdir
        self.db = workdir / "catalogue.db"
        self.url = postgres or f"sqlite:///{self.db}"
        self.reader = sqlalchemy.create_engine(self.url.replace("postgresql://", "postgresql+psycopg://", 1))
        self.env = PlatformEnv(self.url, REDIS_DB, PORTS, heartbeat_interval=heartbeat_interval,
                               host_down_after=down_after, extra=(("ORCH_START_TIMEOUT", "60"),),
                               broker_url=broker,
                               result_backend=f"redis://127.0.0.1:6379/{REDIS_DB}" if broker else None)
        self.environ = {**os.environ, "PYTHONPATH": str(ROOT), **self.env.variables()}
        self.hosts, self.concurrency, self.sims = hosts, concurrency, sims
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.redis: redis.Redis[bytes] = self.env.redis()
        variables = self.env.variables()
        self.app = Celery(broker=variables["ORCH_BROKER_URL"], set_as_current=False,
                          backend=variables.get("ORCH_RESULT_BACKEND") or variables["ORCH_BROKER_URL"])
        self.app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])

    def start(self) -> float:
        self.env.flush()
        self.vhost(fresh=True)
        t0 = time.perf_counter()
        share = [self.hosts // self.sims + (i < self.hosts % self.sims) for i in range(self.sims)]
        for i, count in enumerate(share):  # sim processes of their own prefixes: s, s2-, s3-, ...
            prefix = "s" if i == 0 else f"s{i + 1}-"
            self.procs["sim" if i == 0 else f"sim{i + 1}"] = start_process(
                orchestrator("sim", "run", "--hosts", str(count), "--prefix", prefix, "--loglevel", "INFO",
                             "--concurrency", str(self.concurrency)),
                self.environ, self.workdir / f"sim{i + 1}.log", says_ready, 600, cwd=self.workdir)
        deadline = time.monotonic() + 600
        while self._hosts_up() < self.hosts and time.monotonic() < deadline:
            time.sleep(0.2)
        ready = time.perf_counter() - t0
        self.procs["control"] = start_process(orchestrator("control", "run", "--loglevel", "INFO"), self.environ,
                                              self.workdir / "control.log", says_ready, 60, cwd=self.workdir)
        return ready

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_process(proc, timeout=30)
        self.reader.dispose()
        self.app.close()
        self.env.flush()
        self.vhost(fresh=False)
        self.redis.close()

    def vhost(self, *, fresh: bool) -> None:
        """With RabbitMQ (``--broker amqp://…/VHOST``): its vhost deleted, and made again before a run."""
        broker = self.env.broker_url or ""
        if not broker.startswith("amqp://"):
            return
        name = broker.rsplit("/", 1)[-1] or "/"
        if name == "/":
            raise SystemExit("--broker: give RabbitMQ a vhost of its own (amqp://…/scale): its queues are deleted")
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], capture_output=True, check=False)
        if fresh:
            subprocess.run(["rabbitmqctl", "-q", "add_vhost", name], capture_output=True, check=True)
            subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
                           capture_output=True, check=True)

    def cli(self, *args: str) -> str:
        done = subprocess.run(orchestrator(*args), env=self.environ, cwd=self.workdir, capture_output=True,
                              text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"orchestrator {' '.join(args)} -> exit {done.returncode}: {done.stderr[-2000:]}")
        return done.stdout

    def tasks(self) -> int:
        """The Celery tasks the simulated nodes received (their logs' "Task ... received" lines):
        steps (a host's waiting steps taken together, or a step of its own), advances, finishes,
        and their retries."""
        received = re.compile(r"Task orchestrator\.(step|op)\.\w+\[[^\]]+\] received")
        return sum(len(received.findall(log.read_text(errors="replace")))
                   for log in self.workdir.glob("sim*.log"))

    def query(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        with self.reader.connect() as conn:
            return [tuple(row) for row in conn.execute(sqlalchemy.text(sql), params)]

    def _hosts_up(self) -> int:
        try:
            return int(self.query("SELECT count(*) FROM host WHERE state = 'up'")[0][0])
        except sqlalchemy.exc.SQLAlchemyError:
            return 0

    def size(self) -> tuple[int, int]:
        """The catalogue's bytes: (database, SQLite's write-ahead log)."""
        if self.url.startswith("postgresql"):
            return int(self.query("SELECT pg_database_size(current_database())")[0][0]), 0
        wal = self.workdir / "catalogue.db-wal"
        return self.db.stat().st_size, wal.stat().st_size if wal.exists() else 0

    def cpu(self) -> dict[str, float]:
        info = self.redis.info("cpu")
        used = {name: process_cpu(proc.pid) for name, proc in self.procs.items()}
        used["sim"] = sum(cpu for name, cpu in used.items() if name.startswith("sim"))  # all sims together
        used["redis"] = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        if (self.env.broker_url or "").startswith("amqp://"):  # RabbitMQ's server (a shared one: others count too)
            found = subprocess.run(["pgrep", "-f", "beam.smp"], capture_output=True, text=True).stdout.split()
            used["redis"] += sum(process_cpu(int(pid)) for pid in found)
        return used

    def send_all(self, task: str, services: Sequence[str], **kwargs: Any) -> list[int]:
        """Send one request per service at once through the task API; their operation ids."""
        results = [self.app.send_task(f"orchestrator.{task}", kwargs={"env": ENV, "service": s, **kwargs},
                                      queue="orchestrator") for s in services]
        return [int(r.get(timeout=120)) for r in results]

    def wait_ops(self, op_ids: Sequence[int], timeout: float) -> list[tuple[str, str, str | None]]:
        """Until every operation ended: (state, created_at, finished_at) of each; [] after ``timeout``."""
        deadline = time.monotonic() + timeout
        ids = ",".join(str(int(i)) for i in op_ids)
        while time.monotonic() < deadline:
            rows = self.query(f"SELECT state, created_at, finished_at FROM operation WHERE id IN ({ids})")
            if len(rows) == len(op_ids) and all(r[0] in ("succeeded", "failed", "cancelled") for r in rows):
                return rows
            time.sleep(0.2)
        return []

    def running_jobs(self) -> int:
        return int(self.query("SELECT count(*) FROM job WHERE state = 'running'")[0][0])

    def spread(self) -> tuple[int, int]:
        """The fewest and the most running jobs on one host, over every host (issue #15: no host
        more than 2 above another)."""
        counts = {host: int(n) for host, n in self.query(
            "SELECT host, count(*) FROM job WHERE state = 'running' GROUP BY host")}
        per_host = [counts.get(name, 0) for (name,) in self.query("SELECT name FROM host")]
        return min(per_host), max(per_host)


def manifest(services: Sequence[str], jobs: int) -> str:
    lines = [f"environment: {ENV}", "sandbox: true", "services:"]
    for name in services:
        lines += [f"  {name}:", "    type: code", "    command: serve", f"    scale: {jobs}", "    size: xs"]
    return "\n".join(lines) + "\n"


def ts(value: Any) -> float:
    """A catalogue timestamp (UTC; SQLite gives text back, PostgreSQL a datetime) in seconds."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def timed_phase(fleet: Fleet, task: str, services: Sequence[str], timeout: float, **kwargs: Any) -> Phase:
    before = fleet.cpu()
    t0 = time.time()
    op_ids = fleet.send_all(task, services, **kwargs)
    rows = fleet.wait_ops(op_ids, timeout)
    after = fleet.cpu()
    phase = Phase(cpu={k: after[k] - before[k] for k in before})
    if not rows:
        return phase
    ends = [ts(r[2]) for r in rows if r[2]]
    phase.seconds = max(ends) - t0
    phase.ops_failed = sum(r[0] != "succeeded" for r in rows)
    phase.op_seconds = sorted(ts(r[2]) - ts(r[1]) for r in rows if r[2])
    return phase


def profile_start(py_spy: str, fleet: Fleet, kind: str, wall: bool) -> list[tuple[subprocess.Popen[bytes], Path]]:
    spies = []
    for name in ("sim", "control"):  # (the first sim process: the others run the same code)
        raw = fleet.workdir / f"profile-{kind}-{name}.txt"
        err = (fleet.workdir / f"py-spy-{kind}-{name}.err").open("wb")
        spy = subprocess.Popen([py_spy, "record", "--idle" if wall else "--gil", "--threads", "--function", "--rate",
                                "100", "--format", "raw", "--nonblocking", "--pid", str(fleet.procs[name].pid),
                                "--output", str(raw)], stdout=subprocess.DEVNULL, stderr=err)
        spies.append((spy, raw))
    time.sleep(1.0)  # py-spy attaches
    return spies


# Where a sample's CPU goes: the first rule whose markers are all in its stack names it.
PARTS: list[tuple[str, tuple[str, ...]]] = [
    ("heartbeat: fleet.heartbeat (catalogue txn)", ("NodeHeartbeat.beat", "heartbeat (orchestrator/fleet.py")),
    ("heartbeat: reconcile proxies (catalogue read)", ("NodeHeartbeat.reconcile",)),
    ("heartbeat: other", ("NodeHeartbeat.beat",)),
    ("step: claim a host's box (catalogue txn)", ("run_host_steps.<locals>.claim",)),
    ("step: read the claimed rows", ("run_host_steps (workers/tasks.py", "_by_id (orchestrator/catalogue/")),
    ("step: act, start_job", ("start_job (workers/tasks.py",)),
    ("step: act, stop_job", ("stop_job (workers/tasks.py",)),
    ("step: act, check_image", ("check_image (workers/tasks.py",)),
    ("step: begin (catalogue txn)", ("_begin_all (workers/tasks.py",)),
    ("step: end (catalogue txn)", ("_end_all.<locals>.end (workers/tasks.py",)),
    ("stage ended: next stage (catalogue, publish)", ("stage_ended (orchestrator/operations.py", "advance")),
    ("stage ended: op finish (catalogue)", ("stage_ended (orchestrator/operations.py", "finish")),
    ("shared transactions: begin, commit (GroupCommit)", ("GroupCommit._commit",)),
    ("step: other (box, a step not boxed, finish on failure)", ("run_host_steps (workers/tasks.py",)),
    ("step: other (box, a step not boxed, finish on failure)", ("run_steps (workers/tasks.py",)),
    ("op finish (operations.finish)", ("register_operation_tasks.<locals>.finish",)),
    ("op advance: next stage (catalogue, publish)", ("register_operation_tasks.<locals>.advance",)),
    ("request: record plan (catalogue)", ("_request (orchestrator/requests.py", "_record_plan")),
    ("request: plan", ("_request (orchestrator/requests.py", "_plan (orchestrator/operations.py")),
    ("request: dispatch (first stage publish)", ("_request (orchestrator/requests.py", "send_stage")),
    ("request: validate, claim (catalogue)", ("_request (orchestrator/requests.py",)),
    ("fleet watcher", ("Watcher.run_once",)),
    ("event log", ("EventLog.send",)),
    ("Celery task plumbing (trace, results, events, ack)", ("apply_target (celery/",)),
    ("Celery events (Flower's)", ("EventDispatcher",)),
    ("Celery consumer (receive, decode, schedule)", ("Consumer.start",)),
]
LIBRARIES: list[tuple[str, tuple[str, ...]]] = [
    ("catalogue driver (do_execute: statements, lock waits)", ("do_execute",)),
    ("SQLAlchemy/SQLModel (Python)", ("sqlalchemy/", "sqlmodel/")),
    ("Redis client/kombu", ("redis/", "kombu/")),
    ("Celery", ("celery/",)),
    ("json", ("json/",)),
    ("logging", ("logging/",)),
    ("pydantic", ("pydantic",)),
    ("platform code", ("orchestrator/", "workers/")),
]


def breakdown(raw: Path, rate: int, within: str = "") -> None:
    """A py-spy raw profile split by the platform's parts, then by the library the sampled frame
    is in (only the samples whose stack holds ``within``)."""
    parts: dict[str, int] = {}
    libraries: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit() or within not in stack:
            continue
        count = int(count_text)
        total += count
        part = next((name for name, marks in PARTS if all(m in stack for m in marks)), "other")
        parts[part] = parts.get(part, 0) + count
        leaf = stack.rsplit(";", 1)[-1]
        library = next((name for name, marks in LIBRARIES if any(m in leaf for m in marks)), "other")
        libraries[library] = libraries.get(library, 0) + count
    if not total:
        return
    log(f"  {total / rate:.1f} thread-seconds sampled{' in ' + within if within else ''}")
    for title, table in (("by part", parts), ("by library of the running frame", libraries)):
        log(f"  {title}:")
        for name, count in sorted(table.items(), key=lambda kv: -kv[1]):
            if count / total >= 0.01:
                log(f"    {100 * count / total:5.1f}%  {count / rate:6.2f}s  {name}")


def profile_end(spies: list[tuple[subprocess.Popen[bytes], Path]], what: str, wall: bool) -> None:
    for spy, raw in spies:
        stop_process(spy, signal.SIGINT, timeout=60)
        kind = "wall time of the task threads, waits included" if wall else "CPU: samples holding the GIL"
        log(f"\nprofile of {what}, {raw.stem.rsplit('-', 1)[1]} process ({kind}):")
        if raw.exists():
            breakdown(raw, 100, "apply_target" if wall else "")
            summarise_profile(raw, 100, "apply_target" if wall else "", top=12)


def judged(fleet: Fleet, name: str, phase: Phase, jobs: int) -> tuple[str, bool]:
    """A phase's end, logged: what to note of it (it did not end in time, not every job runs, or
    a host holds more than 2 jobs above another; "" if none), and whether every job runs."""
    running, (fewest, most) = fleet.running_jobs(), fleet.spread()
    log(f"{name}: {fmt(phase.seconds)}s, {running} jobs running ({fewest}-{most} per host), "
        f"{phase.ops_failed} failed ops")
    if phase.seconds is None:
        return f"{name} did not end in time", False
    if running != jobs:
        return f"{name} incomplete ({running}/{jobs} running)", False
    if most - fewest > 2:
        return f"{name} spread unevenly ({fewest}-{most} jobs per host)", True
    return "", True


def run_size(hosts: int, args: argparse.Namespace, deadline: float) -> Result:
    interval = args.heartbeat_interval if hosts < args.slow_heartbeats_from else args.slow_heartbeat_interval
    result = Result(hosts=hosts, jobs=args.services * args.jobs, heartbeat_interval=interval,
                    cpu_reference_ms=cpu_reference())
    workdir = Path(tempfile.mkdtemp(prefix=f"orch-scale-{hosts}-"))
    services = [f"svc{i}" for i in range(args.services)]
    with ExitStack() as stack:
        postgres = (stack.enter_context(fresh_database("orch_scale", args.postgres, strict=False))
                    if args.postgres else None)
        fleet = Fleet(workdir, hosts, interval, interval * 5, args.concurrency, min(args.sims, hosts), postgres,
                      args.broker)
        return measure_size(fleet, result, services, args, deadline)


def measure_size(fleet: Fleet, result: Result, services: list[str], args: argparse.Namespace,
                 deadline: float) -> Result:
    hosts, interval, workdir = fleet.hosts, result.heartbeat_interval, fleet.workdir
    try:
        log(f"\n== {hosts} simulated hosts ({args.services} services x {args.jobs} jobs, "
            f"heartbeat every {interval:g}s, {min(args.sims, hosts)} sim processes of {args.concurrency} threads)")
        result.sim_ready = fleet.start()
        log(f"sim ready (every host up) in {result.sim_ready:.1f}s")
        (workdir / "scale.yaml").write_text(manifest(services, args.jobs))
        fleet.cli("env", "create", ENV, "--sandbox", "--no-defaults")  # a manifest's new env gets them
        fleet.cli("apply", str(workdir / "scale.yaml"))
        timeout = min(args.timeout, max(deadline - time.monotonic(), 1.0))
        profiling = args.py_spy and hosts in args.profile_at
        spies = profile_start(args.py_spy, fleet, "deploy", args.wall) if profiling else []
        result.deploy = timed_phase(fleet, "push", services, timeout, image=IMAGE)
        if spies:
            profile_end(spies, f"the deploy at {hosts} hosts", args.wall)
        result.note, complete = judged(fleet, "deploy", result.deploy, result.jobs)
        if not complete:
            return result
        before, t0 = fleet.cpu()["sim"], time.perf_counter()
        time.sleep(args.idle)
        result.idle_cpu = (fleet.cpu()["sim"] - before) / (time.perf_counter() - t0)
        timeout = min(args.timeout, max(deadline - time.monotonic(), 1.0))
        spies = profile_start(args.py_spy, fleet, "redeploy", args.wall) if profiling else []
        result.redeploy = timed_phase(fleet, "redeploy", services, timeout)
        if spies:
            profile_end(spies, f"the redeploy at {hosts} hosts", args.wall)
        result.note = judged(fleet, "redeploy", result.redeploy, result.jobs)[0] or result.note
        result.catalogue_bytes, result.wal_bytes = fleet.size()
        result.rows = {t: int(fleet.query(f"SELECT count(*) FROM {t}")[0][0]) for t in ("job", "step", "operation")}
        result.tasks = fleet.tasks()
        result.redis_memory = int(fleet.redis.info("memory")["used_memory"])
        result.redis_keys = int(fleet.redis.dbsize())
        return result
    finally:
        with suppress(sqlalchemy.exc.SQLAlchemyError):
            result.own_ops = {f"{kind}/{trigger}": int(n) for kind, trigger, n in fleet.query(
                "SELECT kind, \"trigger\", count(*) FROM operation WHERE \"trigger\" NOT IN ('push', 'manual') "
                "GROUP BY kind, \"trigger\"")}
            result.hosts_down = int(fleet.query(
                "SELECT count(DISTINCT error) FROM job WHERE error LIKE 'host % went down'")[0][0])
        fleet.stop()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def report(results: list[Result]) -> None:
    log(f"\nload average now: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs\n")
    headers = ["hosts", "jobs", "CPU ref", "hb s", "deploy s", "deploy j/s", "redeploy s", "redeploy j/s",
               "op s (min/med/max, redeploy)", "CPU s/job ctl", "sim", "redis", "tasks/job", "sim CPU/task",
               "sim idle CPU",
               "catalogue MB db/wal", "jobs/steps/ops rows", "redis MB", "keys"]
    rows = []
    for r in results:
        ops = r.redeploy.op_seconds
        cpu = {k: (r.deploy.cpu.get(k, 0) + r.redeploy.cpu.get(k, 0)) / (2 * r.jobs)
               for k in ("control", "sim", "redis")}
        rows.append([
            str(r.hosts), str(r.jobs), f"{r.cpu_reference_ms:.0f}ms", f"{r.heartbeat_interval:g}",
            fmt(r.deploy.seconds), fmt(r.rate(r.deploy)),
            fmt(r.redeploy.seconds), fmt(r.rate(r.redeploy)),
            f"{ops[0]:.1f}/{ops[len(ops) // 2]:.1f}/{ops[-1]:.1f}" if ops else "-",
            f"{cpu['control'] * 1000:.1f}ms", f"{cpu['sim'] * 1000:.1f}ms", f"{cpu['redis'] * 1000:.1f}ms",
            f"{r.tasks / (2 * r.jobs):.2f}" if r.tasks else "-",
            f"{cpu['sim'] * 2 * r.jobs / r.tasks * 1000:.1f}ms" if r.tasks else "-",
            f"{100 * r.idle_cpu:.0f}%", f"{r.catalogue_bytes / 1e6:.1f}/{r.wal_bytes / 1e6:.1f}",
            "/".join(str(r.rows.get(t, 0)) for t in ("job", "step", "operation")),
            f"{r.redis_memory / 1e6:.1f}", str(r.redis_keys),
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    log("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for row in rows:
        log("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    for r in results:
        if r.note:
            log(f"  {r.hosts} hosts: {r.note}")
        if r.own_ops or r.hosts_down:
            log(f"  {r.hosts} hosts: the platform marked {r.hosts_down} host(s) down (no heartbeat within "
                f"ORCH_HOST_DOWN_AFTER) and started operations of its own: {r.own_ops}")
    log("CPU ref: how long one core took for a fixed loop of pure Python as the size began (lower is faster; "
        "this machine has varied by half between days and within minutes: compare runs through it).\n"
        "CPU s/job: CPU seconds per job started or replaced, deploy and redeploy together; ctl = the control "
        "worker; sim = the sim processes together (steps, finishes, watcher, heartbeats); redis = the whole "
        "server (with --broker amqp://…: plus RabbitMQ's).\n"
        "tasks/job: Celery tasks the simulated nodes received per job started or replaced (a host's waiting "
        "starts, stops and image checks of every operation are one task; plus advances, finishes, retries); "
        "sim CPU/task: the sim processes' CPU per such task.")


def plot(results: list[Result], path: Path, operations: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pick in (("deploy", lambda r: r.rate(r.deploy)), ("redeploy", lambda r: r.rate(r.redeploy))):
        points = [(r.hosts, pick(r)) for r in results if pick(r) is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("simulated hosts")
    ax.set_ylabel("jobs per second")
    jobs = results[0].jobs if results else 0
    slow = sorted({r.heartbeat_interval for r in results if r.heartbeat_interval})
    ax.set_title(f"{jobs} jobs ({operations} operations at once) on simulated hosts, {os.cpu_count()} CPUs\n"
                 f"heartbeats every {' or '.join(f'{i:g}' for i in slow)} s (see the table)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    log(f"plot: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=lambda s: [int(x) for x in s.split(",")], default=[10, 100, 1000],
                        help="fleet sizes, comma-separated (default 10,100,1000)")
    parser.add_argument("--services", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=50, help="jobs per service")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="each sim process's worker threads (default 4; `sim run`'s own default is 32). A sim "
                             "process runs the boxes of its share of the hosts on one core, and with no latency "
                             "injected a box is CPU only: more threads only wait for the GIL, hold the "
                             "catalogue's write turn longer (the thread that holds it shares the GIL with "
                             "the others) and split boxes smaller (benchmarks/README.md: 8 and 32 measured slower)")
    parser.add_argument("--sims", type=int, default=2,
                        help="sim processes sharing the hosts (default 2: one per core here; one process runs "
                             "its Python under one lock, the GIL, so on one core at most)")
    parser.add_argument("--heartbeat-interval", type=float, default=2.0)
    parser.add_argument("--slow-heartbeats-from", type=int, default=1000,
                        help="from this fleet size on, heartbeats every --slow-heartbeat-interval")
    parser.add_argument("--slow-heartbeat-interval", type=float, default=10.0)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measured")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a phase may take")
    parser.add_argument("--budget", type=float, default=1800.0, help="seconds the whole run may take")
    parser.add_argument("--py-spy", default=None, metavar="PATH", help="profile the sim and control processes")
    parser.add_argument("--profile-at", type=lambda s: [int(x) for x in s.split(",")], default=[100],
                        help="fleet sizes profiled with --py-spy (default 100)")
    parser.add_argument("--postgres", nargs="?", const=POSTGRES_ADMIN_URL, default=None, metavar="ADMIN_URL",
                        help="the catalogue in a throwaway PostgreSQL database (made through ADMIN_URL, "
                             f"default {POSTGRES_ADMIN_URL}) instead of SQLite")
    parser.add_argument("--broker", default=None, metavar="URL",
                        help="another broker, e.g. amqp://guest:guest@127.0.0.1:5672//scale (a vhost of its own: "
                             "its queues are deleted before and after); results stay in Redis database 6")
    parser.add_argument("--wall", action="store_true",
                        help="profile wall time (waits included) of the task threads instead of CPU")
    parser.add_argument("--plot", type=Path, default=OUT / "scale.png")
    parser.add_argument("--keep", action="store_true", help="keep each fleet's temp dir (logs, catalogue, profiles)")
    args = parser.parse_args(argv)
    if args.py_spy:
        args.py_spy = shutil.which(args.py_spy) or args.py_spy
    deadline = time.monotonic() + args.budget
    results: list[Result] = []
    with terminated_as_exit():
        for hosts in args.hosts:
            if time.monotonic() >= deadline:
                log(f"budget spent: {hosts} hosts not run")
                break
            try:
                results.append(run_size(hosts, args, deadline))
            except (RuntimeError, AssertionError) as exc:
                log(f"{hosts} hosts failed: {exc}")
                results.append(Result(hosts=hosts, jobs=args.services * args.jobs, heartbeat_interval=0,
                                      note=f"failed: {str(exc)[:200]}"))
    report(results)
    plot(results, args.plot, args.services)
    (args.plot.with_suffix(".json")).write_text(json.dumps([r.__dict__ | {
        "deploy": r.deploy.__dict__, "redeploy": r.redeploy.__dict__} for r in results], indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
