"""What an environment's monitoring checks, from the catalogue: every running job by what it
is, every site through the proxy, and the hosts' metrics endpoints; where its Prometheus
answers."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import timedelta

from sqlmodel import Session, col, select

from orchestrator import names
from orchestrator.errors import BadInput
from orchestrator.models import Environment, Host, Job, JobKind, JobState, Service, ServiceType, Site, utcnow
from orchestrator.monitoring import Check, Scrape

# A job's check by its service's type; code services: "http" with a health path, else "tcp".
CHECK_OF_TYPE = {ServiceType.postgresql: "postgresql", ServiceType.mysql: "mysql", ServiceType.redis: "redis",
                 ServiceType.memcached: "memcached", ServiceType.logging: "tcp"}


FAILED_KEPT = timedelta(days=1)  # a failed job not replaced is checked (failing) that long at most


class MonitoringDown(Exception):
    """The environment's monitoring cannot answer now; the message names it and says why."""


@dataclass(frozen=True)
class MonitorEndpoint:
    env: str
    service: str
    address: str
    port: int
    blackbox_port: int
    user: str
    password: str

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}/"


def monitoring_checks(*, session: Session, env: Environment) -> tuple[list[Check], list[Scrape]]:
    """The checks of the environment's running jobs (and of failed ones not yet replaced) and
    sites, and the metrics endpoints of the hosts its jobs run on."""
    # A simulated host is never probed nor scraped: nothing may connect to it.
    hosts = {h.name: h for h in session.exec(select(Host)) if not names.is_simulated(h.docker_url)}
    recently_failed = (col(Job.state) == JobState.failed) & (col(Job.created_at) > utcnow() - FAILED_KEPT)
    live = (col(Job.state) == JobState.running) | recently_failed
    rows = list(session.exec(select(Job, Service).join(Service, col(Service.id) == Job.service_id)
                             .where(Service.env_id == env.id, col(Service.removed_at).is_(None), live)
                             .order_by(col(Job.created_at).desc(), col(Job.id))))
    # A failed job stays checked (failing) until a new job takes its place: while its service
    # runs fewer deploy jobs than its scale, its last failed ones stand for the missing.
    running = Counter(svc.id for job, svc in rows if job.state == JobState.running and job.kind == JobKind.deploy)
    missing = {svc.id: svc.scale - running[svc.id] for _, svc in rows}
    kept = []
    for job, svc in rows:
        if job.state == JobState.failed:
            if job.kind != JobKind.deploy or missing[svc.id] <= 0:
                continue
            missing[svc.id] -= 1
        kept.append((job, svc))
    rows = sorted(kept, key=lambda pair: pair[0].id)
    checks: list[Check] = []
    used_hosts: set[str] = set()
    proxy_hosts: list[str] = []
    for job, svc in rows:
        used_hosts.add(job.host)
        host = hosts.get(job.host)
        if svc.type == ServiceType.service_proxy:
            proxy_hosts.append(job.host)
            continue
        if host is None or job.port is None or job.kind != JobKind.deploy or svc.type == ServiceType.monitoring:
            continue  # workers and the monitoring itself: their containers' metrics only
        if svc.type == ServiceType.code:
            kind, path = ("http", job.health_path) if job.health_path else ("tcp", None)
        else:
            kind, path = CHECK_OF_TYPE[ServiceType(svc.type)], None
        checks.append(Check(service=svc.name, job=job.id, kind=kind, address=host.address, port=job.port,
                            path=path, host=host.name))
    proxy = hosts.get(proxy_hosts[0]) if proxy_hosts else None
    if proxy is not None and env.http_port is not None:
        service_names = {s.id: s.name for s in session.exec(select(Service).where(Service.env_id == env.id))}
        for site in session.exec(select(Site).where(Site.env_id == env.id).order_by(col(Site.name))):
            checks.append(Check(service=service_names.get(site.service_id, ""), job="", kind="site",
                                address=proxy.address, port=env.http_port, path="/", site=site.name,
                                https=site.cert is not None, https_port=env.https_port, host=proxy.name))
    scrapes: list[Scrape] = []
    for name in sorted(used_hosts):
        host = hosts.get(name)
        if host is None:
            continue
        if host.metrics_port is not None:
            scrapes.append(Scrape("jobs", host.name, host.address, host.metrics_port))
        if host.node_exporter_port is not None:
            scrapes.append(Scrape("node", host.name, host.address, host.node_exporter_port))
    return checks, scrapes


def monitoring_jobs_on(*, session: Session, host: str) -> list[tuple[Job, Environment]]:
    """Running monitoring jobs of a host, each with its environment."""
    query = (select(Job, Environment).join(Service, col(Service.id) == Job.service_id)
             .join(Environment, col(Environment.id) == Service.env_id)
             .where(Service.type == ServiceType.monitoring, Job.host == host, Job.state == JobState.running))
    return [(job, env) for job, env in session.exec(query)]


def answers_at(svc: Service, host: Host | None) -> bool:
    """Whether an included service (logging, monitoring) answers on ``host`` where a platform
    process may reach it: placed there with its kept port, made with credentials (one made
    before these services were real is a placeholder: nothing listens), never a simulated host."""
    return (svc.port is not None and host is not None and host.name == svc.host
            and "password" in svc.credentials and not names.is_simulated(host.docker_url))


def host_of(session: Session, svc: Service) -> Host | None:
    """The host a service keeps (databases, logging, monitoring), if it has one."""
    return session.exec(select(Host).where(Host.name == svc.host)).first() if svc.host else None


def _monitoring_service(session: Session, env: Environment) -> Service | None:
    return session.exec(select(Service).where(Service.env_id == env.id, Service.type == ServiceType.monitoring,
                                              col(Service.removed_at).is_(None))).first()


def monitor_dashboard(*, session: Session, env: Environment) -> MonitorEndpoint | None:
    """The environment's monitoring as placed (None: it has none, or it was never placed)."""
    svc = _monitoring_service(session, env)
    host = host_of(session, svc) if svc is not None else None
    if svc is None or host is None or svc.port is None or not answers_at(svc, host):
        return None
    return MonitorEndpoint(env.name, svc.name, host.address, svc.port, svc.port + 1, svc.credentials["user"],
                           svc.credentials["password"])


def monitor_endpoint(*, session: Session, env: Environment) -> MonitorEndpoint:
    """The environment's monitoring, when its job runs; BadInput when it has none (a sandbox),
    MonitoringDown (naming it) when it does not run."""
    svc = _monitoring_service(session, env)
    if svc is None:
        raise BadInput(f"environment {env.name} has no monitoring service"
                       + (" (a sandbox has none)" if env.sandbox else ""))
    endpoint = monitor_dashboard(session=session, env=env)
    why = not_running(session, svc) if endpoint is not None else "it has no place or credentials yet"
    if endpoint is None or why is not None:
        raise MonitoringDown(f"the monitoring service {svc.name} of environment {env.name} is not running ({why})")
    return endpoint


def not_running(session: Session, svc: Service) -> str | None:
    """Why no job of an included service (logging, monitoring) runs, in words; None when one does."""
    running = select(Job.id).where(Job.service_id == svc.id, Job.state == JobState.running)
    if session.exec(running.limit(1)).first() is not None:
        return None
    last = session.exec(select(Job).where(Job.service_id == svc.id).order_by(col(Job.created_at).desc())).first()
    return f"its last job {last.id} is {last.state}" if last is not None else "it has no job yet"
