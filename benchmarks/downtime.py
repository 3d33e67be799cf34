"""Downtime benchmark: what users see while the platform changes a service, under constant load.

    .venv/bin/python benchmarks/downtime.py [--rounds 1]

Sets up a throwaway platform (temp SQLite catalogue, Redis database 11, ports 31500-31749: jobs
31500-31689, the service proxy 31700-31749; one host and its node process on the local dockerd),
an environment with its service proxy (HAProxy), a code service `web` of 2 busybox-httpd jobs
with a health path, and a site routed to it. Then, each round, under a constant load of HTTP
requests through the proxy (4 threads on 127.0.0.1, a fresh TCP connection per request,
`Connection: close`, no retries, a short timeout; started just before the change and stopped a
fixed time after it), it measures:

  0. no change                  the load alone for 3 s: the noise floor of the figures below
  1. redeploy, no overlap       `orchestrator redeploy ENV web --wait`
  2. redeploy, overlap 2 s      the same after `services update ENV web --overlap 2 --support`
  3. scale down 4 -> 2          `orchestrator scale ENV web 2 --wait` (after an unmeasured scale 4)
  4. redeploy of the proxy      `orchestrator redeploy ENV service-proxy --wait`
  5. docker-compose v1          `docker-compose up -d --force-recreate` of the same app, one
                                replica on a fixed port, the load hitting that port directly

and for each: requests sent, failed requests (any non-2xx, a connection error or a timeout), the
longest gap between two successful responses, p50/p99 latency of the successful ones, and, from
the operation's step timestamps, how long a new job takes to become ready. Everything it creates
(containers labelled orchestrator.env=<env>, the compose project, the node, the temp dir, the
Redis database) is removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
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
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import docker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the test harness runs the platform here too

from redeploy import terminated_as_exit, undo_all  # noqa: E402

from tests.harness import (  # noqa: E402
    DEFAULT_DOCKER_URL,
    LABEL_ENV,
    SAMPLE_IMAGE,
    Platform,
    PlatformEnv,
    remove_containers,
    wait_for,
)
from tests.helpers import hosts_json, op_json, op_of, ts, ts_or_none  # noqa: E402

LABEL_SERVICE = "orchestrator.service"
LABEL_PROJECT = "com.docker.compose.project"
PORTS = (31500, 31749)  # PlatformEnv: jobs from the low end, the proxies in the last 50
JOB_PORT_MAX = 31689  # the jobs' range is cut short, so that the compose port is nobody else's
COMPOSE_PORT = 31690  # the compose replica's fixed port
SITE = "app.example.com"
LOAD_HOST = "127.0.0.1"  # the only address the load ever goes to
APP_COMMAND = "httpd -f -p $PORT -h /var/www"
SCENARIOS = ("no change (noise floor)", "redeploy, no overlap", "redeploy, overlap {overlap}s", "scale down 4 -> 2",
             "redeploy service-proxy", "compose up --force-recreate")


def log(msg: str = "") -> None:
    print(msg, flush=True)


def accepts(port: int, host: str = LOAD_HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q% of the values at or below it."""
    if not sorted_xs:
        return float("nan")
    rank = max(1, -(-len(sorted_xs) * q // 100))
    return sorted_xs[int(rank) - 1]


# --- the load -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    sent: float  # time.monotonic()
    done: float
    ok: bool
    what: str  # the status code, or the error's kind


class Load:
    """``threads`` threads, each sending one GET every ``interval`` seconds (or as soon as the
    previous one ends, if later) to 127.0.0.1:``port``: a fresh TCP connection per request,
    ``Connection: close``, no retries, ``timeout`` seconds for connect and for the answer. It
    stops when told, after ``max_seconds`` or after ``max_requests`` in all, whichever comes first."""

    def __init__(self, port: int, host_header: str, *, threads: int, interval: float, timeout: float,
                 max_seconds: float, max_requests: int) -> None:
        self.port, self.host_header = port, host_header
        self.threads, self.interval, self.timeout = threads, interval, timeout
        self.max_seconds, self.max_requests = max_seconds, max_requests
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sent = 0
        self._workers: list[threading.Thread] = []
        self._deadline = 0.0

    def start(self) -> None:
        self._deadline = time.monotonic() + self.max_seconds
        self._workers = [threading.Thread(target=self._run, name=f"load-{i}", daemon=True)
                         for i in range(self.threads)]
        for worker in self._workers:
            worker.start()

    def stop(self) -> list[Sample]:
        self._stop.set()
        for worker in self._workers:
            worker.join(self.timeout + 5)
        return sorted(self.samples, key=lambda s: s.sent)

    def _take(self) -> bool:
        with self._lock:
            if self._sent >= self.max_requests:
                return False
            self._sent += 1
            return True

    def one(self) -> Sample:
        t0 = time.monotonic()
        conn = http.client.HTTPConnection(LOAD_HOST, self.port, timeout=self.timeout)
        try:
            conn.request("GET", "/", headers={"Host": self.host_header, "Connection": "close"})
            resp = conn.getresponse()
            resp.read()
            ok, what = 200 <= resp.status < 300, str(resp.status)
        except TimeoutError:
            ok, what = False, "timeout"
        except (OSError, http.client.HTTPException) as exc:
            ok, what = False, type(exc).__name__
        finally:
            conn.close()
        return Sample(t0, time.monotonic(), ok, what)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set() and time.monotonic() < self._deadline and self._take():
            self.samples.append(self.one())  # list.append is atomic
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = time.monotonic()


# --- figures --------------------------------------------------------------------------------------------


@dataclass
class Readiness:
    """From the operation's step timestamps (seconds)."""

    op_s: float  # finished - created
    start_step: float | None  # median start step: create + start + listening on its port
    start_to_serving: float | None  # first start step begins -> the proxy takes the new jobs in
    outage: float | None  # no overlap: old jobs leave the proxy -> new ones in (the catalogue's view)


@dataclass
class Figures:
    scenario: str
    round: int
    requests: int = 0
    failed: int = 0
    gap: float = float("nan")  # longest time between two successful responses (s)
    gap_at: float = float("nan")  # when it began, seconds after the change began
    recovered: bool = True  # the last request of the window succeeded
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    change_s: float = float("nan")  # the change's command, as a whole
    change_at: float = 0.0  # time.time() when it began
    failures: Counter[str] = field(default_factory=Counter)
    failure_span: tuple[float, float] | None = None  # first and last failed request, after the change began
    ready: Readiness | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def summarise(fig: Figures, samples: Sequence[Sample], t_change: float, t_end: float) -> None:
    fig.requests = len(samples)
    failed = [s for s in samples if not s.ok]
    fig.failed = len(failed)
    fig.failures = Counter(s.what for s in failed)
    if failed:
        fig.failure_span = (min(s.sent for s in failed) - t_change, max(s.done for s in failed) - t_change)
    good = sorted(s.done for s in samples if s.ok)
    latencies = sorted(1000 * (s.done - s.sent) for s in samples if s.ok)
    fig.p50_ms, fig.p99_ms = percentile(latencies, 50), percentile(latencies, 99)
    ends = list(good)
    last = max(samples, key=lambda s: s.done, default=None)
    if last is not None and not last.ok:
        fig.recovered = False  # still failing when the load stopped: the gap runs to the end
        ends.append(t_end)
    if len(ends) >= 2:
        gaps = [(b - a, a) for a, b in itertools.pairwise(ends)]
        gap, began = max(gaps)
        fig.gap, fig.gap_at = gap, began - t_change


def readiness(op: dict[str, Any]) -> Readiness:
    steps = op["steps"]
    op_s = (ts(op["finished_at"]) - ts(op["created_at"])).total_seconds()

    def span(xs: Sequence[dict[str, Any]]) -> tuple[float, float] | None:
        begins = [t for t in (ts_or_none(s["started_at"]) for s in xs) if t]
        ends = [t for t in (ts_or_none(s["finished_at"]) for s in xs) if t]
        return (min(begins).timestamp(), max(ends).timestamp()) if begins and ends else None

    stages: dict[int, list[dict[str, Any]]] = {}
    for step in steps:
        stages.setdefault(step["stage"], []).append(step)
    start_stage = next((i for i in sorted(stages)
                        if any(s["action"] in ("start", "start_proxy") for s in stages[i])), None)
    start_step = start_to_serving = outage = None
    if start_stage is not None:
        durations = [(ts(s["finished_at"]) - ts(s["started_at"])).total_seconds() for s in stages[start_stage]
                     if s["started_at"] and s["finished_at"]]
        start_step = median(durations)
        serve = stages.get(start_stage + 1, [])
        first = span(stages[start_stage])
        if serve and all(s["action"] == "route" for s in serve) and first:
            last = span(serve)
            if last:
                start_to_serving = last[1] - first[0]
                before = [i for i in stages if i < start_stage and all(s["action"] == "route" for s in stages[i])]
                out = span(stages[before[-1]]) if before else None
                if out:
                    outage = last[1] - out[0]
        elif first and all(s["action"] == "start_proxy" for s in stages[start_stage]):
            start_to_serving = first[1] - first[0]  # a proxy's start step waits until it answers
    return Readiness(op_s, start_step, start_to_serving, outage)


# --- the platform -------------------------------------------------------------------------------------


def run_op(p: Platform, *args: str) -> dict[str, Any]:
    """``orchestrator ARGS --wait``; the operation (``ops show --json``), which must have succeeded."""
    try:
        out = p.ok(*args, "--wait")
    except RuntimeError as exc:
        raise OpFailed(str(exc)) from None
    op = op_json(p, op_of(out))
    if op["state"] != "succeeded":
        raise OpFailed(f"operation {op['id']} {op['state']}: {op.get('error')}\n{json.dumps(op, indent=1)}")
    return op


class OpFailed(Exception):
    pass


def wait_ops(p: Platform, output: str, timeout: float = 120) -> None:
    """Every ``operation N`` an output names, followed to success."""
    for op_id in dict.fromkeys(re.findall(r"operation (\d+)", output)):
        op = wait_for(f"operation {op_id} ends", partial(op_json, p, op_id), timeout, every=0.2,
                      until=lambda o: o["state"] in ("succeeded", "failed"), retry=())
        if op["state"] != "succeeded":
            raise OpFailed(f"operation {op_id} failed: {op.get('error')}")


def proxy_containers(client: docker.DockerClient, env: str) -> list[Any]:
    return client.containers.list(all=True, filters={"label": [f"{LABEL_ENV}={env}",
                                                               f"{LABEL_SERVICE}=service-proxy"]})


class ProxyLogs:
    """Follows the logs of the env's proxy containers during a scenario (a container that is
    stopped and removed meanwhile, as in a proxy redeploy, keeps what it said)."""

    def __init__(self, client: docker.DockerClient, env: str) -> None:
        self.client, self.env = client, env
        self.lines: dict[str, list[str]] = {}
        self.since = int(time.time()) - 1
        self._streams: list[Any] = []
        for c in proxy_containers(client, env):
            self._follow(c)

    def _follow(self, container: Any) -> None:
        name = container.name or container.id
        self.lines[name] = []

        stream = container.logs(stream=True, follow=True, since=self.since, timestamps=True)
        self._streams.append(stream)

        def run() -> None:
            with suppress(Exception):
                for chunk in stream:
                    self.lines[name].extend(chunk.decode(errors="replace").splitlines())

        threading.Thread(target=run, daemon=True).start()

    def close(self) -> None:
        for stream in self._streams:
            with suppress(Exception):
                stream.close()

    def collect(self) -> dict[str, list[str]]:
        time.sleep(0.2)  # the followers catch up
        for c in proxy_containers(self.client, self.env):
            name = c.name or c.id
            if name not in self.lines:
                with suppress(Exception):
                    text = c.logs(since=self.since, timestamps=True).decode(errors="replace")
                    self.lines[name] = text.splitlines()
        return {k: list(v) for k, v in self.lines.items()}


# --- docker-compose -------------------------------------------------------------------------------------


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
    """The same app as a compose user runs it: one replica, host networking, the app listening
    on a fixed port from an environment variable; the image's options (init, limits, restart
    policy, command) copied from a container the platform made."""

    cmd: list[str]
    workdir: Path
    project: str
    env: str
    options: dict[str, Any]
    stop_timeout: int
    docker_url: str

    def write(self) -> None:
        opts = self.options
        web: dict[str, Any] = {
            "image": opts["image"],
            "network_mode": "host",
            "init": bool(opts["init"]),
            "restart": opts["restart"] or "no",
            "stop_grace_period": f"{self.stop_timeout}s",
            "environment": {"PORT": str(COMPOSE_PORT)},
            "labels": {LABEL_ENV: self.env, LABEL_SERVICE: "compose"},
        }
        if opts.get("entrypoint"):
            web["entrypoint"] = opts["entrypoint"]
        if opts.get("command"):
            web["command"] = [part.replace("$", "$$") for part in opts["command"]]  # compose interpolates $
        if opts.get("mem_limit"):
            web["mem_limit"] = opts["mem_limit"]
        if opts.get("memswap_limit"):
            web["memswap_limit"] = opts["memswap_limit"]
        if opts.get("nano_cpus"):
            web["cpus"] = opts["nano_cpus"] / 1e9
        # JSON is YAML: compose reads it as is.
        self.file.write_text(json.dumps({"version": "2.4", "services": {"web": web}}, indent=2) + "\n")

    @property
    def file(self) -> Path:
        return self.workdir / "compose.yaml"

    def run(self, *args: str, timeout: float = 120) -> None:
        argv = [*self.cmd, "-p", self.project, "-f", str(self.file), *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "DOCKER_HOST": self.docker_url})
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} -> exit {proc.returncode}: {proc.stderr[-2000:]}")

    def up(self) -> None:
        self.run("up", "-d")
        wait_for(f"compose replica listening on {COMPOSE_PORT}", lambda: accepts(COMPOSE_PORT), 30, every=0.05)

    def recreate(self) -> None:
        self.run("up", "-d", "--force-recreate", "-t", str(self.stop_timeout))

    def down(self) -> None:
        self.run("down", "-t", "0", "--remove-orphans")


def container_options(client: docker.DockerClient, env: str, svc: str) -> dict[str, Any]:
    """The options of a container the platform made, for the compose file."""
    found = client.containers.list(filters={"label": [f"{LABEL_ENV}={env}", f"{LABEL_SERVICE}={svc}"]})
    attrs = client.api.inspect_container(str(found[0].id))
    hc, cfg = attrs["HostConfig"], attrs["Config"]
    return {"image": cfg["Image"], "init": bool(hc.get("Init")), "restart": hc["RestartPolicy"]["Name"],
            "entrypoint": cfg.get("Entrypoint"), "command": cfg.get("Cmd"), "mem_limit": hc.get("Memory"),
            "memswap_limit": hc.get("MemorySwap"), "nano_cpus": hc.get("NanoCpus")}


# --- a scenario -----------------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    platform: Platform
    client: docker.DockerClient
    env: str
    http_port: int = 0
    compose: Compose | None = None

    def load(self, port: int, host_header: str) -> Load:
        a = self.args
        return Load(port, host_header, threads=a.threads, interval=a.interval, timeout=a.timeout,
                    max_seconds=a.lead + a.tail + a.max_change, max_requests=a.max_requests)

    def serving(self, port: int, host_header: str, timeout: float = 30) -> None:
        """Before a scenario: the target answers 2xx (a few in a row)."""
        probe = self.load(port, host_header)

        def three() -> bool:
            return all(probe.one().ok for _ in range(3))

        wait_for(f"127.0.0.1:{port} answering 2xx", three, timeout, every=0.2)

    def measure(self, name: str, rnd: int, port: int, host_header: str,
                change: Callable[[], dict[str, Any] | None], proxy: bool = True) -> Figures:
        fig = Figures(name, rnd)
        try:
            self.serving(port, host_header)
        except AssertionError as exc:
            fig.error = f"not serving before the change: {exc}"
            return fig
        logs = ProxyLogs(self.client, self.env) if proxy else None
        load = self.load(port, host_header)
        load.start()
        op = None
        try:
            time.sleep(self.args.lead)
            t_change, fig.change_at = time.monotonic(), time.time()
            try:
                op = change()
            except (OpFailed, RuntimeError, subprocess.TimeoutExpired) as exc:
                fig.error = str(exc)
            fig.change_s = time.monotonic() - t_change
            time.sleep(self.args.tail)
        finally:
            t_end = time.monotonic()
            samples = load.stop()
        summarise(fig, samples, t_change, t_end)
        if op is not None:
            fig.ready = readiness(op)
        if logs is not None:
            if fig.failed or fig.error:
                for container, lines in logs.collect().items():
                    fig.notes.append(f"docker logs {container} (during the scenario, {len(lines)} lines):")
                    fig.notes += [f"    {line}" for line in lines[-40:]] or ["    (nothing)"]
            logs.close()
        if fig.error and op is None:
            fig.notes.append(f"error: {fig.error}")
        return fig

    # --- the scenarios

    def round(self, rnd: int) -> list[Figures]:
        p, env, a = self.platform, self.env, self.args
        site = (self.http_port, SITE)

        def quiet() -> None:
            time.sleep(a.quiet)

        out = [self.measure(SCENARIOS[0], rnd, *site, quiet),
               self.measure(SCENARIOS[1], rnd, *site, lambda: run_op(p, "redeploy", env, "web"))]
        p.ok("services", "update", env, "web", "--overlap", str(a.overlap), "--support")
        try:
            out.append(self.measure(SCENARIOS[2].format(overlap=a.overlap), rnd, *site,
                                    lambda: run_op(p, "redeploy", env, "web")))
        finally:
            p.ok("services", "update", env, "web", "--overlap", "0", "--support")
        run_op(p, "scale", env, "web", "4")  # not measured
        out.append(self.measure(SCENARIOS[3], rnd, *site, lambda: run_op(p, "scale", env, "web", "2")))
        out.append(self.measure(SCENARIOS[4], rnd, *site, lambda: run_op(p, "redeploy", env, "service-proxy")))
        if self.compose is not None:
            compose = self.compose

            def recreate() -> None:
                compose.recreate()

            out.append(self.measure(SCENARIOS[5], rnd, COMPOSE_PORT, SITE, recreate, proxy=False))
        for fig in out:
            log(f"  round {rnd}: {fig.scenario:<28} {fig.requests:5d} requests, {fig.failed:4d} failed, "
                f"longest gap {fig.gap:.3f}s" + (f"  ERROR {fig.error.splitlines()[0][:150]}" if fig.error else ""))
        return out


# --- report ---------------------------------------------------------------------------------------------


def fnum(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None or x != x else format(x, fmt)


def table(figs: Sequence[Figures]) -> None:
    head = (f"  {'scenario':<28} {'requests':>8} {'failed':>6} {'longest gap s':>13} {'p50 ms':>7} "
            f"{'p99 ms':>7} {'change s':>8} {'job ready s':>11}")
    log(head)
    log("  " + "-" * (len(head) - 2))
    for f in figs:
        ready = f.ready.start_to_serving if f.ready else None
        gap = fnum(f.gap) + ("" if f.recovered else "+")
        log(f"  {f.scenario:<28} {f.requests:>8} {f.failed:>6} {gap:>13} {fnum(f.p50_ms, '.1f'):>7} "
            f"{fnum(f.p99_ms, '.1f'):>7} {fnum(f.change_s, '.2f'):>8} {fnum(ready, '.3f'):>11}")


def details(figs: Sequence[Figures]) -> None:
    for f in figs:
        bits = []
        if f.ready:
            r = f.ready
            bits.append(f"op {r.op_s:.2f}s")
            if r.start_step is not None:
                bits.append(f"start step (create, start, listening) {r.start_step:.3f}s")
            if r.start_to_serving is not None:
                bits.append(f"start -> in the proxy {r.start_to_serving:.3f}s")
            if r.outage is not None:
                bits.append(f"out of the proxy -> new jobs in {r.outage:.3f}s")
        began = datetime.fromtimestamp(f.change_at, UTC).strftime("%H:%M:%S.%f")[:-3]
        bits.append(f"change began {began} UTC")
        bits.append(f"longest gap began {fnum(f.gap_at, '+.3f')}s after the change began")
        if f.failed:
            kinds = ", ".join(f"{k} x{n}" for k, n in f.failures.most_common())
            span = f.failure_span or (0.0, 0.0)
            bits.append(f"failures: {kinds}, from {span[0]:+.3f}s to {span[1]:+.3f}s")
        if not f.recovered:
            bits.append("STILL FAILING when the load stopped (the gap runs to the end)")
        log(f"  r{f.round} {f.scenario}: " + "; ".join(bits))
        if f.error:
            log("    ERROR: " + f.error.replace("\n", "\n    ")[:4000])
        for note in f.notes:
            log(f"    {note}")


def verdict(figs: Sequence[Figures], overlap: int) -> str:
    """One line: zero failed requests with overlap; without, a gap no longer than the new job's
    start, taken as the time until it is ready for users (its start step begins -> the proxy
    takes it in). How much longer the gap is than the start step alone is shown too."""
    def by(name: str) -> list[Figures]:
        return [f for f in figs if f.scenario == name]

    over, plain = by(SCENARIOS[2].format(overlap=overlap)), by(SCENARIOS[1])
    over_failed = sum(f.failed for f in over)
    over_ok = over_failed == 0 and not any(f.error for f in over)
    pairs = [(f.gap, f.ready.start_step, f.ready.start_to_serving) for f in plain
             if f.ready and f.ready.start_to_serving is not None and f.ready.start_step is not None]
    gap_ok = bool(pairs) and all(g <= r for g, _, r in pairs) and not any(f.error for f in plain)
    gaps = "; ".join(f"gap {g:.3f}s vs ready {r:.3f}s (start step {s:.3f}s, gap {g - s:+.3f}s beyond it)"
                     for g, s, r in pairs) or "no figures"
    others = ", ".join(f"{name}: {sum(f.failed for f in by(name))} failed"
                       for name in (SCENARIOS[3], SCENARIOS[4], SCENARIOS[5]) if by(name))
    return (f"verdict: overlap redeploy: {over_failed} failed in {len(over)} round(s) (aim 0): "
            f"{'MET' if over_ok else 'NOT MET'}. No overlap: {gaps} (aim gap <= ready): "
            f"{'MET' if gap_ok else 'NOT MET'}. Also: {others}.")


# --- the run --------------------------------------------------------------------------------------------


def preflight(client: docker.DockerClient) -> None:
    client.ping()
    client.images.get(SAMPLE_IMAGE)  # missing: scripts/build-images
    busy = [port for port in [*range(PORTS[0], PORTS[0] + 10), *range(PORTS[1] - 49, PORTS[1] - 39), COMPOSE_PORT]
            if accepts(port)]
    if busy:
        raise SystemExit(f"ports already in use on 127.0.0.1: {busy[:10]}: stop what holds them first")


def setup(b: Bench, host: str, size: str) -> None:
    p, env, a = b.platform, b.env, b.args
    p.ok("hosts", "add", host, "--docker-url", a.docker_url, "--address", "127.0.0.1")
    p.start_node(host, timeout=60)
    wait_for(f"host {host} up", lambda: hosts_json(p).get(host, {}), 60, every=0.5,
             until=lambda row: row.get("state", "up") == "up", retry=())
    log(f"node {host} ready (log {p.logs[-1]})")
    out = p.ok("env", "create", env, "--sandbox")
    wait_ops(p, out)
    b.http_port = int(json.loads(p.ok("env", "show", env, "--json"))["proxy"]["http_port"])
    # exec: httpd, not a shell waiting on it, gets the stop signal (a shell would wait for SIGKILL)
    command = APP_COMMAND if not a.app_delay else f"sleep {a.app_delay:g} && exec {APP_COMMAND}"
    p.ok("services", "add", env, "web", "--type", "code", "--command", command, "--scale", "2", "--size", size)
    p.ok("services", "update", env, "web", "--health-path", "/health")
    run_op(p, "push", env, "web", SAMPLE_IMAGE)
    run_op(p, "sites", "add", env, SITE, "--service", "web")
    b.serving(b.http_port, SITE)
    log(f"environment {env}: proxy on 127.0.0.1:{b.http_port}, site {SITE} -> web (2 jobs of {size}, "
        f"`{command}`, health path /health)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the five scenarios (default 1)")
    parser.add_argument("--overlap", type=int, default=2, help="overlap of scenario 2, seconds (default 2)")
    parser.add_argument("--threads", type=int, default=4, help="load threads (default 4)")
    parser.add_argument("--interval", type=float, default=0.01,
                        help="seconds between one thread's requests (default 0.01: at most 100/s per thread)")
    parser.add_argument("--timeout", type=float, default=1.0, help="a request's timeout, seconds (default 1)")
    parser.add_argument("--lead", type=float, default=1.0, help="load before the change, seconds (default 1)")
    parser.add_argument("--tail", type=float, default=2.0,
                        help="load after the change's command returned, seconds (default 2)")
    parser.add_argument("--quiet", type=float, default=3.0,
                        help="the noise floor's window without a change, seconds (default 3)")
    parser.add_argument("--max-change", type=float, default=120.0,
                        help="the load stops by itself after lead + tail + this many seconds (default 120)")
    parser.add_argument("--max-requests", type=int, default=100_000, help="per scenario (default 100000)")
    parser.add_argument("--app-delay", type=float, default=0.0,
                        help="seconds the app sleeps before it listens (default 0), in both platform and compose")
    parser.add_argument("--size", default="64m:0.5", help="the web jobs' size (default 64m:0.5)")
    parser.add_argument("--stop-timeout", type=int, default=10,
                        help="SIGTERM->SIGKILL seconds, both sides (default 10)")
    parser.add_argument("--docker-url", default=os.environ.get("ORCH_BENCH_DOCKER_URL", DEFAULT_DOCKER_URL))
    parser.add_argument("--redis-db", type=int, default=11, help="flushed before and after (default 11)")
    parser.add_argument("--src", type=Path, default=ROOT,
                        help="tree whose orchestrator/ and workers/ run (default: this checkout)")
    parser.add_argument("--no-compose", action="store_true", help="skip docker-compose")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (catalogue, node log, compose file)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.threads < 1 or args.overlap < 1:
        parser.error("--rounds, --threads and --overlap must be at least 1")
    if args.app_delay:
        args.tail += args.app_delay  # compose returns before its replica listens

    client = docker.DockerClient(base_url=args.docker_url, version="auto")
    preflight(client)
    suffix = uuid.uuid4().hex[:6]
    env = host = f"dt{suffix}"
    workdir = Path(tempfile.mkdtemp(prefix="orch-downtime-"))
    settings = PlatformEnv(f"sqlite:///{workdir / 'catalogue.db'}", args.redis_db, PORTS,
                           stop_timeout=args.stop_timeout, start_timeout=30, result_backend="",
                           extra=(("ORCH_PORT_MAX", str(JOB_PORT_MAX)),))
    proxy_dir_existed = Path(settings.proxy_dir).exists()
    platform = Platform(settings, workdir, args.src.resolve())
    bench = Bench(args, platform, client, env)
    figures: list[Figures] = []
    try:
        with terminated_as_exit():
            settings.flush()
            log(f"platform: catalogue {workdir / 'catalogue.db'}, redis db {args.redis_db}, jobs' ports "
                f"{PORTS[0]}-{JOB_PORT_MAX}, proxies' {settings.proxy_ports[0]}-{settings.proxy_ports[1]}, "
                f"code from {platform.src}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
            setup(bench, host, args.size)
            cmd = None if args.no_compose else compose_command()
            if cmd is None:
                log("docker-compose: " + ("skipped" if args.no_compose else "not available, skipped"))
            else:
                bench.compose = Compose(cmd, workdir, f"orchdt{suffix}", env, container_options(client, env, "web"),
                                        args.stop_timeout, args.docker_url)
                bench.compose.write()
                bench.compose.up()
                log(f"docker-compose: 1 replica on 127.0.0.1:{COMPOSE_PORT} (project {bench.compose.project}, "
                    f"{bench.compose.file})")
            log(f"load: {args.threads} threads, one request each every {args.interval:g}s at most, a new TCP "
                f"connection each, timeout {args.timeout:g}s; {args.lead:g}s before the change, "
                f"{args.tail:g}s after its command returned")
            for rnd in range(1, args.rounds + 1):
                figures += bench.round(rnd)
            report(figures, args)
        return 0 if not any(f.error for f in figures) else 1
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}): cleaning up")
        return 130
    finally:
        cleanup(bench, workdir, proxy_dir_existed, keep=args.keep)


def report(figures: Sequence[Figures], args: argparse.Namespace) -> None:
    log("")
    log(f"Downtime under load, {args.rounds} round(s); {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} now. failed = non-2xx, connection error or timeout ({args.timeout:g}s);")
    log("longest gap = the longest time between two successful responses ('+': still failing at the end);")
    log("p50/p99 = latency of the successful requests; change s = the command (CLI --wait, or compose up);")
    log("job ready s = from the operation's steps: the first new job's start step begins -> the proxy takes")
    log("the new jobs in (they passed its health check); for the proxy's redeploy, its start step.")
    for rnd in range(1, args.rounds + 1):
        log(f"round {rnd}:")
        table([f for f in figures if f.round == rnd])
    if args.rounds > 1:
        log("median over rounds:")
        merged = []
        for name in dict.fromkeys(f.scenario for f in figures):
            xs = [f for f in figures if f.scenario == name]
            m = Figures(name, 0, requests=int(median([f.requests for f in xs])),
                        failed=int(median([f.failed for f in xs])), gap=median([f.gap for f in xs]),
                        p50_ms=median([f.p50_ms for f in xs]), p99_ms=median([f.p99_ms for f in xs]),
                        change_s=median([f.change_s for f in xs]))
            readies = [f.ready.start_to_serving for f in xs if f.ready and f.ready.start_to_serving is not None]
            if readies:
                m.ready = Readiness(float("nan"), None, median(readies), None)
            m.recovered = all(f.recovered for f in xs)
            merged.append(m)
        table(merged)
    log("")
    log("details (seconds after the change's command began):")
    details(figures)
    log("")
    log(verdict(figures, args.overlap))


def cleanup(b: Bench, workdir: Path, proxy_dir_existed: bool, keep: bool) -> None:
    """Undo everything, each part on its own so one failure does not skip the rest."""
    client, env, compose = b.client, b.env, b.compose

    def compose_leftovers() -> None:
        if compose is None:
            return
        for found in client.api.containers(all=True, filters={"label": f"{LABEL_PROJECT}={compose.project}"}):
            with suppress(docker.errors.NotFound):
                client.api.remove_container(found["Id"], force=True, v=True)
        for net in client.networks.list(filters={"label": f"{LABEL_PROJECT}={compose.project}"}):
            net.remove()

    def proxy_dir() -> None:
        if not proxy_dir_existed:
            shutil.rmtree(b.platform.env.proxy_dir, ignore_errors=True)

    steps: list[tuple[str, Callable[[], object]]] = [
        ("node", b.platform.stop_nodes),
        ("compose", compose.down if compose else (lambda: None)),
        ("compose leftovers", compose_leftovers),
        ("containers", lambda: remove_containers(client, env)),
        ("redis", b.platform.env.flush),
        ("proxy dir", proxy_dir),
    ]
    undo_all(steps, workdir, keep=keep, clients=[client])


if __name__ == "__main__":
    sys.exit(main())
