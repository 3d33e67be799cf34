"""A host's log shipper: one rsyslog container (the logging image's ``logship`` mode) that reads
the json-file logs of the host's jobs and sends each environment's lines to its logging
service over RELP, queueing them on the host's disk while that service is down or moving.

The node keeps it in line with the catalogue from its heartbeat (``apply``): a change of the
environments' logging services restarts it gracefully (SIGTERM: rsyslog saves its file
positions and queues), so no line is lost across the change."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from orchestrator import names
from orchestrator.logship import CONTAINERS_DIR, WORK_DIR, Target, config_hash, shipper_config
from workers.runtime.base import ContainerSpec, Runtime

log = logging.getLogger(__name__)

LABEL_CONFIG = "orchestrator.log-shipper.config"
STOP_TIMEOUT = 20  # seconds rsyslog may take to save its queues


class LogShipper:
    def __init__(self, runtime: Runtime, host: str, *, platform_key: str, image: str, containers_dir: str) -> None:
        self.runtime = runtime
        self.host = host
        self.name = names.shipper_name(host, platform_key)
        self.platform_key = platform_key
        self.image = image
        self.containers_dir = containers_dir
        self._last_error = ""

    def apply(self, targets: Sequence[Target]) -> bool:
        """Run the shipper for ``targets`` (the environments' logging services); True when it was
        (re)started. None is started while there is nothing to ship."""
        config = shipper_config(self.host, targets)
        digest = config_hash(config)
        state = self.runtime.inspect(self.name)
        if state is None and not targets:
            return False
        if state is not None and state.labels.get(LABEL_CONFIG) == digest and state.status == "running":
            return False
        if state is not None and state.labels.get(LABEL_CONFIG) != digest:
            self.runtime.stop(self.name, timeout=STOP_TIMEOUT)
        spec = ContainerSpec(
            name=self.name, image=self.image, args=("logship",), memory_mb=256,
            labels={names.LABEL_SHIPPER: self.platform_key, LABEL_CONFIG: digest},
            environment={"LOGSHIP_CONF": config},
            volumes={self.name: WORK_DIR, self.containers_dir: f"{CONTAINERS_DIR}:ro"},
        )
        try:
            self.runtime.run(spec)
        except Exception as exc:
            if str(exc) != self._last_error:  # said once, not every beat
                log.warning("host %s: its log shipper does not run: %s", self.host, exc)
            self._last_error = str(exc)
            raise
        self._last_error = ""
        log.info("host %s: log shipper %s ships for %s", self.host, self.name,
                 ", ".join(t.env for t in targets) or "no environment")
        return True
