"""Manifests: parsing and validation (every error names the file, the line and the key), the
pure diff against a snapshot of the environment, and apply on the in-memory world."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest
import trustme

from orchestrator import manifest
from orchestrator.cli.manifest import apply_plan, make_plan
from orchestrator.manifest import (
    AddService,
    AddSite,
    ChangeSite,
    CreateEnv,
    DeployWorker,
    EnvState,
    Manifest,
    ManifestError,
    Plan,
    Push,
    RecordScale,
    Redeploy,
    RemoveService,
    RemoveSite,
    RemoveWorker,
    Scale,
    ScaleWorker,
    ServiceState,
    SetVariables,
    SiteState,
    UnsetVariables,
    UpdateService,
    WorkerState,
)
from orchestrator.models import OpKind, OpState, ServiceType
from tests.unit.world import ENV, IMAGE, IMAGE_2, World

SHOP = """\
environment: shop
sandbox: true
services:
  db:
    type: postgresql
  web:
    type: code
    image: orch/sample-app:1
    command: httpd -f -p $PORT -h /var/www
    scale: 2
    size: m
    health_path: /health
    variables:
      GREETING: hi
      MODE: 0755
      DEBUG: yes
    workers:
      mailer: sleep 600
      cron:
        command: sleep 900
        scale: 2
sites:
  Shop.Example.com: web
"""
IMAGES = {ServiceType.logging: "orch/busybox:1", ServiceType.service_proxy: "orch/haproxy:2.6",
          ServiceType.monitoring: "orch/busybox:1"}


def load(text: str, **files: str) -> Manifest:
    def read(name: str) -> str:
        if name not in files:
            raise FileNotFoundError(2, "No such file or directory")
        return files[name]

    return manifest.load(textwrap.dedent(text), "shop.yaml", read=read)


def refused(text: str, **files: str) -> ManifestError:
    with pytest.raises(ManifestError) as caught:
        load(text, **files)
    return caught.value


def diff_refused(m: Manifest, state: EnvState | None, **flags: bool) -> ManifestError:
    with pytest.raises(ManifestError) as caught:
        manifest.diff(m, state, **flags)
    return caught.value


def deployed(m: Manifest) -> EnvState:
    """The environment as it is once ``m`` was applied and every operation succeeded."""
    state = manifest.new_env(m.environment, bool(m.data.sandbox), IMAGES)
    services = dict(state.services)
    for name, d in m.services.items():
        code = d.type == ServiceType.code
        services[name] = ServiceState(
            type=d.type, image=d.image or manifest.service_types.profile(d.type).default_image,
            command=d.command, scale=1 if d.scale is None else d.scale, size=d.size or "s",
            overlap=d.overlap or 0, health_path=d.health_path, released=code and d.image is not None,
            variables={k: v for k, v in (d.variables or {}).items() if v is not None},
            workers={t: WorkerState(w.command or "", 1 if w.scale is None else w.scale)
                     for t, w in (d.workers or {}).items()})
    sites = {name: SiteState(s.service, m.tls[name].fingerprint if name in m.tls else None)
             for name, s in m.sites.items()}
    return replace(state, services=services, sites=sites)


def with_service(state: EnvState, name: str, **changes: Any) -> EnvState:
    services = dict(state.services)
    services[name] = replace(services[name], **changes) if name in services else ServiceState(**changes)
    return replace(state, services=services)


def kinds(plan: Plan) -> list[tuple[str, str]]:
    return [(type(c).__name__, getattr(c, "site", getattr(c, "service", getattr(c, "name", "")))) for c in plan.changes]


# --- parsing --------------------------------------------------------------------------------------


def test_a_manifest_loads_with_its_lines_short_forms_and_variables_as_written() -> None:
    m = load(SHOP)
    web = m.services["web"]
    assert (web.type, web.scale, web.size, web.health_path) == (ServiceType.code, 2, "m", "/health")
    # Variables are taken as written: YAML would make 0755 the number 493 and yes a bool.
    assert web.variables == {"GREETING": "hi", "MODE": "0755", "DEBUG": "yes"}
    assert web.workers is not None and web.workers["mailer"].command == "sleep 600"
    assert web.workers["cron"].scale == 2
    assert m.sites == {"shop.example.com": manifest.SiteDecl(service="web")}  # names in lower case
    assert m.line(("services", "web", "scale")) == 10
    assert m.line(("services", "web", "nothing", "here")) == 6  # the nearest key in the file
    assert not m.services["db"].given("scale") and web.given("scale")


@pytest.mark.parametrize(("text", "line", "says"), [
    ("environment: shop\nservices:\n  web:\n    type: code\n    scal: 3\n", 5,
     "services.web.scal: unknown key; known keys here: type, image, command, scale"),
    ("environment: shop\nservices:\n  web:\n    type: code\n    scale: 1001\n", 5,
     "services.web.scale: must be an integer from 0 to 1000, not 1001"),
    ("environment: shop\nservices:\n  web:\n    type: code\n    scale: -1\n", 5,
     "services.web.scale: must be an integer from 0 to 1000"),
    ("environment: shop\nservices:\n  web:\n    type: code\n    scale: '2'\n", 5,
     "services.web.scale: must be an integer from 0 to 1000, not '2'"),
    ("environment: shop\nservices:\n  web:\n    type: code\n    scale: true\n", 5, "services.web.scale: must be"),
    ("environment: shop\nservices:\n  web:\n    type: mongodb\n", 4,
     "services.web.type: unknown service type 'mongodb': one of code, postgresql"),
    ("environment: shop\nservices:\n  web:\n    image: x\n", 3, "services.web.type: is required"),
    ("environment: shop\nservices:\n  web:\n    type: code\n  web:\n    type: code\n", 5,
     "services.web: given twice (lines 3 and 5)"),
    ("environment: Shop\n", 1, "environment: environment name 'Shop' is not a DNS label"),
    ("sandbox: true\n", 1, "environment: is required"),
    ("environment: shop\nsandbox: maybe\n", 2, "sandbox: must be true or false"),
    ("environment: shop\nservces: {}\n", 2, "servces: unknown key; known keys here: environment, sandbox, services"),
    ("environment: shop\nservices:\n  Web:\n    type: code\n", 3, "services.Web: service name 'Web'"),
    ("environment: shop\nservices:\n  web: [1\n", 4, "not valid YAML"),
    ("environment: shop\nservices:\n  db:\n    type: redis\n    scale: 2\n", 5,
     "services.db.scale: redis services run one job"),
    ("environment: shop\nservices:\n  db:\n    type: redis\n    workers: {w: sleep 1}\n", 5,
     "services.db.workers: workers is for code services"),
    ("environment: shop\nservices:\n  db:\n    type: redis\n    health_path: /\n", 5,
     "services.db.health_path: health_path is for code services"),
    ("environment: shop\nservices:\n  web:\n    type: code\n    overlap: 100000\n", 5, "services.web.overlap: overlap"),
    ("environment: shop\nservices:\n  web:\n    type: code\n    size: huge\n", 5, "services.web.size:"),
    ("environment: shop\nservices:\n  web:\n    type: code\n    image: Not An Image\n", 5, "services.web.image: image"),
    ("environment: shop\nservices:\n  web:\n    type: code\n    command: 5\n", 5,
     "services.web.command: must be a string"),
    ("environment: shop\nservices:\n  web:\n    type: code\n    health_path: no-slash\n", 5,
     "services.web.health_path: health path"),
    ("environment: shop\nservices:\n  web:\n    type: code\n    variables:\n      PORT: '1'\n", 6,
     "services.web.variables.PORT: PORT is set by the platform"),
    ("environment: shop\nservices:\n  web:\n    type: code\n    variables:\n      1X: a\n", 6,
     "services.web.variables.1X: variable name '1X'"),
    ("environment: shop\nservices:\n  web:\n    type: code\n    variables: [A]\n", 5,
     "services.web.variables: must be a mapping"),
    ("environment: shop\nservices:\n  web:\n    type: code\n    workers:\n      w:\n        comand: x\n", 7,
     "services.web.workers.w.comand: unknown key; known keys here: command, scale"),
    ("environment: shop\nservices:\n  web:\n    type: code\n    workers:\n      W_1: x\n", 6,
     "services.web.workers.W_1: worker target name"),
    ("environment: shop\nsites:\n  'not a name': web\n", 3, "sites.not a name: site 'not a name' is not a DNS"),
    ("environment: shop\nsites:\n  a.example.com:\n    service: web\n    cert: c.pem\n", 3,
     "sites.a.example.com: a TLS site needs both cert and key"),
    ("environment: shop\nsites:\n  a.example.com: web\n  A.example.com: web\n", 4,
     "sites.A.example.com: the same site as a.example.com"),
    ("", 1, "the file is empty"),
    ("- a\n- b\n", 1, "a manifest is a mapping"),
    ("environment: shop\nservices:\n  web: !!python/object:os.system x\n", 3, "services.web:"),
])
def test_bad_manifests_name_the_file_the_line_and_the_key(text: str, line: int, says: str) -> None:
    error = refused(text)
    assert str(error).startswith(f"shop.yaml:{line}: "), str(error)
    assert says in str(error), str(error)
    assert "\n" not in str(error)


def test_several_errors_report_the_first_and_count_the_others() -> None:
    error = refused("environment: shop\nservices:\n  web:\n    type: code\n    scale: x\n    size: huge\n")
    assert str(error).startswith("shop.yaml:5: services.web.scale: ") and "(and 1 more error)" in str(error)


def test_aliases_cannot_blow_up() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdef", "bcdefg", strict=True))
    assert "more than" in str(refused(bomb))


def test_tls_sites_read_their_files_and_are_checked() -> None:
    issued = trustme.CA().issue_cert("secure.example.com")
    cert = b"".join(blob.bytes() for blob in issued.cert_chain_pems).decode()
    key = issued.private_key_pem.bytes().decode()
    text = ("environment: shop\nsites:\n  secure.example.com:\n    service: web\n"
            "    cert: c.pem\n    key: k.pem\n")
    m = load(text, **{"c.pem": cert, "k.pem": key})
    assert m.tls["secure.example.com"].key == key.strip() + "\n"
    body = [line for line in key.splitlines() if line and not line.startswith("-----")]
    assert not any(line in repr(m) + repr(m.tls) for line in body)  # the key is never printed
    missing = refused(text, **{"c.pem": cert})
    assert str(missing).startswith("shop.yaml:6: sites.secure.example.com.key: cannot read k.pem")
    other = trustme.CA().issue_cert("other.example.com")
    wrong = refused(text, **{"c.pem": other.cert_chain_pems[0].bytes().decode(),
                             "k.pem": other.private_key_pem.bytes().decode()})
    assert str(wrong).startswith("shop.yaml:5: sites.secure.example.com.cert: the certificate is for other")


# --- the diff -------------------------------------------------------------------------------------


def test_a_new_environment_is_created_in_order() -> None:
    m = load(SHOP)
    plan = manifest.diff(m, None, included_images=IMAGES)
    assert kinds(plan) == [
        ("CreateEnv", "shop"),
        ("AddService", "db"),  # databases and caches first: code services get their URLs
        ("AddService", "web"), ("UpdateService", "web"), ("SetVariables", "web"), ("Push", "web"),
        ("DeployWorker", "web"), ("DeployWorker", "web"), ("ScaleWorker", "web"),
        ("AddSite", "shop.example.com"),
    ]
    create = plan.changes[0]
    assert isinstance(create, CreateEnv) and create.included == ("logging", "service-proxy")
    web = plan.changes[2]
    assert web == AddService("web", ServiceType.code, None, "httpd -f -p $PORT -h /var/www", 2, "m")
    assert plan.lines()[0] == "+ create environment shop (sandbox), with logging, service-proxy"
    assert "+ create service db: postgresql, image postgres:16, scale 1, size s (deploys now)" in plan.lines()
    assert "! push orch/sample-app:1 to web: its first release (deploys it)" in plan.lines()
    assert "~ set variables of web: GREETING, MODE, DEBUG" in plan.lines()  # names, never values
    assert not any("hi" in line for line in plan.lines())


def test_an_unchanged_manifest_plans_nothing() -> None:
    m = load(SHOP)
    plan = manifest.diff(m, deployed(m), included_images=IMAGES)
    assert plan.changes == () and plan.notes == ()


def test_scale_variables_and_command_changes_redeploy_once() -> None:
    m = load(SHOP)
    state = deployed(m)
    changed = load(SHOP.replace("scale: 2\n    size", "scale: 5\n    size")
                   .replace("GREETING: hi", "GREETING: hello")
                   .replace("command: httpd", "command: exec httpd"))
    plan = manifest.diff(changed, state)
    assert plan.changes == (
        UpdateService("web", ('command "httpd -f -p $PORT -h /var/www" -> "exec httpd -f -p $PORT -h /var/www"',),
                      command="exec httpd -f -p $PORT -h /var/www"),
        SetVariables("web", {"GREETING": "hello"}),
        Redeploy("web", ("command", "variables")),
        Scale("web", 5, 2),  # up: after the redeploy, so the new jobs start once
    )
    down = manifest.diff(load(SHOP.replace("scale: 2\n    size", "scale: 1\n    size").replace("size: m", "size: l")),
                         state)
    assert [type(c) for c in down.changes] == [UpdateService, Scale, Redeploy]  # down: before it


def test_only_what_changed_is_redeployed_and_scale_alone_is_no_redeploy() -> None:
    m = load(SHOP)
    plan = manifest.diff(load(SHOP.replace("scale: 2\n    size", "scale: 3\n    size")), deployed(m))
    assert plan.changes == (Scale("web", 3, 2),)
    db = manifest.diff(load(SHOP.replace("type: postgresql", "type: postgresql\n    size: m")), deployed(m))
    assert db.changes == (UpdateService("db", ("size s -> m",), size="m"), Redeploy("db", ("size",)))


def test_a_new_image_of_a_code_service_is_a_push_which_takes_the_other_changes_too() -> None:
    m = load(SHOP)
    plan = manifest.diff(load(SHOP.replace("sample-app:1", "sample-app:2").replace("GREETING: hi", "GREETING: x")),
                         deployed(m))
    assert [type(c) for c in plan.changes] == [SetVariables, Push]
    push = plan.changes[1]
    assert isinstance(push, Push) and (push.image, push.before, push.first) == (
        "orch/sample-app:2", "orch/sample-app:1", False)


def test_keys_left_out_leave_settings_alone_and_null_clears() -> None:
    m = load(SHOP)
    bare = load("environment: shop\nservices:\n  web:\n    type: code\n")
    plan = manifest.diff(bare, deployed(m))
    assert plan.changes == ()
    assert "service db is not in the file: left alone (--prune removes it)" in plan.notes
    assert "site shop.example.com is not in the file: left alone (--prune removes it)" in plan.notes
    cleared = manifest.diff(load("environment: shop\nservices:\n  web:\n    type: code\n    command: null\n"
                                 "    health_path: ''\n    variables: {GREETING: null, NEW: '1'}\n"), deployed(m))
    assert cleared.changes == (
        UpdateService("web", ('command "httpd -f -p $PORT -h /var/www" -> none', 'health_path "/health" -> none'),
                      command="", health_path=""),
        UnsetVariables("web", ("GREETING",)),
        SetVariables("web", {"NEW": "1"}),
        Redeploy("web", ("command", "health_path", "variables")),
    )


def test_prune_removes_what_the_file_leaves_out_but_never_an_included_service() -> None:
    m = load(SHOP)
    state = with_service(deployed(m), "old", type=ServiceType.code, released=True)
    bare = load("environment: shop\nsandbox: true\nservices:\n  web:\n    type: code\n    workers: {cron: sleep 900}\n")
    plan = manifest.diff(bare, state, prune=True)
    assert plan.changes == (
        UnsetVariables("web", ("GREETING", "MODE", "DEBUG")),
        Redeploy("web", ("variables",)),
        RemoveWorker("web", "mailer"),
        RemoveSite("shop.example.com"),
        RemoveService("db"), RemoveService("old"),
    )
    busy = with_service(state, "old", busy=True)
    error = diff_refused(bare, busy, prune=True)
    assert str(error).startswith("shop.yaml:3: services: --prune removes service old, which has an operation")


def test_support_only_settings_need_support() -> None:
    m = load(SHOP)
    state = deployed(m)
    overlap = load(SHOP.replace("size: m", "size: m\n    overlap: 10"))
    error = diff_refused(overlap, state)
    assert str(error) == "shop.yaml:12: services.web.overlap: only support may set the overlap period (apply --support)"
    plan = manifest.diff(overlap, state, support=True)
    assert plan.changes == (UpdateService("web", ("overlap 0 -> 10",), overlap=10),)  # no redeploy
    # An unchanged overlap needs no support: applying the same file again works for anyone.
    assert manifest.diff(overlap, with_service(state, "web", overlap=10)).changes == ()
    # A service marked not redeployable is redeployed (or pushed) only with --support.
    locked = with_service(state, "web", redeployable=False)
    changed = load(SHOP.replace("size: m", "size: l"))
    error = diff_refused(changed, locked)
    assert str(error).startswith("shop.yaml:11: services.web.size: service web is marked not redeployable")
    assert [type(c) for c in manifest.diff(changed, locked, support=True).changes] == [UpdateService, Redeploy]


def test_what_cannot_change_is_refused_with_its_line() -> None:
    m = load(SHOP)
    state = deployed(m)
    cases = [
        (SHOP.replace("type: postgresql", "type: mysql"), "shop.yaml:5: services.db.type: db is a postgresql service"),
        (SHOP.replace("sandbox: true", "sandbox: false"), "shop.yaml:2: sandbox: environment shop is a sandbox"),
        (SHOP.replace("Shop.Example.com: web", "Shop.Example.com: db"),
         "shop.yaml:23: sites.Shop.Example.com.service: sites route to code services; db is a postgresql"),
        (SHOP.replace("Shop.Example.com: web", "Shop.Example.com: api"),
         "shop.yaml:23: sites.Shop.Example.com.service: no service api in the file or the environment"),
        (SHOP.replace("sites:", "  logging:\n    type: logging\n    command: sleep 1\nsites:"),
         "shop.yaml:24: services.logging.command: logging services cannot be redeployed"),
        (SHOP.replace("  db:\n", "  database:\n    type: redis\n  db:\n"),
         "shop.yaml:4: services.database: services database and db would both set DATABASE_URL"),
    ]
    for text, says in cases:
        with pytest.raises(ManifestError) as caught:
            manifest.diff(load(text), state)
        assert says in str(caught.value), (says, str(caught.value))


def test_a_code_service_before_its_first_push() -> None:
    m = load(SHOP.replace("    image: orch/sample-app:1\n", ""))
    plan = manifest.diff(m, None, included_images=IMAGES)
    assert ("Push", "web") not in kinds(plan) and ("DeployWorker", "web") not in kinds(plan)
    assert "worker target web/mailer waits for web's first push: apply again after it" in plan.notes
    state = deployed(m)
    changed = manifest.diff(load(SHOP.replace("    image: orch/sample-app:1\n", "").replace("size: m", "size: l")
                                 .replace("scale: 2\n    size", "scale: 4\n    size")), state)
    # Nothing runs: the scale is recorded, no operation; nothing to redeploy.
    assert changed.changes == (
        UpdateService("web", ("size m -> l",), size="l", later=" (its first push takes it)"),
        RecordScale("web", 4, 2),
    )


def test_worker_targets() -> None:
    m = load(SHOP)
    state = deployed(m)
    changed = load(SHOP.replace("mailer: sleep 600", "mailer: sleep 601").replace("scale: 2\nsites", "scale: 3\nsites")
                   .replace("      cron:", "      new:\n        scale: 0\n      cron:"))
    error = diff_refused(changed, state)
    assert str(error).startswith("shop.yaml:19: services.web.workers.new.command: a new worker target needs a command")
    procfile = with_service(state, "web", processes={"new": "python new.py"})
    plan = manifest.diff(changed, procfile)
    assert plan.changes == (
        DeployWorker("web", "mailer", "sleep 601", "sleep 600"),
        DeployWorker("web", "new", None, None), ScaleWorker("web", "new", 0, 1),
        ScaleWorker("web", "cron", 3, 2),
    )
    assert "its Procfile line" in plan.lines()[1]


def test_sites_change_by_removal_and_addition() -> None:
    m = load(SHOP)
    state = replace(deployed(m), sites={"shop.example.com": SiteState("web", "fingerprint")})
    plan = manifest.diff(m, state)
    assert plan.changes == (ChangeSite("shop.example.com", "web", ("certificate removed",)),)
    moved = manifest.diff(load(SHOP.replace("  web:\n", "  api:\n    type: code\n  web:\n")
                               .replace("Shop.Example.com: web", "shop.example.com: api")), deployed(m))
    assert moved.changes[-1] == ChangeSite("shop.example.com", "api", ("service web -> api",))
    assert moved.changes[0] == AddService("api", ServiceType.code, None, None, 1, "s")
    assert AddSite("x.example.com", "web") in manifest.diff(
        load(SHOP + "  x.example.com: web\n"), deployed(m)).changes


def test_an_environment_being_removed_is_refused() -> None:
    m = load(SHOP)
    error = diff_refused(m, replace(deployed(m), removing=True))
    assert str(error) == "shop.yaml:1: environment: environment shop is being removed"


# --- apply, on the in-memory world -----------------------------------------------------------------

WORLD = f"""\
environment: {ENV}
sandbox: true
services:
  cache:
    type: memcached
  web:
    type: code
    image: {IMAGE}
    command: serve
    scale: 2
    variables: {{GREETING: hi}}
    workers: {{w: work}}
"""


def applied(world: World, text: str, **flags: bool) -> tuple[Plan, list[str]]:
    plan = make_plan(world.platform, manifest.load(text, "w.yaml"), **{"prune": False, "support": False, **flags})
    said: list[str] = []
    apply_plan(world.platform, plan, support=flags.get("support", False), echo=said.append)
    world.run_all()
    return plan, said


def ops_of(world: World, service: str) -> list[tuple[OpKind, OpState]]:
    return [(op.kind, op.state) for op in world.operations(service)]


def running(world: World, service: str) -> Mapping[str, Any]:
    jobs = world.jobs(service)
    return {"count": len(jobs), "commands": {j.command for j in jobs},
            "greeting": {j.environment.get("GREETING") for j in jobs}, "images": {j.image for j in jobs}}


def test_apply_makes_the_changes_as_operations_and_again_changes_nothing(world: World) -> None:
    plan, said = applied(world, WORLD)
    assert [type(c) for c in plan.changes] == [AddService, AddService, SetVariables, Push, DeployWorker]
    assert any(line.startswith("  operation ") for line in said)
    assert ops_of(world, "web") == [(OpKind.deploy, OpState.succeeded), (OpKind.worker_deploy, OpState.succeeded)]
    assert ops_of(world, "cache") == [(OpKind.deploy, OpState.succeeded)]
    web = running(world, "web")
    assert web["count"] == 3 and web["greeting"] == {"hi"} and web["images"] == {IMAGE}
    # The same file again: no change, no operation.
    assert make_plan(world.platform, manifest.load(WORLD, "w.yaml"), prune=False, support=False).changes == ()

    changed = (WORLD.replace("scale: 2", "scale: 3").replace("GREETING: hi", "GREETING: hello")
               .replace("command: serve", "command: serve --again"))
    plan, _ = applied(world, changed)
    assert [type(c) for c in plan.changes] == [UpdateService, SetVariables, Redeploy, Scale]
    assert ops_of(world, "web")[2:] == [(OpKind.redeploy, OpState.succeeded), (OpKind.scale, OpState.succeeded)]
    assert ops_of(world, "cache") == [(OpKind.deploy, OpState.succeeded)]  # untouched
    deploys = [j for j in world.jobs("web") if j.kind == "deploy"]
    assert len(deploys) == 3 and {j.command for j in deploys} == {"serve --again"}
    assert {j.environment.get("GREETING") for j in world.jobs("web")} == {"hello"}
    assert make_plan(world.platform, manifest.load(changed, "w.yaml"), prune=False, support=False).changes == ()

    pushed, _ = applied(world, changed.replace(IMAGE, IMAGE_2))
    assert [type(c) for c in pushed.changes] == [Push]
    assert running(world, "web")["images"] == {IMAGE_2}


def test_apply_right_after_apply_counts_the_queued_operations(world: World) -> None:
    """Operations still queued (nothing has run yet) count as done: no second scale or push."""
    applied(world, WORLD)
    changed = WORLD.replace("scale: 2", "scale: 4").replace("command: serve", "command: serve2")
    plan = make_plan(world.platform, manifest.load(changed, "w.yaml"), prune=False, support=False)
    apply_plan(world.platform, plan, support=False, echo=lambda _: None)  # the redeploy runs, the scale waits
    assert make_plan(world.platform, manifest.load(changed, "w.yaml"), prune=False, support=False).changes == ()
    world.run_all()
    assert len([j for j in world.jobs("web") if j.kind == "deploy"]) == 4


def test_a_new_worker_target_is_scaled_once_its_deploy_has_started(world: World) -> None:
    """The target exists only once its deploy starts (behind the push): apply waits for that."""
    text = WORLD.replace("workers: {w: work}", "workers: {w: {command: work, scale: 3}}")
    plan = make_plan(world.platform, manifest.load(text, "w.yaml"), prune=False, support=False)
    assert [type(c) for c in plan.changes][-2:] == [DeployWorker, ScaleWorker]
    pauses: list[int] = []
    apply_plan(world.platform, plan, support=False, echo=lambda _: None,
               pause=lambda: pauses.append(world.run_all()))
    world.run_all()
    assert pauses  # it waited for the push and the worker deploy to run
    assert ops_of(world, "web") == [(OpKind.deploy, OpState.succeeded), (OpKind.worker_deploy, OpState.succeeded),
                                    (OpKind.worker_scale, OpState.succeeded)]
    assert len([j for j in world.jobs("web") if j.kind == "worker"]) == 3
    assert make_plan(world.platform, manifest.load(text, "w.yaml"), prune=False, support=False).changes == ()


def test_apply_prune_removes_services_not_in_the_file(world: World) -> None:
    applied(world, WORLD)
    plan, _ = applied(world, WORLD.replace("  cache:\n    type: memcached\n", ""), prune=True)
    assert plan.changes == (RemoveService("cache"),)
    assert "cache" not in {s for s in (manifest_state(world).services)}


def manifest_state(world: World) -> EnvState:
    from orchestrator.cli.manifest import snapshot

    state = snapshot(world.platform, ENV)
    assert state is not None
    return state
