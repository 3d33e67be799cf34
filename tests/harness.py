"""Run a platform in processes, for the e2e tests and the benchmarks: its ORCH_* environment
(``PlatformEnv``), its node processes (``Platform``), any other platform process
(``platform_process``), the one way to stop a process (``stop_process``), a Docker daemon of
its own as a second host (``Daemon``), and polling (``wait_for``).

Nothing here imports the platform: a benchmark may run another tree's code (its --src) in the
processes it starts.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import docker
import redis
import sqlalchemy

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"
SAMPLE_IMAGE = "orch/sample-app:1"
BUSYBOX_IMAGE = "orch/busybox:1"
HTTPD = "httpd -f -p $PORT -h /var/www"  # the sample image's web server, on the job's port
LABEL_ENV = "orchestrator.env"  # the spec's label (orchestrator.names, not imported: see above)
LABEL_SHIPPER = "orchestrator.log-shipper"  # a host's log shipper, by the platform it ships for
LABEL_NODE_EXPORTER = "orchestrator.node-exporter"  # a host's node exporter, by the platform it serves

# The PostgreSQL server's admin database (tests and benchmarks make throwaway databases beside it).
POSTGRES_ADMIN_URL = os.environ.get("ORCH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T], timeout: float, every: float = 0.1,
             until: Callable[[T], bool] = bool, retry: tuple[type[Exception], ...] = (Exception,)) -> T:
    """Poll ``probe`` every ``every`` seconds until ``until`` holds for its value, and return that
    value; an AssertionError naming ``what`` and the last value after ``timeout`` seconds. Errors of
    the ``retry`` types count as not yet (a daemon coming back may refuse a call or two)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = probe()
            if until(value):
                return value
            last = value
        except retry as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s (last: {last!r})")
        time.sleep(every)


# --- processes ------------------------------------------------------------------------------------


def orchestrator(*args: str) -> list[str]:
    """``python -m orchestrator.cli ARGS``: the console script, but it honours PYTHONPATH."""
    return [sys.executable, "-m", "orchestrator.cli", *args]


def says_ready(log: str) -> bool:
    """A Celery worker (a node, the control worker) logged that it consumes."""
    return " ready." in log


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_process(proc: subprocess.Popen[Any] | int, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    """Send ``sig`` (SIGTERM: stop cleanly), wait up to ``timeout`` seconds, then SIGKILL. ``proc``
    is a child of ours (reaped) or the pid of a process started elsewhere, such as a dockerd
    (polled until gone). One that is gone already is left alone."""
    running: Callable[[], bool]
    send: Callable[[int], None]
    if isinstance(proc, subprocess.Popen):
        child = proc
        pid, running, send = child.pid, lambda: child.poll() is None, child.send_signal
    else:
        pid = proc
        running, send = (lambda: pid_alive(pid)), (lambda signum: os.kill(pid, signum))
    for signum, wait in ((sig, timeout), (signal.SIGKILL, 10.0)):
        if not running():
            return
        with suppress(ProcessLookupError):
            send(signum)
        deadline = time.monotonic() + wait
        while running() and time.monotonic() < deadline:
            time.sleep(0.05)
    if running():
        raise RuntimeError(f"process {pid} still runs after SIGKILL")


def start_process(args: Sequence[str], env: Mapping[str, str], log: Path, ready: Callable[[str], bool],
                  timeout: float = 30, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
    """Start ``args`` with ``env`` over this process's environment, its output going to ``log``,
    and return once ``ready(the log so far)`` holds. If it exits first, or is not ready within
    ``timeout`` seconds, it is stopped and a RuntimeError carries the log's tail."""
    with log.open("wb") as out:
        proc = subprocess.Popen(list(args), env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        deadline = time.monotonic() + timeout
        while not ready(log.read_text(errors="replace")):
            problem = (f"exited {proc.returncode}" if proc.poll() is not None
                       else f"not ready in {timeout:g}s" if time.monotonic() > deadline else None)
            if problem:
                raise RuntimeError(f"{' '.join(args)} {problem}: {log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
    except BaseException:
        stop_process(proc)
        raise
    return proc


@contextmanager
def platform_process(args: Sequence[str], env: Mapping[str, str], log: Path, ready: Callable[[str], bool],
                     timeout: float = 30) -> Iterator[subprocess.Popen[bytes]]:
    """``orchestrator ARGS`` (the API, Flower, the control worker) with ``env``, ready as in
    ``start_process``, for the duration of the block; always stopped after it."""
    proc = start_process(orchestrator(*args), env, log, ready, timeout)
    try:
        yield proc
    finally:
        stop_process(proc)


@contextmanager
def fresh_database(prefix: str, admin_url: str = POSTGRES_ADMIN_URL, *, strict: bool = True) -> Iterator[str]:
    """A database of its own on the PostgreSQL server of ``admin_url``, dropped afterwards (its
    sessions ended): its URL. A drop that fails raises (``strict``: a test's leftover is its
    fault) or is said on stderr (a benchmark keeps the figures it has)."""
    import psycopg  # (only where PostgreSQL is used)

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        try:
            with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg.Error as exc:
            if strict:
                raise
            print(f"the throwaway database {name} was not dropped: {exc}", file=sys.stderr)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (from the kernel's ephemeral range, so never a job's port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- a platform -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlatformEnv:
    """The ORCH_* variables of one throwaway platform. Its own catalogue, Redis database (its
    broker) and port range keep platforms that run side by side apart."""

    database_url: str
    redis_db: int
    ports: tuple[int, int]
    stop_timeout: int = 5
    start_timeout: int = 10
    heartbeat_interval: float | None = None  # None: the platform's default
    host_down_after: float | None = None
    result_backend: str | None = None  # "": none
    redis_port: int = 6379  # another port: a Redis server of its own (``RedisServer``)
    broker_url: str | None = None  # another broker (e.g. RabbitMQ); None: Redis
    extra: tuple[tuple[str, str], ...] = ()  # more ORCH_* settings

    @property
    def job_ports(self) -> tuple[int, int]:
        """``ports`` holds the jobs' range and, in its last 50 ports, the proxies' range (a
        range of fewer than 100 ports is the jobs' only: that platform runs no proxy)."""
        if self.ports[1] - self.ports[0] < 100:
            return self.ports
        return self.ports[0], self.ports[1] - 50

    @property
    def proxy_ports(self) -> tuple[int, int]:
        if self.ports[1] - self.ports[0] < 100:
            return self.ports
        return self.ports[1] - 49, self.ports[1]

    @property
    def proxy_dir(self) -> str:
        """Short: HAProxy's sockets live there (unix socket paths hold 107 bytes)."""
        return f"/tmp/orch-proxy-{self.ports[0]}"

    def variables(self) -> dict[str, str]:
        chosen = {"ORCH_HEARTBEAT_INTERVAL": self.heartbeat_interval, "ORCH_HOST_DOWN_AFTER": self.host_down_after,
                  "ORCH_RESULT_BACKEND": self.result_backend}
        return {
            "ORCH_DATABASE_URL": self.database_url,
            "ORCH_BROKER_URL": self.broker_url or f"redis://127.0.0.1:{self.redis_port}/{self.redis_db}",
            "ORCH_STOP_TIMEOUT": str(self.stop_timeout),
            "ORCH_START_TIMEOUT": str(self.start_timeout),
            "ORCH_PORT_MIN": str(self.job_ports[0]),
            "ORCH_PORT_MAX": str(self.job_ports[1]),
            "ORCH_PROXY_PORT_MIN": str(self.proxy_ports[0]),
            "ORCH_PROXY_PORT_MAX": str(self.proxy_ports[1]),
            "ORCH_PROXY_DIR": self.proxy_dir,
            "ORCH_MONITOR_DIR": f"/tmp/orch-monitor-{self.ports[0]}",
            "ORCH_GIT_DIR": f"/tmp/orch-git-{self.ports[0]}",
            "ORCH_REMOVED_GRACE": "1",  # removed services' rows go a second after their removal
            **{name: str(value) for name, value in chosen.items() if value is not None},
            **dict(self.extra),
        }

    def redis(self) -> redis.Redis[bytes]:
        return redis.Redis(host="127.0.0.1", port=self.redis_port, db=self.redis_db)

    def flush(self) -> None:
        """Empty its Redis database (queues and results an earlier run left)."""
        client = self.redis()
        try:
            client.flushdb()
        finally:
            client.close()


@dataclass
class Platform:
    """A platform whose nodes run as processes: its variables, the tree whose code runs (``src``)
    and a work directory, where its processes run (so that no checkout's ``.orchestrator.env``
    reaches them) and write their logs."""

    env: PlatformEnv
    workdir: Path
    src: Path = ROOT
    nodes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: list[Path] = field(default_factory=list)

    @property
    def environ(self) -> dict[str, str]:
        """The environment of its processes: ours, with ``src`` first on the path and its variables."""
        path = os.pathsep.join(filter(None, [str(self.src), os.environ.get("PYTHONPATH")]))
        return {**os.environ, "PYTHONPATH": path, **self.env.variables()}

    def ok(self, *args: str, timeout: float = 300) -> str:
        """``orchestrator ARGS`` in a process of its own; its stdout. A failure raises, with the output."""
        done = subprocess.run(orchestrator(*args), env=self.environ, cwd=self.workdir, capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"orchestrator {' '.join(args)} -> exit {done.returncode}:\n"
                               f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
        return done.stdout

    def start_node(self, host: str, timeout: float = 30) -> subprocess.Popen[bytes]:
        """``orchestrator node run HOST``, returned once its log says it is ready."""
        log = self.workdir / f"node-{host}-{len(self.logs)}.log"
        self.logs.append(log)
        self.nodes[host] = start_process(orchestrator("node", "run", host, "--loglevel", "INFO"), self.environ,
                                         log, says_ready, timeout, cwd=self.workdir)
        return self.nodes[host]

    def kill_node(self, host: str) -> None:
        """SIGKILL, as when its host dies."""
        stop_process(self.nodes[host], signal.SIGKILL)

    def stop_nodes(self) -> None:
        """Its nodes, and what they ran beside the jobs on this machine's Docker."""
        for proc in self.nodes.values():
            stop_process(proc)
        client = docker.DockerClient(base_url=DEFAULT_DOCKER_URL, version="auto")
        try:
            remove_host_containers(client, self.env.database_url)
        finally:
            client.close()


# --- a Redis server of its own (to stop and start in fault tests) --------------------------------------


@dataclass
class RedisServer:
    """``redis-server`` on 127.0.0.1:PORT, keeping nothing on disk: a restart loses every queue,
    as a broker without persistence does."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.workdir / f"redis-{self.port}.log"
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.workdir)], stdout=out, stderr=subprocess.STDOUT)
        wait_for(f"redis-server on port {self.port}", self.answers, 10)

    def answers(self) -> bool:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: every connection drops, every queued message is gone."""
        if self.proc is not None:
            stop_process(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


# --- a second Docker host -------------------------------------------------------------------------


@dataclass
class Daemon:
    """A dockerd of its own, started by ``scripts/dockerd-up NAME`` (its own socket, data root, exec
    root, pid file and containerd namespace): a second Docker host on this machine."""

    name: str
    used: bool = False  # started (or found running) by us: stop it at the end

    @property
    def url(self) -> str:
        return f"unix:///var/run/orch-docker-{self.name}.sock"

    @property
    def pidfile(self) -> Path:
        return Path(f"/var/run/orch-docker-{self.name}.pid")

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def client(self, timeout: int = 60) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, version="auto", timeout=timeout)

    def answers(self) -> bool:
        try:
            client = self.client(timeout=5)
            try:
                client.ping()
            finally:
                client.close()
            return True
        except Exception:
            return False

    def up(self) -> float:
        """Start it (idempotent); the seconds it took. A pid file left by a killed daemon that is gone
        (or a zombie not reaped yet) would make dockerd refuse to start: it is removed first."""
        self.used = True
        pid = self.pid()
        if pid is not None and not pid_alive(pid):
            self.pidfile.unlink(missing_ok=True)
        t0 = time.perf_counter()
        done = subprocess.run([str(ROOT / "scripts" / "dockerd-up"), self.name], capture_output=True, text=True,
                              timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"scripts/dockerd-up {self.name} -> exit {done.returncode}: {done.stderr[-2000:]}")
        return time.perf_counter() - t0

    def load_images(self, images: Sequence[str], source_url: str = DEFAULT_DOCKER_URL) -> list[str]:
        """Copy ``images`` from the daemon at ``source_url`` where this one lacks them or has other
        ones (nothing can be pulled): ``docker save ... | docker -H URL load``. The names copied."""
        source, target = docker.DockerClient(base_url=source_url, version="auto", timeout=60), self.client()
        try:
            stale = []
            for name in images:
                want = source.images.get(name).id  # missing at the source: scripts/build-images
                try:
                    have = target.images.get(name).id
                except docker.errors.ImageNotFound:
                    have = None
                if have != want:
                    stale.append(name)
        finally:
            source.close()
            target.close()
        if stale:
            subprocess.run(f"docker save {' '.join(stale)} | docker -H {self.url} load", shell=True, check=True,
                           timeout=600, stdout=subprocess.DEVNULL, env={**os.environ, "DOCKER_HOST": source_url})
        return stale

    def kill(self) -> int:
        """SIGKILL, as when its host dies; the pid it had."""
        pid = self.pid()
        if pid is None or not pid_alive(pid):
            raise RuntimeError(f"dockerd {self.name} is not running (pid file {self.pidfile}: {pid})")
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self, timeout: float = 30) -> None:
        pid = self.pid()
        if pid is not None:
            stop_process(pid, timeout=timeout)


def retire(catalogue_url: str, *envs: str) -> None:
    """Before a test removes its environments' containers behind the platform's back: mark their
    services as given up on healing, so the platform does not bring the containers back, and free
    their proxy ports (a test teardown, not a user's act; ``env rm`` is the user's way)."""
    url = catalogue_url.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as conn:
            for env in envs:
                conn.execute(sqlalchemy.text(
                    "UPDATE service SET heal_gave_up = :yes, heal_wanted = :no "
                    "WHERE env_id IN (SELECT id FROM environment WHERE name = :env)"),
                    {"yes": True, "no": False, "env": env})
                # Its proxy ports go back to the range, for the environments that come next.
                conn.execute(sqlalchemy.text(
                    "UPDATE environment SET http_port = NULL, https_port = NULL WHERE name = :env"), {"env": env})
    finally:
        engine.dispose()


def platform_key(database_url: str) -> str:
    """What the platform names its things on a shared Docker engine by (Settings.platform_key)."""
    return hashlib.sha256(database_url.encode()).hexdigest()[:8]


def remove_host_containers(client: docker.DockerClient, database_url: str) -> int:
    """Remove what the platform's nodes run beside the jobs (log shippers, node exporters) and
    their volumes (named as they are); how many containers."""
    removed = 0
    key = platform_key(database_url)
    for label in (LABEL_SHIPPER, LABEL_NODE_EXPORTER):
        for found in client.api.containers(all=True, filters={"label": f"{label}={key}"}):
            with suppress(docker.errors.NotFound):
                client.api.remove_container(found["Id"], force=True, v=True)
                removed += 1
            for name in found["Names"]:
                with suppress(docker.errors.NotFound, docker.errors.APIError):
                    client.api.remove_volume(name.lstrip("/"), force=True)
    return removed


def remove_containers(client: docker.DockerClient, *envs: str) -> int:
    """Remove the containers of ``envs`` (by their orchestrator.env label), running or not, with
    their anonymous volumes; how many. One listing call per env: the high-level list inspects each
    container after listing, which fails when one is removed in between."""
    removed = 0
    for env in envs:
        for found in client.api.containers(all=True, filters={"label": f"{LABEL_ENV}={env}"}):
            with suppress(docker.errors.NotFound):
                client.api.remove_container(found["Id"], force=True, v=True)
                removed += 1
    return removed
