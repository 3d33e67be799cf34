"""The CLI as the API's client (``ORCH_API_URL``, ``ORCH_API_TOKEN``): push, redeploy, scale,
rollback and worker scale are asked of a running ``orchestrator api`` and followed through it, with
the same output and exit codes as the CLI that opens the catalogue itself; checked in Docker and in
the catalogue. Such a call loads no SQLAlchemy, pydantic or Celery. A refused request is one line
and exit 2, an API out of reach one line and exit 1; neither changes anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import docker
import pytest

from tests.conftest import Cli, containers
from tests.harness import HTTPD, ROOT, SAMPLE_IMAGE, free_port, orchestrator
from tests.helpers import jobs_json, op_json, ops_json
from tests.integration.api import Api, api_fixture  # noqa: F401 (the api fixture)
from tests.unit.test_cli_startup import HEAVY

pytestmark = pytest.mark.e2e


def through(cli: Cli, api: Api, token: str | None = None) -> Cli:
    """The same CLI, as the API's client."""
    return Cli({**cli.env, "ORCH_API_URL": api.base.removesuffix("/api/v1"), "ORCH_API_TOKEN": token or api.user})


def test_push_redeploy_scale_rollback_through_the_api(cli: Cli, api: Api, env_name: str,
                                                      docker_client: docker.DockerClient) -> None:
    remote = through(cli, api)
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD, "--scale", "2")

    out = remote.ok("push", env_name, "web", SAMPLE_IMAGE, "--wait")
    assert "succeeded" in out.splitlines()[-1], out
    first = containers(docker_client, env_name, "web")
    assert len(first) == 2
    assert {j["container_id"] for j in jobs_json(cli, env_name)} == set(first.values())

    out = remote.ok("redeploy", env_name, "web", "--wait")
    op_id = int(out.split()[1])  # "operation ID (redeploy) queued|running"
    op = op_json(cli, op_id)  # read from the catalogue itself
    assert op["state"] == "succeeded" and op["kind"] == "redeploy"
    assert op["params"]["requested_by"].startswith("api"), op["params"]  # it came through the API
    assert all(f"{s['name']} succeeded" in out for s in op["steps"]), out  # progress, step by step
    second = containers(docker_client, env_name, "web")
    assert len(second) == 2 and not set(second.values()) & set(first.values())

    # ops show through the API says what the catalogue says, in the same JSON.
    assert json.loads(remote.ok("ops", "show", str(op_id), "--json")) == op

    remote.ok("scale", env_name, "web", "3", "--wait")
    assert len(containers(docker_client, env_name, "web")) == 3
    started = json.loads(remote.ok("rollback", env_name, "web", "1", "--json"))
    ended = remote("ops", "watch", str(started["operation"]))
    assert ended.exit_code == 0, ended.output
    rolled = op_json(cli, started["operation"])
    assert rolled["state"] == "succeeded" and rolled["kind"] == "redeploy"
    assert rolled["params"]["release"] == 1
    assert len(containers(docker_client, env_name, "web")) == 3


def test_refused_requests_through_the_api_are_one_line_and_change_nothing(cli: Cli, api: Api,
                                                                          env_name: str) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD, "--scale", "1")
    before = ops_json(cli, env_name)

    cases = [
        (through(cli, api), ("redeploy", env_name, "nope"), "no service named nope"),
        (through(cli, api), ("redeploy", env_name, "web", "--support"), "only the support role"),
        (through(cli, api, token="not-a-token"), ("scale", env_name, "web", "2"), "unknown token"),
        (through(cli, api), ("scale", env_name, "web", "-1"), "scale"),
        (through(cli, api), ("push", env_name, "web", "bad image name!"), "image"),
    ]
    for remote, args, says in cases:
        result = remote(*args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], (args, result.stderr)
    assert ops_json(cli, env_name) == before


def test_an_api_out_of_reach_is_exit_1_and_a_missing_token_exit_2(cli: Cli, env_name: str) -> None:
    gone = Cli({**cli.env, "ORCH_API_URL": f"http://127.0.0.1:{free_port()}", "ORCH_API_TOKEN": "x"})
    result = gone("redeploy", env_name, "web")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert "cannot be reached" in result.stderr

    no_token = Cli({**cli.env, "ORCH_API_URL": "http://127.0.0.1:1"})
    result = no_token("redeploy", env_name, "web")
    assert result.exit_code == 2 and "ORCH_API_TOKEN" in result.stderr, result.output


def test_a_redeploy_through_the_api_imports_no_heavy_library(cli: Cli, api: Api, env_name: str) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD, "--scale", "1")
    cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--wait")
    env = {**os.environ, **through(cli, api).env}
    argv = [sys.executable, "-X", "importtime", *orchestrator("redeploy", env_name, "web", "--wait")[1:]]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    loaded = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines()
              if line.startswith("import time:")}
    assert loaded & HEAVY == set(), loaded & HEAVY
    assert loaded & {"http", "email", "ssl"} == set(), loaded  # (an http:// API: no standard HTTP client)
    assert "succeeded" in done.stdout.splitlines()[-1]


def test_an_operation_is_long_polled_by_its_etag(cli: Cli, api: Api, env_name: str) -> None:
    """GET /operations/ID answers with an ETag; with If-None-Match and ?wait= it answers as soon
    as the operation changes, or with a 304 when nothing did within the wait."""
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD, "--scale", "2")
    done = json.loads(cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--wait", "--json"))["operation"]
    first = api.as_user("GET", f"/operations/{done}")
    assert first.status_code == 200 and first.headers["ETag"].startswith('"'), first.headers
    t0 = time.monotonic()
    unchanged = api.as_user("GET", f"/operations/{done}?wait=1", headers={"If-None-Match": first.headers["ETag"]})
    assert unchanged.status_code == 304 and time.monotonic() - t0 >= 0.9
    assert unchanged.headers["ETag"] == first.headers["ETag"]

    started = api.as_user("POST", f"/envs/{env_name}/services/web/redeploy", json={})
    assert started.status_code == 202, started.text
    op_id = started.json()["id"]
    seen = api.as_user("GET", f"/operations/{op_id}")
    states = [(seen.json()["state"], [s["state"] for s in seen.json()["steps"]])]
    etag = seen.headers["ETag"]
    deadline = time.monotonic() + 60
    while states[-1][0] not in ("succeeded", "failed") and time.monotonic() < deadline:
        t0 = time.monotonic()
        answer = api.as_user("GET", f"/operations/{op_id}?wait=20", headers={"If-None-Match": etag})
        assert answer.status_code == 200 and time.monotonic() - t0 < 15, answer.status_code
        assert answer.headers["ETag"] != etag
        etag = answer.headers["ETag"]
        states.append((answer.json()["state"], [s["state"] for s in answer.json()["steps"]]))
    assert states[-1][0] == "succeeded", states
    assert len(set(map(str, states))) == len(states)  # each answer told of a change


def test_an_operation_started_from_the_catalogue_is_followed_there(cli: Cli, env_name: str) -> None:
    """With ORCH_API_URL set, a command the API does not serve (a one-off `run`) records its
    operation in the catalogue and follows it there: an API out of reach does not matter."""
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD, "--scale", "1")
    cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--wait")
    gone = Cli({**cli.env, "ORCH_API_URL": f"http://127.0.0.1:{free_port()}", "ORCH_API_TOKEN": "x"})
    result = gone("run", env_name, "web", "--", "sh", "-c", "echo hello; exit 3")
    assert result.exit_code == 3 and "hello" in result.stdout, result.output
