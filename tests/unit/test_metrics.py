"""The platform's metrics, as Prometheus reads them (its own text parser), from a catalogue that
operations really went through."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from sqlmodel import update

from orchestrator import requests
from orchestrator.metrics import EnvironmentCollector, PlatformCollector
from orchestrator.models import Operation, OpKind, OpState, Step, StepAction, StepState
from tests.unit.world import ENV, World


def scrape(collector: Collector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_the_platform_counts_operations_jobs_and_hosts(world: World) -> None:
    world.code_service("web", scale=2)
    before = scrape(PlatformCollector(world.platform))
    assert before[("orchestrator_operations_total", (("kind", "deploy"), ("outcome", "succeeded")))] == 1
    assert ("orchestrator_operations_total", (("kind", "redeploy"), ("outcome", "succeeded"))) not in before
    requests.request_redeploy(world.platform, env=ENV, service="web")
    world.run_all()
    after = scrape(PlatformCollector(world.platform))
    assert after[("orchestrator_operations_total", (("kind", "redeploy"), ("outcome", "succeeded")))] == 1
    assert after[("orchestrator_operation_duration_seconds_count", (("kind", "redeploy"),))] == 1
    assert after[("orchestrator_step_duration_seconds_count", (("action", "start"),))] == 4
    assert after[("orchestrator_jobs", (("state", "running"),))] == 2
    assert after[("orchestrator_jobs", (("state", "stopped"),))] == 2
    assert after[("orchestrator_hosts", (("state", "up"),))] == 2
    assert after[("orchestrator_operations_queued", ())] == 0


def test_an_environment_sees_its_services_scale_and_the_hosts(world: World) -> None:
    world.code_service("web", scale=2)
    seen = scrape(EnvironmentCollector(world.platform, ENV))
    assert seen[("orchestrator_service_wanted_jobs", (("env", ENV), ("service", "web")))] == 2
    assert seen[("orchestrator_service_running_jobs", (("env", ENV), ("service", "web")))] == 2
    assert seen[("orchestrator_host_up", (("host", "h1"),))] == 1
    world.runtimes["h1"].stop(next(j.container_name for j in world.jobs("web") if j.host == "h1"), timeout=0)
    world.beat("h1")
    seen = scrape(EnvironmentCollector(world.platform, ENV))
    assert seen[("orchestrator_service_running_jobs", (("env", ENV), ("service", "web")))] == 1
    assert not any(name == "orchestrator_service_wanted_jobs" and dict(labels)["env"] != ENV
                   for name, labels in scrape(EnvironmentCollector(world.platform, "other")))


def test_the_durations_are_counted_into_buckets_with_their_sum(world: World) -> None:
    """Durations set by hand, on SQLite: a negative one counts as 0, one on a bucket's bound is
    in that bucket and one a microsecond over it is not; only operations that ended count, and
    only steps with both times. The start is 0.9997 s past a second (times rounded to the
    millisecond would put it in the next second)."""
    world.code_service("web", scale=1)
    service = world.service("web")
    start = datetime(2026, 1, 1, 12, 0, 59, 999_700, tzinfo=UTC)
    with world.platform.session() as s:
        s.exec(update(Operation).values(started_at=None))  # the push's: not counted
        s.exec(update(Step).values(started_at=None))
        for kind, state, seconds in ((OpKind.redeploy, OpState.succeeded, -3.0),
                                     (OpKind.redeploy, OpState.failed, 0.5),
                                     (OpKind.redeploy, OpState.succeeded, 0.500001),
                                     (OpKind.redeploy, OpState.cancelled, 7.25),
                                     (OpKind.redeploy, OpState.succeeded, 700.0),
                                     (OpKind.redeploy, OpState.running, 1.0),  # not ended
                                     (OpKind.scale, OpState.succeeded, 1.0),
                                     (OpKind.scale, OpState.succeeded, None)):  # no end
            op = Operation(kind=kind, env_id=service.env_id, service_id=service.id or 0, state=state,
                           started_at=start,
                           finished_at=None if seconds is None else start + timedelta(seconds=seconds))
            s.add(op)
            s.flush()
        for n, (action, seconds) in enumerate(((StepAction.start, -0.2), (StepAction.start, 0.05),
                                               (StepAction.start, 0.100001), (StepAction.start, 2.0),
                                               (StepAction.start, 301.0), (StepAction.start, None),
                                               (StepAction.stop, 1.0))):
            s.add(Step(op_id=op.id or 0, stage=n, name=f"step {n}", action=action, state=StepState.succeeded,
                       started_at=start,
                       finished_at=None if seconds is None else start + timedelta(seconds=seconds)))
        s.commit()
    seen = scrape(PlatformCollector(world.platform))

    def buckets(name: str, label: tuple[str, str]) -> dict[str, float]:
        return {dict(labels)["le"]: value for (n, labels), value in seen.items()
                if n == f"{name}_bucket" and (label,) == tuple(kv for kv in labels if kv[0] != "le")}

    op, step = "orchestrator_operation_duration_seconds", "orchestrator_step_duration_seconds"
    assert buckets(op, ("kind", "redeploy")) == {
        "0.5": 2, "1.0": 3, "2.0": 3, "5.0": 3, "10.0": 4, "30.0": 4, "60.0": 4, "120.0": 4, "300.0": 4, "600.0": 4,
        "+Inf": 5}
    assert seen[(f"{op}_count", (("kind", "redeploy"),))] == 5
    assert seen[(f"{op}_sum", (("kind", "redeploy"),))] == pytest.approx(708.250001, abs=1e-9)
    assert buckets(op, ("kind", "scale"))["0.5"] == 0 and buckets(op, ("kind", "scale"))["1.0"] == 1
    assert seen[(f"{op}_count", (("kind", "scale"),))] == 1
    assert seen[(f"{op}_sum", (("kind", "scale"),))] == 1.0
    assert not any(n.startswith(op) and dict(labels).get("kind") == "deploy" for n, labels in seen)
    assert buckets(step, ("action", "start")) == {
        "0.05": 2, "0.1": 2, "0.25": 3, "0.5": 3, "1.0": 3, "2.0": 4, "5.0": 4, "10.0": 4, "30.0": 4, "60.0": 4,
        "300.0": 4, "+Inf": 5}
    assert seen[(f"{step}_count", (("action", "start"),))] == 5
    assert seen[(f"{step}_sum", (("action", "start"),))] == pytest.approx(303.150001, abs=1e-9)
    assert buckets(step, ("action", "stop"))["0.5"] == 0 and buckets(step, ("action", "stop"))["1.0"] == 1
    assert seen[(f"{step}_sum", (("action", "stop"),))] == 1.0
    assert {dict(labels)["action"] for n, labels in seen if n == f"{step}_count"} == {"start", "stop"}
