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
        if self._capacity is None:
            self._capacity = self.node.runtime.capacity()
        cpus, memory_mb = self._capacity
        fleet.heartbeat(self.node.platform, host=self.node.host, cpus=cpus, memory_mb=memory_mb)
        self.clean_up()

    def clean_up(self) -> None:
        """Remove containers of jobs the catalogue replaced while this host was away; fail jobs
        whose containers were removed behind the platform's back."""
        p, host, runtime = self.node.platform, self.node.host, self.node.runtime
        listed_at = utcnow()
        by_job = {c.labels[LABEL_JOB]: c.name for c in runtime.jobs()}
        for job_id in fleet.vanished(p, host=host, present=set(by_job), listed_at=listed_at):
            log.warning("job %s: its container was removed outside the platform", job_id)
        stale = fleet.leftovers(p, host=host, job_ids=list(by_job))
        for job_id in stale:
            log.info("removing container %s of replaced job %s", by_job[job_id], job_id)
            runtime.stop(by_job[job_id], timeout=p.settings.stop_timeout)
        fleet.forget_lost(p, job_ids=stale)
