"""``orchestrator dev --demo``: the whole platform in one process (SQLite catalogue, in-process
broker, a node for the local Docker engine, the control queue) runs the README's demo end to end
on the real Docker engine: a push, a redeploy and an overlap redeploy of the sample service."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import docker
import pytest

from orchestrator.names import LABEL_ENV, LABEL_JOB, LABEL_SERVICE
from tests.conftest import DOCKER_URL, Cli
from tests.harness import remove_host_containers

pytestmark = pytest.mark.e2e

PORT_MIN, PORT_MAX = 30500, 30699
PROXY_PORT_MIN, PROXY_PORT_MAX = 30700, 30749


def test_dev_demo_runs_end_to_end(tmp_path: Path, docker_client: docker.DockerClient) -> None:
    catalogue = tmp_path / "dev.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}  # no broker URL: in-process
    env.update(ORCH_DATABASE_URL=f"sqlite:///{catalogue}", ORCH_PORT_MIN=str(PORT_MIN),
               ORCH_PORT_MAX=str(PORT_MAX), ORCH_PROXY_PORT_MIN=str(PROXY_PORT_MIN),
               ORCH_PROXY_PORT_MAX=str(PROXY_PORT_MAX), ORCH_PROXY_DIR=f"/tmp/orch-dev-{os.getpid()}",
               DOCKER_HOST=DOCKER_URL)
    reader = Cli({"ORCH_DATABASE_URL": env["ORCH_DATABASE_URL"]})
    try:
        done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "dev", "--demo"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=180)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-4000:]
        assert "broker memory://" in output, output[:1000]  # the in-process broker, not Redis
        succeeded = re.findall(r"^\[\s*[\d.]+s\] operation (\d+) succeeded$", done.stdout, flags=re.MULTILINE)
        assert len(succeeded) == 5, output[-4000:]

        ops = {o["id"]: o for o in json.loads(reader.ok("ops", "list", "demo", "--json"))}
        assert [(ops[int(i)]["service"], ops[int(i)]["kind"], ops[int(i)]["trigger"]) for i in succeeded] == [
            ("logging", "deploy", "create"), ("service-proxy", "deploy", "create"),
            ("web", "deploy", "push"), ("web", "redeploy", "manual"), ("web", "redeploy", "manual")]
        # The site answers through the service proxy, served by both jobs in turn.
        answers = re.findall(r"^  200 job=(\w+) service=web release=1 greeting=hello again$", done.stdout,
                             flags=re.MULTILINE)
        assert len(answers) == 4, output[-4000:]
        jobs = json.loads(reader.ok("jobs", "list", "demo", "web", "--json"))
        assert len(jobs) == 2 and all(j["state"] == "running" for j in jobs), jobs
        assert set(answers) == {j["id"] for j in jobs}, (answers, jobs)
        assert all(PORT_MIN <= j["port"] <= PORT_MAX for j in jobs), jobs

        # Docker agrees: the two jobs of this run are running, with the platform's labels.
        running = {c.labels[LABEL_JOB]: c for c in docker_client.containers.list(
            filters={"label": [f"{LABEL_ENV}=demo", f"{LABEL_SERVICE}=web"]})}
        for job in jobs:
            assert job["id"] in running, f"job {job['id']} has no running container"
            assert running[job["id"]].id == job["container_id"]
            # The redeploy's variable reached the containers that run now.
            out = running[job["id"]].exec_run(["sh", "-c", "echo $GREETING"]).output
            assert isinstance(out, bytes) and out.decode().strip() == "hello again"
        # The jobs the redeploys replaced are gone from Docker: no container of theirs is left,
        # running or stopped; this run's containers are exactly its two jobs'.
        everything = json.loads(reader.ok("jobs", "list", "demo", "web", "--all", "--json"))
        assert len(everything) == 6, everything
        replaced = {j["id"] for j in everything} - {j["id"] for j in jobs}
        assert len(replaced) == 4, everything
        left = {c.labels[LABEL_JOB]: c.status for c in docker_client.containers.list(
            all=True, filters={"label": [f"{LABEL_ENV}=demo", f"{LABEL_SERVICE}=web"]})}
        assert not replaced & set(left), {job: left[job] for job in replaced & set(left)}
        assert {j["id"] for j in everything} & set(left) == {j["id"] for j in jobs}, left
        # The environment's log (its logging service) ends with the last redeploy's end, as the
        # platform wrote it there.
        last = succeeded[-1]
        assert re.search(rf"^  \S+ web - operation {last} \(redeploy of web\) succeeded after [\d.]+s$", done.stdout,
                         flags=re.MULTILINE), output[-3000:]
    finally:
        remove_this_runs_containers(reader, catalogue, docker_client)
        remove_host_containers(docker_client, env["ORCH_DATABASE_URL"])


def remove_this_runs_containers(reader: Cli, catalogue: Path, client: docker.DockerClient) -> None:
    """Only the containers of jobs in this run's catalogue: someone else may be running the demo."""
    if not catalogue.exists():
        return
    listed = reader("jobs", "list", "demo", "--all", "--json")
    ids = {j["id"] for j in json.loads(listed.stdout)} if listed.exit_code == 0 else set()
    for container in client.containers.list(all=True, filters={"label": f"{LABEL_ENV}=demo"}):
        if container.labels.get(LABEL_JOB) in ids:
            container.remove(force=True)

