"""The processes that consume the platform's queues: a node (the Celery worker of one Docker
host, queue host.<name>) and the control worker (queue orchestrator).

What runs where, explicitly:
- a node runs its host's steps (``workers.tasks``) and its heartbeat (``workers.heartbeat``);
- the control worker runs the task API (``orchestrator.control``);
- both also host control-plane work, so an operation ends and a dead host is noticed while any
  platform process lives: the operations' advance and finish tasks
  (``orchestrator.control.register_operation_tasks``: a finish after a failed step goes to that
  step's node; a stage that ends is followed at once by the node that ended it) and the fleet
  watcher (``watcher``).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from celery import Celery
from celery.signals import worker_ready

from orchestrator import catalogue, control, names
from orchestrator.errors import BadInput
from orchestrator.logs import EventLog
from orchestrator.periodic import Periodic
from orchestrator.platform import Platform
from orchestrator.watcher import Watcher
from workers import broker, tasks
from workers.context import NodeContext
from workers.exporter import NodeExporter
from workers.heartbeat import NodeHeartbeat
from workers.logship import LogShipper
from workers.metrics import MetricsServer
from workers.monitor import MonitorFiles
from workers.proxy import HAProxyDriver
from workers.runtime.docker import DockerRuntime


def node_context(platform: Platform, host_name: str, *, pool_size: int) -> NodeContext:
    """The host's catalogue row and a client for its Docker engine."""
    with platform.session() as s:
        host = catalogue.get_host(session=s, name=host_name)
    if names.is_simulated(host.docker_url):
        raise BadInput(f"host {host.name} is simulated: `orchestrator sim run` serves it")
    runtime = DockerRuntime(host.docker_url, pool_size=pool_size)
    settings = platform.settings
    shipper = LogShipper(runtime, host.name, platform_key=settings.platform_key, image=settings.image_logging,
                         containers_dir=runtime.containers_dir())
    exporter = NodeExporter(runtime, host.name, host.address, platform_key=settings.platform_key,
                            image=settings.image_monitoring)
    return NodeContext(platform=platform, host=host.name, address=host.address, runtime=runtime,
                       proxies=HAProxyDriver(settings.proxy_dir), shipper=shipper, node_exporter=exporter,
                       monitors=MonitorFiles(settings.monitor_dir))


def serve_host(app: Celery, node: NodeContext) -> list[Periodic]:
    """Register a node's tasks on ``app`` and send its first heartbeat; returns its loops
    (heartbeat, fleet watcher, the platform's events to the environments' logs), not started."""
    tasks.register(app, node)
    control.register_operation_tasks(app, node.platform)
    serve_metrics(node)
    heartbeat = NodeHeartbeat(node)
    heartbeat.beat()  # the host is up (if its Docker answers) before the node takes steps
    return [heartbeat.periodic(), Watcher(node.platform).periodic(), EventLog(node.platform).periodic()]


def serve_metrics(node: NodeContext) -> None:
    """Its jobs' metrics for its environments' monitoring, where the catalogue says (the
    machine's, from its node exporter, are the heartbeat's: while some environment monitors)."""
    port = MetricsServer(node).start()
    with node.platform.session() as s:
        catalogue.set_metrics_ports(session=s, name=node.host, metrics_port=port)
        s.commit()


def run_node(platform: Platform, host_name: str, *, concurrency: int, loglevel: str) -> None:
    """Run the node of ``host_name`` until stopped (blocks)."""
    node = node_context(platform, host_name, pool_size=concurrency + 4)
    loops = serve_host(platform.app, node)
    work(platform.app, [names.host_queue(node.host)], f"{node.host}@{socket.gethostname()}",
          concurrency, loglevel, loops)


def run_control(platform: Platform, *, concurrency: int, loglevel: str) -> None:
    """Run the control worker (queue ``orchestrator``) until stopped (blocks)."""
    control.register_api(platform.app, platform)
    control.register_operation_tasks(platform.app, platform)
    work(platform.app, [names.CONTROL_QUEUE], f"control@{socket.gethostname()}", concurrency,
          loglevel, [Watcher(platform).periodic(), EventLog(platform).periodic()])


def work(app: Celery, queues: list[str], hostname: str, concurrency: int, loglevel: str,
         loops: Sequence[Periodic]) -> None:
    """Consume ``queues`` with ``app``'s tasks (a Celery worker, threads pool) until stopped,
    starting ``loops`` once it is up (blocks)."""
    broker.use_for_redis_urls()  # reconnects when Redis restarts, instead of ending the worker
    # The loops start once the worker is up: its logging is set up by then.
    worker_ready.connect(lambda **_: [loop.start() for loop in loops], weak=False)
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
