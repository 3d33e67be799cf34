"""The monitoring service for real: an environment's Prometheus and blackbox exporter (its own
job), checking a code service by its health path and a PostgreSQL service by its port, following
a redeploy by itself, alerting on a container stopped behind the platform's back; the node's
job metrics and node exporter; the API's /metrics counting a redeploy."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import docker
import pytest
import requests
import sqlalchemy

from tests.conftest import DOCKER_URL, Cli
from tests.harness import (
    HTTPD,
    SAMPLE_IMAGE,
    Platform,
    PlatformEnv,
    free_port,
    platform_process,
    remove_containers,
    retire,
    wait_for,
)
from tests.helpers import jobs_json, op_of, wait_op
from tests.integration.api import serving

pytestmark = pytest.mark.e2e

REDIS_DB = int(os.environ.get("ORCH_TEST_MONITORING_REDIS_DB", "11"))
PORTS = (30000, 30249)  # jobs, then proxies (the last 50)
OP_TIMEOUT = 120
CHECKED = 60  # seconds from a change to what the monitoring shows (the issue: "within a minute")


@dataclass
class Monitored:
    cli: Cli
    docker: docker.DockerClient
    env: str
    api: str
    database_url: str
    host: str

    def no_healing(self, service: str) -> None:
        """The platform heals a job that died at once: told not to, its job stays down to alert on."""
        engine = sqlalchemy.create_engine(self.database_url)
        try:
            with engine.begin() as conn:
                conn.execute(sqlalchemy.text(
                    "UPDATE service SET heal_gave_up = 1 WHERE name = :svc AND env_id IN "
                    "(SELECT id FROM environment WHERE name = :env)"), {"svc": service, "env": self.env})
        finally:
            engine.dispose()

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli.ok("status", self.env, "--json"))  # type: ignore[no-any-return]

    def checks(self) -> dict[str, dict[str, Any]]:
        """Job (or site) -> its check."""
        return {c["job"] or c["target"]: c for c in self.status()["checks"]}

    def prometheus(self, query: str) -> list[dict[str, Any]]:
        board = json.loads(self.cli.ok("env", "show", self.env, "--json", "--show-secrets"))["dashboards"]["monitoring"]
        base = board["url"].split("/consoles/")[0]
        got = requests.get(f"{base}/api/v1/query", params={"query": query}, auth=(board["user"], board["password"]),
                           timeout=10)
        got.raise_for_status()
        return got.json()["data"]["result"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitored]:
    workdir = tmp_path_factory.mktemp("monitoring")
    env = PlatformEnv(f"sqlite:///{workdir / 'catalogue.db'}", REDIS_DB, PORTS, heartbeat_interval=0.5)
    env.flush()
    platform = Platform(env, workdir)
    cli = Cli(env.variables())
    client = docker.DockerClient(base_url=DOCKER_URL, version="auto")
    tag = uuid.uuid4().hex[:5]
    name, host = f"mo{tag}", f"mo1{tag}"
    try:
        cli.ok("hosts", "add", host, "--docker-url", DOCKER_URL, "--address", "127.0.0.1")
        platform.start_node(host)
        for line in cli.ok("env", "create", name).splitlines():  # not a sandbox: it has monitoring
            if line.startswith("operation "):
                wait_op(cli, op_of(line), OP_TIMEOUT, succeed=True)
        cli.ok("services", "add", name, "web", "--type", "code", "--scale", "2", "--size", "xs", "--command", HTTPD)
        cli.ok("services", "update", name, "web", "--health-path", "/index.html")
        wait_op(cli, op_of(cli.ok("push", name, "web", SAMPLE_IMAGE)), OP_TIMEOUT, succeed=True)
        wait_op(cli, op_of(cli.ok("services", "add", name, "db", "--type", "postgresql", "--image", "orch/postgres:15",
                                  "--size", "xs")), OP_TIMEOUT, succeed=True)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with platform_process(["api", "--port", str(port)], env.variables(), workdir / "api.log",
                              ready=lambda _: serving(base)):
            yield Monitored(cli, client, name, base, env.database_url, host)
    finally:
        platform.stop_nodes()
        retire(env.database_url, name)
        remove_containers(client, name)
        for volume in client.volumes.list(filters={"label": f"orchestrator.env={name}"}):
            volume.remove(force=True)
        client.close()


def test_every_check_of_a_code_and_a_postgresql_service_passes(monitored: Monitored) -> None:
    mo = monitored
    jobs = {j["id"]: j for j in jobs_json(mo.cli, mo.env)}
    web = {i for i, j in jobs.items() if j["service"] == "web"}
    db = {i for i, j in jobs.items() if j["service"] == "db"}
    checks = wait_for("every check passing", mo.checks, CHECKED, every=1,
                      until=lambda c: all(c.get(j, {}).get("state") == "passing" for j in web | db))
    assert {checks[j]["check"] for j in web} == {"http"} and {checks[j]["check"] for j in db} == {"postgresql"}
    assert all(checks[j]["detail"] == "HTTP 200" for j in web)
    status = mo.status()
    assert {s["name"]: (s["running"], s["wanted"]) for s in status["services"]}["web"] == (2, 2)
    assert status["monitoring"] is None and not [a for a in status["alerts"] if a["state"] == "firing"]
    # The hosts' metrics too: the node exporter, and the node's metrics of this environment's jobs.
    wait_for("the node exporter scraped", lambda: mo.prometheus('up{job="node"}'), CHECKED, every=1,
             until=lambda r: bool(r) and r[0]["value"][1] == "1")
    memory = wait_for("job memory", lambda: mo.prometheus('orchestrator_job_memory_bytes{service="web"}'), CHECKED,
                      every=1, until=lambda r: len(r) == 2)
    assert {r["metric"]["job"] for r in memory} == web and all(float(r["value"][1]) > 0 for r in memory)
    wanted = mo.prometheus('orchestrator_service_wanted_jobs{service="web"}')
    assert wanted and wanted[0]["value"][1] == "2"


def test_a_redeploy_is_followed_and_counted_without_touching_the_monitoring(monitored: Monitored) -> None:
    mo = monitored
    monitoring = [j for j in jobs_json(mo.cli, mo.env) if j["service"] == "monitoring"]

    def redeploys() -> float:
        text = requests.get(f"{mo.api}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith('orchestrator_operations_total{kind="redeploy",outcome="succeeded"}'):
                return float(line.split()[-1])
        return 0.0

    before = redeploys()
    old = {j["id"] for j in jobs_json(mo.cli, mo.env, "web")}
    wait_op(mo.cli, op_of(mo.cli.ok("redeploy", mo.env, "web")), OP_TIMEOUT, succeed=True)
    new = {j["id"] for j in jobs_json(mo.cli, mo.env, "web")}
    assert redeploys() == before + 1
    checks = wait_for("the new jobs checked, the old ones gone", mo.checks, CHECKED, every=1,
                      until=lambda c: all(c.get(j, {}).get("state") == "passing" for j in new) and not old & set(c))
    assert {checks[j]["service"] for j in new} == {"web"}
    assert [j for j in jobs_json(mo.cli, mo.env) if j["service"] == "monitoring"] == monitoring


def test_a_container_stopped_behind_the_platforms_back_fails_its_check_and_alerts(monitored: Monitored) -> None:
    mo = monitored
    victim = jobs_json(mo.cli, mo.env, "web")[0]
    mo.no_healing("web")
    mo.docker.containers.get(victim["container_id"]).stop(timeout=1)
    failed = wait_for("the job marked failed in the catalogue", lambda: jobs_json(mo.cli, mo.env, "web",
                                                                               everything=True), 10, every=0.5,
                      until=lambda js: any(j["id"] == victim["id"] and j["state"] == "failed" for j in js))
    assert failed
    status = wait_for("a failing check and a firing JobDown", mo.status, CHECKED, every=1,
                      until=lambda s: any(a["name"] == "JobDown" and a["job"] == victim["id"] and a["state"] == "firing"
                                          for a in s["alerts"]))
    check = next(c for c in status["checks"] if c["job"] == victim["id"])
    assert check["state"] == "failing" and check["since"]
    assert {s["name"]: (s["running"], s["wanted"]) for s in status["services"]}["web"] == (1, 2)
    text = mo.cli.ok("status", mo.env)
    assert "JobDown" in text and victim["id"] in text and "failing" in text


def test_a_site_is_checked_through_the_proxy(monitored: Monitored) -> None:
    mo = monitored
    site = f"{mo.env}.localhost"
    wait_op(mo.cli, op_of(mo.cli.ok("sites", "add", mo.env, site, "--service", "web")), OP_TIMEOUT, succeed=True)
    checks = wait_for("the site checked through the proxy", mo.checks, CHECKED, every=1,
                      until=lambda c: c.get(site, {}).get("state") == "passing")
    assert (checks[site]["check"], checks[site]["service"], checks[site]["detail"]) == ("site", "web", "HTTP 200")


def test_the_dashboard_needs_the_credentials(monitored: Monitored) -> None:
    mo = monitored
    masked = json.loads(mo.cli.ok("env", "show", mo.env, "--json"))["dashboards"]["monitoring"]
    assert masked["password"] == "*****"
    board = json.loads(mo.cli.ok("env", "show", mo.env, "--json", "--show-secrets"))["dashboards"]["monitoring"]
    base = board["url"].split("/consoles/")[0]
    for path in ("/", "/consoles/env.html", "/api/v1/query?query=up", "/alerts"):
        assert requests.get(base + path, timeout=10).status_code == 401, path
        assert requests.get(base + path, auth=(board["user"], "wrong"), timeout=10).status_code == 401, path
    page = requests.get(board["url"], auth=(board["user"], board["password"]), timeout=10)
    assert page.status_code == 200 and mo.env in page.text
    assert "cannot be redeployed" in mo.cli("redeploy", mo.env, "monitoring").stderr


def test_the_node_exporter_goes_with_the_last_monitoring_service(monitored: Monitored) -> None:
    """Last of this module: its environment, the only one of this platform with monitoring, is
    removed; the host's node exporter is stopped and removed at a heartbeat after."""
    mo = monitored

    def exporters() -> list[str]:
        return [c.name for c in mo.docker.containers.list(all=True, filters={"name": f"orch-nodeexp-{mo.host}-"})]

    assert exporters()  # it runs while some environment has monitoring
    mo.cli.ok("env", "rm", mo.env, "--wait")
    wait_for("the node exporter gone", exporters, 30, every=0.5, until=lambda names: not names)

