"""The runtime contract on the real Docker engine, plus what only Docker can show (limits, network)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import docker
import pytest

from tests.conftest import DOCKER_URL
from tests.runtime_contract import LONG_COMMAND, RuntimeContract, Target
from workers.runtime.base import ContainerError
from workers.runtime.docker import DockerRuntime

pytestmark = pytest.mark.e2e

BUSYBOX = "orch/busybox:1"
LABEL = "orch-contract"


@pytest.fixture
def docker_target(docker_client: docker.DockerClient) -> Iterator[Target]:
    docker_client.images.get(BUSYBOX)  # missing: run scripts/build-images
    run_id = uuid.uuid4().hex[:8]
    runtime = DockerRuntime(DOCKER_URL)
    target = Target(runtime=runtime, image=BUSYBOX, crash_image=BUSYBOX,
                    missing_image=f"orch/missing-{run_id}:0", label=(LABEL, run_id),
                    prefix=f"orch-contract-{run_id}")
    yield target
    runtime.close()
    for container in docker_client.containers.list(all=True, filters={"label": f"{LABEL}={run_id}"}):
        container.remove(force=True)


class TestDockerRuntime(RuntimeContract):
    @pytest.fixture
    def target(self, docker_target: Target) -> Target:
        return docker_target



def test_limits_network_and_command_reach_docker(docker_target: Target,
                                                 docker_client: docker.DockerClient) -> None:
    spec = docker_target.spec("limits", memory_mb=96, cpus=0.5, environment={"GREETING": "hi", "PORT": "31999"})
    state = docker_target.runtime.run(spec)
    attrs = docker_client.api.inspect_container(state.id)
    host = attrs["HostConfig"]
    assert host["Memory"] == 96 * 1024 * 1024
    assert host["MemorySwap"] == 96 * 1024 * 1024  # no swap beyond the limit
    assert host["NanoCpus"] == 500_000_000
    assert host["NetworkMode"] == "host"
    assert host["Init"] is True
    assert attrs["Config"]["Entrypoint"] == ["/bin/sh", "-c"]
    assert attrs["Config"]["Cmd"] == [LONG_COMMAND]
    assert {"GREETING=hi", "PORT=31999"} <= set(attrs["Config"]["Env"])
    assert attrs["Config"]["Labels"][LABEL] == docker_target.label[1]
    assert "orchestrator.config-hash" in attrs["Config"]["Labels"]


def test_the_command_runs_through_a_shell_with_the_environment(docker_target: Target,
                                                               docker_client: docker.DockerClient) -> None:
    spec = docker_target.spec("shell", command="echo greeting=$GREETING; sleep 300")
    docker_target.runtime.run(spec)
    container = docker_client.containers.get(spec.name)
    out = container.exec_run(["sh", "-c", "echo $GREETING"]).output
    assert isinstance(out, bytes) and out.decode().strip() == "hi"
    logs = ""
    for _ in range(50):
        logs = docker_target.runtime.logs(spec.name)
        if "greeting=hi" in logs:
            break
        time.sleep(0.1)
    assert "greeting=hi" in logs


def test_no_limits_means_none_set(docker_target: Target, docker_client: docker.DockerClient) -> None:
    state = docker_target.runtime.run(docker_target.spec("nolimits", memory_mb=None, cpus=None))
    host = docker_client.api.inspect_container(state.id)["HostConfig"]
    assert host["Memory"] == 0 and host["NanoCpus"] == 0


def test_a_one_off_streams_its_output_passes_on_its_exit_code_and_is_killed_at_its_timeout(
        docker_target: Target, docker_client: docker.DockerClient) -> None:
    lines: list[str] = []
    done = docker_target.spec("oneoff", command="echo first; echo second; exit 5")
    assert docker_target.runtime.run_once(done, lines.append, timeout=30) == 5
    assert lines == ["first", "second"]
    assert docker_target.runtime.inspect(done.name) is None  # removed
    slow = docker_target.spec("slow", command="echo start; sleep 60")
    began = time.monotonic()
    with pytest.raises(ContainerError, match=r"killed after 1\.5s"):
        docker_target.runtime.run_once(slow, lines.append, timeout=1.5)
    assert time.monotonic() - began < 15 and lines[-1] == "start"
    assert docker_target.runtime.inspect(slow.name) is None
