"""The task API other services call: ``send_task`` on queue ``orchestrator`` from a separate
process that has only Celery, consumed by a real control worker; the operations then run on the
real node and show up in Docker and ``ops show``. Also the tiny client, orchestrator/client.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from orchestrator.names import LABEL_KIND
from tests.conftest import Cli, containers
from tests.harness import HTTPD, ROOT, SAMPLE_IMAGE, platform_process, says_ready
from tests.helpers import wait_op

pytestmark = pytest.mark.e2e

WORKER_CMD = "trap 'exit 0' TERM; while true; do sleep 1; done"

# Run by a separate interpreter with only Celery imported by the script. The platform's packages
# stay importable here (the venv has them), so if anything on the way (Celery rebuilding a refused
# task's exception, say) loaded one, it would be in sys.modules after the calls: the test checks
# that none is. Reads [[task, kwargs], ...] on stdin, prints one JSON object.
SENDER = r"""
import json, sys

PLATFORM = {"orchestrator", "workers", "celeryconfig", "sqlmodel", "fastapi", "docker", "tests"}
from celery import Celery

broker = sys.argv[1]
app = Celery("elsewhere", broker=broker, backend=broker)
results = []
for name, kwargs in json.load(sys.stdin):
    res = app.send_task(name, kwargs=kwargs, queue="orchestrator")
    try:
        results.append({"ok": res.get(timeout=30)})
    except Exception as exc:
        results.append({"error": type(exc).__name__, "message": str(exc)})
platform = sorted(m for m in sys.modules if m.split(".")[0] in PLATFORM)
import importlib.util
importable = sorted(n for n in PLATFORM if importlib.util.find_spec(n))  # finds, does not load
print(json.dumps({"results": results, "platform_modules": platform, "importable": importable}))
"""

# The same, through the client module copied alone into an empty directory.
CLIENT = r"""
import json, sys

PLATFORM = {"orchestrator", "workers", "celeryconfig", "sqlmodel", "fastapi", "docker", "tests"}
from platform_client import PlatformClient, RequestRefused

client = PlatformClient(sys.argv[1])
results = []
for method, args in json.load(sys.stdin):
    try:
        results.append({"ok": getattr(client, method)(*args)})
    except RequestRefused as exc:
        results.append({"error": type(exc).__name__, "message": str(exc)})
platform = sorted(m for m in sys.modules if m.split(".")[0] in PLATFORM)
import importlib.util
importable = sorted(n for n in PLATFORM if importlib.util.find_spec(n))  # finds, does not load
print(json.dumps({"results": results, "platform_modules": platform, "importable": importable}))
"""


@pytest.fixture(scope="module")
def control(platform_env: dict[str, str], node: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """``orchestrator control run`` in its own process, next to the node."""
    log = tmp_path_factory.mktemp("control") / "control.log"
    with platform_process(["control", "run", "--loglevel", "INFO"], platform_env, log, ready=says_ready):
        yield


def outside(script: str, broker: str, calls: list[Any], cwd: Path) -> list[dict[str, Any]]:
    """Run ``script`` in a separate interpreter and return its results, after checking that no
    platform module was loaded in it (though they could have been: the venv has them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_") and k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script, broker], input=json.dumps(calls), env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["platform_modules"] == [], f"the caller imported platform modules: {out['platform_modules']}"
    assert {"orchestrator", "workers", "sqlmodel", "docker"} <= set(out["importable"]), out["importable"]
    return out["results"]  # type: ignore[no-any-return]


def send(platform_env: dict[str, str], tmp_path: Path, *calls: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return outside(SENDER, platform_env["ORCH_BROKER_URL"], [[n, kw] for n, kw in calls], tmp_path)


def op_id(result: dict[str, Any]) -> int:
    assert "ok" in result, f"refused: {result}"
    assert isinstance(result["ok"], int) and not isinstance(result["ok"], bool)
    return int(result["ok"])


def snapshot(cli: Cli, env: str, client: docker.DockerClient) -> dict[str, Any]:
    """Everything a refused request must leave alone."""
    return {
        "ops": json.loads(cli.ok("ops", "list", env, "--json")),
        "jobs": json.loads(cli.ok("jobs", "list", env, "--all", "--json")),
        "services": json.loads(cli.ok("services", "list", env, "--json")),
        "releases": json.loads(cli.ok("releases", "list", env, "web", "--json")),
        "containers": containers(client, env, running=False),
    }


def test_send_task_runs_operations(cli: Cli, env_name: str, control: None, platform_env: dict[str, str],
                                   docker_client: docker.DockerClient, tmp_path: Path) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD, "--scale", "1")

    [pushed] = send(platform_env, tmp_path,
                    ("orchestrator.push", {"env": env_name, "service": "web", "image": SAMPLE_IMAGE}))
    op = wait_op(cli, op_id(pushed))
    assert op["state"] == "succeeded", op
    assert (op["kind"], op["env"], op["service"], op["trigger"]) == ("deploy", env_name, "web", "push")
    first = containers(docker_client, env_name, "web")
    assert len(first) == 1
    assert json.loads(cli.ok("releases", "list", env_name, "web", "--json"))[0]["image"] == SAMPLE_IMAGE

    [redeployed] = send(platform_env, tmp_path, ("orchestrator.redeploy", {"env": env_name, "service": "web"}))
    op = wait_op(cli, op_id(redeployed))
    assert op["state"] == "succeeded", op
    assert (op["kind"], op["trigger"]) == ("redeploy", "manual")
    second = containers(docker_client, env_name, "web")
    assert len(second) == 1 and not set(second.values()) & set(first.values())

    [scaled] = send(platform_env, tmp_path, ("orchestrator.scale", {"env": env_name, "service": "web", "scale": 3}))
    op = wait_op(cli, op_id(scaled))
    assert op["state"] == "succeeded" and op["kind"] == "scale", op
    third = containers(docker_client, env_name, "web")
    assert len(third) == 3 and set(second.items()) <= set(third.items())
    jobs = json.loads(cli.ok("jobs", "list", env_name, "web", "--json"))
    assert {j["container_id"] for j in jobs} == set(third.values())

    # A service that is not redeployable: refused for a plain caller, accepted with support=True.
    cli.ok("services", "update", env_name, "web", "--not-redeployable", "--support")
    refused, accepted = send(
        platform_env, tmp_path,
        ("orchestrator.redeploy", {"env": env_name, "service": "web"}),
        ("orchestrator.redeploy", {"env": env_name, "service": "web", "support": True}),
    )
    assert "only support" in refused.get("message", ""), refused
    op = wait_op(cli, op_id(accepted))
    assert op["state"] == "succeeded" and op["trigger"] == "support", op
    fourth = containers(docker_client, env_name, "web")
    assert len(fourth) == 3 and not set(fourth.values()) & set(third.values())


def test_bad_arguments_fail_the_task_and_change_nothing(
        cli: Cli, env_name: str, control: None, platform_env: dict[str, str],
        docker_client: docker.DockerClient, tmp_path: Path) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD, "--scale", "1")
    cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--wait")
    cli.ok("services", "add", env_name, "quiet", "--type", "code", "--command", HTTPD)
    before = snapshot(cli, env_name, docker_client)
    web = {"env": env_name, "service": "web"}
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("orchestrator.redeploy", {"env": env_name, "service": "nope"}, "no service named nope"),
        ("orchestrator.redeploy", {"env": "no-such-env", "service": "web"}, "no environment named no-such-env"),
        ("orchestrator.redeploy", {"env": env_name, "service": "quiet"}, "no release yet"),
        ("orchestrator.scale", {**web, "scale": -1}, "must be 0 or more"),
        ("orchestrator.scale", {**web, "scale": "two"}, "scale must be an integer"),
        ("orchestrator.scale", {**web, "scale": True}, "scale must be an integer"),
        ("orchestrator.scale", web, "scale"),  # missing argument
        ("orchestrator.scale", {"env": env_name, "service": "nope", "scale": 2}, "no service named nope"),
        ("orchestrator.push", {**web, "image": ""}, "not an image reference"),
        ("orchestrator.push", {**web, "image": "two words"}, "not an image reference"),
        ("orchestrator.push", {**web, "image": 42}, "image must be a string"),
        ("orchestrator.push", {"env": env_name, "service": "nope", "image": SAMPLE_IMAGE}, "no service named nope"),
        ("orchestrator.worker_scale", {**web, "target": "nope", "scale": 2}, "has no worker target nope"),
        ("orchestrator.worker_scale", {**web, "target": "nope", "scale": "lots"}, "is not N, +N or -N"),
    ]
    results = send(platform_env, tmp_path, *[(name, kwargs) for name, kwargs, _ in cases])
    for (name, kwargs, reason), result in zip(cases, results, strict=True):
        assert "error" in result, f"{name}{kwargs} was accepted: {result}"
        assert reason in result["message"], f"{name}{kwargs}: unclear refusal {result}"
    assert snapshot(cli, env_name, docker_client) == before


def test_client_module(cli: Cli, env_name: str, control: None, platform_env: dict[str, str],
                       docker_client: docker.DockerClient, tmp_path: Path) -> None:
    """orchestrator/client.py copied alone into an empty directory works with only Celery."""
    shutil.copy(ROOT / "orchestrator" / "client.py", tmp_path / "platform_client.py")
    broker = platform_env["ORCH_BROKER_URL"]
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD, "--scale", "1")

    [pushed, refused] = outside(CLIENT, broker, [["push", [env_name, "web", SAMPLE_IMAGE]],
                                                 ["redeploy", [env_name, "nope"]]], tmp_path)
    assert wait_op(cli, op_id(pushed))["state"] == "succeeded"
    assert refused["error"] == "RequestRefused" and "no service named nope" in refused["message"], refused
    cli.ok("worker", "deploy", env_name, "web", "mailer", "--command", WORKER_CMD, "--wait")
    web = set(containers(docker_client, env_name, "web").values())

    results = outside(CLIENT, broker, [
        ["worker_scale", [env_name, "web", "mailer", 3]],
        ["worker_scale", [env_name, "web", "mailer", "-1"]],
        ["scale", [env_name, "web", 2]],
        ["redeploy", [env_name, "web"]],
        ["scale", [env_name, "web", -1]],
        ["worker_scale", [env_name, "web", "mailer", "-9"]],
        ["push", [env_name, "web", " "]],
    ], tmp_path)
    *accepted, bad_scale, bad_workers, bad_push = results
    ops = [wait_op(cli, op_id(r)) for r in accepted]
    assert [(o["kind"], o["state"]) for o in ops] == [
        ("worker_scale", "succeeded"), ("worker_scale", "succeeded"), ("scale", "succeeded"),
        ("redeploy", "succeeded")]
    assert "must be 0 or more" in bad_scale["message"], bad_scale
    assert "below 0" in bad_workers["message"], bad_workers
    assert "not an image reference" in bad_push["message"], bad_push

    running = docker_client.containers.list(filters={"label": [f"orchestrator.env={env_name}"]})
    kinds = sorted(c.labels[LABEL_KIND] for c in running)
    assert kinds == ["deploy", "deploy", "worker", "worker"]
    assert not {c.id for c in running} & web  # the redeploy replaced every job
    workers = json.loads(cli.ok("worker", "list", env_name, "web", "--json"))
    assert [(w["target"], w["scale"], w["running"]) for w in workers] == [("mailer", 2, 2)]
