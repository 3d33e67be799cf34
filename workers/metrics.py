"""What a node serves its environments' monitoring: ``/metrics?env=ENV`` on its host's address
(that environment's jobs on this host: CPU, memory and restarts from Docker; its services'
wanted and running jobs; the hosts up or not). Its port is recorded in the catalogue, where
the monitoring's targets are rendered from (the machine's own metrics: ``workers.exporter``)."""

from __future__ import annotations

import logging
import threading
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator import catalogue
from orchestrator.metrics import EnvironmentCollector
from workers.context import NodeContext

log = logging.getLogger(__name__)

LABELS = ["env", "service", "job", "host"]


class JobCollector(Collector):
    """One environment's running jobs on this host, as Docker reports them."""

    def __init__(self, node: NodeContext, env: str, pool: ThreadPoolExecutor) -> None:
        self.node, self.env, self.pool = node, env, pool

    def collect(self) -> Iterator[Metric]:
        node = self.node
        with node.platform.reader() as s:
            jobs = [(job.id, job.container_name, svc.name)
                    for job, svc in catalogue.running_jobs_of(session=s, env=self.env, host=node.host)]
        cpu = CounterMetricFamily("orchestrator_job_cpu_seconds", "CPU seconds the job's container used.",
                                  labels=LABELS)
        memory = GaugeMetricFamily("orchestrator_job_memory_bytes", "Memory the job's container uses now.",
                                   labels=LABELS)
        restarts = CounterMetricFamily("orchestrator_job_restarts", "Times Docker restarted the job's container.",
                                       labels=LABELS)
        samples = self.pool.map(lambda j: (j, node.runtime.inspect(j[1]), node.runtime.stats(j[1])), jobs)
        for (job_id, _, service), state, used in samples:
            labels = [self.env, service, job_id, node.host]
            if state is not None:
                restarts.add_metric(labels, state.restart_count)
            if used is not None:
                cpu.add_metric(labels, used.cpu_seconds)
                memory.add_metric(labels, used.memory_bytes)
        yield from (cpu, memory, restarts)


class MetricsServer:
    """``GET /metrics?env=ENV`` on the host's address, a port the kernel picks."""

    def __init__(self, node: NodeContext) -> None:
        self.node = node
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="job-stats")
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> int | None:
        """Serve; the port, or None when this node cannot listen on its host's address (it
        drives a Docker engine on another machine)."""
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                env = urllib.parse.parse_qs(url.query).get("env", [""])[0]
                if url.path != "/metrics" or not env:
                    self.send_error(404 if url.path != "/metrics" else 400, "GET /metrics?env=ENV")
                    return
                body = server.render(env)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass  # a scrape every few seconds is not news

        try:
            self.server = ThreadingHTTPServer((self.node.address, 0), Handler)
        except OSError as exc:
            log.warning("host %s: no job metrics: cannot listen on %s: %s", self.node.host, self.node.address, exc)
            return None
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True).start()
        return int(self.server.server_address[1])

    def render(self, env: str) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(EnvironmentCollector(self.node.platform, env))
        registry.register(JobCollector(self.node, env, self.pool))
        return generate_latest(registry)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
