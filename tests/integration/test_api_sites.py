"""Sites, proxy ports and health paths through the HTTP API (``orchestrator api`` in its own
process): sites added and removed through the API are what ``orchestrator sites list`` shows;
bad input is a 4xx with a one-line reason and changes nothing; a site's private key is never in
a response, not even in a 422 that names a missing field; ``GET /envs/{env}`` shows the proxy's
ports and the sites; a code service's health path round-trips through ``PATCH``."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import docker
import pytest
import requests
import trustme

from tests.conftest import Cli
from tests.harness import HTTPD, SAMPLE_IMAGE, free_port, remove_containers, retire, wait_for
from tests.helpers import op_of, ops_json, wait_op
from tests.integration.api import Api, api_fixture  # noqa: F401 (the api fixture)

pytestmark = pytest.mark.e2e

SITE = "app.example.com"
SECURE = "secure.example.com"


class Pem:
    """A certificate chain and its key, as the PEM text a client sends."""

    def __init__(self, ca: trustme.CA, name: str) -> None:
        issued = ca.issue_cert(name)
        self.cert = b"".join(blob.bytes() for blob in issued.cert_chain_pems).decode()
        self.key = issued.private_key_pem.bytes().decode()

    @property
    def key_lines(self) -> list[str]:
        """The key's base64 lines: none may show up in any response."""
        return [line for line in self.key.splitlines() if line and not line.startswith("-----")]


class Seen:
    """Every response body of a test, to check that no key ever left the API."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.bodies: list[str] = []

    def __call__(self, method: str, path: str, *, support: bool = False, **kwargs: Any) -> requests.Response:
        call = self.api.as_support if support else self.api.as_user
        response = call(method, path, **kwargs)
        self.bodies.append(response.text)
        return response

    def assert_never_shown(self, *pems: Pem) -> None:
        for pem in pems:
            for line in pem.key_lines:
                leaked = [body[:200] for body in self.bodies if line in body]
                assert not leaked, f"a key line was in a response: {leaked}"


def one_line(response: requests.Response, code: int) -> str:
    """A ``code`` response whose detail is one line of text (a 422: a list of one-line reasons)."""
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


def sites_json(cli: Cli, env: str) -> list[dict[str, Any]]:
    return json.loads(cli.ok("sites", "list", env, "--json"))  # type: ignore[no-any-return]


def code_service(cli: Cli, env: str, name: str = "web") -> None:
    cli.ok("services", "add", env, name, "--type", "code", "--command", HTTPD)


def test_sites_added_and_removed_through_the_api(api: Api, cli: Cli, env_name: str) -> None:
    """No service proxy in the environment (``--no-defaults``): a site is recorded at once, 201
    with the site (no operation) and 204 on removal."""
    code_service(cli, env_name)
    calls = Seen(api)
    pem = Pem(trustme.CA(), SECURE)
    sites = f"/envs/{env_name}/sites"
    assert calls("GET", sites).json() == [] == sites_json(cli, env_name)

    added = calls("POST", sites, json={"name": "App.Example.COM", "service": "web"})
    assert added.status_code == 201, added.text
    assert added.json() == {"name": SITE, "service": "web", "tls": False}
    added = calls("POST", sites, support=True,
                  json={"name": SECURE, "service": "web", "cert": pem.cert, "key": pem.key})
    assert added.status_code == 201, added.text
    assert added.json() == {"name": SECURE, "service": "web", "tls": True}

    expected = [{"name": SITE, "service": "web", "tls": False},
                {"name": SECURE, "service": "web", "tls": True}]
    assert sites_json(cli, env_name) == expected
    assert calls("GET", sites).json() == expected
    assert calls("GET", f"/envs/{env_name}").json()["sites"] == expected
    assert ops_json(cli, env_name) == []  # no proxy, so nothing to update

    removed = calls("DELETE", f"{sites}/{SITE.upper()}")
    assert (removed.status_code, removed.content) == (204, b""), removed.text
    assert sites_json(cli, env_name) == expected[1:]
    one_line(calls("DELETE", f"{sites}/{SITE}"), 404)
    assert calls("DELETE", f"{sites}/{SECURE}", support=True).status_code == 204
    assert sites_json(cli, env_name) == [] == calls("GET", sites).json()
    calls.assert_never_shown(pem)


def test_bad_sites_are_refused_with_a_reason_and_change_nothing(api: Api, cli: Cli, env_name: str) -> None:
    code_service(cli, env_name)
    added = cli.ok("services", "add", env_name, "logs", "--type", "logging", "--image", SAMPLE_IMAGE,
                   "--command", HTTPD)
    wait_op(cli, op_of(added, " deploys it"), succeed=True)
    calls = Seen(api)
    ca = trustme.CA()
    secure, other = Pem(ca, SECURE), Pem(ca, "other.example.com")
    sites = f"/envs/{env_name}/sites"
    assert calls("POST", sites, json={"name": SITE, "service": "web"}).status_code == 201
    snapshot = (cli.ok("sites", "list", env_name, "--json"), cli.ok("ops", "list", env_name, "--json"),
                cli.ok("env", "show", env_name, "--json"))

    cases: list[tuple[str, str, Any, int, str]] = [
        ("POST", sites, {"name": "not a name!", "service": "web"}, 400, "not a DNS name"),
        ("POST", sites, {"name": "", "service": "web"}, 400, "not a DNS name"),
        ("POST", sites, {"name": "*.example.com", "service": "web"}, 400, "not a DNS name"),
        ("POST", sites, {"name": "a..example.com", "service": "web"}, 400, "not a DNS name"),
        ("POST", sites, {"name": "x" * 300 + ".com", "service": "web"}, 400, "not a DNS name"),
        ("POST", sites, {"name": "x.example.com", "service": "nope"}, 404, "nope"),
        ("POST", sites, {"name": "x.example.com", "service": "logs"}, 400, "code services"),
        ("POST", sites, {"name": SITE.upper(), "service": "web"}, 400, "exists already"),
        ("POST", sites, {"name": SECURE, "service": "web", "cert": secure.cert}, 400, "both"),
        ("POST", sites, {"name": SECURE, "service": "web", "key": secure.key}, 400, "both"),
        ("POST", sites, {"name": SECURE, "service": "web", "cert": secure.cert, "key": other.key},
         400, "does not match"),
        ("POST", sites, {"name": "other.example.com", "service": "web", "cert": secure.cert, "key": secure.key},
         400, "not for other.example.com"),
        ("POST", sites, {"name": SECURE, "service": "web", "cert": "not a certificate", "key": secure.key},
         400, "not a PEM certificate"),
        ("POST", sites, {"name": SECURE, "service": "web", "cert": secure.cert, "key": "not a key"},
         400, "not an unencrypted PEM private key"),
        ("POST", "/envs/nope/sites", {"name": "x.example.com", "service": "web"}, 404, "nope"),
        # 422s name the field at fault and never echo the body (with its key) back.
        ("POST", sites, {"service": "web", "cert": secure.cert, "key": secure.key}, 422, "Field required"),
        ("POST", sites, {"name": SECURE, "cert": secure.cert, "key": secure.key}, 422, "Field required"),
        ("POST", sites, {"name": 5, "service": "web", "cert": secure.cert, "key": secure.key}, 422, "string"),
        ("POST", sites, {"name": SECURE, "service": "web", "cert": secure.cert, "key": [secure.key]},
         422, "string"),
        ("POST", sites, {"name": SECURE, "service": "web", "cert": secure.cert, "key": secure.key * 1000},
         422, "at most"),
        ("POST", sites, None, 422, "Field required"),
        ("DELETE", f"{sites}/nope.example.com", None, 404, "no site"),
        ("DELETE", f"{sites}/a%0Ab", None, 404, "no site"),
        ("DELETE", f"/envs/nope/sites/{SITE}", None, 404, "nope"),
        ("GET", "/envs/nope/sites", None, 404, "nope"),
    ]
    wrong = []
    for method, path, body, code, says in cases:
        response = calls(method, path, json=body)
        try:
            reason = one_line(response, code)
        except AssertionError as exc:
            wrong.append(f"{method} {path} {str(body)[:80]}: {exc}")
            continue
        if says not in reason:
            wrong.append(f"{method} {path} {str(body)[:80]}: {reason!r} does not say {says!r}")
    # A lone surrogate (valid JSON, not valid text) in any field: a 4xx, not a 500.
    for field in ("name", "service", "cert", "key"):
        raw = {"name": SECURE, "service": "web", "cert": secure.cert, "key": secure.key}
        text = json.dumps({**raw, field: "@"}).replace('"@"', '"\\ud800"')
        response = calls("POST", sites, data=text.encode(), headers={"Content-Type": "application/json"})
        try:
            one_line(response, 422 if response.status_code == 422 else 400)
        except AssertionError as exc:
            wrong.append(f"POST {sites} with a lone surrogate in the {field}: {exc}")
    assert not wrong, "\n".join(wrong)
    assert (cli.ok("sites", "list", env_name, "--json"), cli.ok("ops", "list", env_name, "--json"),
            cli.ok("env", "show", env_name, "--json")) == snapshot
    # The CLI agrees that the refused sites are not there.
    assert sites_json(cli, env_name) == [{"name": SITE, "service": "web", "tls": False}]
    calls.assert_never_shown(secure, other)


def test_env_shows_its_proxy_ports_and_sites(api: Api, cli: Cli, env_name: str,
                                              docker_client: docker.DockerClient) -> None:
    code_service(cli, env_name)
    assert api.as_user("POST", f"/envs/{env_name}/sites", json={"name": SITE, "service": "web"}).status_code == 201
    shown = json.loads(cli.ok("env", "show", env_name, "--json"))
    got = api.as_user("GET", f"/envs/{env_name}")
    assert got.status_code == 200, got.text
    assert got.json() == {k: shown[k] for k in ("name", "sandbox", "proxy", "sites", "dashboards")}
    proxy = got.json()["proxy"]
    assert set(proxy) == {"http_port", "https_port"}
    assert all(isinstance(p, int) for p in proxy.values()) and proxy["http_port"] != proxy["https_port"]
    assert got.json()["sites"] == [{"name": SITE, "service": "web", "tls": False}]
    # The listing of environments keeps its short form.
    assert {"name": env_name, "sandbox": True} in api.as_user("GET", "/envs").json()

    # Ports asked for at creation are the ones shown.
    name = f"t{uuid.uuid4().hex[:8]}"
    http_port, https_port = free_port(), free_port()
    while https_port == http_port:
        https_port = free_port()
    cli.ok("env", "create", name, "--sandbox", "--no-defaults", "--http-port", str(http_port),
           "--https-port", str(https_port))
    try:
        got = api.as_support("GET", f"/envs/{name}")
        assert got.json() == {"name": name, "sandbox": True, "sites": [], "dashboards": {},
                              "proxy": {"http_port": http_port, "https_port": https_port}}, got.text
    finally:
        retire(cli.env["ORCH_DATABASE_URL"], name)
        remove_containers(docker_client, name)
    one_line(api.as_user("GET", "/envs/nope"), 404)


def test_health_path_round_trips(api: Api, cli: Cli, env_name: str) -> None:
    code_service(cli, env_name)
    added = cli.ok("services", "add", env_name, "logs", "--type", "logging", "--image", SAMPLE_IMAGE,
                   "--command", HTTPD)
    wait_op(cli, op_of(added, " deploys it"), succeed=True)
    web = f"/envs/{env_name}/services/web"

    def shown() -> Any:
        return json.loads(cli.ok("services", "show", env_name, "web", "--json"))["health_path"]

    assert shown() is None
    # Any role may set it (like `services update --health-path`): it is not a support setting.
    patched = api.as_user("PATCH", web, json={"health_path": "/healthz?full=1"})
    assert patched.status_code == 200, patched.text
    assert patched.json()["health_path"] == "/healthz?full=1" == shown()
    assert api.as_user("GET", web).json()["health_path"] == "/healthz?full=1"
    patched = api.as_support("PATCH", web, json={"health_path": "/"})
    assert (patched.status_code, patched.json()["health_path"], shown()) == (200, "/", "/"), patched.text

    before = cli.ok("services", "list", env_name, "--json")
    for body, code, says in [
        ({"health_path": "healthz"}, 400, "must be a URL path"),
        ({"health_path": ""}, 400, "must be a URL path"),
        ({"health_path": "/a b"}, 400, "must be a URL path"),
        ({"health_path": "/" + "x" * 300}, 400, "at most"),
        ({"health_path": 5}, 422, "string"),
        ({"health_path": "/up", "overlap": 5}, 400, "on its own"),
        ({"health_path": None, "redeployable": False}, 400, "on its own"),
    ]:
        assert says in one_line(api.as_support("PATCH", web, json=body), code), body
    assert "code services" in one_line(
        api.as_user("PATCH", f"/envs/{env_name}/services/logs", json={"health_path": "/"}), 400)
    assert "nope" in one_line(
        api.as_user("PATCH", f"/envs/{env_name}/services/nope", json={"health_path": "/"}), 404)
    # The other settings stay support-only.
    assert "support" in one_line(api.as_user("PATCH", web, json={"overlap": 5}), 403)
    assert cli.ok("services", "list", env_name, "--json") == before

    # null: back to a TCP check.
    patched = api.as_user("PATCH", web, json={"health_path": None})
    assert patched.status_code == 200, patched.text
    assert patched.json()["health_path"] is None and shown() is None
    # The CLI's setting reads back through the API too.
    cli.ok("services", "update", env_name, "web", "--health-path", "/ready")
    assert api.as_user("GET", web).json()["health_path"] == "/ready"


@pytest.fixture
def proxied(cli: Cli, docker_client: docker.DockerClient) -> Iterator[str]:
    """A sandbox environment with its included services (logging, the service proxy) running."""
    name = f"p{uuid.uuid4().hex[:8]}"
    out = cli.ok("env", "create", name, "--sandbox")
    try:
        for line in out.splitlines():
            if line.startswith("operation "):
                wait_op(cli, line.split()[1], succeed=True)
        yield name
    finally:
        retire(cli.env["ORCH_DATABASE_URL"], name)
        remove_containers(docker_client, name)


def test_with_a_proxy_site_changes_are_operations(api: Api, cli: Cli, proxied: str) -> None:
    """With a service proxy in the environment, adding or removing a site answers 202 with the
    operation that takes it live; the site is then served on the proxy's HTTP port."""
    env = proxied
    code_service(cli, env)
    pushed = api.as_user("POST", f"/envs/{env}/services/web/push", json={"image": SAMPLE_IMAGE})
    assert pushed.status_code == 202, pushed.text
    wait_op(cli, pushed.json()["id"], succeed=True)
    calls = Seen(api)
    pem = Pem(trustme.CA(), SECURE)

    for body in ({"name": SITE, "service": "web"},
                 {"name": SECURE, "service": "web", "cert": pem.cert, "key": pem.key}):
        response = calls("POST", f"/envs/{env}/sites", json=body)
        assert response.status_code == 202, response.text
        op = response.json()
        assert op["kind"] == "routes" and op["url"] == f"/api/v1/operations/{op['id']}", op
        wait_op(cli, op["id"], succeed=True)
        calls("GET", f"/operations/{op['id']}")
    assert sites_json(cli, env) == [{"name": SITE, "service": "web", "tls": False},
                                    {"name": SECURE, "service": "web", "tls": True}]
    port = calls("GET", f"/envs/{env}").json()["proxy"]["http_port"]

    def status_of(host: str) -> int:
        try:
            return requests.get(f"http://127.0.0.1:{port}/", headers={"Host": host}, timeout=3).status_code
        except requests.ConnectionError:
            return 0

    assert wait_for("the site to be served", lambda: status_of(SITE), 20, until=lambda s: s == 200) == 200

    removed = calls("DELETE", f"/envs/{env}/sites/{SITE}")
    assert removed.status_code == 202 and removed.json()["kind"] == "routes", removed.text
    wait_op(cli, removed.json()["id"], succeed=True)
    assert wait_for("the site to go", lambda: status_of(SITE), 10, until=lambda s: s == 404) == 404
    assert sites_json(cli, env) == [{"name": SECURE, "service": "web", "tls": True}]
    calls("GET", f"/operations?env={env}")
    calls.assert_never_shown(pem)
