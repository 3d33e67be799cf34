"""A node's background loop: heartbeat, clean up containers of replaced jobs, watch the fleet."""

from __future__ import annotations

import logging
import threading

from orchestrator import fleet
from orchestrator.models import utcnow
from orchestrator.names import LABEL_JOB
from orchestrator.operations import Platform
from workers.runtime.base import Runtime

log = logging.getLogger(__name__)


class Heartbeat:
    """Every ``settings.heartbeat_interval`` seconds, in a daemon thread. With no ``host`` (the
    control worker) it only watches the fleet."""

    def __init__(self, platform: Platform, host: str | None, runtime: Runtime | None) -> None:
        self.platform = platform
        self.host = host
        self.runtime = runtime
        self.stopped = threading.Event()
        self._capacity: tuple[float, int] | None = None

    def start(self) -> Heartbeat:
        threading.Thread(target=self._run, name="heartbeat", daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopped.set()

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.beat()
            except Exception:  # a bad beat must not end the loop: the next one may work
                log.exception("heartbeat failed")
            self.stopped.wait(self.platform.settings.heartbeat_interval)

    def beat(self) -> None:
        settings = self.platform.settings
        if self.host is not None and self.runtime is not None:
            if self._capacity is None:
                self._capacity = self.runtime.capacity()
            cpus, memory_mb = self._capacity
            fleet.heartbeat(self.platform, host=self.host, cpus=cpus, memory_mb=memory_mb)
            self.clean_up()
        fleet.watch(self.platform, down_after=settings.host_down_after)

    def clean_up(self) -> None:
        """Keep Docker and the catalogue in step: remove containers of jobs the catalogue replaced
        while this host was away; fail jobs whose containers were removed behind its back."""
        assert self.host is not None and self.runtime is not None
        listed_at = utcnow()
        by_job = {c.labels[LABEL_JOB]: c.name for c in self.runtime.jobs()}
        for job_id in fleet.vanished(self.platform, host=self.host, present=set(by_job),
                                     listed_at=listed_at):
            log.warning("job %s: its container was removed outside the platform", job_id)
        stale = fleet.leftovers(self.platform, host=self.host, job_ids=list(by_job))
        for job_id in stale:
            log.info("removing container %s of replaced job %s", by_job[job_id], job_id)
            self.runtime.stop(by_job[job_id], timeout=self.platform.settings.stop_timeout)
        fleet.forget_lost(self.platform, job_ids=stale)
