"""The platform's side of logging, without Docker: the logging service's two ports, where the
shippers send, the dashboards, reading a store that does not run, --since, and the events an
operation writes to its environment's log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from orchestrator import catalogue, logs, requests, who
from orchestrator.errors import BadInput, NotFound
from orchestrator.logship import Target
from orchestrator.models import JobState, Operation, OpKind, OpParams, OpState, OpTrigger, ServiceType
from orchestrator.placement import free_port
from orchestrator.rules import check_variables
from orchestrator.settings import Settings
from tests.harness import platform_key
from tests.unit.world import ENV, LOG_IMAGE, PORT_MIN, World


def add_logging(world: World) -> None:
    requests.add_service(world.platform, env=ENV, name="logging", type=ServiceType.logging, image=LOG_IMAGE,
                         command=None, scale=1, size="xs")
    world.run_all()


def test_free_port_with_a_span_needs_every_port_of_it() -> None:
    assert free_port({20001}, 20000, 20010, span=2) == 20002
    assert free_port({20000, 20003}, 20000, 20010, span=2) == 20001
    assert free_port(set(), 20000, 20001, span=2) == 20000
    assert free_port({20001}, 20000, 20002, span=2) is None
    assert free_port(set(), 20000, 20003, lambda p: p != 20001, span=2) == 20002


def test_the_logging_job_holds_its_port_and_the_next(world: World) -> None:
    add_logging(world)
    [job] = world.jobs("logging")
    svc = world.service("logging")
    assert job.state == JobState.running and job.port == PORT_MIN
    assert job.environment["PORT"] == str(PORT_MIN) and job.environment["SYSLOG_PORT"] == str(PORT_MIN + 1)
    assert (svc.port, svc.host) == (job.port, job.host)  # kept: the shippers' target stays true
    assert job.environment["LOG_USER"] == svc.credentials["user"]
    assert job.environment["LOG_PASSWORD"] == svc.credentials["password"] and len(svc.credentials["password"]) >= 20
    # Another service's job on that host never takes the syslog port.
    world.code_service("web", scale=2)
    ports = {j.port for j in world.jobs("web") if j.host == job.host}
    assert ports and not ports & {PORT_MIN, PORT_MIN + 1}


def test_shippers_send_to_every_placed_logging_service(world: World) -> None:
    with world.platform.reader() as s:
        assert catalogue.log_targets(session=s) == []
    add_logging(world)
    [job] = world.jobs("logging")
    with world.platform.reader() as s:
        address = catalogue.get_host(session=s, name=job.host).address
        assert catalogue.log_targets(session=s) == [Target(ENV, address, PORT_MIN + 1)]
    # A logging service that is down stays a target: its lines wait on the hosts.
    with world.platform.session() as s:
        catalogue.set_job_state(session=s, job_id=job.id, state=JobState.failed)
        s.commit()
    with world.platform.reader() as s:
        assert catalogue.log_targets(session=s) == [Target(ENV, address, PORT_MIN + 1)]


def test_dashboards_mask_the_password_unless_asked(world: World) -> None:
    add_logging(world)
    svc = world.service("logging")
    with world.platform.reader() as s:
        env = catalogue.get_env(session=s, name=ENV)
        masked = catalogue.dashboards(session=s, env=env)["logging"]
        shown = catalogue.dashboards(session=s, env=env, show_secrets=True)["logging"]
    assert masked.password == "*****" and shown.password == svc.credentials["password"]
    assert shown.url.endswith(f":{svc.port}/") and shown.user == svc.credentials["user"]


def test_reading_refuses_what_does_not_exist_and_names_a_logging_service_that_is_down(world: World) -> None:
    with world.platform.reader() as s, pytest.raises(BadInput, match=f"environment {ENV} has no logging service"):
        logs.check_query(s, ENV, logs.LogQuery())
    add_logging(world)
    world.code_service("web", scale=1)
    [job] = world.jobs("logging")
    with world.platform.reader() as s:
        assert logs.check_query(s, ENV, logs.LogQuery(service="web")).service == "logging"
        with pytest.raises(NotFound, match="no service"):
            logs.check_query(s, ENV, logs.LogQuery(service="nosuch"))
        with pytest.raises(NotFound, match="no job nosuch"):
            logs.check_query(s, ENV, logs.LogQuery(job="nosuch"))
        with pytest.raises(NotFound, match="is not a job of service web"):
            logs.check_query(s, ENV, logs.LogQuery(service="web", job=job.id))
        with pytest.raises(BadInput, match="number of lines"):
            logs.check_query(s, ENV, logs.LogQuery(limit=0))
    with world.platform.session() as s:
        catalogue.set_job_state(session=s, job_id=job.id, state=JobState.failed)
        s.commit()
    with world.platform.reader() as s, pytest.raises(
            catalogue.LoggingDown, match=f"the logging service logging of environment {ENV} is not running "
                                         f"\\(its last job {job.id} is failed\\)"):
        logs.check_query(s, ENV, logs.LogQuery())


def test_since_takes_a_duration_or_a_time() -> None:
    now = 1_800_000_000.0
    assert logs.parse_since("90s", now) == now - 90
    assert logs.parse_since("10m", now) == now - 600
    assert logs.parse_since("2h", now) == now - 7200
    assert logs.parse_since("1.5d", now) == now - 129600
    assert logs.parse_since("2026-11-29T14:02:00") == datetime(2026, 11, 29, 14, 2, tzinfo=UTC).timestamp()
    assert logs.parse_since("2026-11-29T14:02:00+01:00") == datetime(2026, 11, 29, 13, 2, tzinfo=UTC).timestamp()
    for bad in ("yesterday", "10", "-5m", "5 m", ""):
        with pytest.raises(BadInput, match="--since"):
            logs.parse_since(bad, now)


def _op(**fields: object) -> Operation:
    started = datetime(2026, 11, 29, 14, 2, 0, 250000, tzinfo=UTC)
    op = Operation(id=12, kind=OpKind.redeploy, env_id=1, service_id=1, trigger=OpTrigger.manual,
                   state=OpState.running, started_at=started)
    op.parameters = OpParams(requested_by="ann@box")
    for name, value in fields.items():
        setattr(op, name, value)
    return op


def test_an_operation_logs_its_start_and_its_end_once() -> None:
    op = _op()
    [(logged, start)] = logs.events_of(op, "web")
    assert logged == catalogue.logs.LOGGED_START
    key = f"op-12-{int(op.created_at.timestamp() * 1e6)}"  # unique beyond this catalogue
    assert start == {"id": f"{key}-start", "time": "2026-11-29T14:02:00.250000Z", "service": "web",
                     "line": "operation 12 (redeploy of web) started; trigger manual, asked by ann@box"}
    assert op.started_at is not None
    ended = _op(state=OpState.failed, error="job x did not listen", logged=catalogue.logs.LOGGED_START,
                finished_at=op.started_at + timedelta(seconds=3.5))
    [(logged, end)] = logs.events_of(ended, "web")
    assert logged == catalogue.logs.LOGGED_ALL and end["id"] == f"op-12-{int(ended.created_at.timestamp() * 1e6)}-end"
    assert end["line"] == "operation 12 (redeploy of web) failed after 3.5s: job x did not listen"
    healed = _op(trigger=OpTrigger.heal, kind=OpKind.recover)
    healed.parameters = OpParams()
    assert logs.events_of(healed, "web")[0][1]["line"].endswith("trigger heal, asked by the platform")
    assert logs.events_of(_op(logged=catalogue.logs.LOGGED_ALL, finished_at=None), "web") == []


def test_operations_say_who_asked(world: World) -> None:
    world.code_service("web", scale=1)
    asked = who.asker.set("ann@box")
    try:
        op = requests.request_redeploy(world.platform, env=ENV, service="web")
    finally:
        who.asker.reset(asked)
    assert world.operation(op.id or 0).parameters.requested_by == "ann@box"
    assert world.operations("web")[0].parameters.requested_by is None  # asked before: nobody said


def test_the_harness_names_shippers_as_the_platform_does() -> None:
    url = "sqlite:////tmp/x/catalogue.db"
    assert platform_key(url) == Settings(database_url=url).platform_key


def test_only_support_redeploys_the_logging_service_to_take_new_retention(world: World) -> None:
    add_logging(world)
    with pytest.raises(BadInput, match="cannot be redeployed through the CLI or API"):
        requests.request_redeploy(world.platform, env=ENV, service="logging")
    with world.platform.session() as s:
        _, svc = catalogue.get_service(session=s, env=ENV, name="logging")
        catalogue.set_variables(session=s, service=svc, values={"LOG_RETENTION": "3d"})
        s.commit()
    [old] = world.jobs("logging")
    requests.request_redeploy(world.platform, env=ENV, service="logging", support=True)
    world.run_all()
    [new] = world.jobs("logging")
    assert new.id != old.id and new.environment["LOG_RETENTION"] == "3d"
    assert (new.host, new.port) == (old.host, old.port)  # its volume's host, its kept ports


def test_the_ports_the_platform_sets_are_not_user_variables() -> None:
    for name in ("PORT", "SYSLOG_PORT", "BLACKBOX_PORT", "ORCH_JOB"):
        with pytest.raises(BadInput, match=f"{name} is set by the platform"):
            check_variables({name: "514"})


def test_a_placeholder_logging_service_is_brought_up_to_date_by_a_support_redeploy(world: World) -> None:
    """An environment made before logging was real: busybox, a command, no credentials."""
    requests.add_service(world.platform, env=ENV, name="logging", type=ServiceType.logging, image=LOG_IMAGE,
                         command="sleep 1000", scale=1, size="xs")
    with world.platform.session() as s:
        _, svc = catalogue.get_service(session=s, env=ENV, name="logging")
        svc.credentials = {}
        s.add(svc)
        s.commit()
    world.run_all()
    with world.platform.reader() as s:
        assert catalogue.log_targets(session=s) == []  # nothing listens there: no shipper sends to it
        assert "logging" not in catalogue.dashboards(session=s, env=catalogue.get_env(session=s, name=ENV))
    requests.request_redeploy(world.platform, env=ENV, service="logging", support=True)
    world.run_all()
    svc = world.service("logging")
    [job] = world.jobs("logging")
    assert svc.image == world.platform.settings.image_logging and svc.command is None
    assert job.environment["LOG_PASSWORD"] == svc.credentials["password"]
    with world.platform.reader() as s:
        assert [t.env for t in catalogue.log_targets(session=s)] == [ENV]


def test_only_environments_with_a_placed_logging_service_have_events_waiting(world: World) -> None:
    world.code_service("web", scale=1)
    with world.platform.reader() as s:
        assert catalogue.unlogged_operations(session=s) == []  # no logging: nothing waits, nothing blocks
    add_logging(world)
    with world.platform.reader() as s:
        waiting = {(op.kind, svc) for op, _, svc in catalogue.unlogged_operations(session=s)}
    assert ("deploy", "web") in waiting and ("deploy", "logging") in waiting
