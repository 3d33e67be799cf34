"""A node's heartbeat: say the host is alive, and keep Docker and the catalogue in step."""

from __future__ import annotations

import logging

from orchestrator import fleet
from orchestrator.models import utcnow
from orchestrator.names import LABEL_JOB
from orchestrator.periodic import Periodic
from workers.context import NodeContext

log = logging.getLogger(__name__)


class NodeHeartbeat:
    def __init__(self, node: NodeContext) -> None:
        self.node = node
        self._capacity: tuple[float, int] | None = None

    def periodic(self) -> Periodic:
        """This heartbeat every ``settings.heartbeat_interval`` seconds, in a thread of its own."""
        return Periodic("heartbeat", self.node.platform.settings.heartbeat_interval, self.beat)

    def beat(self) -> None:
        """A heartbeat when this host's Docker answers; none when it does not, so the watcher
        marks the host down after ``host_down_after`` and its jobs are recovered elsewhere."""
        runtime = self.node.runtime
        if not runtime.ping():
            log.warning("Docker on host %s does not answer: no heartbeat", self.node.host)
            return
        if self._capacity is None:
            self._capacity = runtime.capacity()
        cpus, memory_mb = self._capacity
        fleet.heartbeat(self.node.platform, host=self.node.host, cpus=cpus, memory_mb=memory_mb,
                        node=self.node.node_id)
        self.reconcile()

    def reconcile(self) -> None:
        """Keep Docker and the catalogue in step (``fleet.reconcile``): remove the containers the
        catalogue does not want, and say what died and what was taken back."""
        p, host, runtime = self.node.platform, self.node.host, self.node.runtime
        listed_at = utcnow()
        containers = [fleet.Container(c.labels[LABEL_JOB], c.name, c.status) for c in runtime.jobs()]
        done = fleet.reconcile(p, host=host, containers=containers, listed_at=listed_at)
        for job_id in done.failed:
            log.warning("job %s: its container died or vanished outside an operation", job_id)
        for job_id in done.adopted:
            log.info("job %s: its container still runs and nothing replaced it: taken back", job_id)
        for container in done.remove:
            log.info("removing container %s of job %s, which the catalogue no longer wants",
                     container.name, container.job_id)
            runtime.stop(container.name, timeout=p.settings.stop_timeout)
