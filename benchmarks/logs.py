"""Logging benchmark: how fast a job's lines reach its environment's log store, against `docker logs`.

    .venv/bin/python benchmarks/logs.py [--lines 20000] [--rounds 2] [--samples 30]

Sets up a throwaway platform (temp SQLite catalogue, Redis database 12, ports 31250-31499: jobs
31250-31449, the proxies' range 31450-31499; one host and its node process on the local dockerd,
heartbeat 0.5 s), an environment with its included logging service (`env create ENV --sandbox`:
logging at size xs, the service proxy) and a code service `printer` (one busybox-httpd job of
size m). The host's log shipper (rsyslog imfile -> RELP) carries the job's json-file log to the
logging service (rsyslog -> `logstore ingest` -> SQLite FTS5). Each round, on a fresh printer
job (a redeploy before every round but the first):

  1. throughput: `docker exec` into the job runs busybox awk, which prints N lines (a run token,
     a block number and a sequence number, padded to --width characters) to the job's stdout
     (/proc/1/fd/1) as fast as it can. From the first print (Docker's timestamp of line 0) it
     times when the N-th line is searchable in the store (its API, /api/logs?grep=<that line>,
     polled every --poll s, default 0.2: each query costs the 0.25-CPU logging container CPU that
     ingest then lacks; line 0 is looked for every 20 ms), against when it shows in
     `docker logs --tail 1` of the container (polled every 20 ms): the baseline, measured on the
     same prints. /api/stats, polled every 1 s, gives the store's progress (the 10% -> 90% rate,
     interpolated between the polls). Afterwards: reading all N back, `docker logs` (the CLI)
     against `orchestrator logs ENV printer --grep ... -n 10000 --json` (and the store's API, the
     same queries), and the check that each of the N sequence numbers arrived exactly once,
     through the CLI; Docker's own log is counted too. During the burst, the counters docker
     stats shows, read from the cgroups every 0.1 s, of the logging container, the host's shipper
     and the job: CPU used, CFS throttling, memory; and an estimate of what the benchmark's own
     API queries cost the logging container (CPU per query, measured in the setup: 2 s of
     queries every 20 ms for a line that is not there).
  2. latency of one line: --samples lines, one every --spacing s, written by a `docker exec -i`
     shell in the job to its stdout; from the write, the store's API (grep of the line's unique
     token) and `docker logs --tail 10` of the container are each polled every 20 ms until the line
     shows; p50/p90/max for both. The logging container's CPU then is mostly the cost of the
     polls (--latency-poll, default 20 ms); its CPU while idle (2 s in the setup) is shown too.

It prints each round as it goes, then a table with the store and the docker-logs baseline side by
side, and a verdict. Every wait has a timeout (--timeout for a burst, 20 s for a latency sample,
300 s for a CLI command). Everything it made is removed at the end, also after an error or
Ctrl-C/SIGTERM: the node and its host's log shipper (with its volumes), the containers and volumes
labelled orchestrator.env=<its env>, Redis database 12, the temp dir (--keep keeps it: the
catalogue and the node's log) and the platform's /tmp dirs it created.

`--what-if-cpus C` adds one more burst after `docker update --cpus C` of the logging container (a
what-if outside the platform, on the benchmark's own container: does xs cap the throughput?).
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import docker
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the test harness runs the platform here too

from redeploy import terminated_as_exit, undo_all  # noqa: E402

from tests.harness import (  # noqa: E402
    DEFAULT_DOCKER_URL,
    HTTPD,
    LABEL_ENV,
    LABEL_SHIPPER,
    SAMPLE_IMAGE,
    Platform,
    PlatformEnv,
    platform_key,
    remove_containers,
    wait_for,
)
from tests.helpers import op_json  # noqa: E402

LABEL_SERVICE = "orchestrator.service"
PORTS = (31250, 31499)  # PlatformEnv: the jobs' range, then the proxies' in the last 50
PRINTER = "printer"
CLI_MAX_LINES = 10_000  # `orchestrator logs -n` at most
BLOCK = CLI_MAX_LINES // 2  # lines per read-back query: a block stored twice still shows as more
DOCKER_POLL = 0.02
STATS_EVERY = 0.1
PROGRESS_EVERY = 1.0
SLOW = 0.25  # a latency sample slower than this is named
SAMPLE_TIMEOUT = 20.0  # seconds a latency sample may take to show
CLI_TIMEOUT = 300.0
FILLER = "lorem-ipsum-dolor-sit-amet-consectetur-adipiscing-elit-sed-do-eiusmod-tempor-incididunt-"


def log(msg: str = "") -> None:
    print(msg, flush=True)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q% of the values at or below it."""
    if not xs:
        return float("nan")
    ordered = sorted(xs)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def fnum(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None or x != x else format(x, fmt)


def docker_time(text: str) -> float:
    """Docker's RFC 3339 time with nanoseconds, in UTC (``...T21:24:20.123456789Z``) -> unix seconds."""
    stamp, _, frac = text.rstrip("Z").partition(".")
    seconds = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))
    return seconds + (float(f"0.{frac}") if frac else 0.0)


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def poll_until(probe: Callable[[], bool], every: float, deadline: float, stop: threading.Event) -> float | None:
    """Call ``probe`` every ``every`` s until it holds: the time.time() it did (None: the deadline
    or ``stop`` came first). A probe that raises counts as not yet."""
    while not stop.is_set() and time.monotonic() < deadline:
        started = time.monotonic()
        with suppress(Exception):
            if probe():
                return time.time()
        stop.wait(max(0.0, every - (time.monotonic() - started)))
    return None


# --- the store and docker stats -----------------------------------------------------------------------


class Store:
    """The logging service's API with its dashboard credentials; one HTTP session (one per thread)."""

    def __init__(self, url: str, user: str, password: str) -> None:
        self.url, self.auth = url.rstrip("/") + "/", (user, password)
        self.session = requests.Session()
        self.queries = 0

    def copy(self) -> Store:
        return Store(self.url, *self.auth)

    def lines(self, grep: str, limit: int = 1) -> list[dict[str, Any]]:
        self.queries += 1
        got = self.session.get(self.url + "api/logs", params={"grep": grep, "limit": str(limit)}, auth=self.auth,
                               timeout=10)
        got.raise_for_status()
        return got.json()["lines"]  # type: ignore[no-any-return]

    def stats(self) -> dict[str, Any]:
        self.queries += 1
        got = self.session.get(self.url + "api/stats", auth=self.auth, timeout=10)
        got.raise_for_status()
        return got.json()  # type: ignore[no-any-return]

    def close(self) -> None:
        self.session.close()


@dataclass(frozen=True)
class Stat:
    t: float
    cpu_ns: int
    periods: int
    throttled_periods: int
    throttled_ns: int
    memory: int  # bytes, without the inactive page cache (as `docker stats` shows it)
    rss: int  # bytes of anonymous memory (no page cache at all)


@dataclass(frozen=True)
class Usage:
    """One container over a window, from its cgroup's counters."""

    cpus: float  # CPUs used on average
    throttled: float  # share of the CFS periods in which it was throttled (nan: no CPU limit)
    throttled_s: float
    memory_max: int
    rss_max: int


class Cgroup:
    """A container's CPU and memory counters, read from its cgroup (v1 or v2), as docker stats reads
    them: at any moment (docker stats' own samples come once a second)."""

    def __init__(self, pid: int) -> None:
        self.dirs: dict[str, Path] = {}
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for name in controllers.split(",") if controllers else ["unified"]:
                for d in (Path("/sys/fs/cgroup") / (controllers or "unified") / path.lstrip("/"),
                          Path("/sys/fs/cgroup") / path.lstrip("/")):
                    if d.is_dir():
                        self.dirs.setdefault(name, d)
                        break
        if not ({"cpu", "cpuacct", "memory"} <= set(self.dirs) or "unified" in self.dirs):
            raise OSError(f"no cgroup of pid {pid} found under /sys/fs/cgroup")

    @staticmethod
    def _keys(path: Path) -> dict[str, int]:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines() if line.strip())}

    def read(self) -> Stat:
        if {"cpu", "cpuacct", "memory"} <= set(self.dirs):  # v1
            cpu = self._keys(self.dirs["cpu"] / "cpu.stat")
            mem = self._keys(self.dirs["memory"] / "memory.stat")
            used = int((self.dirs["memory"] / "memory.usage_in_bytes").read_text())
            return Stat(time.time(), int((self.dirs["cpuacct"] / "cpuacct.usage").read_text()), cpu["nr_periods"],
                        cpu["nr_throttled"], cpu["throttled_time"], used - mem.get("total_inactive_file", 0),
                        mem.get("total_rss", 0))
        d = self.dirs["unified"]
        cpu, mem = self._keys(d / "cpu.stat"), self._keys(d / "memory.stat")
        return Stat(time.time(), 1000 * cpu["usage_usec"], cpu.get("nr_periods", 0), cpu.get("nr_throttled", 0),
                    1000 * cpu.get("throttled_usec", 0),
                    int((d / "memory.current").read_text()) - mem.get("inactive_file", 0), mem.get("anon", 0))


class Stats:
    """The counters of some containers every ``STATS_EVERY`` s, from their cgroups (or, where those
    cannot be read, docker stats, one sample a second)."""

    def __init__(self, client: docker.DockerClient, containers: dict[str, str]) -> None:
        self.client = client
        self.containers = containers  # name -> id
        self.samples: dict[str, list[Stat]] = {name: [] for name in containers}
        self.source: dict[str, Callable[[], Stat]] = {}
        for name, cid in containers.items():
            try:
                self.source[name] = Cgroup(int(client.api.inspect_container(cid)["State"]["Pid"])).read
            except (OSError, ValueError, KeyError):
                self.source[name] = partial(self.docker_stats, cid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stats", daemon=True)

    def docker_stats(self, cid: str) -> Stat:
        s = self.client.api.stats(cid, stream=False, one_shot=True)
        cpu = s["cpu_stats"]
        thr = cpu.get("throttling_data") or {}
        mem = s.get("memory_stats") or {}
        more = mem.get("stats") or {}
        return Stat(time.time(), int(cpu["cpu_usage"]["total_usage"]), int(thr.get("periods", 0)),
                    int(thr.get("throttled_periods", 0)), int(thr.get("throttled_time", 0)),
                    int(mem.get("usage", 0)) - int(more.get("total_inactive_file", 0)),
                    int(more.get("total_rss", more.get("anon", 0))))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, read in self.source.items():
                with suppress(Exception):
                    self.samples[name].append(read())
            self._stop.wait(STATS_EVERY)

    def usage(self, name: str, t0: float, t1: float) -> Usage | None:
        xs = self.samples.get(name, [])
        before = [s for s in xs if s.t <= t0] or xs[:1]
        after = [s for s in xs if s.t >= t1] or xs[-1:]
        if not before or not after or after[0].t <= before[-1].t:
            return None
        a, b = before[-1], after[0]
        periods = b.periods - a.periods
        inside = [s for s in xs if a.t <= s.t <= b.t]
        return Usage(cpus=(b.cpu_ns - a.cpu_ns) / 1e9 / (b.t - a.t),
                     throttled=(b.throttled_periods - a.throttled_periods) / periods if periods else float("nan"),
                     throttled_s=(b.throttled_ns - a.throttled_ns) / 1e9,
                     memory_max=max((s.memory for s in inside), default=0),
                     rss_max=max((s.rss for s in inside), default=0))


# --- figures --------------------------------------------------------------------------------------------


@dataclass
class Burst:
    label: str
    lines: int
    exec_start: float = float("nan")  # time.time() as `docker exec` was asked
    first: float = float("nan")  # Docker's timestamp of line 0: the first print
    last_printed: float = float("nan")  # Docker's timestamp of line N-1
    docker_seen: float | None = None  # the N-th line in `docker logs --tail 1`
    store_first: float | None = None  # line 0 searchable in the store
    store_seen: float | None = None  # the N-th line searchable in the store
    progress: list[tuple[float, int]] = field(default_factory=list)  # (time, lines the store gained)
    progress_errors: list[str] = field(default_factory=list)
    docker_read_s: float = float("nan")  # `docker logs CONTAINER` (the CLI) returned every line
    docker_found: int = 0
    docker_distinct: int = 0
    cli_read_s: float = float("nan")  # the `orchestrator logs` calls that read the N lines back
    cli_calls: int = 0
    api_read_s: float = float("nan")  # the same queries straight to the store's API
    found: int = 0  # lines of the run in the store (through the CLI)
    distinct: int = 0
    missing: list[int] = field(default_factory=list)
    duplicated: dict[int, int] = field(default_factory=dict)
    usage: dict[str, Usage | None] = field(default_factory=dict)
    queries: int = 0  # the benchmark's queries to the store's API until the N-th line was found
    error: str | None = None

    def after_first(self, t: float | None) -> float | None:
        return None if t is None else t - self.first

    def rate(self, t: float | None) -> float | None:
        spent = self.after_first(t)
        return None if spent is None or spent <= 0 else self.lines / spent

    def steady_rate(self) -> float | None:
        """Lines per second while the store went from 10% to 90% of N (from /api/stats)."""
        def crossed(share: float) -> float | None:
            """When the store held that share of N: interpolated between the two samples around it."""
            want, prev = share * self.lines, None
            for t, n in self.progress:
                if n >= want:
                    if prev is None or n == prev[1]:
                        return t
                    return prev[0] + (t - prev[0]) * (want - prev[1]) / (n - prev[1])
                prev = (t, n)
            return None

        t10, t90 = crossed(0.1), crossed(0.9)
        return None if t10 is None or t90 is None or t90 <= t10 else 0.8 * self.lines / (t90 - t10)


@dataclass
class Latency:
    printed: list[float] = field(default_factory=list)  # time.time() of each write
    docker_ts: list[float | None] = field(default_factory=list)  # Docker's timestamp of each line
    store: list[float | None] = field(default_factory=list)  # when each was searchable
    docker: list[float | None] = field(default_factory=list)  # when each showed in docker logs
    logging: Usage | None = None  # the logging container over the samples
    query_cpu: float = float("nan")  # its CPU seconds per API query then (the few lines' ingest included)
    said: list[str] = field(default_factory=list)  # the logging container's own output meanwhile
    slow_usage: dict[str, Usage | None] = field(default_factory=dict)  # while the slowest sample waited

    def ms(self, seen: Sequence[float | None]) -> list[float]:
        return [1000 * (s - p) for p, s in zip(self.printed, seen, strict=True) if s is not None]

    def lost(self, seen: Sequence[float | None]) -> int:
        return sum(1 for s in seen if s is None)


# --- the bench ------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, platform: Platform, client: docker.DockerClient, env: str) -> None:
        self.args, self.platform, self.client, self.env = args, platform, client, env
        self.host = env
        self.store: Store | None = None
        self.logging_id = ""
        self.logging_limits = ""
        self.logging_cpus = 0.0
        self.idle: Usage | None = None  # the logging container with nothing to do
        self.query_cpu = float("nan")  # CPU seconds one API query costs the logging container

    # setup

    def setup(self) -> None:
        p, a, env = self.platform, self.args, self.env
        t0 = time.monotonic()
        p.ok("hosts", "add", self.host, "--docker-url", a.docker_url, "--address", "127.0.0.1")
        p.start_node(self.host, timeout=60)
        self.wait_ops(p.ok("env", "create", env, "--sandbox"))
        p.ok("services", "add", env, PRINTER, "--type", "code", "--scale", "1", "--size", a.printer_size,
             "--command", f"exec {HTTPD}")
        self.wait_ops(p.ok("push", env, PRINTER, SAMPLE_IMAGE))
        board = json.loads(p.ok("env", "show", env, "--json", "--show-secrets"))["dashboards"]["logging"]
        self.store = Store(board["url"], board["user"], board["password"])
        found = self.client.api.containers(filters={"label": [f"{LABEL_ENV}={env}", f"{LABEL_SERVICE}=logging"]})
        assert len(found) == 1, f"one logging container, not {len(found)}"
        self.logging_id = found[0]["Id"]
        self.logging_limits = self.limits(self.logging_id)
        host_config = self.client.api.inspect_container(self.logging_id)["HostConfig"]
        self.logging_cpus = (host_config.get("NanoCpus") or 0) / 1e9
        # The pipeline is live once a line goes through (the shipper starts from a heartbeat).
        warm = f"warm{uuid.uuid4().hex[:8]}"
        self.write(self.printer(), f"{warm} first line")
        store = self.store
        wait_for("the first line in the store", lambda: store.lines(warm), 90, every=0.2)
        time.sleep(1)
        stats = Stats(self.client, {"logging": self.logging_id})
        stats.start()
        t_idle = time.time()
        time.sleep(2)
        stats.stop()
        self.idle = stats.usage("logging", t_idle, time.time() - STATS_EVERY)
        self.query_cpu = self.calibrate(store)
        log(f"  setup {time.monotonic() - t0:.1f} s: env {env}, logging at {board['url']} ({self.logging_limits}), "
            f"shipper {self.shipper()[:12]}, printer job {self.printer()[:12]} (size {a.printer_size})")
        others = len(self.client.api.containers(all=True)) - len(self.client.api.containers(
            all=True, filters={"label": f"{LABEL_ENV}={env}"})) - 1
        log(f"  the shipper reads the json logs of every container on this engine: {others} are not this benchmark's "
            "(their lines are parsed, then dropped: they share its reading)")

    def calibrate(self, store: Store, seconds: float = 2.0) -> float:
        """CPU seconds one query (grep of a line that is not there) costs the logging container."""
        stats = Stats(self.client, {"logging": self.logging_id})
        stats.start()
        time.sleep(2 * STATS_EVERY)
        before, t0 = store.queries, time.time()
        while time.time() - t0 < seconds:
            started = time.monotonic()
            store.lines(f"absent{uuid.uuid4().hex[:8]}")
            time.sleep(max(0.0, self.args.latency_poll - (time.monotonic() - started)))
        t1 = time.time()
        time.sleep(2 * STATS_EVERY)
        stats.stop()
        used = stats.usage("logging", t0, t1)
        count = store.queries - before
        return float("nan") if used is None or not count else used.cpus * (t1 - t0) / count

    def wait_ops(self, output: str, timeout: float = 120) -> None:
        for op_id in dict.fromkeys(re.findall(r"operation (\d+)", output)):
            op = wait_for(f"operation {op_id} ends", partial(op_json, self.platform, op_id), timeout, every=0.2,
                          until=lambda o: o["state"] in ("succeeded", "failed", "cancelled"), retry=())
            if op["state"] != "succeeded":
                raise RuntimeError(f"operation {op_id} {op['state']}: {op.get('error')}")

    def limits(self, cid: str) -> str:
        host = self.client.api.inspect_container(cid)["HostConfig"]
        cpus = (host.get("NanoCpus") or 0) / 1e9
        return f"{cpus:g} CPU, {(host.get('Memory') or 0) // 2**20} MB" if cpus else "no CPU limit"

    def printer(self) -> str:
        found = self.client.api.containers(filters={"label": [f"{LABEL_ENV}={self.env}", f"{LABEL_SERVICE}={PRINTER}"]})
        assert len(found) == 1, f"one printer container, not {len(found)}"
        return str(found[0]["Id"])

    def shipper(self) -> str:
        key = platform_key(self.platform.env.database_url)
        found = self.client.api.containers(filters={"label": f"{LABEL_SHIPPER}={key}"})
        return str(found[0]["Id"]) if found else ""

    def write(self, cid: str, text: str) -> None:
        code, out = self.client.containers.get(cid).exec_run(["sh", "-c", f"echo '{text}' > /proc/1/fd/1"])
        assert code == 0, out

    def redeploy_printer(self) -> None:
        old = self.printer()
        self.wait_ops(self.platform.ok("redeploy", self.env, PRINTER))
        assert self.printer() != old, "the redeploy made a new container"

    # 1. throughput

    def burst(self, label: str, token: str) -> Burst:
        a, store = self.args, self.store
        assert store is not None
        n = a.lines
        b = Burst(label, n)
        cid = self.printer()
        last_text = line_text(token, n - 1)
        shipper = self.shipper()
        stats = Stats(self.client, {"logging": self.logging_id, "printer": cid,
                                     **({"shipper": shipper} if shipper else {})})
        base = int(store.stats()["lines"])
        stop = threading.Event()
        deadline = time.monotonic() + a.timeout
        stores = [store.copy(), store.copy()]
        dock = docker.DockerClient(base_url=a.docker_url, version="auto")

        def store_watch() -> None:
            b.store_first = poll_until(lambda: bool(stores[0].lines(line_text(token, 0))), a.latency_poll, deadline,
                                       stop)
            b.store_seen = poll_until(lambda: bool(stores[0].lines(last_text)), a.poll, deadline, stop)
            b.queries = stores[0].queries + stores[1].queries

        def docker_watch() -> None:
            b.docker_seen = poll_until(lambda: last_text.encode() in dock.api.logs(cid, tail=1), DOCKER_POLL,
                                       deadline, stop)

        def progress() -> None:
            while not stop.wait(PROGRESS_EVERY):
                try:
                    b.progress.append((time.time(), int(stores[1].stats()["lines"]) - base))
                except Exception as exc:  # said with the round's figures
                    b.progress_errors.append(f"{type(exc).__name__}: {str(exc)[:100]}")

        threads = [threading.Thread(target=f, daemon=True) for f in (store_watch, docker_watch, progress)]
        stats.start()
        time.sleep(2 * STATS_EVERY)  # a stats sample before the first print
        for thread in threads:
            thread.start()
        fill = (FILLER * (a.width // len(FILLER) + 1))[:max(1, a.width - len(line_text(token, 0)))]
        awk = (f"awk -v t={token} -v n={n} -v b={BLOCK} -v f={fill} "
               "'BEGIN{for(i=0;i<n;i++) printf \"%s b%02d %06d %s\\n\", t, int(i/b), i, f}' > /proc/1/fd/1")
        try:
            b.exec_start = time.time()
            code, out = self.client.containers.get(cid).exec_run(["sh", "-c", awk])
            if code != 0:
                raise RuntimeError(f"the printer's awk exited {code}: {out!r}")
            threads[0].join(a.timeout + 15)
            threads[1].join(max(1.0, deadline - time.monotonic()) + 15)
            time.sleep(2 * STATS_EVERY)  # a stats sample after the last line
        finally:
            stop.set()
            for thread in threads:
                thread.join(15)
            stats.stop()
        # Docker's own record: when each line was printed, and whether it has them all.
        seqs = Counter[int]()
        for raw in self.client.api.logs(cid, timestamps=True).decode(errors="replace").splitlines():
            stamp, _, text = raw.partition(" ")
            if text.startswith(f"{token} "):
                seq = int(text.split()[2])
                seqs[seq] += 1
                if seq == 0:
                    b.first = docker_time(stamp)
                if seq == n - 1:
                    b.last_printed = docker_time(stamp)
        b.docker_found, b.docker_distinct = sum(seqs.values()), len(seqs)
        t_end = b.store_seen or time.time()
        b.usage = {name: stats.usage(name, b.first, t_end) for name in stats.containers}
        if b.store_seen is None:
            b.error = f"the {n}-th line was not searchable within {a.timeout:g} s"
        # Reading all N back: docker logs (the CLI) against the platform's CLI (and the store's API).
        t0 = time.perf_counter()
        done = subprocess.run(["docker", "-H", a.docker_url, "logs", cid], capture_output=True, timeout=CLI_TIMEOUT)
        b.docker_read_s = time.perf_counter() - t0
        read = sum(1 for line in done.stdout.splitlines() if line.startswith(f"{token} ".encode()))
        if read != n:
            b.error = (b.error or "") + f"; `docker logs` gave {read} of the {n} lines"
        self.read_back(b, token)
        for thread_store in stores:
            thread_store.close()
        dock.close()
        return b

    def read_back(self, b: Burst, token: str) -> None:
        """Each block of BLOCK lines through `orchestrator logs` (the check: each line once), and the
        same queries to the store's API (timed only)."""
        assert self.store is not None
        blocks = range(-(-b.lines // BLOCK))
        seqs = Counter[int]()
        t0 = time.perf_counter()
        for k in blocks:
            out = self.platform.ok("logs", self.env, PRINTER, "--grep", f"{token} b{k:02d} ", "-n", str(CLI_MAX_LINES),
                                   "--json", timeout=CLI_TIMEOUT)
            for line in json.loads(out):
                seqs[int(line["line"].split()[2])] += 1
        b.cli_read_s, b.cli_calls = time.perf_counter() - t0, len(blocks)
        t0 = time.perf_counter()
        for k in blocks:
            self.store.lines(f"{token} b{k:02d} ", CLI_MAX_LINES)
        b.api_read_s = time.perf_counter() - t0
        b.found, b.distinct = sum(seqs.values()), len(seqs)
        b.missing = [i for i in range(b.lines) if i not in seqs]
        b.duplicated = {i: c for i, c in seqs.items() if c > 1}

    # 2. latency

    def latency(self, token: str) -> Latency:
        a, store = self.args, self.store
        assert store is not None
        lat = Latency()
        cid = self.printer()
        shell = subprocess.Popen(["docker", "-H", a.docker_url, "exec", "-i", cid, "sh", "-c",
                                  "exec > /proc/1/fd/1; while read -r l; do echo \"$l\"; done"],
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        dock = docker.DockerClient(base_url=a.docker_url, version="auto")
        poller = store.copy()
        assert shell.stdin is not None
        stop = threading.Event()
        tag = f"{token}-lat"

        def send(text: str) -> float:
            assert shell.stdin is not None
            t = time.time()
            shell.stdin.write(text.encode() + b"\n")
            shell.stdin.flush()
            return t

        shipper = self.shipper()
        stats = Stats(self.client, {"logging": self.logging_id, **({"shipper": shipper} if shipper else {})})
        stats.start()
        try:
            send(f"{tag}-ready")  # the shell runs: its first line reaches Docker's log
            wait_for("the latency shell's first line", lambda: f"{tag}-ready".encode() in dock.api.logs(cid, tail=5),
                     20, every=0.05)
            n = a.samples
            lat.store, lat.docker = [None] * n, [None] * n

            def seen_in(text: str, into: list[float | None]) -> None:
                now = time.time()
                for found in re.findall(rf"{re.escape(tag)}-(\d+) ", text):
                    i = int(found)
                    if i < n and into[i] is None:
                        into[i] = now

            def watch(probe: Callable[[], str], into: list[float | None]) -> None:
                # until every sample was seen, or SAMPLE_TIMEOUT after the last one was written
                while not stop.is_set() and any(x is None for x in into):
                    started = time.monotonic()
                    with suppress(Exception):
                        seen_in(probe(), into)
                    stop.wait(max(0.0, a.latency_poll - (time.monotonic() - started)))

            watchers = [
                threading.Thread(target=watch, daemon=True, args=(
                    lambda: " ".join(x["line"] + " " for x in poller.lines(f"{tag}-", n + 5)), lat.store)),
                threading.Thread(target=watch, daemon=True, args=(
                    lambda: dock.api.logs(cid, tail=10).decode(errors="replace"), lat.docker)),
            ]
            for w in watchers:
                w.start()
            t0 = time.monotonic()
            for i in range(n):
                delay = t0 + i * a.spacing - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                lat.printed.append(send(f"{tag}-{i:03d} one line, sample {i}"))
            end = time.monotonic() + SAMPLE_TIMEOUT
            while time.monotonic() < end and any(x is None for x in [*lat.store, *lat.docker]):
                time.sleep(0.05)
            stop.set()
            for w in watchers:
                w.join(15)
            stats.stop()
            t_end = time.time() - STATS_EVERY
            lat.logging = stats.usage("logging", lat.printed[0], t_end)
            if lat.logging is not None and poller.queries:
                lat.query_cpu = lat.logging.cpus * (t_end - lat.printed[0]) / poller.queries
            stamps: dict[int, float] = {}
            for raw in dock.api.logs(cid, tail=n + 20, timestamps=True).decode(errors="replace").splitlines():
                stamp, _, text = raw.partition(" ")
                found = re.match(rf"{re.escape(tag)}-(\d+) ", text)
                if found:
                    stamps[int(found[1])] = docker_time(stamp)
            lat.docker_ts = [stamps.get(i) for i in range(n)]
            own = self.client.api.logs(self.logging_id, since=int(lat.printed[0]) - 1, timestamps=True)
            lat.said = own.decode(errors="replace").splitlines()[-20:]
            slow = [(p, seen) for p, seen in zip(lat.printed, lat.store, strict=True)
                    if seen is not None and seen - p > SLOW]
            if slow:  # where the time went while the slowest waited: upstream (shipper) or the store
                t0_slow, t1_slow = max(slow, key=lambda x: x[1] - x[0])
                lat.slow_usage = {name: stats.usage(name, t0_slow, t1_slow) for name in stats.containers}
        finally:
            stop.set()
            stats.stop()
            with suppress(Exception):
                shell.stdin.close()
            try:
                shell.wait(10)
            except subprocess.TimeoutExpired:
                shell.kill()
                shell.wait(5)
            poller.close()
            dock.close()
        return lat


def line_text(token: str, seq: int) -> str:
    """What line ``seq`` of a burst starts with (awk adds the filler): unique, found by grep."""
    return f"{token} b{seq // BLOCK:02d} {seq:06d} "


# --- report ---------------------------------------------------------------------------------------------


def rounds_cell(xs: Sequence[float | None], fmt: str) -> str:
    vals = [x for x in xs if x is not None]
    med = fnum(median(vals), fmt) if vals else "-"
    return med if len(xs) < 2 else f"{med} ({' '.join(fnum(x, fmt) for x in xs)})"


def report(bursts: Sequence[Burst], lats: Sequence[Latency], args: argparse.Namespace, bench: Bench,
           wall: float) -> str:
    main_ = [b for b in bursts if not b.label.startswith("what-if")]
    whatif = [b for b in bursts if b.label.startswith("what-if")]
    n = args.lines
    log("")
    log(f"Logging: a burst of {n} lines ({args.width} chars) per round, {len(main_)} round(s); one line at a time, "
        f"{args.samples} samples x {len(lats)} round(s) every {args.spacing:g} s. {os.cpu_count()} CPUs, load "
        f"average {' '.join(f'{x:.1f}' for x in os.getloadavg())} now; logging service {bench.logging_limits}.")
    log("Median over rounds (each round in brackets). t=0: line 0's Docker timestamp (the first print).")
    rows: list[tuple[str, str, str]] = [
        ("N-th line visible after, s",
         rounds_cell([b.after_first(b.store_seen) for b in main_], ".2f"),
         rounds_cell([b.after_first(b.docker_seen) for b in main_], ".3f")),
        ("throughput, lines/s (N / that)",
         rounds_cell([b.rate(b.store_seen) for b in main_], ".0f"),
         rounds_cell([b.rate(b.docker_seen) for b in main_], ".0f")),
        ("store's 10%->90% rate, lines/s (/api/stats)",
         rounds_cell([b.steady_rate() for b in main_], ".0f"), ""),
        ("line 0 visible after, s",
         rounds_cell([b.after_first(b.store_first) for b in main_], ".2f"), "(at once)"),
        ("read all N back, s",
         rounds_cell([b.cli_read_s for b in main_], ".2f") + f" CLI x{main_[0].cli_calls if main_ else 0}",
         rounds_cell([b.docker_read_s for b in main_], ".3f") + " `docker logs`"),
        ("  (the same queries to the store's API), s", rounds_cell([b.api_read_s for b in main_], ".2f"), ""),
        ("lines found / distinct (of N)",
         " ".join(f"{b.found}/{b.distinct}" for b in main_), " ".join(f"{b.docker_found}/{b.docker_distinct}"
                                                                       for b in main_)),
    ]
    store_ms = [x for lat in lats for x in lat.ms(lat.store)]
    docker_ms = [x for lat in lats for x in lat.ms(lat.docker)]
    lost_store = sum(lat.lost(lat.store) for lat in lats)
    lost_docker = sum(lat.lost(lat.docker) for lat in lats)

    def pct(pooled: Sequence[float], each: Callable[[Latency], list[float]], q: float) -> str:
        """All rounds' samples pooled, then each round's."""
        return f"{fnum(percentile(pooled, q), '.0f')} ({' '.join(fnum(percentile(each(x), q), '.0f') for x in lats)})"

    for name, q in (("p50", 50), ("p90", 90), ("max", 100)):
        rows.append((f"one line, print -> visible {name}, ms", pct(store_ms, lambda x: x.ms(x.store), q),
                     pct(docker_ms, lambda x: x.ms(x.docker), q)))
    rows.append(("one line, samples not seen in 20 s", str(lost_store), str(lost_docker)))
    width = max(len(r[0]) for r in rows)
    col = max(28, *(len(r[1]) for r in rows))
    log(f"  {'':<{width}}  {'platform: log store':<{col}}  baseline: docker logs")
    log("  " + "-" * (width + col + 26))
    for what, plat, base in rows:
        log(f"  {what:<{width}}  {plat:<{col}}  {base}")
    log("")
    log("CPU and memory (cgroup counters, as docker stats; mem without the inactive page cache) during each burst "
        "(first print -> N-th line searchable):")
    for b in bursts:
        parts = []
        for name, u in b.usage.items():
            if u is None:
                parts.append(f"{name} -")
                continue
            thr = "" if u.throttled != u.throttled else f", throttled in {100 * u.throttled:.0f}% of periods"
            parts.append(f"{name} {u.cpus:.2f} CPU{thr}, mem max {u.memory_max / 2**20:.0f} MB "
                         f"(rss {u.rss_max / 2**20:.0f})")
        log(f"  {b.label}: " + "; ".join(parts))

    def cpu(u: Usage | None) -> str:
        return "-" if u is None else f"{u.cpus:.3f}"

    busy = median([lat.query_cpu for lat in lats if lat.query_cpu == lat.query_cpu])
    for b in bursts:
        spent = b.after_first(b.store_seen)
        u = b.usage.get("logging")
        if spent and u is not None:
            log(f"  {b.label}: the benchmark's {b.queries} API queries cost the logging container about "
                f"{b.queries * bench.query_cpu:.2f}-{b.queries * busy:.2f} of the {u.cpus * spent:.2f} CPU-s it used "
                f"({bench.query_cpu * 1000:.1f} ms a query on an idle store, {busy * 1000:.1f} ms during the latency "
                f"samples)")
    log(f"  the logging container idle (2 s, no line, no poll): {cpu(bench.idle)} CPU; during the latency samples "
        f"(a line every {args.spacing:g} s, its API polled every {args.latency_poll * 1000:.0f} ms): "
        f"{' '.join(cpu(lat.logging) for lat in lats)} CPU")
    hop = [1000 * (d - p) for lat in lats for p, d in zip(lat.printed, lat.docker_ts, strict=True) if d is not None]
    log(f"the latency samples' write -> Docker's timestamp (the exec shell's hop): p50 {fnum(median(hop), '.1f')} ms, "
        f"max {fnum(max(hop, default=float('nan')), '.1f')} ms; polls every {args.latency_poll * 1000:.0f} ms on both "
        f"sides (the burst's store poll every {args.poll * 1000:.0f} ms, docker's every {DOCKER_POLL * 1000:.0f} ms)")
    for b in bursts:
        log(f"  {b.label}: printing took {fnum(b.last_printed - b.first, '.3f')} s (Docker's timestamps; "
            f"`docker exec` asked {fnum(b.first - b.exec_start, '.3f')} s before line 0)")
    for b in whatif:
        log(f"{b.label}: N-th line after {fnum(b.after_first(b.store_seen))} s = {fnum(b.rate(b.store_seen), '.0f')} "
            f"lines/s (10%->90%: {fnum(b.steady_rate(), '.0f')}); found {b.found}/{b.distinct}")
    problems = [b for b in bursts if b.error or b.missing or b.duplicated or b.found != b.lines]
    for b in problems:
        log(f"PROBLEM {b.label}: {b.error or ''} found {b.found}, distinct {b.distinct}, missing {len(b.missing)} "
            f"(first {b.missing[:10]}), duplicated {len(b.duplicated)} (first {sorted(b.duplicated.items())[:10]})")
    log(f"run time {wall:.0f} s")
    return verdict(main_, whatif, store_ms, docker_ms, lost_store, bench.logging_cpus)


def verdict(bursts: Sequence[Burst], whatif: Sequence[Burst], store_ms: Sequence[float],
            docker_ms: Sequence[float], lost: int, limit: float) -> str:
    if not bursts:
        return "verdict: no burst finished"
    exact = all(b.found == b.lines and b.distinct == b.lines and not b.duplicated for b in bursts)
    rate = median([r for b in bursts if (r := b.rate(b.store_seen)) is not None])
    dock = median([b.after_first(b.docker_seen) or float("nan") for b in bursts])
    store = median([b.after_first(b.store_seen) or float("nan") for b in bursts])
    logging_ = [u for b in bursts if (u := b.usage.get("logging")) is not None]
    cpus, thr = median([u.cpus for u in logging_]), median([u.throttled for u in logging_])
    capped = (thr == thr and thr > 0.5) or (limit > 0 and cpus >= 0.9 * limit)
    text = (f"verdict: {'every line arrived exactly once' if exact else 'LINES LOST OR DUPLICATED (see above)'}; "
            f"the store took {bursts[0].lines} lines at {fnum(rate, '.0f')} lines/s ({fnum(store)} s, docker logs had "
            f"them after {fnum(dock, '.3f')} s: x{fnum(store / dock, '.0f')}); one line searchable after p50 "
            f"{fnum(percentile(store_ms, 50), '.0f')} ms (docker logs {fnum(percentile(docker_ms, 50), '.0f')} ms)"
            f"{f', {lost} not seen' if lost else ''}; the logging container used {fnum(cpus)} CPU, throttled in "
            f"{fnum(100 * thr, '.0f')}% of periods: its CPU limit ({limit:g}) "
            f"{'caps the throughput' if capped else 'is not what caps it'}")
    load, cpus_here = os.getloadavg()[0], os.cpu_count() or 1
    if not capped and load > cpus_here:
        text += f" (the host was short of CPU: load average {load:.1f} on {cpus_here} CPUs)"
    if whatif:
        w = whatif[0]
        text += f"; {w.label}: {fnum(w.rate(w.store_seen), '.0f')} lines/s"
    return text


# --- the run --------------------------------------------------------------------------------------------


def preflight(client: docker.DockerClient) -> None:
    client.ping()
    client.images.get(SAMPLE_IMAGE)  # missing: scripts/build-images
    client.images.get("orch/logging:1")
    if shutil.which("docker") is None:
        raise SystemExit("the docker CLI is not installed")
    busy = [port for port in range(PORTS[0], PORTS[0] + 10) if accepts(port)]
    if busy:
        raise SystemExit(f"ports already in use on 127.0.0.1: {busy}: stop what holds them first")


def say_burst(b: Burst) -> None:
    log(f"  {b.label}: printed in {fnum(b.last_printed - b.first, '.3f')} s; N-th line in docker logs after "
        f"{fnum(b.after_first(b.docker_seen), '.3f')} s, searchable after {fnum(b.after_first(b.store_seen))} s "
        f"({fnum(b.rate(b.store_seen), '.0f')} lines/s, 10%->90% {fnum(b.steady_rate(), '.0f')}); read back: docker "
        f"logs {fnum(b.docker_read_s, '.3f')} s, CLI {fnum(b.cli_read_s)} s; found {b.found}, distinct {b.distinct}, "
        f"missing {len(b.missing)}, duplicated {len(b.duplicated)}" + (f"  ERROR {b.error}" if b.error else ""))
    if b.steady_rate() is None:
        log(f"    no 10%->90% rate: /api/stats gave {[(round(t - b.first, 1), n) for t, n in b.progress]}"
            + (f", failed {len(b.progress_errors)} times ({b.progress_errors[0]})" if b.progress_errors else ""))


def say_latency(rnd: int, lat: Latency) -> None:
    s, d = lat.ms(lat.store), lat.ms(lat.docker)
    log(f"  round {rnd} latency: store p50 {fnum(percentile(s, 50), '.0f')} p90 {fnum(percentile(s, 90), '.0f')} max "
        f"{fnum(percentile(s, 100), '.0f')} ms ({len(s)} seen); docker logs p50 {fnum(percentile(d, 50), '.0f')} p90 "
        f"{fnum(percentile(d, 90), '.0f')} max {fnum(percentile(d, 100), '.0f')} ms ({len(d)} seen)")
    slow = [(i, 1000 * (seen - p)) for i, (p, seen) in enumerate(zip(lat.printed, lat.store, strict=True))
            if seen is not None and seen - p > SLOW]
    if slow:
        began = time.strftime("%H:%M:%S", time.gmtime(lat.printed[0])) + f"{lat.printed[0] % 1:.3f}"[1:]
        log(f"    slow in the store (over {SLOW * 1000:.0f} ms; sample #0 written at {began} UTC): " + ", ".join(
            f"#{i} at +{lat.printed[i] - lat.printed[0]:.1f} s: {ms:.0f} ms" for i, ms in slow))
        log("    while the slowest waited: " + "; ".join(
            f"{name} {'-' if u is None else f'{u.cpus:.2f} CPU'}" for name, u in lat.slow_usage.items()))
        for line in lat.said:
            log(f"    the logging container said: {line[:300]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--lines", type=int, default=20_000, help="lines of a burst (default 20000)")
    parser.add_argument("--width", type=int, default=100, help="characters per burst line (default 100)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds: a burst, then the latency samples (default 2)")
    parser.add_argument("--samples", type=int, default=30, help="latency samples per round (default 30)")
    parser.add_argument("--spacing", type=float, default=0.2, help="seconds between latency samples (default 0.2)")
    parser.add_argument("--poll", type=float, default=0.2,
                        help="seconds between the store polls of a burst (default 0.2: each costs the 0.25-CPU "
                             "logging container a query)")
    parser.add_argument("--latency-poll", type=float, default=0.02,
                        help="seconds between the polls of a latency sample, both sides (default 0.02)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a burst may take to arrive (default 300)")
    parser.add_argument("--printer-size", default="m", help="the printing job's size (default m: 1 CPU)")
    parser.add_argument("--what-if-cpus", type=float, default=0,
                        help="then one more burst after `docker update --cpus C` of the logging container "
                             "(default 0: none)")
    parser.add_argument("--docker-url", default=os.environ.get("ORCH_BENCH_DOCKER_URL", DEFAULT_DOCKER_URL))
    parser.add_argument("--redis-db", type=int, default=12, help="flushed before and after (default 12)")
    parser.add_argument("--src", type=Path, default=ROOT,
                        help="tree whose orchestrator/ and workers/ run (default: this checkout)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (catalogue, node log)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.lines < 1 or args.samples < 1 or not 30 <= args.width <= 4000:
        parser.error("--rounds, --lines and --samples must be at least 1, --width 30-4000")
    if args.lines > 100 * BLOCK:
        parser.error(f"--lines: at most {100 * BLOCK}")

    started = time.monotonic()
    client = docker.DockerClient(base_url=args.docker_url, version="auto")
    preflight(client)
    suffix = uuid.uuid4().hex[:6]
    env = f"lb{suffix}"
    workdir = Path(tempfile.mkdtemp(prefix="orch-logs-bench-"))
    settings = PlatformEnv(f"sqlite:///{workdir / 'catalogue.db'}", args.redis_db, PORTS, start_timeout=30,
                           heartbeat_interval=0.5, result_backend="")
    platform = Platform(settings, workdir, args.src.resolve())
    dirs_existed = {d: Path(d).exists() for d in (settings.proxy_dir, settings.variables()["ORCH_MONITOR_DIR"],
                                                  settings.variables()["ORCH_GIT_DIR"])}
    bench = Bench(args, platform, client, env)
    bursts: list[Burst] = []
    lats: list[Latency] = []
    failed = ""
    try:
        with terminated_as_exit():
            settings.flush()
            log(f"logs benchmark {suffix}: temp dir {workdir}, redis db {args.redis_db}, ports {PORTS[0]}-{PORTS[1]}, "
                f"code from {platform.src}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
            bench.setup()
            try:
                for rnd in range(1, args.rounds + 1):
                    if rnd > 1:
                        bench.redeploy_printer()
                    token = f"{env}r{rnd}x{uuid.uuid4().hex[:6]}"
                    bursts.append(bench.burst(f"round {rnd}", token))
                    say_burst(bursts[-1])
                    lats.append(bench.latency(token))
                    say_latency(rnd, lats[-1])
                if args.what_if_cpus:
                    # the platform sets NanoCpus, which only `docker update --cpus` changes (not the API's quota)
                    subprocess.run(["docker", "-H", args.docker_url, "update", "--cpus", f"{args.what_if_cpus:g}",
                                    bench.logging_id], check=True, capture_output=True, timeout=60)
                    bench.redeploy_printer()
                    label = f"what-if: logging at {args.what_if_cpus:g} CPU (docker update)"
                    bursts.append(bench.burst(label, f"{env}w{uuid.uuid4().hex[:6]}"))
                    say_burst(bursts[-1])
            except Exception as exc:  # the figures so far are still reported
                failed = f"{type(exc).__name__}: {exc}"
                log(f"  FAILED: {failed}")
            if bursts:
                log(report(bursts, lats, args, bench, time.monotonic() - started))
        bad = any(b.error or b.missing or b.duplicated or b.found != b.lines for b in bursts)
        return 1 if bad or failed else 0
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}): cleaning up")
        return 130
    finally:
        cleanup(bench, workdir, dirs_existed, args.keep)
        log(f"done in {time.monotonic() - started:.0f} s (with the cleanup)")


def cleanup(b: Bench, workdir: Path, dirs_existed: dict[str, bool], keep: bool) -> None:
    """Undo everything, each part on its own so one failure does not skip the rest."""
    client, env = b.client, b.env

    def volumes() -> None:
        for volume in client.volumes.list(filters={"label": f"{LABEL_ENV}={env}"}):
            volume.remove(force=True)

    # The shipper's image declares a VOLUME its logship mode does not mount: Docker gives it an
    # anonymous one, which stop_nodes (a forced remove, without v) leaves behind.
    shipper_anonymous: list[str] = []
    with suppress(Exception):
        key = platform_key(b.platform.env.database_url)
        for found in client.api.containers(all=True, filters={"label": f"{LABEL_SHIPPER}={key}"}):
            shipper_anonymous += [m["Name"] for m in client.api.inspect_container(found["Id"])["Mounts"]
                                  if m.get("Type") == "volume" and len(m.get("Name", "")) == 64]

    def anonymous() -> None:
        for name in shipper_anonymous:
            with suppress(docker.errors.NotFound):
                client.api.remove_volume(name)

    def dirs() -> None:
        for d, existed in dirs_existed.items():
            if not existed:
                shutil.rmtree(d, ignore_errors=True)

    steps: list[tuple[str, Callable[[], object]]] = [
        ("node and shipper", b.platform.stop_nodes),
        ("containers", lambda: remove_containers(client, env)),
        ("volumes", volumes),
        ("the shipper's anonymous volume", anonymous),
        ("store session", lambda: b.store.close() if b.store else None),
        ("redis", b.platform.env.flush),
        ("dirs", dirs),
    ]
    undo_all(steps, workdir, keep=keep, clients=[client])


if __name__ == "__main__":
    sys.exit(main())
