"""Docker hosts, and the load and ports their active jobs hold."""

from __future__ import annotations

import re
from collections import defaultdict
from datetime import timedelta
from typing import Any

from sqlalchemy import bindparam, func, or_, update
from sqlalchemy import select as sa_select  # five columns: beyond sqlmodel's typed select
from sqlmodel import Session, col, select

from orchestrator import service_types
from orchestrator.db import table
from orchestrator.errors import BadInput, NotFound
from orchestrator.models import (
    ACTIVE_JOB_STATES,
    Host,
    HostPublic,
    HostState,
    Job,
    JobState,
    Operation,
    OpState,
    Service,
    ServiceType,
    Step,
    StepAction,
    StepState,
    WatchPass,
    utcnow,
)
from orchestrator.placement import HostLoad
from orchestrator.rules import check_name
from orchestrator.sizes import parse_size


def add_host(*, session: Session, name: str, docker_url: str, address: str) -> Host:
    check_name("host", name)
    if not re.match(r"^(unix|tcp|ssh|http|https|sim)://", docker_url):  # sim://: a simulated host
        raise BadInput(f"docker URL {docker_url!r} must start with unix://, tcp://, ssh:// or http(s)://")
    if session.exec(select(Host).where(Host.name == name)).first() is not None:
        raise BadInput(f"host {name} exists already")
    host = Host(name=name, docker_url=docker_url, address=address)
    session.add(host)
    session.flush()
    return host


def get_host(*, session: Session, name: str, for_update: bool = False) -> Host:
    """With ``for_update``, the host's row is locked until the transaction ends (PostgreSQL; the
    watcher's mark of a host down then comes after, and is not written over)."""
    query = select(Host).where(Host.name == name)
    host = session.exec(query.with_for_update().execution_options(populate_existing=True) if for_update
                        else query).first()
    if host is None:
        raise NotFound(f"no host named {name}")
    return host


def list_hosts(*, session: Session) -> list[Host]:
    return list(session.exec(select(Host).order_by(col(Host.name))))


def host_views(*, session: Session) -> list[HostPublic]:
    """Hosts with their active jobs and the capacity those leave free."""
    loads = {h.name: h for h in host_loads(session=session)}
    counts = dict(session.exec(select(Job.host, func.count()).where(col(Job.state).in_(ACTIVE_JOB_STATES))
                               .group_by(col(Job.host))).all())
    views = []
    for h in list_hosts(session=session):
        load = loads[h.name]
        views.append(HostPublic(
            name=h.name, docker_url=h.docker_url, address=h.address,
            state="unknown" if h.last_seen is None else h.state,
            last_seen=h.last_seen, jobs=counts.get(h.name, 0), cpus=h.cpus, memory_mb=h.memory_mb,
            free_cpus=round(max(0.0, h.cpus - load.used_cpus), 3),
            free_memory_mb=max(0, h.memory_mb - load.used_memory_mb),
        ))
    return views


PLACEMENT_LOCK = 7263002  # PostgreSQL advisory lock: one placement at a time (routing's ports: 7263001)


def placement_loads(*, session: Session) -> list[HostLoad]:
    """``host_loads`` for a placement that will write what it chose (new jobs, a job's new port)
    in this transaction: the placements of the whole fleet take turns until each commits. SQLite's
    writers take turns already; on PostgreSQL two plans at once (two services' deploys) each read
    the loads without the other's new jobs, and chose the same port of the same host, and the
    same room twice (seen in 20 redeploys at once on 100 simulated hosts: the nodes then moved
    the jobs' ports, a third of their CPU; on Docker the second container may not bind at all)."""
    hold_placement(session=session)
    return host_loads(session=session)


def hold_placement(*, session: Session) -> None:
    """This transaction's turn at placing, until it ends (PostgreSQL; SQLite's writers take
    turns already): also for what changes where jobs may go and then acts on the jobs a host has
    (a drain, a host's removal), so that no plan places on the host unseen meanwhile."""
    if session.get_bind().dialect.name == "postgresql":
        session.connection().exec_driver_sql(f"SELECT pg_advisory_xact_lock({PLACEMENT_LOCK})")


def host_loads(*, session: Session) -> list[HostLoad]:
    """Every host with the CPU, memory and ports its active jobs hold (and of that, what the
    jobs that running operations are stopping hold), and the images its running jobs run. Read
    in plain SQL built once, summed by the database where it can (each operation's plan reads
    it, in the catalogue's write turn): a host's jobs by size, its ports, its images."""
    used_cpus: dict[str, float] = defaultdict(float)
    used_mem: dict[str, int] = defaultdict(int)
    ports: dict[str, set[int]] = defaultdict(set)
    images: dict[str, set[str]] = defaultdict(set)
    session.flush()
    connection = session.connection()

    def rows(statement: Any) -> Any:  # all at once (a thousand hosts: a fetch per row cost more than the read)
        return connection.execute(statement).all()

    for host, size_name, count in rows(_SIZES_HELD):
        size = parse_size(size_name)
        used_cpus[host] += size.cpus * count
        used_mem[host] += size.memory_mb * count
    leaving_cpus: dict[str, float] = defaultdict(float)
    leaving_mem: dict[str, int] = defaultdict(int)
    for host, size_name, count in rows(_SIZES_LEAVING):
        size = parse_size(size_name)
        leaving_cpus[host] += size.cpus * count
        leaving_mem[host] += size.memory_mb * count
    for host, port in rows(_PORTS_HELD):
        ports[host].add(port)
    for host, image in rows(_IMAGES_RUN):
        images[host].add(image)
    hosts = rows(_HOSTS)  # (unpacked: a Row's attributes cost more)
    # Hosts that share an address (several daemons on one machine) share its ports.
    by_address: dict[str, set[int]] = defaultdict(set)
    for name, _state, address, _cpus, _memory in hosts:
        by_address[address] |= ports[name]
    # A database's or cache's kept port stays its own on every host while the service exists,
    # even with no job running (a failed start): its connection URLs name it.
    kept = {held for port, kind in rows(_KEPT_PORTS)
            for held in range(port, port + service_types.ports_held(ServiceType(kind)))}
    # One frozenset per port space (the hosts of one address share it), one for every host that
    # runs nothing.
    port_spaces = {address: frozenset(held | kept) for address, held in by_address.items()}
    no_images: frozenset[str] = frozenset()
    return [
        HostLoad(
            name=name, schedulable=state == HostState.up, address=address, cpus=cpus,
            memory_mb=memory, used_cpus=used_cpus.get(name, 0.0), used_memory_mb=used_mem.get(name, 0),
            used_ports=port_spaces[address], images=frozenset(images[name]) if name in images else no_images,
            leaving_cpus=leaving_cpus.get(name, 0.0), leaving_memory_mb=leaving_mem.get(name, 0),
        )
        for name, state, address, cpus, memory in hosts
    ]


_JOB = table(Job)
# A lost job's container may still hold its port on its (unreachable) host: keep it taken.
_SIZES_HELD = (sa_select(_JOB.c.host, _JOB.c.size, func.count()).where(_JOB.c.state.in_(ACTIVE_JOB_STATES))
               .group_by(_JOB.c.host, _JOB.c.size))
_STEP, _OP = table(Step), table(Operation)
# Of those, the jobs that running operations are stopping (a stop step waiting or under way).
_SIZES_LEAVING = (sa_select(_JOB.c.host, _JOB.c.size, func.count())
                  .select_from(_STEP.join(_JOB, _JOB.c.id == _STEP.c.job_id).join(_OP, _OP.c.id == _STEP.c.op_id))
                  .where(_STEP.c.state.in_((StepState.pending, StepState.running)),
                         _STEP.c.action == StepAction.stop, _OP.c.state == OpState.running,
                         _JOB.c.state.in_(ACTIVE_JOB_STATES))
                  .group_by(_JOB.c.host, _JOB.c.size))
_PORTS_HELD = (sa_select(_JOB.c.host, _JOB.c.port)
               .where(_JOB.c.state.in_((*ACTIVE_JOB_STATES, JobState.stopping, JobState.lost)),
                      _JOB.c.port.is_not(None)))
_IMAGES_RUN = (sa_select(_JOB.c.host, _JOB.c.image).where(_JOB.c.state == JobState.running, _JOB.c.image != "")
               .distinct())
_HOST = table(Host)
_HOSTS = sa_select(_HOST.c.name, _HOST.c.state, _HOST.c.address, _HOST.c.cpus, _HOST.c.memory_mb).order_by(_HOST.c.name)
_SERVICE = table(Service)
_KEPT_PORTS = sa_select(_SERVICE.c.port, _SERVICE.c.type).where(_SERVICE.c.port.is_not(None))


def watch_passed_since(*, session: Session, seconds: float) -> bool:
    """Whether a fleet watcher's pass began within the last ``seconds`` (a read: most processes'
    turns end here). A pass dated later than ``seconds`` from now does not count: a process whose
    clock runs ahead must not keep the others from their turns."""
    passed_at = session.exec(select(WatchPass.passed_at).where(WatchPass.id == 1)).first()
    now, every = utcnow(), timedelta(seconds=seconds)
    return passed_at is not None and now - every <= passed_at <= now + every


def claim_watch_pass(*, session: Session, by: str, every: float) -> bool:
    """The fleet watcher's next pass is ``by``'s, unless one began within ``every`` seconds (as
    ``watch_passed_since``): one conditional UPDATE, so of processes whose turns come together one
    wins (the first pass ever makes the row: on PostgreSQL, two at once may both try, and the
    second's commit fails). Dated once the write turn is held: a claim that waited for it must
    not look older than it is."""
    connection = session.connection()
    now, span = utcnow(), timedelta(seconds=every)
    won = connection.execute(_CLAIM_PASS, {"w_now": now, "w_by": by, "w_cutoff": now - span,
                                           "w_ahead": now + span}).rowcount
    if won == 1:
        return True
    if session.exec(select(WatchPass.id).where(WatchPass.id == 1)).first() is not None:
        return False
    session.add(WatchPass(id=1, passed_at=now, by=by))
    session.flush()
    return True


_WATCH = table(WatchPass)
_CLAIM_PASS = (update(_WATCH).where(_WATCH.c.id == 1, or_(_WATCH.c.passed_at < bindparam("w_cutoff"),
                                                           _WATCH.c.passed_at > bindparam("w_ahead")))
               .values(passed_at=bindparam("w_now"), by=bindparam("w_by")))


UNSET: Any = object()


def set_metrics_ports(*, session: Session, name: str, metrics_port: int | None = UNSET,
                      node_exporter_port: int | None = UNSET) -> None:
    """Where the host's node serves its jobs' metrics, or its node exporter answers (the one given)."""
    host = get_host(session=session, name=name)
    if metrics_port is not UNSET:
        host.metrics_port = metrics_port
    if node_exporter_port is not UNSET:
        host.node_exporter_port = node_exporter_port
    session.add(host)
