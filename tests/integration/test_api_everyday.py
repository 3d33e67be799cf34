"""The everyday calls of the HTTP API (``orchestrator api`` in its own process): environments and
services created, changed and removed through the API are what the CLI lists; bad input is a 4xx
with a one-line reason and changes nothing; a one-off command's operation ends by its exit code;
a queued operation cancels; and /docs is Swagger UI served by the API itself, never from a CDN."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import docker
import pytest
import requests

from tests.conftest import Cli, containers
from tests.harness import HTTPD, SAMPLE_IMAGE, remove_containers, retire
from tests.helpers import op_json, ops_json, service_json, wait_op
from tests.integration.api import Api, api_fixture  # noqa: F401 (the api fixture)
from tests.integration.service_helpers import OP_TIMEOUT, REDIS

pytestmark = pytest.mark.e2e


def one_line(response: requests.Response, code: int) -> str:
    """A ``code`` response whose detail is one line (a 422: a list of one-line reasons)."""
    assert response.status_code == code, f"{response.status_code} (not {code}): {response.text[:300]}"
    assert response.headers.get("content-type") == "application/json", response.headers
    detail = response.json()["detail"]
    if code == 422:
        assert isinstance(detail, list) and detail, detail
        reasons = [d["msg"] for d in detail]
        assert all(isinstance(r, str) and r and "\n" not in r for r in reasons), detail
        return "; ".join(reasons)
    assert isinstance(detail, str) and detail and "\n" not in detail, detail
    return detail


def accepted(response: requests.Response, kind: str) -> int:
    """A 202 whose body names the operation it started."""
    assert response.status_code == 202, f"{response.status_code}: {response.text}"
    body = response.json()
    assert body["kind"] == kind and body["url"] == f"/api/v1/operations/{body['id']}", body
    return int(body["id"])


def services_json(cli: Cli, env: str) -> list[dict[str, Any]]:
    return json.loads(cli.ok("services", "list", env, "--json"))  # type: ignore[no-any-return]


def refusals(call: Any, cases: list[tuple[str, str, Any, int, str]]) -> list[str]:
    """Each case answered with its code and a one-line reason that says what it should; what was not."""
    wrong = []
    for method, path, body, code, says in cases:
        try:
            reason = one_line(call(method, path, json=body), code)
        except AssertionError as exc:
            wrong.append(f"{method} {path} {str(body)[:80]}: {exc}")
            continue
        if says not in reason:
            wrong.append(f"{method} {path} {str(body)[:80]}: {reason!r} does not say {says!r}")
    return wrong


@pytest.fixture
def new_env(cli: Cli, docker_client: docker.DockerClient) -> Iterator[str]:
    """A name for an environment the test creates through the API; its containers go afterwards."""
    name = f"a{uuid.uuid4().hex[:8]}"
    yield name
    retire(cli.env["ORCH_DATABASE_URL"], name)
    remove_containers(docker_client, name)


def test_envs_and_services_made_through_the_api_are_what_the_cli_lists(
        api: Api, cli: Cli, new_env: str, docker_client: docker.DockerClient) -> None:
    created = api.as_user("POST", "/envs", json={"name": new_env, "sandbox": True, "defaults": False})
    assert created.status_code == 201, created.text
    assert created.json() == {"name": new_env, "sandbox": True, "sites": [], "operations": [],
                              "proxy": {"http_port": None, "https_port": None}, "dashboards": {}}
    assert api.as_user("GET", f"/envs/{new_env}").json() == {
        k: v for k, v in created.json().items() if k != "operations"}
    assert {"name": new_env, "sandbox": True} in json.loads(cli.ok("env", "list", "--json"))
    services = f"/envs/{new_env}/services"

    web = api.as_user("POST", services, json={"name": "web", "type": "code", "command": HTTPD})
    assert web.status_code == 201, web.text
    assert web.json()["operation"] is None  # a code service waits for its first push
    assert (web.json()["type"], web.json()["image"], web.json()["scale"], web.json()["size"]) == ("code", None, 1, "s")
    cache = api.as_support("POST", services, json={"name": "cache", "type": "redis", "image": REDIS, "size": "xs"})
    assert cache.status_code == 201, cache.text
    deployed = wait_op(cli, cache.json()["operation"], OP_TIMEOUT, succeed=True)
    assert (deployed["kind"], deployed["service"], deployed["trigger"]) == ("deploy", "cache", "create")
    assert "credentials" not in cache.json() and "password" not in cache.text.lower()

    listed = services_json(cli, new_env)
    assert [s["name"] for s in listed] == ["cache", "web"]
    assert {k: v for k, v in web.json().items() if k != "operation"} == listed[1]
    assert (listed[0]["type"], listed[0]["image"], listed[0]["size"]) == ("redis", REDIS, "xs")
    assert api.as_user("GET", services).json() == listed
    assert len(containers(docker_client, new_env, "cache")) == 1

    # A service removed through the API: its jobs stop, it leaves the listing, its name is free.
    removed = accepted(api.as_user("DELETE", f"{services}/cache"), "remove")
    wait_op(cli, removed, OP_TIMEOUT, succeed=True)
    assert [s["name"] for s in services_json(cli, new_env)] == ["web"]
    assert [s["name"] for s in api.as_user("GET", services).json()] == ["web"]
    assert containers(docker_client, new_env, "cache", running=False) == {}
    assert "cache" in one_line(api.as_user("DELETE", f"{services}/cache"), 404)

    # The environment removed through the API: an operation per service, then it is gone.
    gone = api.as_user("DELETE", f"/envs/{new_env}", params={"delete_data": "true"})
    assert gone.status_code == 202, gone.text
    assert [(o["service"], o["kind"]) for o in gone.json()] == [("web", "remove")]
    for op in gone.json():
        assert op["url"] == f"/api/v1/operations/{op['id']}"
        wait_op(cli, op["id"], OP_TIMEOUT, succeed=True)
    one_line(api.as_user("GET", f"/envs/{new_env}"), 404)
    assert new_env not in {e["name"] for e in json.loads(cli.ok("env", "list", "--json"))}
    one_line(api.as_user("DELETE", f"/envs/{new_env}"), 404)


def test_an_env_with_its_included_services(api: Api, cli: Cli, new_env: str,
                                            docker_client: docker.DockerClient) -> None:
    """With the defaults, the 201 names the operations that deploy the included services."""
    created = api.as_user("POST", "/envs", json={"name": new_env, "sandbox": True})
    assert created.status_code == 201, created.text
    body = created.json()
    assert all(isinstance(p, int) for p in body["proxy"].values()), body
    shown = json.loads(cli.ok("env", "show", new_env, "--json"))
    assert {k: body[k] for k in ("name", "sandbox", "proxy", "sites")} == {
        k: shown[k] for k in ("name", "sandbox", "proxy", "sites")}
    deployed = {wait_op(cli, op, OP_TIMEOUT, succeed=True)["service"] for op in body["operations"]}
    assert deployed == {s["name"] for s in shown["services"]} and len(deployed) == 2  # no monitoring: a sandbox
    ops = api.as_user("DELETE", f"/envs/{new_env}").json()
    assert sorted(o["service"] for o in ops) == sorted(deployed)
    for op in ops:
        wait_op(cli, op["id"], OP_TIMEOUT, succeed=True)
    assert containers(docker_client, new_env, running=False) == {}
    assert new_env not in {e["name"] for e in json.loads(cli.ok("env", "list", "--json"))}


def test_bad_input_is_refused_in_one_line_and_changes_nothing(api: Api, cli: Cli, env_name: str) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD)
    services = f"/envs/{env_name}/services"
    fresh = f"b{uuid.uuid4().hex[:8]}"
    snapshot = (cli.ok("env", "list", "--json"), cli.ok("services", "list", env_name, "--json"),
                cli.ok("ops", "list", env_name, "--json"))
    redis: dict[str, Any] = {"name": "cache", "type": "redis", "image": REDIS}
    cases: list[tuple[str, str, Any, int, str]] = [
        ("POST", "/envs", {"name": "Bad_Name"}, 400, "not a DNS label"),
        ("POST", "/envs", {"name": ""}, 400, "not a DNS label"),
        ("POST", "/envs", {"name": "-x", "defaults": False}, 400, "not a DNS label"),
        ("POST", "/envs", {"name": "x" * 64, "defaults": False}, 400, "not a DNS label"),
        ("POST", "/envs", {"name": "a.b", "defaults": False}, 400, "not a DNS label"),
        ("POST", "/envs", {"name": env_name}, 400, "exists already"),
        ("POST", "/envs", {"name": fresh, "http_port": 80}, 400, "port from 1024"),
        ("POST", "/envs", {"name": fresh, "http_port": 2**70}, 400, "port from 1024"),
        ("POST", "/envs", {"name": fresh, "http_port": "8080"}, 422, "integer"),
        ("POST", "/envs", {"name": fresh, "http_port": True}, 422, "integer"),
        ("POST", "/envs", {"name": fresh, "sandbox": "yes"}, 422, "boolean"),
        ("POST", "/envs", {"name": fresh, "defaults": 0}, 422, "boolean"),
        ("POST", "/envs", {"name": 5}, 422, "string"),
        ("POST", "/envs", {"sandbox": True}, 422, "Field required"),
        ("POST", "/envs", None, 422, "Field required"),
        ("POST", services, {**redis, "name": "Cache"}, 400, "not a DNS label"),
        ("POST", services, {**redis, "name": "a_b"}, 400, "not a DNS label"),
        ("POST", services, {**redis, "name": ""}, 400, "not a DNS label"),
        ("POST", services, {**redis, "name": "web"}, 400, "exists already"),
        ("POST", services, {**redis, "type": "nosuch"}, 422, "Input should be"),
        ("POST", services, {"name": "cache", "image": REDIS}, 422, "Field required"),
        ("POST", services, {**redis, "scale": "1"}, 422, "integer"),
        ("POST", services, {**redis, "scale": True}, 422, "integer"),
        ("POST", services, {**redis, "scale": 1.5}, 422, "integer"),
        ("POST", services, {**redis, "scale": -1}, 422, "greater than or equal"),
        ("POST", services, {**redis, "scale": 2}, 400, "scale above 1"),
        ("POST", services, {**redis, "size": "huge"}, 400, "neither a named size"),
        ("POST", services, {**redis, "size": ""}, 400, "neither a named size"),
        ("POST", services, {**redis, "size": "1m"}, 400, "at least 6m"),
        ("POST", services, {**redis, "size": 5}, 422, "string"),
        ("POST", services, {**redis, "image": "two words"}, 400, "image"),
        ("POST", services, {**redis, "command": "redis-server\0"}, 400, "NUL"),
        ("POST", services, {"name": "app", "type": "code", "image": SAMPLE_IMAGE}, 400, "without an image"),
        ("POST", "/envs/nope/services", redis, 404, "nope"),
        ("POST", f"{services}/web/run", {"argv": []}, 400, "give the command"),
        ("POST", f"{services}/web/run", {"argv": "true"}, 422, "list"),
        ("POST", f"{services}/web/run", {"argv": ["true"]}, 400, "no image yet"),
        ("POST", f"{services}/nope/run", {"argv": ["true"]}, 404, "nope"),
        ("POST", f"{services}/web/exec", {"argv": ["true"]}, 400, "runs no job"),
        ("POST", f"{services}/web/exec", {"argv": ["true"], "job": 5}, 422, "string"),
        ("POST", "/operations/999999/cancel", None, 404, "no operation"),
        ("POST", f"/operations/{2**70}/cancel", None, 404, "no operation"),
        ("POST", "/operations/abc/cancel", None, 422, "integer"),
        ("DELETE", "/envs/nope", None, 404, "nope"),
        ("DELETE", f"{services}/nope", None, 404, "nope"),
        ("DELETE", f"{services}/web", {"delete_data": "perhaps"}, 422, "boolean"),
    ]
    wrong = []
    for method, path, body, code, says in cases:
        kwargs = {"params": body} if method == "DELETE" else {"json": body}
        try:
            reason = one_line(api.as_user(method, path, **kwargs), code)
        except AssertionError as exc:
            wrong.append(f"{method} {path} {str(body)[:80]}: {exc}")
            continue
        if says not in reason:
            wrong.append(f"{method} {path} {str(body)[:80]}: {reason!r} does not say {says!r}")
    # A lone surrogate (valid JSON, not valid text): a 4xx, not a 500.
    for path, raw in (("/envs", {"name": "@"}), (services, {"name": "x", "type": "code", "command": "@"}),
                      (f"{services}/web/run", {"argv": ["@"]})):
        text = json.dumps(raw).replace('"@"', '"\\ud800"')
        response = api.as_user("POST", path, data=text.encode(), headers={"Content-Type": "application/json"})
        if response.status_code not in (400, 422):
            wrong.append(f"POST {path} with a lone surrogate: {response.status_code} {response.text[:200]}")
    assert not wrong, "\n".join(wrong)
    assert (cli.ok("env", "list", "--json"), cli.ok("services", "list", env_name, "--json"),
            cli.ok("ops", "list", env_name, "--json")) == snapshot


def test_patch_changes_image_command_and_size(api: Api, cli: Cli, env_name: str) -> None:
    services = f"/envs/{env_name}/services"
    added = api.as_user("POST", services, json={"name": "cache", "type": "redis", "image": REDIS})
    assert added.status_code == 201, added.text
    wait_op(cli, added.json()["operation"], OP_TIMEOUT, succeed=True)
    assert api.as_user("POST", services, json={"name": "web", "type": "code", "command": HTTPD}).status_code == 201
    cache, web = f"{services}/cache", f"{services}/web"

    def shown(service: str) -> tuple[Any, Any, Any]:
        data = service_json(cli, env_name, service)
        return data["image"], data["command"], data["size"]

    # Any role; what the API answers is what the CLI shows.
    patched = api.as_user("PATCH", cache, json={"image": f"{REDIS}-alpine", "command": "redis-server --save ''",
                                                "size": "m"})
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert (body["image"], body["command"], body["size"]) == (f"{REDIS}-alpine", "redis-server --save ''", "m")
    assert shown("cache") == (f"{REDIS}-alpine", "redis-server --save ''", "m")
    assert api.as_user("GET", cache).json() == body
    patched = api.as_support("PATCH", cache, json={"image": REDIS, "command": None, "size": "256m:0.5"})
    assert patched.status_code == 200, patched.text
    assert shown("cache") == (REDIS, None, "256m:0.5")
    patched = api.as_user("PATCH", web, json={"command": "", "size": "xs"})
    assert patched.status_code == 200, patched.text
    assert shown("web") == (None, None, "xs")
    assert api.as_user("PATCH", web, json={"command": HTTPD}).json()["command"] == HTTPD

    before = (cli.ok("services", "list", env_name, "--json"), cli.ok("ops", "list", env_name, "--json"))
    wrong = refusals(api.as_user, [
        ("PATCH", web, {"image": SAMPLE_IMAGE}, 400, "code service"),
        ("PATCH", web, {"overlap": 5}, 403, "support"),
        ("PATCH", web, {"redeployable": False}, 403, "support"),
        ("PATCH", web, {}, 400, "nothing to update"),
        ("PATCH", cache, {"image": "two words"}, 400, "image"),
        ("PATCH", cache, {"image": None}, 400, "null"),
        ("PATCH", cache, {"image": ""}, 400, "image"),
        ("PATCH", cache, {"size": "huge"}, 400, "neither a named size"),
        ("PATCH", cache, {"size": None}, 400, "null"),
        ("PATCH", cache, {"size": 5}, 422, "string"),
        ("PATCH", cache, {"command": 5}, 422, "string"),
        ("PATCH", cache, {"command": "a\0b"}, 400, "NUL"),
        ("PATCH", cache, {"health_path": "/"}, 400, "code services"),
        ("PATCH", f"{services}/nope", {"size": "m"}, 404, "nope"),
    ])
    wrong += refusals(api.as_support, [
        ("PATCH", web, {"size": "m", "overlap": 5}, 400, "on its own"),
        ("PATCH", web, {"image": SAMPLE_IMAGE}, 400, "code service"),
        ("PATCH", cache, {"overlap": 5}, 400, "code services only"),
    ])
    assert not wrong, "\n".join(wrong)
    assert (cli.ok("services", "list", env_name, "--json"), cli.ok("ops", "list", env_name, "--json")) == before
    # The support settings, as support.
    patched = api.as_support("PATCH", web, json={"overlap": 3, "redeployable": False})
    assert patched.status_code == 200, patched.text
    assert (patched.json()["overlap"], patched.json()["redeployable"]) == (3, False)


def test_run_exec_and_cancel(api: Api, cli: Cli, env_name: str) -> None:
    services = f"/envs/{env_name}/services"
    assert api.as_user("POST", services, json={"name": "web", "type": "code", "command": HTTPD}).status_code == 201
    web = f"{services}/web"
    wait_op(cli, accepted(api.as_user("POST", f"{web}/push", json={"image": SAMPLE_IMAGE}), "deploy"), succeed=True)

    # A one-off command: the operation fails or succeeds by its exit code, and keeps its output.
    failed = accepted(api.as_user("POST", f"{web}/run", json={"argv": ["sh", "-c", "echo ran here; exit 3"]}), "run")
    assert wait_op(cli, failed)["state"] == "failed"
    op = api.as_user("GET", f"/operations/{failed}").json()
    assert op == op_json(cli, failed)
    assert op["params"]["argv"] == ["sh", "-c", "echo ran here; exit 3"]
    assert op["steps"][-1]["exit_code"] == 3 and "ran here" in op["steps"][-1]["output"]
    ok = accepted(api.as_support("POST", f"{web}/run", json={"argv": ["sh", "-c", "exit 0"]}), "run")
    assert wait_op(cli, ok)["state"] == "succeeded"

    # In the running job.
    job = api.as_user("GET", f"{web}/jobs").json()[0]["id"]
    in_job = accepted(api.as_user("POST", f"{web}/exec", json={"argv": ["sh", "-c", "echo job=$ORCH_JOB; exit 4"],
                                                                "job": job}), "exec")
    done = wait_op(cli, in_job)
    assert done["state"] == "failed" and done["steps"][-1]["exit_code"] == 4, done
    assert f"job={job}" in done["steps"][-1]["output"]
    assert wait_op(cli, accepted(api.as_user("POST", f"{web}/exec", json={"argv": ["true"]}), "exec"))[
        "state"] == "succeeded"
    assert "no running job nope" in one_line(
        api.as_user("POST", f"{web}/exec", json={"argv": ["true"], "job": "nope"}), 400)

    # An operation queued behind a running one cancels without running; an ended one is refused.
    running = accepted(api.as_user("POST", f"{web}/run", json={"argv": ["sleep", "4"]}), "run")
    queued = accepted(api.as_user("POST", f"{web}/run", json={"argv": ["sh", "-c", "exit 0"]}), "run")
    assert op_json(cli, queued)["state"] == "queued"
    cancelled = api.as_user("POST", f"/operations/{queued}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert (cancelled.json()["id"], cancelled.json()["state"]) == (queued, "cancelled")
    assert cancelled.json() == op_json(cli, queued)
    assert all(s["state"] == "skipped" for s in cancelled.json()["steps"])
    assert "ended already" in one_line(api.as_user("POST", f"/operations/{queued}/cancel"), 400)
    assert wait_op(cli, running)["state"] == "succeeded"
    assert {o["id"]: o["state"] for o in ops_json(cli, env_name)}[queued] == "cancelled"


def test_docs_are_served_offline(api: Api) -> None:
    root = api.base.removesuffix("/api/v1")
    page = requests.get(f"{root}/docs", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page.text[:200]
    html = page.text
    assert "cdn.jsdelivr" not in html and "unpkg" not in html
    assert not re.search(r"https?://|//[a-z]", html), html  # nothing from another host
    urls = re.findall(r'<script src="([^"]+)"', html) + re.findall(r'<link[^>]*href="([^"]+)"', html)
    assert len(urls) >= 3, html  # the script, the stylesheet, the icon
    for url in urls:
        assert url.startswith("/"), url
        served = requests.get(root + url, timeout=10)
        assert served.status_code == 200 and served.content, url
    js = requests.get(root + next(u for u in urls if u.endswith(".js")), timeout=10)
    assert "SwaggerUIBundle" in js.text and "javascript" in js.headers["content-type"]
    assert "unpkg" not in requests.get(root + next(u for u in urls if u.endswith(".css")), timeout=10).text

    # The document the page reads: served here too, in the OpenAPI 3.0 this Swagger UI renders,
    # with the same operations as the API's own document.
    found = re.search(r"url: '([^']+)'", html)
    assert found and found.group(1).startswith("/"), html
    shown = requests.get(root + found.group(1), timeout=10).json()
    assert shown["openapi"].startswith("3.0.")
    document = requests.get(f"{api.base}/openapi.json", timeout=10).json()
    assert {p: set(o) for p, o in shown["paths"].items()} == {p: set(o) for p, o in document["paths"].items()}
    assert requests.get(f"{root}/redoc", timeout=10).status_code == 404  # it would load from a CDN

    # Every operation has a tag (declared) and a one-line description; the API has a description.
    assert document["info"]["description"]
    declared = {t["name"] for t in document["tags"]}
    missing = [f"{method.upper()} {path}" for path, ops in document["paths"].items() for method, op in ops.items()
               if not op.get("tags") or not set(op["tags"]) <= declared
               or not op.get("description") or "\n" in op["description"]]
    assert not missing, missing
