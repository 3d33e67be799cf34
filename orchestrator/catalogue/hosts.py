"""Docker hosts, and the load and ports their active jobs hold."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from sqlalchemy import func
from sqlalchemy import select as sa_select  # five columns: beyond sqlmodel's typed select
from sqlmodel import Session, col, select

from orchestrator import service_types
from orchestrator.errors import BadInput, NotFound
from orchestrator.models import ACTIVE_JOB_STATES, Host, HostPublic, HostState, Job, JobState, Service, ServiceType
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


def get_host(*, session: Session, name: str) -> Host:
    host = session.exec(select(Host).where(Host.name == name)).first()
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


def host_loads(*, session: Session) -> list[HostLoad]:
    """Every host with the CPU, memory and ports its active jobs hold, and the images its
    running jobs run."""
    used_cpus: dict[str, float] = defaultdict(float)
    used_mem: dict[str, int] = defaultdict(int)
    ports: dict[str, set[int]] = defaultdict(set)
    images: dict[str, set[str]] = defaultdict(set)
    # A lost job's container may still hold its port on its (unreachable) host: keep it taken.
    holding = (*ACTIVE_JOB_STATES, JobState.stopping, JobState.lost)
    # Only the columns it needs: a job's row also holds its environment, args and mounts.
    for host, port, state, size_name, image in session.execute(
            sa_select(col(Job.host), col(Job.port), col(Job.state), col(Job.size), col(Job.image))
            .where(col(Job.state).in_(holding))):
        if port is not None:
            ports[host].add(port)
        if state == JobState.running and image:
            images[host].add(image)
        if state in ACTIVE_JOB_STATES:
            size = parse_size(size_name)
            used_cpus[host] += size.cpus
            used_mem[host] += size.memory_mb
    hosts = list_hosts(session=session)
    # Hosts that share an address (several daemons on one machine) share its ports.
    by_address: dict[str, set[int]] = defaultdict(set)
    for h in hosts:
        by_address[h.address] |= ports[h.name]
    # A database's or cache's kept port stays its own on every host while the service exists,
    # even with no job running (a failed start): its connection URLs name it.
    kept_rows = session.exec(select(Service.port, Service.type).where(col(Service.port).is_not(None)))
    kept = {held for port, kind in kept_rows if port is not None
            for held in range(port, port + service_types.ports_held(ServiceType(kind)))}
    return [
        HostLoad(
            name=h.name, schedulable=h.state == HostState.up, address=h.address, cpus=h.cpus,
            memory_mb=h.memory_mb, used_cpus=used_cpus[h.name], used_memory_mb=used_mem[h.name],
            used_ports=frozenset(by_address[h.address] | kept), images=frozenset(images[h.name]),
        )
        for h in hosts
    ]


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
