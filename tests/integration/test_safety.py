"""Safety rules, end to end: names matched in full, bounded strict scales, image references as
Docker reads them, a total size for variables, unambiguous data volumes, push and not
redeployable, no secret in any process's argv, connection variables that never shadow each other
and kept ports that stay reserved.

Every refusal is checked the same way: exit 2 and one ``error: ...`` line on stderr from the CLI
(a 4xx from the API, a refused task from the task API), and nothing changed, as the CLI's own
``--json`` listings and Docker report it before and after. What is accepted is checked where it
shows: in Docker (containers, volumes, labels), in the processes of the machine (/proc, docker
top) and in the service's own protocol (Redis over a TCP socket).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import sqlalchemy
from click.testing import CliRunner, Result

from orchestrator import rules
from orchestrator.cli import main as cli_main
from tests.conftest import DOCKER_URL, Cli, containers
from tests.harness import BUSYBOX_IMAGE, HTTPD, LABEL_ENV, SAMPLE_IMAGE, remove_containers, retire
from tests.helpers import op_of, service_json, wait_op
from tests.integration.api import Api, api_fixture  # noqa: F401 (the api fixture)
from tests.integration.service_helpers import (
    OP_TIMEOUT,
    POSTGRES,
    REDIS,
    add_and_wait,
    container_env,
    deploy_port,
    remove_env_leftovers,
    the_container,
    vars_json,
)
from tests.integration.test_send_task import control, send  # noqa: F401 (the control fixture)

pytestmark = pytest.mark.e2e

WORKER_CMD = "trap 'exit 0' TERM; while true; do sleep 1; done"
DIGEST = "sha256:" + "0123456789abcdef" * 4  # 64 hex digits


# --- what a refusal looks like, and what it must leave alone ---------------------------------------


def as_json(cli: Cli, *args: str) -> Any:
    return json.loads(cli.ok(*args, "--json"))


def snapshot(cli: Cli, env: str, client: docker.DockerClient) -> dict[str, Any]:
    """Everything a refused request could have changed, as the CLI and Docker report it."""
    services = as_json(cli, "services", "list", env)
    state: dict[str, Any] = {
        "envs": [e["name"] for e in as_json(cli, "env", "list")],
        "hosts": sorted(h["name"] for h in as_json(cli, "hosts", "list")),  # not heartbeat times
        "services": services,
        "jobs": as_json(cli, "jobs", "list", env, "--all"),
        "ops": as_json(cli, "ops", "list", env),
        "containers": containers(client, env, running=False),
        "running": containers(client, env),
        "volumes": sorted(v.name for v in client.volumes.list(filters={"label": f"{LABEL_ENV}={env}"})),
    }
    for svc in services:
        name = svc["name"]
        state[f"show:{name}"] = as_json(cli, "services", "show", env, name)
        state[f"vars:{name}"] = as_json(cli, "vars", "list", env, name, "--show-secrets")
        state[f"releases:{name}"] = as_json(cli, "releases", "list", env, name)
        state[f"workers:{name}"] = as_json(cli, "worker", "list", env, name)
    return state


def run(platform_env: dict[str, str], *args: str) -> Result:
    """The command as a user runs it; an exception escaping the CLI is a crash, not a refusal."""
    result = CliRunner().invoke(cli_main, list(args), env=platform_env, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        assert result.exc_info is not None
        crash = "".join(traceback.format_exception(*result.exc_info))
        pytest.fail(f"{args!r} crashed instead of refusing (exit {result.exit_code}):\n{crash}")
    return result


def refused(platform_env: dict[str, str], *args: str, says: str) -> str:
    """Exit 2, nothing on stdout and one ``error: ...`` line on stderr that mentions ``says``."""
    result = run(platform_env, *args)
    shown = [a[:80] for a in args]
    assert result.exit_code == 2, f"{shown} -> exit {result.exit_code}: {result.output[:2000]}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{shown}: not one error line: {result.stderr!r}"
    assert says.lower() in lines[0].lower(), f"{shown}: the reason does not say {says!r}: {lines[0]}"
    assert result.stdout == "", f"{shown} printed on stdout: {result.stdout!r}"
    return lines[0]


def not_refused(platform_env: dict[str, str], *args: str) -> Result:
    """Accepted as input: whatever happens next (an operation may fail), it is not exit 2."""
    result = run(platform_env, *args)
    assert result.exit_code != 2, f"{args} refused as bad input: {result.stderr}"
    assert "not an image reference" not in result.stderr
    return result


def unprocessable(response: Any, field: str) -> None:
    """A 422 whose reason points at the body's ``field``."""
    assert response.status_code == 422, f"{response.status_code}: {response.text}"
    locations = [tuple(d["loc"]) for d in response.json()["detail"]]
    assert ("body", field) in locations, locations


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def safe_env(platform_env: dict[str, str], node: str, docker_client: docker.DockerClient) -> Iterator[str]:
    """One environment for the refusals that must change nothing: ``web`` pushed (one job)."""
    cli = Cli(platform_env)
    name = f"s{uuid.uuid4().hex[:8]}"
    cli.ok("env", "create", name, "--sandbox", "--no-defaults")
    try:
        cli.ok("services", "add", name, "web", "--type", "code", "--command", HTTPD, "--scale", "1")
        cli.ok("push", name, "web", SAMPLE_IMAGE, "--wait")
        cli.ok("vars", "set", name, "web", "KEEP=me")
        assert len(containers(docker_client, name, "web")) == 1
        yield name
    finally:
        remove_env_leftovers(cli, docker_client, name)


@pytest.fixture
def env(cli: Cli, env_name: str, docker_client: docker.DockerClient) -> Iterator[str]:
    """The sandbox env of ``env_name``; its containers and data volumes go afterwards."""
    yield env_name
    remove_env_leftovers(cli, docker_client, env_name)


def pushed_web(cli: Cli, env: str) -> None:
    cli.ok("services", "add", env, "web", "--type", "code", "--command", HTTPD, "--scale", "1")
    cli.ok("push", env, "web", SAMPLE_IMAGE, "--wait")


def token_names(database_url: str) -> list[str]:
    """The API tokens' names (the CLI lists no tokens: only their hashes are kept)."""
    engine = sqlalchemy.create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            return sorted(conn.execute(sqlalchemy.text("SELECT name FROM apitoken")).scalars())
    finally:
        engine.dispose()


# --- 1. names ----------------------------------------------------------------------------------------

BAD_NAME_ENDINGS = ["\n", "\r\n", " ", "!", "\u00e9", "_x", ".x"]


@pytest.mark.parametrize("ending", BAD_NAME_ENDINGS, ids=repr)
def test_names_are_whole_dns_labels(ending: str, cli: Cli, platform_env: dict[str, str], safe_env: str,
                                    docker_client: docker.DockerClient) -> None:
    before = snapshot(cli, safe_env, docker_client)
    tokens_before = token_names(platform_env["ORCH_DATABASE_URL"])
    new_env = f"n{uuid.uuid4().hex[:8]}"

    refused(platform_env, "services", "add", safe_env, f"api{ending}", "--type", "code", says="service name")
    refused(platform_env, "services", "add", safe_env, f"cache{ending}", "--type", "redis", "--image", REDIS,
            says="service name")
    refused(platform_env, "env", "create", f"{new_env}{ending}", "--sandbox", "--no-defaults",
            says="environment name")
    refused(platform_env, "worker", "deploy", safe_env, "web", f"mailer{ending}", "--command", WORKER_CMD,
            says="worker target name")
    refused(platform_env, "hosts", "add", f"h{new_env}{ending}", "--docker-url", DOCKER_URL,
            "--address", "127.0.0.1", says="host name")
    refused(platform_env, "tokens", "create", f"tok-{new_env}{ending}", says="token name")

    assert snapshot(cli, safe_env, docker_client) == before
    assert token_names(platform_env["ORCH_DATABASE_URL"]) == tokens_before
    assert not containers(docker_client, new_env, running=False)


# --- 2. scale ----------------------------------------------------------------------------------------


def test_scale_above_the_maximum_is_refused_by_the_cli(cli: Cli, platform_env: dict[str, str], safe_env: str,
                                                       docker_client: docker.DockerClient) -> None:
    too_many = str(rules.MAX_SCALE + 1)
    before = snapshot(cli, safe_env, docker_client)
    refused(platform_env, "scale", safe_env, "web", too_many, says="maximum")
    refused(platform_env, "services", "add", safe_env, "big", "--type", "code", "--scale", too_many,
            says="maximum")
    refused(platform_env, "services", "add", safe_env, "big", "--type", "code", "--scale", "1e3", says="scale")
    assert snapshot(cli, safe_env, docker_client) == before

    # The maximum itself is a scale (a code service never pushed runs nothing yet).
    cli.ok("services", "add", safe_env, "most", "--type", "code", "--scale", str(rules.MAX_SCALE))
    assert service_json(cli, safe_env, "most")["scale"] == rules.MAX_SCALE
    assert containers(docker_client, safe_env, "most", running=False) == {}


def test_scale_must_be_a_whole_number_in_the_api(api: Api, cli: Cli, safe_env: str,
                                                 docker_client: docker.DockerClient) -> None:
    path = f"/envs/{safe_env}/services/web/scale"
    before = snapshot(cli, safe_env, docker_client)
    for body in ({"scale": True}, {"scale": "2"}, {"scale": rules.MAX_SCALE + 1}, {"scale": 1.0},
                 {"scale": -1}, {"scale": None}):
        unprocessable(api.as_user("POST", path, json=body), "scale")
    assert snapshot(cli, safe_env, docker_client) == before

    # The same call with an integer is accepted: the 422s were about the value.
    response = api.as_user("POST", path, json={"scale": 1})
    assert response.status_code == 202, response.text
    assert wait_op(cli, response.json()["id"])["state"] == "succeeded"
    assert len(containers(docker_client, safe_env, "web")) == 1


def test_scale_must_be_an_integer_in_the_task_api(control: None, cli: Cli,  # noqa: F811
                                                  platform_env: dict[str, str], safe_env: str,
                                                  docker_client: docker.DockerClient, tmp_path: Path) -> None:
    web = {"env": safe_env, "service": "web"}
    before = snapshot(cli, safe_env, docker_client)
    not_integer = "must be an integer"
    cases: list[tuple[dict[str, Any], str]] = [
        ({**web, "scale": True}, not_integer), ({**web, "scale": False}, not_integer),
        ({**web, "scale": "2"}, not_integer), ({**web, "scale": 2.0}, not_integer),
        ({**web, "scale": rules.MAX_SCALE + 1}, "maximum")]
    results = send(platform_env, tmp_path, *[("orchestrator.scale", kwargs) for kwargs, _ in cases])
    for (kwargs, reason), result in zip(cases, results, strict=True):
        assert "error" in result, f"scale {kwargs['scale']!r} was accepted: {result}"
        assert reason in result["message"], f"scale {kwargs['scale']!r}: unclear refusal {result}"
    assert snapshot(cli, safe_env, docker_client) == before


# --- 3. image references -----------------------------------------------------------------------------

BAD_IMAGES = ["Upper/Case:1", "a:b:c", "name:", "two words", "web\n", "name@sha256:abc", ":1", "a//b",
              "-lead:1", "name:-tag", "UPPER"]


def test_image_references_outside_dockers_grammar_are_refused(cli: Cli, platform_env: dict[str, str],
                                                               safe_env: str,
                                                               docker_client: docker.DockerClient) -> None:
    before = snapshot(cli, safe_env, docker_client)
    for image in BAD_IMAGES:
        refused(platform_env, "push", safe_env, "web", "--", image, says="not an image reference")
        refused(platform_env, "push", "--support", safe_env, "web", "--", image, says="not an image reference")
    assert snapshot(cli, safe_env, docker_client) == before


def test_image_references_docker_reads_are_accepted(cli: Cli, platform_env: dict[str, str], env_name: str,
                                                    docker_client: docker.DockerClient) -> None:
    pushed_web(cli, env_name)
    running = containers(docker_client, env_name, "web")
    for image in ("127.0.0.1:5000/shop/web:42", f"name@{DIGEST}", f"localhost/shop/web:1.0@{DIGEST}",
                  "orch/sample_app__x:v1.2-rc"):
        result = not_refused(platform_env, "push", env_name, "web", image)
        # Not on the host (nothing is pulled): the operation fails before anything stops.
        op = wait_op(cli, op_of(result.stdout))
        assert op["state"] == "failed" and "is not on host" in op["error"], op
        assert as_json(cli, "releases", "list", env_name, "web")[-1]["image"] == image
    assert containers(docker_client, env_name, "web") == running


# --- 4. variables --------------------------------------------------------------------------------------

VALUE_60K = "v" * (60 * 1024)


def test_variables_have_a_total_size(cli: Cli, platform_env: dict[str, str], env_name: str,
                                     docker_client: docker.DockerClient) -> None:
    pushed_web(cli, env_name)
    assert 8 * (len(VALUE_60K) + 6) < rules.MAX_VARIABLES_TOTAL < 9 * len(VALUE_60K)
    for i in range(1, 9):
        cli.ok("vars", "set", env_name, "web", f"BIG{i}={VALUE_60K}")

    before = snapshot(cli, env_name, docker_client)
    reason = refused(platform_env, "vars", "set", env_name, "web", f"BIG9={VALUE_60K}", says="512 KiB")
    assert len(reason) < 300, reason  # a reason, not the value
    refused(platform_env, "vars", "set", env_name, "web", "SMALL=1", f"BIG9={VALUE_60K}", says="512 KiB")
    assert snapshot(cli, env_name, docker_client) == before
    assert "SMALL" not in vars_json(cli, env_name, "web")  # all or nothing

    # Below the limit they work: the next job's environment holds all eight.
    cli.ok("redeploy", env_name, "web", "--wait")
    job_env = container_env(the_container(docker_client, env_name, "web"))
    assert {k: len(v) for k, v in job_env.items() if k.startswith("BIG")} == {
        f"BIG{i}": len(VALUE_60K) for i in range(1, 9)}


# --- 5. data volumes -------------------------------------------------------------------------------------


@pytest.fixture
def two_envs(cli: Cli, docker_client: docker.DockerClient) -> Iterator[tuple[str, str]]:
    """Env ``P-b`` and env ``P``: with services ``db`` and ``b-db``, "-" would join them alike."""
    prefix = f"x{uuid.uuid4().hex[:6]}"
    envs = (f"{prefix}-b", prefix)
    try:
        for name in envs:
            cli.ok("env", "create", name, "--sandbox", "--no-defaults")
        yield envs
    finally:  # every container first: were the names alike, one volume would serve both envs
        retire(cli.env["ORCH_DATABASE_URL"], *envs)
        remove_containers(docker_client, *envs)
        for name in envs:
            remove_env_leftovers(cli, docker_client, name)


def test_data_volumes_and_containers_of_lookalike_names_differ(cli: Cli, two_envs: tuple[str, str],
                                                               docker_client: docker.DockerClient) -> None:
    (dashed, plain), services = two_envs, ("db", "b-db")
    for env_, svc in zip(two_envs, services, strict=True):
        add_and_wait(cli, env_, svc, "--type", "postgresql", "--image", POSTGRES)

    running = {env_: the_container(docker_client, env_, svc) for env_, svc in zip(two_envs, services, strict=True)}
    mounted = {env_: [m["Name"] for m in c.attrs["Mounts"] if m["Type"] == "volume"] for env_, c in running.items()}
    assert mounted == {dashed: [f"orch_{dashed}_db_data"], plain: [f"orch_{plain}_b-db_data"]}
    for env_, svc in zip(two_envs, services, strict=True):
        [volume] = mounted[env_]
        assert docker_client.volumes.get(volume).attrs["Labels"] == {
            "orchestrator.env": env_, "orchestrator.service": svc}
        assert running[env_].name.startswith(f"orch_{env_}_{svc}_"), running[env_].name
    for env_, svc in zip(two_envs, services, strict=True):  # the old, ambiguous name: not made
        assert not docker_client.volumes.list(filters={"name": f"orch-{env_}-{svc}-data"})


# --- 6. push and not redeployable -----------------------------------------------------------------------


def test_push_to_a_not_redeployable_service_needs_support(
        api: Api, control: None, cli: Cli, platform_env: dict[str, str], env_name: str,  # noqa: F811
        docker_client: docker.DockerClient, tmp_path: Path) -> None:
    pushed_web(cli, env_name)
    cli.ok("services", "update", env_name, "web", "--not-redeployable", "--support")
    service = f"/envs/{env_name}/services/web"
    hook = {"env": env_name, "service": "web", "image": SAMPLE_IMAGE}
    before = snapshot(cli, env_name, docker_client)

    refused(platform_env, "push", env_name, "web", SAMPLE_IMAGE, says="not redeployable")
    refused(platform_env, "push", env_name, "web", SAMPLE_IMAGE, "--wait", says="not redeployable")
    for path, body in ((f"{service}/push", {"image": SAMPLE_IMAGE}), ("/hooks/push", hook)):
        response = api.as_user("POST", path, json=body)
        assert response.status_code == 400 and "not redeployable" in response.json()["detail"], response.text
        response = api.as_user("POST", path, json={**body, "support": True})
        assert response.status_code == 403 and "support" in response.json()["detail"], response.text
        response = api.as_support("POST", path, json=body)  # the role alone is not asking as support
        assert response.status_code == 400, response.text
    [by_task] = send(platform_env, tmp_path, ("orchestrator.push", {**hook}))
    assert "not redeployable" in by_task.get("message", ""), by_task
    assert snapshot(cli, env_name, docker_client) == before

    # Support may: from the CLI, the API (both routes) and the task API, each a new release.
    first = set(containers(docker_client, env_name, "web").values())
    cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--support", "--wait")
    ops = [api.as_support("POST", f"{service}/push", json={"image": SAMPLE_IMAGE, "support": True}),
           api.as_support("POST", "/hooks/push", json={**hook, "support": True})]
    assert [r.status_code for r in ops] == [202, 202], [r.text for r in ops]
    for response in ops:
        assert wait_op(cli, response.json()["id"])["state"] == "succeeded"
    [by_task] = send(platform_env, tmp_path, ("orchestrator.push", {**hook, "support": True}))
    assert "ok" in by_task, by_task
    op = wait_op(cli, by_task["ok"])
    assert op["state"] == "succeeded" and op["trigger"] == "push", op
    assert [r["number"] for r in as_json(cli, "releases", "list", env_name, "web")] == [1, 2, 3, 4, 5]
    now = containers(docker_client, env_name, "web")
    assert len(now) == 1 and not set(now.values()) & first
    assert service_json(cli, env_name, "web")["redeployable"] is False


# --- 7. secrets --------------------------------------------------------------------------------------------


def all_argv() -> dict[int, str]:
    """pid -> the command line of every process on this machine (the containers' too)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # gone meanwhile
                continue
    return found


def redis_says(sock: socket.socket, command: bytes, lines: int) -> list[bytes]:
    sock.sendall(command)
    got = b""
    while got.count(b"\r\n") < lines:
        chunk = sock.recv(4096)
        assert chunk, f"the connection closed after {got!r}"
        got += chunk
    return got.split(b"\r\n")[:lines]


def test_redis_password_is_in_no_argv_and_is_required(cli: Cli, env: str,
                                                       docker_client: docker.DockerClient) -> None:
    add_and_wait(cli, env, "cache", "--type", "redis", "--image", REDIS)
    password = vars_json(cli, env, "cache", secrets=True)["REDIS_PASSWORD"]["value"]
    assert len(password) >= 16 and "*" not in password
    port = deploy_port(cli, env, "cache")
    container = the_container(docker_client, env, "cache")

    top = container.top()
    command = top["Titles"].index("CMD")
    in_container = {int(p[top["Titles"].index("PID")]): p[command] for p in top["Processes"]}
    assert any("redis-server" in c for c in in_container.values()), in_container
    machine = all_argv()
    assert set(in_container) <= set(machine), "the container's processes are not in this /proc"
    leaks = {pid: argv for pid, argv in {**machine, **in_container}.items() if password in argv}
    assert leaks == {}, f"the password is in the argv of {leaks}"
    config = container.attrs["Config"]
    assert password not in json.dumps([config["Cmd"], config["Entrypoint"], container.attrs["Args"]])

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        [answer] = redis_says(sock, b"PING\r\n", 1)
        assert answer.startswith(b"-NOAUTH"), answer
        [wrong] = redis_says(sock, b"AUTH not-the-password\r\n", 1)
        assert wrong.startswith(b"-"), wrong
        assert redis_says(sock, f"AUTH {password}\r\nPING\r\n".encode(), 2) == [b"+OK", b"+PONG"]


def test_the_sqlite_catalogue_is_private(platform_env: dict[str, str], cli: Cli) -> None:
    url = platform_env["ORCH_DATABASE_URL"]
    assert url.startswith("sqlite:///"), url
    path = Path(url.removeprefix("sqlite:///"))
    cli.ok("env", "list")  # used, so its -wal and -shm exist too
    files = [f for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"))
             if f.exists()]
    assert path in files
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o600" for f in files}
    assert os.stat(path).st_uid == os.getuid()


def test_api_variables_mask_secrets_like_the_cli(api: Api, cli: Cli, env: str) -> None:
    add_and_wait(cli, env, "db", "--type", "postgresql", "--image", POSTGRES)
    cli.ok("services", "add", env, "web", "--type", "code", "--command", HTTPD)
    cli.ok("vars", "set", env, "web", "API_TOKEN=tok-123456", "GREETING=hi")
    password = vars_json(cli, env, "db", secrets=True)["POSTGRES_PASSWORD"]["value"]
    path = f"/envs/{env}/services/web/variables"

    for role in (api.as_user, api.as_support):
        masked = role("GET", path)
        assert masked.status_code == 200, masked.text
        assert masked.json() == as_json(cli, "vars", "list", env, "web")
        assert password not in masked.text and "tok-123456" not in masked.text
        by_name = {v["name"]: v for v in masked.json()}
        assert by_name["DATABASE_URL"]["value"].startswith("postgresql://app:*****@"), by_name["DATABASE_URL"]
        assert by_name["DATABASE_URL"]["secret"] and by_name["API_TOKEN"]["value"] == "*****"

        shown = role("GET", path, params={"show_secrets": "true"})
        assert shown.status_code == 200, shown.text
        assert shown.json() == as_json(cli, "vars", "list", env, "web", "--show-secrets")
        assert f"app:{password}@" in {v["name"]: v for v in shown.json()}["DATABASE_URL"]["value"]

    # Setting variables answers with the listing, masked too.
    changed = api.as_user("PATCH", path, json={"set": {"DB_PASSWORD": "hunter2-secret"}})
    assert changed.status_code == 200, changed.text
    assert password not in changed.text and "hunter2-secret" not in changed.text


# --- 8. connection variables -------------------------------------------------------------------------


def test_connection_variables_never_shadow_each_other(cli: Cli, platform_env: dict[str, str], env: str,
                                                      docker_client: docker.DockerClient) -> None:
    add_and_wait(cli, env, "pg", "--type", "postgresql", "--image", POSTGRES)
    before = snapshot(cli, env, docker_client)
    refused(platform_env, "services", "add", env, "database", "--type", "redis", "--image", REDIS,
            says="would both set DATABASE_URL")
    assert snapshot(cli, env, docker_client) == before

    add_and_wait(cli, env, "cache", "--type", "redis", "--image", REDIS)
    before = snapshot(cli, env, docker_client)
    refused(platform_env, "services", "add", env, "redis", "--type", "redis", "--image", REDIS,
            says="REDIS_URL")
    assert snapshot(cli, env, docker_client) == before
    assert sorted(s["name"] for s in as_json(cli, "services", "list", env)) == ["cache", "pg"]

    # Names that claim nothing twice are fine, and each variable has one owner.
    cli.ok("services", "add", env, "web", "--type", "code", "--command", HTTPD)
    found = vars_json(cli, env, "web", secrets=True)
    assert found["DATABASE_URL"]["value"] == found["PG_URL"]["value"]
    assert found["REDIS_URL"]["value"] == found["CACHE_URL"]["value"]


# --- 9. kept ports -------------------------------------------------------------------------------------


def test_a_failed_database_keeps_its_port_reserved(cli: Cli, env: str, docker_client: docker.DockerClient) -> None:
    out = cli.ok("services", "add", env, "db", "--type", "postgresql", "--image", BUSYBOX_IMAGE)
    op = wait_op(cli, op_of(out), OP_TIMEOUT)
    assert op["state"] == "failed", op  # busybox has no postgres to run: the start fails
    kept = service_json(cli, env, "db")["port"]
    assert isinstance(kept, int), kept
    assert containers(docker_client, env, "db") == {}

    add_and_wait(cli, env, "db2", "--type", "postgresql", "--image", POSTGRES)
    second = service_json(cli, env, "db2")["port"]
    assert second != kept and deploy_port(cli, env, "db2") == second
    assert service_json(cli, env, "db")["port"] == kept
    with socket.create_connection(("127.0.0.1", second), timeout=5):
        pass  # the second database listens on its own port
