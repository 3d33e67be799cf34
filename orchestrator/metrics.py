"""The platform's own metrics, in Prometheus' text format, read from the catalogue when scraped
(nothing to keep in step, and every process that serves them agrees):

- ``PlatformCollector`` (the API's ``/metrics``): operations by kind and outcome, operation and
  step durations, operations queued and running, jobs by state, hosts by state;
- ``EnvironmentCollector`` (each node's ``/metrics?env=ENV``, scraped by that environment's
  monitoring): its services' wanted and running jobs, and whether each host is up.

Nothing secret is in either: names, counts and durations only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import BigInteger, ColumnElement, Integer, case, cast, extract, func
from sqlmodel import Session, col, select

from orchestrator import catalogue
from orchestrator.models import (
    ENDED_OP_STATES,
    Environment,
    Host,
    HostState,
    Job,
    JobKind,
    JobState,
    Operation,
    OpState,
    Service,
    Step,
)
from orchestrator.platform import Platform

OPERATION_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


def duration_us(s: Session, start: Any, end: Any) -> ColumnElement[int]:
    """From ``start`` to ``end`` in whole microseconds, in SQL: what Python's ``end - start`` of
    the two stored times gives. PostgreSQL subtracts the timestamps. SQLite has them as text,
    ``YYYY-MM-DD HH:MM:SS.ffffff`` (SQLAlchemy's format, microseconds always written): the whole
    seconds of the first 19 characters by strftime('%s'), the microseconds from the rest. Its date
    functions round to milliseconds (strftime('%s') of ``...:59.9996`` is the next second), and
    julianday's day numbers (doubles near 2.46e6) miss the difference by up to tens of
    microseconds, enough to move a step of 0.5 s out of its bucket."""
    if s.get_bind().dialect.name == "sqlite":
        def us(t: Any) -> ColumnElement[int]:
            return (cast(func.strftime("%s", func.substr(t, 1, 19)), Integer) * 1_000_000
                    + cast(func.substr(t, 21), Integer))
        return us(end) - us(start)
    return cast(extract("epoch", end - start) * 1_000_000, BigInteger)


def histogram(s: Session, name: str, documentation: str, label: Any, start: Any, end: Any,
              buckets: Sequence[float], *where: ColumnElement[bool]) -> HistogramMetricFamily:
    """A histogram, by ``label``, of the times from ``start`` to ``end`` of the rows that have both
    (and match ``where``), counted in the database: one query, one row per label value (negative
    times count as 0). Each row's time is worked out once, in a materialized CTE: in the buckets'
    sums directly, SQLite and PostgreSQL would work it out again for each bucket."""
    durations = (select(label.label("value"), duration_us(s, start, end).label("us"))
                 .where(col(start).is_not(None), col(end).is_not(None), *where)
                 .cte("durations").prefix_with("MATERIALIZED"))
    us = durations.c.us
    columns: list[Any] = [durations.c.value,
                          *(func.sum(case((us <= round(le * 1_000_000), 1), else_=0)) for le in buckets),
                          func.count(), func.sum(case((us > 0, us), else_=0))]
    rows = s.exec(select(*columns).group_by(durations.c.value))
    family = HistogramMetricFamily(name, documentation, labels=[label.key])
    for value, *counts, total, total_us in sorted(rows, key=lambda row: row[0]):
        family.add_metric([value], [*((str(le), float(n)) for le, n in zip(buckets, counts, strict=True)),
                                    ("+Inf", float(total))], sum_value=int(total_us) / 1_000_000)
    return family


class PlatformCollector(Collector):
    def __init__(self, p: Platform) -> None:
        self.p = p

    def collect(self) -> Iterator[Metric]:
        with self.p.reader() as s:
            ops = list(s.exec(select(Operation.kind, Operation.state, func.count())
                              .group_by(col(Operation.kind), col(Operation.state))))
            op_durations = histogram(s, "orchestrator_operation_duration_seconds",
                                     "From start to end of operations that ended.", col(Operation.kind),
                                     Operation.started_at, Operation.finished_at, OPERATION_BUCKETS,
                                     col(Operation.state).in_(ENDED_OP_STATES))
            step_durations = histogram(s, "orchestrator_step_duration_seconds",
                                       "From start to end of steps that ended, by action.", col(Step.action),
                                       Step.started_at, Step.finished_at, STEP_BUCKETS)
            jobs = list(s.exec(select(Job.state, func.count()).group_by(col(Job.state))))
            hosts = list(s.exec(select(Host.state, func.count()).group_by(col(Host.state))))
        ended = CounterMetricFamily("orchestrator_operations", "Operations that ended, by kind and outcome.",
                                    labels=["kind", "outcome"])
        now = GaugeMetricFamily("orchestrator_operations_now", "Operations queued or running now, by kind.",
                                labels=["kind", "state"])
        for kind, state, count in sorted(ops):
            if state in ENDED_OP_STATES:
                ended.add_metric([kind, state], count)
            else:
                now.add_metric([kind, state], count)
        queued = GaugeMetricFamily("orchestrator_operations_queued", "Operations waiting for their service.",
                                   value=sum(c for _, st, c in ops if st == OpState.queued))
        yield from (ended, now, queued)
        yield from (op_durations, step_durations)
        by_job_state = GaugeMetricFamily("orchestrator_jobs", "Jobs by state.", labels=["state"])
        counted = Counter({state: count for state, count in jobs})
        for state in JobState:
            by_job_state.add_metric([state.value], counted.get(state, 0))
        yield by_job_state
        by_host_state = GaugeMetricFamily("orchestrator_hosts", "Hosts by state.", labels=["state"])
        counted = Counter({state: count for state, count in hosts})
        for state in HostState:
            by_host_state.add_metric([state.value], counted.get(state, 0))
        yield by_host_state


class EnvironmentCollector(Collector):
    """One environment's services (wanted and running deploy jobs) and the hosts its jobs run on
    (or ran on, when lost with their host): 1 unless down."""

    def __init__(self, p: Platform, env: str) -> None:
        self.p = p
        self.env = env

    def collect(self) -> Iterator[Metric]:
        wanted = GaugeMetricFamily("orchestrator_service_wanted_jobs", "Deploy jobs the service should run.",
                                   labels=["env", "service"])
        running = GaugeMetricFamily("orchestrator_service_running_jobs", "Deploy jobs of the service running.",
                                    labels=["env", "service"])
        up = GaugeMetricFamily("orchestrator_host_up", "1 when the host is up (its node heartbeats).",
                               labels=["host"])
        with self.p.reader() as s:
            env = s.exec(select(Environment).where(Environment.name == self.env,
                                                   col(Environment.removed_at).is_(None))).first()
            services: list[Service] = catalogue.list_services(session=s, env=env) if env is not None else []
            counts = Counter(s.exec(
                select(Job.service_id).where(col(Job.service_id).in_([svc.id for svc in services]),
                                             Job.kind == JobKind.deploy, Job.state == JobState.running)))
            used = set(s.exec(select(Job.host).where(col(Job.service_id).in_([svc.id for svc in services]),
                                                     col(Job.state).in_((JobState.running, JobState.lost)))))
            hosts = [(n, st) for n, st in s.exec(select(Host.name, Host.state)) if n in used]
        for svc in services:
            if svc.type == "code" and svc.release is None:
                continue  # nothing pushed yet: nothing wanted
            wanted.add_metric([self.env, svc.name], svc.scale)
            running.add_metric([self.env, svc.name], counts.get(svc.id or 0, 0))
        for name, state in sorted(hosts):  # draining is not down: its jobs still run
            up.add_metric([name], 0 if state == HostState.down else 1)
        yield from (wanted, running, up)
