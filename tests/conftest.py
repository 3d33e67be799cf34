"""Shared fixtures. Integration tests use the real Redis, a real node (Celery worker in its own
process) and the real dockerd; they fail loudly when one is missing instead of skipping."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import docker
import pytest
from click.testing import CliRunner, Result

from orchestrator.cli import main as cli_main
from orchestrator.names import LABEL_ENV
from tests.harness import (
    DEFAULT_DOCKER_URL,
    ROOT,
    SAMPLE_IMAGE,
    Platform,
    PlatformEnv,
    orchestrator,
    remove_containers,
    retire,
)

DOCKER_URL = os.environ.get("ORCH_TEST_DOCKER_URL", DEFAULT_DOCKER_URL)
REDIS_DB = int(os.environ.get("ORCH_TEST_REDIS_DB", "9"))
PORT_BASE = 30000 + 250 * (REDIS_DB % 10)  # below Linux's ephemeral range (32768-)


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
            orchestrator(*args), env={**os.environ, **self.env},
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
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """The test platform: its own SQLite catalogue and Redis database (flushed first), heartbeats
    every 0.5 s, and a port range away from the default one, so that a platform running on this
    machine never collides; each Redis database number gets its own range, so parallel test
    sessions never collide either. Its nodes stop at the end of the session."""
    workdir = tmp_path_factory.mktemp("platform")
    env = PlatformEnv(f"sqlite:///{workdir / 'catalogue.db'}", REDIS_DB, (PORT_BASE, PORT_BASE + 249),
                      heartbeat_interval=0.5)
    env.flush()
    platform = Platform(env, workdir)
    yield platform
    platform.stop_nodes()


@pytest.fixture(scope="session")
def platform_env(platform: Platform) -> dict[str, str]:
    """ORCH_* variables of the test platform."""
    return platform.env.variables()


@pytest.fixture(scope="session")
def node(platform: Platform, platform_env: dict[str, str], docker_client: docker.DockerClient) -> str:
    """A host registered in the catalogue and its node running in its own process."""
    host = f"h{uuid.uuid4().hex[:6]}"
    Cli(platform_env).ok("hosts", "add", host, "--docker-url", DOCKER_URL, "--address", "127.0.0.1")
    platform.start_node(host)
    return host


@pytest.fixture
def cli(platform_env: dict[str, str], node: str) -> Cli:
    return Cli(platform_env)


@pytest.fixture
def env_name(cli: Cli, docker_client: docker.DockerClient) -> Iterator[str]:
    """A fresh sandbox environment; its containers are removed by label afterwards."""
    name = f"t{uuid.uuid4().hex[:8]}"
    cli.ok("env", "create", name, "--sandbox", "--no-defaults")
    yield name
    retire(cli.env["ORCH_DATABASE_URL"], name)
    remove_containers(docker_client, name)


def containers(client: docker.DockerClient, env: str, service: str | None = None,
               running: bool = True) -> dict[str, str]:
    """Job id -> container id of the env's containers, as Docker itself reports them."""
    labels = [f"{LABEL_ENV}={env}"] + ([f"orchestrator.service={service}"] if service else [])
    found = client.containers.list(all=not running, filters={"label": labels})
    return {c.labels["orchestrator.job"]: c.id for c in found}
