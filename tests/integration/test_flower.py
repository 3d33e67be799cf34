"""Flower, started by ``orchestrator flower`` on the test platform's broker behind basic auth: an
operator follows one redeploy there. Its steps are found through Flower's HTTP API: a step of its
own is a task ``orchestrator.step.*`` whose arguments say which operation, environment, service,
job and host it serves; a host's starts, stops and image checks are taken together by the task
``orchestrator.step.host_steps`` of that host, whose result names every step it ran with its
operation, job and action. They match ``ops show --json``."""

from __future__ import annotations

import ast
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import Cli
from tests.harness import HTTPD, SAMPLE_IMAGE, free_port, platform_process
from tests.helpers import op_json, op_of

pytestmark = pytest.mark.e2e

AUTH = ("operator", "s3cret-pass")
TASK_OF = {"check_image": "orchestrator.step.check_image", "start": "orchestrator.step.start_job",
           "stop": "orchestrator.step.stop_job", "wait": "orchestrator.step.wait"}


def answers(url: str) -> bool:
    try:
        return requests.get(url, auth=AUTH, timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


@pytest.fixture(scope="module")
def flower(platform_env: dict[str, str], node: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("flower") / "flower.log"
    # The login from the environment: it is in no process's command line (finding: secrets in argv).
    with platform_process(["flower", "--port", str(port)], {**platform_env, "ORCH_FLOWER_BASIC_AUTH": ":".join(AUTH)},
                          log, ready=lambda _: answers(f"{base}/api/tasks")) as proc:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert AUTH[1].encode() not in cmdline and b"flower" in cmdline, cmdline
        yield base


def flower_tasks(base: str) -> dict[str, dict[str, Any]]:
    response = requests.get(f"{base}/api/tasks", params={"limit": 5000}, auth=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def kwargs_of(task: dict[str, Any]) -> dict[str, Any]:
    """Flower shows a task's kwargs as their repr."""
    value = task.get("kwargs") or "{}"
    parsed = ast.literal_eval(value) if isinstance(value, str) else value
    assert isinstance(parsed, dict), value
    return parsed


def ran_for(task: dict[str, Any], op_id: int) -> list[dict[str, Any]]:
    """The steps of operation ``op_id`` a host's ``host_steps`` task ran (its result, shown as its repr)."""
    if task["name"] != "orchestrator.step.host_steps" or task.get("state") != "SUCCESS":
        return []
    result = ast.literal_eval(task.get("result") or "{}")
    return [step for step in result["steps"] if step["op"] == op_id]


def tasks_of_op(base: str, op_id: int) -> list[dict[str, Any]]:
    found = []
    for task in flower_tasks(base).values():
        kwargs = kwargs_of(task)
        if kwargs.get("op") == op_id or kwargs.get("op_id") == op_id or ran_for(task, op_id):
            found.append({**task, "kwargs": kwargs})
    return found


def served(task: dict[str, Any], op_id: int) -> list[tuple[str, str, str | None]]:
    """(task name as the step's own, host, job) of each step of ``op_id`` a step task ran."""
    if task["name"] == "orchestrator.step.host_steps":
        return [(TASK_OF[step["action"]], task["kwargs"]["host"], step["job"]) for step in ran_for(task, op_id)]
    return [(task["name"], task["kwargs"]["host"], task["kwargs"]["job"])]


def follow_in_flower(base: str, op: dict[str, Any], timeout: float = 20) -> list[dict[str, Any]]:
    """Poll Flower until it lists every step of ``op`` (from ``ops show --json``) as succeeded;
    Flower learns of them from the workers' events, a moment later."""
    wanted = sorted((TASK_OF[s["action"]], s["host"], s["job"]) for s in op["steps"])
    deadline = time.monotonic() + timeout
    while True:
        tasks = tasks_of_op(base, op["id"])
        steps = [t for t in tasks if t["name"].startswith("orchestrator.step.") and t["state"] == "SUCCESS"]
        seen = sorted(step for t in steps for step in served(t, op["id"]))
        if seen == wanted:
            return tasks
        if time.monotonic() > deadline:
            raise AssertionError(f"Flower shows {seen} for operation {op['id']}, expected {wanted}")
        time.sleep(0.25)


def test_flower_needs_its_login(flower: str) -> None:
    for path in ("/", "/api/tasks", "/api/workers", "/tasks"):
        assert requests.get(flower + path, timeout=5).status_code == 401, path
        assert requests.get(flower + path, auth=(AUTH[0], "wrong"), timeout=5).status_code == 401, path
    assert requests.get(f"{flower}/api/tasks", auth=AUTH, timeout=5).status_code == 200


def test_a_redeploy_is_followed_in_flower(flower: str, cli: Cli, env_name: str, node: str) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD, "--scale", "2")
    pushed = op_of(cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--wait"))
    follow_in_flower(flower, op_json(cli, pushed))

    out = cli.ok("redeploy", env_name, "web", "--wait")
    op = op_json(cli, op_of(out, " (redeploy)"))
    assert op["state"] == "succeeded"
    # No image check: the host runs that image already (the jobs it replaces do).
    assert sorted(s["action"] for s in op["steps"]) == ["start", "start", "stop", "stop"]
    tasks = follow_in_flower(flower, op)

    for task in tasks:
        kwargs = task["kwargs"]
        assert task["worker"].startswith(f"{node}@"), task  # run by the node of that host
        if task["name"] == "orchestrator.step.host_steps":  # it serves whatever waited for the host
            assert kwargs == {"host": node}, task
            continue
        assert (kwargs["env"], kwargs["service"]) == (env_name, "web"), task
        if task["name"].startswith("orchestrator.step."):
            assert kwargs["host"] == node and kwargs["op"] == op["id"], task
    # Each start and stop is named with the job it serves, as ops show names it: the host's two
    # starts were taken by one task, and so were its two stops (a stage after the other).
    boxes = [sorted((step["action"], step["job"]) for step in ran_for(t, op["id"])) for t in tasks]
    by_action = {action: sorted((a, s["job"]) for s in op["steps"] if (a := s["action"]) == action)
                 for action in ("start", "stop")}
    assert sorted(box for box in boxes if box) == [by_action["start"], by_action["stop"]], tasks
    # What follows a stage (the next stage, then the finish) was done by the node that ended
    # it, at once: no advance or finish task of a redeploy that succeeded.
    assert not [t for t in tasks if t["name"] in ("orchestrator.op.advance", "orchestrator.op.finish")], tasks
