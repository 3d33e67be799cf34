"""The monitoring image (orch/monitoring:1) for real, on a configuration directory rendered by
``orchestrator.monitoring``: its basic auth on every page and API, probes of every check kind
against real servers (busybox httpd, Redis, memcached, PostgreSQL, MariaDB, a TLS site behind
HAProxy), the jobs endpoint's gauges, JobDown firing when a job stops, a target added to a
targets file probed with no reload, and the console page. Ports 31850-31899 only; every
container is named montest-* and removed with its volumes."""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest
import requests
import trustme
from cryptography import x509

from orchestrator.monitoring import (
    BLACKBOX_FILE,
    Check,
    Scrape,
    blackbox_config,
    monitoring_files,
    site_module,
    targets,
)
from tests.harness import wait_for

pytestmark = pytest.mark.e2e

IMAGE = "orch/monitoring:1"
ENV = "montest"
USER, PASSWORD = "monitor", "s3cret-montest"
PROM, BLACKBOX = 31850, 31851
HTTPD, HTTPD_NEW, REDIS, MEMCACHED, POSTGRES, MARIADB = 31852, 31853, 31854, 31855, 31856, 31857
SITE_HTTP, SITE_TLS, JOBS_ENDPOINT, NODE_GONE = 31858, 31859, 31860, 31861
LABEL = "orchestrator.montest"  # every container of this module, for the cleanup
FIRST_PROBE = 30  # seconds from the start to probe_success 1 (the brief: ~30 s)
JOB_DOWN = 60  # seconds from a job's stop to JobDown firing (for: 15 s)

CHECKS = [
    Check("web", "j-web-1", "http", "127.0.0.1", HTTPD, "/index.html", host="h1"),
    Check("cache", "j-cache-1", "redis", "127.0.0.1", REDIS),
    Check("memo", "j-memo-1", "memcached", "127.0.0.1", MEMCACHED),
    Check("db", "j-db-1", "postgresql", "127.0.0.1", POSTGRES),
    Check("mydb", "j-mydb-1", "mysql", "127.0.0.1", MARIADB),
    Check("web", "", "site", "127.0.0.1", SITE_HTTP, "/", site="secure.localhost", https=True, https_port=SITE_TLS),
]
NEW_CHECK = Check("web", "j-web-2", "http", "127.0.0.1", HTTPD_NEW, "/index.html")
NEW_SITE = Check("web", "", "site", "127.0.0.1", SITE_HTTP, "/", site="plain.localhost")
SCRAPES = [Scrape("jobs", "h1", "127.0.0.1", JOBS_ENDPOINT), Scrape("node", "h-gone", "127.0.0.1", NODE_GONE)]
JOBS_METRICS = f"""\
orchestrator_service_wanted_jobs{{env="{ENV}",service="web"}} 2
orchestrator_service_running_jobs{{env="{ENV}",service="web"}} 1
orchestrator_service_wanted_jobs{{env="other",service="web"}} 5
orchestrator_service_running_jobs{{env="other",service="web"}} 0
orchestrator_host_up{{host="h1"}} 1
orchestrator_job_memory_bytes{{env="{ENV}",service="web",job="j-web-1",host="h1"}} 1048576
"""
HAPROXY_CFG = f"""\
defaults
  mode http
  timeout connect 2s
  timeout client 5s
  timeout server 5s
frontend tls
  bind 127.0.0.1:{SITE_TLS} ssl crt /run/orch-proxy/site.pem
  http-request return status 200 content-type text/plain string ok
"""


@dataclass
class Monitoring:
    docker: docker.DockerClient
    config: Path
    started: float = 0.0
    cert_expiry: float = 0.0
    figures: dict[str, float] = field(default_factory=dict)

    def get(self, path: str, auth: tuple[str, str] | None = (USER, PASSWORD), **params: str) -> requests.Response:
        return requests.get(f"http://127.0.0.1:{PROM}{path}", params=params, auth=auth, timeout=10)

    def query(self, promql: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=promql)
        answer.raise_for_status()
        result: list[dict[str, Any]] = answer.json()["data"]["result"]
        return result

    def value(self, promql: str) -> float | None:
        found = self.query(promql)
        return float(found[0]["value"][1]) if found else None

    def alerts(self, name: str, state: str = "firing") -> list[dict[str, Any]]:
        answer = self.get("/api/v1/alerts")
        answer.raise_for_status()
        return [a for a in answer.json()["data"]["alerts"] if a["labels"]["alertname"] == name and a["state"] == state]

    def config_time(self) -> str:
        return str(self.get("/api/v1/status/runtimeinfo").json()["data"]["lastConfigTime"])

    def stop(self, name: str) -> None:
        container = self.docker.containers.get(name)
        if container.status == "running":
            container.stop(timeout=1)

    def write_targets(self, checks: list[Check]) -> None:
        for name, text in targets(checks, SCRAPES, ENV).items():
            path = self.config / "targets" / name
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text(text)
            tmp.chmod(0o644)
            tmp.replace(path)  # atomically, as the node must


def start(client: docker.DockerClient, name: str, image: str, command: list[str] | None = None,
          **kwargs: Any) -> Any:
    return client.containers.run(image, command, name=name, detach=True, network_mode="host",
                                 labels={LABEL: "1"}, **kwargs)


def remove_ours(client: docker.DockerClient) -> None:
    for found in client.api.containers(all=True, filters={"label": LABEL}):
        with suppress(docker.errors.NotFound):
            client.api.remove_container(found["Id"], force=True, v=True)
    with suppress(docker.errors.NotFound):
        client.volumes.get("montest-prom-data").remove(force=True)


class JobsEndpoint(http.server.BaseHTTPRequestHandler):
    """A stand-in for a node's metrics endpoint (the ``jobs`` scrape)."""

    def do_GET(self) -> None:
        body = JOBS_METRICS.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def monitoring(docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitoring]:
    remove_ours(docker_client)
    docker_client.images.get(IMAGE)  # missing: run scripts/build-images
    config = tmp_path_factory.mktemp("monitoring")
    os.chmod(config, 0o755)
    (config / "targets").mkdir(mode=0o755)
    for name, text in monitoring_files(ENV, CHECKS, SCRAPES, BLACKBOX).items():
        (config / name).write_text(text)
    proxy_dir = tmp_path_factory.mktemp("proxy")
    ca = trustme.CA()
    cert = ca.issue_cert("secure.localhost")
    pem = cert.private_key_and_cert_chain_pem.bytes()
    (proxy_dir / "site.pem").write_bytes(pem)
    (proxy_dir / "haproxy.cfg").write_text(HAPROXY_CFG)
    chain = x509.load_pem_x509_certificates(pem)
    expiry = min(c.not_valid_after_utc.timestamp() for c in chain)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", JOBS_ENDPOINT), JobsEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    web = "echo ok > /tmp/index.html && exec httpd -f -p {} -h /tmp"
    try:
        start(docker_client, "montest-httpd", "orch/busybox:1", ["sh", "-c", web.format(HTTPD)])
        start(docker_client, "montest-httpd-new", "orch/busybox:1", ["sh", "-c", web.format(HTTPD_NEW)])
        start(docker_client, "montest-site", "orch/busybox:1", ["sh", "-c", web.format(SITE_HTTP)])
        start(docker_client, "montest-redis", "orch/redis:7", ["--port", str(REDIS)])
        start(docker_client, "montest-memcached", "orch/memcached:1", ["-p", str(MEMCACHED)])
        start(docker_client, "montest-postgres", "orch/postgres:15", ["-p", str(POSTGRES)],
              environment={"POSTGRES_PASSWORD": "pw"})
        start(docker_client, "montest-mariadb", "orch/mariadb:10", [f"--port={MARIADB}"],
              environment={"MYSQL_ROOT_PASSWORD": "pw"})
        start(docker_client, "montest-proxy", "orch/haproxy:2.6", volumes={str(proxy_dir): {
            "bind": "/run/orch-proxy", "mode": "rw"}})
        found = Monitoring(docker_client, config, cert_expiry=expiry)
        found.started = time.monotonic()
        start(docker_client, "montest-prom", IMAGE, volumes={
            str(config): {"bind": "/etc/orch-monitoring", "mode": "ro"},
            "montest-prom-data": {"bind": "/var/lib/orch-monitoring", "mode": "rw"},
        }, environment={"PORT": str(PROM), "BLACKBOX_PORT": str(BLACKBOX), "MONITOR_USER": USER,
                        "MONITOR_PASSWORD": PASSWORD, "ORCH_ENV": ENV})
        wait_for("Prometheus answers", lambda: found.get("/-/ready").status_code, 30, every=0.2,
                 until=lambda code: code == 200)
        yield found
        print("monitoring figures:", json.dumps(found.figures))
    finally:
        server.shutdown()
        remove_ours(docker_client)


def test_it_refuses_to_start_without_credentials(docker_client: docker.DockerClient) -> None:
    container = start(docker_client, "montest-nocreds", IMAGE, environment={
        "PORT": "31862", "BLACKBOX_PORT": "31863", "MONITOR_USER": USER})
    try:
        assert container.wait(timeout=30)["StatusCode"] != 0
        assert b"MONITOR_USER and MONITOR_PASSWORD must be set" in container.logs()
    finally:
        container.remove(force=True, v=True)


def test_it_runs_on_the_private_web_config_and_the_platforms_files(monitoring: Monitoring) -> None:
    flags = monitoring.get("/api/v1/status/flags").json()["data"]
    assert flags["config.file"] == "/etc/orch-monitoring/prometheus.yml"
    assert flags["web.config.file"] == "/run/orch-monitoring/web.yml"
    assert flags["storage.tsdb.path"] == "/var/lib/orch-monitoring"
    assert flags["storage.tsdb.retention.time"] == "15d"
    assert flags["web.listen-address"] == f"0.0.0.0:{PROM}"
    code, out = monitoring.docker.containers.get("montest-prom").exec_run(
        ["sh", "-c", "stat -c '%a %U' /run/orch-monitoring/web.yml; grep -cF '$2y$10$' /run/orch-monitoring/web.yml"])
    assert isinstance(out, bytes)
    assert code == 0 and out.decode().split() == ["600", "root", "1"], out
    assert PASSWORD.encode() not in out


def test_the_job_exits_when_one_of_its_processes_dies(monitoring: Monitoring) -> None:
    """A second job on the same files: the blackbox exporter or Prometheus killed, the job exits
    (non-zero); a docker stop ends it cleanly (0). Each at once."""
    for victim in ("prometheus-blac", "prometheus", None):
        container = start(monitoring.docker, "montest-prom-exit", IMAGE, volumes={
            str(monitoring.config): {"bind": "/etc/orch-monitoring", "mode": "ro"}},
            environment={"PORT": "31864", "BLACKBOX_PORT": "31865", "MONITOR_USER": USER,
                         "MONITOR_PASSWORD": PASSWORD})
        try:
            wait_for("the second job answers", lambda: requests.get("http://127.0.0.1:31864/-/ready", timeout=5,
                                                                    auth=(USER, PASSWORD)).status_code,
                     30, every=0.2, until=lambda code: code == 200)
            began = time.monotonic()
            if victim:
                kill = f'for p in /proc/[0-9]*; do [ "$(cat $p/comm)" = {victim} ] && kill ${{p#/proc/}}; done; :'
                assert container.exec_run(["sh", "-c", kill]).exit_code == 0
            else:
                container.stop(timeout=10)
            status = container.wait(timeout=15)["StatusCode"]
            assert (status != 0) if victim else (status == 0), (status, container.logs())
            assert time.monotonic() - began < 5
        finally:
            container.remove(force=True, v=True)


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/"), ("GET", "/graph"), ("GET", "/api/v1/query?query=up"), ("GET", "/api/v1/targets"),
    ("GET", "/metrics"), ("GET", "/consoles/env.html"), ("GET", "/-/healthy"), ("POST", "/-/reload"),
])
def test_every_page_and_api_needs_the_basic_auth(monitoring: Monitoring, method: str, path: str) -> None:
    url = f"http://127.0.0.1:{PROM}{path}"
    assert requests.request(method, url, timeout=10).status_code == 401
    assert requests.request(method, url, auth=(USER, "wrong"), timeout=10).status_code == 401
    assert requests.request(method, url, auth=("other", PASSWORD), timeout=10).status_code == 401
    assert requests.request(method, url, auth=(USER, PASSWORD), timeout=10).status_code == 200


def test_checks_of_every_kind_succeed(monitoring: Monitoring) -> None:
    for kind in ("http", "redis"):
        wait_for(f"the {kind} check succeeds", lambda k=kind: monitoring.value(f'probe_success{{check="{k}"}}'),
                 FIRST_PROBE, every=0.5, until=lambda v: v == 1)
        monitoring.figures[f"first {kind} probe_success 1 (s after start)"] = round(
            time.monotonic() - monitoring.started, 1)
    for kind in ("memcached", "postgresql", "mysql", "site", "site_tls"):  # the databases start slower
        wait_for(f"the {kind} check succeeds", lambda k=kind: monitoring.value(f'probe_success{{check="{k}"}}'),
                 60, every=0.5, until=lambda v: v == 1)
    [http] = monitoring.query('probe_success{check="http"}')
    assert http["metric"] == {"__name__": "probe_success", "env": ENV, "service": "web", "job": "j-web-1",
                              "check": "http", "host": "h1", "module": "http_2xx",
                              "instance": f"http://127.0.0.1:{HTTPD}/index.html"}
    [site] = monitoring.query('probe_success{check="site_tls"}')
    assert "job" not in site["metric"]  # no job behind a site
    assert site["metric"]["site"] == "secure.localhost"
    expiry = monitoring.value('probe_ssl_earliest_cert_expiry{check="site_tls"}')
    assert expiry == pytest.approx(monitoring.cert_expiry, abs=1)
    # A probe of a server of another kind fails: the modules check the protocol, not just the port.
    answer = requests.get(f"http://127.0.0.1:{BLACKBOX}/probe", params={
        "module": "redis", "target": f"127.0.0.1:{MEMCACHED}"}, headers={"X-Prometheus-Scrape-Timeout-Seconds": "3"},
        timeout=10)
    assert "probe_success 0" in answer.text


def test_the_jobs_endpoint_is_scraped_for_this_environment_only(monitoring: Monitoring) -> None:
    wait_for("the jobs endpoint is scraped", lambda: monitoring.value('up{job="jobs"}'), 30, every=0.5,
             until=lambda v: v == 1)
    [wanted] = monitoring.query("orchestrator_service_wanted_jobs")
    assert wanted["metric"] == {"__name__": "orchestrator_service_wanted_jobs", "env": ENV, "service": "web",
                                "host": "h1", "instance": f"127.0.0.1:{JOBS_ENDPOINT}"}
    [memory] = monitoring.query("orchestrator_job_memory_bytes")
    assert memory["metric"]["job"] == "j-web-1"
    assert monitoring.query('orchestrator_host_up{host="h1"}')[0]["metric"]["env"] == ENV
    assert monitoring.value('up{job="node",host="h-gone"}') == 0


def test_a_stopped_job_fires_job_down(monitoring: Monitoring) -> None:
    wait_for("the http check succeeds", lambda: monitoring.value('probe_success{job="j-web-1"}'), FIRST_PROBE,
             every=0.5, until=lambda v: v == 1)
    stopped = time.monotonic()
    monitoring.stop("montest-httpd")
    firing = wait_for("JobDown fires", lambda: monitoring.alerts("JobDown"), JOB_DOWN, every=0.5,
                      until=lambda found: any(a["labels"].get("job") == "j-web-1" for a in found))
    [alert] = [a for a in firing if a["labels"].get("job") == "j-web-1"]
    monitoring.figures["JobDown firing (s after the stop)"] = round(time.monotonic() - stopped, 1)
    assert alert["labels"]["service"] == "web"
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["summary"] == "web job j-web-1 is down"
    assert not [a for a in monitoring.alerts("JobDown") if a["labels"].get("job") == "j-cache-1"]


def test_the_jobs_endpoint_gauges_and_a_silent_node_fire_their_alerts(monitoring: Monitoring) -> None:
    [below] = wait_for("ServiceBelowScale fires", lambda: monitoring.alerts("ServiceBelowScale"), 60, every=0.5)
    assert below["labels"] == {"alertname": "ServiceBelowScale", "env": ENV, "service": "web",
                               "severity": "warning"}  # not the other environment's
    [host] = wait_for("HostDown fires", lambda: monitoring.alerts("HostDown"), 60, every=0.5)
    assert host["labels"]["host"] == "h-gone"


def test_a_target_added_to_a_targets_file_is_probed_without_reload(monitoring: Monitoring) -> None:
    before = monitoring.config_time()
    written = time.monotonic()
    monitoring.write_targets([*CHECKS, NEW_CHECK])
    wait_for("the new target is probed", lambda: monitoring.value('probe_success{job="j-web-2"}'), 30, every=0.5,
             until=lambda v: v == 1)
    monitoring.figures["new target probed (s after the write)"] = round(time.monotonic() - written, 1)
    assert monitoring.config_time() == before  # no reload


def test_a_new_site_needs_the_blackbox_reload_first_then_its_targets(monitoring: Monitoring) -> None:
    before = monitoring.config_time()
    checks = [*CHECKS, NEW_CHECK, NEW_SITE]
    path = monitoring.config / BLACKBOX_FILE
    tmp = path.with_name(".blackbox.yml.tmp")
    tmp.write_text(blackbox_config(checks))
    tmp.chmod(0o644)
    tmp.replace(path)
    assert requests.post(f"http://127.0.0.1:{BLACKBOX}/-/reload", timeout=10).status_code == 200
    assert site_module("plain.localhost") in requests.get(f"http://127.0.0.1:{BLACKBOX}/config", timeout=10).text
    monitoring.write_targets(checks)
    wait_for("the new site is probed", lambda: monitoring.value('probe_success{site="plain.localhost"}'), 30,
             every=0.5, until=lambda v: v == 1)
    assert monitoring.config_time() == before  # Prometheus was not reloaded


def test_the_console_page_shows_the_checks_and_the_firing_alerts(monitoring: Monitoring) -> None:
    monitoring.stop("montest-httpd")  # as test_a_stopped_job_fires_job_down does
    for alert in ("JobDown", "ServiceBelowScale"):
        wait_for(f"{alert} fires", lambda a=alert: monitoring.alerts(a), 60, every=0.5)
    page = monitoring.get("/consoles/env.html")
    assert page.status_code == 200, page.text
    text = page.text
    assert f"Environment {ENV}" in text
    checks, alerts = text.split('<table id="checks">')[1].split('<table id="alerts">')
    rows = {row.split("</tr>")[0] for row in checks.split("<tr>")[2:]}
    web = [row for row in rows if "j-web-1" in row]
    assert len(web) == 1 and 'class="down"' in web[0], rows
    cache = [row for row in rows if "j-cache-1" in row]
    assert len(cache) == 1 and 'class="up"' in cache[0] and "<td>redis</td>" in cache[0], rows
    assert "secure.localhost" in checks
    assert "JobDown" in alerts and "j-web-1" in alerts
    assert "ServiceBelowScale" in alerts
