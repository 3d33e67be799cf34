"""A node: the Celery worker of one Docker host, consuming queue host.<name>."""

from __future__ import annotations

import socket

from celery.signals import worker_ready

from orchestrator import catalogue, names
from orchestrator.operations import Platform
from workers.app import NodeContext, OrchestratorCelery
from workers.heartbeat import Heartbeat
from workers.runtime.docker import DockerRuntime


def run_node(platform: Platform, host_name: str, *, concurrency: int, loglevel: str) -> None:
    """Run the node of ``host_name`` until stopped (blocks)."""
    with platform.session() as s:
        host = catalogue.get_host(session=s, name=host_name)
    app = platform.app
    assert isinstance(app, OrchestratorCelery)
    runtime = DockerRuntime(host.docker_url, pool_size=concurrency + 4)
    app.node = NodeContext(platform=platform, host=host.name, address=host.address, runtime=runtime)
    _work(app, [names.host_queue(host.name)], f"{host.name}@{socket.gethostname()}",
          concurrency, loglevel, Heartbeat(platform, host.name, runtime))


def run_control(platform: Platform, *, concurrency: int, loglevel: str) -> None:
    """Run the control worker (queue ``orchestrator``) until stopped (blocks)."""
    _work(platform.app, [names.CONTROL_QUEUE], f"control@{socket.gethostname()}", concurrency,
          loglevel, Heartbeat(platform, None, None))


def _work(app: OrchestratorCelery, queues: list[str], hostname: str, concurrency: int,
          loglevel: str, heartbeat: Heartbeat) -> None:
    # The heartbeat starts once the worker is up: its logging is set up by then.
    worker_ready.connect(lambda **_: heartbeat.start(), weak=False)
    app.worker_main([
        "worker",
        "--queues", ",".join(queues),
        "--hostname", hostname,
        "--pool", "threads",
        "--concurrency", str(concurrency),
        "--loglevel", loglevel,
        "--without-gossip", "--without-mingle",
        "--events",
    ])
