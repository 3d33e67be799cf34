"""Pushes that build: the pure source checks and names (orchestrator.builds), the planner's build
stages, and push-to-running flows on the inline dispatch and fake runtimes (with and without the
platform's registry)."""

from __future__ import annotations

import gzip
import io
import itertools
import re
import tarfile
from collections.abc import Callable
from dataclasses import replace

import pytest
from sqlmodel import Session, select

from orchestrator import builds, catalogue, requests
from orchestrator.builds import (
    LOCAL_REPOSITORY,
    PYTHON_BASE_IMAGE,
    image_name,
    parse_procfile,
    procfile_dockerfile,
    repository_of,
    source_from_tar,
)
from orchestrator.errors import BadInput
from orchestrator.models import (
    BuildSource,
    JobKind,
    JobState,
    OpKind,
    OpState,
    OpTrigger,
    Release,
    ReleaseState,
    ServiceType,
    StepAction,
    StepState,
)
from orchestrator.placement import HostLoad
from orchestrator.planner import (
    Build,
    BuildSpec,
    CheckImage,
    ObservedJob,
    Plan,
    PortRange,
    ServiceSpec,
    StartJob,
    StopJob,
    Wait,
    WorkerSpec,
    plan_redeploy,
)
from orchestrator.sizes import NAMED_SIZES
from tests.unit.world import ENV, IMAGE, World

REGISTRY = "reg:5000"
DOCKERFILE_APP = {"Dockerfile": "FROM orch/busybox:1\nCOPY www /www\n", "www/index.html": "hello\n"}
PROCFILE_APP = {
    "Procfile": "web: python3 app.py --port $PORT\n# a comment\nticker: python3 tick.py\n",
    "requirements.txt": "flask\n",
    "app.py": "print('app')\n",
}
DIGEST_IMAGE = re.compile(r"reg:5000/e/web@sha256:[0-9a-f]{64}")


def tar_of(files: dict[str, str | bytes], *, prefix: str = "", mode: str = "w") -> bytes:
    """A tar of a directory holding ``files`` (paths inside it -> contents)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tar:  # type: ignore[call-overload]
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def files_of(context: bytes) -> dict[str, bytes]:
    """The regular files of a tar (a build context), by name."""
    with tarfile.open(fileobj=io.BytesIO(context)) as tar:
        return {m.name: (tar.extractfile(m) or io.BytesIO()).read() for m in tar.getmembers() if m.isfile()}


# --- the source: Dockerfile, Procfile, neither --------------------------------------------------------


def test_a_dockerfile_source_is_built_as_it_is() -> None:
    data = tar_of({**DOCKERFILE_APP, "Procfile": "web: ignored\n"})
    source = source_from_tar(data)
    assert (source.kind, source.context, source.processes, source.web) == ("dockerfile", data, {}, None)


def test_a_dockerfile_under_dot_slash_counts() -> None:
    data = tar_of(DOCKERFILE_APP, prefix="./")
    assert source_from_tar(data).kind == "dockerfile"


def test_a_dockerfile_in_a_subdirectory_does_not_count() -> None:
    with pytest.raises(BadInput, match="neither a Dockerfile nor a Procfile"):
        source_from_tar(tar_of({"sub/Dockerfile": "FROM x\n", "app.py": ""}))


def test_a_procfile_source_gets_a_generated_dockerfile_and_its_processes() -> None:
    source = source_from_tar(tar_of(PROCFILE_APP))
    assert source.kind == "procfile"
    assert source.processes == {"web": "python3 app.py --port $PORT", "ticker": "python3 tick.py"}
    assert source.web == "python3 app.py --port $PORT"
    files = files_of(source.context)
    # The pushed files are all kept, and a Dockerfile is added.
    assert {k: v for k, v in files.items() if k != "Dockerfile"} == {k: v.encode() for k, v in PROCFILE_APP.items()}
    assert files["Dockerfile"] == procfile_dockerfile(True).encode()


def test_a_procfile_source_without_requirements_installs_nothing() -> None:
    source = source_from_tar(tar_of({"Procfile": "web: ./serve\n", "serve": "#!/bin/sh\n"}, prefix="./"))
    dockerfile = files_of(source.context)["Dockerfile"].decode()
    assert dockerfile == procfile_dockerfile(False)
    assert "pip" not in dockerfile and "requirements" not in dockerfile
    assert files_of(source.context)["./serve"] == b"#!/bin/sh\n"


def test_a_gzipped_tar_is_read_too() -> None:
    data = gzip.compress(tar_of(PROCFILE_APP))
    source = source_from_tar(data)
    assert source.kind == "procfile" and "Dockerfile" in files_of(source.context)


def test_a_source_with_neither_dockerfile_nor_procfile_is_refused() -> None:
    with pytest.raises(BadInput, match="neither a Dockerfile nor a Procfile"):
        source_from_tar(tar_of({"app.py": "print(1)\n", "README": "hi\n"}))


def test_a_source_with_an_empty_tar_is_refused() -> None:
    with pytest.raises(BadInput, match="neither a Dockerfile nor a Procfile"):
        source_from_tar(tar_of({}))


@pytest.mark.parametrize("data", [b"", b"not a tar at all", b"\x00" * 10, b"PK\x03\x04zipfile"])
def test_a_source_that_is_no_tar_is_refused(data: bytes) -> None:
    with pytest.raises(BadInput, match="not a readable tar"):
        source_from_tar(data)


def test_a_source_with_a_bad_procfile_is_refused() -> None:
    with pytest.raises(BadInput, match="Procfile line 2"):
        source_from_tar(tar_of({"Procfile": "web: ok\nthis is no process\n"}))


def test_a_source_over_the_limit_is_refused_before_it_is_read() -> None:
    data = tar_of(DOCKERFILE_APP)
    assert len(data) <= builds.MAX_SOURCE
    too_big = data + b"\x00" * (builds.MAX_SOURCE + 1 - len(data))
    with pytest.raises(BadInput, match=r"the source is 64 MiB: at most 64 MiB"):
        source_from_tar(too_big)
    exactly = data + b"\x00" * (builds.MAX_SOURCE - len(data))  # tar padding: still a tar
    assert source_from_tar(exactly).kind == "dockerfile"


def test_the_size_limit_is_read_at_each_call(monkeypatch: pytest.MonkeyPatch) -> None:
    data = tar_of(DOCKERFILE_APP)
    monkeypatch.setattr(builds, "MAX_SOURCE", len(data) - 1)
    with pytest.raises(BadInput, match="at most"):
        source_from_tar(data)


# --- the Procfile -------------------------------------------------------------------------------------


def test_procfile_lines_comments_and_blank_lines() -> None:
    text = ("# processes\n\nweb: gunicorn app:app -b 0.0.0.0:$PORT\n   \n  # indented comment\n"
            "worker:celery -A t worker\r\n")
    assert parse_procfile(text) == {"web": "gunicorn app:app -b 0.0.0.0:$PORT", "worker": "celery -A t worker"}


def test_procfile_names_are_lowered_and_underscores_become_hyphens() -> None:
    assert parse_procfile("Web: a\nslow_worker:  b  \n") == {"web": "a", "slow-worker": "b"}


@pytest.mark.parametrize("text", ["web: a\nweb: b\n", "web: a\nWEB: b\n", "a-b: x\na_b: y\n"])
def test_a_procfile_naming_a_process_twice_is_refused(text: str) -> None:
    with pytest.raises(BadInput, match="twice"):
        parse_procfile(text)


@pytest.mark.parametrize(("text", "line"), [
    ("web\n", 1),
    ("web:\n", 1),
    ("web:    \n", 1),
    ("# c\nweb: a\nweb app: b\n", 3),
    ("w.eb: a\n", 1),
    (": a\n", 1),
    ("x" * 64 + ": a\n", 1),
])
def test_a_procfile_line_that_is_no_process_is_refused_with_its_number(text: str, line: int) -> None:
    with pytest.raises(BadInput, match=f"Procfile line {line} is not `name: command`"):
        parse_procfile(text)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_a_procfile_naming_nothing_is_refused(text: str) -> None:
    with pytest.raises(BadInput, match="names no process"):
        parse_procfile(text)


def test_generated_dockerfile_copies_requirements_before_the_code() -> None:
    lines = procfile_dockerfile(True).splitlines()
    assert lines[0] == f"FROM {PYTHON_BASE_IMAGE}" == "FROM orch/python:3"
    requirements = lines.index("COPY requirements.txt /app/requirements.txt")
    pip = next(i for i, line in enumerate(lines) if line.startswith("RUN pip install") and "requirements.txt" in line)
    code = lines.index("COPY . /app")
    assert requirements < pip < code == len(lines) - 1
    assert "WORKDIR /app" in lines


def test_generated_dockerfile_without_requirements() -> None:
    assert procfile_dockerfile(False) == "FROM orch/python:3\nWORKDIR /app\nCOPY . /app\n"


# --- image names -------------------------------------------------------------------------------------


def test_image_names() -> None:
    assert image_name("127.0.0.1:5000", "shop", "web", 3) == "127.0.0.1:5000/shop/web:r3"
    assert image_name("reg:5000/", "shop", "web", 12) == "reg:5000/shop/web:r12"
    assert image_name("", "shop", "web", 1) == f"{LOCAL_REPOSITORY}/shop/web:r1" == "orch-build/shop/web:r1"


@pytest.mark.parametrize(("image", "repository"), [
    ("127.0.0.1:5000/a/b:r3", "127.0.0.1:5000/a/b"),
    ("127.0.0.1:5000/a/b", "127.0.0.1:5000/a/b"),
    ("reg:5000/e/web@sha256:" + "a" * 64, "reg:5000/e/web"),
    ("reg:5000/e/web:r2@sha256:" + "b" * 64, "reg:5000/e/web"),
    ("localhost:5000/web:r1", "localhost:5000/web"),
    ("orch-build/shop/web:r1", "orch-build/shop/web"),
    ("redis:7", "redis"),
    ("redis", "redis"),
    ("busybox@sha256:" + "c" * 64, "busybox"),
])
def test_repository_of_keeps_the_registry_port_and_drops_a_tag_or_digest(image: str, repository: str) -> None:
    assert repository_of(image) == repository


def test_a_built_image_name_is_an_image_reference_and_its_repository_round_trips() -> None:
    from orchestrator.rules import check_image_reference

    for registry in ("", "127.0.0.1:5000", "reg:5000"):
        name = image_name(registry, "shop", "web-2", 7)
        assert check_image_reference(name) == name
        assert repository_of(name) + ":r7" == name
        pinned = f"{repository_of(name)}@sha256:{'0' * 64}"
        assert check_image_reference(pinned) == pinned


# --- the planner: build stages -------------------------------------------------------------------------

PLAN_IMAGE = "reg:5000/shop/web:r3"
PORTS = PortRange(5000, 5099)


def make_spec(**changes: object) -> ServiceSpec:
    spec = ServiceSpec(
        env="shop", name="web", type="code", image=PLAN_IMAGE, command="serve",
        size_name="s", size=NAMED_SIZES["s"], scale=2, release=3, build=BuildSpec(9, push=True),
    )
    return replace(spec, **changes)  # type: ignore[arg-type]


def ids() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"n{next(counter)}"


def hosts(*names: str, **fields: object) -> list[HostLoad]:
    return [HostLoad(name=n, **fields) for n in names]  # type: ignore[arg-type]


def kinds(plan: Plan) -> list[set[type]]:
    return [{type(step) for step in stage} for stage in plan.stages]


def start_hosts(plan: Plan) -> set[str]:
    return {s.job.host for s in plan.steps if isinstance(s, StartJob)}


def test_with_push_one_build_on_the_first_host_then_the_image_is_checked_everywhere() -> None:
    plan = plan_redeploy(make_spec(scale=4), [], hosts("h3", "h2", "h1"), ids(), PORTS)
    assert plan.stages[0] == (Build("h1", 9, PLAN_IMAGE, True),)
    assert plan.stages[1] == tuple(CheckImage(h, PLAN_IMAGE) for h in ("h1", "h2", "h3"))
    assert kinds(plan) == [{Build}, {CheckImage}, {StartJob}]
    assert all(s.job.image == PLAN_IMAGE for s in plan.steps if isinstance(s, StartJob))


def test_without_push_one_build_on_every_host_the_jobs_go_to() -> None:
    spec = make_spec(scale=3, build=BuildSpec(9, push=False))
    plan = plan_redeploy(spec, [], hosts("h3", "h1", "h2"), ids(), PORTS)
    assert plan.stages[0] == tuple(Build(h, 9, PLAN_IMAGE, False) for h in ("h1", "h2", "h3"))
    assert kinds(plan) == [{Build}, {CheckImage}, {StartJob}]


def test_builds_go_only_to_hosts_that_get_a_job() -> None:
    full = HostLoad("h1", memory_mb=100)  # no room for a job: none goes there, no build either
    fleet = [full, HostLoad("h2"), HostLoad("h3"), HostLoad("h4", schedulable=False)]
    with_push = plan_redeploy(make_spec(scale=2), [], fleet, ids(), PORTS)
    assert start_hosts(with_push) == {"h2", "h3"}
    assert with_push.stages[0] == (Build("h2", 9, PLAN_IMAGE, True),)
    without = plan_redeploy(make_spec(scale=1, build=BuildSpec(9, push=False)), [], fleet, ids(), PORTS)
    (build,) = without.stages[0]
    assert isinstance(build, Build) and {build.host} == start_hosts(without)


def test_worker_jobs_count_for_the_hosts_built_on() -> None:
    spec = make_spec(scale=1, workers=(WorkerSpec("queue", "celery", 1),), build=BuildSpec(9, push=False))
    plan = plan_redeploy(spec, [], hosts("h1", "h2"), ids(), PORTS)
    assert start_hosts(plan) == {"h1", "h2"}
    assert {b.host for b in plan.stages[0] if isinstance(b, Build)} == {"h1", "h2"}


def test_a_build_comes_before_the_check_and_before_anything_stops() -> None:
    old = [ObservedJob("o1", JobKind.deploy, None, "h1"), ObservedJob("o2", JobKind.deploy, None, "h2")]
    plan = plan_redeploy(make_spec(), old, hosts("h1", "h2"), ids(), PORTS)
    assert kinds(plan) == [{Build}, {CheckImage}, {StopJob}, {StartJob}]
    overlapped = plan_redeploy(make_spec(overlap=5), old, hosts("h1", "h2"), ids(), PORTS)
    assert kinds(overlapped) == [{Build}, {CheckImage}, {StartJob}, {Wait}, {StopJob}]


def test_no_build_without_a_build_spec() -> None:
    plan = plan_redeploy(make_spec(build=None), [], hosts("h1"), ids(), PORTS)
    assert kinds(plan) == [{CheckImage}, {StartJob}]


def test_a_build_for_scale_zero_with_jobs_running_builds_on_the_first_up_host_and_stops_them() -> None:
    old = [ObservedJob("o1", JobKind.deploy, None, "h2")]
    plan = plan_redeploy(make_spec(scale=0), old, hosts("h2", "h1"), ids(), PORTS)
    assert kinds(plan) == [{Build}, {StopJob}]
    assert [s.host for s in plan.stages[0]] == ["h1"]


def test_a_build_for_scale_zero_with_nothing_running_still_builds_the_release() -> None:
    plan = plan_redeploy(make_spec(scale=0), [], hosts("h1"), ids(), PORTS)
    assert kinds(plan) == [{Build}]


# --- flows: push a source, build, run ------------------------------------------------------------------


@pytest.fixture
def registry_world(world: World) -> World:
    """The world with the platform's registry set, one registry its hosts share."""
    world.platform.settings = world.platform.settings.model_copy(update={"registry": REGISTRY})
    shared = world.runtimes["h1"].registry
    for runtime in world.runtimes.values():
        runtime.registry = shared
    return world


def add_code(world: World, name: str = "web", *, scale: int = 2) -> None:
    requests.add_service(world.platform, env=ENV, name=name, type=ServiceType.code, image=None,
                         command="serve", scale=scale, size="s")


def release(world: World, number: int, service: str = "web") -> Release:
    with world.platform.reader() as s:
        return catalogue.get_release(session=s, service=world.service(service), number=number)


def source_data(world: World, source_id: int) -> bytes:
    with world.platform.reader() as s:
        return catalogue.get_source(session=s, source_id=source_id).data


def sources(s: Session) -> list[int]:
    """The sizes of the stored sources."""
    return [b.size for b in s.exec(select(BuildSource))]


def stage_actions(world: World, op_id: int) -> list[set[StepAction]]:
    stages: dict[int, set[StepAction]] = {}
    for step in world.steps(op_id):
        stages.setdefault(step.stage, set()).add(step.action)
    return [stages[i] for i in sorted(stages)]


def containers_match(world: World, service: str = "web") -> bool:
    jobs = world.jobs(service)
    return all(j.state == JobState.running for j in jobs) and \
        world.all_containers(service) == {j.id: j.host for j in jobs}


def test_a_dockerfile_push_without_registry_builds_on_each_host_and_runs(world: World) -> None:
    add_code(world)
    data = tar_of(DOCKERFILE_APP)
    op = requests.request_push_source(world.platform, env=ENV, service="web", source=data)
    assert (op.kind, op.trigger, op.parameters.release) == (OpKind.deploy, OpTrigger.push, 1)
    rel = release(world, 1)
    assert (rel.state, rel.build, rel.image, rel.command) == (ReleaseState.building, "dockerfile",
                                                             "orch-build/e/web:r1", None)
    assert op.parameters.source_id == rel.source_id and source_data(world, rel.source_id or 0) == data
    world.run_all()
    done = world.operation(op.id or 0)
    assert (done.state, done.error) == (OpState.succeeded, None)
    assert stage_actions(world, op.id or 0) == [{StepAction.build}, {StepAction.check_image}, {StepAction.start}]
    built = world.steps(op.id or 0, StepAction.build)
    assert sorted(st.host for st in built) == ["h1", "h2"]
    for st in built:
        assert st.state == StepState.succeeded and st.source_id == rel.source_id
        assert st.name == f"build orch-build/e/web:r1 on {st.host}"
        assert st.output is not None and "Successfully tagged orch-build/e/web:r1" in st.output
    assert all("orch-build/e/web:r1" in world.runtimes[h].images for h in ("h1", "h2"))
    assert release(world, 1).state == ReleaseState.succeeded
    svc = world.service("web")
    assert (svc.release, svc.image) == (1, "orch-build/e/web:r1")
    assert {(j.image, j.command, j.release) for j in world.jobs("web")} == {("orch-build/e/web:r1", "serve", 1)}
    assert containers_match(world)


def test_a_dockerfile_push_with_a_registry_builds_once_and_the_other_host_pulls(registry_world: World) -> None:
    world = registry_world
    add_code(world)
    op = requests.request_push_source(world.platform, env=ENV, service="web", source=tar_of(DOCKERFILE_APP))
    tag = "reg:5000/e/web:r1"
    assert release(world, 1).image == tag and release(world, 1).state == ReleaseState.building
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.succeeded
    (built,) = world.steps(op.id or 0, StepAction.build)
    assert (built.host, built.stage, built.state) == ("h1", 0, StepState.succeeded)
    assert built.name == f"build {tag} on h1, pushed to reg:5000"
    assert built.output is not None and "Successfully tagged" in built.output and "digest: sha256:" in built.output
    checks = world.steps(op.id or 0, StepAction.check_image)
    assert sorted((st.host, st.stage, st.image) for st in checks) == [("h1", 1, tag), ("h2", 1, tag)]
    assert tag in world.runtimes["h2"].images  # pulled, not built: h2 ran no build
    assert tag in world.runtimes["h1"].registry
    # The release (and the service, whose current release it is) is recorded by digest.
    rel = release(world, 1)
    assert rel.state == ReleaseState.succeeded and DIGEST_IMAGE.fullmatch(rel.image)
    assert world.service("web").image == rel.image
    assert rel.image in world.runtimes["h1"].registry
    assert {j.host for j in world.jobs("web")} == {"h1", "h2"} and containers_match(world)
    # A redeploy runs the release by digest: h2 pulls that too.
    again = requests.request_redeploy(world.platform, env=ENV, service="web")
    world.run_all()
    assert world.operation(again.id or 0).state == OpState.succeeded
    assert world.steps(again.id or 0, StepAction.build) == []
    assert {j.image for j in world.jobs("web")} == {rel.image}
    assert rel.image in world.runtimes["h2"].images and containers_match(world)


@pytest.mark.parametrize("app", [DOCKERFILE_APP, PROCFILE_APP], ids=["dockerfile", "procfile"])
def test_the_same_source_pushed_twice_is_stored_once(world: World, app: dict[str, str | bytes]) -> None:
    add_code(world, scale=1)
    data = tar_of(app)
    first = requests.request_push_source(world.platform, env=ENV, service="web", source=data)
    world.run_all()
    second = requests.request_push_source(world.platform, env=ENV, service="web", source=data, commit="a" * 40)
    world.run_all()
    assert second.kind == OpKind.redeploy
    assert first.parameters.source_id == second.parameters.source_id is not None
    with world.platform.reader() as s:
        assert sources(s) == [len(source_from_tar(data).context)]
    assert (release(world, 2).commit, release(world, 2).image) == ("a" * 40, "orch-build/e/web:r2")
    assert world.operation(second.id or 0).state == OpState.succeeded
    assert {j.image for j in world.jobs("web")} == {"orch-build/e/web:r2"}


@pytest.mark.parametrize("commit", ["abc", "A" * 40, "g" * 40, "a" * 41])
def test_a_push_with_a_bad_commit_is_refused_and_records_nothing(world: World, commit: str) -> None:
    add_code(world)
    with pytest.raises(BadInput, match="not a git object name"):
        requests.request_push_source(world.platform, env=ENV, service="web", source=tar_of(DOCKERFILE_APP),
                                     commit=commit)
    assert world.operations("web") == []
    with world.platform.reader() as s:
        assert catalogue.list_releases(session=s, service=world.service("web")) == []
        assert sources(s) == []


def test_a_source_pushed_to_a_database_is_refused_and_nothing_is_stored(world: World) -> None:
    requests.add_service(world.platform, env=ENV, name="db", type=ServiceType.postgresql, image="postgres:16",
                         command=None, scale=1, size="s")
    world.run_all()
    with pytest.raises(BadInput, match="only code services take pushes"):
        requests.request_push_source(world.platform, env=ENV, service="db", source=tar_of(DOCKERFILE_APP))
    with world.platform.reader() as s:
        assert sources(s) == []


@pytest.mark.parametrize("registry", ["", REGISTRY])
def test_a_failing_build_fails_the_push_and_touches_nothing(world: World, registry: str) -> None:
    if registry:
        world.platform.settings = world.platform.settings.model_copy(update={"registry": registry})
    world.code_service("web", scale=2)
    old = {j.id: j.host for j in world.jobs("web")}
    broken = tar_of({"Dockerfile": "FROM orch/busybox:1\nRUN false # FAIL\n"})
    op = requests.request_push_source(world.platform, env=ENV, service="web", source=broken)
    assert release(world, 2).state == ReleaseState.building
    world.run_all()
    failed = world.operation(op.id or 0)
    assert failed.state == OpState.failed and failed.error is not None
    assert "the build failed: The command '/bin/sh -c false' returned a non-zero code: 1" in failed.error
    assert failed.error.endswith("Service web now runs 2 of 2 deploy jobs. Release 1 stays current.")
    builds_ = world.steps(op.id or 0, StepAction.build)
    assert {st.state for st in builds_} == {StepState.failed}
    assert all(st.output and "error: the build failed" in st.output for st in builds_)
    later = [st for st in world.steps(op.id or 0) if st.action != StepAction.build]
    assert later and {st.state for st in later} == {StepState.skipped}
    assert {st.action for st in later} >= {StepAction.check_image, StepAction.stop, StepAction.start}
    # The running jobs are untouched; the jobs it planned never started.
    assert {j.id: j.host for j in world.jobs("web")} == old and containers_match(world)
    assert all(j.state == JobState.failed for j in world.jobs("web", states=[JobState.failed]))
    assert len(world.jobs("web", states=[JobState.failed])) == 2
    svc = world.service("web")
    assert (svc.release, svc.image, svc.active_op_id) == (1, IMAGE, None)
    assert release(world, 2).state == ReleaseState.failed
    assert release(world, 1).state == ReleaseState.succeeded
    assert world.operations("web")[-1].id == op.id  # nothing to revert
    assert not any("e/web" in image for rt in world.runtimes.values() for image in rt.images | rt.registry)


def test_a_procfile_push_runs_its_web_line_and_worker_deploy_takes_its_lines(registry_world: World) -> None:
    world = registry_world
    add_code(world, scale=1)
    op = requests.request_push_source(world.platform, env=ENV, service="web", source=tar_of(PROCFILE_APP))
    rel = release(world, 1)
    assert (rel.build, rel.command) == ("procfile", "python3 app.py --port $PORT")
    assert rel.processes == {"web": "python3 app.py --port $PORT", "ticker": "python3 tick.py"}
    stored = files_of(source_data(world, rel.source_id or 0))
    assert stored["Dockerfile"] == procfile_dockerfile(True).encode()  # the generated context is built
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.succeeded
    (job,) = world.jobs("web")
    assert (job.command, job.image) == ("python3 app.py --port $PORT", "reg:5000/e/web:r1")
    assert world.service("web").command == "serve"  # the service's own command stays, unused
    # A worker target without a command takes the current release's Procfile line.
    deploy = requests.request_worker_deploy(world.platform, env=ENV, service="web", target="ticker", command=None)
    assert deploy.parameters.command == "python3 tick.py"
    world.run_all()
    assert world.operation(deploy.id or 0).state == OpState.succeeded
    workers = [j for j in world.jobs("web") if j.kind == JobKind.worker]
    assert [(j.target, j.command) for j in workers] == [("ticker", "python3 tick.py")]
    assert containers_match(world)
    # A given command still wins; a name the Procfile lacks needs one.
    given = requests.request_worker_deploy(world.platform, env=ENV, service="web", target="other", command="x")
    assert given.parameters.command == "x"
    world.run_all()
    with pytest.raises(BadInput, match="no Procfile line beat"):
        requests.request_worker_deploy(world.platform, env=ENV, service="web", target="beat", command=None)
    with pytest.raises(BadInput, match="no Procfile line beat"):
        requests.request_worker_deploy(world.platform, env=ENV, service="web", target="beat", command="  ")


def test_a_later_image_push_runs_the_services_command_again(world: World) -> None:
    add_code(world, scale=1)
    requests.request_push_source(world.platform, env=ENV, service="web", source=tar_of(PROCFILE_APP))
    world.run_all()
    requests.request_push(world.platform, env=ENV, service="web", image=IMAGE)
    world.run_all()
    assert [(j.image, j.command) for j in world.jobs("web")] == [(IMAGE, "serve")]
    assert release(world, 2).state == ReleaseState.succeeded


def test_worker_deploy_without_a_command_on_a_dockerfile_release_is_refused(world: World) -> None:
    add_code(world, scale=1)
    requests.request_push_source(world.platform, env=ENV, service="web", source=tar_of(DOCKERFILE_APP))
    world.run_all()
    with pytest.raises(BadInput, match="no Procfile line worker"):
        requests.request_worker_deploy(world.platform, env=ENV, service="web", target="worker", command=None)
    assert [op.kind for op in world.operations("web")] == [OpKind.deploy]


def test_an_image_no_host_has_and_the_registry_lacks_fails_at_check_image(registry_world: World) -> None:
    world = registry_world
    world.code_service("web", scale=2)
    old = {j.id: j.host for j in world.jobs("web")}
    missing = "reg:5000/e/other:r9"
    op = requests.request_push(world.platform, env=ENV, service="web", image=missing)
    world.run_all()
    failed = world.operation(op.id or 0)
    assert failed.state == OpState.failed and failed.error is not None
    assert f"is not on host h1 and could not be pulled: manifest for {missing} not found" in failed.error
    checks = world.steps(op.id or 0, StepAction.check_image)
    assert {st.state for st in checks} == {StepState.failed}
    others = [st for st in world.steps(op.id or 0) if st.action != StepAction.check_image]
    assert others and {st.state for st in others} == {StepState.skipped}
    assert {j.id: j.host for j in world.jobs("web")} == old and containers_match(world)
    assert all(missing not in rt.images for rt in world.runtimes.values())
    assert (world.service("web").release, world.service("web").image) == (1, IMAGE)
    assert release(world, 2).state == ReleaseState.failed


def test_a_built_release_rolled_back_to_runs_by_digest(registry_world: World) -> None:
    world = registry_world
    add_code(world)
    requests.request_push_source(world.platform, env=ENV, service="web", source=tar_of(DOCKERFILE_APP))
    world.run_all()
    pinned = release(world, 1).image
    requests.request_push(world.platform, env=ENV, service="web", image=IMAGE)
    world.run_all()
    back = requests.request_redeploy(world.platform, env=ENV, service="web", release=1)
    assert back.parameters.image == pinned
    world.run_all()
    assert world.operation(back.id or 0).state == OpState.succeeded
    assert {(j.release, j.image) for j in world.jobs("web")} == {(1, pinned)} and containers_match(world)


@pytest.mark.parametrize("built", [True, False], ids=["source", "image"])
def test_a_push_to_a_service_at_scale_zero_does_not_leave_its_release_building(world: World, built: bool) -> None:
    add_code(world, scale=0)
    if built:
        op = requests.request_push_source(world.platform, env=ENV, service="web", source=tar_of(DOCKERFILE_APP))
    else:
        op = requests.request_push(world.platform, env=ENV, service="web", image=IMAGE)
    world.run_all()
    assert world.operation(op.id or 0).state in (OpState.succeeded, OpState.failed)
    assert release(world, 1).state != ReleaseState.building


def test_without_a_registry_a_job_on_a_host_the_image_was_not_built_on_fails_before_anything_changes(
        world: World) -> None:
    """The documented limit of a platform without a registry: a built image is on the hosts its
    push's jobs went to only; a later job placed elsewhere fails at its check, touching nothing."""
    add_code(world, scale=1)
    requests.request_push_source(world.platform, env=ENV, service="web", source=tar_of(DOCKERFILE_APP))
    world.run_all()
    (job,) = world.jobs("web")
    other = "h2" if job.host == "h1" else "h1"
    assert "orch-build/e/web:r1" not in world.runtimes[other].images
    op = requests.request_scale(world.platform, env=ENV, service="web", scale=2)
    world.run_all()
    failed = world.operation(op.id or 0)
    assert failed.state == OpState.failed and failed.error is not None
    assert f"image orch-build/e/web:r1 is not on host {other} and could not be pulled" in failed.error
    assert world.jobs("web") == [job] and world.service("web").scale == 1
