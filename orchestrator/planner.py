"""PURE planning: (desired spec, observed jobs, hosts) -> a Plan of frozen steps.

Nothing here talks to Docker, Redis or the database; dispatch executes what this returns.
A plan is a sequence of stages run one after the other; the steps inside a stage run in parallel.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from orchestrator.models import JobKind, RouteState
from orchestrator.names import container_name
from orchestrator.placement import Chooser, HostLoad, free_port
from orchestrator.sizes import Size


class PlanError(Exception):
    """The wanted state cannot be planned (no host fits, no free port, nothing to run)."""


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    command: str
    scale: int


@dataclass(frozen=True)
class ProxyJob:
    """A running job of the environment's service proxy: route changes go to each."""

    id: str
    host: str


@dataclass(frozen=True)
class BuildSpec:
    """A push of a source: build it before anything else."""

    source_id: int
    push: bool  # to the platform's registry: built on one host, pulled by the others


@dataclass(frozen=True)
class ServiceSpec:
    env: str
    name: str
    type: str
    image: str
    command: str | None
    size_name: str
    size: Size
    scale: int
    overlap: int = 0
    variables: Mapping[str, str] = field(default_factory=dict)
    release: int | None = None
    workers: tuple[WorkerSpec, ...] = ()
    volume: str | None = None  # "name:/mount/path" of the data volume of deploy jobs
    port: int | None = None  # databases and caches keep one port, so connection URLs stay true
    pinned_host: str | None = None  # databases live where their volume is
    args: tuple[str, ...] = ()  # flags for the image's own entrypoint (databases, caches)
    has_port: bool = True  # deploy jobs get a port (and PORT); worker jobs never do
    extra_ports: tuple[str, ...] = ()  # deploy jobs also hold PORT+1, ... named by these variables
    routed: bool = False  # its deploy jobs serve sites through the proxy (code services)
    start_first: bool = False  # a redeploy starts new jobs before stopping old ones (the proxy)
    proxies: tuple[ProxyJob, ...] = ()  # the environment's running proxy jobs
    build: BuildSpec | None = None  # the release's image is built from a pushed source first


@dataclass(frozen=True)
class ObservedJob:
    """A job the catalogue says is active, oldest first in the lists the planner gets."""

    id: str
    kind: JobKind
    target: str | None
    host: str
    port: int | None = None
    size: Size | None = None  # None: the spec's size


@dataclass(frozen=True)
class WantedJob:
    """A job the plan must start: what kind, which worker target, what command."""

    kind: JobKind
    target: str | None
    command: str | None


@dataclass(frozen=True)
class NewJob:
    id: str
    kind: JobKind
    target: str | None
    host: str
    port: int | None
    image: str
    command: str | None
    size_name: str
    size: Size
    release: int | None
    container_name: str
    environment: tuple[tuple[str, str], ...]
    volume: str | None = None
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckImage:
    """The image is on the host, or pulled there (before anything stops)."""

    host: str
    image: str


@dataclass(frozen=True)
class Build:
    """Build the image from a pushed source on a host (and push it to the registry)."""

    host: str
    source_id: int
    image: str
    push: bool


@dataclass(frozen=True)
class StartJob:
    job: NewJob


@dataclass(frozen=True)
class StopJob:
    job_id: str
    host: str


@dataclass(frozen=True)
class Wait:
    seconds: int


@dataclass(frozen=True)
class Route:
    """On one proxy job: take ``jobs`` in (serving: once they pass the proxy's health check),
    drain them, or let them go (out: drained, then removed). With no jobs: bring the proxy in
    line with the catalogue (sites, certificates)."""

    proxy: str
    host: str
    jobs: tuple[str, ...]
    to: RouteState | None


@dataclass(frozen=True)
class DeleteVolume:
    host: str
    volume: str


@dataclass(frozen=True)
class RunOnce:
    """A one-off container of the service on a host: it runs until it exits."""

    host: str


@dataclass(frozen=True)
class Exec:
    """A command in a running job's container."""

    host: str
    job_id: str


Step = CheckImage | Build | StartJob | StopJob | Wait | Route | DeleteVolume | RunOnce | Exec


@dataclass(frozen=True)
class Plan:
    stages: tuple[tuple[Step, ...], ...] = ()

    @property
    def steps(self) -> tuple[Step, ...]:
        return tuple(step for stage in self.stages for step in stage)


@dataclass(frozen=True)
class PortRange:
    low: int = 20000
    high: int = 29999


def job_environment(spec: ServiceSpec, job_id: str, kind: JobKind, target: str | None,
                    host: str, port: int | None) -> dict[str, str]:
    """User variables, then the automatic ones, which win: the platform owns PORT and ORCH_*."""
    env = dict(spec.variables)
    env.update(
        ORCH_ENV=spec.env,
        ORCH_SERVICE=spec.name,
        ORCH_JOB=job_id,
        ORCH_KIND=kind,
        ORCH_HOST=host,
    )
    if spec.release is not None:
        env["ORCH_RELEASE"] = str(spec.release)
    if target is not None:
        env["ORCH_TARGET"] = target
    if port is not None:
        env["PORT"] = str(port)
        env.update((name, str(port + i)) for i, name in enumerate(spec.extra_ports, 1))
    return env


class _Placer:
    """Places new jobs one by one, keeping the load and ports it has handed out."""

    def __init__(self, hosts: Sequence[HostLoad], service_jobs: Iterable[str], ports: PortRange):
        self.hosts = {h.name: h for h in hosts}
        self.service_jobs = Counter(service_jobs)
        self.ports = ports
        self.chooser = Chooser(self.hosts, self.service_jobs)  # choose_host, without a scan per job

    def place(self, size: Size, needs_port: bool, *, host: str | None = None,
              port: int | None = None, span: int = 1) -> tuple[str, int | None]:
        if host is not None:
            pinned = self.hosts.get(host)
            if pinned is None or not pinned.schedulable:
                raise PlanError(f"this service's data lives on host {host}, which is not up")
            chosen: str | None = host
        else:
            chosen = self.chooser.choose(size)
        if chosen is None:
            raise PlanError(f"no up host has room for a job of {size.memory_mb}m/{size.cpus} CPU")
        if needs_port and port is None:
            port = free_port(self.hosts[chosen].used_ports, self.ports.low, self.ports.high, span=span)
            if port is None:
                raise PlanError(f"host {chosen} has no free port in {self.ports.low}-{self.ports.high}")
        if not needs_port:
            port = None
        self.hosts[chosen] = self.hosts[chosen].with_job(size, port, span)
        if port is not None and self.hosts[chosen].address:
            # Hosts on one address (several daemons on one machine) share its ports.
            held = set(range(port, port + span))
            for name, other in self.hosts.items():
                if name != chosen and other.address == self.hosts[chosen].address:
                    self.hosts[name] = replace(other, used_ports=other.used_ports | held)
        self.service_jobs[chosen] += 1
        self.chooser.changed(chosen)
        return chosen, port


def _new_jobs(spec: ServiceSpec, wanted: Sequence[WantedJob], placer: _Placer,
              new_id: Callable[[], str]) -> list[NewJob]:
    jobs = []
    for want in wanted:
        kind, target, command = want.kind, want.target, want.command
        deploy = kind == JobKind.deploy
        needs_port = deploy and spec.has_port
        host, port = placer.place(spec.size, needs_port,
                                  host=spec.pinned_host if deploy else None,
                                  port=spec.port if deploy else None, span=1 + len(spec.extra_ports))
        job_id = new_id()
        env = job_environment(spec, job_id, kind, target, host, port)
        jobs.append(NewJob(
            id=job_id, kind=kind, target=target, host=host, port=port, image=spec.image,
            command=command, size_name=spec.size_name, size=spec.size, release=spec.release,
            container_name=container_name(spec.env, spec.name, job_id),
            environment=tuple(sorted(env.items())),
            volume=spec.volume if deploy else None,
            args=tuple(a.replace("{port}", str(port)) for a in spec.args)
            if deploy and command is None else (),
        ))
    return jobs


def _wanted_jobs(spec: ServiceSpec) -> list[WantedJob]:
    wanted = [WantedJob(JobKind.deploy, None, spec.command)] * spec.scale
    for worker in spec.workers:
        wanted += [WantedJob(JobKind.worker, worker.name, worker.command)] * worker.scale
    return wanted


def _builds(spec: ServiceSpec, jobs: Sequence[NewJob], placer_hosts: Sequence[HostLoad]) -> tuple[Step, ...]:
    """Build on the first host the new jobs go to, then push to the registry (the other hosts
    pull it); with no registry, on every host they go to. With no new job (scale 0), on the
    first up host: the release is built all the same."""
    assert spec.build is not None
    hosts = sorted({j.host for j in jobs}) or [h.name for h in sorted(placer_hosts, key=lambda h: h.name)
                                                 if h.schedulable][:1]
    if not hosts:
        raise PlanError("no up host to build the pushed source on")
    b = spec.build
    return tuple(Build(h, b.source_id, spec.image, b.push) for h in (hosts[:1] if b.push else hosts))


def _check_images(image: str, jobs: Iterable[NewJob], hosts: Sequence[HostLoad]) -> tuple[Step, ...]:
    """The image checked (pulled if missing) on each host the new jobs go to, before anything
    stops; not on a host where a running job already runs it (Docker keeps an image a container
    uses): a redeploy of the same image, or one more service of it, checks nothing twice."""
    there = {h.name for h in hosts if image in h.images}
    return tuple(CheckImage(host, image) for host in sorted({j.host for j in jobs} - there))


def plan_redeploy(spec: ServiceSpec, jobs: Sequence[ObservedJob], hosts: Sequence[HostLoad],
                  new_id: Callable[[], str], ports: PortRange = PortRange()) -> Plan:
    """Replace every active deploy and worker job with new ones from the current spec.

    The image is checked on every host first, so a missing image fails before anything stops.
    Without overlap: stop the old jobs, then start the new ones (short downtime). With overlap:
    start the new jobs, wait ``spec.overlap`` seconds, then stop the old ones (no downtime).
    A deploy is a redeploy with nothing to replace.
    """
    overlap = (spec.overlap > 0 or spec.start_first) and bool(jobs)
    # Without overlap the old jobs are gone before the new ones start: their room is free again.
    # With it they still hold their room, but they count for nothing in the spread: they go.
    kept = jobs if overlap else []
    placer = _Placer(_hosts_with(hosts, kept, spec.size, jobs), [], ports)
    new = _new_jobs(spec, _wanted_jobs(spec), placer, new_id)
    if not new and not jobs and spec.build is None:
        return Plan()
    check = _check_images(spec.image, new, hosts)
    starts = tuple(StartJob(j) for j in new)
    stops = tuple(StopJob(j.id, j.host) for j in jobs)
    serve, old = _routes(spec, new, RouteState.serving), _deploy_ids(jobs)
    stages: list[tuple[Step, ...]] = [_builds(spec, new, hosts)] if spec.build else []
    stages += [check] if check else []
    if overlap:
        # New jobs pass and enter the proxy, old ones drain for the overlap, leave, then stop.
        wait = (Wait(spec.overlap),) if spec.overlap > 0 else ()
        stages += [starts, serve, _routes(spec, old, RouteState.draining), wait,
                   _routes(spec, old, RouteState.out), stops]
    else:
        stages += [_routes(spec, old, RouteState.out), stops, starts, serve]
    return Plan(tuple(s for s in stages if s))


def plan_scale(spec: ServiceSpec, jobs: Sequence[ObservedJob], hosts: Sequence[HostLoad],
               new_id: Callable[[], str], *, kind: JobKind, target: str | None, scale: int,
               ports: PortRange = PortRange()) -> Plan:
    """Bring the jobs of one kind (deploy, or one worker target) to ``scale`` (checked by the
    request, see ``rules.check_scale``): start only the extra jobs, or stop only the surplus
    (from the hosts holding most of them, newest first)."""
    mine = [j for j in jobs if j.kind == kind and j.target == target]
    if scale > len(mine):
        command = spec.command
        if kind == JobKind.worker:
            command = next((w.command for w in spec.workers if w.name == target), None)
            if command is None:
                raise PlanError(f"service {spec.name} has no worker target {target}")
        placer = _Placer(_hosts_with(hosts, jobs, spec.size, jobs), [j.host for j in jobs], ports)
        wanted = [WantedJob(kind, target, command)] * (scale - len(mine))
        new = _new_jobs(spec, wanted, placer, new_id)
        return _plan(_check_images(spec.image, new, hosts), tuple(StartJob(j) for j in new),
                     _routes(spec, new, RouteState.serving))
    draining = {h.name for h in hosts if not h.schedulable}
    surplus = _pick_surplus(mine, len(mine) - scale, draining)
    # Surplus jobs leave the proxy (drained first) before they stop.
    return _plan(_routes(spec, _deploy_ids(surplus), RouteState.out),
                 tuple(StopJob(j.id, j.host) for j in surplus))


def plan_recover(spec: ServiceSpec, jobs: Sequence[ObservedJob], hosts: Sequence[HostLoad],
                 new_id: Callable[[], str], ports: PortRange = PortRange()) -> Plan:
    """Start what the service lacks to be back at its scale (deploy jobs and every worker
    target), e.g. after a host was lost; stops nothing."""
    have = Counter((j.kind, j.target) for j in jobs)
    wanted = [WantedJob(JobKind.deploy, None, spec.command)] * max(0, spec.scale - have[(JobKind.deploy, None)])
    for worker in spec.workers:
        missing = max(0, worker.scale - have[(JobKind.worker, worker.name)])
        wanted += [WantedJob(JobKind.worker, worker.name, worker.command)] * missing
    if not wanted:
        return Plan()
    placer = _Placer(_hosts_with(hosts, jobs, spec.size, jobs), [j.host for j in jobs], ports)
    new = _new_jobs(spec, wanted, placer, new_id)
    return _plan(_check_images(spec.image, new, hosts), tuple(StartJob(j) for j in new),
                 _routes(spec, new, RouteState.serving))


def plan_revert(spec: ServiceSpec, jobs: Sequence[ObservedJob], hosts: Sequence[HostLoad],
                new_id: Callable[[], str], *, failed: Iterable[str], restart: bool = True,
                ports: PortRange = PortRange()) -> Plan:
    """After a failed operation: the jobs it started (``failed``) leave the proxy and stop and,
    with ``restart``, the service is brought back to its scale from its current (restored)
    spec, new jobs in the proxy before the failed ones go."""
    gone = set(failed)
    leaving = [j for j in jobs if j.id in gone]
    staying = [j for j in jobs if j.id not in gone]
    back = plan_recover(spec, staying, hosts, new_id, ports) if restart else Plan()
    return _plan(*back.stages, _routes(spec, _deploy_ids(leaving), RouteState.out),
                 tuple(StopJob(j.id, j.host) for j in leaving))


def plan_remove(spec: ServiceSpec, jobs: Sequence[ObservedJob], *, delete_data: bool) -> Plan:
    """Every job leaves the proxy (drained) and stops; with ``delete_data``, then the data
    volume goes (on the host that holds it)."""
    volume = spec.volume.split(":", 1)[0] if spec.volume else None
    host = spec.pinned_host
    delete = (DeleteVolume(host, volume),) if delete_data and volume and host else ()
    return _plan(_routes(spec, _deploy_ids(jobs), RouteState.out),
                 tuple(StopJob(j.id, j.host) for j in jobs), delete)


def plan_run(spec: ServiceSpec, hosts: Sequence[HostLoad]) -> Plan:
    """A one-off container placed like a job of the service (its size counts), its image
    checked (pulled) there first."""
    host, _ = _Placer(hosts, [], PortRange()).place(spec.size, needs_port=False)
    return Plan(((CheckImage(host, spec.image),), (RunOnce(host),)))


def plan_exec(jobs: Sequence[ObservedJob], job_id: str | None) -> Plan:
    """In the job asked for, or in the service's first deploy job."""
    chosen = next((j for j in jobs if j.id == job_id), None) if job_id else \
        next((j for j in jobs if j.kind == JobKind.deploy), jobs[0] if jobs else None)
    if chosen is None:
        raise PlanError(f"no running job {job_id}" if job_id else "the service runs no job")
    return Plan(((Exec(chosen.host, chosen.id),),))


def plan_routes(spec: ServiceSpec) -> Plan:
    """Every proxy job brought in line with the catalogue (a site or certificate changed)."""
    return _plan(tuple(Route(p.id, p.host, (), None) for p in spec.proxies))


def plan_move(spec: ServiceSpec, jobs: Sequence[ObservedJob], hosts: Sequence[HostLoad],
              new_id: Callable[[], str], *, away_from: str, ports: PortRange = PortRange()) -> Plan:
    """Move every job off host ``away_from`` (a drain): start each one's replacement elsewhere
    first, then stop it, so the service never drops below its scale."""
    leaving = [j for j in jobs if j.host == away_from]
    if not leaving:
        return Plan()
    if spec.pinned_host == away_from:
        raise PlanError(f"service {spec.name} keeps its data on host {away_from}: move it by hand")
    staying = [j for j in jobs if j.host != away_from]
    commands = {w.name: w.command for w in spec.workers}
    wanted = [WantedJob(j.kind, j.target,
                        commands.get(j.target or "") if j.kind == JobKind.worker else spec.command)
              for j in leaving]
    candidates = [h for h in hosts if h.name != away_from]
    placer = _Placer(_hosts_with(candidates, jobs, spec.size, jobs), [j.host for j in staying], ports)
    new = _new_jobs(replace(spec, pinned_host=None, port=None), wanted, placer, new_id)
    return _plan(_check_images(spec.image, new, hosts), tuple(StartJob(j) for j in new),
                 _routes(spec, new, RouteState.serving),
                 _routes(spec, _deploy_ids(leaving), RouteState.out),
                 tuple(StopJob(j.id, j.host) for j in leaving))


def plan_stop(jobs: Sequence[ObservedJob], *, kind: JobKind, target: str | None) -> Plan:
    """Stop every active job of one kind/target (``worker rm``)."""
    stops = tuple(StopJob(j.id, j.host) for j in jobs if j.kind == kind and j.target == target)
    return Plan((stops,)) if stops else Plan()


def _plan(*stages: tuple[Step, ...]) -> Plan:
    """A plan of the stages that have steps."""
    return Plan(tuple(s for s in stages if s))


def _deploy_ids(jobs: Iterable[ObservedJob | NewJob]) -> list[str]:
    return [j.id for j in jobs if j.kind == JobKind.deploy]


def _routes(spec: ServiceSpec, jobs: Iterable[ObservedJob | NewJob] | list[str],
            to: RouteState) -> tuple[Step, ...]:
    """One route step per proxy job for the deploy jobs given (or their ids); none when the
    service serves no sites or no proxy runs (a proxy that starts later reads the catalogue)."""
    ids = tuple(j if isinstance(j, str) else j.id for j in jobs
                if isinstance(j, str) or j.kind == JobKind.deploy)
    if not spec.routed or not ids:
        return ()
    return tuple(Route(p.id, p.host, ids, to) for p in spec.proxies)


def _pick_surplus(jobs: Sequence[ObservedJob], count: int,
                  draining: frozenset[str] | set[str] = frozenset()) -> list[ObservedJob]:
    """Jobs on hosts that take no new work go first, then those on the fullest host, newest first."""
    remaining = list(jobs)
    picked: list[ObservedJob] = []
    for _ in range(count):
        per_host = Counter(j.host for j in remaining)
        host = max(per_host, key=lambda h: (h in draining, per_host[h], h))
        job = [j for j in remaining if j.host == host][-1]
        remaining.remove(job)
        picked.append(job)
    return picked


def _hosts_with(hosts: Sequence[HostLoad], kept: Sequence[ObservedJob], size: Size,
                all_jobs: Sequence[ObservedJob]) -> list[HostLoad]:
    """Host loads as given, minus the service's own jobs that the plan stops before it starts.

    ``hosts`` already count every active job, this service's included; ports of jobs that stop
    stay taken so a new job never reuses a port a stopping job may still hold."""
    kept_ids = {j.id for j in kept}
    freed_cpus: dict[str, float] = defaultdict(float)
    freed_mem: dict[str, int] = defaultdict(int)
    for j in all_jobs:
        if j.id not in kept_ids:
            freed_cpus[j.host] += (j.size or size).cpus
            freed_mem[j.host] += (j.size or size).memory_mb
    return [
        replace(h, used_cpus=max(0.0, h.used_cpus - freed_cpus[h.name]),
                used_memory_mb=max(0, h.used_memory_mb - freed_mem[h.name]))
        for h in hosts
    ]
