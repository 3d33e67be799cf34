"""The HTTP API, served by ``orchestrator api --port P`` in its own process, with tokens made by the
CLI: authentication, support-only calls refused server-side, operations started (202 with the
operation id) and run on the real node, reads that agree with the CLI, the push webhook, and bad
input answered with a 4xx and a reason, never a 500."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import docker
import pytest
import requests

from tests.conftest import Cli, containers
from tests.harness import HTTPD, SAMPLE_IMAGE
from tests.helpers import jobs_json, op_json, op_of, ops_json, wait_op
from tests.integration.api import Api, api_fixture  # noqa: F401 (the api fixture)

pytestmark = pytest.mark.e2e

WORKER_CMD = "trap 'exit 0' TERM; while true; do sleep 1; done"


def accepted(response: requests.Response, kind: str) -> int:
    """A 202 whose JSON body names the operation it started."""
    assert response.status_code == 202, f"{response.status_code}: {response.text}"
    body = response.json()
    assert isinstance(body["id"], int) and body["kind"] == kind, body
    assert body["url"] == f"/api/v1/operations/{body['id']}"
    return int(body["id"])


def pushed(cli: Cli, api: Api, env: str, service: str = "web") -> int:
    """A code service that runs one job of the sample app, pushed through the API."""
    cli.ok("services", "add", env, service, "--type", "code", "--command", HTTPD, "--scale", "1")
    op = accepted(api.as_user("POST", f"/envs/{env}/services/{service}/push", json={"image": SAMPLE_IMAGE}),
                  "deploy")
    assert wait_op(cli, op)["state"] == "succeeded"
    return op


def test_a_valid_token_is_required(api: Api, cli: Cli, env_name: str) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD)
    before = cli.ok("ops", "list", env_name, "--json")
    calls = [("GET", "/envs", None), ("GET", f"/envs/{env_name}/services/web/jobs", None),
             ("GET", "/operations/1", None),
             ("POST", f"/envs/{env_name}/services/web/push", {"image": SAMPLE_IMAGE}),
             ("POST", f"/envs/{env_name}/services/web/redeploy", None),
             ("POST", "/hooks/push", {"env": env_name, "service": "web", "image": SAMPLE_IMAGE})]
    for method, path, body in calls:
        for headers in ({}, {"Authorization": "Bearer orch_not-a-token"}, {"Authorization": "Bearer "},
                        {"Authorization": f"Basic {api.support}"}, {"Authorization": api.support}):
            response = api.call(method, path, json=body, headers=headers)
            assert response.status_code == 401, f"{method} {path} {headers}: {response.status_code} {response.text}"
            assert response.json()["detail"]
    assert cli.ok("ops", "list", env_name, "--json") == before
    assert api.as_user("GET", "/envs").status_code == 200
    assert api.as_support("GET", "/envs").status_code == 200


def test_support_only_calls_refuse_the_user_role(api: Api, cli: Cli, env_name: str) -> None:
    pushed(cli, api, env_name)
    service = f"/envs/{env_name}/services/web"
    before = (cli.ok("services", "show", env_name, "web", "--json"), cli.ok("ops", "list", env_name, "--json"))
    for method, path, body in [("PATCH", service, {"overlap": 5}),
                               ("PATCH", service, {"redeployable": False}),
                               ("PATCH", service, {"overlap": 0, "redeployable": True}),
                               ("POST", f"{service}/redeploy", {"support": True})]:
        response = api.as_user(method, path, json=body)
        assert response.status_code == 403, f"{method} {path} {body}: {response.status_code} {response.text}"
        assert "support" in response.json()["detail"]
    assert (cli.ok("services", "show", env_name, "web", "--json"), cli.ok("ops", "list", env_name, "--json")) == before

    # The support role may, and what it set is what the CLI then shows.
    response = api.as_support("PATCH", service, json={"overlap": 2, "redeployable": False})
    assert response.status_code == 200, response.text
    assert (response.json()["overlap"], response.json()["redeployable"]) == (2, False)
    shown = json.loads(cli.ok("services", "show", env_name, "web", "--json"))
    assert (shown["overlap"], shown["redeployable"]) == (2, False)
    # Not redeployable now: a plain redeploy is refused for both roles, a support one accepted.
    for call in (api.as_user, api.as_support):
        refused = call("POST", f"{service}/redeploy")
        assert refused.status_code == 400 and "not redeployable" in refused.json()["detail"], refused.text
    op = accepted(api.as_support("POST", f"{service}/redeploy", json={"support": True}), "redeploy")
    done = wait_op(cli, op)
    assert (done["state"], done["trigger"]) == ("succeeded", "support"), done


def test_operations_start_with_202_and_read_like_the_cli(api: Api, cli: Cli, env_name: str,
                                                         docker_client: docker.DockerClient) -> None:
    first = pushed(cli, api, env_name)
    web = f"/envs/{env_name}/services/web"
    cli.ok("worker", "deploy", env_name, "web", "mailer", "--command", WORKER_CMD, "--wait")
    ops = [
        accepted(api.as_user("POST", f"{web}/redeploy"), "redeploy"),
        accepted(api.as_user("POST", f"{web}/redeploy", json={"support": False}), "redeploy"),
        accepted(api.as_user("POST", f"{web}/scale", json={"scale": 3}), "scale"),
        accepted(api.as_user("POST", f"{web}/workers/mailer/scale", json={"scale": "+1"}), "worker_scale"),
        accepted(api.as_user("POST", f"{web}/push", json={"image": SAMPLE_IMAGE}), "redeploy"),
    ]
    for op in [first, *ops]:
        assert wait_op(cli, op)["state"] == "succeeded"
        # The same JSON as `ops show --json`, field for field.
        response = api.as_user("GET", f"/operations/{op}")
        assert response.status_code == 200
        assert response.json() == op_json(cli, op)

    running = containers(docker_client, env_name, "web")
    assert len(running) == 5  # 3 deploy jobs, 2 worker jobs
    jobs = api.as_user("GET", f"{web}/jobs").json()
    assert {j["id"]: j["container_id"] for j in jobs} == running
    assert sorted(j["kind"] for j in jobs) == ["deploy"] * 3 + ["worker"] * 2
    assert api.as_user("GET", f"/envs/{env_name}/jobs").json() == jobs_json(cli, env_name)
    releases = api.as_user("GET", f"{web}/releases").json()
    assert [(r["number"], r["image"]) for r in releases] == [(1, SAMPLE_IMAGE), (2, SAMPLE_IMAGE)]
    assert api.as_user("GET", f"/envs/{env_name}/services").json() == json.loads(
        cli.ok("services", "list", env_name, "--json"))
    assert api.as_user("GET", web).json()["scale"] == 3
    assert {"name": env_name, "sandbox": True} in api.as_user("GET", "/envs").json()
    shown = api.as_user("GET", f"/envs/{env_name}").json()
    assert (shown["name"], shown["sandbox"], shown["sites"]) == (env_name, True, [])
    listed = api.as_user("GET", "/operations", params={"env": env_name}).json()
    assert sorted(o["id"] for o in listed) == sorted(
        o["id"] for o in ops_json(cli, env_name))
    assert {first, *ops} <= {o["id"] for o in listed}

    # Variables: set and unset through the API, seen by the CLI.
    changed = api.as_user("PATCH", f"{web}/variables", json={"set": {"GREETING": "hi", "OTHER": "x"}})
    assert changed.status_code == 200, changed.text
    changed = api.as_user("PATCH", f"{web}/variables", json={"unset": ["OTHER"]})
    user_vars = [(v["name"], v["value"]) for v in changed.json() if v["source"] == "user"]
    assert user_vars == [("GREETING", "hi")]
    assert api.as_user("GET", f"{web}/variables").json() == changed.json()
    # The API lists what the CLI lists: every source, secrets masked the same way.
    cli_vars = json.loads(cli.ok("vars", "list", env_name, "web", "--json"))
    assert changed.json() == cli_vars
    assert {"PORT", "ORCH_JOB"} <= {v["name"] for v in cli_vars}


def test_push_webhook_makes_a_release(api: Api, cli: Cli, env_name: str,
                                      docker_client: docker.DockerClient) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD, "--scale", "2")
    hook = {"env": env_name, "service": "web", "image": SAMPLE_IMAGE}
    first = accepted(api.as_user("POST", "/hooks/push", json=hook), "deploy")
    assert wait_op(cli, first)["trigger"] == "push"
    assert wait_op(cli, first)["state"] == "succeeded"
    old = containers(docker_client, env_name, "web")
    assert len(old) == 2
    second = accepted(api.as_support("POST", "/hooks/push", json=hook), "redeploy")
    assert wait_op(cli, second)["state"] == "succeeded"
    releases = json.loads(cli.ok("releases", "list", env_name, "web", "--json"))
    assert [(r["number"], r["image"]) for r in releases] == [(1, SAMPLE_IMAGE), (2, SAMPLE_IMAGE)]
    new = containers(docker_client, env_name, "web")
    assert len(new) == 2 and not set(new.values()) & set(old.values())
    jobs = jobs_json(cli, env_name)
    assert {j["release"] for j in jobs} == {2}


def test_bad_input_is_a_4xx_with_a_reason(api: Api, cli: Cli, env_name: str, tmp_path: Path) -> None:
    pushed(cli, api, env_name)
    cli.ok("services", "add", env_name, "fresh", "--type", "code", "--command", HTTPD)
    added = cli.ok("services", "add", env_name, "logs", "--type", "logging", "--image", SAMPLE_IMAGE,
                   "--command", HTTPD)
    deployed = wait_op(cli, op_of(added, " deploys it"))
    assert deployed["state"] == "succeeded", json.dumps(deployed)
    web = f"/envs/{env_name}/services/web"
    cli.ok("worker", "deploy", env_name, "web", "mailer", "--command", WORKER_CMD, "--wait")
    snapshot = (cli.ok("ops", "list", env_name, "--json"), cli.ok("services", "list", env_name, "--json"),
                cli.ok("releases", "list", env_name, "web", "--json"))
    cases: list[tuple[str, str, Any, int]] = [
        ("GET", "/envs/nope", None, 404),
        ("GET", "/envs/nope/services", None, 404),
        ("GET", f"/envs/{env_name}/services/nope", None, 404),
        ("GET", f"/envs/{env_name}/services/nope/jobs", None, 404),
        ("GET", f"/envs/{env_name}/services/nope/releases", None, 404),
        ("GET", f"/envs/{env_name}/services/nope/variables", None, 404),
        ("GET", "/envs/nope/jobs", None, 404),
        ("GET", "/operations/999999", None, 404),
        ("GET", "/operations/0", None, 404),
        ("GET", "/operations/-1", None, 404),
        ("GET", f"/operations/{2**70}", None, 404),
        ("GET", "/operations/abc", None, 422),
        ("GET", "/operations", {"env": "nope"}, 404),
        ("POST", f"{web}/scale", {"scale": -1}, 422),
        ("POST", f"{web}/scale", {"scale": "x"}, 422),
        ("POST", f"{web}/scale", {}, 422),
        ("POST", f"{web}/scale", None, 422),
        ("POST", f"/envs/{env_name}/services/nope/scale", {"scale": 2}, 404),
        ("POST", f"/envs/{env_name}/services/logs/redeploy", None, 400),
        ("POST", f"{web}/push", {"image": ""}, 422),
        ("POST", f"{web}/push", {"image": "two words"}, 400),
        ("POST", f"{web}/push", {}, 422),
        ("POST", f"/envs/{env_name}/services/logs/push", {"image": SAMPLE_IMAGE}, 400),
        ("POST", f"/envs/{env_name}/services/nope/push", {"image": SAMPLE_IMAGE}, 404),
        ("POST", "/envs/nope/services/web/redeploy", None, 404),
        ("POST", f"/envs/{env_name}/services/fresh/redeploy", None, 400),
        ("POST", f"{web}/redeploy", {"support": "maybe"}, 422),
        ("POST", f"{web}/rollback/99", None, 404),
        ("POST", f"{web}/rollback/0", None, 404),
        ("POST", f"{web}/workers/nope/scale", {"scale": "2"}, 404),
        ("POST", f"{web}/workers/mailer/scale", {"scale": "lots"}, 422),
        ("POST", f"{web}/workers/mailer/scale", {"scale": "-9"}, 400),
        ("POST", "/hooks/push", {"env": env_name, "service": "nope", "image": SAMPLE_IMAGE}, 404),
        ("POST", "/hooks/push", {"env": env_name, "service": "logs", "image": SAMPLE_IMAGE}, 400),
        ("POST", "/hooks/push", {"env": env_name, "service": "web"}, 422),
        ("PATCH", f"{web}/variables", {}, 400),
        ("PATCH", f"{web}/variables", {"set": {"1BAD": "x"}}, 400),
        ("PATCH", f"{web}/variables", {"set": {"OK": 3}}, 422),
        ("PATCH", f"{web}/variables", {"unset": ["MISSING"]}, 400),
    ]
    support_cases: list[tuple[str, str, Any, int]] = [
        ("PATCH", web, {}, 400),
        ("PATCH", web, {"overlap": -1}, 422),
        ("PATCH", f"/envs/{env_name}/services/logs", {"overlap": 5}, 400),
        ("PATCH", f"/envs/{env_name}/services/nope", {"overlap": 5}, 404),
    ]
    wrong = []
    for call, group in ((api.as_user, cases), (api.as_support, support_cases)):
        for method, path, body, code in group:
            kwargs = {"params": body} if method == "GET" else {"json": body}
            response = call(method, path, **kwargs)
            is_json = response.headers.get("content-type") == "application/json"
            detail = response.json().get("detail") if is_json else None
            if response.status_code != code or not detail:
                wrong.append(f"{method} {path} {body}: {response.status_code} {response.text[:200]}")
    # A body that is not JSON at all.
    response = api.call("POST", f"{web}/scale", api.user, data=b"{not json",
                        headers={"Content-Type": "application/json"})
    if response.status_code != 422:
        wrong.append(f"POST {web}/scale <not json>: {response.status_code} {response.text[:200]}")
    assert not wrong, "\n".join(wrong)
    assert (cli.ok("ops", "list", env_name, "--json"), cli.ok("services", "list", env_name, "--json"),
            cli.ok("releases", "list", env_name, "web", "--json")) == snapshot


def test_huge_release_number_is_not_found(api: Api, cli: Cli, env_name: str) -> None:
    pushed(cli, api, env_name)
    response = api.as_user("POST", f"/envs/{env_name}/services/web/rollback/{2**70}")
    assert response.status_code == 404, f"{response.status_code}: {response.text}"
    response = api.as_user("GET", f"/operations/{2**70}")
    assert response.status_code == 404, f"{response.status_code}: {response.text}"
    for args in (["rollback", env_name, "web", str(2**70)], ["ops", "show", str(2**70)]):
        result = cli(*args)
        assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
