"""Issue 4, end to end: workers, releases and rollback, sizes, the auto-included services and the
redeploy rules, checked in Docker (containers, labels, limits) and through the CLI's JSON."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import docker
import pytest
import redis

from orchestrator.names import LABEL_ENV
from tests.conftest import Cli, containers
from tests.harness import HTTPD, SAMPLE_IMAGE
from tests.helpers import jobs_json, op_json, op_of, ops_json, service_json, wait_op
from tests.integration.service_helpers import (
    OP_TIMEOUT,
    PYAPP,
    PYAPP_WEB,
    REDIS,
    add_and_wait,
    container_env,
    remove_env_leftovers,
    vars_json,
)

pytestmark = pytest.mark.e2e

WORKER = "python3 /app/app.py worker"  # increments Redis key ticks:$ORCH_TARGET every 0.5 s
SLEEPER = "exec sleep 100000"
MIB = 1024 * 1024


@pytest.fixture
def env(cli: Cli, env_name: str, docker_client: docker.DockerClient) -> Iterator[str]:
    yield env_name
    remove_env_leftovers(cli, docker_client, env_name)


def by_kind(client: docker.DockerClient, env: str, service: str, kind: str) -> dict[str, Any]:
    """Job id -> container of the service's running containers of one kind, as Docker says."""
    found = client.containers.list(filters={"label": [
        f"{LABEL_ENV}={env}", f"orchestrator.service={service}", f"orchestrator.kind={kind}"]})
    return {c.labels["orchestrator.job"]: c for c in found}


def ids(found: dict[str, Any]) -> set[str]:
    return {c.id for c in found.values()}


def worker_list(cli: Cli, env: str, service: str) -> list[dict[str, Any]]:
    return json.loads(cli.ok("worker", "list", env, service, "--json"))  # type: ignore[no-any-return]


def refused(cli: Cli, *args: str) -> str:
    """The command exits 2 with a one-line reason on stderr; returns the reason."""
    result = cli(*args)
    assert result.exit_code == 2, f"{args} -> {result.exit_code}: {result.output}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# --- workers ---------------------------------------------------------------------------------------


def test_worker_deploy_scale_list_rm_and_redeploy(cli: Cli, env: str,
                                                  docker_client: docker.DockerClient) -> None:
    add_and_wait(cli, env, "cache", "--type", "redis", "--image", REDIS)
    cli.ok("services", "add", env, "web", "--type", "code", "--command", PYAPP_WEB)
    assert "push" in refused(cli, "worker", "deploy", env, "web", "ticker", "--command", WORKER)
    cli.ok("push", env, "web", PYAPP, "--wait")
    assert by_kind(docker_client, env, "web", "worker") == {}  # none until `worker deploy`
    assert worker_list(cli, env, "web") == []
    deploy_before = ids(by_kind(docker_client, env, "web", "deploy"))
    assert len(deploy_before) == 1

    cli.ok("worker", "deploy", env, "web", "ticker", "--command", WORKER, "--wait")
    first = by_kind(docker_client, env, "web", "worker")
    assert len(first) == 1
    (container,) = first.values()
    assert container.labels["orchestrator.target"] == "ticker"
    assert container.labels["orchestrator.service"] == "web"
    job_env = container_env(container)
    assert "PORT" not in job_env, "a worker job binds no port"
    assert job_env["ORCH_KIND"] == "worker" and job_env["ORCH_TARGET"] == "ticker"
    workers_in_catalogue = [j for j in jobs_json(cli, env, "web") if j["kind"] == "worker"]
    assert [(j["id"], j["target"], j["port"], j["state"], j["container_id"])
            for j in workers_in_catalogue] == [(next(iter(first)), "ticker", None, "running", container.id)]

    # The worker really runs: it counts ticks in the environment's Redis.
    r = redis.Redis.from_url(vars_json(cli, env, "web", secrets=True)["REDIS_URL"]["value"])
    deadline = time.monotonic() + 15
    while int(r.get("ticks:ticker") or 0) < 2:
        assert time.monotonic() < deadline, "the worker never ticked"
        time.sleep(0.2)

    # Scale N, +N, -N: up starts only the extra jobs, down stops only the surplus.
    cli.ok("worker", "scale", env, "web", "ticker", "3", "--wait")
    second = by_kind(docker_client, env, "web", "worker")
    assert len(second) == 3 and ids(first) <= ids(second)
    cli.ok("worker", "scale", env, "web", "ticker", "+2", "--wait")
    third = by_kind(docker_client, env, "web", "worker")
    assert len(third) == 5 and ids(second) <= ids(third)
    cli.ok("worker", "scale", env, "web", "ticker", "-3", "--wait")
    fourth = by_kind(docker_client, env, "web", "worker")
    assert len(fourth) == 2 and ids(fourth) <= ids(third)
    assert "below 0" in refused(cli, "worker", "scale", env, "web", "ticker", "-3")
    assert worker_list(cli, env, "web") == [
        {"target": "ticker", "command": WORKER, "scale": 2, "running": 2}]
    assert all(j["port"] is None for j in jobs_json(cli, env, "web") if j["kind"] == "worker")
    assert ids(by_kind(docker_client, env, "web", "deploy")) == deploy_before  # untouched

    # A redeploy of the service redeploys its worker jobs too: new containers, same count.
    cli.ok("redeploy", env, "web", "--wait")
    fifth = by_kind(docker_client, env, "web", "worker")
    assert len(fifth) == 2 and not ids(fifth) & ids(fourth)
    assert {c.labels["orchestrator.target"] for c in fifth.values()} == {"ticker"}
    assert not ids(by_kind(docker_client, env, "web", "deploy")) & deploy_before
    assert worker_list(cli, env, "web")[0]["running"] == 2

    # rm stops them; later redeploys leave the target out.
    cli.ok("worker", "rm", env, "web", "ticker", "--wait")
    assert by_kind(docker_client, env, "web", "worker") == {}
    assert worker_list(cli, env, "web") == []
    cli.ok("redeploy", env, "web", "--wait")
    assert by_kind(docker_client, env, "web", "worker") == {}
    assert len(by_kind(docker_client, env, "web", "deploy")) == 1
    assert [j["kind"] for j in jobs_json(cli, env, "web")] == ["deploy"]


# --- releases --------------------------------------------------------------------------------------


@pytest.fixture
def two_tags(docker_client: docker.DockerClient) -> Iterator[tuple[str, str]]:
    """Two local tags of the sample image, removed afterwards."""
    repo = f"orch/test-release-{uuid.uuid4().hex[:8]}"
    image = docker_client.images.get(SAMPLE_IMAGE)
    image.tag(repo, "v1")
    image.tag(repo, "v2")
    yield f"{repo}:v1", f"{repo}:v2"
    for tag in (f"{repo}:v1", f"{repo}:v2"):
        docker_client.images.remove(tag, force=True, noprune=True)  # untags only


def test_releases_and_rollback(cli: Cli, env: str, docker_client: docker.DockerClient,
                               two_tags: tuple[str, str]) -> None:
    v1, v2 = two_tags
    cli.ok("services", "add", env, "web", "--type", "code", "--command", HTTPD, "--scale", "2")
    cli.ok("push", env, "web", v1, "--wait")
    cli.ok("worker", "deploy", env, "web", "bg", "--command", SLEEPER, "--wait")
    at_v1 = by_kind(docker_client, env, "web", "deploy")
    workers_v1 = by_kind(docker_client, env, "web", "worker")
    assert {c.labels["orchestrator.release"] for c in [*at_v1.values(), *workers_v1.values()]} == {"1"}
    second_push = op_of(cli.ok("push", env, "web", v2, "--wait"))
    assert op_json(cli, second_push)["trigger"] == "push"
    assert op_json(cli, second_push)["kind"] == "redeploy"

    releases = json.loads(cli.ok("releases", "list", env, "web", "--json"))
    assert [(r["number"], r["image"]) for r in releases] == [(1, v1), (2, v2)]
    at_v2 = by_kind(docker_client, env, "web", "deploy")
    assert len(at_v2) == 2 and not ids(at_v2) & ids(at_v1)
    assert {(c.labels["orchestrator.release"], c.attrs["Config"]["Image"]) for c in at_v2.values()} \
        == {("2", v2)}
    # A push redeploys the worker jobs too, onto the new release.
    workers_v2 = by_kind(docker_client, env, "web", "worker")
    assert len(workers_v2) == 1 and not ids(workers_v2) & ids(workers_v1)
    assert {(c.labels["orchestrator.release"], c.attrs["Config"]["Image"]) for c in workers_v2.values()} \
        == {("2", v2)}

    rollback = op_of(cli.ok("rollback", env, "web", "1", "--wait"))
    back = by_kind(docker_client, env, "web", "deploy")
    assert len(back) == 2 and not ids(back) & ids(at_v2)
    assert {(c.labels["orchestrator.release"], c.attrs["Config"]["Image"]) for c in back.values()} \
        == {("1", v1)}
    assert {container_env(c)["ORCH_RELEASE"] for c in back.values()} == {"1"}
    workers_back = by_kind(docker_client, env, "web", "worker")
    assert len(workers_back) == 1 and not ids(workers_back) & ids(workers_v2)
    assert {(c.labels["orchestrator.release"], c.attrs["Config"]["Image"]) for c in workers_back.values()} \
        == {("1", v1)}
    assert {(j["kind"], j["release"], j["image"]) for j in jobs_json(cli, env, "web")} == {
        ("deploy", 1, v1), ("worker", 1, v1)}
    shown = service_json(cli, env, "web")
    assert (shown["release"], shown["image"]) == (1, v1)
    op = op_json(cli, rollback)
    assert (op["kind"], op["trigger"], op["state"]) == ("redeploy", "rollback", "succeeded")
    assert len(json.loads(cli.ok("releases", "list", env, "web", "--json"))) == 2

    assert "release 3" in refused(cli, "rollback", env, "web", "3")
    assert ids(by_kind(docker_client, env, "web", "deploy")) == ids(back)


# --- sizes -----------------------------------------------------------------------------------------


def limits(container: Any) -> tuple[int, int, int]:
    host = container.attrs["HostConfig"]
    return host["Memory"], host["MemorySwap"], host["NanoCpus"]


def test_sizes_are_enforced_on_containers(cli: Cli, env: str, docker_client: docker.DockerClient) -> None:
    add_and_wait(cli, env, "cache", "--type", "redis", "--image", REDIS, "--size", "m")
    (cache,) = by_kind(docker_client, env, "cache", "deploy").values()
    assert limits(cache) == (512 * MIB, 512 * MIB, 1_000_000_000)

    cli.ok("services", "add", env, "web", "--type", "code", "--command", HTTPD,
           "--scale", "2", "--size", "300m:0.5")
    assert service_json(cli, env, "web")["size"] == "300m:0.5"
    cli.ok("push", env, "web", SAMPLE_IMAGE, "--wait")
    cli.ok("worker", "deploy", env, "web", "bg", "--command", SLEEPER, "--wait")
    cli.ok("worker", "scale", env, "web", "bg", "+1", "--wait")
    deploy = by_kind(docker_client, env, "web", "deploy")
    workers = by_kind(docker_client, env, "web", "worker")
    assert len(deploy) == 2 and len(workers) == 2
    for container in [*deploy.values(), *workers.values()]:
        assert limits(container) == (300 * MIB, 300 * MIB, 500_000_000), container.name

    assert "size" in refused(cli, "services", "add", env, "bad", "--type", "redis", "--image", REDIS,
                             "--size", "huge")


def test_cache_above_scale_one_is_refused(cli: Cli, env: str, docker_client: docker.DockerClient) -> None:
    """A cache keeps one port for life (its URL stays true), so it runs one job, like a database."""
    result = cli("services", "add", env, "cache", "--type", "redis", "--image", REDIS, "--scale", "2")
    assert result.exit_code == 2 and "scale" in result.stderr, result.output
    assert by_kind(docker_client, env, "cache", "deploy") == {}
    wait_op(cli, op_of(cli.ok("services", "add", env, "cache", "--type", "redis", "--image", REDIS)), OP_TIMEOUT,
            succeed=True)
    port = service_json(cli, env, "cache")["port"]
    assert "scale" in refused(cli, "scale", env, "cache", "2")
    cli.ok("redeploy", env, "cache", "--wait")
    assert len(by_kind(docker_client, env, "cache", "deploy")) == 1
    assert service_json(cli, env, "cache")["port"] == port


# --- redeploy rules --------------------------------------------------------------------------------


def test_not_redeployable_service_redeploys_only_with_support(
        cli: Cli, env: str, docker_client: docker.DockerClient) -> None:
    cli.ok("services", "add", env, "web", "--type", "code", "--command", HTTPD)
    cli.ok("push", env, "web", SAMPLE_IMAGE, "--wait")
    assert "support" in refused(cli, "services", "update", env, "web", "--not-redeployable")
    assert "support" in refused(cli, "services", "update", env, "web", "--overlap", "5")
    assert service_json(cli, env, "web")["redeployable"] is True
    cli.ok("services", "update", env, "web", "--not-redeployable", "--support")
    assert service_json(cli, env, "web")["redeployable"] is False

    before = containers(docker_client, env, "web")
    ops_before = len(ops_json(cli, env))
    assert "support" in refused(cli, "redeploy", env, "web")
    assert containers(docker_client, env, "web") == before
    assert len(ops_json(cli, env)) == ops_before

    op_id = op_of(cli.ok("redeploy", env, "web", "--support", "--wait"))
    op = op_json(cli, op_id)
    assert (op["kind"], op["trigger"], op["state"]) == ("redeploy", "support", "succeeded")
    after = containers(docker_client, env, "web")
    assert len(after) == 1 and not set(after.values()) & set(before.values())
    assert ops_json(cli, env)[0]["trigger"] == "support"


@pytest.fixture
def defaults_env(cli: Cli, docker_client: docker.DockerClient) -> Iterator[Callable[..., str]]:
    """Creates environments WITH the auto-included services; their containers go afterwards."""
    made: list[str] = []

    def create(*flags: str) -> str:
        name = f"d{uuid.uuid4().hex[:8]}"
        made.append(name)
        out = cli.ok("env", "create", name, *flags)
        for line in out.splitlines():
            if line.startswith("operation "):
                wait_op(cli, op_of(line), OP_TIMEOUT, succeed=True)
        return name

    yield create
    for name in made:
        remove_env_leftovers(cli, docker_client, name)


def _passwords(url: str, user: str, password: str) -> urllib.request.HTTPPasswordMgrWithDefaultRealm:
    manager = urllib.request.HTTPPasswordMgrWithDefaultRealm()
    manager.add_password(None, url, user, password)
    return manager


def page(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
        return resp.read().decode()  # type: ignore[no-any-return]


def test_env_create_includes_logging_proxy_and_monitoring(
        cli: Cli, defaults_env: Callable[..., str], docker_client: docker.DockerClient) -> None:
    name = defaults_env()
    listed = {s["name"]: s["type"] for s in json.loads(cli.ok("services", "list", name, "--json"))}
    assert listed == {"logging": "logging", "service-proxy": "service_proxy", "monitoring": "monitoring"}
    jobs = {j["service"]: j for j in jobs_json(cli, name)}
    assert set(jobs) == set(listed)
    assert all(j["state"] == "running" for j in jobs.values())
    for service, job in jobs.items():
        running = containers(docker_client, name, service)
        assert running == {job["id"]: job["container_id"]}, service
    assert jobs["service-proxy"]["port"] is None  # it listens on the environment's own ports
    # Logging and monitoring hold their PORT and the next (syslog; the blackbox exporter).
    assert jobs["monitoring"]["port"] is not None and jobs["logging"]["port"] is not None
    # The logging dashboard answers nobody without the environment's credentials, and them with it.
    with pytest.raises(urllib.error.HTTPError) as refused_page:
        page(jobs["logging"]["port"])
    assert refused_page.value.code == 401
    board = json.loads(cli.ok("env", "show", name, "--json", "--show-secrets"))["dashboards"]["logging"]
    assert board["url"] == f"http://127.0.0.1:{jobs['logging']['port']}/"
    opener = urllib.request.build_opener(urllib.request.HTTPBasicAuthHandler(
        _passwords(board["url"], board["user"], board["password"])))
    with opener.open(board["url"], timeout=5) as resp:
        assert resp.status == 200 and name in resp.read().decode()
    # The proxy (HAProxy) listens on the environment's HTTP port: no site yet, so 404.
    http_port = json.loads(cli.ok("env", "show", name, "--json"))["proxy"]["http_port"]
    with pytest.raises(urllib.error.HTTPError) as missing:
        page(http_port)
    assert missing.value.code == 404 and missing.value.read().decode().strip() == "no such site"

    # Logging and monitoring refuse a redeploy; nothing is recorded, nothing restarts.
    before = containers(docker_client, name)
    ops_before = len(ops_json(cli, name))
    for service in ("logging", "monitoring"):
        assert "cannot be redeployed" in refused(cli, "redeploy", name, service)
    assert len(ops_json(cli, name)) == ops_before
    assert containers(docker_client, name) == before
    # The service proxy is not one of them.
    cli.ok("redeploy", name, "service-proxy", "--wait")
    for service in ("logging", "monitoring"):
        assert containers(docker_client, name, service) == {jobs[service]["id"]: jobs[service]["container_id"]}
    proxy = containers(docker_client, name, "service-proxy")
    assert len(proxy) == 1 and jobs["service-proxy"]["id"] not in proxy


def test_sandbox_env_has_no_monitoring(cli: Cli, defaults_env: Callable[..., str],
                                       docker_client: docker.DockerClient) -> None:
    name = defaults_env("--sandbox")
    listed = {s["name"] for s in json.loads(cli.ok("services", "list", name, "--json"))}
    assert listed == {"logging", "service-proxy"}
    assert set(containers(docker_client, name).values()) == {
        j["container_id"] for j in jobs_json(cli, name) if j["state"] == "running"}
    assert {c.labels["orchestrator.service"] for c in docker_client.containers.list(
        filters={"label": f"{LABEL_ENV}={name}"})} == {"logging", "service-proxy"}
