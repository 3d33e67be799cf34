"""PURE: what an environment's monitoring job (Prometheus + blackbox exporter, image
``orch/monitoring:1``) probes and alerts on, and the files that say it.

The node writes these files into the directory it bind-mounts at ``/etc/orch-monitoring``:

``prometheus.yml``  static per environment (``prometheus_config``): the probe jobs read their
                    targets from ``targets/<kind>.json`` (file_sd) and go through the local
                    blackbox exporter; jobs ``node`` and ``jobs`` scrape hosts directly.
``rules.yml``       the alert rules (``rules_config``), the same for every environment.
``blackbox.yml``    the blackbox modules (``blackbox_config``): fixed ones plus two per site.
``targets/*.json``  what to probe and scrape (``targets``): every file in ``TARGET_FILES``,
                    written even when empty, so Prometheus never reads a missing file.

When each change takes effect: ``targets/*.json`` at once (Prometheus watches them, and re-reads
them every ``FILE_SD_REFRESH`` anyway): no reload. ``prometheus.yml`` or ``rules.yml``: POST
``/-/reload`` on Prometheus' port (with the basic auth). ``blackbox.yml`` (a site added or
removed): POST ``/-/reload`` on ``127.0.0.1:BLACKBOX_PORT``; write it and reload the exporter
*before* the targets that name a new module. Write every file atomically (a temporary file in
the same directory, then rename) and never replace the directory itself: the job sees the
directory it was started with.

Every probe series carries the target's labels: ``env``, ``service``, ``job`` (the job id;
none on site checks), ``check`` (the kind: a ``targets`` file's stem), ``host``, ``module``,
and ``site`` on site checks; ``instance`` is the probed address or URL.

The ``jobs`` scrape target (a node's metrics endpoint, plain HTTP) must serve:

- ``orchestrator_job_cpu_seconds_total`` (counter), ``orchestrator_job_memory_bytes`` (gauge),
  ``orchestrator_job_restarts_total`` (counter): labels ``env``, ``service``, ``job``, ``host``;
- ``orchestrator_service_wanted_jobs``, ``orchestrator_service_running_jobs`` (gauges): labels
  ``env``, ``service`` (if several endpoints serve the same service, they must agree: the rule
  takes the max);
- ``orchestrator_host_up`` (gauge, 1 or 0): label ``host``.

The scrape honours those labels and keeps only this environment's series (and those without
``env``, such as ``orchestrator_host_up``), so one endpoint may serve every environment of a host.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

CONFIG_DIR = "/etc/orch-monitoring"  # where the monitoring job sees its directory
PROMETHEUS_FILE = "prometheus.yml"
RULES_FILE = "rules.yml"
BLACKBOX_FILE = "blackbox.yml"
TARGETS_DIR = "targets"
FILE_SD_REFRESH = "5s"  # a fallback: Prometheus also watches the files (inotify)

# Check kind -> the blackbox module that probes it (sites get their own modules, per site).
KIND_MODULES: dict[str, str] = {
    "http": "http_2xx", "tcp": "tcp_connect", "postgresql": "postgresql", "mysql": "mysql",
    "redis": "redis", "memcached": "memcached",
}
CHECK_KINDS = (*KIND_MODULES, "site")
SITE_TLS = "site_tls"  # the check label (and targets file) of a site's HTTPS probe
PROBE_FILES = {kind: f"{kind}.json" for kind in (*KIND_MODULES, "site", SITE_TLS)}
SCRAPE_FILES = {"node": "scrape-node.json", "jobs": "scrape-jobs.json"}
TARGET_FILES = (*PROBE_FILES.values(), *SCRAPE_FILES.values())

# What an HTTP probe accepts: 2xx and 3xx (redirects are answers, not followed).
VALID_HTTP_CODES = (200, 201, 202, 203, 204, 205, 206, 300, 301, 302, 303, 304, 307, 308)
# A MySQL/MariaDB server speaks first, but its handshake holds no newline the exporter could stop
# reading at (it reads lines). A 1-byte client packet (header 01 00 00 01, the exporter appends
# "\n") makes the server answer "Bad handshake" and close at once: the handshake read up to that
# close names the server's auth plugin or MariaDB.
MYSQL_SEND = "\x01\x00\x00\x01"
MYSQL_EXPECT = "mysql_native_password|caching_sha2_password|MariaDB"

_SAFE_NAME = re.compile(r"[a-z0-9][a-z0-9.-]*")


@dataclass(frozen=True)
class Check:
    """One thing probed: a job's port (by kind) or a site through the environment's proxy."""

    service: str
    job: str  # job id ("" for a site check)
    kind: str  # one of CHECK_KINDS
    address: str  # host address, e.g. 127.0.0.1
    port: int
    path: str | None = None  # http: the health path; site: "/"
    site: str | None = None  # site checks: the host name, probed at address:port (the proxy) with Host: site
    https: bool = False  # site served with TLS too: also probe https://address:https_port with SNI=site
    https_port: int | None = None
    host: str = ""  # the host's name for the ``host`` label; the address when empty


@dataclass(frozen=True)
class Scrape:
    """A metrics endpoint to scrape: a host's node exporter or its jobs' metrics."""

    job: str  # "node" | "jobs"
    host: str
    address: str
    port: int


def prometheus_config(env: str, blackbox_port: int, interval_s: float = 5, *, config_dir: str = CONFIG_DIR) -> str:
    """Prometheus' configuration for environment ``env``: the same whatever the environment holds
    (the targets files say that), so it changes only with the blackbox port or the interval."""
    if interval_s < 1:
        raise ValueError(f"interval_s must be at least 1 (second), not {interval_s}")
    interval = round(interval_s * 1000)
    blackbox = f"127.0.0.1:{blackbox_port}"
    jobs: list[object] = []
    for kind, file in PROBE_FILES.items():
        relabel: list[object] = [
            {"source_labels": ["__address__"], "target_label": "__param_target"},
            {"source_labels": ["__param_target"], "target_label": "instance"},
            {"source_labels": ["module"], "target_label": "__param_module"},
            {"target_label": "__address__", "replacement": blackbox},
        ]
        if kind in ("site", SITE_TLS):  # no job behind a site: drop the default (the scrape job's name)
            relabel.append({"target_label": "job", "replacement": ""})
        jobs.append({
            "job_name": f"probe_{kind}",
            "metrics_path": "/probe",
            "file_sd_configs": [_file_sd(config_dir, file)],
            "relabel_configs": relabel,
        })
    jobs.append({"job_name": "node", "file_sd_configs": [_file_sd(config_dir, SCRAPE_FILES["node"])]})
    jobs.append({
        "job_name": "jobs",
        "honor_labels": True,  # the endpoint's env/service/job/host labels are the truth
        "file_sd_configs": [_file_sd(config_dir, SCRAPE_FILES["jobs"])],
        "metric_relabel_configs": [
            {"source_labels": ["env"], "regex": re.escape(env), "action": "keep"},
            # Series without a job label (per service, per host) would get this scrape's name.
            {"source_labels": ["job"], "regex": "jobs", "target_label": "job", "replacement": ""},
        ],
    })
    jobs.append({"job_name": "blackbox", "static_configs": [{"targets": [blackbox], "labels": {"env": env}}]})
    config = {
        "global": {
            "scrape_interval": _duration(interval),
            "scrape_timeout": _duration(interval * 4 // 5),
            "evaluation_interval": _duration(interval),
            "external_labels": {"env": env},
        },
        "rule_files": [f"{config_dir}/{RULES_FILE}"],
        "scrape_configs": jobs,
    }
    return _header("Prometheus, environment " + env) + _yaml(config)


def blackbox_config(checks: Sequence[Check]) -> str:
    """The blackbox exporter's modules: one per check kind, two per site (HTTP and HTTPS)."""
    http: dict[str, object] = {
        "preferred_ip_protocol": "ip4", "follow_redirects": False, "valid_status_codes": list(VALID_HTTP_CODES),
    }
    tcp: dict[str, object] = {"preferred_ip_protocol": "ip4"}
    modules: dict[str, object] = {
        "http_2xx": {"prober": "http", "http": http},
        "tcp_connect": {"prober": "tcp", "tcp": tcp},
        # PostgreSQL's SSLRequest holds a byte above 0x7f, which the exporter's YAML cannot send
        # (it would send its UTF-8 encoding), and the one-byte answer has no newline to stop
        # reading at: a TCP connect (PostgreSQL logs nothing for it).
        "postgresql": {"prober": "tcp", "tcp": tcp},
        "mysql": {"prober": "tcp", "tcp": {**tcp, "query_response": [{"send": MYSQL_SEND}, {"expect": MYSQL_EXPECT}]}},
        # An auth error still proves Redis answers. The exporter ends each send with "\n".
        "redis": {"prober": "tcp", "tcp": {
            **tcp, "query_response": [{"send": "PING"}, {"expect": "^(\\+PONG|-NOAUTH)"}]}},
        "memcached": {"prober": "tcp", "tcp": {**tcp, "query_response": [{"send": "version"}, {"expect": "^VERSION"}]}},
    }
    for site in sorted({_site_of(check) for check in checks if check.kind == "site"}):
        headers = {"Host": site}
        modules[site_module(site)] = {"prober": "http", "http": {**http, "headers": headers}}
        modules[site_module(site, tls=True)] = {"prober": "http", "http": {
            **http, "headers": headers, "fail_if_not_ssl": True,
            # Measure the expiry of whatever the proxy serves, self-signed included.
            "tls_config": {"server_name": site, "insecure_skip_verify": True},
        }}
    return _header("the blackbox exporter") + _yaml({"modules": modules})


def targets(checks: Sequence[Check], scrapes: Sequence[Scrape], env: str) -> dict[str, str]:
    """Every file of ``targets/`` (name -> file_sd JSON), empty ones included. The same checks in
    any order give the same files."""
    groups: dict[str, set[tuple[str, tuple[tuple[str, str], ...]]]] = {file: set() for file in TARGET_FILES}
    for check in checks:
        for kind, target, labels in _probes(check, env):
            groups[PROBE_FILES[kind]].add((target, tuple(sorted(labels.items()))))
    for scrape in scrapes:
        if scrape.job not in SCRAPE_FILES:
            raise ValueError(f"scrape job {scrape.job!r} is none of {sorted(SCRAPE_FILES)}")
        labels = {"env": env, "host": scrape.host}
        if scrape.job == "jobs":  # a node's endpoint serves one environment's jobs: ?env=ENV
            labels["__param_env"] = env
        groups[SCRAPE_FILES[scrape.job]].add((_address(scrape.address, scrape.port), tuple(sorted(labels.items()))))
    return {
        file: json.dumps([{"targets": [target], "labels": dict(labels)} for target, labels in sorted(entries)],
                         indent=2, sort_keys=True) + "\n"
        for file, entries in groups.items()
    }


def monitoring_files(env: str, checks: Sequence[Check], scrapes: Sequence[Scrape], blackbox_port: int,
                     interval_s: float = 5) -> dict[str, str]:
    """The whole directory: relative path -> text (``targets/`` files included)."""
    files = {
        PROMETHEUS_FILE: prometheus_config(env, blackbox_port, interval_s),
        RULES_FILE: rules_config(),
        BLACKBOX_FILE: blackbox_config(checks),
    }
    files.update({f"{TARGETS_DIR}/{name}": text for name, text in targets(checks, scrapes, env).items()})
    return files


def site_module(site: str, tls: bool = False) -> str:
    """The blackbox module that probes ``site``: ``site_<name>`` or ``site_tls_<name>``. A name
    outside ``[a-z0-9.-]`` (the platform allows none) is made safe and told apart by a hash."""
    name = site
    if not _SAFE_NAME.fullmatch(site):
        digest = hashlib.sha256(site.encode()).hexdigest()[:8]
        name = re.sub(r"[^a-z0-9.-]", "-", site.lower()).strip(".-")[:60] + "-" + digest
    return f"{'site_tls' if tls else 'site'}_{name}"


def _probes(check: Check, env: str) -> list[tuple[str, str, dict[str, str]]]:
    """(targets kind, target, labels) for each probe of one check: one, or two for a TLS site."""
    labels = {"env": env, "service": check.service, "check": check.kind, "host": check.host or check.address}
    if check.kind == "site":
        site = _site_of(check)
        path = check.path or "/"
        labels["site"] = site
        found = [("site", f"http://{_address(check.address, check.port)}{path}",
                  {**labels, "module": site_module(site)})]
        if check.https:
            if check.https_port is None:
                raise ValueError(f"site {site} is served with TLS but has no https_port")
            found.append((SITE_TLS, f"https://{_address(check.address, check.https_port)}{path}",
                          {**labels, "check": SITE_TLS, "module": site_module(site, tls=True)}))
        return found
    if check.kind not in KIND_MODULES:
        raise ValueError(f"check kind {check.kind!r} is none of {list(CHECK_KINDS)}")
    if check.job:
        labels["job"] = check.job
    labels["module"] = KIND_MODULES[check.kind]
    target = _address(check.address, check.port)
    if check.kind == "http":
        path = check.path or "/"
        if not path.startswith("/"):
            raise ValueError(f"health path {path!r} does not start with /")
        target = f"http://{target}{path}"
    return [(check.kind, target, labels)]


def _site_of(check: Check) -> str:
    if not check.site:
        raise ValueError(f"site check of {check.service} names no site")
    return check.site


def _address(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _file_sd(config_dir: str, file: str) -> dict[str, object]:
    return {"files": [f"{config_dir}/{TARGETS_DIR}/{file}"], "refresh_interval": FILE_SD_REFRESH}


def _duration(ms: int) -> str:
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


# --- the rules --------------------------------------------------------------------------------

_NOT_SITE = 'check!~"site|site_tls"'
_SITE = 'check=~"site|site_tls"'


def rules_config() -> str:
    """The alert rules (and the recording rules the console page uses); see ``RULES``."""
    since = {
        "record": "orch_check:since",
        # The time a check's state last changed: kept while the state equals the one recorded
        # at the previous evaluation, else (a change, a new check) the probe's time. The group
        # runs in order, so orch_check:state below still holds the previous state here.
        "expr": "(orch_check:since and (probe_success == orch_check:state)) or timestamp(probe_success)",
    }
    state = {"record": "orch_check:state", "expr": "probe_success"}
    alerts = [
        _alert("JobDown", f"probe_success{{{_NOT_SITE}}} == 0", "15s", "critical",
               "{{ $labels.service }} job {{ $labels.job }} is down",
               "The {{ $labels.check }} check of job {{ $labels.job }} of service {{ $labels.service }} "
               "on {{ $labels.host }} ({{ $labels.instance }}) has failed for 15 s."),
        _alert("ServiceBelowScale",
               "max by (env, service) (orchestrator_service_running_jobs)"
               " < max by (env, service) (orchestrator_service_wanted_jobs)", "30s", "warning",
               "{{ $labels.service }} runs fewer jobs than wanted",
               "Service {{ $labels.service }} has run only {{ $value }} of its wanted jobs for 30 s."),
        _alert("SiteServerErrors",
               f"probe_http_status_code{{{_SITE}}} >= 500 or probe_http_status_code{{{_SITE}}} == 0", "15s",
               "critical",
               "site {{ $labels.site }} of {{ $labels.service }} "
               "{{ if eq $value 0.0 }}does not answer{{ else }}answers {{ $value }}{{ end }}",
               "{{ $labels.instance }} with Host {{ $labels.site }} (service {{ $labels.service }}) "
               "{{ if eq $value 0.0 }}has not answered{{ else }}has answered HTTP {{ $value }}{{ end }} for 15 s."),
        _alert("CertificateExpiresSoon", "probe_ssl_earliest_cert_expiry - time() < 14 * 86400", None, "warning",
               "the certificate of {{ $labels.site }} ({{ $labels.service }}) expires in "
               "{{ $value | humanizeDuration }}",
               "The certificate served for {{ $labels.site }} of service {{ $labels.service }} expires in "
               "{{ $value | humanizeDuration }}: upload a new one."),
        _alert("HostDown", 'up{job="node"} == 0 or orchestrator_host_up == 0', "30s", "critical",
               "host {{ $labels.host }} is down",
               "Host {{ $labels.host }} has been down (its node exporter silent or the platform calling it "
               "down) for 30 s: its jobs are unreachable until they are placed elsewhere."),
    ]
    groups = [{"name": "orchestrator-checks", "rules": [since, state]},
              {"name": "orchestrator-alerts", "rules": alerts}]
    return _header("Prometheus' rules (the same for every environment)") + _yaml({"groups": groups})


def _alert(name: str, expr: str, duration: str | None, severity: str, summary: str,
           description: str) -> dict[str, object]:
    rule: dict[str, object] = {"alert": name, "expr": expr}
    if duration:
        rule["for"] = duration
    rule["labels"] = {"severity": severity}
    rule["annotations"] = {"summary": summary, "description": description}
    return rule


# --- YAML, the subset these files need --------------------------------------------------------

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}  # YAML 1.1 would not read these as strings


def _header(what: str) -> str:
    return f"# {what}: written by the platform (orchestrator/monitoring.py); edits are overwritten.\n"


def _yaml(value: object, indent: int = 0) -> str:
    """Block-style YAML; every string double-quoted (a JSON string is a YAML one), so no value
    is ever read as a number, a boolean or null."""
    pad = " " * indent
    if isinstance(value, Mapping) and value:
        lines = []
        for key, item in value.items():
            name = key if _PLAIN_KEY.fullmatch(key) and key.lower() not in _YAML_WORDS else json.dumps(key)
            if _is_block(item):
                lines.append(f"{pad}{name}:\n{_yaml(item, indent + 2)}")
            else:
                lines.append(f"{pad}{name}: {_scalar(item)}\n")
        return "".join(lines)
    if isinstance(value, list) and _is_block(value):
        lines = []
        for item in value:
            if _is_block(item):
                body = _yaml(item, indent + 2)
                lines.append(f"{pad}- {body[indent + 2:]}")
            else:
                lines.append(f"{pad}- {_scalar(item)}\n")
        return "".join(lines)
    return f"{pad}{_scalar(value)}\n"


def _is_block(value: object) -> bool:
    """A non-empty mapping, or a list holding one: lists of scalars go on one line."""
    if isinstance(value, list):
        return any(isinstance(item, Mapping | list) for item in value)
    return isinstance(value, Mapping) and bool(value)


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(item) for item in value) + "]"
    raise TypeError(f"no YAML for {value!r}")


RULES = rules_config()  # rules.yml
ALERTS = ("JobDown", "ServiceBelowScale", "SiteServerErrors", "CertificateExpiresSoon", "HostDown")
