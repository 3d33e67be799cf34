"""Helpers shared by the service-type e2e tests (issue 4): their images, services deployed and
followed to their end, variables, HTTP, containers and volumes."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import docker

from tests.conftest import Cli, containers
from tests.harness import LABEL_ENV, remove_containers, retire
from tests.helpers import jobs_json, op_of, wait_op

POSTGRES = "orch/postgres:15"
MARIADB = "orch/mariadb:10"
REDIS = "orch/redis:7"
MEMCACHED = "orch/memcached:1"
PYAPP = "orch/pyapp:1"
PYAPP_WEB = "python3 /app/app.py"


# Database and cache images take a while to start: an operation gets this long to end.
OP_TIMEOUT = 90


def add_and_wait(cli: Cli, env: str, name: str, *args: str) -> dict[str, Any]:
    """``services add`` of a type that deploys at once, followed to its end."""
    out = cli.ok("services", "add", env, name, *args)
    return wait_op(cli, op_of(out), OP_TIMEOUT, succeed=True)


def deploy_port(cli: Cli, env: str, service: str) -> int:
    ports = {j["port"] for j in jobs_json(cli, env, service) if j["kind"] == "deploy"}
    assert len(ports) == 1 and None not in ports, ports
    return int(ports.pop())


def vars_json(cli: Cli, env: str, service: str, secrets: bool = False) -> dict[str, dict[str, Any]]:
    args = ["vars", "list", env, service, "--json", *(["--show-secrets"] if secrets else [])]
    rows = json.loads(cli.ok(*args))
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names)), f"a variable is listed twice: {names}"
    return {r["name"]: r for r in rows}


def get_json(port: int, timeout: float = 15) -> dict[str, Any]:
    """GET / on 127.0.0.1:PORT until it answers JSON."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                return json.loads(resp.read())  # type: ignore[no-any-return]
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def container_env(container: Any) -> dict[str, str]:
    return dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])


def the_container(client: docker.DockerClient, env: str, service: str) -> Any:
    found = containers(client, env, service)
    assert len(found) == 1, found
    return client.containers.get(next(iter(found.values())))


def text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def remove_env_leftovers(cli: Cli, client: docker.DockerClient, env: str) -> None:
    """Containers, then the env's data volumes, by label (the platform told not to heal them)."""
    retire(cli.env["ORCH_DATABASE_URL"], env)
    remove_containers(client, env)
    for volume in client.volumes.list(filters={"label": f"{LABEL_ENV}={env}"}):
        volume.remove(force=True)
