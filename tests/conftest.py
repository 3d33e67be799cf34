"""Shared fixtures. Integration tests use the real Redis, a real node (Celery worker in its own
process) and the real dockerd; they fail loudly when one is missing instead of skipping."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
import redis
from click.testing import CliRunner, Result

from orchestrator.cli import main as cli_main
from orchestrator.names import LABEL_ENV

ROOT = Path(__file__).resolve().parent.parent
DOCKER_URL = os.environ.get("ORCH_TEST_DOCKER_URL", "unix:///var/run/docker.sock")
REDIS_DB = int(os.environ.get("ORCH_TEST_REDIS_DB", "9"))
PORT_BASE = 30000 + 250 * (REDIS_DB % 10)  # below Linux's ephemeral range (32768-)
SAMPLE_IMAGE = "orch/sample-app:1"
HTTPD = "httpd -f -p $PORT -h /var/www"


@dataclass
class Cli:
    env: dict[str, str]

    def __call__(self, *args: str) -> Result:
        return CliRunner().invoke(cli_main, list(args), env=self.env, catch_exceptions=False)

    def ok(self, *args: str) -> str:
        result = self(*args)
        assert result.exit_code == 0, f"{args} -> {result.exit_code}: {result.output}"
        return result.stdout

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", *args], env={**os.environ, **self.env},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=DOCKER_URL, version="auto")
    client.ping()  # no dockerd: fail here, loudly (scripts/dockerd-up starts one)
    client.images.get(SAMPLE_IMAGE)  # missing: run scripts/build-images
    yield client
    client.close()


@pytest.fixture(scope="session")
def platform_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """ORCH_* variables of a test platform: its own SQLite catalogue and Redis database."""
    r = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    r.flushdb()
    r.close()
    db = tmp_path_factory.mktemp("catalogue") / "catalogue.db"
    return {
        "ORCH_DATABASE_URL": f"sqlite:///{db}",
        "ORCH_BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
        "ORCH_STOP_TIMEOUT": "5",
        "ORCH_START_TIMEOUT": "10",
        "ORCH_HEARTBEAT_INTERVAL": "0.5",
        # Away from the default range, so a platform running on this machine never collides.
        # Each Redis database number gets its own range, so parallel test sessions never collide.
        "ORCH_PORT_MIN": str(PORT_BASE),
        "ORCH_PORT_MAX": str(PORT_BASE + 249),
    }


def start_node(env: dict[str, str], host: str, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "node", "run", host, "--loglevel", "INFO"],
        env={**os.environ, **env}, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if b" ready." in log.read_bytes():
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"node {host} exited: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"node {host} not ready in 30s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def node(platform_env: dict[str, str], docker_client: docker.DockerClient,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A host registered in the catalogue and its node running in its own process."""
    host = f"h{uuid.uuid4().hex[:6]}"
    Cli(platform_env).ok("hosts", "add", host, "--docker-url", DOCKER_URL, "--address", "127.0.0.1")
    log = tmp_path_factory.mktemp("node") / f"{host}.log"
    proc = start_node(platform_env, host, log)
    yield host
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def cli(platform_env: dict[str, str], node: str) -> Cli:
    return Cli(platform_env)


@pytest.fixture
def env_name(cli: Cli, docker_client: docker.DockerClient) -> Iterator[str]:
    """A fresh sandbox environment; its containers are removed by label afterwards."""
    name = f"t{uuid.uuid4().hex[:8]}"
    cli.ok("env", "create", name, "--sandbox", "--no-defaults")
    yield name
    for container in docker_client.containers.list(all=True, filters={"label": f"{LABEL_ENV}={name}"}):
        container.remove(force=True)


def containers(client: docker.DockerClient, env: str, service: str | None = None,
               running: bool = True) -> dict[str, str]:
    """Job id -> container id of the env's containers, as Docker itself reports them."""
    labels = [f"{LABEL_ENV}={env}"] + ([f"orchestrator.service={service}"] if service else [])
    found = client.containers.list(all=not running, filters={"label": labels})
    return {c.labels["orchestrator.job"]: c.id for c in found}
