"""Where each environment's log lines go and are read: its logging service's ports and
credentials, and the operations whose start or end is not yet in its log."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlmodel import Session, col, select

from orchestrator.catalogue.monitoring import answers_at, host_of, monitor_dashboard, not_running
from orchestrator.errors import BadInput
from orchestrator.logship import Target, valid_target
from orchestrator.models import (
    DashboardPublic,
    Environment,
    Host,
    Operation,
    Service,
    ServiceType,
    utcnow,
)

log = logging.getLogger(__name__)

# Operation.logged: what of it the environment's log has.
LOGGED_NOTHING, LOGGED_START, LOGGED_ALL = 0, 1, 2


class LoggingDown(Exception):
    """The environment's logging service cannot answer now; the message names it and says why."""


@dataclass(frozen=True)
class LogEndpoint:
    """An environment's logging service, where its dashboard and API answer."""

    env: str
    service: str
    address: str
    port: int
    user: str
    password: str

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}/"


def _logging_services(session: Session, env: Environment | None = None) -> list[tuple[Service, Environment]]:
    query = (select(Service, Environment).join(Environment, col(Environment.id) == Service.env_id)
             .where(Service.type == ServiceType.logging, col(Service.removed_at).is_(None),
                    col(Environment.removed_at).is_(None)))
    if env is not None:
        query = query.where(Environment.id == env.id)
    return [(svc, e) for svc, e in session.exec(query.order_by(col(Service.id)))]


def monitoring_wanted(*, session: Session) -> bool:
    """Whether some environment has a monitoring service (the hosts' node exporters run then)."""
    query = (select(Service.id).join(Environment, col(Environment.id) == Service.env_id)
             .where(Service.type == ServiceType.monitoring, col(Service.removed_at).is_(None),
                    col(Environment.removed_at).is_(None)))
    return session.exec(query.limit(1)).first() is not None


def log_targets(*, session: Session) -> list[Target]:
    """Every environment's logging service that has a place (a host and its kept ports), as
    the hosts' shippers reach it: kept while it restarts, so lines wait on their hosts."""
    hosts = {h.name: h for h in session.exec(select(Host))}
    targets: dict[str, Target] = {}
    for svc, env in _logging_services(session):
        host = hosts.get(svc.host or "")
        if env.name not in targets and host is not None and svc.port is not None and answers_at(svc, host):
            target = Target(env.name, host.address, svc.port + 1)
            if valid_target(target):
                targets[env.name] = target
            else:
                log.warning("environment %s: its logging service's address %r cannot be shipped to",
                            env.name, target.address)
    return sorted(targets.values(), key=lambda t: t.env)


def dashboard(*, session: Session, env: Environment) -> LogEndpoint | None:
    """The environment's logging dashboard as placed (None: it has none, or it was never placed)."""
    for svc, _ in _logging_services(session, env):
        host = host_of(session, svc)
        if host is not None and svc.port is not None and answers_at(svc, host):
            return LogEndpoint(env.name, svc.name, host.address, svc.port, svc.credentials["user"],
                               svc.credentials["password"])
    return None


def dashboards(*, session: Session, env: Environment, show_secrets: bool = False) -> dict[str, DashboardPublic]:
    """The environment's dashboards by the type that serves them (``env show``)."""
    found = {}
    logging_ = dashboard(session=session, env=env)
    if logging_ is not None:
        found["logging"] = DashboardPublic(url=logging_.url, user=logging_.user,
                                           password=logging_.password if show_secrets else "*****")
    monitoring = monitor_dashboard(session=session, env=env)
    if monitoring is not None:  # Prometheus: the environment's console page (alerts, graphs: its own UI)
        found["monitoring"] = DashboardPublic(url=f"{monitoring.url}consoles/env.html", user=monitoring.user,
                                              password=monitoring.password if show_secrets else "*****")
    return found


def logging_endpoint(*, session: Session, env: Environment) -> LogEndpoint:
    """The environment's logging service, when a job of it runs; BadInput when the environment
    has none, LoggingDown (naming it) when it does not run."""
    found = _logging_services(session, env)
    if not found:
        raise BadInput(f"environment {env.name} has no logging service")
    svc, _ = found[0]
    endpoint = dashboard(session=session, env=env)
    why = not_running(session, svc) if endpoint is not None else "it has no place or credentials yet"
    if endpoint is None or why is not None:
        raise LoggingDown(f"the logging service {svc.name} of environment {env.name} is not running ({why})")
    return endpoint


def unlogged_operations(*, session: Session, limit: int = 500,
                        newer_than: timedelta = timedelta(days=1)) -> list[tuple[Operation, str, str]]:
    """Operations whose start or end is not yet in their environment's log (the oldest first),
    each with its environment's and service's names, of environments whose logging service is
    placed. Older than ``newer_than``: never."""
    # Only environments whose logging service is placed: others' operations (no logging, or
    # not yet) never fill the window that the rest's events go through.
    placed = (select(Service.env_id).where(Service.type == ServiceType.logging, col(Service.removed_at).is_(None),
                                           col(Service.port).is_not(None), col(Service.host).is_not(None)))
    query = (select(Operation, Environment.name, Service.name)
             .join(Environment, col(Environment.id) == Operation.env_id)
             .join(Service, col(Service.id) == Operation.service_id)
             .where(col(Operation.logged) < LOGGED_ALL, col(Operation.created_at) > utcnow() - newer_than,
                    col(Environment.removed_at).is_(None), col(Operation.env_id).in_(placed),
                    col(Operation.started_at).is_not(None) | col(Operation.finished_at).is_not(None))
             .order_by(col(Operation.id)).limit(limit))
    return [(op, env, svc) for op, env, svc in session.exec(query)]


def mark_logged(*, session: Session, done: Sequence[tuple[int, int]]) -> None:
    """(operation id, what its log now has), never going back."""
    for op_id, logged in done:
        session.exec(update(Operation).where(col(Operation.id) == op_id, col(Operation.logged) < logged)
                     .values(logged=logged))


def event_time(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
