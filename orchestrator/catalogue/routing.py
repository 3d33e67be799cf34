"""The service proxy in the catalogue: environments' proxy ports, sites, which jobs the proxy
serves, and the whole wanted state of an environment's proxy (``proxy_config``)."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import bindparam, update
from sqlmodel import Session, col, select

from orchestrator import proxy, rules
from orchestrator.errors import BadInput, NotFound
from orchestrator.models import (
    Environment,
    Host,
    Job,
    JobKind,
    JobState,
    RouteState,
    Service,
    ServiceType,
    Site,
    SitePublic,
)


def assign_proxy_ports(*, session: Session, env: Environment, http_port: int | None,
                       https_port: int | None, job_ports: tuple[int, int],
                       proxy_ports: tuple[int, int]) -> None:
    """Give the environment its two proxy ports: the ones asked for (checked), the others the
    lowest free ones of ``proxy_ports``. No two environments share a port."""
    if session.get_bind().dialect.name == "postgresql":
        # One assignment at a time (SQLite's writers are one at a time already): two at once
        # would both see the same ports free. The environment's row first (a service added locks
        # it, then comes here): always that row, then this lock.
        session.exec(select(Environment.id).where(Environment.id == env.id).with_for_update(key_share=True)).all()
        session.connection().exec_driver_sql("SELECT pg_advisory_xact_lock(7263001)")
    taken: set[int] = set()
    for other in session.exec(select(Environment).where(col(Environment.id) != env.id)):
        taken |= {p for p in (other.http_port, other.https_port) if p is not None}
    asked = {"--http-port": http_port, "--https-port": https_port}
    for what, port in asked.items():
        if port is not None:
            rules.check_proxy_port(port, what, job_ports)
            if port in taken:
                raise BadInput(f"{what} {port} is taken by another environment's proxy")
    if http_port is not None and http_port == https_port:
        raise BadInput("--http-port and --https-port must differ")
    taken |= {p for p in asked.values() if p is not None}
    free = (p for p in range(proxy_ports[0], proxy_ports[1] + 1) if p not in taken)
    env.http_port = http_port if http_port is not None else next(free, None)
    env.https_port = https_port if https_port is not None else next(free, None)
    if env.http_port is None or env.https_port is None:
        raise BadInput(f"no free proxy ports left in {proxy_ports[0]}-{proxy_ports[1]}")
    session.add(env)
    session.flush()


def add_site(*, session: Session, env: Environment, name: str, service: Service,
             cert: str | None = None, key: str | None = None) -> Site:
    """Checked by the caller (``requests.add_site``)."""
    if session.exec(select(Site).where(Site.env_id == env.id, Site.name == name)).first() is not None:
        raise BadInput(f"site {name} exists already in {env.name}")
    site = Site(env_id=env.id or 0, name=name, service_id=service.id or 0, cert=cert, key=key)
    session.add(site)
    session.flush()
    return site


def get_site(*, session: Session, env: Environment, name: str) -> Site:
    site = session.exec(select(Site).where(Site.env_id == env.id,
                                           Site.name == name.lower().rstrip("."))).first()
    if site is None:
        raise NotFound(f"no site {name} in {env.name}")
    return site


def list_sites(*, session: Session, env: Environment) -> list[SitePublic]:
    services = {s.id: s.name for s in session.exec(select(Service).where(Service.env_id == env.id))}
    sites = session.exec(select(Site).where(Site.env_id == env.id).order_by(col(Site.name)))
    return [SitePublic(name=s.name, service=services.get(s.service_id, "?"), tls=s.cert is not None)
            for s in sites]


def proxy_service(*, session: Session, env: Environment) -> Service | None:
    query = select(Service).where(Service.env_id == env.id, Service.type == ServiceType.service_proxy)
    return session.exec(query.order_by(col(Service.id))).first()


def proxy_jobs(*, session: Session, env_id: int) -> list[Job]:
    """The environment's proxy jobs that run: the ones a change of routes goes to."""
    proxies = select(Service.id).where(Service.env_id == env_id, Service.type == ServiceType.service_proxy)
    query = select(Job).where(col(Job.service_id).in_(proxies), Job.kind == JobKind.deploy,
                              Job.state == JobState.running)
    return list(session.exec(query.order_by(col(Job.created_at), col(Job.id))))


def proxy_jobs_on(*, session: Session, host: str) -> list[tuple[Job, str]]:
    """Running proxy jobs of a host, each with its environment's name (every heartbeat asks)."""
    return [(job, name) for job, name in session.exec(_PROXY_JOBS_ON, params={"w_host": host})]


_PROXY_JOBS_ON = (select(Job, Environment.name)  # built once (the host bound by name)
                  .join(Service, col(Service.id) == Job.service_id)
                  .join(Environment, col(Environment.id) == Service.env_id)
                  .where(Service.type == ServiceType.service_proxy, Job.host == bindparam("w_host"),
                         Job.state == JobState.running))


def set_route(*, session: Session, job_ids: Iterable[str], state: RouteState) -> None:
    ids = list(job_ids)
    if ids:
        session.exec(update(Job).where(col(Job.id).in_(ids)).values(route=state))


def proxy_config(*, session: Session, env: Environment, bind: str) -> proxy.ProxyConfig:
    """What the environment's proxy must serve now: a backend per code service with its
    running deploy jobs that serve or drain, and every site (with its certificate and key)."""
    if env.http_port is None or env.https_port is None:
        raise BadInput(f"environment {env.name} has no proxy ports")
    addresses = {h.name: h.address for h in session.exec(select(Host))}
    code = list(session.exec(select(Service).where(Service.env_id == env.id, Service.type == ServiceType.code,
                                                    col(Service.removed_at).is_(None))))
    jobs = session.exec(select(Job).where(
        col(Job.service_id).in_([s.id for s in code]), Job.kind == JobKind.deploy,
        Job.state == JobState.running,
        col(Job.route).in_((RouteState.serving, RouteState.draining)),
    ).order_by(col(Job.created_at), col(Job.id)))
    servers: dict[int, list[proxy.Server]] = {}
    # The proxy checks a service's jobs the way they were started: the health path of its
    # newest job (a changed path takes effect with the redeploy that starts jobs with it).
    health = {s.id: s.health_path for s in code}
    for j in jobs:
        if j.port is not None:
            servers.setdefault(j.service_id, []).append(proxy.Server(
                j.id, addresses.get(j.host, j.host), j.port, draining=j.route == RouteState.draining))
            health[j.service_id] = j.health_path
    backends = tuple(proxy.Backend(s.name, health[s.id], tuple(servers.get(s.id or 0, ())))
                     for s in code)
    names = {s.id: s.name for s in code}
    sites = tuple(
        proxy.Site(site.name, names[site.service_id],
                   site.cert.strip() + "\n" + site.key.strip() + "\n" if site.cert and site.key else None)
        for site in session.exec(select(Site).where(Site.env_id == env.id).order_by(col(Site.name)))
        if site.service_id in names
    )
    return proxy.ProxyConfig(bind=bind, http_port=env.http_port, https_port=env.https_port,
                             backends=backends, sites=sites)
