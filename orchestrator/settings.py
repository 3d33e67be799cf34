"""One validated settings class, read from ORCH_* environment variables when asked for."""

from __future__ import annotations

import hashlib

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORCH_", env_file=".orchestrator.env", extra="ignore")

    database_url: str = "sqlite:///orchestrator.db"
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = ""  # empty: the broker's Redis
    port_min: int = Field(default=20000, ge=1024, le=65535)
    port_max: int = Field(default=29999, ge=1024, le=65535)
    start_timeout: float = Field(default=30.0, gt=0)  # seconds for a new job to be ready
    stop_timeout: int = Field(default=10, ge=0)  # seconds between SIGTERM and SIGKILL
    node_concurrency: int = Field(default=16, ge=1, le=256)  # tasks at once (workers.tasks.STEP_THREADS)
    cpu_overcommit: float = Field(default=8.0, ge=1)  # CPU limits are caps, not reservations
    heartbeat_interval: float = Field(default=2.0, gt=0)  # seconds between a node's heartbeats
    host_down_after: float = Field(default=10.0, gt=0)  # seconds of silence before a host is down
    # A running step's lease: its node renews it every heartbeat; a step whose lease ran out (its
    # node died or hangs) fails, and its operation ends. Longer than a few heartbeats.
    step_lease: float = Field(default=15.0, gt=0)
    # Seconds after which the watcher ends what no process will: an operation claimed or planned
    # but never sent, a step whose message never reached its node, a finish that was lost.
    orphan_after: float = Field(default=30.0, gt=0)
    # Seconds a step may wait for its node to pick it up once its turn came (a busy node works
    # through its queue) before its message counts as lost.
    pickup_timeout: float = Field(default=120.0, gt=0)
    # Service proxies: each environment keeps an HTTP and an HTTPS port from this range.
    proxy_port_min: int = Field(default=30000, ge=1024, le=65535)
    proxy_port_max: int = Field(default=30999, ge=1024, le=65535)
    # Where a node keeps its proxy jobs' files (config, maps, certificates, sockets), one
    # directory per job, mounted into its container. On the Docker host; keep the path short
    # (unix socket paths are limited to 107 bytes).
    proxy_dir: str = "/var/lib/orchestrator/proxy"
    # Where a node keeps its monitoring jobs' files (Prometheus' and the blackbox exporter's
    # configuration, the targets), one directory per job, mounted into its container.
    monitor_dir: str = "/var/lib/orchestrator/monitor"
    drain_timeout: float = Field(default=10.0, ge=0)  # seconds a job leaving the proxy may finish requests
    # The platform's image registry (``orchestrator registry run``), e.g. 127.0.0.1:5000: built
    # images are pushed there and nodes pull them. Empty: images are built on each host.
    registry: str = ""
    build_timeout: float = Field(default=1800.0, gt=0)  # seconds a build may stay silent
    run_timeout: float = Field(default=3600.0, gt=0)  # seconds a one-off (`run`) may take: then it is killed
    git_dir: str = "/var/lib/orchestrator/git"  # the bare repositories `git push` reaches
    # Seconds a removed service's (or environment's) rows stay for `ops show` and the like,
    # before the watcher deletes them with their operations, steps, jobs and releases.
    removed_grace: float = Field(default=600.0, ge=0)
    heal_backoff: float = Field(default=5.0, gt=0)  # first wait before a heal; doubles each attempt
    # Images of the auto-included services (built locally by scripts/build-images).
    image_logging: str = "orch/logging:1"
    image_service_proxy: str = "orch/haproxy:2.6"
    image_monitoring: str = "orch/monitoring:1"

    @property
    def backend_url(self) -> str:
        return self.result_backend or self.broker_url

    @property
    def platform_key(self) -> str:
        """Short and stable for this platform (its catalogue): names what it keeps on a Docker
        engine that several platforms may share, such as each host's log shipper."""
        return hashlib.sha256(self.database_url.encode()).hexdigest()[:8]


def get_settings() -> Settings:
    return Settings()
