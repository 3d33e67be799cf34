"""The logging service for real: two hosts (nodes on this machine's Docker engine), each with its
log shipper (rsyslog), an environment's logging service (rsyslog + its store), the CLI and the
API reading it. Lines are checked where they land (the store, through ``logs``) against what
Docker and the catalogue say of the jobs that wrote them."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import docker
import pytest
import requests

from tests.conftest import DOCKER_URL, Cli
from tests.harness import (
    HTTPD,
    SAMPLE_IMAGE,
    Platform,
    PlatformEnv,
    free_port,
    platform_process,
    remove_containers,
    retire,
    wait_for,
)
from tests.helpers import jobs_json, op_of, wait_op
from tests.integration.api import serving

pytestmark = pytest.mark.e2e

REDIS_DB = int(os.environ.get("ORCH_TEST_LOGGING_REDIS_DB", "10"))
PORTS = (32000, 32249)  # jobs, then proxies (the last 50)
OP_TIMEOUT = 90
ARRIVES = 20  # seconds a line may take from a job's print to the store (the issue: "a few")


@dataclass
class Logs:
    cli: Cli
    platform: Platform
    docker: docker.DockerClient
    hosts: tuple[str, str]
    env: str
    api: str = ""
    token: str = ""
    envs: list[str] = field(default_factory=list)

    def lines(self, *args: str) -> list[dict[str, Any]]:
        return json.loads(self.cli.ok("logs", self.env, *args, "--json"))  # type: ignore[no-any-return]

    def wait_lines(self, what: str, *args: str, count: int = 1, timeout: float = ARRIVES) -> list[dict[str, Any]]:
        return wait_for(what, lambda: self.lines(*args), timeout, every=0.5, until=lambda found: len(found) >= count)

    def logging_container(self) -> Any:
        found = self.docker.containers.list(filters={"label": [f"orchestrator.env={self.env}",
                                                               "orchestrator.service=logging"]})
        assert len(found) == 1, found
        return found[0]

    def write(self, job: str, text: str) -> None:
        """A line on the job's own stdout (its container's log), as if the job printed it."""
        container = self.docker.containers.get(job)
        code, out = container.exec_run(["sh", "-c", f"echo '{text}' > /proc/1/fd/1"])
        assert code == 0, out


@pytest.fixture(scope="module")
def logs_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Logs]:
    workdir = tmp_path_factory.mktemp("logging")
    env = PlatformEnv(f"sqlite:///{workdir / 'catalogue.db'}", REDIS_DB, PORTS, heartbeat_interval=0.5)
    env.flush()
    platform = Platform(env, workdir)
    cli = Cli(env.variables())
    client = docker.DockerClient(base_url=DOCKER_URL, version="auto")
    tag = uuid.uuid4().hex[:5]
    hosts = (f"lg1{tag}", f"lg2{tag}")
    name = f"lg{tag}"
    fixture = Logs(cli, platform, client, hosts, name)
    try:
        for host in hosts:  # two hosts on one engine: each shipper ships its own host's jobs only
            cli.ok("hosts", "add", host, "--docker-url", DOCKER_URL, "--address", "127.0.0.1")
            platform.start_node(host)
        out = cli.ok("env", "create", name, "--sandbox")
        for line in out.splitlines():
            if line.startswith("operation "):
                wait_op(cli, op_of(line), OP_TIMEOUT, succeed=True)
        fixture.envs.append(name)
        cli.ok("services", "add", name, "web", "--type", "code", "--scale", "2", "--size", "xs",
               "--command", f'echo "hello from $ORCH_JOB on $ORCH_HOST"; exec {HTTPD}')
        wait_op(cli, op_of(cli.ok("push", name, "web", SAMPLE_IMAGE)), OP_TIMEOUT, succeed=True)
        fixture.token = cli.ok("tokens", "create", f"logs-{tag}", "--role", "user").strip()
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with platform_process(["api", "--port", str(port)], env.variables(), workdir / "api.log",
                              ready=lambda _: serving(base)):
            fixture.api = f"{base}/api/v1"
            yield fixture
    finally:
        platform.stop_nodes()
        for made in fixture.envs:
            retire(env.database_url, made)
            remove_containers(client, made)
            for volume in client.volumes.list(filters={"label": f"orchestrator.env={made}"}):
                volume.remove(force=True)
        client.close()


def test_a_printed_line_is_found_with_its_service_job_and_host(logs_platform: Logs) -> None:
    lp = logs_platform
    web = {j["id"]: j for j in jobs_json(lp.cli, lp.env, "web")}
    assert {j["host"] for j in web.values()} == set(lp.hosts), "the 2 jobs are spread over the 2 hosts"
    found = lp.wait_lines("the jobs' first lines", "web", "--grep", "hello from", count=2)
    assert len(found) == 2
    for line in found:
        job = web[line["job"]]
        assert line["line"] == f"hello from {job['id']} on {job['host']}"
        assert (line["env"], line["service"], line["kind"], line["host"]) == (lp.env, "web", "deploy", job["host"])
        assert line["release"] == "1"
    # --job narrows to one job; the text output says time, service, job, line.
    one = sorted(web)[0]
    text = wait_for("the text output", lambda: lp.cli.ok("logs", lp.env, "web", "--job", one, "--grep", "hello"),
                    ARRIVES, every=0.5)
    assert text.count("\n") == 1 and f" web {one} hello from {one} on " in text
    # Docker's own log still has it.
    assert f"hello from {one}" in lp.docker.containers.get(web[one]["container_id"]).logs().decode()


def test_lines_survive_a_redeploy_and_the_platform_logs_its_operations(logs_platform: Logs) -> None:
    lp = logs_platform
    old = {j["id"] for j in jobs_json(lp.cli, lp.env, "web")}
    lp.wait_lines("the old jobs' lines", "web", "--grep", "hello from", count=2)
    op = op_of(lp.cli.ok("redeploy", lp.env, "web"))
    wait_op(lp.cli, op, OP_TIMEOUT, succeed=True)
    new = {j["id"] for j in jobs_json(lp.cli, lp.env, "web")}
    assert not old & new
    found = lp.wait_lines("old and new jobs' lines", "web", "--grep", "hello from", count=4)
    assert {line["job"] for line in found} == old | new
    for gone in old:
        assert [line["job"] for line in lp.lines("web", "--job", gone)] == [gone]
    events = lp.wait_lines("the redeploy's events", "--grep", f"operation {op} ", count=2)
    assert [e["kind"] for e in events] == ["event", "event"] and {e["service"] for e in events} == {"web"}
    assert "started; trigger manual, asked by " in events[0]["line"] and "@" in events[0]["line"]
    assert events[1]["line"].startswith(f"operation {op} (redeploy of web) succeeded after ")


def test_follow_shows_a_new_line_as_it_is_written(logs_platform: Logs) -> None:
    lp = logs_platform
    job = jobs_json(lp.cli, lp.env, "web")[0]
    token = f"follow-{uuid.uuid4().hex[:8]}"
    proc = lp.cli.popen("logs", lp.env, "web", "-f", "--json", "--grep", token)
    try:
        time.sleep(1.0)  # the follow is connected (its first answer is empty)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        lp.write(job["container_id"], f"{token} written")
        assert proc.stdout is not None
        started = time.monotonic()
        line = json.loads(proc.stdout.readline())
        assert time.monotonic() - started < ARRIVES
        assert (line["line"], line["job"], line["service"]) == (f"{token} written", job["id"], "web")
    finally:
        proc.terminate()
        proc.wait(10)


def test_lines_written_while_the_logging_service_restarts_all_arrive_once(logs_platform: Logs) -> None:
    lp = logs_platform
    job = jobs_json(lp.cli, lp.env, "web")[0]
    token = f"burst-{uuid.uuid4().hex[:8]}"
    container = lp.docker.containers.get(job["container_id"])
    writer = subprocess.Popen(
        ["docker", "-H", DOCKER_URL, "exec", container.id, "sh", "-c",
         f"for i in $(seq 0 99); do echo \"{token} $i\" > /proc/1/fd/1; sleep 0.03; done"])
    try:
        time.sleep(0.5)  # some lines before, most during, the rest after the restart
        lp.logging_container().restart(timeout=10)
        assert writer.wait(60) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
    found = lp.wait_lines("the 100 lines", "web", "--grep", token, "-n", "1000", count=100, timeout=60)
    numbers = [int(line["line"].split()[-1]) for line in found]
    assert sorted(numbers) == list(range(100)), "each line once"
    assert numbers == sorted(numbers), "in order"


def test_dashboard_and_api_need_the_credentials(logs_platform: Logs) -> None:
    lp = logs_platform
    masked = json.loads(lp.cli.ok("env", "show", lp.env, "--json"))["dashboards"]["logging"]
    assert masked["password"] == "*****"
    board = json.loads(lp.cli.ok("env", "show", lp.env, "--json", "--show-secrets"))["dashboards"]["logging"]
    assert board["password"] != "*****" and board["user"]
    for path in ("", "api/logs", "api/stats"):
        assert requests.get(board["url"] + path, timeout=5).status_code == 401
        assert requests.get(board["url"] + path, auth=(board["user"], "wrong"), timeout=5).status_code == 401
    page = requests.get(board["url"], auth=(board["user"], board["password"]), timeout=5)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    searched = requests.get(board["url"] + "api/logs", params={"grep": "hello from", "service": "web"},
                            auth=(board["user"], board["password"]), timeout=5).json()["lines"]
    assert searched and all("hello from" in line["line"] for line in searched)

    # The platform's API: the same lines, behind its own token.
    headers = {"Authorization": f"Bearer {lp.token}"}
    assert requests.get(f"{lp.api}/envs/{lp.env}/logs", timeout=10).status_code == 401
    got = requests.get(f"{lp.api}/envs/{lp.env}/logs", params={"service": "web", "grep": "hello from"},
                       headers=headers, timeout=10)
    assert got.status_code == 200, got.text
    assert {line["job"] for line in got.json()} == {line["job"] for line in searched}
    assert set(got.json()[0]) == {"time", "env", "service", "job", "kind", "host", "release", "line"}
    for params in ({"service": "nosuch"}, {"job": "nosuch"}):
        assert requests.get(f"{lp.api}/envs/{lp.env}/logs", params=params, headers=headers,
                            timeout=10).status_code == 404
    with requests.get(f"{lp.api}/envs/{lp.env}/logs", params={"service": "web", "grep": "hello from", "follow": 1},
                      headers=headers, timeout=10, stream=True) as streamed:
        assert streamed.status_code == 200
        first = json.loads(next(line for line in streamed.iter_lines() if line))
        assert first["service"] == "web" and "hello from" in first["line"]


def test_refusals(logs_platform: Logs) -> None:
    lp = logs_platform
    for args, said in ((("web-nosuch",), "no service"), (("web", "--job", "nosuch"), "no job nosuch"),
                       (("--since", "yesterday"), "--since"), (("-n", "0"), "number of lines")):
        result = lp.cli("logs", lp.env, *args)
        assert result.exit_code == 2 and said in result.stderr, (args, result.output)
    bare = f"lgbare{uuid.uuid4().hex[:4]}"
    lp.cli.ok("env", "create", bare, "--sandbox", "--no-defaults")
    lp.envs.append(bare)
    result = lp.cli("logs", bare)
    assert result.exit_code == 2 and f"environment {bare} has no logging service" in result.stderr


def test_the_shipper_runs_once_per_host(logs_platform: Logs) -> None:
    lp = logs_platform
    shippers = lp.docker.containers.list(filters={"label": "orchestrator.log-shipper"})
    names = {c.name for c in shippers}
    for host in lp.hosts:
        assert sum(1 for n in names if n.startswith(f"orch-logship-{host}-")) == 1, names
