"""What a node's tasks act with: the platform (catalogue, dispatch) and this host's Docker."""

from __future__ import annotations

import http.client
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from orchestrator.platform import Platform
from workers.exporter import NodeExporter
from workers.logship import LogShipper
from workers.monitor import MonitorFiles
from workers.proxy import MemoryProxies, ProxyDriver
from workers.runtime.base import Runtime


def tcp_accepts(address: str, port: int) -> bool:
    """Whether something accepts TCP connections on ADDRESS:PORT."""
    try:
        with socket.create_connection((address, port), timeout=0.2):
            return True
    except OSError:
        return False


def http_answers(address: str, port: int, path: str) -> bool:
    """Whether GET PATH on ADDRESS:PORT answers 2xx or 3xx (a job's health check)."""
    connection = http.client.HTTPConnection(address, port, timeout=1.0)
    try:
        connection.request("GET", path, headers={"User-Agent": "orchestrator-health-check"})
        return 200 <= connection.getresponse().status < 400
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


@dataclass
class NodeContext:
    platform: Platform
    host: str
    address: str  # where this host's jobs are reached
    runtime: Runtime
    port_lock: threading.Lock = field(default_factory=threading.Lock)  # one port move at a time
    # The host's service proxy jobs (HAProxy on a real node, the in-memory twin in unit tests).
    proxies: ProxyDriver = field(default_factory=MemoryProxies)
    # The host's log shipper (None: this node ships no logs, as with the in-memory runtime).
    shipper: LogShipper | None = None
    node_exporter: NodeExporter | None = None  # the host's (None: none, as with the in-memory runtime)
    monitors: MonitorFiles | None = None  # its monitoring jobs' files (None: not kept, in unit tests)
    # Whether something answers on ADDRESS:PORT (a job is ready; a port is held elsewhere): a
    # real TCP connect on a node; the in-memory runtime's answer in unit tests.
    accepts: Callable[[str, int], bool] = tcp_accepts
    answers: Callable[[str, int, str], bool] = http_answers  # GET PATH answers 2xx/3xx
    # This node process, apart from the host's earlier ones: it holds the leases of the steps
    # it runs. A node started again must not renew what its predecessor held.
    incarnation: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    # The steps a task of this process works on right now: the heartbeat renews their leases
    # (and those of its overlap waits), no others.
    inflight: set[int] = field(default_factory=set)
    _inflight_lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def working(self, *step_ids: int) -> Iterator[None]:
        """While the block runs, these steps are this node's (a batch's: from its begin to its end)."""
        with self._inflight_lock:
            self.inflight.update(step_ids)
        try:
            yield
        finally:
            with self._inflight_lock:
                self.inflight.difference_update(step_ids)

    def working_on(self) -> list[int]:
        with self._inflight_lock:
            return sorted(self.inflight)

    @property
    def node_id(self) -> str:
        """Who runs a step: ``HOST/INCARNATION``."""
        return f"{self.host}/{self.incarnation}"
