"""The pure planner: (spec, observed jobs, host loads) -> stages of frozen steps. No I/O here."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.models import ServiceType
from orchestrator.names import container_name
from orchestrator.placement import HostLoad
from orchestrator.planner import (
    CheckImage,
    NewJob,
    ObservedJob,
    Plan,
    PlanError,
    PortRange,
    ServiceSpec,
    StartJob,
    StopJob,
    Wait,
    WorkerSpec,
    plan_move,
    plan_recover,
    plan_redeploy,
    plan_scale,
    plan_stop,
)
from orchestrator.service_types import profile
from orchestrator.sizes import NAMED_SIZES

IMAGE = "local/app:v2"
PORTS = PortRange(5000, 5099)


def make_spec(**changes: object) -> ServiceSpec:
    spec = ServiceSpec(
        env="shop", name="web", type="code", image=IMAGE, command="httpd -f -p $PORT",
        size_name="s", size=NAMED_SIZES["s"], scale=2, release=3,
    )
    return replace(spec, **changes)  # type: ignore[arg-type]


def ids(prefix: str = "n") -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"{prefix}{next(counter)}"


def hosts(*names: str, **fields: object) -> list[HostLoad]:
    return [HostLoad(name=n, **fields) for n in names]  # type: ignore[arg-type]


def old_jobs(*placement: str, kind: str = "deploy", target: str | None = None,
             prefix: str = "o") -> list[ObservedJob]:
    """Observed jobs, oldest first, one per host name given."""
    return [ObservedJob(f"{prefix}{i}", kind, target, h) for i, h in enumerate(placement, 1)]


def started(plan: Plan) -> list[NewJob]:
    return [s.job for s in plan.steps if isinstance(s, StartJob)]


def stopped(plan: Plan) -> list[str]:
    return [s.job_id for s in plan.steps if isinstance(s, StopJob)]


def stage_kinds(plan: Plan) -> list[set[type]]:
    return [{type(step) for step in stage} for stage in plan.stages]


def per_host(jobs: Sequence[NewJob]) -> Counter[str]:
    return Counter(j.host for j in jobs)


# --- deploy and redeploy ---------------------------------------------------------------------------


def test_first_deploy_checks_the_image_then_starts() -> None:
    plan = plan_redeploy(make_spec(), [], hosts("h1"), ids(), PORTS)
    assert plan.stages[0] == (CheckImage("h1", IMAGE),)
    assert stage_kinds(plan) == [{CheckImage}, {StartJob}]
    assert len(plan.stages[1]) == 2
    assert stopped(plan) == []


def test_first_deploy_with_overlap_set_does_not_wait() -> None:
    plan = plan_redeploy(make_spec(overlap=30), [], hosts("h1"), ids(), PORTS)
    assert stage_kinds(plan) == [{CheckImage}, {StartJob}]


def test_image_is_checked_once_on_every_host_that_gets_a_job() -> None:
    plan = plan_redeploy(make_spec(scale=4), [], hosts("h2", "h1", "h3"), ids(), PORTS)
    assert plan.stages[0] == (CheckImage("h1", IMAGE), CheckImage("h2", IMAGE), CheckImage("h3", IMAGE))


def test_the_image_is_not_checked_where_a_running_job_runs_it_already() -> None:
    """Docker keeps an image a container uses: a host whose running jobs run it needs no check
    (a redeploy of the same image, one more service of it); the others are checked first."""
    loads = [replace(h, images=frozenset({IMAGE} if h.name == "h1" else {"other:1"})) for h in hosts("h1", "h2")]
    plan = plan_redeploy(make_spec(scale=4), old_jobs("h1", "h2"), loads, ids(), PORTS)
    assert plan.stages[0] == (CheckImage("h2", IMAGE),)
    assert stage_kinds(plan) == [{CheckImage}, {StopJob}, {StartJob}]
    everywhere = [replace(h, images=frozenset({IMAGE})) for h in loads]
    assert stage_kinds(plan_redeploy(make_spec(scale=4), old_jobs("h1", "h2"), everywhere, ids(), PORTS)) == [
        {StopJob}, {StartJob}]


def test_redeploy_without_overlap_checks_then_stops_all_then_starts_all() -> None:
    old = old_jobs("h1", "h1")
    plan = plan_redeploy(make_spec(), old, hosts("h1"), ids(), PORTS)
    assert stage_kinds(plan) == [{CheckImage}, {StopJob}, {StartJob}]
    assert plan.stages[1] == (StopJob("o1", "h1"), StopJob("o2", "h1"))
    assert [j.id for j in started(plan)] == ["n1", "n2"]


def test_redeploy_with_overlap_starts_new_waits_then_stops_old() -> None:
    old = old_jobs("h1", "h1")
    plan = plan_redeploy(make_spec(overlap=10), old, hosts("h1"), ids(), PORTS)
    assert stage_kinds(plan) == [{CheckImage}, {StartJob}, {Wait}, {StopJob}]
    assert plan.stages[2] == (Wait(10),)
    assert set(stopped(plan)) == {"o1", "o2"}
    assert len(started(plan)) == 2


def test_redeploy_replaces_worker_jobs_too() -> None:
    spec = make_spec(scale=1, workers=(WorkerSpec("queue", "celery worker", 2),))
    old = old_jobs("h1") + old_jobs("h1", "h1", kind="worker", target="queue", prefix="w")
    plan = plan_redeploy(spec, old, hosts("h1"), ids(), PORTS)
    assert set(stopped(plan)) == {"o1", "w1", "w2"}
    assert sorted((j.kind, j.target) for j in started(plan)) == [
        ("deploy", None), ("worker", "queue"), ("worker", "queue"),
    ]


def test_redeploy_to_scale_zero_only_stops() -> None:
    plan = plan_redeploy(make_spec(scale=0), old_jobs("h1", "h1"), hosts("h1"), ids(), PORTS)
    assert stage_kinds(plan) == [{StopJob}]


def test_nothing_to_run_and_nothing_running_is_an_empty_plan() -> None:
    assert plan_redeploy(make_spec(scale=0), [], hosts("h1"), ids(), PORTS) == Plan()


def test_new_jobs_carry_the_spec() -> None:
    spec = make_spec(scale=1, size_name="m", size=NAMED_SIZES["m"], release=7, volume="orch-shop-web-data")
    (job,) = started(plan_redeploy(spec, [], hosts("h1"), ids(), PORTS))
    assert (job.kind, job.target, job.host) == ("deploy", None, "h1")
    assert (job.image, job.command, job.release) == (IMAGE, spec.command, 7)
    assert (job.size_name, job.size) == ("m", NAMED_SIZES["m"])
    assert job.container_name == container_name("shop", "web", job.id)
    assert job.volume == "orch-shop-web-data"


def test_the_plan_is_a_pure_function_of_its_inputs() -> None:
    args = (make_spec(scale=3, overlap=5), old_jobs("h1", "h2"), hosts("h1", "h2"))
    assert plan_redeploy(*args, ids(), PORTS) == plan_redeploy(*args, ids(), PORTS)


# --- worker jobs -----------------------------------------------------------------------------------


def test_worker_targets_get_worker_jobs_without_a_port() -> None:
    spec = make_spec(scale=1, workers=(WorkerSpec("mail", "run-mailer", 2), WorkerSpec("cron", "run-cron", 1)))
    jobs = started(plan_redeploy(spec, [], hosts("h1"), ids(), PORTS))
    workers = [j for j in jobs if j.kind == "worker"]
    assert sorted((j.target, j.command) for j in workers) == [
        ("cron", "run-cron"), ("mail", "run-mailer"), ("mail", "run-mailer"),
    ]
    for job in workers:
        env = dict(job.environment)
        assert job.port is None and "PORT" not in env
        assert env["ORCH_KIND"] == "worker" and env["ORCH_TARGET"] == job.target
        assert job.volume is None
    (deploy,) = [j for j in jobs if j.kind == "deploy"]
    assert deploy.port is not None and deploy.target is None


def test_a_portless_type_gets_no_port() -> None:
    assert not profile(ServiceType.service_proxy).has_port  # what service_spec gives the planner
    jobs = started(plan_redeploy(make_spec(type="service_proxy", has_port=False), [], hosts("h1"), ids(), PORTS))
    assert [j.port for j in jobs] == [None, None]
    assert all("PORT" not in dict(j.environment) for j in jobs)


def test_logging_serves_its_dashboard_on_a_port() -> None:
    jobs = started(plan_redeploy(make_spec(type="logging"), [], hosts("h1"), ids(), PORTS))
    assert all(j.port is not None and dict(j.environment)["PORT"] == str(j.port) for j in jobs)


# --- ports -----------------------------------------------------------------------------------------


def test_deploy_jobs_get_distinct_ports_in_range_avoiding_used_ones() -> None:
    used = frozenset({5000, 5002, 5004})
    ports = PortRange(5000, 5009)
    jobs = started(plan_redeploy(make_spec(scale=4), [], hosts("h1", used_ports=used), ids(), ports))
    got = [j.port for j in jobs]
    assert len(set(got)) == 4
    assert all(p is not None and 5000 <= p <= 5009 and p not in used for p in got)
    assert all(dict(j.environment)["PORT"] == str(j.port) for j in jobs)


def test_redeploy_never_reuses_a_port_a_stopping_job_may_still_hold() -> None:
    old = [ObservedJob("o1", "deploy", None, "h1", 5000), ObservedJob("o2", "deploy", None, "h1", 5001)]
    h1 = HostLoad("h1", used_ports=frozenset({5000, 5001}))
    for overlap in (0, 10):
        jobs = started(plan_redeploy(make_spec(overlap=overlap), old, [h1], ids(), PORTS))
        assert {j.port for j in jobs}.isdisjoint({5000, 5001})


def test_no_free_port_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="port"):
        plan_redeploy(make_spec(scale=3), [], hosts("h1"), ids(), PortRange(5000, 5001))
    full = hosts("h1", used_ports=frozenset({5000, 5001}))
    with pytest.raises(PlanError, match="port"):
        plan_redeploy(make_spec(scale=1), [], full, ids(), PortRange(5000, 5001))


def test_a_full_port_range_does_not_stop_worker_jobs() -> None:
    spec = make_spec(scale=0, workers=(WorkerSpec("q", "work", 3),))
    full = hosts("h1", used_ports=frozenset({5000}))
    assert len(started(plan_redeploy(spec, [], full, ids(), PortRange(5000, 5000)))) == 3


# --- variables -------------------------------------------------------------------------------------


def test_automatic_variables_win_over_user_variables() -> None:
    user = {"PORT": "80", "ORCH_JOB": "x", "ORCH_SERVICE": "x", "ORCH_ENV": "x", "ORCH_RELEASE": "x",
            "GREETING": "hi"}
    (job,) = started(plan_redeploy(make_spec(scale=1, variables=user, release=3), [], hosts("h1"), ids(), PORTS))
    env = dict(job.environment)
    assert env["PORT"] == str(job.port)
    assert env["ORCH_JOB"] == job.id
    assert env["ORCH_SERVICE"] == "web"
    assert env["ORCH_ENV"] == "shop"
    assert env["ORCH_RELEASE"] == "3"
    assert env["ORCH_HOST"] == "h1" and env["ORCH_KIND"] == "deploy"
    assert env["GREETING"] == "hi"


def test_environment_is_sorted_and_hashable() -> None:
    (job,) = started(plan_redeploy(make_spec(scale=1, variables={"Z": "1", "A": "2"}), [], hosts("h1"), ids(), PORTS))
    keys = [k for k, _ in job.environment]
    assert keys == sorted(keys)
    hash(job)  # frozen all the way down: a plan can be compared and deduplicated


# --- scale -----------------------------------------------------------------------------------------


def test_scale_up_starts_only_the_extra_jobs_and_places_them() -> None:
    old = old_jobs("h1", "h1")
    plan = plan_scale(make_spec(), old, hosts("h1", "h2"), ids(), kind="deploy", target=None, scale=4, ports=PORTS)
    assert stage_kinds(plan) == [{CheckImage}, {StartJob}]
    assert stopped(plan) == []
    new = started(plan)
    assert len(new) == 2
    assert per_host(new) == {"h2": 2}  # spread: h1 already holds two of the service's jobs
    assert plan.stages[0] == (CheckImage("h2", IMAGE),)


def test_scale_down_stops_only_the_surplus_busiest_host_and_newest_first() -> None:
    old = old_jobs("h1", "h2", "h1", "h1", "h2")  # o1..o5, oldest first
    plan = plan_scale(make_spec(), old, hosts("h1", "h2"), ids(), kind="deploy", target=None, scale=3, ports=PORTS)
    assert stage_kinds(plan) == [{StopJob}]
    assert started(plan) == []
    # h1 holds three: its newest (o4) goes; then 2 and 2 on h1 and h2, one more goes by name,
    # taking the newest of that host.
    first, second = stopped(plan)
    assert first == "o4"
    assert second in {"o3", "o5"}
    remaining = [j for j in old if j.id not in {first, second}]
    assert sorted(Counter(j.host for j in remaining).values()) == [1, 2]


def test_scale_down_leaves_other_kinds_and_targets_alone() -> None:
    old = old_jobs("h1", "h1") + old_jobs("h1", "h1", kind="worker", target="q", prefix="w")
    spec = make_spec(workers=(WorkerSpec("q", "work", 2),))
    plan = plan_scale(spec, old, hosts("h1"), ids(), kind="worker", target="q", scale=0, ports=PORTS)
    assert set(stopped(plan)) == {"w1", "w2"}
    plan = plan_scale(spec, old, hosts("h1"), ids(), kind="deploy", target=None, scale=1, ports=PORTS)
    assert stopped(plan) == ["o2"]


def test_scale_up_of_a_worker_target_uses_its_command_and_no_port() -> None:
    spec = make_spec(workers=(WorkerSpec("q", "work --hard", 1),))
    old = old_jobs("h1", kind="worker", target="q")
    plan = plan_scale(spec, old, hosts("h1"), ids(), kind="worker", target="q", scale=3, ports=PORTS)
    new = started(plan)
    assert [(j.kind, j.target, j.command, j.port) for j in new] == [("worker", "q", "work --hard", None)] * 2


def test_scale_of_an_unknown_worker_target_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="nope"):
        plan_scale(make_spec(), [], hosts("h1"), ids(), kind="worker", target="nope", scale=1, ports=PORTS)


@pytest.mark.parametrize("count", [0, 1, 3])
def test_scale_to_the_same_number_is_an_empty_plan(count: int) -> None:
    old = old_jobs(*["h1"] * count)
    plan = plan_scale(make_spec(), old, hosts("h1"), ids(), kind="deploy", target=None, scale=count, ports=PORTS)
    assert plan == Plan() and plan.steps == ()


def test_stop_plan_stops_one_target() -> None:
    old = old_jobs("h1") + old_jobs("h1", "h2", kind="worker", target="q", prefix="w")
    assert plan_stop(old, kind="worker", target="q") == Plan(((StopJob("w1", "h1"), StopJob("w2", "h2")),))
    assert plan_stop(old, kind="worker", target="other") == Plan()


# --- move (drain) ----------------------------------------------------------------------------------


def test_move_starts_on_other_hosts_first_then_stops_the_leaving_jobs() -> None:
    old = old_jobs("h1", "h2", "h1")
    plan = plan_move(make_spec(scale=3), old, hosts("h1", "h2", "h3"), ids(), away_from="h1", ports=PORTS)
    assert stage_kinds(plan) == [{CheckImage}, {StartJob}, {StopJob}]
    assert plan.stages[2] == (StopJob("o1", "h1"), StopJob("o3", "h1"))
    new = started(plan)
    assert per_host(new) == {"h2": 1, "h3": 1}  # spread: h3 first (h2 holds o2), then h2
    assert plan.stages[0] == (CheckImage("h2", IMAGE), CheckImage("h3", IMAGE))


def test_move_off_a_host_the_service_has_no_job_on_is_an_empty_plan() -> None:
    assert plan_move(make_spec(), old_jobs("h2"), hosts("h1", "h2"), ids(), away_from="h1", ports=PORTS) == Plan()


def test_move_refuses_a_database_pinned_on_the_leaving_host() -> None:
    spec = make_spec(type="postgresql", scale=1, pinned_host="h1", port=5005, volume="orch-shop-db-data:/data")
    with pytest.raises(PlanError, match="keeps its data on host h1"):
        plan_move(spec, old_jobs("h1"), hosts("h1", "h2"), ids(), away_from="h1", ports=PORTS)


def test_move_of_a_cache_takes_a_new_free_port_on_its_new_host() -> None:
    spec = make_spec(type="redis", scale=1, port=5000, command=None, args=("--port", "{port}"))
    old = [ObservedJob("o1", "deploy", None, "h1", 5000)]
    fleet = [HostLoad("h1", used_ports=frozenset({5000})), HostLoad("h2", used_ports=frozenset({5000}))]
    (job,) = started(plan_move(spec, old, fleet, ids(), away_from="h1", ports=PORTS))
    assert job.host == "h2" and job.port == 5001 and job.args == ("--port", "5001")


def test_move_keeps_the_kind_target_and_command_of_worker_jobs() -> None:
    spec = make_spec(scale=1, workers=(WorkerSpec("q", "work --hard", 2), WorkerSpec("cron", "tick", 1)))
    old = (old_jobs("h1") + old_jobs("h1", "h2", kind="worker", target="q", prefix="w")
           + old_jobs("h1", kind="worker", target="cron", prefix="c"))
    plan = plan_move(spec, old, hosts("h1", "h2"), ids(), away_from="h1", ports=PORTS)
    assert sorted((j.kind, j.target, j.command, j.port is None) for j in started(plan)) == [
        ("deploy", None, spec.command, False), ("worker", "cron", "tick", True),
        ("worker", "q", "work --hard", True),
    ]
    assert set(stopped(plan)) == {"o1", "w1", "c1"}
    assert per_host(started(plan)) == {"h2": 3}


def test_move_with_nowhere_to_go_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="no up host"):
        plan_move(make_spec(), old_jobs("h1"), hosts("h1"), ids(), away_from="h1", ports=PORTS)


# --- recover ---------------------------------------------------------------------------------------


def test_recover_starts_only_the_missing_deploy_jobs() -> None:
    plan = plan_recover(make_spec(scale=3), old_jobs("h1"), hosts("h1", "h2"), ids(), PORTS)
    assert stage_kinds(plan) == [{CheckImage}, {StartJob}]
    assert stopped(plan) == []
    new = started(plan)
    assert [(j.kind, j.target) for j in new] == [("deploy", None)] * 2
    assert [j.host for j in new] == ["h2", "h1"]  # h2 holds none of the service's jobs: it comes first


def test_recover_brings_each_worker_target_back_to_its_scale() -> None:
    spec = make_spec(scale=1, workers=(WorkerSpec("q", "work --hard", 3), WorkerSpec("cron", "tick", 1)))
    old = old_jobs("h1") + old_jobs("h1", kind="worker", target="q", prefix="w")
    new = started(plan_recover(spec, old, hosts("h1", "h2"), ids(), PORTS))
    assert sorted((j.kind, j.target, j.command) for j in new) == [
        ("worker", "cron", "tick"), ("worker", "q", "work --hard"), ("worker", "q", "work --hard"),
    ]
    assert all(j.port is None for j in new)


def test_recover_of_a_service_at_scale_is_an_empty_plan() -> None:
    spec = make_spec(scale=2, workers=(WorkerSpec("q", "work", 1),))
    old = old_jobs("h1", "h2") + old_jobs("h2", kind="worker", target="q", prefix="w")
    assert plan_recover(spec, old, hosts("h1", "h2"), ids(), PORTS) == Plan()
    # Above scale too: a recover stops nothing.
    assert plan_recover(make_spec(scale=1), old_jobs("h1", "h2"), hosts("h1", "h2"), ids(), PORTS) == Plan()


def test_recover_keeps_a_database_on_its_host_and_port() -> None:
    spec = make_spec(type="postgresql", scale=1, pinned_host="h1", port=5005, command=None,
                     args=("-p", "{port}"))
    (job,) = started(plan_recover(spec, [], hosts("h1", "h2"), ids(), PORTS))
    assert (job.host, job.port, job.args) == ("h1", 5005, ("-p", "5005"))
    with pytest.raises(PlanError, match="not up"):
        plan_recover(spec, [], [HostLoad("h1", schedulable=False), HostLoad("h2")], ids(), PORTS)


# --- capacity and placement ------------------------------------------------------------------------


def test_no_host_that_fits_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="no up host"):
        plan_redeploy(make_spec(scale=1), [], hosts("h1", memory_mb=100), ids(), PORTS)
    with pytest.raises(PlanError, match="no up host"):
        plan_redeploy(make_spec(scale=1), [], hosts("h1", cpus=0.25), ids(), PORTS)
    with pytest.raises(PlanError):
        plan_redeploy(make_spec(scale=1), [], [], ids(), PORTS)
    with pytest.raises(PlanError):
        plan_redeploy(make_spec(scale=1), [], hosts("h1", schedulable=False), ids(), PORTS)


def test_capacity_runs_out_part_way_through() -> None:
    # 512m fits two "s" jobs (256m each), not three.
    with pytest.raises(PlanError):
        plan_redeploy(make_spec(scale=3), [], hosts("h1", memory_mb=512), ids(), PORTS)
    assert len(started(plan_redeploy(make_spec(scale=2), [], hosts("h1", memory_mb=512), ids(), PORTS))) == 2


def test_redeploy_without_overlap_reuses_the_room_of_the_jobs_it_stops() -> None:
    full = hosts("h1", memory_mb=512, cpus=1.0, used_memory_mb=512, used_cpus=1.0)
    old = old_jobs("h1", "h1")
    assert len(started(plan_redeploy(make_spec(), old, full, ids(), PORTS))) == 2
    # With overlap, old and new run side by side: there is no room for both.
    with pytest.raises(PlanError):
        plan_redeploy(make_spec(overlap=5), old, full, ids(), PORTS)


def test_scale_of_four_over_two_equal_hosts_lands_two_and_two() -> None:
    for equal in (hosts("h1", "h2"), hosts("h1", "h2", cpus=4.0, memory_mb=4096)):
        plan = plan_scale(make_spec(), [], equal, ids(), kind="deploy", target=None, scale=4, ports=PORTS)
        assert per_host(started(plan)) == {"h1": 2, "h2": 2}
        plan = plan_redeploy(make_spec(scale=4), [], equal, ids(), PORTS)
        assert per_host(started(plan)) == {"h1": 2, "h2": 2}


def test_redeploy_without_overlap_keeps_the_spread() -> None:
    old = old_jobs("h1", "h2", "h1", "h2")
    plan = plan_redeploy(make_spec(scale=4), old, hosts("h1", "h2"), ids(), PORTS)
    assert per_host(started(plan)) == {"h1": 2, "h2": 2}


def test_redeploy_with_overlap_keeps_a_balanced_spread() -> None:
    old = old_jobs("h1", "h2", "h1", "h2")
    plan = plan_redeploy(make_spec(scale=4, overlap=5), old, hosts("h1", "h2"), ids(), PORTS)
    assert per_host(started(plan)) == {"h1": 2, "h2": 2}


def test_redeploy_with_overlap_spreads_the_new_jobs_among_themselves() -> None:
    # Two old jobs both on h1 (placed before h2 joined); a redeploy should end 1 and 1.
    old = old_jobs("h1", "h1")
    plan = plan_redeploy(make_spec(scale=2, overlap=5), old, hosts("h1", "h2"), ids(), PORTS)
    assert per_host(started(plan)) == {"h1": 1, "h2": 1}


def test_a_draining_host_gets_nothing() -> None:
    fleet = [HostLoad("h1", schedulable=False), HostLoad("h2")]
    plan = plan_scale(make_spec(), old_jobs("h1"), fleet, ids(), kind="deploy", target=None, scale=4, ports=PORTS)
    assert per_host(started(plan)) == {"h2": 3}
    plan = plan_redeploy(make_spec(scale=3), old_jobs("h1", "h1"), fleet, ids(), PORTS)
    assert per_host(started(plan)) == {"h2": 3}
    assert CheckImage("h1", IMAGE) not in plan.steps


def test_spreading_comes_before_load() -> None:
    # h2 is busier with other services' jobs, but holds none of this one: it gets the next job.
    fleet = [HostLoad("h1", cpus=8, memory_mb=8192), HostLoad("h2", cpus=8, memory_mb=8192, used_memory_mb=6000)]
    plan = plan_scale(make_spec(), old_jobs("h1"), fleet, ids(), kind="deploy", target=None, scale=2, ports=PORTS)
    assert per_host(started(plan)) == {"h2": 1}


# --- properties ------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    host_count=st.integers(1, 5),
    scale=st.integers(0, 12),
    memory=st.sampled_from([0, 1024, 2048, 4096]),
    size_name=st.sampled_from(sorted(NAMED_SIZES)),
)
def test_property_placement_fits_spreads_and_ports_are_unique(host_count: int, scale: int, memory: int,
                                                              size_name: str) -> None:
    size = NAMED_SIZES[size_name]
    fleet = [HostLoad(f"h{i}", memory_mb=memory) for i in range(host_count)]
    spec = make_spec(scale=scale, size_name=size_name, size=size)
    capacity = host_count * (memory // size.memory_mb) if memory else None
    if capacity is not None and scale > capacity:
        with pytest.raises(PlanError):
            plan_redeploy(spec, [], fleet, ids(), PORTS)
        return
    new = started(plan_redeploy(spec, [], fleet, ids(), PORTS))
    assert len(new) == scale
    counts = per_host(new)
    if memory:
        assert all(n * size.memory_mb <= memory for n in counts.values())
    spread = [counts.get(h.name, 0) for h in fleet]
    assert max(spread) - min(spread) <= 1  # equal hosts: as even as it gets
    for host in counts:
        ports = [j.port for j in new if j.host == host]
        assert len(ports) == len(set(ports))
    assert len({j.id for j in new}) == scale
    assert len({j.container_name for j in new}) == scale
