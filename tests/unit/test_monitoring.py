"""The monitoring service's pure parts (``orchestrator.monitoring``): the targets each check
becomes, the blackbox modules, Prometheus' configuration, checked by Prometheus' own
``promtool`` (``check config``), and the alert rules, run by ``promtool test rules`` against
tests/unit/monitoring_rules_test.yml."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from orchestrator import monitoring
from orchestrator.monitoring import (
    ALERTS,
    KIND_MODULES,
    RULES,
    TARGET_FILES,
    Check,
    Scrape,
    blackbox_config,
    monitoring_files,
    prometheus_config,
    site_module,
    targets,
)

ENV = "shop"
RULES_TEST = Path(__file__).with_name("monitoring_rules_test.yml")

CHECKS = [
    Check("web", "a1b2c3d4e5f6", "http", "127.0.0.1", 31001, "/health", host="h1"),
    Check("tcpsvc", "b1", "tcp", "127.0.0.1", 31002),
    Check("db", "c1", "postgresql", "127.0.0.1", 31003, host="h2"),
    Check("mydb", "d1", "mysql", "127.0.0.1", 31004),
    Check("cache", "e1", "redis", "127.0.0.1", 31005),
    Check("memo", "f1", "memcached", "127.0.0.1", 31006),
    Check("web", "", "site", "127.0.0.1", 30000, "/", site="shop.example.com", https=True, https_port=30443),
    Check("api", "", "site", "127.0.0.1", 30000, "/", site="api.localhost"),
]
SCRAPES = [Scrape("node", "h1", "127.0.0.1", 9100), Scrape("jobs", "h1", "127.0.0.1", 9200),
           Scrape("node", "h2", "127.0.0.2", 9100)]


def entries(files: dict[str, str], name: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(files[name])
    return found


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: install Debian's prometheus package (scripts/setup does)")
    return path


# --- targets -----------------------------------------------------------------------------------

@pytest.mark.parametrize("check", [c for c in CHECKS if c.kind != "site"], ids=lambda c: c.kind)
def test_each_job_check_lands_in_its_kinds_file_with_its_labels_and_module(check: Check) -> None:
    files = targets(CHECKS, SCRAPES, ENV)
    [entry] = entries(files, f"{check.kind}.json")
    address = f"{check.address}:{check.port}"
    assert entry["targets"] == [f"http://{address}{check.path}" if check.kind == "http" else address]
    assert entry["labels"] == {"env": ENV, "service": check.service, "job": check.job, "check": check.kind,
                               "host": check.host or check.address, "module": KIND_MODULES[check.kind]}
    others = [name for name in TARGET_FILES if name != f"{check.kind}.json"]
    assert not [name for name in others if check.job in files[name]]


def test_a_site_is_probed_through_the_proxy_and_over_tls_when_it_has_a_certificate() -> None:
    files = targets(CHECKS, SCRAPES, ENV)
    site = entries(files, "site.json")
    assert site == [
        {"targets": ["http://127.0.0.1:30000/"],
         "labels": {"env": ENV, "service": "api", "check": "site", "host": "127.0.0.1", "site": "api.localhost",
                    "module": "site_api.localhost"}},
        {"targets": ["http://127.0.0.1:30000/"],
         "labels": {"env": ENV, "service": "web", "check": "site", "host": "127.0.0.1", "site": "shop.example.com",
                    "module": "site_shop.example.com"}},
    ]
    assert entries(files, "site_tls.json") == [
        {"targets": ["https://127.0.0.1:30443/"],
         "labels": {"env": ENV, "service": "web", "check": "site_tls", "host": "127.0.0.1",
                    "site": "shop.example.com", "module": "site_tls_shop.example.com"}},
    ]


def test_scrapes_land_in_their_files_labelled_with_env_and_host() -> None:
    files = targets(CHECKS, SCRAPES, ENV)
    assert entries(files, "scrape-node.json") == [
        {"targets": ["127.0.0.1:9100"], "labels": {"env": ENV, "host": "h1"}},
        {"targets": ["127.0.0.2:9100"], "labels": {"env": ENV, "host": "h2"}},
    ]
    # A node's jobs endpoint is asked for this environment's jobs only (GET /metrics?env=ENV).
    assert entries(files, "scrape-jobs.json") == [
        {"targets": ["127.0.0.1:9200"], "labels": {"env": ENV, "host": "h1", "__param_env": ENV}}]


def test_every_targets_file_is_written_even_when_empty() -> None:
    files = targets([], [], ENV)
    assert sorted(files) == sorted(TARGET_FILES)
    assert set(files.values()) == {"[]\n"}
    assert sorted(TARGET_FILES) == sorted([
        "http.json", "tcp.json", "postgresql.json", "mysql.json", "redis.json", "memcached.json", "site.json",
        "site_tls.json", "scrape-node.json", "scrape-jobs.json"])


def test_the_same_checks_in_any_order_give_the_same_files() -> None:
    shuffled = [*CHECKS, *CHECKS[:3]]  # duplicates collapse too
    random.Random(7).shuffle(shuffled)
    assert monitoring_files(ENV, shuffled, SCRAPES[::-1], 31851) == monitoring_files(ENV, CHECKS, SCRAPES, 31851)
    assert blackbox_config(shuffled) == blackbox_config(CHECKS)


@pytest.mark.parametrize("bad", [
    Check("x", "j", "ftp", "127.0.0.1", 1),
    Check("x", "", "site", "127.0.0.1", 1),
    Check("x", "", "site", "127.0.0.1", 1, site="a.localhost", https=True),
    Check("x", "j", "http", "127.0.0.1", 1, "health"),
])
def test_a_check_that_cannot_be_probed_is_refused(bad: Check) -> None:
    with pytest.raises(ValueError):
        targets([bad], [], ENV)


def test_a_scrape_of_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError):
        targets([], [Scrape("cadvisor", "h1", "127.0.0.1", 1)], ENV)


# --- blackbox ----------------------------------------------------------------------------------

def test_blackbox_has_a_module_per_kind_and_two_per_site() -> None:
    modules = yaml.safe_load(blackbox_config(CHECKS))["modules"]
    assert set(modules) == {*KIND_MODULES.values(), "site_shop.example.com", "site_tls_shop.example.com",
                            "site_api.localhost", "site_tls_api.localhost"}
    assert modules["http_2xx"]["prober"] == "http"
    assert 200 in modules["http_2xx"]["http"]["valid_status_codes"]
    assert 302 in modules["http_2xx"]["http"]["valid_status_codes"]
    assert 404 not in modules["http_2xx"]["http"]["valid_status_codes"]
    assert modules["http_2xx"]["http"]["follow_redirects"] is False
    assert modules["redis"]["tcp"]["query_response"] == [{"send": "PING"}, {"expect": "^(\\+PONG|-NOAUTH)"}]
    assert modules["memcached"]["tcp"]["query_response"] == [{"send": "version"}, {"expect": "^VERSION"}]
    assert modules["mysql"]["tcp"]["query_response"] == [{"send": "\x01\x00\x00\x01"},
                                                         {"expect": monitoring.MYSQL_EXPECT}]
    assert modules["postgresql"]["prober"] == "tcp"
    site = modules["site_shop.example.com"]["http"]
    assert site["headers"] == {"Host": "shop.example.com"}
    assert "tls_config" not in site
    tls = modules["site_tls_shop.example.com"]["http"]
    assert tls["headers"] == {"Host": "shop.example.com"}
    assert tls["tls_config"] == {"server_name": "shop.example.com", "insecure_skip_verify": True}
    assert tls["fail_if_not_ssl"] is True


def test_without_sites_only_the_fixed_modules() -> None:
    assert set(yaml.safe_load(blackbox_config([]))["modules"]) == set(KIND_MODULES.values())


@given(st.text(min_size=1, max_size=300))
def test_site_module_names_are_safe_for_any_name(site: str) -> None:
    for tls in (False, True):
        name = site_module(site, tls)
        assert re.fullmatch(r"site(_tls)?_[a-z0-9.-]+", name), name
        assert len(name) < 100


def test_site_module_names_keep_dns_names_and_tell_others_apart() -> None:
    assert site_module("shop.example.com") == "site_shop.example.com"
    assert site_module("shop.example.com", tls=True) == "site_tls_shop.example.com"
    assert site_module("A.example") != site_module("a.example")
    assert site_module("a_b.example") != site_module("a-b.example")
    assert site_module("a_b.example") == site_module("a_b.example")


# --- Prometheus --------------------------------------------------------------------------------

def test_prometheus_probes_each_targets_file_through_the_local_blackbox_exporter() -> None:
    config = yaml.safe_load(prometheus_config(ENV, 31851))
    assert config["global"] == {"scrape_interval": "5s", "scrape_timeout": "4s", "evaluation_interval": "5s",
                                "external_labels": {"env": ENV}}
    assert config["rule_files"] == ["/etc/orch-monitoring/rules.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    read = {job["file_sd_configs"][0]["files"][0] for job in jobs.values() if "file_sd_configs" in job}
    assert read == {f"/etc/orch-monitoring/targets/{name}" for name in TARGET_FILES}
    for name in ("probe_http", "probe_redis", "probe_site", "probe_site_tls"):
        job = jobs[name]
        assert job["metrics_path"] == "/probe"
        assert job["file_sd_configs"][0]["refresh_interval"] == "5s"
        relabel = job["relabel_configs"]
        assert {"source_labels": ["__address__"], "target_label": "__param_target"} in relabel
        assert {"source_labels": ["module"], "target_label": "__param_module"} in relabel
        assert {"target_label": "__address__", "replacement": "127.0.0.1:31851"} in relabel
    assert {"target_label": "job", "replacement": ""} in jobs["probe_site"]["relabel_configs"]
    assert {"target_label": "job", "replacement": ""} not in jobs["probe_http"]["relabel_configs"]
    assert "relabel_configs" not in jobs["node"]
    assert jobs["jobs"]["honor_labels"] is True
    assert {"source_labels": ["env"], "regex": "shop", "action": "keep"} in jobs["jobs"]["metric_relabel_configs"]
    assert jobs["blackbox"]["static_configs"] == [{"targets": ["127.0.0.1:31851"], "labels": {"env": ENV}}]


def test_the_interval_is_the_scrape_and_the_evaluation_interval() -> None:
    config = yaml.safe_load(prometheus_config(ENV, 31851, 2.5, config_dir="/x"))
    assert config["global"]["scrape_interval"] == "2500ms"
    assert config["global"]["scrape_timeout"] == "2s"
    assert config["global"]["evaluation_interval"] == "2500ms"
    assert config["rule_files"] == ["/x/rules.yml"]
    with pytest.raises(ValueError):
        prometheus_config(ENV, 31851, 0.5)


def test_strings_stay_strings_in_the_yaml() -> None:
    text = monitoring._yaml({"on": "yes", "n": ["1", "null", "", "a: b", "# c", "'\"\\\n"], "x": {}, "y": [],
                             "z": [{"a": 1, "b": [True, False]}, [1, 2]]})
    assert yaml.safe_load(text) == {"on": "yes", "n": ["1", "null", "", "a: b", "# c", "'\"\\\n"], "x": {}, "y": [],
                                    "z": [{"a": 1, "b": [True, False]}, [1, 2]]}


def write_dir(base: Path, env: str = ENV) -> Path:
    files = monitoring_files(env, CHECKS, SCRAPES, 31851)
    files[monitoring.PROMETHEUS_FILE] = prometheus_config(env, 31851, config_dir=str(base))
    for name, text in files.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text(text)
    return base / monitoring.PROMETHEUS_FILE


def test_promtool_accepts_the_rendered_configuration_and_rules(tmp_path: Path) -> None:
    config = write_dir(tmp_path)
    done = subprocess.run([promtool(), "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {config} is valid prometheus config file syntax" in done.stdout + done.stderr
    assert "SUCCESS: 7 rules found" in done.stdout + done.stderr


def test_promtool_refuses_a_broken_configuration(tmp_path: Path) -> None:
    """The check above can fail: a configuration whose rules do not parse."""
    write_dir(tmp_path)
    (tmp_path / monitoring.RULES_FILE).write_text(RULES.replace("== 0", "=== 0", 1))
    done = subprocess.run([promtool(), "check", "config", str(tmp_path / monitoring.PROMETHEUS_FILE)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, done.stdout


# --- the rules ---------------------------------------------------------------------------------

def run_rules_test(tmp_path: Path, rules: str) -> subprocess.CompletedProcess[str]:
    shutil.copy(RULES_TEST, tmp_path / "test.yml")
    (tmp_path / "rules.yml").write_text(rules)
    return subprocess.run([promtool(), "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)


def test_the_alerts_fire_when_they_should_and_only_then(tmp_path: Path) -> None:
    done = run_rules_test(tmp_path, RULES)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_rules_test_catches_a_changed_rule(tmp_path: Path) -> None:
    """promtool's verdict can be FAILED: JobDown after 10 s instead of 15 s."""
    done = run_rules_test(tmp_path, RULES.replace('for: "15s"', 'for: "10s"', 1))
    assert done.returncode != 0
    assert "FAILED" in done.stdout + done.stderr


def test_each_alert_is_tested_firing_and_not_firing() -> None:
    cases = yaml.safe_load(RULES_TEST.read_text())["tests"]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in cases:
        for test in case.get("alert_rule_test", []):
            (firing if test["exp_alerts"] else silent).add(test["alertname"])
    assert firing == set(ALERTS)
    assert silent == set(ALERTS)


def test_the_rules_name_the_metrics_the_jobs_endpoint_serves() -> None:
    rules = yaml.safe_load(RULES)
    exprs = " ".join(rule["expr"] for group in rules["groups"] for rule in group["rules"])
    for metric in ("orchestrator_service_running_jobs", "orchestrator_service_wanted_jobs", "orchestrator_host_up",
                   "probe_success", "probe_http_status_code", "probe_ssl_earliest_cert_expiry"):
        assert metric in exprs
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule}
    assert sorted(alerts) == sorted(ALERTS)
    for rule in alerts.values():
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    for metric in ("orchestrator_job_cpu_seconds_total", "orchestrator_job_memory_bytes",
                   "orchestrator_job_restarts_total", "orchestrator_service_wanted_jobs",
                   "orchestrator_service_running_jobs", "orchestrator_host_up"):
        assert metric in (monitoring.__doc__ or "")
