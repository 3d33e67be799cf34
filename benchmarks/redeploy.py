"""Redeploy benchmark: the platform against the same Docker work done directly, in one run.

    .venv/bin/python benchmarks/redeploy.py [--jobs 10] [--rounds 3]

Sets up a throwaway platform (temp SQLite catalogue, Redis database 14, ports 31000-31249, one
host and its node process on the local dockerd), deploys a code service of N busybox-httpd jobs,
then, round after round, times:

  platform   `orchestrator redeploy ENV web --wait` as a whole CLI call (subprocess), and the
             operation's own duration from `ops show --json` (finished_at - created_at); once
             with the CLI opening the catalogue and the broker itself, once as the client of a
             running `orchestrator api` (ORCH_API_URL; --no-api skips it);
  docker-py  the same Docker work straight through docker-py in parallel threads: stop+remove N
             containers, then create+start N with the platform's container options (copied from
             a container the platform made) and wait until each port accepts a TCP connection;
  compose    `docker-compose up -d --force-recreate --scale web=N` (if docker-compose is there),
             plus the wait until N httpd's accept connections.

Prints each round, the medians, the ratio platform/docker-py, and where the platform's time goes.
Everything it creates (containers labelled orchestrator.env=<env>, the node, the temp dir, the
Redis database) is removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
from docker.models.containers import Container

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the test harness runs the platform here too

from tests.harness import (  # noqa: E402
    DEFAULT_DOCKER_URL,
    HTTPD,
    LABEL_ENV,
    SAMPLE_IMAGE,
    Platform,
    PlatformEnv,
    free_port,
    orchestrator,
    remove_containers,
    stop_process,
    wait_for,
)
from tests.helpers import hosts_json, op_json, op_of, ts, ts_or_none  # noqa: E402

LABEL_SERVICE = "orchestrator.service"  # the spec's labels
LABEL_KIND = "orchestrator.kind"
PORT_MIN, PORT_MAX = 31000, 31249  # the platform's range
THROUGH_API = "platform: redeploy --wait, CLI as the API's client"
THROUGH_API_OP = "platform: its operation (finished - created)"
BASELINE_PORT = 31250  # docker-py containers: 31250.. (outside the platform's range)
COMPOSE_PORT = 31300  # compose containers pick the first free port from here


def log(msg: str) -> None:
    print(msg, flush=True)


def undo_all(steps: Sequence[tuple[str, Callable[[], object]]], workdir: Path, *, keep: bool,
             clients: Sequence[docker.DockerClient] = ()) -> None:
    """A benchmark's cleanup: each step tried (a failure said, the others still done), Ctrl-C
    ignored meanwhile, the temp dir removed (kept with --keep), the Docker clients closed."""
    with suppress(KeyboardInterrupt):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for what, undo in steps:
            try:
                undo()
            except Exception as exc:
                log(f"cleanup of {what} failed: {exc}")
        for client in clients:
            with suppress(Exception):
                client.close()
        if keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_port(port: int, timeout: float) -> None:
    """The platform's readiness check: poll a TCP connect every 50 ms."""
    deadline = time.monotonic() + timeout
    while not accepts(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"port {port} not listening within {timeout:g}s")
        time.sleep(0.05)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def children_cpu() -> float:
    """CPU seconds of this script's finished child processes (the CLI calls, docker-compose)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    """CPU seconds a running process has used so far (user + system, all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_reference(tries: int = 3) -> float:
    """Milliseconds one core takes for a fixed piece of pure Python (summing 3 million integers
    in a loop; the best of ``tries``): how fast this machine runs today. Figures of different
    days (this shared 2-core machine has varied by half) compare through it, not directly."""
    best = float("inf")
    for _ in range(tries):
        t0, total = time.perf_counter(), 0
        for i in range(3_000_000):
            total += i
        best = min(best, time.perf_counter() - t0)
    return best * 1000


# --- the platform -----------------------------------------------------------------------------------


def wait_host_up(p: Platform, host: str, timeout: float = 60) -> None:
    """Until `hosts list --json` shows the host up (with capacity, where hosts report one)."""
    wait_for(f"host {host} up with capacity", lambda: hosts_json(p).get(host, {}), timeout, every=0.5,
             until=lambda row: bool(row.get("state", "up") == "up" and row.get("cpus", 1) and row.get("memory_mb", 1)),
             retry=())


def op_breakdown(op: dict[str, Any]) -> dict[str, float]:
    """Where an operation's time went, from the catalogue's own timestamps (seconds)."""
    created, started, finished = ts(op["created_at"]), ts_or_none(op.get("started_at")), ts(op.get("finished_at"))
    out: dict[str, float] = {"op": (finished - created).total_seconds()}
    if started is not None:
        out["claim+plan+send"] = (started - created).total_seconds()
    previous_end = started or created
    stages: dict[int, list[dict[str, Any]]] = {}
    for step in op["steps"]:
        stages.setdefault(step["stage"], []).append(step)
    for index in sorted(stages):
        steps = stages[index]
        begins = [t for t in (ts_or_none(s["started_at"]) for s in steps) if t is not None]
        ends = [t for t in (ts_or_none(s["finished_at"]) for s in steps) if t is not None]
        if not begins or not ends:
            continue
        action = steps[0]["action"]
        out[f"gap before stage {index}"] = (min(begins) - previous_end).total_seconds()
        out[f"stage {index} {action} x{len(steps)}"] = (max(ends) - min(begins)).total_seconds()
        durations = sorted((ts(s["finished_at"]) - ts(s["started_at"])).total_seconds()
                           for s in steps if s["started_at"] and s["finished_at"])
        out[f"  one {action} step (median)"] = median(durations)
        out[f"  last {action} step begins after first"] = (max(begins) - min(begins)).total_seconds()
        previous_end = max(ends)
    out["finish after last step"] = (finished - previous_end).total_seconds()
    return out


@dataclass
class PlatformRound:
    cli_s: float  # wall time of `orchestrator redeploy --wait`
    op_s: float  # the operation's finished_at - created_at
    cli_cpu: float  # CPU seconds of that CLI process
    node_cpu: float  # CPU seconds the node used meanwhile
    api_cpu: float  # CPU seconds the API process used meanwhile (0: not the API's client)
    breakdown: dict[str, float]


@dataclass
class ApiServer:
    """`orchestrator api` in its own process and a token: the CLI as its client (ORCH_API_URL)."""

    proc: subprocess.Popen[bytes]
    variables: dict[str, str]

    @classmethod
    def start(cls, p: Platform) -> ApiServer:
        token = p.ok("tokens", "create", f"bench{uuid.uuid4().hex[:6]}").strip()
        port = free_port()
        log_file = (p.workdir / "api.log").open("wb")
        proc = subprocess.Popen(orchestrator("api", "--port", str(port)), env=p.environ, cwd=p.workdir,
                                stdout=log_file, stderr=subprocess.STDOUT)
        log_file.close()
        deadline = time.monotonic() + 60
        while not accepts(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"orchestrator api did not listen: {(p.workdir / 'api.log').read_text()[-2000:]}")
            time.sleep(0.1)
        return cls(proc, {"ORCH_API_URL": f"http://127.0.0.1:{port}", "ORCH_API_TOKEN": token})


def run_platform_round(p: Platform, client: docker.DockerClient, env: str, svc: str, jobs: int,
                       api: ApiServer | None = None) -> PlatformRound:
    """One `redeploy --wait`: the CLI opening the catalogue itself, or (``api``) as the API's client."""
    before = containers(client, env, svc)
    (node,) = p.nodes.values()
    node0, cli0 = process_cpu(node.pid), children_cpu()
    api0 = process_cpu(api.proc.pid) if api else 0.0
    wall0, t0 = time.time(), time.perf_counter()
    environ = {**p.environ, **(api.variables if api else {})}
    done = subprocess.run(orchestrator("redeploy", env, svc, "--wait"), env=environ, cwd=p.workdir,
                          capture_output=True, text=True, timeout=300)
    cli_s = time.perf_counter() - t0
    wall1 = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"redeploy --wait -> exit {done.returncode}: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    out = done.stdout
    node_cpu, cli_cpu = process_cpu(node.pid) - node0, children_cpu() - cli0
    api_cpu = process_cpu(api.proc.pid) - api0 if api else 0.0
    op_id = op_of(out)
    op = op_json(p, op_id)
    if op["state"] != "succeeded":
        raise RuntimeError(f"operation {op_id} {op['state']}: {op.get('error')}")
    after = containers(client, env, svc)
    if len(after) != jobs or set(after.values()) & set(before.values()):
        raise RuntimeError(f"after redeploy Docker runs {len(after)} containers (want {jobs}, all new)")
    breakdown = op_breakdown(op)
    created, finished = ts(op["created_at"]), ts(op["finished_at"])
    breakdown["CLI: process start -> operation recorded"] = created.timestamp() - wall0
    breakdown["CLI: operation finished -> process exit"] = wall1 - finished.timestamp()
    return PlatformRound(cli_s, breakdown["op"], cli_cpu, node_cpu, api_cpu, breakdown)


def containers(client: docker.DockerClient, env: str, svc: str) -> dict[str, str]:
    found = client.containers.list(filters={"label": [f"{LABEL_ENV}={env}", f"{LABEL_SERVICE}={svc}"]})
    return {c.name or "": c.id or "" for c in found}


# --- the docker-py baseline -------------------------------------------------------------------------


@dataclass
class Baseline:
    """The same Docker work, directly: N parallel stop+remove, then N parallel create+start+ready."""

    client: docker.DockerClient
    env: str
    jobs: int
    options: dict[str, Any]
    stop_timeout: int
    live: list[Container] = field(default_factory=list)
    generation: int = 0
    phases: list[tuple[float, float]] = field(default_factory=list)  # (stop all, start all) per round
    cpu: list[float] = field(default_factory=list)  # CPU seconds of this process per round

    def _start(self, i: int) -> Container:
        port = BASELINE_PORT + i
        name = f"orchbench-{self.env}-base-{self.generation}-{i}"
        environment = {**self.options["environment"], "PORT": str(port), "ORCH_JOB": f"base{i}"}
        # As many labels as the platform's, but no orchestrator.job: the node's sweeps skip these.
        labels = {LABEL_ENV: self.env, LABEL_SERVICE: "baseline", "bench.job": f"base{i}",
                  LABEL_KIND: "deploy", "bench.release": "1", "bench.config-hash": "-"}
        container: Container = self.client.containers.create(
            SAMPLE_IMAGE, name=name, labels=labels, **{**self.options, "environment": environment})
        container.start()
        wait_port(port, 30)
        return container

    def _stop(self, container: Container) -> None:
        container.stop(timeout=self.stop_timeout)
        container.remove(v=True)

    def up(self, pool: ThreadPoolExecutor) -> None:
        self.generation += 1
        self.live = list(pool.map(self._start, range(self.jobs)))

    def round(self, pool: ThreadPoolExecutor) -> float:
        c0 = time.process_time()
        t0 = time.perf_counter()
        list(pool.map(self._stop, self.live))
        t1 = time.perf_counter()
        self.live = []
        self.up(pool)
        t2 = time.perf_counter()
        self.phases.append((t1 - t0, t2 - t1))
        self.cpu.append(time.process_time() - c0)
        return t2 - t0


def platform_container_options(client: docker.DockerClient, env: str, svc: str) -> dict[str, Any]:
    """docker-py create() options equal to those of a container the platform made."""
    any_id = next(iter(containers(client, env, svc).values()))
    attrs = client.api.inspect_container(any_id)
    hc, cfg = attrs["HostConfig"], attrs["Config"]
    image_env = set(client.images.get(SAMPLE_IMAGE).attrs["Config"].get("Env") or [])
    environment = dict(e.split("=", 1) for e in cfg["Env"] if e not in image_env)
    environment["ORCH_SERVICE"] = "baseline"
    options: dict[str, Any] = {
        "environment": environment,
        "network_mode": hc["NetworkMode"],
        "restart_policy": {"Name": hc["RestartPolicy"]["Name"]},
        "init": bool(hc.get("Init")),
        "detach": True,
    }
    if cfg.get("Entrypoint"):
        options["entrypoint"] = cfg["Entrypoint"]
    if cfg.get("Cmd"):
        options["command"] = cfg["Cmd"]
    if hc.get("Memory"):
        options["mem_limit"] = hc["Memory"]
    if hc.get("MemorySwap"):
        options["memswap_limit"] = hc["MemorySwap"]
    if hc.get("NanoCpus"):
        options["nano_cpus"] = hc["NanoCpus"]
    return options


# --- docker-compose ---------------------------------------------------------------------------------


def compose_command() -> list[str] | None:
    """`docker-compose` (v1) if present, else try Debian's package once, else None."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("apt-get") and os.geteuid() == 0:
        log("docker-compose not found: trying `apt-get install -y docker-compose` ...")
        proc = subprocess.run(["apt-get", "install", "-y", "-q", "docker-compose"], capture_output=True,
                              text=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if proc.returncode == 0 and shutil.which("docker-compose"):
            return ["docker-compose"]
        log(f"  apt-get failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-300:]}")
    return None


@dataclass
class Compose:
    """N httpd replicas under compose. Host networking gives every replica the same environment,
    so no per-replica $PORT: each replica's command takes the first free port from COMPOSE_PORT
    (a failed bind makes busybox httpd exit, and the loop tries the next port). Ready = N
    listeners in that port window once compose returns (the old replicas are gone by then)."""

    cmd: list[str]
    workdir: Path
    project: str
    env: str
    jobs: int
    options: dict[str, Any]
    stop_timeout: int
    docker_url: str
    cpu: list[float] = field(default_factory=list)  # CPU seconds of the docker-compose process per round

    @property
    def window(self) -> range:
        return range(COMPOSE_PORT, COMPOSE_PORT + 4 * self.jobs + 20)

    def write(self) -> Path:
        # Limits as the platform's containers: same image, init, memory, CPUs, restart policy.
        opts = self.options
        hunt = (f"p={COMPOSE_PORT}; until httpd -f -p $$p -h /var/www 2>/dev/null; "
                f"do p=$$((p+1)); [ $$p -gt {self.window[-1]} ] && exit 1; done")
        lines = [
            'version: "2.4"',
            "services:",
            "  web:",
            f"    image: {SAMPLE_IMAGE}",
            "    network_mode: host",
            f"    init: {'true' if opts.get('init') else 'false'}",
            f"    restart: {opts['restart_policy']['Name'] or 'no'}",
            f"    stop_grace_period: {self.stop_timeout}s",
            '    entrypoint: ["/bin/sh", "-c"]',
            f"    command: [{json.dumps(hunt)}]",
            "    labels:",
            f"      {LABEL_ENV}: {self.env}",
            f"      {LABEL_SERVICE}: compose",
        ]
        if opts.get("mem_limit"):
            lines.append(f"    mem_limit: {opts['mem_limit']}")
        if opts.get("memswap_limit"):
            lines.append(f"    memswap_limit: {opts['memswap_limit']}")
        if opts.get("nano_cpus"):
            lines.append(f"    cpus: {opts['nano_cpus'] / 1e9:g}")
        path = self.workdir / "compose.yaml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def run(self, *args: str, timeout: float = 300) -> None:
        argv = [*self.cmd, "-p", self.project, "-f", str(self.workdir / "compose.yaml"), *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "DOCKER_HOST": self.docker_url})
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} -> exit {proc.returncode}: {proc.stderr[-2000:]}")

    def listening(self) -> int:
        return sum(accepts(port) for port in self.window)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.listening() < self.jobs:
            if time.monotonic() > deadline:
                raise RuntimeError(f"compose: {self.listening()} of {self.jobs} replicas listening")
            time.sleep(0.05)

    def up(self) -> None:
        self.run("up", "-d", "--scale", f"web={self.jobs}")
        self.wait_ready()

    def round(self) -> float:
        c0 = children_cpu()
        t0 = time.perf_counter()
        self.run("up", "-d", "--force-recreate", "-t", str(self.stop_timeout), "--scale", f"web={self.jobs}")
        self.cpu.append(children_cpu() - c0)
        self.wait_ready()
        return time.perf_counter() - t0

    def down(self) -> None:
        with suppress(Exception):
            self.run("down", "-t", "0", "--remove-orphans", timeout=120)


# --- profiling (optional) ------------------------------------------------------------------------------


def summarise_profile(raw: Path, rate: int, within: str, top: int = 22) -> None:
    """Inclusive wall time per function over the samples whose stack contains ``within``
    (py-spy raw format, --idle: waiting on a socket or a lock counts)."""
    inclusive: dict[str, int] = {}
    leaf: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if within not in stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f for f in stack.split(";") if not f.startswith(("thread ", "process "))]
        names = [f for f in frames if "<frozen importlib" not in f]
        if len(names) < len(frames):
            names.append("(importing modules)")  # one line for all of import machinery
        for name in dict.fromkeys(names):
            inclusive[name] = inclusive.get(name, 0) + count
        if frames:
            leaf[frames[-1]] = leaf.get(frames[-1], 0) + count
    if not total:
        log(f"  (no samples{' under ' + within if within else ''})")
        return
    log(f"  {total / rate:.2f} thread-seconds sampled{' under ' + within if within else ''}; inclusive, top {top}"
        " (frames in every sample and library plumbing left out):")
    plumbing = ("click/", "celery/app/trace.py", "concurrent/futures", "threading.py", "<frozen runpy>",
                "requests/", "urllib3/", "http/client.py", "docker/utils/decorators.py")
    shown = [(n, c) for n, c in inclusive.items() if c < total and not any(x in n for x in plumbing)]
    for name, count in sorted(shown, key=lambda kv: -kv[1])[:top]:
        log(f"    {100 * count / total:5.1f}%  {count / rate:6.2f}s  {name[:110]}")
    log("  where the samples end (leaf frames), top 8:")
    for name, count in sorted(leaf.items(), key=lambda kv: -kv[1])[:8]:
        log(f"    {100 * count / total:5.1f}%  {count / rate:6.2f}s  {name[:110]}")


def profile_round(p: Platform, client: docker.DockerClient, env: str, svc: str, jobs: int,
                  py_spy: str, cpu: bool) -> None:
    """One more (untimed) redeploy with py-spy recording the node and the CLI process: wall time
    (all samples, idle ones too) or, with ``cpu``, only samples that hold the GIL."""
    exe = str(Path(shutil.which(py_spy) or py_spy).resolve())  # (a relative path: the CLI runs elsewhere)
    if not Path(exe).exists() or not p.nodes:
        log(f"py-spy: {py_spy} not found, no profile")
        return
    rate = 200
    kind = "cpu" if cpu else "wall"
    node_raw, cli_raw = p.workdir / f"node-profile-{kind}.txt", p.workdir / f"cli-profile-{kind}.txt"
    common = ["record", "--gil" if cpu else "--idle", "--threads", "--function", "--rate", str(rate),
              "--format", "raw"]
    err = (p.workdir / "py-spy.err").open("w+b")
    (node,) = p.nodes.values()
    spy = subprocess.Popen([exe, *common, "--nonblocking", "--pid", str(node.pid), "--output", str(node_raw)],
                           stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 10
        while b"Sampling" not in (p.workdir / "py-spy.err").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.perf_counter()
        redeploy = orchestrator("redeploy", env, svc, "--wait")
        proc = subprocess.run([exe, *common, "--output", str(cli_raw), "--", *redeploy],
                              env=p.environ, cwd=p.workdir, capture_output=True, text=True, timeout=300)
        elapsed = time.perf_counter() - t0
    finally:
        stop_process(spy, signal.SIGINT, timeout=30)
        err.close()
    log("")
    what = "CPU: samples holding the GIL" if cpu else "wall time: all samples, waiting ones too"
    log(f"Profiled redeploy, {what} (py-spy {rate} Hz, untimed: {elapsed:.2f}s under the profiler, "
        f"exit {proc.returncode})")
    if node_raw.exists():
        log("node, " + ("whole process:" if cpu else "step tasks (all worker threads together):"))
        summarise_profile(node_raw, rate, "" if cpu else "run_host_steps")
    if cli_raw.exists():
        log("CLI process `orchestrator redeploy --wait`:")
        summarise_profile(cli_raw, rate, "")


# --- the run ------------------------------------------------------------------------------------------


@contextmanager
def terminated_as_exit() -> Iterator[None]:
    """SIGTERM/SIGHUP end the run through the same cleanup as Ctrl-C."""
    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    # Ctrl-C too, even when started with SIGINT ignored (a background job of a script)
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def auto_size(client: docker.DockerClient, jobs: int) -> str:
    """64 MB and at most half a CPU each, so N jobs fit in 90% of the host's CPUs (placement
    does not overcommit; busybox httpd needs next to nothing)."""
    ncpu = int(client.info().get("NCPU") or os.cpu_count() or 1)
    cpus = max(0.01, min(0.5, int(90 * ncpu / jobs) / 100))
    return f"64m:{cpus:g}"


def preflight(client: docker.DockerClient, jobs: int) -> None:
    client.ping()
    client.images.get(SAMPLE_IMAGE)  # missing: scripts/build-images
    busy = [p for p in [*range(PORT_MIN, PORT_MIN + jobs + 5), *range(BASELINE_PORT, BASELINE_PORT + jobs),
                        *range(COMPOSE_PORT, COMPOSE_PORT + 4 * jobs + 20)] if accepts(p)]
    if busy:
        raise SystemExit(f"ports already in use on 127.0.0.1: {busy[:10]}: stop what holds them first")


def fmt(x: float) -> str:
    return f"{x:7.2f}s"


def report(results: dict[str, list[float]], breakdowns: list[dict[str, float]], cli_startup: list[float],
           baseline_phases: list[tuple[float, float]], jobs: int, rounds: int,
           api_breakdowns: Sequence[dict[str, float]] = (), reference: float = float("nan")) -> None:
    log("")
    log(f"Redeploy of {jobs} jobs, {rounds} rounds (median; every round in brackets); {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} now; CPU reference {reference:.0f} ms before the platform started "
        "(a fixed loop of pure Python on one core: lower is faster)")
    rows = [(name, xs) for name, xs in results.items() if xs]
    width = max(len(n) for n, _ in rows) + 2
    for name, xs in rows:
        log(f"  {name:<{width}}{fmt(median(xs))}   [{' '.join(f'{x:.2f}' for x in xs)}]")
    base = median(results["docker-py, parallel threads (baseline)"])
    cli = median(results["platform: `orchestrator redeploy --wait` (CLI)"])
    op = median(results["platform: operation (ops show: finished - created)"])
    log(f"  {'ratio platform CLI / docker-py':<{width}}{cli / base:7.2f}    (issue #2 target: under 1.2)")
    log(f"  {'ratio platform op  / docker-py':<{width}}{op / base:7.2f}")
    if results.get(THROUGH_API):
        log(f"  {'ratio platform CLI through the API / docker-py':<{width}}"
            f"{median(results[THROUGH_API]) / base:7.2f}")
        log(f"  {'ratio its op / docker-py':<{width}}{median(results[THROUGH_API_OP]) / base:7.2f}")
    compose = results.get("docker-compose v1 up -d --force-recreate --scale")
    if compose:
        log(f"  {'ratio platform CLI / compose':<{width}}{cli / median(compose):7.2f}")
    log("")
    log("Where the platform's time goes (median over rounds, from the catalogue's step times):")
    keys = list(breakdowns[0])
    if api_breakdowns:
        log(f"  {'':<44}{'CLI':>8}{'via API':>9}")
    for key in keys:
        values = [b[key] for b in breakdowns if key in b]
        through = [b[key] for b in api_breakdowns if key in b]
        log(f"  {key:<44}{fmt(median(values))}" + (f"  {fmt(median(through))}" if through else ""))
    log(f"  {'  one short CLI call (`ops show --json`)':<44}{fmt(median(cli_startup))}")
    log("The docker-py baseline's two phases, for comparison with the stop and start stages:")
    log(f"  {'stop+remove all':<44}{fmt(median([a for a, _ in baseline_phases]))}")
    log(f"  {'create+start all, until every port accepts':<44}{fmt(median([b for _, b in baseline_phases]))}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=10, help="scale of the service (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each (default 3)")
    parser.add_argument("--docker-url", default=os.environ.get("ORCH_BENCH_DOCKER_URL", DEFAULT_DOCKER_URL))
    parser.add_argument("--redis-db", type=int, default=14, help="flushed before and after (default 14)")
    parser.add_argument("--stop-timeout", type=int, default=10,
                        help="SIGTERM->SIGKILL seconds, the same for all three (default 10)")
    parser.add_argument("--src", type=Path, default=ROOT,
                        help="tree whose orchestrator/ and workers/ run (default: this checkout)")
    parser.add_argument("--size", default=None,
                        help="job size (default: 64m and a CPU share so that N jobs fit this host's CPUs)")
    parser.add_argument("--no-compose", action="store_true", help="skip docker-compose")
    parser.add_argument("--no-api", action="store_true",
                        help="skip the rounds with the CLI as the client of `orchestrator api` (ORCH_API_URL)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (catalogue, node log)")
    parser.add_argument("--py-spy", nargs="?", const="py-spy", default=None, metavar="PATH",
                        help="after the timed rounds, two more redeploys with py-spy on the node and the CLI "
                             "(wall time, then CPU), summarised (raw files kept with --keep)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.rounds < 1 or args.jobs > 100:
        parser.error("--jobs must be 1..100 and --rounds at least 1")

    client = docker.DockerClient(base_url=args.docker_url, version="auto", max_pool_size=2 * args.jobs + 4)
    preflight(client, args.jobs)
    reference = cpu_reference()  # (before the platform's processes start)
    suffix = uuid.uuid4().hex[:6]
    env, svc, host = f"bench{suffix}", "web", f"bench{suffix}"
    workdir = Path(tempfile.mkdtemp(prefix="orch-bench-"))
    settings = PlatformEnv(f"sqlite:///{workdir / 'catalogue.db'}", args.redis_db, (PORT_MIN, PORT_MAX),
                           stop_timeout=args.stop_timeout, start_timeout=30, result_backend="")
    platform = Platform(settings, workdir, args.src.resolve())
    compose: Compose | None = None
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    results: dict[str, list[float]] = {
        "platform: `orchestrator redeploy --wait` (CLI)": [],
        "platform: operation (ops show: finished - created)": [],
        THROUGH_API: [],
        THROUGH_API_OP: [],
        "docker-py, parallel threads (baseline)": [],
        "docker-compose v1 up -d --force-recreate --scale": [],
    }
    breakdowns: list[dict[str, float]] = []
    api_breakdowns: list[dict[str, float]] = []
    api: ApiServer | None = None
    cli_startup: list[float] = []
    cpu: dict[str, list[float]] = {"platform: node process": [], "platform: CLI process": [],
                                   "through the API: node": [], "through the API: CLI": [],
                                   "through the API: API process": [],
                                   "docker-py: this script's threads": [], "docker-compose process": []}
    networks_before = {n.id for n in client.networks.list()}
    try:
        with terminated_as_exit():
            settings.flush()
            load = os.getloadavg()[0]
            if load > (os.cpu_count() or 1):
                log(f"note: load average {load:.1f} on {os.cpu_count()} CPUs: other work competes, times will be noisy")
            log(f"platform: catalogue {workdir / 'catalogue.db'}, redis db {args.redis_db}, "
                f"ports {PORT_MIN}-{PORT_MAX}, code from {platform.src}")
            platform.ok("hosts", "add", host, "--docker-url", args.docker_url, "--address", "127.0.0.1")
            platform.start_node(host, timeout=60)
            wait_host_up(platform, host)
            log(f"node {host} ready (log {platform.logs[-1]})")
            platform.ok("env", "create", env, "--sandbox", "--no-defaults")
            size = args.size or auto_size(client, args.jobs)
            platform.ok("services", "add", env, svc, "--type", "code", "--command", HTTPD,
                         "--scale", str(args.jobs), "--size", size)
            t0 = time.perf_counter()
            platform.ok("push", env, svc, SAMPLE_IMAGE, "--wait")
            log(f"pushed {SAMPLE_IMAGE}: {args.jobs} jobs of size {size} deployed in {time.perf_counter() - t0:.2f}s")

            options = platform_container_options(client, env, svc)
            baseline = Baseline(client, env, args.jobs, options, args.stop_timeout)
            baseline.up(pool)
            described = {k: v for k, v in options.items() if k not in ("environment", "detach")}
            log(f"docker-py baseline: {args.jobs} containers of {SAMPLE_IMAGE}, options copied from the platform's: "
                f"{described}, env PORT per container + the same ORCH_* variables")

            if not args.no_api:
                api = ApiServer.start(platform)
                log(f"API: {api.variables['ORCH_API_URL']} (log {platform.workdir / 'api.log'})")

            cmd = None if args.no_compose else compose_command()
            if cmd is None:
                log("docker-compose: not available, skipped" if not args.no_compose else "docker-compose: skipped")
            else:
                compose = Compose(cmd, workdir, f"orchbench{suffix}", env, args.jobs, options,
                                  args.stop_timeout, args.docker_url)
                compose.write()
                compose.up()
                log(f"docker-compose: {args.jobs} replicas up (project {compose.project}, "
                    f"{workdir / 'compose.yaml'})")

            for n in range(1, args.rounds + 1):
                pr = run_platform_round(platform, client, env, svc, args.jobs)
                cli_s, op_s = pr.cli_s, pr.op_s
                results["platform: `orchestrator redeploy --wait` (CLI)"].append(cli_s)
                results["platform: operation (ops show: finished - created)"].append(op_s)
                breakdowns.append(pr.breakdown)
                cpu["platform: node process"].append(pr.node_cpu)
                cpu["platform: CLI process"].append(pr.cli_cpu)
                t0 = time.perf_counter()
                platform.ok("ops", "show", "1", "--json")
                cli_startup.append(time.perf_counter() - t0)
                if api is not None:
                    ar = run_platform_round(platform, client, env, svc, args.jobs, api)
                    results[THROUGH_API].append(ar.cli_s)
                    results[THROUGH_API_OP].append(ar.op_s)
                    api_breakdowns.append(ar.breakdown)
                    cpu["through the API: node"].append(ar.node_cpu)
                    cpu["through the API: CLI"].append(ar.cli_cpu)
                    cpu["through the API: API process"].append(ar.api_cpu)
                base_s = baseline.round(pool)
                results["docker-py, parallel threads (baseline)"].append(base_s)
                cpu["docker-py: this script's threads"].append(baseline.cpu[-1])
                line = f"round {n}: platform CLI {cli_s:.2f}s, op {op_s:.2f}s; "
                if api is not None:
                    line += f"through the API {results[THROUGH_API][-1]:.2f}s, op {results[THROUGH_API_OP][-1]:.2f}s; "
                line += f"docker-py {base_s:.2f}s"
                if compose is not None:
                    compose_s = compose.round()
                    results["docker-compose v1 up -d --force-recreate --scale"].append(compose_s)
                    cpu["docker-compose process"].append(compose.cpu[-1])
                    line += f"; compose {compose_s:.2f}s"
                log(line)
            report(results, breakdowns, cli_startup, baseline.phases, args.jobs, args.rounds, api_breakdowns,
                   reference)
            log("CPU seconds used per redeploy (client side; dockerd/containerd not counted), median:")
            for name, xs in cpu.items():
                if xs:
                    log(f"  {name:<44}{fmt(median(xs))}   [{' '.join(f'{x:.2f}' for x in xs)}]")
            if args.py_spy:
                profile_round(platform, client, env, svc, args.jobs, args.py_spy, cpu=False)
                profile_round(platform, client, env, svc, args.jobs, args.py_spy, cpu=True)
            if compose is not None:
                log("")
                log("compose compared: the same image, init, memory/CPU limits, restart policy and stop timeout,\n"
                    "  host networking; but compose cannot hand each replica its own $PORT, so each replica's\n"
                    f"  shell takes the first free port from {COMPOSE_PORT} (busybox httpd exits on a failed bind);\n"
                    "  timed = `up --force-recreate` plus the wait until N ports accept connections.\n"
                    "  compose recreates replica by replica in parallel (stop, create, start each), the platform\n"
                    "  and the baseline stop all, then start all.")
        return 0
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}): cleaning up")
        return 130
    finally:
        cleanup(platform, client, env, compose, pool, workdir, networks_before, keep=args.keep, api=api)


def cleanup(platform: Platform, client: docker.DockerClient, env: str, compose: Compose | None,
            pool: ThreadPoolExecutor, workdir: Path, networks_before: set[str],
            keep: bool, api: ApiServer | None = None) -> None:
    """Undo everything, each part on its own so one failure does not skip the rest."""
    steps: list[tuple[str, Callable[[], object]]] = [
        ("api", (lambda: stop_process(api.proc)) if api else (lambda: None)),
        ("node", platform.stop_nodes),
        ("compose", compose.down if compose else (lambda: None)),
        ("containers", lambda: remove_containers(client, env)),
        ("networks", lambda: [n.remove() for n in client.networks.list()  # compose's, if it made one
                              if n.id not in networks_before and compose
                              and (n.name or "").startswith(compose.project)]),
        ("redis", platform.env.flush),
        ("pool", lambda: pool.shutdown(wait=False, cancel_futures=True)),
    ]
    undo_all(steps, workdir, keep=keep, clients=[client])


if __name__ == "__main__":
    sys.exit(main())
