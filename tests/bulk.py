"""A catalogue at scale, for the scale test (tests/unit/test_catalogue_scale.py) and
benchmarks/catalogue.py: thousands of jobs, operations and steps written in bulk (one INSERT per
table), the listings of the CLI and the API run against it in this process, and the SQL statements
each issues."""

from __future__ import annotations

import asyncio
import contextvars
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from click.testing import CliRunner
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

from orchestrator import catalogue
from orchestrator.api.app import create_api
from orchestrator.cli import main as cli_main
from orchestrator.db import make_engines, session
from orchestrator.models import (
    Environment,
    Host,
    HostState,
    Job,
    JobKind,
    JobState,
    Operation,
    OpKind,
    OpState,
    OpTrigger,
    Role,
    Service,
    ServiceType,
    Step,
    StepAction,
    StepState,
    utcnow,
)
from orchestrator.platform import Platform
from orchestrator.settings import Settings

ENV = "big"


@dataclass
class Filled:
    """What ``fill`` wrote: the environment's name, the counts, and an API token (role user)."""

    env: str
    hosts: int
    services: int
    jobs: int
    operations: int
    token: str
    running: int = field(default=0)


def fill(engine: Engine, *, jobs: int, operations: int, services: int = 20, hosts: int = 20,
         env: str = ENV) -> Filled:
    """An empty catalogue filled with ``hosts`` hosts (up), a sandbox environment of ``services``
    code services, ``jobs`` jobs spread over them and over the hosts (four in five running, the
    others stopped: a service's history), and ``operations`` redeploys that succeeded, two steps
    each (stop, start). Every row is written by one executemany per table."""
    now = utcnow()
    with engine.begin() as conn:
        for table in reversed(SQLModel.metadata.sorted_tables):
            conn.execute(table.delete())
        conn.execute(Host.__table__.insert(), [  # type: ignore[attr-defined]
            {"id": i + 1, "name": f"h{i + 1}", "docker_url": "sim://", "address": "127.0.0.1",
             "state": HostState.up, "drained": False, "last_seen": now, "cpus": 64.0, "memory_mb": 262144,
             "created_at": now} for i in range(hosts)])
        conn.execute(Environment.__table__.insert(), [  # type: ignore[attr-defined]
            {"id": 1, "name": env, "sandbox": True, "removing": False, "created_at": now}])
        conn.execute(Service.__table__.insert(), [  # type: ignore[attr-defined]
            {"id": i + 1, "env_id": 1, "name": f"svc{i}", "type": ServiceType.code, "image": "sim/app:1",
             "command": "serve", "size": "xs", "scale": max(1, jobs // services), "overlap": 0,
             "redeployable": True, "release": 1, "variables": {"GREETING": "hello"}, "credentials": {},
             "heal_wanted": False, "heal_attempts": 0, "heal_gave_up": False, "created_at": now}
            for i in range(services)])
        variables = {f"VAR_{n}": "x" * 24 for n in range(10)}  # a job's environment, as big as a real one's
        rows = []
        for i in range(jobs):
            state = JobState.stopped if i % 5 == 4 else JobState.running
            rows.append({
                "id": f"{i:012x}", "service_id": i % services + 1, "kind": JobKind.deploy, "host": f"h{i % hosts + 1}",
                "port": 20000 + i % 10000, "container_name": f"orch_{env}_svc{i % services}_{i:012x}",
                "container_id": f"{i:064x}", "state": state, "release": 1, "image": "sim/app:1",
                "command": "serve", "size": "xs", "environment": {**variables, "PORT": str(20000 + i % 10000)},
                "args": [], "mounts": {}, "op_id": None, "route": "serving", "created_at": now - timedelta(seconds=i),
                "started_at": now - timedelta(seconds=i), "stopped_at": now if state == JobState.stopped else None})
        if rows:
            conn.execute(Job.__table__.insert(), rows)  # type: ignore[attr-defined]
        ops, steps = [], []
        for i in range(operations):
            began = now - timedelta(seconds=operations - i)
            ops.append({"id": i + 1, "kind": OpKind.redeploy, "env_id": 1, "service_id": i % services + 1,
                        "trigger": OpTrigger.manual, "state": OpState.succeeded, "params": {"requested_by": "bench"},
                        "created_at": began, "claimed_at": began, "started_at": began, "sent_at": began,
                        "finished_at": began + timedelta(seconds=1), "logged": 2})
            for n, action in enumerate((StepAction.stop, StepAction.start)):
                steps.append({"id": 2 * i + n + 1, "op_id": i + 1, "stage": n, "name": f"{action} job {i:012x}",
                              "action": action, "host": f"h{i % hosts + 1}", "job_id": f"{i:012x}",
                              "output_dropped": 0, "targets": [], "state": StepState.succeeded,
                              "started_at": began, "finished_at": began + timedelta(seconds=1)})
        if ops:
            conn.execute(Operation.__table__.insert(), ops)  # type: ignore[attr-defined]
            conn.execute(Step.__table__.insert(), steps)  # type: ignore[attr-defined]
    with session(engine) as s:
        token = catalogue.create_token(session=s, name="bulk", role=Role.user)
        s.commit()
    return Filled(env=env, hosts=hosts, services=services, jobs=jobs, operations=operations, token=token,
                  running=sum(1 for i in range(jobs) if i % 5 != 4))


SCHEMA_CHECK = ("pragma ", "sqlite_master", "pg_catalog", "pg_enum", "current_schema", "standard_conforming_strings",
                "select version()")


@dataclass
class Statements:
    """The SQL statements issued while counting (every engine of the process)."""

    texts: list[str] = field(default_factory=list)

    @property
    def rows(self) -> list[str]:
        """The statements about rows: not the schema check a process runs as it opens the
        catalogue, nor what PostgreSQL's driver asks as it connects."""
        return [t for t in self.texts if not any(w in t.lower() for w in SCHEMA_CHECK)]

    @property
    def count(self) -> int:
        return len(self.rows)


@contextmanager
def counting() -> Iterator[Statements]:
    """Count the statements every engine sends to its database inside the block."""
    seen = Statements()

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.texts.append(" ".join(statement.split())[:200])

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", record)


def api_get(app: Any, path: str, token: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """GET ``path`` (query string included) from an ASGI app in this process: (status, JSON body;
    a text body, as /metrics' is, as text)."""
    return api_call(app, path, token, headers)[:2]


def api_call(app: Any, path: str, token: str,
             headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    """``api_get`` with the answer's headers too."""
    route, _, query = path.partition("?")
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": route, "raw_path": route.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(b"host", b"test"), (b"authorization", f"Bearer {token}".encode()), *extra],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    answered = {k.decode(): v.decode() for k, v in start.get("headers", [])}
    if answered.get("content-type", "").startswith("text/"):
        return start["status"], body.decode(), answered
    return start["status"], json.loads(body) if body else None, answered


@dataclass
class Catalogue:
    """A filled catalogue, its platform, and its API in this process."""

    url: str
    platform: Platform
    filled: Filled
    api: Any

    def cli(self, *args: str) -> Any:
        """``orchestrator ARGS --json`` in this process (a new platform each time, as a CLI process
        makes), its output parsed. In a copy of the context: what the CLI sets for its process
        (who asks) stays there."""
        result = contextvars.copy_context().run(
            CliRunner().invoke, cli_main, [*args, "--json"], env={"ORCH_DATABASE_URL": self.url},
            catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def get(self, path: str) -> Any:
        status, body = api_get(self.api, path, self.filled.token)
        assert status == 200, (path, status, body)
        return body

    def close(self) -> None:
        self.platform.engine.dispose()
        self.platform.reader_engine.dispose()


def make_catalogue(url: str, *, jobs: int, operations: int, services: int = 20, hosts: int = 20) -> Catalogue:
    writer, reader = make_engines(url)
    filled = fill(writer, jobs=jobs, operations=operations, services=services, hosts=hosts)
    platform = Platform(writer, None, Settings(database_url=url), reader=reader)
    return Catalogue(url, platform, filled, create_api(platform))


# The listings of the CLI and the API that grow with the catalogue.
LISTINGS: dict[str, Callable[[Catalogue], Any]] = {
    "cli hosts list": lambda c: c.cli("hosts", "list"),
    "cli jobs list ENV": lambda c: c.cli("jobs", "list", ENV),
    "cli jobs list ENV SVC": lambda c: c.cli("jobs", "list", ENV, "svc0"),
    "cli ops list ENV": lambda c: c.cli("ops", "list", ENV),
    "cli ops list": lambda c: c.cli("ops", "list"),
    "cli services list ENV": lambda c: c.cli("services", "list", ENV),
    "cli status ENV": lambda c: c.cli("status", ENV),
    "api GET /envs/ENV/jobs": lambda c: c.get(f"/api/v1/envs/{ENV}/jobs"),
    "api GET /envs/ENV/services/SVC/jobs": lambda c: c.get(f"/api/v1/envs/{ENV}/services/svc0/jobs"),
    "api GET /operations?env=ENV": lambda c: c.get(f"/api/v1/operations?env={ENV}"),
    "api GET /operations": lambda c: c.get("/api/v1/operations"),
    "api GET /envs/ENV/services": lambda c: c.get(f"/api/v1/envs/{ENV}/services"),
    "api GET /envs/ENV": lambda c: c.get(f"/api/v1/envs/{ENV}"),
    "api GET /envs/ENV/status": lambda c: c.get(f"/api/v1/envs/{ENV}/status"),
    "api GET /metrics": lambda c: c.get("/metrics"),
}
