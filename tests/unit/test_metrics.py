"""The platform's metrics, as Prometheus reads them (its own text parser), from a catalogue that
operations really went through."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from orchestrator import requests
from orchestrator.metrics import EnvironmentCollector, PlatformCollector
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
