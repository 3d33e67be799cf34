"""``orchestrator dev``: the whole platform in one process, like ``nomad agent -dev``.

A SQLite catalogue, an in-process broker (Redis when ORCH_BROKER_URL is set), a node for the
local Docker engine registered as host ``local`` that also runs the control queue, and the API.
"""

from __future__ import annotations

import os
import threading
import urllib.request
from collections.abc import Callable
from typing import Any

from celery.worker import WorkController

from orchestrator import catalogue, names, operations
from orchestrator.catalogue import NotFound
from orchestrator.models import ServiceType
from orchestrator.progress import follow
from orchestrator.settings import Settings
from workers.app import NodeContext, OrchestratorCelery, make_platform
from workers.heartbeat import Heartbeat
from workers.runtime.docker import DockerRuntime

LOCAL_HOST = "local"
DEMO_ENV = "demo"
DEMO_SERVICE = "web"
DEMO_IMAGE = "orch/sample-app:1"
DEMO_COMMAND = "httpd -f -p $PORT -h /var/www"


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
    assert isinstance(app, OrchestratorCelery)
    docker_url = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    with platform.session() as s:
        try:
            host = catalogue.get_host(session=s, name=LOCAL_HOST)
        except NotFound:
            host = catalogue.add_host(session=s, name=LOCAL_HOST, docker_url=docker_url,
                                      address="127.0.0.1")
            s.commit()
    runtime = DockerRuntime(host.docker_url, pool_size=settings.node_concurrency + 4)
    app.node = NodeContext(platform=platform, host=host.name, address=host.address, runtime=runtime)
    if settings.broker_url.startswith("memory://"):
        # The in-process transport polls; its default of 1 s would add a second to every stage.
        app.conf.broker_transport_options = {**app.conf.broker_transport_options,
                                             "polling_interval": 0.02}
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
    heartbeat = Heartbeat(platform, host.name, runtime).start()
    thread = threading.Thread(target=worker.start, name="node", daemon=True)
    thread.start()
    if not worker.started.wait(30):
        echo("error: the embedded node did not start")
        return 1
    echo(f"dev platform up: catalogue {settings.database_url}, broker {settings.broker_url}, "
         f"node for {host.docker_url} as host {LOCAL_HOST}")
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
        return 0
    finally:
        heartbeat.stop()
        worker.stop(in_sighandler=False)
        thread.join(15)


def run_demo(platform: operations.Platform, echo: Callable[[str], None]) -> int:
    """Push, redeploy with a new variable, then an overlap redeploy of the sample service."""

    def step(title: str, op: Any) -> None:
        echo(f"\n== {title}")
        code = follow(lambda: _load(platform, op.id), echo)
        if code:
            raise SystemExit(code)

    with platform.session() as s:
        try:
            catalogue.get_env(session=s, name=DEMO_ENV)
        except NotFound:
            environment = catalogue.create_env(session=s, name=DEMO_ENV, sandbox=True)
            catalogue.add_service(session=s, env=environment, name=DEMO_SERVICE,
                                  type=ServiceType.code, image=None, command=DEMO_COMMAND,
                                  scale=2, size="xs")
            s.commit()
        _, svc = catalogue.get_service(session=s, env=DEMO_ENV, name=DEMO_SERVICE)
        svc.overlap = 0
        svc.variables = {**svc.variables, "GREETING": "hello"}
        s.add(svc)
        s.commit()
    step(f"push {DEMO_IMAGE} to {DEMO_ENV}/{DEMO_SERVICE} (2 jobs)",
         operations.request_push(platform, env=DEMO_ENV, service=DEMO_SERVICE, image=DEMO_IMAGE))
    _set(platform, variables={"GREETING": "hello again"})
    step("redeploy with GREETING changed: stop old jobs, start new ones",
         operations.request_redeploy(platform, env=DEMO_ENV, service=DEMO_SERVICE))
    _set(platform, overlap=3)
    step("redeploy with a 3 s overlap: new jobs first, old ones stop 3 s later",
         operations.request_redeploy(platform, env=DEMO_ENV, service=DEMO_SERVICE))
    with platform.session() as s:
        environment, svc = catalogue.get_service(session=s, env=DEMO_ENV, name=DEMO_SERVICE)
        jobs = catalogue.list_jobs(session=s, env=environment, service=svc)
    echo("\n== running jobs")
    for job in jobs:
        with urllib.request.urlopen(f"http://127.0.0.1:{job.port}/cgi-bin/info", timeout=5) as r:
            body = r.read().decode().strip()
        echo(f"  job {job.id} container {(job.container_id or '')[:12]} port {job.port}: {body}")
    echo("\ndemo done. Remove its containers with:\n"
         f"  docker rm -f $(docker ps -aq --filter label={names.LABEL_ENV}={DEMO_ENV})")
    return 0


def _set(platform: operations.Platform, *, variables: dict[str, str] | None = None,
         overlap: int | None = None) -> None:
    with platform.session() as s:
        _, svc = catalogue.get_service(session=s, env=DEMO_ENV, name=DEMO_SERVICE)
        if variables:
            svc.variables = {**svc.variables, **variables}
        if overlap is not None:
            svc.overlap = overlap
        s.add(svc)
        s.commit()


def _load(platform: operations.Platform, op_id: int) -> Any:
    with platform.reader() as s:
        return catalogue.operation_public(session=s, op=catalogue.get_operation(session=s, op_id=op_id))



