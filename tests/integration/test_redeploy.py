"""Push, redeploy, scale and overlap through the CLI, checked in Docker and the catalogue."""

from __future__ import annotations

import socket
import time

import docker
import pytest

from tests.conftest import Cli, containers
from tests.harness import HTTPD, SAMPLE_IMAGE
from tests.helpers import jobs_json

pytestmark = pytest.mark.e2e


def test_push_redeploy_scale(cli: Cli, env_name: str, docker_client: docker.DockerClient) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD, "--scale", "2")
    assert containers(docker_client, env_name) == {}  # a code service runs nothing before a push

    cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--wait")
    first = containers(docker_client, env_name, "web")
    assert len(first) == 2
    catalogue_jobs = jobs_json(cli, env_name)
    assert {j["id"] for j in catalogue_jobs} == set(first)
    assert {j["container_id"] for j in catalogue_jobs} == set(first.values())
    assert all(j["state"] == "running" and j["release"] == 1 for j in catalogue_jobs)

    cli.ok("vars", "set", env_name, "web", "GREETING=hi")
    cli.ok("redeploy", env_name, "web", "--wait")
    second = containers(docker_client, env_name, "web")
    assert len(second) == 2 and not set(second.values()) & set(first.values())
    for cid in second.values():
        out = docker_client.containers.get(cid).exec_run(["sh", "-c", "echo $GREETING"]).output.decode()
        assert out.strip() == "hi"

    cli.ok("scale", env_name, "web", "4", "--wait")
    third = containers(docker_client, env_name, "web")
    assert len(third) == 4 and set(second.items()) <= set(third.items())

    cli.ok("scale", env_name, "web", "1", "--wait")
    fourth = containers(docker_client, env_name, "web")
    assert len(fourth) == 1 and set(fourth.items()) <= set(third.items())


def test_overlap_runs_old_and_new_side_by_side(cli: Cli, env_name: str,
                                               docker_client: docker.DockerClient) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD, "--scale", "2")
    cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--wait")
    old = set(containers(docker_client, env_name, "web").values())
    cli.ok("services", "update", env_name, "web", "--overlap", "6", "--support")
    proc = cli.popen("redeploy", env_name, "web", "--wait")
    seen_both = False
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        now = set(containers(docker_client, env_name, "web").values())
        if len(now) == 4 and old <= now:
            seen_both = True
            break
        time.sleep(0.1)
    assert seen_both, "old and new jobs never ran side by side"
    time.sleep(1.5)  # still inside the overlap period
    assert len(containers(docker_client, env_name, "web")) == 4
    assert proc.wait(timeout=30) == 0
    final = set(containers(docker_client, env_name, "web").values())
    assert len(final) == 2 and not final & old


def test_a_port_held_outside_the_platform_is_skipped(cli: Cli, env_name: str, node: str,
                                                     platform_env: dict[str, str],
                                                     docker_client: docker.DockerClient) -> None:
    from orchestrator import catalogue
    from orchestrator.db import make_engine, session
    from orchestrator.placement import free_port

    with session(make_engine(platform_env["ORCH_DATABASE_URL"])) as s:
        load = next(h for h in catalogue.host_loads(session=s) if h.name == node)
    wanted = free_port(load.used_ports, int(platform_env["ORCH_PORT_MIN"]),
                       int(platform_env["ORCH_PORT_MAX"]))
    assert wanted is not None
    squatter = socket.create_server(("127.0.0.1", wanted))  # the port the planner will pick
    try:
        cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD)
        cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--wait")
        (job,) = jobs_json(cli, env_name)
        assert job["state"] == "running" and job["port"] != wanted
        container = docker_client.containers.get(str(job["container_id"]))
        env = dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])
        assert env["PORT"] == str(job["port"])
        with socket.create_connection(("127.0.0.1", int(str(job["port"]))), timeout=2):
            pass
    finally:
        squatter.close()
