"""The architecture, checked: every import in orchestrator/ and workers/ runs down the layers of
the flow (none upward, none in a loop), the control plane never imports Docker, and the pure
modules do no I/O. A new module must be placed in LAYERS."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Lower numbers are lower layers; a module imports only from layers below its own.
LAYERS: dict[str, int] = {
    "orchestrator": 0, "workers": 0, "workers.runtime": 0,
    "orchestrator.errors": 1, "orchestrator.names": 1, "orchestrator.sizes": 1,
    "orchestrator.settings": 1, "orchestrator.who": 1, "orchestrator.periodic": 1, "orchestrator.client": 1,
    "orchestrator.httpauth": 1,
    "orchestrator.models": 2,
    "orchestrator.service_types": 3, "orchestrator.placement": 3, "orchestrator.db": 3, "orchestrator.groupcommit": 3,
    "orchestrator.proxy": 3, "orchestrator.builds": 3, "orchestrator.monitoring": 3, "orchestrator.logship": 3,
    "workers.runtime.base": 3, "workers.broker": 3,
    "orchestrator.rules": 4, "orchestrator.planner": 4, "orchestrator.dispatch": 4,
    "orchestrator.progress": 4, "workers.runtime.docker": 4, "workers.runtime.fake": 4,
    "workers.runtime.sim": 5,
    "orchestrator.catalogue.tokens": 5, "orchestrator.catalogue.hosts": 5,
    "orchestrator.catalogue.services": 5, "orchestrator.catalogue.operations": 5,
    "orchestrator.catalogue.routing": 5, "orchestrator.catalogue.builds": 5,
    "orchestrator.catalogue.monitoring": 5,
    "orchestrator.platform": 5, "orchestrator.manifest": 5,
    "orchestrator.catalogue.jobs": 6, "orchestrator.catalogue.logs": 6,
    "orchestrator.catalogue": 7,
    "orchestrator.spec": 8,
    "orchestrator.operations": 9,
    "orchestrator.requests": 10, "orchestrator.fleet": 10, "orchestrator.logs": 10,
    "orchestrator.metrics": 10, "orchestrator.status": 10,
    "workers.logship": 10, "workers.exporter": 10, "workers.monitor": 10,
    "orchestrator.control": 11, "orchestrator.watcher": 11, "workers.context": 11,
    "workers.proxy": 10, "workers.files": 9,
    "workers.tasks": 12, "workers.heartbeat": 12, "workers.metrics": 12,
    "workers.node": 13, "workers.inline": 13, "workers.sim": 14,
    "orchestrator.api.git": 14, "orchestrator.api.app": 15, "orchestrator.api.serve": 16, "orchestrator.api": 17,
    "workers.embedded": 17,  # dev: every process of the platform, the API included, in one
    "orchestrator.cli.wire": 13, "orchestrator.cli.remote": 14, "orchestrator.cli.base": 15,
    "orchestrator.cli.follow": 16,
    "orchestrator.cli.hosts": 17, "orchestrator.cli.envs": 17, "orchestrator.cli.deploys": 17,
    "orchestrator.cli.ops": 17, "orchestrator.cli.sites": 17, "orchestrator.cli.processes": 18,
    "orchestrator.cli.manifest": 17, "orchestrator.cli.observe": 17,
    "orchestrator.cli": 19, "orchestrator.cli.__main__": 20,
}
PURE = {"orchestrator.proxy", "orchestrator.builds", "orchestrator.planner", "orchestrator.placement",
        "orchestrator.sizes", "orchestrator.rules", "orchestrator.service_types", "orchestrator.manifest",
        "orchestrator.monitoring", "orchestrator.logship", "orchestrator.httpauth"}
IO_LIBRARIES = {"docker", "redis", "celery", "kombu", "sqlalchemy", "sqlmodel", "requests", "socket",
                "subprocess", "urllib", "httpx", "psycopg"}


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def modules() -> dict[str, Path]:
    found = {}
    for package in ("orchestrator", "workers"):
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imports(path: Path) -> list[tuple[str, int]]:
    """(module imported, line) for every import in the file, at any depth. ``from pkg import
    mod`` counts as importing ``pkg.mod`` when that is a module of ours."""
    ours = modules()
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub if sub in ours else node.module, node.lineno))
    return found


def test_every_module_has_a_layer() -> None:
    missing = [name for name in modules() if name not in LAYERS]
    assert not missing, f"place these modules in LAYERS: {missing}"


def test_imports_run_down_the_layers() -> None:
    ours = modules()
    upward = []
    for name, path in ours.items():
        for target, line in imports(path):
            if target.split(".")[0] not in ("orchestrator", "workers"):
                continue
            if target in ("orchestrator", "workers"):
                continue
            if LAYERS[target] >= LAYERS[name]:
                upward.append(f"{path.relative_to(ROOT)}:{line} {name} ({LAYERS[name]}) imports "
                              f"{target} ({LAYERS[target]})")
    assert not upward, "imports that run upward or sideways:\n" + "\n".join(upward)


@pytest.mark.parametrize("name", sorted(n for n in modules() if n.startswith("orchestrator")))
def test_the_control_plane_never_imports_docker(name: str) -> None:
    path = modules()[name]
    bad = [(target, line) for target, line in imports(path) if target.split(".")[0] == "docker"]
    if not name.startswith("orchestrator.cli"):
        bad += [(t, line) for t, line in imports(path) if t.split(".")[0] == "workers"]
    assert not bad, f"{name} imports {bad}"


def test_only_the_cli_starts_worker_processes_and_lazily() -> None:
    """The CLI is the outermost adapter: it starts nodes, the control worker and dev, importing
    workers only inside the command that needs them (so `--help` and the API load no Docker)."""
    for name, path in modules().items():
        if not name.startswith("orchestrator.cli"):
            continue
        top_level = [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.Import | ast.ImportFrom)]
        assert not [n for n in top_level if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("workers")]


@pytest.mark.parametrize("name", sorted(PURE))
def test_pure_modules_do_no_io(name: str) -> None:
    bad = [t for t, _ in imports(modules()[name]) if t.split(".")[0] in IO_LIBRARIES]
    assert not bad, f"{name} is pure but imports {bad}"


def test_the_client_needs_only_celery() -> None:
    allowed = {"__future__", "typing", "celery"}
    found = {t.split(".")[0] for t, _ in imports(modules()["orchestrator.client"])}
    assert found <= allowed, found - allowed
