"""Simulated hosts (``orchestrator sim run``): N hosts registered in the catalogue and served by
ONE node process, for scale tests of the control plane without N machines.

- Each host is a real host to the rest of the platform (placement, drain, host loss, every
  command): its row, its queue ``host.<name>``, its own ``SimRuntime`` (in memory) and its own
  ``NodeContext`` and ``NodeHeartbeat`` (so each host reconciles its own runtime every beat).
- One Celery worker (threads pool) consumes every host's queue and runs the same step tasks as
  a real node (``workers.tasks.register_for``); a task finds its host's node from the queue it
  came from (``delivery_info["routing_key"]``).
- Nothing connects to a simulated host: its address is ``<name>.sim.invalid`` (never resolves),
  readiness asks its runtime (a container given the port "listens"), its proxies are the
  in-memory twin, and it has no log shipper, node exporter, monitoring files or metrics server.
- A host dies (``SimFleet.kill``, or a file ``kill-<host>`` in the ``--control`` directory): its
  heartbeats stop, the worker stops consuming its queue (a message it had taken goes back), and
  every call to its runtime hangs, as on a vanished machine, until the process stops. The fleet
  watcher then marks it down and recovers its jobs on the others.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Task
from celery.exceptions import Reject
from celery.signals import worker_ready, worker_shutting_down

from orchestrator import catalogue, control, names
from orchestrator.errors import BadInput
from orchestrator.logs import EventLog
from orchestrator.periodic import Periodic
from orchestrator.platform import Platform
from orchestrator.watcher import Watcher
from workers import tasks
from workers.context import NodeContext
from workers.heartbeat import NodeHeartbeat
from workers.node import work
from workers.runtime.sim import SimRuntime

log = logging.getLogger(__name__)

KILL_PREFIX = "kill-"  # a file kill-<host> in the control directory kills that host


@dataclass(frozen=True)
class SimOptions:
    hosts: int
    prefix: str = "sim"
    start_latency: float = 0.0  # seconds each container start takes
    stop_latency: float = 0.0  # seconds each stop of a running container takes (at most its timeout)
    fail_rate: float = 0.0  # probability that a start fails (the container exits at once)
    cpus: float = 16.0
    memory_mb: int = 64 * 1024
    control_dir: Path | None = None  # where kill-<host> files are looked for
    seed: int | None = None

    def host_names(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(1, self.hosts + 1)]


def simulated_node(platform: Platform, host: str, runtime: SimRuntime) -> NodeContext:
    """The node of a simulated host: its runtime answers for readiness, no I/O anywhere else."""
    return NodeContext(
        platform=platform, host=host, address=names.sim_address(host), runtime=runtime,
        accepts=lambda _address, port: runtime.listening(port),
        answers=lambda _address, port, _path: runtime.listening(port),
    )


def register_hosts(platform: Platform, hosts: Iterable[str]) -> None:
    """Add the simulated hosts the catalogue lacks; one that exists as a real host is refused."""
    with platform.session() as s:
        known = {h.name: h for h in catalogue.list_hosts(session=s)}
        for name in hosts:
            host = known.get(name)
            if host is None:
                catalogue.add_host(session=s, name=name, docker_url=names.sim_docker_url(name),
                                   address=names.sim_address(name))
            elif not names.is_simulated(host.docker_url):
                raise BadInput(f"host {name} exists and is not simulated ({host.docker_url})")
        s.commit()


class SimFleet:
    """The simulated hosts one process serves: their runtimes, nodes and heartbeats."""

    def __init__(self, platform: Platform, options: SimOptions) -> None:
        self.platform, self.options = platform, options
        self.runtimes: dict[str, SimRuntime] = {}
        self.nodes: dict[str, NodeContext] = {}
        self.heartbeats: dict[str, Periodic] = {}
        self.worker_name = f"sim-{options.prefix}@{socket.gethostname()}"
        self._lock = threading.Lock()
        for i, host in enumerate(options.host_names()):
            runtime = SimRuntime(name=host, start_latency=options.start_latency, stop_latency=options.stop_latency,
                                 fail_rate=options.fail_rate, cpus=options.cpus, memory_mb=options.memory_mb,
                                 seed=None if options.seed is None else options.seed + i)
            self.runtimes[host] = runtime
            self.nodes[host] = simulated_node(platform, host, runtime)
            beat = NodeHeartbeat(self.nodes[host])
            self.heartbeats[host] = Periodic(f"heartbeat-{host}", platform.settings.heartbeat_interval, beat.beat)

    @property
    def queues(self) -> list[str]:
        return [names.host_queue(host) for host in self.nodes]

    def alive(self) -> list[str]:
        return [host for host, runtime in self.runtimes.items() if not runtime.dead]

    def node_of(self, task: Task) -> NodeContext:
        """The node of the host whose queue the task came from. A task of a dead host goes back
        to its queue (which nothing consumes now), as an unacknowledged message of a dead node."""
        queue = (task.request.delivery_info or {}).get("routing_key") or ""
        host = names.queue_host(queue)
        node = self.nodes.get(host or "")
        if node is None:
            raise RuntimeError(f"task {task.name} came from queue {queue!r}, which no simulated host has")
        if self.runtimes[node.host].dead:
            time.sleep(0.2)  # should the worker still consume the queue, do not spin
            raise Reject(f"host {node.host} is dead", requeue=True)
        return node

    def beat_all(self) -> None:
        """One heartbeat of every host, one after the other: they are up before steps come."""
        for host, periodic in self.heartbeats.items():
            try:
                periodic.fn()
            except Exception:
                log.exception("the first heartbeat of simulated host %s failed", host)

    def start_heartbeats(self) -> None:
        """Each host's heartbeat in its own loop, their starts spread over one interval (a
        fleet's hosts do not all beat at the same instant)."""
        spread = self.platform.settings.heartbeat_interval / max(len(self.heartbeats), 1)
        for host, periodic in self.heartbeats.items():
            if not self.runtimes[host].dead:
                periodic.start()
            time.sleep(spread)

    def kill(self, host: str) -> None:
        """The machine of ``host`` dies: no more heartbeats, its queue no longer consumed, its
        runtime unreachable."""
        with self._lock:
            runtime = self.runtimes[host]
            if runtime.dead:
                return
            runtime.die()
            self.heartbeats[host].stop()
        log.warning("simulated host %s died", host)
        try:
            self.platform.app.control.cancel_consumer(names.host_queue(host), destination=[self.worker_name],
                                                      reply=True, timeout=2.0)
        except Exception as exc:  # its tasks are still put back (node_of)
            log.warning("simulated host %s: its queue is still consumed: %s", host, exc)

    def poll_control(self) -> None:
        """Kill the hosts named by kill-<host> files in the control directory."""
        directory = self.options.control_dir
        if directory is None:
            return
        for path in directory.glob(f"{KILL_PREFIX}*"):
            host = path.name.removeprefix(KILL_PREFIX)
            if host in self.runtimes and not self.runtimes[host].dead:
                threading.Thread(target=self.kill, args=(host,), name=f"kill-{host}", daemon=True).start()

    def stop(self) -> None:
        """Heartbeats end; calls hung on dead hosts end, so the worker's tasks can finish."""
        for periodic in self.heartbeats.values():
            periodic.stop()
        for runtime in self.runtimes.values():
            runtime.release()


def guard_simulated_addresses() -> None:
    """From now on, in this process, a lookup of or a connection to a simulated host's address
    fails at once and is logged: nothing may try to reach one (a check of the platform, too)."""
    suffix = f".{names.SIM_DOMAIN}"

    def simulated(where: object) -> bool:
        host = where[0] if isinstance(where, tuple) and where else where
        if isinstance(host, bytes):
            host = host.decode(errors="replace")
        return isinstance(host, str) and host.rstrip(".").endswith(suffix)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event in ("socket.getaddrinfo", "socket.gethostbyname") and args:
            where = args[0]
        elif event == "socket.connect" and len(args) > 1:
            where = args[1]
        else:
            return
        if simulated(where):
            log.error("something %s: %r (refused)", GUARD, where)
            raise OSError(f"{where!r} is a simulated host's address: nothing reaches it")

    sys.addaudithook(hook)


GUARD = "tried to reach simulated host"


def run_sim(platform: Platform, options: SimOptions, *, concurrency: int, loglevel: str) -> None:
    """Register the simulated hosts and serve them all until stopped (blocks)."""
    if options.hosts < 1:
        raise BadInput("--hosts must be at least 1")
    guard_simulated_addresses()
    if options.control_dir is not None:
        options.control_dir.mkdir(parents=True, exist_ok=True)
    fleet = SimFleet(platform, options)
    register_hosts(platform, fleet.nodes)
    tasks.register_for(platform.app, fleet.node_of)
    control.register_operation_tasks(platform.app, platform)
    fleet.beat_all()

    def ready(**_: Any) -> None:
        threading.Thread(target=fleet.start_heartbeats, name="sim-heartbeats", daemon=True).start()

    worker_ready.connect(ready, weak=False)
    worker_shutting_down.connect(lambda **_: fleet.stop(), weak=False)
    loops = [Watcher(platform).periodic(), EventLog(platform).periodic(),
             Periodic("sim-control", 0.2, fleet.poll_control)]
    log.info("serving %d simulated hosts: %s..%s", options.hosts, options.host_names()[0], options.host_names()[-1])
    try:
        work(platform.app, fleet.queues, fleet.worker_name, concurrency, loglevel, loops)
    finally:
        fleet.stop()
