"""Build benchmark: push-to-serving time of a Dockerfile app, through the platform and by hand.

    .venv/bin/python benchmarks/build.py [--rounds 3]

Sets up a throwaway platform (temp SQLite catalogue, Redis database 12, ports 31250-31499: the
platform's jobs 31250-31339, those of the platform without a registry 31340-31429, the by-hand
container 31440, the registry 31495), the platform's registry (`orchestrator registry run`, Debian's
docker-registry, its data in the temp dir), one host on the local dockerd and its node. Then, each
round, with an app directory (a Dockerfile: `FROM orch/busybox:1`, a dependency layer `RUN` with a
marker new to the build cache that writes a few MB and sleeps, standing for a dependency install,
then `COPY www /www`, busybox httpd on $PORT), it times from the start of the command until the new
code answers HTTP 200 on its port on 127.0.0.1 (push-to-serving):

  platform, cold     `orchestrator push ENV web ./app --wait`, the dependency layer new
  platform, warm     the same again with only www/index.html changed (the layers above it cached)
  by hand, cold      `docker build --network host -t TAG ./app`, `docker rm -f NAME` (the previous
                     round's container, as the platform stops its previous job), then
                     `docker run -d --name NAME --network host -e PORT=31440 TAG`
  by hand, warm      the same with only www/index.html changed

and, unless --no-local, the platform's two scenarios once more on a second platform without
ORCH_REGISTRY (its builds stay local: no push, no pull). Every side has its own markers, so no side
is served by another side's cache. It prints each scenario's median and rounds, the platform's
overhead over by hand, the CLI's own start-up (`orchestrator --help`), and where the platform's
time goes, from the operation's step timestamps (`ops show OP --json`). Everything it made
(containers labelled orchestrator.env=<env> and the by-hand one, image tags under
127.0.0.1:31495/, orch-build/<env>/ and the by-hand tags, the node, the registry, Redis database
12, the temp dir) is removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the test harness runs the platform here too

from redeploy import terminated_as_exit, undo_all  # noqa: E402

from tests.harness import (  # noqa: E402
    BUSYBOX_IMAGE,
    DEFAULT_DOCKER_URL,
    LABEL_ENV,
    Platform,
    PlatformEnv,
    orchestrator,
    remove_containers,
    start_process,
    stop_process,
    wait_for,
)
from tests.helpers import hosts_json, jobs_json, op_json, op_of, ts  # noqa: E402

PORTS = (31250, 31499)  # PlatformEnv: jobs from the low end, the proxies' range in the last 50 (unused here)
REG_JOB_PORTS = (31250, 31339)  # the platform with the registry
LOCAL_JOB_PORTS = (31340, 31429)  # the platform without
HAND_PORT = 31440  # the by-hand container
REGISTRY_PORT = 31495
REGISTRY = f"127.0.0.1:{REGISTRY_PORT}"
LOCAL_REPOSITORY = "orch-build"  # where the platform's builds go without a registry (orchestrator.builds)
POLL_HOST = "127.0.0.1"  # the only address polled
POLL_EVERY = 0.02
STARTUP_RUNS = 3  # `orchestrator --help` runs per round
CMD = '["sh", "-c", "exec httpd -f -p $PORT -h /www"]'
BUILT = re.compile(r"(?:---> |Successfully built )([0-9a-f]{12})\b")  # image ids in a build's output


def log(msg: str = "") -> None:
    print(msg, flush=True)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fnum(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None or x != x else format(x + 0.0, fmt).replace("-0.00", "0.00")


def answers(port: int, marker: str | None = None, timeout: float = 1.0) -> bool:
    """GET / on 127.0.0.1:PORT answers 200 (with ``marker`` in its body)."""
    conn = http.client.HTTPConnection(POLL_HOST, port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        return resp.status == 200 and (marker is None or marker in body)
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def port_free(port: int) -> bool:
    try:
        with socket.create_connection((POLL_HOST, port), timeout=0.2):
            return False
    except OSError:
        return True


# --- waiting for the new code to answer -------------------------------------------------------------


class Serving:
    """Polls, from the moment it starts, the running containers a Docker filter names (the env's
    label, or the by-hand container's name): each one's PORT (from its config) gets GET / on
    127.0.0.1 every 20 ms until one answers 200 with ``marker`` (the new code) in its body. Both
    sides are found and polled the same way, so the polling costs the same on both."""

    def __init__(self, docker_url: str, filters: dict[str, str], marker: str) -> None:
        self.client = docker.DockerClient(base_url=docker_url, version="auto", timeout=30)
        self.filters, self.marker = {**filters, "status": "running"}, marker
        self.at: float | None = None  # time.time() of the first good answer
        self.port: int | None = None
        self._ports: dict[str, int | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _candidates(self) -> list[int]:
        ports = []
        for found in self.client.api.containers(filters=self.filters):
            cid = found["Id"]
            if cid not in self._ports:
                try:
                    env = self.client.api.inspect_container(cid)["Config"].get("Env") or []
                except docker.errors.NotFound:
                    continue
                port = next((v for k, _, v in (e.partition("=") for e in env) if k == "PORT"), None)
                self._ports[cid] = int(port) if port else None
            if self._ports[cid]:
                ports.append(self._ports[cid])
        return [p for p in ports if p is not None]

    def _run(self) -> None:
        while not self._stop.is_set():
            with suppress(Exception):  # a container going away while listed: next time
                for port in self._candidates():
                    if answers(port, self.marker, timeout=0.5):
                        self.at, self.port = time.time(), port
                        return
            self._stop.wait(POLL_EVERY)

    def wait(self, timeout: float) -> float | None:
        self._thread.join(timeout)
        self._stop.set()
        self._thread.join(5)
        self.client.close()
        return self.at


# --- one push ------------------------------------------------------------------------------------------


@dataclass
class Push:
    scenario: str
    round: int
    total: float = float("nan")  # push-to-serving: command start -> the new code answers 200
    command: float = float("nan")  # command start -> its (last) process exits
    phases: dict[str, float] = field(default_factory=dict)  # where the time went
    error: str | None = None


@dataclass
class App:
    """An app directory: a Dockerfile with a dependency layer, and the code (www/index.html)."""

    path: Path
    deps_mb: int
    deps_sleep: float

    def write(self, deps_marker: str, code_marker: str) -> None:
        (self.path / "www").mkdir(parents=True, exist_ok=True)
        self.path.joinpath("Dockerfile").write_text(
            f"FROM {BUSYBOX_IMAGE}\n"
            f"RUN echo 'dependencies {deps_marker}' > /deps.txt"
            f" && dd if=/dev/urandom of=/deps.bin bs=1M count={self.deps_mb} 2>/dev/null"
            f" && sleep {self.deps_sleep:g}\n"
            "COPY www /www\n"
            f"CMD {CMD}\n")
        self.code(code_marker)

    def code(self, code_marker: str) -> None:
        (self.path / "www" / "index.html").write_text(f"<p>{code_marker}</p>\n")


@dataclass
class Side:
    """One platform: its processes, environment and app."""

    label: str  # "registry" or "no registry"
    platform: Platform
    env: str
    host: str
    app: App
    docker_url: str
    cli_startup: list[float] = field(default_factory=list)  # per round: the median of STARTUP_RUNS

    def sent_at(self, op_id: int) -> float | None:
        """When the operation was sent to the broker: the catalogue keeps it (``sent_at``), ``ops
        show`` does not show it. Read from the SQLite file, read-only."""
        path = self.platform.env.database_url.removeprefix("sqlite:///")
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            try:
                row = conn.execute("SELECT sent_at FROM operation WHERE id = ?", (op_id,)).fetchone()
            finally:
                conn.close()
        except sqlite3.Error:
            return None
        return ts(row[0]).timestamp() if row and row[0] else None

    def push(self, scenario: str, rnd: int, code_marker: str, logfile: Path, timeout: float) -> Push:
        p, fig = self.platform, Push(scenario, rnd)
        serving = Serving(self.docker_url, {"label": f"{LABEL_ENV}={self.env}"}, code_marker)
        serving.start()
        t0 = time.time()
        try:
            with logfile.open("w") as out:
                code = subprocess.run(orchestrator("push", self.env, "web", str(self.app.path), "--wait"),
                                      env=p.environ, cwd=p.workdir, stdout=out, stderr=subprocess.STDOUT,
                                      timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
        t_exit = time.time()
        fig.command = t_exit - t0
        output = logfile.read_text(errors="replace")
        if code != 0:
            serving.wait(0)
            fig.error = f"push {'timed out' if code is None else f'exited {code}'}: {output[-3000:]}"
            return fig
        served = serving.wait(timeout=30)
        if served is None:
            fig.error = f"the new code did not answer 200 within 30 s of the push's end; push output: {output[-2000:]}"
            return fig
        fig.error = cache_check(scenario, output)
        fig.total = served - t0
        op = op_json(p, op_of(output))
        if op["state"] != "succeeded":
            fig.error = f"operation {op['id']} {op['state']}: {op.get('error')}"
            return fig
        fig.phases = platform_phases(op, self.sent_at(op["id"]), t0, t_exit, served)
        if self.cli_startup:
            fig.phases[CLI_STARTUP] = self.cli_startup[-1]  # measured this round, just before the pushes
        running = [j for j in jobs_json(p, self.env, "web") if j["state"] == "running"]
        ports = sorted(j["port"] for j in running)
        if ports != [serving.port]:  # the catalogue's job is the one that answered
            fig.error = f"jobs list says ports {ports}, the new code answered on {serving.port}"
        return fig


def cache_check(scenario: str, output: str) -> str | None:
    """The build did what the scenario says: cold, no layer from the cache (the dependency layer
    is new); warm, the dependency layer from the cache (the legacy builder says `Using cache`)."""
    hits = output.count("Using cache")
    if scenario.endswith("cold") and hits:
        return f"a cold build took {hits} layer(s) from the cache"
    if scenario.endswith("warm") and not hits:
        return "a warm build took nothing from the cache"
    return None


STEP_PHASES = {"build": "build step (docker build, push)", "check_image": "check image step",
               "stop": "stop step (the previous job)", "start": "start step (create, start, listening)"}
CLI_STARTUP = "  of which CLI start-up (`orchestrator --help`)"


def platform_phases(op: dict[str, Any], sent: float | None, t0: float, t_exit: float,
                    served: float) -> dict[str, float]:
    """Where a push's time went, in seconds, from the operation's timestamps (``sent``: when the
    operation's chain went to the broker, from the catalogue) and the command's. The steps run
    one after the other (one host, one job), so the phases add up to the total."""
    created, began = ts(op["created_at"]).timestamp(), ts(op["started_at"]).timestamp()
    finished = ts(op["finished_at"]).timestamp()
    steps = sorted((s for s in op["steps"] if s["started_at"] and s["finished_at"]),
                   key=lambda s: (s["stage"], s["started_at"]))
    phases = {"CLI start -> operation recorded (tar, request)": created - t0,
              "recorded -> operation started (claimed)": began - created}
    if steps and sent is not None:
        phases["started -> sent (plan, record, send to the broker)"] = sent - began
        phases["sent -> first step runs (broker, node)"] = ts(steps[0]["started_at"]).timestamp() - sent
    elif steps:
        phases["started -> first step runs (plan, send, node)"] = ts(steps[0]["started_at"]).timestamp() - began
    between, last_end = 0.0, None
    for s in steps:
        start, end = ts(s["started_at"]).timestamp(), ts(s["finished_at"]).timestamp()
        key = STEP_PHASES.get(s["action"], f"{s['action']} step")
        phases[key] = phases.get(key, 0.0) + end - start
        if last_end is not None:
            between += max(0.0, start - last_end)
        last_end = end if last_end is None else max(last_end, end)
    if steps:
        phases["between steps (finish one, send the next)"] = between
        phases["last step -> operation finished"] = finished - (last_end or finished)
    phases["operation finished -> CLI exits"] = t_exit - finished
    phases["CLI exits -> 200 seen (negative: seen before)"] = served - t_exit
    return phases


PHASE_ORDER = ["CLI start -> operation recorded (tar, request)", CLI_STARTUP,
               "recorded -> operation started (claimed)", "started -> sent (plan, record, send to the broker)",
               "sent -> first step runs (broker, node)", "started -> first step runs (plan, send, node)",
               *STEP_PHASES.values(), "between steps (finish one, send the next)",
               "last step -> operation finished", "operation finished -> CLI exits",
               "CLI exits -> 200 seen (negative: seen before)"]


@dataclass
class Hand:
    """The same app built and run with the docker CLI."""

    app: App
    name: str  # the container's name
    repository: str  # its images' repository (a tag per build)
    docker_url: str

    def push(self, scenario: str, tag: str, rnd: int, code_marker: str, logfile: Path, timeout: float) -> Push:
        fig = Push(scenario, rnd)
        denv = {**os.environ, "DOCKER_HOST": self.docker_url}
        image = f"{self.repository}:{tag}"
        serving = Serving(self.docker_url, {"name": f"^/{self.name}$"}, code_marker)
        serving.start()
        t0 = time.time()
        marks = [t0]
        with logfile.open("w") as out:
            for argv, check in ((["docker", "build", "--network", "host", "-t", image, str(self.app.path)], True),
                                (["docker", "rm", "-f", self.name], False),
                                (["docker", "run", "-d", "--name", self.name, "--network", "host",
                                  "-e", f"PORT={HAND_PORT}", image], True)):
                out.write(f"$ {' '.join(argv)}\n")
                out.flush()
                try:
                    code = subprocess.run(argv, env=denv, stdout=out, stderr=subprocess.STDOUT,
                                          timeout=timeout).returncode
                except subprocess.TimeoutExpired:
                    code = None
                marks.append(time.time())
                if code is None or (check and code != 0):
                    serving.wait(0)
                    fig.error = (f"{' '.join(argv)} {'timed out' if code is None else f'exited {code}'}: "
                                 f"{logfile.read_text(errors='replace')[-3000:]}")
                    return fig
        served = serving.wait(timeout=30)
        fig.command = marks[-1] - t0
        if served is None:
            fig.error = "the new code did not answer 200 within 30 s of `docker run`"
            return fig
        fig.error = cache_check(scenario, logfile.read_text(errors="replace"))
        fig.total = served - t0
        fig.phases = {"docker build": marks[1] - marks[0], "docker rm -f (previous container)": marks[2] - marks[1],
                      "docker run -d": marks[3] - marks[2], "run returns -> 200 seen": served - marks[3]}
        return fig


# --- setup and cleanup -------------------------------------------------------------------------------


def preflight(client: docker.DockerClient) -> None:
    client.ping()
    client.images.get(BUSYBOX_IMAGE)  # missing: scripts/build-images
    for tool in ("docker", "docker-registry"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    ports = [*range(REG_JOB_PORTS[0], REG_JOB_PORTS[0] + 5), *range(LOCAL_JOB_PORTS[0], LOCAL_JOB_PORTS[0] + 5),
             HAND_PORT, REGISTRY_PORT]
    busy = [port for port in ports if not port_free(port)]
    if busy:
        raise SystemExit(f"ports already in use on 127.0.0.1: {busy}: stop what holds them first")


def start_registry(workdir: Path, environ: dict[str, str]) -> subprocess.Popen[bytes]:
    """`orchestrator registry run` (it execs docker-registry: the same pid), ready when /v2/ answers."""
    def ready(_log: str) -> bool:
        conn = http.client.HTTPConnection(POLL_HOST, REGISTRY_PORT, timeout=1)
        try:
            conn.request("GET", "/v2/")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    return start_process(orchestrator("registry", "run", "--port", str(REGISTRY_PORT), "--data",
                                      str(workdir / "registry")),
                         environ, workdir / "registry.log", ready, timeout=30, cwd=workdir)


def setup_side(side: Side) -> None:
    p = side.platform
    p.ok("hosts", "add", side.host, "--docker-url", side.docker_url, "--address", "127.0.0.1")
    p.start_node(side.host, timeout=60)
    wait_for(f"host {side.host} up", lambda: hosts_json(p).get(side.host, {}), 60, every=0.5,
             until=lambda row: row.get("state", "up") == "up", retry=())
    p.ok("env", "create", side.env, "--sandbox", "--no-defaults")
    p.ok("services", "add", side.env, "web", "--type", "code", "--scale", "1")
    log(f"  {side.label}: host {side.host} (node log {p.logs[-1]}), env {side.env}, service web (scale 1), "
        f"jobs' ports {p.env.variables()['ORCH_PORT_MIN']}-{p.env.variables()['ORCH_PORT_MAX']}")


def cli_startup(p: Platform, runs: int) -> list[float]:
    """Seconds of ``orchestrator --help`` (the same ``python -m orchestrator.cli`` as the pushes),
    ``runs`` times: Python's start-up and the CLI's imports, no catalogue, no broker."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(orchestrator("--help"), env=p.environ, cwd=p.workdir, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return times


def owned_ref(ref: str, prefixes: Sequence[str]) -> bool:
    return any(ref.startswith(prefix) for prefix in prefixes)


def remove_images(client: docker.DockerClient, prefixes: Sequence[str]) -> int:
    """Remove the image references (tags, digests) that start with one of ``prefixes``: an image
    only we name goes by its id (its untagged parents, our builds' layers, go with it); one that
    others name too loses only our names. How many images were touched."""
    touched = 0
    for image in client.api.images():
        refs = [r for r in (image.get("RepoTags") or []) + (image.get("RepoDigests") or [])
                if not r.startswith("<none>")]
        ours = [r for r in refs if owned_ref(r, prefixes)]
        if not ours:
            continue
        touched += 1
        if len(ours) == len(refs):
            with suppress(docker.errors.NotFound):
                client.api.remove_image(image["Id"], force=True)
        else:
            for ref in ours:
                with suppress(docker.errors.NotFound):
                    client.api.remove_image(ref)
    return touched


# --- report ---------------------------------------------------------------------------------------------


def ordered(phases: dict[str, float]) -> list[tuple[str, float]]:
    """The phases in PHASE_ORDER, then any others as they came."""
    return ([(k, phases[k]) for k in PHASE_ORDER if k in phases]
            + [(k, v) for k, v in phases.items() if k not in PHASE_ORDER])


def report(figs: Sequence[Push], sides: Sequence[Side], args: argparse.Namespace) -> None:
    def of(name: str) -> list[Push]:
        return [f for f in figs if f.scenario == name and f.error is None]

    names = list(dict.fromkeys(f.scenario for f in figs))
    log("")
    log(f"Push-to-serving, {args.rounds} round(s); {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} now. Seconds from the start of the command until")
    log("the new code answers HTTP 200 on its port (127.0.0.1, polled every 20 ms); 'command' = until the")
    log(f"command (by hand: the last of build, rm, run) returned. App: a {args.deps_mb} MB + sleep "
        f"{args.deps_sleep:g} s dependency layer, then the code.")
    head = f"  {'scenario':<30} {'median':>7}   {'rounds':<24} {'command (median)':>16}"
    log(head)
    log("  " + "-" * (len(head) - 2))
    for name in names:
        xs = of(name)
        rounds = " ".join(fnum(f.total) for f in xs)
        failed = sum(1 for f in figs if f.scenario == name and f.error)
        log(f"  {name:<30} {fnum(median([f.total for f in xs])):>7}   {rounds:<24} "
            f"{fnum(median([f.command for f in xs])):>16}" + (f"   ({failed} failed)" if failed else ""))
    log("")
    log("the platform's overhead over by hand (median - median; ratio of medians; per round):")
    for side in sides:
        for kind in ("cold", "warm"):
            plat, hand = of(f"platform ({side.label}), {kind}"), of(f"by hand, {kind}")
            if not plat or not hand:
                continue
            mp, mh = median([f.total for f in plat]), median([f.total for f in hand])
            per_round = {f.round: f.total for f in hand}
            diffs = " ".join(f"{f.total - per_round[f.round]:+.2f}" for f in plat if f.round in per_round)
            log(f"  {side.label}, {kind}: {mp - mh:+.2f} s, x{mp / mh:.2f}   (rounds: {diffs})")
    startup = sides[0].cli_startup
    log(f"CLI start-up (`orchestrator --help`, {STARTUP_RUNS} runs before each round's pushes): median of the rounds' "
        f"medians {fnum(median(startup))} s ({' '.join(fnum(x) for x in startup)})")
    log("")
    log("where the time goes (median over rounds, seconds; the platform's from `ops show --json` step times):")
    for group in ([n for n in names if n.startswith("platform")], [n for n in names if n.startswith("by hand")]):
        if not group:
            continue
        keys = [k for k, _ in ordered({k: 0.0 for n in group for f in of(n) for k in f.phases})]
        cols = [n.replace("platform (", "").replace("), ", " ").replace("by hand, ", "") for n in group]
        width = max(len(k) for k in keys) if keys else 20
        log(f"  {'':<{width}} " + " ".join(f"{c:>16}" for c in cols))
        for key in keys:
            vals = [median([f.phases[key] for f in of(n) if key in f.phases]) for n in group]
            log(f"  {key:<{width}} " + " ".join(f"{fnum(v):>16}" for v in vals))
        log(f"  {'= push-to-serving':<{width}} " + " ".join(f"{fnum(median([f.total for f in of(n)])):>16}"
                                                         for n in group))
    log("")
    log("each round, the same phases in the same order (the 'of which' line in brackets, '-': none):")
    seen = [k for k in PHASE_ORDER if any(k in f.phases for f in figs)]
    for f in figs:
        if f.phases:
            keys = seen if set(f.phases) & set(PHASE_ORDER) else list(f.phases)
            cells = [("-" if k not in f.phases else f"[{fnum(f.phases[k])}]" if k == CLI_STARTUP
                      else fnum(f.phases[k])) for k in keys]
            log(f"  r{f.round} {f.scenario + ':':<31} {' '.join(cells)} = {f.total:.2f}")
    errors = [f for f in figs if f.error]
    if errors:
        log("")
        log("errors:")
        for f in errors:
            log(f"  r{f.round} {f.scenario}: {f.error}")


# --- the run --------------------------------------------------------------------------------------------


def run_round(rnd: int, sides: Sequence[Side], hand: Hand, suffix: str, workdir: Path,
              args: argparse.Namespace) -> list[Push]:
    out: list[Push] = []
    startup = cli_startup(sides[0].platform, STARTUP_RUNS)
    log(f"  round {rnd}: CLI start-up (`orchestrator --help`) {' '.join(f'{x:.2f}' for x in startup)} s")
    for side in sides:
        side.cli_startup.append(median(startup))
    for side in sides:
        tag = "reg" if side.label == "registry" else "loc"
        side.app.write(f"{tag}-{suffix}-r{rnd}", f"{tag} {suffix} r{rnd} cold")
        out.append(side.push(f"platform ({side.label}), cold", rnd, f"{tag} {suffix} r{rnd} cold",
                             workdir / f"push-{tag}-r{rnd}-cold.log", args.timeout))
        side.app.code(f"{tag} {suffix} r{rnd} warm")
        out.append(side.push(f"platform ({side.label}), warm", rnd, f"{tag} {suffix} r{rnd} warm",
                             workdir / f"push-{tag}-r{rnd}-warm.log", args.timeout))
    hand.app.write(f"hand-{suffix}-r{rnd}", f"hand {suffix} r{rnd} cold")
    out.append(hand.push("by hand, cold", f"r{rnd}-cold", rnd, f"hand {suffix} r{rnd} cold",
                         workdir / f"hand-r{rnd}-cold.log", args.timeout))
    hand.app.code(f"hand {suffix} r{rnd} warm")
    out.append(hand.push("by hand, warm", f"r{rnd}-warm", rnd, f"hand {suffix} r{rnd} warm",
                         workdir / f"hand-r{rnd}-warm.log", args.timeout))
    for f in out:
        log(f"  round {rnd}: {f.scenario:<30} {fnum(f.total):>6} s (command {fnum(f.command)} s)"
            + (f"  ERROR {f.error.splitlines()[0][:200]}" if f.error else ""))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every scenario (default 3)")
    parser.add_argument("--deps-mb", type=int, default=4, help="MB the dependency layer writes (default 4)")
    parser.add_argument("--deps-sleep", type=float, default=1.0,
                        help="seconds the dependency layer sleeps, standing for an install (default 1)")
    parser.add_argument("--no-local", action="store_true",
                        help="skip the second platform without ORCH_REGISTRY (builds kept local)")
    parser.add_argument("--timeout", type=float, default=180, help="a command's timeout, seconds (default 180)")
    parser.add_argument("--docker-url", default=os.environ.get("ORCH_BENCH_DOCKER_URL", DEFAULT_DOCKER_URL))
    parser.add_argument("--redis-db", type=int, default=12, help="flushed before and after (default 12)")
    parser.add_argument("--src", type=Path, default=ROOT,
                        help="tree whose orchestrator/ and workers/ run (default: this checkout)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (catalogues, logs, build outputs)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.deps_mb < 0:
        parser.error("--rounds must be at least 1, --deps-mb at least 0")

    client = docker.DockerClient(base_url=args.docker_url, version="auto")
    preflight(client)
    suffix = uuid.uuid4().hex[:6]
    workdir = Path(tempfile.mkdtemp(prefix="orch-build-bench-"))
    sides: list[Side] = []
    wanted: list[tuple[str, tuple[int, int], tuple[tuple[str, str], ...]]] = [
        ("registry", REG_JOB_PORTS, (("ORCH_REGISTRY", REGISTRY),))]
    if not args.no_local:
        wanted.append(("no registry", LOCAL_JOB_PORTS, ()))
    for label, ports, extra in wanted:
        tag = "r" if label == "registry" else "l"
        settings = PlatformEnv(f"sqlite:///{workdir / f'catalogue-{tag}.db'}", args.redis_db, PORTS,
                               start_timeout=30, result_backend="",
                               extra=(*extra, ("ORCH_PORT_MIN", str(ports[0])), ("ORCH_PORT_MAX", str(ports[1]))))
        pdir = workdir / f"platform-{tag}"
        pdir.mkdir()
        sides.append(Side(label, Platform(settings, pdir, args.src.resolve()), f"bb{tag}{suffix}",
                          f"bb{tag}{suffix}", App(workdir / f"app-{tag}", args.deps_mb, args.deps_sleep),
                          args.docker_url))
    hand = Hand(App(workdir / "app-hand", args.deps_mb, args.deps_sleep), f"orch-bench-build-{suffix}",
                f"orch-bench-build-{suffix}", args.docker_url)
    dirs_existed = {d: Path(d).exists() for d in (sides[0].platform.env.proxy_dir,
                                                  sides[0].platform.env.variables()["ORCH_GIT_DIR"])}
    images_before = {i["Id"] for i in client.api.images(all=True)}
    registry: subprocess.Popen[bytes] | None = None
    figs: list[Push] = []
    try:
        with terminated_as_exit():
            sides[0].platform.env.flush()
            log(f"build benchmark {suffix}: temp dir {workdir}, redis db {args.redis_db}, code from "
                f"{sides[0].platform.src}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
            registry = start_registry(workdir, sides[0].platform.environ)
            log(f"  registry on {REGISTRY} (pid {registry.pid}, data {workdir / 'registry'})")
            for side in sides:
                setup_side(side)
            log(f"  by hand: container {hand.name} on port {HAND_PORT}, tags {hand.repository}:r<N>-cold|warm")
            for rnd in range(1, args.rounds + 1):
                figs += run_round(rnd, sides, hand, suffix, workdir, args)
            report(figs, sides, args)
        return 0 if not any(f.error for f in figs) else 1
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}): cleaning up")
        return 130
    finally:
        cleanup(client, sides, hand, registry, workdir, dirs_existed, images_before, args.keep)


def cleanup(client: docker.DockerClient, sides: Sequence[Side], hand: Hand, registry: subprocess.Popen[bytes] | None,
            workdir: Path, dirs_existed: dict[str, bool], images_before: set[str], keep: bool) -> None:
    """Undo everything, each part on its own so one failure does not skip the rest."""
    prefixes = [f"{REGISTRY}/", f"{hand.repository}:", f"{hand.repository}@",
                *(f"{LOCAL_REPOSITORY}/{side.env}/" for side in sides)]

    def hand_container() -> None:
        with suppress(docker.errors.NotFound):
            client.api.remove_container(hand.name, force=True, v=True)

    def dirs() -> None:
        for d, existed in dirs_existed.items():
            if not existed:
                shutil.rmtree(d, ignore_errors=True)

    def leftovers() -> None:
        """The images our builds made (their IDs in the build outputs) that are still there and
        untagged (a layer whose child went elsewhere): removed too."""
        ids: set[str] = set()
        for logfile in workdir.glob("*.log"):
            ids.update(BUILT.findall(logfile.read_text(errors="replace")))
        left = 0
        for short in sorted(ids):
            try:
                attrs = client.api.inspect_image(short)  # type: ignore[no-untyped-call]
            except docker.errors.NotFound:
                continue
            if attrs["Id"] in images_before or attrs.get("RepoTags"):
                continue
            left += 1
            with suppress(docker.errors.NotFound, docker.errors.APIError):
                client.api.remove_image(attrs["Id"])
        if left:
            log(f"cleanup: {left} untagged image(s) of our builds were left, removed")

    steps: list[tuple[str, Callable[[], object]]] = [
        *((f"node {side.host}", side.platform.stop_nodes) for side in sides),
        ("containers", lambda: remove_containers(client, *(side.env for side in sides))),
        ("by-hand container", hand_container),
        ("images", lambda: remove_images(client, prefixes)),
        ("registry", lambda: stop_process(registry) if registry is not None else None),
        ("redis", sides[0].platform.env.flush),
        ("dirs", dirs),
        ("leftovers", leftovers),
    ]
    undo_all(steps, workdir, keep=keep, clients=[client])


if __name__ == "__main__":
    sys.exit(main())
