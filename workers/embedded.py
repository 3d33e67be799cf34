"""``orchestrator dev``: the whole platform in one process, like ``nomad agent -dev``.

A SQLite catalogue, an in-process broker (Redis when ORCH_BROKER_URL is set), a node for the
local Docker engine registered as host ``local`` that also runs the control queue, and the API.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from celery.worker import WorkController
from sqlmodel import col, select

from orchestrator import catalogue, control, names, operations, requests, who
from orchestrator import logs as env_logs
from orchestrator.catalogue import LoggingDown
from orchestrator.errors import BadInput, NotFound
from orchestrator.models import Operation, OperationPublic, OpState, ServiceType
from orchestrator.platform import Platform, make_platform
from orchestrator.progress import follow
from orchestrator.settings import Settings
from workers import broker
from workers.node import node_context, serve_host

LOCAL_HOST = "local"
DEMO_ENV = "demo"
DEMO_SERVICE = "web"
DEMO_IMAGE = "orch/sample-app:1"
DEMO_COMMAND = "httpd -f -p $PORT -h /var/www"
DEMO_SITE = "demo.localhost"


def dev_settings() -> Settings:
    """Settings for dev mode: the in-process broker unless a broker URL is configured."""
    settings = Settings()
    if "broker_url" not in settings.model_fields_set:
        settings = settings.model_copy(update={"broker_url": "memory://",
                                               "result_backend": "cache+memory://"})
    return settings


class _Worker(WorkController):
    """A worker that can be waited on until its consumer is up (it runs in a thread)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.started = threading.Event()
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer: Any) -> None:
        self.started.set()


def run_dev(settings: Settings, *, api_port: int | None, demo: bool,
            echo: Callable[[str], None]) -> int:
    platform = make_platform(settings)
    app = platform.app
    with platform.session() as s:
        try:
            docker_url = catalogue.get_host(session=s, name=LOCAL_HOST).docker_url
        except NotFound:
            docker_url = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
            catalogue.add_host(session=s, name=LOCAL_HOST, docker_url=docker_url, address="127.0.0.1")
            s.commit()
    node = node_context(platform, LOCAL_HOST, pool_size=settings.node_concurrency + 4)
    loops = serve_host(app, node)
    control.register_api(app, platform)  # the one worker also serves the control queue
    if settings.broker_url.startswith("memory://"):
        # The in-process transport polls; its default of 1 s would add a second to every stage.
        app.conf.broker_transport_options = {**app.conf.broker_transport_options,
                                             "polling_interval": 0.02}
    broker.use_for_redis_urls()
    app.finalize()
    app.set_current()  # the worker's tracer looks tasks up through the current app
    app.set_default()
    worker = _Worker(
        app=app, hostname=f"{LOCAL_HOST}@dev", pool="threads",
        concurrency=settings.node_concurrency, loglevel=os.environ.get("ORCH_DEV_LOGLEVEL", "WARNING"),
        queues=[names.host_queue(LOCAL_HOST), names.CONTROL_QUEUE],
        without_heartbeat=True, without_mingle=True, without_gossip=True, send_events=True,
        ready_callback=None,
    )
    for loop in loops:
        loop.start()
    thread = threading.Thread(target=worker.start, name="node", daemon=True)
    thread.start()
    if not worker.started.wait(30):
        echo("error: the embedded node did not start")
        return 1
    echo(f"dev platform up: catalogue {settings.database_url}, broker {settings.broker_url}, "
         f"node for {docker_url} as host {LOCAL_HOST}")
    if api_port is not None:
        from orchestrator.api.serve import serve_in_thread

        serve_in_thread(platform, api_port)
        echo(f"API on http://127.0.0.1:{api_port}/api/v1 (OpenAPI at /docs)")
    try:
        if demo:
            return run_demo(platform, echo)
        threading.Event().wait()
        return 0
    except KeyboardInterrupt:
        ended = end_unfinished(platform)
        echo(f"\ninterrupted: {len(ended)} operation(s) cancelled ({', '.join(map(str, ended)) or 'none'})")
        return 130
    finally:
        for loop in loops:
            loop.stop()
        worker.stop(in_sighandler=False)
        thread.join(15)


def end_unfinished(platform: Platform) -> list[int]:
    """Ctrl-C: the operations this one process runs end now (cancelled), so none blocks its
    service for good once the process is gone."""
    with platform.reader() as s:
        unfinished = [op.id or 0 for op in s.exec(
            select(Operation).where(col(Operation.state).in_((OpState.queued, OpState.running))))]
    ended = []
    for op_id in unfinished:
        try:
            operations.cancel(platform, op_id)
            ended.append(op_id)
        except BadInput:  # it ended meanwhile
            pass
    return ended


def run_demo(platform: Platform, echo: Callable[[str], None]) -> int:
    """Push, redeploy with a new variable, then an overlap redeploy of the sample service. The
    demo acts as support where the rules ask for it (the overlap period)."""

    def step(title: str, op: Any) -> None:
        echo(f"\n== {title}")
        code = follow(lambda: _load(platform, op.id), echo)
        if code:
            raise SystemExit(code)

    who.asker.set("the dev demo")  # what it asks for says so, in the environment's log
    with platform.reader() as s:
        exists = any(e.name == DEMO_ENV for e in catalogue.list_envs(session=s))
    if not exists:
        for op in requests.create_env(platform, name=DEMO_ENV, sandbox=True):
            step(f"deploy {_load(platform, op.id or 0).service}, included in every environment", op)
        requests.add_service(platform, env=DEMO_ENV, name=DEMO_SERVICE, type=ServiceType.code,
                             image=None, command=DEMO_COMMAND, scale=2, size="xs")
        requests.set_health_path(platform, env=DEMO_ENV, service=DEMO_SERVICE, path="/cgi-bin/info")
        requests.add_site(platform, env=DEMO_ENV, site=DEMO_SITE, service=DEMO_SERVICE)
    _change(platform, variables={"GREETING": "hello"}, overlap=0)
    step(f"push {DEMO_IMAGE} to {DEMO_ENV}/{DEMO_SERVICE} (2 jobs)",
         requests.request_push(platform, env=DEMO_ENV, service=DEMO_SERVICE, image=DEMO_IMAGE))
    _change(platform, variables={"GREETING": "hello again"})
    step("redeploy with GREETING changed: stop old jobs, start new ones",
         requests.request_redeploy(platform, env=DEMO_ENV, service=DEMO_SERVICE))
    _change(platform, overlap=3)
    step("redeploy with a 3 s overlap: new jobs first, old ones stop 3 s later",
         requests.request_redeploy(platform, env=DEMO_ENV, service=DEMO_SERVICE))
    with platform.reader() as s:
        environment, svc = catalogue.get_service(session=s, env=DEMO_ENV, name=DEMO_SERVICE)
        jobs = catalogue.list_jobs(session=s, env=environment, service=svc)
    echo("\n== running jobs")
    for job in jobs:
        with urllib.request.urlopen(f"http://127.0.0.1:{job.port}/cgi-bin/info", timeout=5) as r:
            body = r.read().decode().strip()
        echo(f"  job {job.id} container {(job.container_id or '')[:12]} port {job.port}: {body}")
    if environment.http_port is not None:
        url = f"http://127.0.0.1:{environment.http_port}/cgi-bin/info"
        echo(f"\n== the site {DEMO_SITE} through the service proxy: curl -H 'Host: {DEMO_SITE}' {url}")
        for _ in range(4):
            request = urllib.request.Request(url, headers={"Host": DEMO_SITE})
            with urllib.request.urlopen(request, timeout=5) as r:
                echo(f"  {r.status} {r.read().decode().strip()}")
    _show_log(platform, echo)
    echo("\ndemo done. Remove its containers with:\n"
         f"  docker rm -f $(docker ps -aq --filter label={names.LABEL_ENV}={DEMO_ENV})")
    return 0


def _show_log(platform: Platform, echo: Callable[[str], None], timeout: float = 20.0) -> None:
    """The end of the environment's log (its logging service): the jobs' lines and the
    platform's events, once the last redeploy's end is there."""
    echo(f"\n== the environment's log (its logging service): orchestrator logs {DEMO_ENV} -n 8")
    deadline = time.monotonic() + timeout
    lines: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            lines = env_logs.read(platform, DEMO_ENV, env_logs.LogQuery(limit=8))
        except (BadInput, LoggingDown):
            lines = []
        if any("succeeded" in line["line"] and "redeploy" in line["line"] for line in lines[-3:]):
            break
        time.sleep(0.5)
    for text in env_logs.render(lines):
        echo(f"  {text}")


def _change(platform: Platform, *, variables: dict[str, str] | None = None,
            overlap: int | None = None) -> None:
    """What a user (variables) and support (the overlap) would set between the demo's steps."""
    with platform.session() as s:
        _, svc = catalogue.get_service(session=s, env=DEMO_ENV, name=DEMO_SERVICE, for_update=True)
        if variables:
            catalogue.set_variables(session=s, service=svc, values=variables)
        if overlap is not None:
            catalogue.update_service(session=s, service=svc, overlap=overlap, redeployable=None,
                                     support=True)
        s.commit()


def _load(platform: Platform, op_id: int) -> OperationPublic:
    with platform.reader() as s:
        return catalogue.operation_public(session=s, op=catalogue.get_operation(session=s, op_id=op_id))
