"""The logging image (orch/logging:1) for real: a logging service (``serve``) and a host's
shipper (``logship``, on a configuration rendered by ``orchestrator.logship``) on the local
dockerd, and busybox jobs whose json-file logs carry the platform's ORCH_* attributes. A line
reaches the store and is found by its text; lines of another platform host or of an environment
without a logging service are not shipped; lines printed while the service restarts all arrive,
once; a log rotated many times over arrives whole. Ports 31800-31849 only; every container is
named logtest-* and removed with its volumes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import pytest
import requests

from orchestrator.logship import Target, shipper_config
from tests.harness import BUSYBOX_IMAGE, wait_for

pytestmark = pytest.mark.e2e

IMAGE = "orch/logging:1"
RUN = uuid.uuid4().hex[:6]
HOST, OTHER_HOST = f"lt{RUN}", f"lt{RUN}-other"  # platform hosts: several may share an engine
ENV, ENV_WITHOUT_SERVICE, ENV_AWAY = f"lt{RUN}", f"lt{RUN}-none", f"lt{RUN}-away"
HTTP, RELP = 31800, 31801
AWAY_RELP = 31802  # an environment whose logging service is down: its queue must not hold others up
SPARE_HTTP, SPARE_RELP = 31803, 31804
USER, PASSWORD = "logs", "s3cret:logtest"
LABEL = "orchestrator.logtest"
LOG_ENV = "ORCH_ENV,ORCH_SERVICE,ORCH_JOB,ORCH_KIND,ORCH_RELEASE,ORCH_HOST"
ARRIVES = 15.0  # seconds for a printed line to be found in the store (~10 s asked, some slack)


@dataclass
class Stack:
    client: docker.DockerClient
    base: str = f"http://127.0.0.1:{HTTP}"

    def get(self, path: str, auth: tuple[str, str] | None = (USER, PASSWORD), **params: Any) -> requests.Response:
        return requests.get(self.base + path, params=params, auth=auth, timeout=10)

    def lines(self, **params: Any) -> list[dict[str, Any]]:
        response = self.get("/api/logs", **params)
        response.raise_for_status()
        found: list[dict[str, Any]] = response.json()["lines"]
        return found

    def job(self, name: str, script: str, *, host: str = HOST, env: str = ENV, service: str = "web",
            max_size: str = "10m", release: str | None = "7") -> str:
        """A job as the platform runs it: json-file log with the ORCH_* attributes. Its job id."""
        job = uuid.uuid4().hex[:8]
        environment = {"ORCH_ENV": env, "ORCH_SERVICE": service, "ORCH_JOB": job, "ORCH_KIND": "deploy",
                       "ORCH_HOST": host}
        if release is not None:
            environment["ORCH_RELEASE"] = release
        self.client.containers.run(
            BUSYBOX_IMAGE, ["sh", "-c", script], name=f"logtest-{RUN}-{name}", detach=True, network_mode="host",
            environment=environment, labels={LABEL: RUN},
            log_config=docker.types.LogConfig(type="json-file",
                                              config={"env": LOG_ENV, "max-size": max_size, "max-file": "3"}))
        return job


def start(client: docker.DockerClient, name: str, command: list[str] | None = None, *,
          environment: dict[str, str], volumes: dict[str, dict[str, str]]) -> Any:
    return client.containers.run(IMAGE, command, name=f"logtest-{RUN}-{name}", detach=True, network_mode="host",
                                 environment=environment, volumes=volumes, labels={LABEL: RUN})


def serve_environment(http: int, relp: int) -> dict[str, str]:
    return {"PORT": str(http), "SYSLOG_PORT": str(relp), "LOG_USER": USER, "LOG_PASSWORD": PASSWORD, "ORCH_ENV": ENV}


def remove_ours(client: docker.DockerClient) -> None:
    for found in client.containers.list(all=True, filters={"label": f"{LABEL}={RUN}"}):
        with suppress(docker.errors.NotFound):
            found.remove(force=True, v=True)
    for volume in ("data", "spool", "spare"):
        with suppress(docker.errors.NotFound):
            client.volumes.get(f"logtest-{RUN}-{volume}").remove(force=True)


@pytest.fixture(scope="module")
def stack(docker_client: docker.DockerClient) -> Iterator[Stack]:
    docker_client.images.get(IMAGE)  # missing: run scripts/build-images
    containers_dir = docker_client.info()["DockerRootDir"] + "/containers"
    config = shipper_config(HOST, [Target(ENV, "127.0.0.1", RELP), Target(ENV_AWAY, "127.0.0.1", AWAY_RELP)])
    try:
        start(docker_client, "serve", environment=serve_environment(HTTP, RELP),
              volumes={f"logtest-{RUN}-data": {"bind": "/var/lib/orch-logs", "mode": "rw"}})
        start(docker_client, "ship", ["logship"], environment={"LOGSHIP_CONF": config},
              volumes={containers_dir: {"bind": "/docker/containers", "mode": "ro"},
                       f"logtest-{RUN}-spool": {"bind": "/var/spool/orch-logship", "mode": "rw"}})
        found = Stack(docker_client)
        wait_for("the logging service answering", lambda: found.get("/api/stats").status_code == 200, 20,
                 retry=(requests.RequestException,))
        yield found
    finally:
        remove_ours(docker_client)


def test_rendered_configurations_pass_rsyslogs_check(docker_client: docker.DockerClient) -> None:
    targets = [Target("a", "127.0.0.1", 1), Target("shop-2", "::1", 65535), Target("x" * 63, "logs.internal", 514)]
    for config in (shipper_config("local", targets), shipper_config("h-1", [])):
        out = docker_client.containers.run(
            IMAGE, ["bash", "-c", 'printf "%s" "$CONF" > /tmp/c && rsyslogd -N1 -f /tmp/c 2>&1'], remove=True,
            network_mode="host", environment={"CONF": config}, name=f"logtest-{RUN}-check", labels={LABEL: RUN})
        assert b"End of config validation run" in out, out.decode()


def test_a_jobs_line_is_found_by_its_text(stack: Stack) -> None:
    token = f"token-{uuid.uuid4().hex}"
    job = stack.job("hello", f"echo 'hello {token} Mixed'; echo 'on stderr {token}' >&2; sleep 600")
    found = wait_for("the line in the store", lambda: stack.lines(grep=token, service="web", job=job), ARRIVES,
                     until=lambda lines: len(lines) == 2)
    line = next(line for line in found if line["stream"] == "stdout")
    assert line["line"] == f"hello {token} Mixed"
    assert (line["env"], line["service"], line["job"], line["kind"], line["host"], line["release"]) == (
        ENV, "web", job, "deploy", HOST, "7")
    assert line["time"].endswith("Z") and len(line["time"]) == len("2026-11-29T20:01:02.123456Z")
    assert stack.lines(grep=f"{token} mixed") == []  # grep is case-sensitive
    assert stack.lines(grep=token, job="another") == []
    assert stack.get("/api/logs", auth=None).status_code == 401
    assert stack.get("/", auth=(USER, "wrong")).status_code == 401


def test_lines_of_other_hosts_and_of_environments_without_a_service_stay_home(stack: Stack) -> None:
    token = f"elsewhere-{uuid.uuid4().hex}"
    stack.job("other-host", f"echo '{token}'; sleep 600", host=OTHER_HOST)
    stack.job("no-service", f"echo '{token}'; sleep 600", env=ENV_WITHOUT_SERVICE)
    stack.job("away", f"echo '{token}'; sleep 600", env=ENV_AWAY)  # its service is down: held on the host
    time.sleep(0.5)
    # a line of this host printed after those: once it is in, they would be too
    control = f"control-{uuid.uuid4().hex}"
    stack.job("control", f"echo '{control}'; sleep 600", release=None)
    found = wait_for("the control line", lambda: stack.lines(grep=control), ARRIVES)
    assert found[0]["release"] == ""  # no ORCH_RELEASE: an empty release
    time.sleep(1)
    assert stack.lines(grep=token) == []


def test_lines_printed_while_the_service_restarts_all_arrive_once(stack: Stack) -> None:
    job = stack.job("restart", 'i=0; while [ $i -lt 100 ]; do echo "tick $i"; i=$((i+1)); usleep 30000; done; '
                               "sleep 600")
    time.sleep(0.8)  # the service restarts with about a third printed
    stack.client.containers.get(f"logtest-{RUN}-serve").restart()
    wait_for("all 100 ticks", lambda: len(stack.lines(job=job, limit=1000)), 40, every=0.5,
             until=lambda count: count >= 100, retry=(requests.RequestException,))
    time.sleep(1)  # anything sent twice would be in by now
    texts = [line["line"] for line in stack.lines(job=job, limit=1000)]
    assert sorted(texts, key=lambda t: int(t.split()[1])) == [f"tick {i}" for i in range(100)]
    assert texts == [f"tick {i}" for i in range(100)]  # in order of their time


def test_a_log_rotated_many_times_over_arrives_whole(stack: Stack) -> None:
    # 20 KB files (about 100 lines each) at 1,000 lines/s: Docker renames the log about 30 times
    # and deletes each file 0.3 s after it was written (max-file 3): imfile must follow the renames
    script = ("i=1; while [ $i -le 3000 ]; do seq $i $((i + 49)) | sed 's/^/rotated line /'; i=$((i + 50)); "
              "usleep 50000; done; sleep 600")
    job = stack.job("rotate", script, max_size="20k")
    wait_for("3000 lines", lambda: len(stack.lines(job=job, limit=10000)), 30, every=0.5,
             until=lambda count: count >= 3000)
    time.sleep(1)  # anything sent twice would be in by now
    numbers = [int(line["line"].split()[-1]) for line in stack.lines(job=job, limit=10000)]
    assert sorted(numbers) == list(range(1, 3001))


def test_files_rotated_while_the_shipper_was_away_are_read(stack: Stack) -> None:
    """A shipper that was stopped (the node recreates it when its configuration changes) or held
    back finds the log renamed: what it had not read is in -json.log.1, .2 now."""
    shipper = stack.client.containers.get(f"logtest-{RUN}-ship")
    shipper.pause()
    try:
        # about 45 KB of log in 20 KB files: three files, none deleted yet (max-file 3)
        job = stack.job("paused", "seq 1 200 | sed 's/^/written while away /'; sleep 600", max_size="20k")
        container = stack.client.containers.get(f"logtest-{RUN}-paused")
        wait_for("the job's log rotated twice", lambda: container.logs(), 10,
                 until=lambda out: out.count(b"written while away") == 200)
        time.sleep(0.5)
    finally:
        shipper.unpause()
    wait_for("200 lines", lambda: len(stack.lines(job=job, limit=1000)), ARRIVES, every=0.5,
             until=lambda count: count >= 200)
    time.sleep(1)
    numbers = [int(line["line"].split()[-1]) for line in stack.lines(job=job, limit=1000)]
    assert sorted(numbers) == list(range(1, 201))


def test_the_service_refuses_to_start_without_credentials(docker_client: docker.DockerClient) -> None:
    environment = serve_environment(SPARE_HTTP, SPARE_RELP)
    del environment["LOG_PASSWORD"]
    out = docker_client.containers.run(IMAGE, name=f"logtest-{RUN}-nopass", environment=environment,
                                       network_mode="host", labels={LABEL: RUN}, detach=True)
    try:
        assert out.wait(timeout=20)["StatusCode"] != 0
        assert b"LOG_PASSWORD" in out.logs()
    finally:
        out.remove(force=True, v=True)


def test_the_container_ends_when_one_of_its_processes_does(docker_client: docker.DockerClient) -> None:
    spare = start(docker_client, "spare", environment=serve_environment(SPARE_HTTP, SPARE_RELP),
                  volumes={f"logtest-{RUN}-spare": {"bind": "/var/lib/orch-logs", "mode": "rw"}})
    try:
        wait_for("the spare service", lambda: requests.get(f"http://127.0.0.1:{SPARE_HTTP}/api/stats",
                                                           auth=(USER, PASSWORD), timeout=5).status_code, 20,
                 until=lambda status: status == 200, retry=(requests.RequestException,))
        kill = ("import os,signal\nfor p in os.listdir('/proc'):\n if p.isdigit():\n"
                "  c=open(f'/proc/{p}/cmdline','rb').read()\n"
                "  if b'logstore\\0serve' in c: os.kill(int(p), signal.SIGKILL)")
        spare.exec_run(["python3", "-c", kill])
        assert spare.wait(timeout=20)["StatusCode"] != 0
        assert b"logstore serve ended" in spare.logs()
    finally:
        spare.remove(force=True, v=True)
