"""What an environment's monitoring checks, from the catalogue (the targets its node writes):
every running job by its kind, a failed job until it is replaced, sites through the proxy,
and the hosts' metrics endpoints."""

from __future__ import annotations

from sqlalchemy import update
from sqlmodel import col

from orchestrator import catalogue, requests
from orchestrator.models import Job, JobState, ServiceType
from orchestrator.monitoring import Check, Scrape
from tests.unit.world import ENV, World


def checks_of(world: World) -> tuple[list[Check], list[Scrape]]:
    with world.platform.reader() as s:
        return catalogue.monitoring_checks(session=s, env=catalogue.get_env(session=s, name=ENV))


def test_each_running_job_is_checked_by_what_it_is(world: World) -> None:
    world.code_service("web", scale=2)
    requests.add_service(world.platform, env=ENV, name="cache", type=ServiceType.memcached, image=None, command=None,
                         scale=1, size="xs")
    world.run_all()
    checks, _ = checks_of(world)
    by_job = {c.job: c for c in checks}
    for job in world.jobs("web"):
        assert by_job[job.id].kind == "tcp" and by_job[job.id].port == job.port  # no health path: TCP
    [cache] = world.jobs("cache")
    assert by_job[cache.id].kind == "memcached"
    # Jobs started with a health path are checked by it (the path is the job's, as it started).
    with world.platform.session() as s:
        s.exec(update(Job).where(col(Job.service_id) == world.service("web").id).values(health_path="/up"))
        s.commit()
    checks, _ = checks_of(world)
    web = [c for c in checks if c.service == "web"]
    assert {c.job for c in web} == {j.id for j in world.jobs("web")}
    assert {(c.kind, c.path) for c in web} == {("http", "/up")}


def test_a_failed_job_stays_checked_until_it_is_replaced(world: World) -> None:
    world.code_service("web", scale=2)
    victim = world.jobs("web")[0]
    with world.platform.session() as s:
        catalogue.set_job_state(session=s, job_id=victim.id, state=JobState.failed)
        s.commit()
    checks, _ = checks_of(world)
    assert victim.id in {c.job for c in checks}  # still checked: failing, it alerts
    requests.request_scale(world.platform, env=ENV, service="web", scale=1)
    world.run_all()
    checks, _ = checks_of(world)
    assert victim.id not in {c.job for c in checks}  # nothing is missing any more


def test_hosts_with_the_environments_jobs_are_scraped_where_their_nodes_said(world: World) -> None:
    world.code_service("web", scale=2)
    with world.platform.session() as s:
        catalogue.set_metrics_ports(session=s, name="h1", metrics_port=9200, node_exporter_port=9100)
        s.commit()
    _, scrapes = checks_of(world)
    assert sorted(scrapes, key=lambda x: x.job) == [Scrape("jobs", "h1", "10.0.0.1", 9200),
                                                    Scrape("node", "h1", "10.0.0.1", 9100)]
