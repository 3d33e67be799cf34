"""Manifests on the real platform: `plan` shows, `apply` makes the changes as operations (seen in
`ops`), an unchanged file starts nothing, and a bad file exits 2 naming the line and the key,
changing nothing."""

from __future__ import annotations

import http.client
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.conftest import Cli, containers
from tests.harness import HTTPD, SAMPLE_IMAGE, remove_containers, retire, wait_for
from tests.helpers import ops_json

pytestmark = pytest.mark.e2e

CHANGED = "mkdir -p /w && echo changed > /w/index.html && exec httpd -f -p $PORT -h /w"


@pytest.fixture
def env(cli: Cli, docker_client: docker.DockerClient) -> Iterator[str]:
    """A name for the environment a manifest makes; its containers go afterwards."""
    name = f"m{uuid.uuid4().hex[:8]}"
    yield name
    retire(cli.env["ORCH_DATABASE_URL"], name)
    remove_containers(docker_client, name)


def shop(env: str, *, scale: int = 2, greeting: str = "hi", command: str = HTTPD, extra: str = "") -> str:
    return f"""\
environment: {env}
sandbox: true
services:
  web:
    type: code
    image: {SAMPLE_IMAGE}
    command: '{command}'
    scale: {scale}
    variables:
      GREETING: {greeting}
{extra}sites:
  {env}.localhost: web
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "shop.yaml"
    path.write_text(text)
    return str(path)


def container_envs(client: docker.DockerClient, env: str, service: str = "web") -> list[dict[str, str]]:
    """The variables of the service's deploy containers, as Docker has them."""
    found = [client.containers.get(cid) for cid in containers(client, env, service).values()]
    return [dict(e.split("=", 1) for e in c.attrs["Config"]["Env"]) for c in found
            if c.labels.get("orchestrator.kind") == "deploy"]


def get(port: int, host: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("GET", "/", headers={"Host": host, "Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def applied(cli: Cli, file: str, *flags: str) -> str:
    result = cli("apply", file, "--wait", *flags)
    assert result.exit_code == 0, result.output
    return result.output


def test_plan_then_apply_creates_the_environment_and_again_changes_nothing(
        cli: Cli, env: str, tmp_path: Path, docker_client: docker.DockerClient) -> None:
    file = write(tmp_path, shop(env, extra="    workers:\n      w: {command: sleep 600, scale: 2}\n"))
    plan = cli.ok("plan", file)
    assert f"+ create environment {env} (sandbox), with logging, service-proxy" in plan
    assert "+ create service web: code, scale 2, size s" in plan
    assert "~ set variables of web: GREETING" in plan
    assert f"! push {SAMPLE_IMAGE} to web: its first release (deploys it)" in plan
    assert '+ create worker target web/w: command "sleep 600" (deploys it)' in plan
    assert "~ scale worker target web/w: 1 -> 2" in plan  # once the target exists: apply waits for it
    assert f"+ create site {env}.localhost -> web" in plan
    assert "nothing changed" in plan
    assert cli("env", "show", env).exit_code == 2  # plan changed nothing

    out = applied(cli, file)
    assert "operation " in out
    assert len(containers(docker_client, env, "web")) == 4  # 2 deploy jobs and 2 of the worker target
    assert {e["GREETING"] for e in container_envs(docker_client, env)} == {"hi"}
    assert {s["name"] for s in json.loads(cli.ok("services", "list", env, "--json"))} == {
        "logging", "service-proxy", "web"}
    # The site serves through the environment's proxy.
    port = json.loads(cli.ok("env", "show", env, "--json"))["proxy"]["http_port"]
    wait_for("the site to serve", lambda: get(port, f"{env}.localhost")[0], 20, until=lambda s: s == 200)

    # The same file again: nothing to do, no operation.
    before = ops_json(cli, env)
    assert all(op["state"] == "succeeded" for op in before), before
    assert cli.ok("plan", file).strip().endswith(f"no changes: environment {env} matches {file}")
    assert f"no changes: environment {env} matches {file}" in cli.ok("apply", file, "--wait")
    assert ops_json(cli, env) == before


def test_apply_changes_scale_variables_and_command_and_is_idempotent(
        cli: Cli, env: str, tmp_path: Path, docker_client: docker.DockerClient) -> None:
    applied(cli, write(tmp_path, shop(env)))
    first = {op["id"] for op in ops_json(cli, env)}
    old = set(containers(docker_client, env, "web"))

    file = write(tmp_path, shop(env, scale=3, greeting="hello", command=CHANGED))
    plan = cli.ok("plan", file)
    assert f'~ change service web: command "{HTTPD}" -> "{CHANGED}"' in plan
    assert "~ set variables of web: GREETING" in plan and "hello" not in plan  # names, not values
    assert "! redeploy web: command, variables changed" in plan
    assert "~ scale web: 2 -> 3" in plan
    assert "push" not in plan and "site" not in plan  # the same image, the same site

    applied(cli, file)
    now = containers(docker_client, env, "web")
    assert len(now) == 3 and not set(now) & old  # the redeploy replaced every job, the scale added one
    assert {e["GREETING"] for e in container_envs(docker_client, env)} == {"hello"}
    for cid in now.values():
        assert docker_client.containers.get(cid).exec_run(["cat", "/w/index.html"]).output.decode().strip() == "changed"
    # The changes are ordinary operations, in `ops`; only web was touched.
    made = [op for op in ops_json(cli, env) if op["id"] not in first]
    assert sorted((op["service"], op["kind"], op["state"]) for op in made) == [
        ("web", "redeploy", "succeeded"), ("web", "scale", "succeeded")]

    # Scale alone: no redeploy.
    file = write(tmp_path, shop(env, scale=1, greeting="hello", command=CHANGED))
    assert cli.ok("plan", file).splitlines()[0] == "~ scale web: 3 -> 1"
    kept = containers(docker_client, env, "web")
    applied(cli, file)
    assert set(containers(docker_client, env, "web")) < set(kept)

    before = ops_json(cli, env)
    assert "no changes" in cli.ok("apply", file)
    assert ops_json(cli, env) == before


@pytest.mark.parametrize(("edit", "line", "says"), [
    (lambda t: t.replace("    scale:", "    scal:"), 8,
     "services.web.scal: unknown key; known keys here: type, image, command, scale"),
    (lambda t: t.replace("scale: 2", "scale: many"), 8, "services.web.scale: must be an integer from 0 to 1000"),
    (lambda t: t.replace("scale: 2", "scale: 1001"), 8, "services.web.scale: must be an integer from 0 to 1000"),
    (lambda t: t.replace("type: code", "type: mongodb"), 5, "services.web.type: unknown service type 'mongodb'"),
])
def test_bad_manifests_exit_2_naming_the_key_and_change_nothing(
        cli: Cli, env: str, tmp_path: Path, docker_client: docker.DockerClient, edit: Any, line: int,
        says: str) -> None:
    bad = write(tmp_path, edit(shop(env)))
    for command in ("plan", "apply"):
        result = cli(command, bad)
        assert result.exit_code == 2, result.output
        assert result.output.strip() == result.output.strip().splitlines()[0]  # one line
        assert result.output.startswith(f"error: {bad}:{line}: {says}"), result.output
    assert cli("env", "show", env).exit_code == 2  # not created

    # An environment that exists is left as it was too.
    applied(cli, write(tmp_path, shop(env)))
    before = ops_json(cli, env), json.loads(cli.ok("services", "show", env, "web", "--json"))
    bad = write(tmp_path, edit(shop(env, scale=2, greeting="changed")))  # a good change beside the bad one
    assert cli("apply", bad, "--wait").exit_code == 2
    assert (ops_json(cli, env), json.loads(cli.ok("services", "show", env, "web", "--json"))) == before
    assert {e["GREETING"] for e in container_envs(docker_client, env)} == {"hi"}


def test_prune_and_support(cli: Cli, env: str, tmp_path: Path, docker_client: docker.DockerClient) -> None:
    file = write(tmp_path, shop(env))
    applied(cli, file)
    cli.ok("services", "add", env, "extra", "--type", "code", "--command", HTTPD)
    cli.ok("push", env, "extra", SAMPLE_IMAGE, "--wait")

    # Left alone without --prune; the plan says so.
    plan = cli.ok("plan", file)
    assert "# service extra is not in the file: left alone (--prune removes it)" in plan
    assert "no changes" in cli.ok("apply", file)
    assert containers(docker_client, env, "extra")

    # The overlap is support's.
    file = write(tmp_path, shop(env, extra="    overlap: 5\n"))
    refused = cli("apply", file, "--prune")
    assert refused.exit_code == 2
    assert refused.output.startswith(f"error: {file}:11: services.web.overlap: only support may set the overlap")
    assert containers(docker_client, env, "extra")  # nothing changed: not even the prune

    plan = cli.ok("plan", file, "--prune", "--support")
    assert plan.splitlines()[:2] == ["~ change service web: overlap 0 -> 5", "- remove service extra (not in the file)"]
    applied(cli, file, "--prune", "--support")
    assert containers(docker_client, env, "extra", running=False) == {}
    assert json.loads(cli.ok("services", "show", env, "web", "--json"))["overlap"] == 5
    # Included services are never pruned.
    assert {s["name"] for s in json.loads(cli.ok("services", "list", env, "--json"))} == {
        "logging", "service-proxy", "web"}
    assert "no changes" in cli.ok("apply", file, "--prune", "--support")
