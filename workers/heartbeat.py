"""A node's heartbeat: say the host is alive, and keep Docker and the catalogue in step."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from orchestrator import catalogue, fleet
from orchestrator.models import utcnow
from orchestrator.names import LABEL_JOB
from orchestrator.periodic import Periodic
from workers import monitor
from workers.context import NodeContext
from workers.proxy import wanted

log = logging.getLogger(__name__)


class NodeHeartbeat:
    def __init__(self, node: NodeContext) -> None:
        self.node = node
        self._capacity: tuple[float, int] | None = None
        # Containers are removed beside the heartbeat, not in it: a stop can take the stop
        # timeout, and a beat must stay short (or the host would look silent).
        self._removals = ThreadPoolExecutor(max_workers=4, thread_name_prefix="remove")
        self._removing: set[str] = set()
        self._lock = threading.Lock()
        self._proxies = ThreadPoolExecutor(max_workers=1, thread_name_prefix="proxies")
        self._reconciling: Future[None] | None = None

    def periodic(self) -> Periodic:
        """This heartbeat every ``settings.heartbeat_interval`` seconds, in a thread of its own."""
        return Periodic("heartbeat", self.node.platform.settings.heartbeat_interval, self.beat)

    def beat(self) -> None:
        """A heartbeat when this host's Docker answers, with what it lists (``fleet.heartbeat``
        reconciles the two); none when it does not, so the watcher marks the host down after
        ``host_down_after`` and its jobs are recovered elsewhere."""
        node, runtime = self.node, self.node.runtime
        if not runtime.ping():
            log.warning("Docker on host %s does not answer: no heartbeat", node.host)
            return
        if self._capacity is None:
            self._capacity = runtime.capacity()
        cpus, memory_mb = self._capacity
        listed_at = utcnow()
        containers = [fleet.Container(c.labels[LABEL_JOB], c.name, c.status) for c in runtime.jobs()]
        done = fleet.heartbeat(node.platform, host=node.host, cpus=cpus, memory_mb=memory_mb,
                               node=node.node_id, working_on=node.working_on(), containers=containers,
                               listed_at=listed_at)
        for job_id in done.failed:
            log.warning("job %s: its container died or vanished outside the platform", job_id)
        for job_id in done.adopted:
            log.info("job %s: its container still runs and nothing replaced it: taken back", job_id)
        for container in done.remove:
            self._remove(container)
        # Off the beat's thread: a proxy slow to reload must never delay a heartbeat.
        with self._lock:
            if self._reconciling is None or self._reconciling.done():
                self._reconciling = self._proxies.submit(self.reconcile)

    def reconcile(self) -> None:
        """What runs beside the jobs, each on its own: one that fails is said and retried next
        beat, and never keeps the others from their turn."""
        for part in (self.reconcile_proxies, self.reconcile_shipper, self.reconcile_node_exporter,
                     self.reconcile_monitors):
            try:
                part()
            except Exception as exc:
                log.warning("host %s: %s failed this beat: %s", self.node.host, part.__name__, exc)

    def reconcile_monitors(self) -> None:
        """Every running monitoring job of this host checks what its environment runs now."""
        node = self.node
        if node.monitors is None:
            return
        with node.platform.reader() as s:
            running = catalogue.monitoring_jobs_on(session=s, host=node.host)
            endpoints = {env.name: catalogue.monitor_dashboard(session=s, env=env) for _, env in running}
        for job, env in running:
            endpoint = endpoints[env.name]
            if endpoint is None:
                continue
            try:
                node.monitors.apply(job.id, monitor.wanted(node.platform, env, endpoint.blackbox_port), endpoint)
            except Exception as exc:
                log.debug("monitoring job %s: not brought in line this beat: %s", job.id, exc)

    def reconcile_node_exporter(self) -> None:
        """The host's node exporter runs while some environment has a monitoring service, and
        the catalogue knows its port; when the last one goes, it stops and its port is forgotten."""
        exporter, node = self.node.node_exporter, self.node
        if exporter is None:
            return
        with node.platform.reader() as s:
            monitored = catalogue.monitoring_wanted(session=s)
            known = catalogue.get_host(session=s, name=node.host).node_exporter_port
        if not monitored:
            exporter.stop()
            port = None
        else:
            port = exporter.ensure()
        if port != known:
            with node.platform.session() as s:
                catalogue.set_metrics_ports(session=s, name=node.host, node_exporter_port=port)
                s.commit()

    def reconcile_shipper(self) -> None:
        """The host's log shipper sends to every environment's logging service as placed now."""
        shipper = self.node.shipper
        if shipper is None:
            return
        with self.node.platform.reader() as s:
            targets = catalogue.log_targets(session=s)
        try:
            shipper.apply(targets)
        except Exception as exc:  # said by the shipper; the next beat tries again
            log.debug("host %s: log shipper not brought in line this beat: %s", self.node.host, exc)

    def reconcile_proxies(self) -> None:
        """Every running proxy job of this host brought in line with the catalogue: what a
        change missed (a proxy that started while another service's operation ran) is
        caught within a beat. A proxy busy with a step's change is left to it."""
        node = self.node
        with node.platform.reader() as s:
            running = catalogue.proxy_jobs_on(session=s, host=node.host)
        for job, env_name in running:
            try:
                node.proxies.apply(job.id, wanted(node.platform, env_name, node.address), wait=False)
            except Exception as exc:
                log.debug("proxy job %s: not brought in line this beat: %s", job.id, exc)

    def _remove(self, container: fleet.Container) -> None:
        with self._lock:
            if container.name in self._removing:
                return
            self._removing.add(container.name)
        log.info("removing container %s of job %s, which the catalogue no longer wants",
                 container.name, container.job_id)
        self._removals.submit(self._stop, container.name)

    def _stop(self, name: str) -> None:
        try:
            self.node.runtime.stop(name, timeout=self.node.platform.settings.stop_timeout)
        except Exception:  # the next heartbeat lists it again and asks again
            log.exception("removing container %s failed", name)
        finally:
            with self._lock:
                self._removing.discard(name)

    def wait_for_removals(self) -> None:
        """Until the removals (and the proxies' and shipper's reconciliation) asked so far are done (for
        tests and a clean stop)."""
        with self._lock:
            reconciling = self._reconciling
        if reconciling is not None:
            reconciling.result()
        self._removals.submit(lambda: None).result()
        while True:
            with self._lock:
                if not self._removing:
                    return
            time.sleep(0.01)
