"""The host's node exporter (``prometheus-node-exporter`` in a container of the monitoring image:
CPU, memory, load and disks of the machine), for its environments' monitoring."""

from __future__ import annotations

import logging
import socket

from orchestrator import names
from workers.runtime.base import ContainerError, ContainerSpec, Runtime

log = logging.getLogger(__name__)

LABEL_PORT = "orchestrator.node-exporter.port"


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


class NodeExporter:
    """The host's node exporter: one container per host and platform, run while some
    environment has a monitoring service, kept across node restarts on the port it has."""

    def __init__(self, runtime: Runtime, host: str, address: str, *, platform_key: str, image: str) -> None:
        self.runtime, self.host, self.address, self.image = runtime, host, address, image
        self.platform_key = platform_key
        self.name = names.node_exporter_name(host, platform_key)
        self._said = ""
        self._gone = False  # stopped (or found absent) since it last ran: Docker is not asked again

    def ensure(self) -> int | None:
        """Run it (if it does not); its port, or None when it cannot run (said once)."""
        self._gone = False
        state = self.runtime.inspect(self.name)
        if state is not None and state.status == "running" and state.labels.get(LABEL_PORT, "").isdigit():
            return int(state.labels[LABEL_PORT])
        try:
            if not self.runtime.has_image(self.image):
                raise ContainerError(f"image {self.image} is not on this host")
            port = free_port(self.address)
            self.runtime.run(ContainerSpec(
                name=self.name, image=self.image, environment={}, memory_mb=128,
                labels={names.LABEL_NODE_EXPORTER: self.platform_key, LABEL_PORT: str(port)},
                command=f"exec prometheus-node-exporter --web.listen-address={self.address}:{port}",
            ))
        except (ContainerError, OSError) as exc:
            if str(exc) != self._said:
                log.warning("host %s: no node exporter: %s", self.host, exc)
            self._said = str(exc)
            return None
        self._said = ""
        return port

    def stop(self) -> None:
        """Stop and remove it (no environment has monitoring any more); one that is not there
        counts as stopped. Docker is asked once, then not again until it runs again."""
        if self._gone:
            return
        self.runtime.stop(self.name, timeout=5)
        self._gone = True
