"""Reading an environment's log, and writing the platform's own events into it.

Every job's lines travel without the control plane: Docker's json-file log on the job's host →
that host's log shipper (rsyslog, ``workers.logship``; queued on the host's disk while the
logging service is away) → RELP → the environment's logging service (rsyslog → its store). Here:
the one way the CLI and the API read that store (``read``), and the platform's events (its
operations' starts and ends, their trigger and who asked) sent to the same store, so "what
happened at 14:02" has one answer (``EventLog``).
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlmodel import Session

from orchestrator import catalogue
from orchestrator.catalogue.logs import LOGGED_ALL, LOGGED_START, LogEndpoint, LoggingDown, event_time
from orchestrator.errors import BadInput, NotFound
from orchestrator.httpauth import basic_auth
from orchestrator.models import Job, Operation
from orchestrator.periodic import Periodic
from orchestrator.platform import Platform

log = logging.getLogger(__name__)

FIELDS = ("time", "env", "service", "job", "kind", "host", "release", "line")
MAX_LINES = 10_000
TIMEOUT = 5.0  # seconds to wait for the logging service's answer
FOLLOW_TIMEOUT = 20.0  # a follow hears a keep-alive every 5 s: silence this long is a store gone
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(s|m|h|d)")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Operations the platform asks for itself (a user's have who asked in their parameters).
AUTOMATIC = frozenset({"host-lost", "drain", "heal", "revert"})


@dataclass(frozen=True)
class LogQuery:
    """What ``logs`` asks for. ``since`` is a Unix time."""

    service: str | None = None
    job: str | None = None
    since: float | None = None
    grep: str | None = None
    limit: int = 1000

    def params(self, follow: bool = False) -> dict[str, str]:
        asked = {"service": self.service, "job": self.job, "grep": self.grep,
                 "since": None if self.since is None else f"{self.since:.6f}", "limit": str(self.limit)}
        return {k: v for k, v in asked.items() if v is not None} | ({"follow": "1"} if follow else {})


def parse_since(text: str, now: float | None = None) -> float:
    """A duration back from now (``90s``, ``10m``, ``2h``, ``7d``) or a time (ISO 8601, UTC
    unless it says otherwise), as a Unix time."""
    text = text.strip()
    match = _DURATION.fullmatch(text)
    if match:
        return (time.time() if now is None else now) - float(match[1]) * _UNIT[match[2]]
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadInput(f"--since {text!r} is neither a duration (30s, 10m, 2h, 7d) nor a time "
                       "(2026-11-29T14:02:00)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def check_query(s: Session, env: str, query: LogQuery) -> LogEndpoint:
    """The environment's logging service, once the query names only what exists: a service or
    a job that does not is NotFound (exit 2, 404); a logging service that does not run is
    LoggingDown, naming it."""
    environment = catalogue.get_env(session=s, name=env)
    if query.limit < 1 or query.limit > MAX_LINES:
        raise BadInput(f"the number of lines must be 1 to {MAX_LINES}, not {query.limit}")
    if query.service is not None:
        catalogue.get_service(session=s, env=env, name=query.service)
    if query.job is not None:
        job = s.get(Job, query.job)
        services = {svc.id: svc.name for svc in catalogue.list_services(session=s, env=environment)}
        if job is None or job.service_id not in services:
            raise NotFound(f"no job {query.job} in environment {env}")
        if query.service is not None and services[job.service_id] != query.service:
            raise NotFound(f"job {query.job} is not a job of service {query.service}")
    return catalogue.logging_endpoint(session=s, env=environment)


def read(p: Platform, env: str, query: LogQuery) -> list[dict[str, Any]]:
    """The last ``query.limit`` matching lines, oldest first."""
    with p.reader() as s:
        endpoint = check_query(s, env, query)
    body = _request(endpoint, "GET", "/api/logs?" + urllib.parse.urlencode(query.params()))
    return [shown(line) for line in json.loads(body)["lines"]]


def follow(p: Platform, env: str, query: LogQuery) -> Iterator[dict[str, Any] | None]:
    """The last lines, then each new one as it is stored, until the caller stops; None for
    the logging service's keep-alives (a caller may write something to notice a reader gone).
    The query is checked, and the logging service asked, before this returns."""
    with p.reader() as s:
        endpoint = check_query(s, env, query)
    connection = _connect(endpoint, timeout=FOLLOW_TIMEOUT)
    try:
        response = _send(connection, endpoint, "GET", "/api/logs?" + urllib.parse.urlencode(query.params(True)))
    except BaseException:
        connection.close()
        raise
    return _streamed(connection, response)


def _streamed(connection: http.client.HTTPConnection,
              response: http.client.HTTPResponse) -> Iterator[dict[str, Any] | None]:
    try:
        for raw in response:
            yield shown(json.loads(raw)) if raw.strip() else None
    finally:
        connection.close()


def shown(line: Mapping[str, Any]) -> dict[str, Any]:
    """A stored line as the CLI and the API give it: the documented fields, in their order."""
    return {name: line.get(name) for name in FIELDS}


def _connect(endpoint: LogEndpoint, timeout: float | None = TIMEOUT) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(endpoint.address, endpoint.port, timeout=timeout)


def _send(connection: http.client.HTTPConnection, endpoint: LogEndpoint, method: str, path: str,
          body: bytes | None = None) -> http.client.HTTPResponse:
    headers = {"Authorization": basic_auth(endpoint.user, endpoint.password), "Content-Type": "application/json"}
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        raise LoggingDown(f"the logging service {endpoint.service} of environment {endpoint.env} does not answer "
                          f"at {endpoint.address}:{endpoint.port}: {exc}") from None
    if response.status != 200:
        detail = response.read(500).decode(errors="replace").strip()
        if response.status == 400:
            raise BadInput(f"the logging service refused the query: {detail}")
        raise LoggingDown(f"the logging service {endpoint.service} of environment {endpoint.env} answered "
                          f"{response.status}: {detail}")
    return response


def _request(endpoint: LogEndpoint, method: str, path: str, body: bytes | None = None) -> bytes:
    connection = _connect(endpoint)
    try:
        return _send(connection, endpoint, method, path, body).read()
    except (OSError, http.client.HTTPException) as exc:
        raise LoggingDown(f"the logging service {endpoint.service} of environment {endpoint.env} broke off: "
                          f"{exc}") from None
    finally:
        connection.close()


# --- the platform's events ------------------------------------------------------------------------


def events_of(op: Operation, service: str) -> list[tuple[int, dict[str, str]]]:
    """The log events of an operation not yet logged: (what is logged once it is stored, event)."""
    what = f"operation {op.id} ({op.kind} of {service})"
    # Unique beyond this catalogue: another platform's operation of that number may have written
    # to the same store (its data volume outlives the environment).
    key = f"op-{op.id}-{int(op.created_at.timestamp() * 1e6)}"
    who = op.parameters.requested_by or ("the platform" if op.trigger in AUTOMATIC else "unknown")
    events: list[tuple[int, dict[str, str]]] = []
    if op.logged < LOGGED_START and op.started_at is not None:
        events.append((LOGGED_START, {
            "id": f"{key}-start", "time": event_time(op.started_at), "service": service,
            "line": f"{what} started; trigger {op.trigger}, asked by {who}"}))
    if op.finished_at is not None:
        took = f" after {(op.finished_at - op.started_at).total_seconds():.1f}s" if op.started_at else ""
        why = f": {op.error}" if op.error and op.state != "succeeded" else ""
        events.append((LOGGED_ALL, {
            "id": f"{key}-end", "time": event_time(op.finished_at), "service": service,
            "line": f"{what} {op.state}{took}{why}"}))
    return events


class EventLog:
    """Sends the platform's events to each environment's log: every interval, the operations that
    started or ended since; an environment whose logging service does not answer gets them later.
    Runs in every platform process; the store keeps an event once, whoever sends it twice."""

    def __init__(self, p: Platform) -> None:
        self.p = p

    def periodic(self) -> Periodic:
        return Periodic("log-events", self.p.settings.heartbeat_interval, self.send)

    def send(self) -> int:
        """Send what is pending; how many events were stored."""
        by_env: dict[str, list[tuple[int, int, dict[str, str]]]] = defaultdict(list)
        endpoints: dict[str, LogEndpoint | None] = {}
        with self.p.reader() as s:
            for op, env, service in catalogue.unlogged_operations(session=s):
                if env not in endpoints:
                    endpoints[env] = _endpoint(s, env)
                by_env[env] += [(op.id or 0, logged, event) for logged, event in events_of(op, service)]
        sent = 0
        for env, events in by_env.items():
            endpoint = endpoints[env]
            if endpoint is None or not events:
                continue
            try:
                _request(endpoint, "POST", "/api/events", json.dumps([e for _, _, e in events]).encode())
            except (LoggingDown, BadInput) as exc:
                log.debug("environment %s: its events wait: %s", env, exc)
                continue
            done: dict[int, int] = {}
            for op_id, logged, _ in events:
                done[op_id] = max(done.get(op_id, 0), logged)
            with self.p.session() as s:
                catalogue.mark_logged(session=s, done=sorted(done.items()))
                s.commit()
            sent += len(events)
        return sent


def _endpoint(s: Session, env: str) -> LogEndpoint | None:
    try:
        return catalogue.logging_endpoint(session=s, env=catalogue.get_env(session=s, name=env))
    except (BadInput, LoggingDown):
        return None


def render(lines: Sequence[Mapping[str, Any]]) -> Iterator[str]:
    """Lines as people read them: time, service, job (or the event's "-"), the line."""
    for line in lines:
        yield f"{line['time']} {line['service'] or '-'} {line['job'] or '-'} {line['line']}"
