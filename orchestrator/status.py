"""An environment's health in one answer (``orchestrator status``): each service's running and
wanted jobs from the catalogue, and each check and firing alert from its monitoring's Prometheus
(its HTTP API, with the environment's credentials)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from typing import Any

from sqlalchemy import func
from sqlmodel import col, select

from orchestrator import catalogue
from orchestrator.catalogue.logs import event_time
from orchestrator.catalogue.monitoring import MonitorEndpoint, MonitoringDown
from orchestrator.errors import BadInput
from orchestrator.httpauth import basic_auth
from orchestrator.models import Job, JobKind, JobState, ServiceType
from orchestrator.platform import Platform

TIMEOUT = 5.0


def status(p: Platform, env: str) -> dict[str, Any]:
    """{"services": [{name, type, running, wanted}], "checks": [{service, job, check, state,
    since, detail}], "alerts": [{name, service, job, state, since}], "monitoring": why not, or
    null}. A sandbox (no monitoring) or a monitoring that does not answer: no checks, and why."""
    with p.reader() as s:
        environment = catalogue.get_env(session=s, name=env)
        listed = catalogue.list_services(session=s, env=environment)
        running: Counter[int] = Counter()
        started: dict[str, str] = {}
        query = (select(Job.id, Job.service_id, Job.kind, func.coalesce(Job.started_at, Job.created_at))
                 .where(col(Job.service_id).in_([svc.id for svc in listed]), Job.state == JobState.running))
        for job_id, service_id, kind, since in s.exec(query):  # one query, whatever the jobs
            running[service_id] += kind == JobKind.deploy
            started[job_id] = _time(since)
        services = [{"name": svc.name, "type": str(svc.type), "running": running[svc.id or 0],
                     "wanted": 0 if svc.type == ServiceType.code and svc.release is None else svc.scale}
                    for svc in listed]
        try:
            endpoint: MonitorEndpoint | None = catalogue.monitor_endpoint(session=s, env=environment)
            why = None
        except (BadInput, MonitoringDown) as exc:
            endpoint, why = None, str(exc)
    checks: list[dict[str, Any]] = []
    alerts: list[dict[str, Any]] = []
    if endpoint is not None:
        try:
            checks, alerts = _from_prometheus(endpoint, env, started)
        except MonitoringDown as exc:
            why = str(exc)
    return {"services": services, "checks": checks, "alerts": alerts, "monitoring": why}


def _from_prometheus(endpoint: MonitorEndpoint, env: str,
                     started: dict[str, str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    selector = f'{{env="{env}"}}'
    success = _get(endpoint, "/api/v1/query?" + urllib.parse.urlencode({"query": f"probe_success{selector}"}))
    codes = _get(endpoint, "/api/v1/query?" + urllib.parse.urlencode({"query": f"probe_http_status_code{selector}"}))
    firing = _get(endpoint, "/api/v1/alerts")["alerts"]
    status_of = {(r["metric"].get("job", ""), r["metric"].get("instance", "")): int(float(r["value"][1]))
                 for r in codes["result"]}
    down_since = {a["labels"].get("job") or a["labels"].get("site", ""): a.get("activeAt") for a in firing
                  if a["labels"].get("alertname") in ("JobDown", "SiteServerErrors")}
    checks = []
    for r in sorted(success["result"], key=lambda r: (r["metric"].get("service", ""), r["metric"].get("job", ""),
                                                       r["metric"].get("check", ""))):
        labels, ok = r["metric"], r["value"][1] == "1"
        job = labels.get("job", "")
        code = status_of.get((job, labels.get("instance", "")))
        detail = (f"HTTP {code}" if code else "no answer") if not ok else (f"HTTP {code}" if code else "answers")
        checks.append({"service": labels.get("service", ""), "job": job or None,
                       "check": labels.get("check", ""), "target": labels.get("site") or labels.get("instance", ""),
                       "state": "passing" if ok else "failing",
                       "since": started.get(job) if ok else down_since.get(job or labels.get("site", "")),
                       "detail": detail})
    alerts = [{"name": a["labels"].get("alertname", ""), "service": a["labels"].get("service"),
               "job": a["labels"].get("job") or None, "state": a.get("state", ""), "since": a.get("activeAt")}
              for a in firing if a["labels"].get("env", env) == env]
    alerts.sort(key=lambda a: (a["state"] != "firing", a["name"], a["service"] or "", a["job"] or ""))
    return checks, alerts


def _get(endpoint: MonitorEndpoint, path: str) -> Any:
    request = urllib.request.Request(endpoint.url.rstrip("/") + path)
    request.add_header("Authorization", basic_auth(endpoint.user, endpoint.password))
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            body = json.loads(response.read())
    except (OSError, ValueError) as exc:
        raise MonitoringDown(f"the monitoring service {endpoint.service} of environment {endpoint.env} does not "
                             f"answer at {endpoint.address}:{endpoint.port}: {exc}") from None
    return body["data"]


def _time(value: Any) -> str:
    return event_time(value) if value is not None else ""
