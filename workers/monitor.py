"""A host's monitoring jobs' files: each job's directory (``ORCH_MONITOR_DIR/JOB``, mounted
read-only at /etc/orch-monitoring) holds Prometheus' and the blackbox exporter's configuration
and the targets, rendered from the catalogue (``orchestrator.monitoring``). The node writes the
whole directory before the job starts and keeps it in line from its heartbeat: targets change
with redeploys, scale and moves and Prometheus reads them by itself; a new site's blackbox
module is reloaded into the exporter before the targets that name it; a changed Prometheus
configuration is reloaded through its lifecycle API."""

from __future__ import annotations

import logging
import shutil
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from orchestrator import catalogue, monitoring
from orchestrator.catalogue.monitoring import MonitorEndpoint
from orchestrator.httpauth import basic_auth
from orchestrator.models import Environment
from orchestrator.platform import Platform
from workers.files import write_whole

log = logging.getLogger(__name__)

MOUNT = f"{monitoring.CONFIG_DIR}:ro"
RELOAD_TIMEOUT = 5.0


def wanted(p: Platform, env: Environment, blackbox_port: int) -> dict[str, str]:
    """The environment's monitoring directory as the catalogue says now."""
    with p.reader() as s:
        checks, scrapes = catalogue.monitoring_checks(session=s, env=env)
    return monitoring.monitoring_files(env.name, checks, scrapes, blackbox_port)


class MonitorFiles:
    def __init__(self, root: str) -> None:
        self.root = Path(root)
        self._reload_due: dict[str, set[str]] = {}  # job -> what still waits for a reload that failed

    def directory(self, job_id: str) -> Path:
        return self.root / job_id

    def prepare(self, job_id: str, files: Mapping[str, str]) -> dict[str, str]:
        """The job's directory, whole, before it starts; the mount that shows it to the job."""
        self.write(job_id, files)
        return {str(self.directory(job_id)): MOUNT}

    def write(self, job_id: str, files: Mapping[str, str], *, only: set[str] | None = None) -> set[str]:
        """Write what differs (each file atomically: a temporary file, then a rename; never the
        directory itself, which the job has mounted); the names written."""
        root = self.directory(job_id)
        (root / monitoring.TARGETS_DIR).mkdir(parents=True, exist_ok=True)
        written = set()
        for name, text in files.items():
            if only is not None and name not in only:
                continue
            if write_whole(root / name, text, mode=0o644):  # Prometheus in the job reads them
                written.add(name)
        return written

    def apply(self, job_id: str, files: Mapping[str, str], endpoint: MonitorEndpoint) -> set[str]:
        """Bring a running job's directory in line, reloading what must be: the blackbox
        exporter first (a new site's module), then the targets, then Prometheus' own files."""
        # What a reload that failed left waiting is reloaded again, though its file is unchanged.
        due = self._reload_due.setdefault(job_id, set())
        due |= self.write(job_id, files, only={monitoring.BLACKBOX_FILE})
        blackbox = f"http://127.0.0.1:{endpoint.blackbox_port}/-/reload"
        if monitoring.BLACKBOX_FILE in due and _post(blackbox):
            due.discard(monitoring.BLACKBOX_FILE)
        changed = self.write(job_id, files, only=set(files) - {monitoring.BLACKBOX_FILE})
        own = {monitoring.PROMETHEUS_FILE, monitoring.RULES_FILE}
        due |= changed & own
        prometheus = f"http://{endpoint.address}:{endpoint.port}/-/reload"
        if due & own and _post(prometheus, endpoint.user, endpoint.password):
            due -= own
        return changed

    def remove(self, job_id: str) -> None:
        self._reload_due.pop(job_id, None)
        shutil.rmtree(self.directory(job_id), ignore_errors=True)


def _post(url: str, user: str | None = None, password: str | None = None) -> bool:
    """POST an empty body; whether it was answered 2xx."""
    request = urllib.request.Request(url, method="POST", data=b"")
    if user is not None and password is not None:
        request.add_header("Authorization", basic_auth(user, password))
    try:
        with urllib.request.urlopen(request, timeout=RELOAD_TIMEOUT):
            return True
    except (OSError, urllib.error.HTTPError) as exc:
        log.warning("reload %s failed (tried again next heartbeat): %s", url, exc)
        return False
