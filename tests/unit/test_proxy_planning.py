"""The service proxy in plans and operations: where the planner puts route steps (one per proxy
job, for deploy jobs of routed services only), and, in the in-process ``World``, what sites,
pushes, scales, failures and reverts do to the catalogue's routes and the proxies' config."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import replace

import pytest
import trustme
from sqlalchemy import update
from sqlmodel import col, select

from orchestrator import catalogue, fleet, requests
from orchestrator.errors import BadInput, NotFound
from orchestrator.models import (
    Environment,
    Job,
    JobKind,
    JobState,
    OpKind,
    OpState,
    OpTrigger,
    RouteState,
    Service,
    ServiceType,
    StepAction,
)
from orchestrator.placement import HostLoad
from orchestrator.planner import (
    CheckImage,
    ObservedJob,
    Plan,
    PortRange,
    ProxyJob,
    Route,
    ServiceSpec,
    StartJob,
    StopJob,
    Wait,
    WorkerSpec,
    plan_move,
    plan_recover,
    plan_redeploy,
    plan_revert,
    plan_routes,
    plan_scale,
)
from orchestrator.proxy import ProxyConfig, Server
from orchestrator.rules import check_certificate
from orchestrator.sizes import NAMED_SIZES
from tests.unit.world import CRASHING, ENV, IMAGE, IMAGE_2, PORT_MIN, World
from workers.inline import SentChain
from workers.proxy import MemoryProxies
from workers.runtime.fake import FakeRuntime

PORTS = PortRange(5000, 5099)
PROXIES = (ProxyJob("px1", "h1"), ProxyJob("px2", "h2"))


def make_spec(**changes: object) -> ServiceSpec:
    """A routed code service, scale 2, in an environment with two proxy jobs."""
    spec = ServiceSpec(env="shop", name="web", type="code", image="local/app:v2", command="serve",
                       size_name="s", size=NAMED_SIZES["s"], scale=2, release=3, routed=True,
                       proxies=PROXIES)
    return replace(spec, **changes)  # type: ignore[arg-type]


def ids(prefix: str = "n") -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"{prefix}{next(counter)}"


def hosts(*names: str) -> list[HostLoad]:
    return [HostLoad(name=n) for n in names]


def old_jobs(*placement: str, kind: JobKind = JobKind.deploy, target: str | None = None,
             prefix: str = "o") -> list[ObservedJob]:
    return [ObservedJob(f"{prefix}{i}", kind, target, h) for i, h in enumerate(placement, 1)]


def kinds(plan: Plan) -> list[str]:
    """Each stage by what it does: the step type, and for route steps where the jobs go."""
    names = []
    for stage in plan.stages:
        found = {f"route {step.to}" if isinstance(step, Route) else type(step).__name__ for step in stage}
        assert len(found) == 1, f"a stage mixes {found}"
        names.append(found.pop())
    return names


def routes(stage: tuple[object, ...], jobs: tuple[str, ...], to: RouteState | None) -> tuple[Route, ...]:
    """What a route stage must be: one step per proxy job, on its host."""
    assert stage == tuple(Route(p.id, p.host, jobs, to) for p in PROXIES)
    return stage  # type: ignore[return-value]


def started(plan: Plan) -> tuple[str, ...]:
    return tuple(s.job.id for s in plan.steps if isinstance(s, StartJob))


# --- the planner: redeploys -----------------------------------------------------------------------


def test_first_deploy_of_a_routed_service_takes_its_new_jobs_in_after_they_start() -> None:
    plan = plan_redeploy(make_spec(), [], hosts("h1", "h2"), ids(), PORTS)
    assert kinds(plan) == ["CheckImage", "StartJob", "route serving"]
    routes(plan.stages[2], ("n1", "n2"), RouteState.serving)


def test_redeploy_without_overlap_takes_old_jobs_out_stops_them_starts_then_takes_new_in() -> None:
    plan = plan_redeploy(make_spec(), old_jobs("h1", "h2"), hosts("h1", "h2"), ids(), PORTS)
    assert kinds(plan) == ["CheckImage", "route out", "StopJob", "StartJob", "route serving"]
    routes(plan.stages[1], ("o1", "o2"), RouteState.out)
    assert plan.stages[2] == (StopJob("o1", "h1"), StopJob("o2", "h2"))
    routes(plan.stages[4], started(plan), RouteState.serving)
    assert started(plan) == ("n1", "n2")


def test_redeploy_with_overlap_serves_new_drains_old_waits_takes_old_out_then_stops() -> None:
    plan = plan_redeploy(make_spec(overlap=20), old_jobs("h1", "h2"), hosts("h1", "h2"), ids(), PORTS)
    assert kinds(plan) == ["CheckImage", "StartJob", "route serving", "route draining", "Wait",
                           "route out", "StopJob"]
    routes(plan.stages[2], ("n1", "n2"), RouteState.serving)
    routes(plan.stages[3], ("o1", "o2"), RouteState.draining)
    assert plan.stages[4] == (Wait(20),)
    routes(plan.stages[5], ("o1", "o2"), RouteState.out)


def test_start_first_without_overlap_starts_before_stopping_and_never_waits() -> None:
    plan = plan_redeploy(make_spec(start_first=True), old_jobs("h1", "h2"), hosts("h1", "h2"), ids(), PORTS)
    assert kinds(plan) == ["CheckImage", "StartJob", "route serving", "route draining", "route out", "StopJob"]
    # The service proxy itself: start first, but nothing routed.
    proxy = make_spec(type="service_proxy", routed=False, start_first=True, scale=1, has_port=False)
    plan = plan_redeploy(proxy, old_jobs("h1"), hosts("h1", "h2"), ids(), PORTS)
    assert kinds(plan) == ["CheckImage", "StartJob", "StopJob"]


def test_start_first_with_nothing_running_is_a_plain_first_deploy() -> None:
    plan = plan_redeploy(make_spec(start_first=True, overlap=5), [], hosts("h1"), ids(), PORTS)
    assert kinds(plan) == ["CheckImage", "StartJob", "route serving"]


def test_worker_jobs_are_never_routed() -> None:
    spec = make_spec(scale=1, workers=(WorkerSpec("queue", "work", 2),))
    old = old_jobs("h1") + old_jobs("h1", "h2", kind=JobKind.worker, target="queue", prefix="w")
    plan = plan_redeploy(spec, old, hosts("h1", "h2"), ids(), PORTS)
    assert kinds(plan) == ["CheckImage", "route out", "StopJob", "StartJob", "route serving"]
    routes(plan.stages[1], ("o1",), RouteState.out)  # not w1, w2
    deploy = tuple(s.job.id for s in plan.steps if isinstance(s, StartJob) and s.job.kind == JobKind.deploy)
    assert len(deploy) == 1 and len(started(plan)) == 3
    routes(plan.stages[4], deploy, RouteState.serving)
    # Only worker jobs (a service at scale 0 with workers): no route step at all.
    plan = plan_redeploy(replace(spec, scale=0), old[1:], hosts("h1", "h2"), ids(), PORTS)
    assert not [s for s in plan.steps if isinstance(s, Route)]
    assert len(started(plan)) == 2


@pytest.mark.parametrize("spec", [
    pytest.param(make_spec(routed=False), id="not-routed"),
    pytest.param(make_spec(proxies=()), id="no-proxy-runs"),
    pytest.param(make_spec(type="postgresql", routed=False, scale=1), id="database"),
])
def test_no_route_steps_for_unrouted_services_or_without_proxies(spec: ServiceSpec) -> None:
    for plan in (plan_redeploy(spec, old_jobs("h1"), hosts("h1", "h2"), ids(), PORTS),
                 plan_redeploy(replace(spec, overlap=9), old_jobs("h1"), hosts("h1", "h2"), ids(), PORTS),
                 plan_scale(spec, old_jobs("h1"), hosts("h1"), ids(), kind=JobKind.deploy, target=None,
                            scale=3, ports=PORTS),
                 plan_scale(spec, old_jobs("h1", "h1"), hosts("h1"), ids(), kind=JobKind.deploy, target=None,
                            scale=0, ports=PORTS),
                 plan_recover(spec, [], hosts("h1"), ids(), PORTS),
                 plan_move(spec, old_jobs("h1"), hosts("h1", "h2"), ids(), away_from="h1", ports=PORTS)):
        assert plan.steps and not [s for s in plan.steps if isinstance(s, Route)]


# --- the planner: scale, recover, move, revert, routes ----------------------------------------------


def test_scale_up_starts_then_takes_only_the_new_jobs_in() -> None:
    plan = plan_scale(make_spec(), old_jobs("h1", "h2"), hosts("h1", "h2"), ids(), kind=JobKind.deploy,
                      target=None, scale=3, ports=PORTS)
    assert kinds(plan) == ["CheckImage", "StartJob", "route serving"]
    routes(plan.stages[2], ("n1",), RouteState.serving)


def test_scale_down_takes_the_surplus_out_before_it_stops() -> None:
    old = old_jobs("h1", "h1", "h2")
    plan = plan_scale(make_spec(), old, hosts("h1", "h2"), ids(), kind=JobKind.deploy, target=None,
                      scale=1, ports=PORTS)
    assert kinds(plan) == ["route out", "StopJob"]
    surplus = tuple(s.job_id for s in plan.stages[1] if isinstance(s, StopJob))
    assert set(surplus) == {"o2", "o3"}  # the busiest host's newest, then h2's
    routes(plan.stages[0], surplus, RouteState.out)


def test_scaling_a_worker_target_never_routes() -> None:
    spec = make_spec(workers=(WorkerSpec("queue", "work", 1),))
    workers = old_jobs("h1", "h2", kind=JobKind.worker, target="queue", prefix="w")
    up = plan_scale(spec, workers, hosts("h1", "h2"), ids(), kind=JobKind.worker, target="queue", scale=3,
                    ports=PORTS)
    down = plan_scale(spec, workers, hosts("h1", "h2"), ids(), kind=JobKind.worker, target="queue", scale=0,
                      ports=PORTS)
    assert kinds(up) == ["CheckImage", "StartJob"]
    assert kinds(down) == ["StopJob"]


def test_recover_takes_the_replacements_in() -> None:
    plan = plan_recover(make_spec(scale=3), old_jobs("h1"), hosts("h1", "h2"), ids(), PORTS)
    assert kinds(plan) == ["CheckImage", "StartJob", "route serving"]
    routes(plan.stages[2], ("n1", "n2"), RouteState.serving)


def test_move_serves_the_replacements_before_the_leaving_jobs_go_out_and_stop() -> None:
    old = old_jobs("h1", "h2") + old_jobs("h1", kind=JobKind.worker, target="queue", prefix="w")
    spec = make_spec(workers=(WorkerSpec("queue", "work", 1),))
    plan = plan_move(spec, old, hosts("h1", "h2", "h3"), ids(), away_from="h1", ports=PORTS)
    assert kinds(plan) == ["CheckImage", "StartJob", "route serving", "route out", "StopJob"]
    new_deploy = tuple(s.job.id for s in plan.stages[1] if isinstance(s, StartJob) and s.job.kind == JobKind.deploy)
    assert len(new_deploy) == 1 and len(plan.stages[1]) == 2
    routes(plan.stages[2], new_deploy, RouteState.serving)
    routes(plan.stages[3], ("o1",), RouteState.out)  # the leaving worker job w1 is not routed
    assert set(plan.stages[4]) == {StopJob("o1", "h1"), StopJob("w1", "h1")}


def test_revert_brings_the_service_back_first_then_the_failed_jobs_go_out_and_stop() -> None:
    # The failed operation started f1, f2 (deploy) and fw (worker); o1 survived; scale is 2.
    jobs = [*old_jobs("h1"), *old_jobs("h1", "h2", prefix="f"),
            ObservedJob("fw", JobKind.worker, "queue", "h2")]
    spec = make_spec(workers=(WorkerSpec("queue", "work", 1),))
    plan = plan_revert(spec, jobs, hosts("h1", "h2"), ids(), failed=["f1", "f2", "fw"], ports=PORTS)
    assert kinds(plan) == ["CheckImage", "StartJob", "route serving", "route out", "StopJob"]
    new = started(plan)
    assert len(new) == 2  # one deploy job (o1 stays) and the worker
    deploy = tuple(s.job.id for s in plan.stages[1] if isinstance(s, StartJob) and s.job.kind == JobKind.deploy)
    routes(plan.stages[2], deploy, RouteState.serving)
    routes(plan.stages[3], ("f1", "f2"), RouteState.out)
    assert set(plan.stages[4]) == {StopJob("f1", "h1"), StopJob("f2", "h2"), StopJob("fw", "h2")}


def test_revert_of_a_service_still_at_scale_only_takes_the_failed_jobs_out_and_stops_them() -> None:
    jobs = [*old_jobs("h1", "h2"), *old_jobs("h1", prefix="f")]
    plan = plan_revert(make_spec(), jobs, hosts("h1", "h2"), ids(), failed=["f1"], ports=PORTS)
    assert kinds(plan) == ["route out", "StopJob"]
    routes(plan.stages[0], ("f1",), RouteState.out)
    assert plan.stages[1] == (StopJob("f1", "h1"),)
    # Nothing failed and nothing missing: nothing to do.
    assert plan_revert(make_spec(), jobs[:2], hosts("h1", "h2"), ids(), failed=[], ports=PORTS) == Plan()


def test_plan_routes_brings_every_proxy_job_in_line_and_nothing_else() -> None:
    plan = plan_routes(make_spec())
    assert plan.stages == ((Route("px1", "h1", (), None), Route("px2", "h2", (), None)),)
    assert plan_routes(make_spec(proxies=())) == Plan()


def test_route_steps_run_on_the_proxy_jobs_hosts_not_the_routed_jobs() -> None:
    spec = make_spec(proxies=(ProxyJob("px", "h9"),))
    plan = plan_redeploy(spec, [], hosts("h1"), ids(), PORTS)
    (step,) = [s for s in plan.steps if isinstance(s, Route)]
    assert (step.proxy, step.host) == ("px", "h9")
    assert {s.job.host for s in plan.steps if isinstance(s, StartJob)} == {"h1"}
    assert {s.host for s in plan.steps if isinstance(s, CheckImage)} == {"h1"}


# --- the World: sites, pushes, scales, failures ----------------------------------------------------

PROXY = "service-proxy"


@pytest.fixture
def routable(world: World) -> World:
    """The world, with health paths answered by what listens (the World's nodes would GET them
    over real HTTP)."""
    for host, runtime in world.runtimes.items():
        world.node(host).answers = answered_by(runtime)
    return world


def answered_by(runtime: FakeRuntime) -> Callable[[str, int, str], bool]:
    return lambda _address, port, _path: runtime.listening(port)


def add_proxy(world: World, scale: int = 1) -> list[Job]:
    """The environment's service proxy (on an image the fake hosts have), deployed."""
    op = requests.add_service(world.platform, env=ENV, name=PROXY, type=ServiceType.service_proxy, image=IMAGE,
                              command=None, scale=scale, size="xs")
    world.run_all()
    assert op is not None and world.operation(op.id or 0).state == OpState.succeeded
    proxies = world.jobs(PROXY)
    assert len(proxies) == scale and {j.state for j in proxies} == {JobState.running}
    return proxies


@pytest.fixture
def proxied(routable: World) -> World:
    add_proxy(routable)
    return routable


def memory(world: World, host: str) -> MemoryProxies:
    proxies = world.node(host).proxies
    assert isinstance(proxies, MemoryProxies)
    return proxies


def config_of(world: World, proxy_job: Job | None = None) -> ProxyConfig:
    """What a proxy job (the only one by default) serves now."""
    if proxy_job is None:
        (proxy_job,) = world.jobs(PROXY)
    return memory(world, proxy_job.host).configs[proxy_job.id]


def servers(config: ProxyConfig, service: str = "web") -> dict[str, Server]:
    (backend,) = [b for b in config.backends if b.service == service]
    return {s.name: s for s in backend.servers}


def expected_servers(world: World, jobs: list[Job]) -> dict[str, Server]:
    return {j.id: Server(j.id, world.host(j.host).address, j.port or 0) for j in jobs}


def route_stages(world: World, op_id: int) -> list[tuple[int, RouteState | None, frozenset[str]]]:
    """(stage, where to, jobs) of the operation's route steps, in order."""
    return [(st.stage, st.route, frozenset(st.targets)) for st in world.steps(op_id, StepAction.route)]


def rest(world: World, chain: SentChain, done: int) -> None:
    """Send the stages of ``chain`` after the first ``done`` (run by hand), and run them to the
    operation's end."""
    world.dispatch.sent.append(SentChain(chain.op_id, chain.stages[done:], chain.env, chain.service,
                                          chain.first + done))
    world.run_all()


def sites_of(world: World) -> list[tuple[str, str, bool]]:
    with world.platform.reader() as s:
        env = catalogue.get_env(session=s, name=ENV)
        return [(p.name, p.service, p.tls) for p in catalogue.list_sites(session=s, env=env)]


def test_an_environment_takes_proxy_ports_from_the_range_when_it_gets_a_proxy(world: World) -> None:
    config = world.platform.settings
    with world.platform.reader() as s:  # the World's environment has no included services
        env = catalogue.get_env(session=s, name=ENV)
    assert (env.http_port, env.https_port) == (None, None)
    requests.add_service(world.platform, env=ENV, name=PROXY, type=ServiceType.service_proxy, image=IMAGE,
                         command=None, scale=1, size="xs")
    with world.platform.reader() as s:
        env = catalogue.get_env(session=s, name=ENV)
    assert (env.http_port, env.https_port) == (config.proxy_port_min, config.proxy_port_min + 1)


def test_a_site_added_records_a_routes_operation_with_one_route_step_per_proxy_job(routable: World) -> None:
    world = routable
    proxy_jobs = add_proxy(world, scale=2)
    assert {j.host for j in proxy_jobs} == {"h1", "h2"}
    world.code_service("web", scale=1)

    op = requests.add_site(world.platform, env=ENV, site="App.Example.com", service="web")
    assert op is not None
    assert (op.kind, op.trigger, op.service_id) == (OpKind.routes, OpTrigger.manual, world.service(PROXY).id)
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.succeeded
    steps = world.steps(op.id or 0)
    assert {(st.action, st.job_id, st.host, st.route, tuple(st.targets), st.stage) for st in steps} == {
        (StepAction.route, j.id, j.host, None, (), 0) for j in proxy_jobs}
    assert all(st.name.startswith("proxy: sites and certificates in line on ") for st in steps)
    for job in proxy_jobs:
        config = config_of(world, job)
        assert [(s.name, s.service, s.pem) for s in config.sites] == [("app.example.com", "web", None)]
        assert config.bind == f"addr-{job.host}"
        assert (config.http_port, config.https_port) == (30000, 30001)
    assert sites_of(world) == [("app.example.com", "web", False)]


def test_a_site_removed_leaves_every_proxy(proxied: World) -> None:
    world = proxied
    world.code_service("web", scale=1)
    requests.add_site(world.platform, env=ENV, site="a.example.com", service="web")
    requests.add_site(world.platform, env=ENV, site="b.example.com", service="web")
    world.run_all()
    assert [s.name for s in config_of(world).sites] == ["a.example.com", "b.example.com"]

    op = requests.remove_site(world.platform, env=ENV, site="A.Example.com.")
    assert op is not None and op.kind == OpKind.routes
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.succeeded
    assert [s.name for s in config_of(world).sites] == ["b.example.com"]
    assert sites_of(world) == [("b.example.com", "web", False)]
    with pytest.raises(NotFound, match=re.escape("no site a.example.com in e")):
        requests.remove_site(world.platform, env=ENV, site="a.example.com")


def test_a_site_in_an_environment_without_a_proxy_is_kept_and_records_nothing(world: World) -> None:
    world.code_service("web", scale=1)
    before = len(world.operations("web"))
    assert requests.add_site(world.platform, env=ENV, site="app.example.com", service="web") is None
    assert sites_of(world) == [("app.example.com", "web", False)]
    assert len(world.operations("web")) == before
    with pytest.raises(BadInput, match=re.escape("site app.example.com exists already in e")):
        requests.add_site(world.platform, env=ENV, site="APP.example.com", service="web")


def test_sites_route_to_code_services_only_and_a_bad_request_changes_nothing(proxied: World) -> None:
    world = proxied
    world.code_service("web", scale=1)
    ops_before = len(world.operations(PROXY))
    with pytest.raises(BadInput, match="sites route to code services; service-proxy is a service_proxy service"):
        requests.add_site(world.platform, env=ENV, site="app.example.com", service=PROXY)
    with pytest.raises(BadInput, match="is not a DNS name"):
        requests.add_site(world.platform, env=ENV, site="*.example.com", service="web")
    with pytest.raises(BadInput, match="a TLS site needs both --cert and --key"):
        requests.add_site(world.platform, env=ENV, site="app.example.com", service="web", cert="x")
    with pytest.raises(NotFound):
        requests.add_site(world.platform, env=ENV, site="app.example.com", service="nope")
    assert sites_of(world) == []
    assert len(world.operations(PROXY)) == ops_before


def test_a_tls_site_gives_every_proxy_its_certificate_chain_and_key(proxied: World) -> None:
    world = proxied
    world.code_service("web", scale=1)
    issued = trustme.CA().create_child_ca().issue_cert("shop.example.com")
    chain = "".join(b.bytes().decode() for b in issued.cert_chain_pems)
    key = issued.private_key_pem.bytes().decode()
    op = requests.add_site(world.platform, env=ENV, site="shop.example.com", service="web", cert=chain, key=key)
    assert op is not None
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.succeeded
    (site,) = config_of(world).sites
    assert site.pem == check_certificate("shop.example.com", chain, key).strip() + "\n" + key.strip() + "\n"
    assert site.pem.count("BEGIN CERTIFICATE") == 2 and site.pem.count("PRIVATE KEY-----") == 2
    assert sites_of(world) == [("shop.example.com", "web", True)]

    # A certificate for another name is refused: nothing recorded, nothing changed.
    other = trustme.CA().issue_cert("other.example.com")
    ops_before = len(world.operations(PROXY))
    with pytest.raises(BadInput, match=re.escape("not for api.example.com")):
        requests.add_site(world.platform, env=ENV, site="api.example.com", service="web",
                          cert=other.cert_chain_pems[0].bytes().decode(),
                          key=other.private_key_pem.bytes().decode())
    assert sites_of(world) == [("shop.example.com", "web", True)]
    assert len(world.operations(PROXY)) == ops_before


def test_a_push_to_a_routed_service_takes_its_jobs_into_the_proxy(proxied: World) -> None:
    world = proxied
    (proxy_job,) = world.jobs(PROXY)
    op = world.code_service("web", scale=2)
    assert op.state == OpState.succeeded
    jobs = world.jobs("web")
    assert len(jobs) == 2 and {j.route for j in jobs} == {RouteState.serving}
    (route,) = world.steps(op.id or 0, StepAction.route)
    assert (route.job_id, route.host, route.route, set(route.targets)) == (
        proxy_job.id, proxy_job.host, RouteState.serving, {j.id for j in jobs})
    assert route.stage == max(st.stage for st in world.steps(op.id or 0))  # the last stage
    assert servers(config_of(world)) == expected_servers(world, jobs)


def test_without_a_proxy_a_routed_service_s_jobs_serve_once_the_operation_succeeds(world: World) -> None:
    op = world.code_service("web", scale=2)
    assert world.steps(op.id or 0, StepAction.route) == []
    assert {j.route for j in world.jobs("web")} == {RouteState.serving}


def test_a_proxy_started_later_serves_the_jobs_and_sites_there_are(routable: World) -> None:
    world = routable
    world.code_service("web", scale=2)
    assert requests.add_site(world.platform, env=ENV, site="app.example.com", service="web") is None
    add_proxy(world)
    config = config_of(world)
    assert servers(config) == expected_servers(world, world.jobs("web"))
    assert [s.name for s in config.sites] == ["app.example.com"]


def test_a_redeploy_takes_the_old_jobs_out_before_stopping_them_and_the_new_in_after(proxied: World) -> None:
    world = proxied
    world.code_service("web", scale=2)
    old = world.jobs("web")
    op = requests.request_push(world.platform, env=ENV, service="web", image=IMAGE_2)
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.succeeded
    new = world.jobs("web")
    assert {j.image for j in new} == {IMAGE_2} and {j.route for j in new} == {RouteState.serving}
    stages = {st.action: st.stage for st in world.steps(op.id or 0) if st.action != StepAction.route}
    assert route_stages(world, op.id or 0) == [
        (stages[StepAction.stop] - 1, RouteState.out, frozenset(j.id for j in old)),
        (stages[StepAction.start] + 1, RouteState.serving, frozenset(j.id for j in new)),
    ]
    assert {world.job(j.id).route for j in old} == {RouteState.out}
    assert servers(config_of(world)) == expected_servers(world, new)


def test_a_redeploy_with_overlap_drains_the_old_jobs_before_they_go(proxied: World) -> None:
    world = proxied
    world.code_service("web", scale=2)
    old = frozenset(j.id for j in world.jobs("web"))
    with world.platform.session() as s:
        s.exec(update(Service).where(col(Service.name) == "web").values(overlap=15))
        s.commit()
    op = requests.request_push(world.platform, env=ENV, service="web", image=IMAGE_2)
    chain = world.take_chain(op.id or 0)
    world.run_stages(chain, 4)  # check, start, serve new, drain old: the overlap's wait is next
    both = servers(config_of(world))
    assert {name for name, s in both.items() if s.draining} == old
    assert len(both) == 4 and {world.job(j).route for j in old} == {RouteState.draining}
    rest(world, chain, 4)
    assert world.operation(op.id or 0).state == OpState.succeeded
    new = world.jobs("web")
    assert route_stages(world, op.id or 0) == [
        (2, RouteState.serving, frozenset(j.id for j in new)),
        (3, RouteState.draining, old),
        (5, RouteState.out, old),
    ]
    assert [st.seconds for st in world.steps(op.id or 0, StepAction.wait)] == [15]
    assert servers(config_of(world)) == expected_servers(world, new)


def test_scale_down_takes_the_surplus_out_and_scale_up_takes_the_new_in(proxied: World) -> None:
    world = proxied
    world.code_service("web", scale=3)
    op = requests.request_scale(world.platform, env=ENV, service="web", scale=1)
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.succeeded
    (kept,) = world.jobs("web")
    gone = [j for j in world.jobs("web", states=[JobState.stopped])]
    assert len(gone) == 2 and {j.route for j in gone} == {RouteState.out}
    assert route_stages(world, op.id or 0) == [(0, RouteState.out, frozenset(j.id for j in gone))]
    assert servers(config_of(world)) == expected_servers(world, [kept])

    op = requests.request_scale(world.platform, env=ENV, service="web", scale=2)
    world.run_all()
    jobs = world.jobs("web")
    (added,) = [j for j in jobs if j.id != kept.id]
    assert route_stages(world, op.id or 0) == [(2, RouteState.serving, frozenset({added.id}))]
    assert servers(config_of(world)) == expected_servers(world, jobs)


def test_worker_jobs_never_enter_the_proxy(proxied: World) -> None:
    world = proxied
    world.code_service("web", scale=1)
    op = requests.request_worker_deploy(world.platform, env=ENV, service="web", target="queue", command="work")
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.succeeded
    assert world.steps(op.id or 0, StepAction.route) == []
    op = requests.request_push(world.platform, env=ENV, service="web", image=IMAGE_2)
    world.run_all()
    deploy = [j for j in world.jobs("web") if j.kind == JobKind.deploy]
    assert [len(world.jobs("web")), len(deploy)] == [2, 1]
    assert [targets for _, _, targets in route_stages(world, op.id or 0)][-1] == frozenset({deploy[0].id})
    assert set(servers(config_of(world))) == {deploy[0].id}


def test_a_health_path_reaches_the_proxy_with_the_next_redeploy(proxied: World) -> None:
    world = proxied
    world.code_service("web", scale=1)
    requests.set_health_path(world.platform, env=ENV, service="web", path="/healthz")
    (backend,) = config_of(world).backends
    assert backend.health_path is None  # the running jobs were started without it
    op = requests.request_push(world.platform, env=ENV, service="web", image=IMAGE_2)
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.succeeded
    (job,) = world.jobs("web")
    assert job.health_path == "/healthz"
    (backend,) = config_of(world).backends
    assert (backend.health_path, set(servers(config_of(world)))) == ("/healthz", {job.id})
    with pytest.raises(BadInput, match="a health path is for code services"):
        requests.set_health_path(world.platform, env=ENV, service=PROXY, path="/")


def test_new_jobs_that_fail_the_proxy_check_fail_the_push_and_a_revert_brings_the_last_release_back(
        proxied: World) -> None:
    world = proxied
    (proxy_job,) = world.jobs(PROXY)
    world.code_service("web", scale=2)
    ports = {j.port for j in world.jobs("web")}
    assert ports == {PORT_MIN}  # one job on each host, both on the first port of the range
    memory(world, proxy_job.host).failing.add(PORT_MIN + 1)  # where the next jobs will listen
    op = requests.request_push(world.platform, env=ENV, service="web", image=IMAGE_2)
    world.run_all()

    failed = world.operation(op.id or 0)
    assert failed.state == OpState.failed
    assert "did not pass the proxy's health check" in (failed.error or "")
    assert "Release 1 stays current." in (failed.error or "")
    pushed = [j for j in world.jobs("web", states=list(JobState)) if j.op_id == failed.id]
    assert len(pushed) == 2 and {j.port for j in pushed} == {PORT_MIN + 1}
    revert = world.operations("web")[-1]
    assert (revert.kind, revert.trigger, revert.state) == (OpKind.revert, OpTrigger.revert, OpState.succeeded)
    assert revert.parameters.failed_op == failed.id
    assert set(revert.parameters.jobs or ()) == {j.id for j in pushed}
    # Back on release 1, in the proxy; the pushed jobs went out before they stopped.
    jobs = world.jobs("web")
    assert len(jobs) == 2 and {(j.image, j.release, j.route) for j in jobs} == {(IMAGE, 1, RouteState.serving)}
    assert {(world.job(j.id).state, world.job(j.id).route) for j in pushed} == {(JobState.stopped, RouteState.out)}
    assert [(to, targets) for _, to, targets in route_stages(world, revert.id or 0)] == [
        (RouteState.serving, frozenset(j.id for j in jobs)), (RouteState.out, frozenset(j.id for j in pushed))]
    assert servers(config_of(world)) == expected_servers(world, jobs)
    assert world.service("web").release == 1


def test_with_overlap_new_jobs_that_fail_the_proxy_check_never_disturb_the_old_ones(proxied: World) -> None:
    world = proxied
    (proxy_job,) = world.jobs(PROXY)
    world.code_service("web", scale=2)
    old = world.jobs("web")
    with world.platform.session() as s:
        s.exec(update(Service).where(col(Service.name) == "web").values(overlap=15))
        s.commit()
    memory(world, proxy_job.host).failing.add(PORT_MIN + 1)
    op = requests.request_push(world.platform, env=ENV, service="web", image=IMAGE_2)
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.failed
    # The old jobs were never drained: the failure came before; the revert only stops the new ones.
    assert [st.route for st in world.steps(op.id or 0, StepAction.route) if st.state == "succeeded"] == []
    revert = world.operations("web")[-1]
    assert (revert.kind, revert.state) == (OpKind.revert, OpState.succeeded)
    assert [to for _, to, _ in route_stages(world, revert.id or 0)] == [RouteState.out]
    assert [j.id for j in world.jobs("web")] == [j.id for j in old]
    assert {world.job(j.id).route for j in old} == {RouteState.serving}
    assert servers(config_of(world)) == expected_servers(world, old)


def test_draining_a_host_serves_the_replacements_before_its_jobs_go_out(proxied: World) -> None:
    world = proxied
    world.code_service("web", scale=2)
    (leaving,) = [j for j in world.jobs("web") if j.host == "h2"]
    (op_id,) = fleet.drain(world.platform, host="h2")
    world.run_all()
    assert world.operation(op_id).state == OpState.succeeded
    jobs = world.jobs("web")
    assert {j.host for j in jobs} == {"h1"} and len(jobs) == 2
    (moved,) = [j for j in jobs if j.op_id == op_id]
    assert [(to, targets) for _, to, targets in route_stages(world, op_id)] == [
        (RouteState.serving, frozenset({moved.id})), (RouteState.out, frozenset({leaving.id}))]
    assert world.job(leaving.id).route == RouteState.out
    assert servers(config_of(world)) == expected_servers(world, jobs)


def test_a_crashing_push_is_reverted_into_the_proxy(proxied: World) -> None:
    world = proxied
    world.code_service("web", scale=2)
    op = requests.request_push(world.platform, env=ENV, service="web", image=CRASHING)
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.failed
    # The route step that would have taken the crashed jobs in never ran.
    assert [st.state for st in world.steps(op.id or 0, StepAction.route)][-1] == "skipped"
    jobs = world.jobs("web")
    assert len(jobs) == 2 and {(j.image, j.route) for j in jobs} == {(IMAGE, RouteState.serving)}
    assert servers(config_of(world)) == expected_servers(world, jobs)


def test_a_failed_first_push_leaves_the_proxy_with_no_server(proxied: World) -> None:
    world = proxied
    (proxy_job,) = world.jobs(PROXY)
    memory(world, proxy_job.host).failing.add(PORT_MIN)
    requests.add_service(world.platform, env=ENV, name="web", type=ServiceType.code, image=None, command="serve",
                         scale=2, size="s")
    op = requests.request_push(world.platform, env=ENV, service="web", image=IMAGE)
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.failed
    revert = world.operations("web")[-1]
    assert (revert.kind, revert.state) == (OpKind.revert, OpState.succeeded)
    assert world.jobs("web") == []
    assert servers(config_of(world)) == {}


def test_a_redeploy_of_the_proxy_starts_the_new_proxy_job_first_and_later_routes_go_to_it(proxied: World) -> None:
    world = proxied
    world.code_service("web", scale=1)
    (old,) = world.jobs(PROXY)
    op = requests.request_redeploy(world.platform, env=ENV, service=PROXY)
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.succeeded
    # No image check: the host runs the proxy's image already (the old proxy job does).
    assert [{st.action for st in world.steps(op.id or 0) if st.stage == i} for i in range(2)] == [
        {StepAction.start_proxy}, {StepAction.stop}]
    (new,) = world.jobs(PROXY)
    assert new.id != old.id
    assert old.id not in memory(world, old.host).configs  # its files went with it
    assert servers(config_of(world, new)) == expected_servers(world, world.jobs("web"))

    op = requests.request_push(world.platform, env=ENV, service="web", image=IMAGE_2)
    world.run_all()
    assert {st.job_id for st in world.steps(op.id or 0, StepAction.route)} == {new.id}
    assert servers(config_of(world, new)) == expected_servers(world, world.jobs("web"))


def test_a_heartbeat_brings_a_proxy_in_line_with_the_catalogue(proxied: World) -> None:
    world = proxied
    world.code_service("web", scale=1)
    (proxy_job,) = world.jobs(PROXY)
    with world.platform.session() as s:  # a change no operation took to the proxy
        env, svc = catalogue.get_service(session=s, env=ENV, name="web")
        catalogue.add_site(session=s, env=env, name="late.example.com", service=svc)
        s.commit()
    assert config_of(world).sites == ()
    world.beat("h2" if proxy_job.host == "h1" else "h1")  # another host's beat leaves it alone
    assert config_of(world).sites == ()
    world.beat(proxy_job.host)
    assert [s.name for s in config_of(world).sites] == ["late.example.com"]


def test_a_job_a_failed_heal_started_ends_up_in_the_proxy(proxied: World) -> None:
    """A heal (or host-lost recover) is not reverted: the jobs it did start passed their start,
    so they serve (the next beat takes them into the proxy), and the next heal adds the rest."""
    world = proxied
    world.code_service("web", scale=2)
    for job in world.jobs("web"):  # both containers vanish outside the platform
        world.runtimes[job.host].stop(job.container_name, timeout=0)
    world.beat("h1")
    world.beat("h2")
    world.runtimes["h2"].crashing.add(IMAGE)  # the heal's job on h2 crashes, the one on h1 runs
    world.watch()
    world.run_all()
    heal = world.operations("web")[-1]
    if (heal.kind, heal.trigger, heal.state) != (OpKind.recover, OpTrigger.heal, OpState.failed):
        raise RuntimeError(f"expected a failed heal, got {heal}")  # not the failure this test shows
    (survivor,) = world.jobs("web")
    assert (survivor.host, survivor.route) == ("h1", RouteState.serving)
    world.beat("h1")
    world.beat("h2")
    assert set(servers(config_of(world))) == {survivor.id}

    world.runtimes["h2"].crashing.discard(IMAGE)
    with world.platform.session() as s:  # its back-off has passed: heal again
        s.exec(update(Service).values(heal_after=None))
        s.commit()
    world.watch()
    world.run_all()
    jobs = world.jobs("web")
    if len(jobs) != 2 or world.operations("web")[-1].state != OpState.succeeded:
        raise RuntimeError("expected the second heal to bring the service back to scale")
    assert world.job(survivor.id).route == RouteState.serving, "the survivor never enters the proxy"
    assert servers(config_of(world)) == expected_servers(world, jobs)


def test_the_world_deploys_a_proxy_through_its_start_proxy_step(world: World) -> None:
    op = requests.add_service(world.platform, env=ENV, name=PROXY, type=ServiceType.service_proxy, image=IMAGE,
                              command=None, scale=1, size="xs")
    assert op is not None
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.succeeded
    (job,) = world.jobs(PROXY)
    assert (job.state, job.port, job.route) == (JobState.running, None, RouteState.serving)
    assert [st.action for st in world.steps(op.id or 0)] == [StepAction.check_image, StepAction.start_proxy]
    assert memory(world, job.host).ready(job.id)
    config = config_of(world, job)
    assert (config.backends, config.sites, config.bind) == ((), (), f"addr-{job.host}")


# --- proxy ports of environments --------------------------------------------------------------------


def env_ports(world: World, name: str) -> tuple[int | None, int | None]:
    with world.platform.reader() as s:
        env = catalogue.get_env(session=s, name=name)
        return env.http_port, env.https_port


def env_names(world: World) -> set[str]:
    with world.platform.reader() as s:
        return {e.name for e in s.exec(select(Environment))}


def take_ports(world: World, env: str) -> None:
    """The World's environment gets a proxy, and with it the first proxy ports."""
    requests.add_service(world.platform, env=env, name=PROXY, type=ServiceType.service_proxy, image=IMAGE,
                         command=None, scale=1, size="xs")


def test_a_new_environment_takes_the_lowest_free_proxy_ports(world: World) -> None:
    take_ports(world, ENV)
    assert env_ports(world, ENV) == (30000, 30001)
    # No proxy (no included services) and no ports asked for: no ports taken.
    assert requests.create_env(world.platform, name="f", sandbox=True, defaults=False) == []
    assert env_ports(world, "f") == (None, None)
    requests.create_env(world.platform, name="g", sandbox=True, defaults=False, https_port=30004)
    assert env_ports(world, "g") == (30002, 30004)
    requests.create_env(world.platform, name="h", sandbox=True, defaults=False, http_port=8080, https_port=8443)
    assert env_ports(world, "h") == (8080, 8443)
    take_ports(world, "f")
    assert env_ports(world, "f") == (30003, 30005)


@pytest.mark.parametrize(("ports", "refusal"), [
    ({"http_port": 30000}, "--http-port 30000 is taken by another environment's proxy"),
    ({"https_port": 30001}, "--https-port 30001 is taken by another environment's proxy"),
    ({"https_port": 30000}, "--https-port 30000 is taken by another environment's proxy"),
    ({"http_port": PORT_MIN + 50}, f"--http-port {PORT_MIN + 50} is in the range jobs take their ports from"),
    ({"https_port": PORT_MIN}, f"--https-port {PORT_MIN} is in the range jobs take their ports from"),
    ({"http_port": 31000, "https_port": 31000}, "--http-port and --https-port must differ"),
    ({"http_port": 80}, "--http-port must be a port from 1024 to 65535"),
])
def test_a_refused_proxy_port_creates_no_environment(world: World, ports: dict[str, int], refusal: str) -> None:
    take_ports(world, ENV)
    with pytest.raises(BadInput, match=refusal):
        requests.create_env(world.platform, name="f", sandbox=True, defaults=False, **ports)
    assert env_names(world) == {ENV}


def test_assign_proxy_ports_keeps_an_environment_s_own_ports_and_says_when_none_are_left(world: World) -> None:
    with world.platform.session() as s:
        env = catalogue.get_env(session=s, name=ENV)
        # Asking again for its own ports is no clash with itself.
        catalogue.assign_proxy_ports(session=s, env=env, http_port=30000, https_port=30001,
                                     job_ports=(PORT_MIN, PORT_MIN + 99), proxy_ports=(30000, 30999))
        assert (env.http_port, env.https_port) == (30000, 30001)
        other = catalogue.create_env(session=s, name="f", sandbox=True)
        with pytest.raises(BadInput, match="no free proxy ports left in 30000-30002"):
            catalogue.assign_proxy_ports(session=s, env=other, http_port=None, https_port=None,
                                         job_ports=(PORT_MIN, PORT_MIN + 99), proxy_ports=(30000, 30002))
        s.rollback()
    assert env_names(world) == {ENV}


def test_job_rows_of_routed_services_start_pending_until_they_are_taken_in(proxied: World) -> None:
    world = proxied
    requests.add_service(world.platform, env=ENV, name="web", type=ServiceType.code, image=None, command="serve",
                         scale=1, size="s")
    op = requests.request_push(world.platform, env=ENV, service="web", image=IMAGE)
    chain = world.take_chain(op.id or 0)
    world.run_stages(chain, 2)  # checked and started, not yet in the proxy
    (job,) = world.jobs("web")
    assert (job.state, job.route) == (JobState.running, RouteState.pending)
    with world.platform.reader() as s:  # what any proxy would be brought to now: no server yet
        wanted = catalogue.proxy_config(session=s, env=catalogue.get_env(session=s, name=ENV), bind="b")
    assert servers(wanted) == {}
    with world.platform.reader() as s:  # the proxy's job is serving: it is no routed job
        assert {j.route for j in s.exec(select(Job).where(Job.service_id == world.service(PROXY).id))} == {
            RouteState.serving}
    rest(world, chain, 2)
    assert world.operation(op.id or 0).state == OpState.succeeded
    assert world.job(job.id).route == RouteState.serving
    assert set(servers(config_of(world))) == {job.id}
