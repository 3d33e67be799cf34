"""A push builds: a directory with a Dockerfile, a Procfile app on the platform's Python image,
and a ``git push`` through the API, with the platform's registry (Debian's docker-registry) and
two real Docker hosts: a build runs on one host, is pushed to the registry by digest, and the
other host pulls it. A failing build, and an image that cannot be pulled, touch no running job."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
import requests

from tests.conftest import DOCKER_URL, Cli
from tests.harness import (
    Daemon,
    Platform,
    PlatformEnv,
    free_port,
    orchestrator,
    platform_process,
    remove_containers,
    start_process,
    stop_process,
    wait_for,
)
from tests.helpers import jobs_json, op_of, ops_json, wait_op

pytestmark = pytest.mark.e2e

REDIS_DB = int(os.environ.get("ORCH_TEST_BUILDS_REDIS_DB", "13"))
PORTS = (31750, 31989)  # jobs, then proxies (the last 50)
REGISTRY_PORT = 31992
REGISTRY = f"127.0.0.1:{REGISTRY_PORT}"
DAEMON = os.environ.get("ORCH_TEST_BUILDS_DAEMON", "b2test")
BUSYBOX = "orch/busybox:1"

DOCKERFILE_APP = {
    "Dockerfile": 'FROM orch/busybox:1\nCOPY www /www\nCMD ["sh", "-c", "exec httpd -f -p $PORT -h /www"]\n',
    "www/index.html": "built from a Dockerfile\n",
    "www/health": "ok\n",
}
PROCFILE_APP = {
    "Procfile": "web: python3 app.py\nticker: while true; do echo tick; sleep 0.5; done\n",
    "requirements.txt": "# nothing to install: the build still runs pip on it\n",
    "app.py": (
        "import http.server, os\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers(); self.wfile.write(b'procfile app\\n')\n"
        "    def log_message(self, *a): pass\n"
        "http.server.ThreadingHTTPServer(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()\n"
    ),
}


@dataclass
class Builds:
    cli: Cli
    platform: Platform
    daemon: Daemon
    h1: str  # the default daemon: builds run here (the first host, by name, its jobs go to)
    h2: str  # a second daemon, with no image but busybox: it pulls from the registry
    workdir: Path

    def client(self, host: str) -> docker.DockerClient:
        url = DOCKER_URL if host == self.h1 else self.daemon.url
        return docker.DockerClient(base_url=url, version="auto", timeout=60)

    def run_op(self, *args: str, succeed: bool = True, timeout: float = 300) -> dict[str, Any]:
        return wait_op(self.cli, op_of(self.cli.ok(*args)), timeout, succeed=succeed)

    def new_env(self) -> str:
        name = f"b{uuid.uuid4().hex[:8]}"
        self.cli.ok("env", "create", name, "--sandbox", "--no-defaults")
        return name

    def containers(self, env: str, service: str) -> dict[str, str]:
        """Job id -> host, for the env's running containers on both daemons."""
        found = {}
        for host in (self.h1, self.h2):
            client = self.client(host)
            try:
                for c in client.api.containers(filters={"label": [f"orchestrator.env={env}",
                                                                  f"orchestrator.service={service}"]}):
                    found[c["Labels"]["orchestrator.job"]] = host
            finally:
                client.close()
        return found


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Builds]:
    daemon = Daemon(DAEMON)
    daemon.up()
    daemon.load_images([BUSYBOX], DOCKER_URL)
    workdir = tmp_path_factory.mktemp("builds")
    registry = start_process(orchestrator("registry", "run", "--port", str(REGISTRY_PORT), "--data",
                                          str(workdir / "registry")), {}, workdir / "registry.log",
                             lambda _log: registry_answers(), 30)
    env = PlatformEnv(f"sqlite:///{workdir / 'catalogue.db'}", REDIS_DB, PORTS,
                      extra=(("ORCH_REGISTRY", REGISTRY), ("ORCH_GIT_DIR", str(workdir / "git"))))
    env.flush()
    platform = Platform(env, workdir)
    tag = uuid.uuid4().hex[:5]
    b = Builds(Cli(env.variables()), platform, daemon, f"b1{tag}", f"b2{tag}", workdir)
    try:
        for host, url in ((b.h1, DOCKER_URL), (b.h2, daemon.url)):
            b.cli.ok("hosts", "add", host, "--docker-url", url, "--address", "127.0.0.1")
            platform.start_node(host)
        yield b
    finally:
        platform.stop_nodes()
        for url in (DOCKER_URL, daemon.url):
            client = docker.DockerClient(base_url=url, version="auto")
            for name in _envs(b):
                remove_containers(client, name)
            for image in client.images.list(name=f"{REGISTRY}/*"):
                for each in image.tags:
                    client.images.remove(each, force=True)
            client.close()
        daemon.stop()
        stop_process(registry)


def _envs(b: Builds) -> list[str]:
    return [e["name"] for e in json.loads(b.cli.ok("env", "list", "--json"))]


def registry_answers() -> bool:
    try:
        return requests.get(f"http://{REGISTRY}/v2/", timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


def get(port: int) -> str:
    return requests.get(f"http://127.0.0.1:{port}/", timeout=5).text


def test_a_dockerfile_directory_builds_once_and_runs_on_both_hosts(builds: Builds, tmp_path: Path) -> None:
    env = builds.new_env()
    builds.cli.ok("services", "add", env, "web", "--type", "code", "--scale", "2")
    builds.cli.ok("services", "update", env, "web", "--health-path", "/health")
    app = write_tree(tmp_path / "app", DOCKERFILE_APP)
    h2 = builds.client(builds.h2)
    assert not h2.images.list(name=f"{REGISTRY}/{env}/web")  # nothing built there: it pulls

    out = builds.cli.ok("push", env, "web", str(app), "--wait")
    assert "Successfully tagged" in out and "digest: sha256:" in out, out  # the build streams to --wait
    (release,) = json.loads(builds.cli.ok("releases", "list", env, "web", "--json"))
    assert release["state"] == "succeeded" and release["current"] and release["build"] == "dockerfile"
    assert release["image"].startswith(f"{REGISTRY}/{env}/web@sha256:")
    # One build (on the first host), kept with the operation; the other host pulled the image.
    op = ops_json(builds.cli, env)[0]
    built = [s for s in op["steps"] if s["action"] == "build"]
    assert len(built) == 1 and built[0]["host"] == builds.h1 and "Successfully built" in built[0]["output"]
    assert h2.images.list(name=f"{REGISTRY}/{env}/web")
    h2.close()
    jobs = jobs_json(builds.cli, env, "web")
    assert {j["host"] for j in jobs} == {builds.h1, builds.h2}
    assert builds.containers(env, "web") == {j["id"]: j["host"] for j in jobs}
    assert all(get(j["port"]) == "built from a Dockerfile\n" for j in jobs)

    # A rollback runs the recorded digest: the same bytes.
    write_tree(app, {"www/index.html": "release 2\n"})
    builds.cli.ok("push", env, "web", str(app), "--wait")
    assert all(get(j["port"]) == "release 2\n" for j in jobs_json(builds.cli, env, "web"))
    builds.cli.ok("rollback", env, "web", "1", "--wait")
    rolled = jobs_json(builds.cli, env, "web")
    assert {j["image"] for j in rolled} == {release["image"]}
    assert all(get(j["port"]) == "built from a Dockerfile\n" for j in rolled)


def test_a_procfile_app_builds_and_its_worker_line_deploys(builds: Builds, tmp_path: Path) -> None:
    env = builds.new_env()
    builds.cli.ok("services", "add", env, "py", "--type", "code", "--scale", "1")
    app = write_tree(tmp_path / "papp", PROCFILE_APP)
    builds.cli.ok("push", env, "py", str(app), "--wait")
    (job,) = jobs_json(builds.cli, env, "py")
    assert get(job["port"]) == "procfile app\n"
    (release,) = json.loads(builds.cli.ok("releases", "list", env, "py", "--json"))
    assert release["build"] == "procfile"

    builds.run_op("worker", "deploy", env, "py", "ticker")  # no --command: the Procfile's line
    (worker,) = [j for j in jobs_json(builds.cli, env, "py") if j["kind"] == "worker"]
    client = builds.client(worker["host"])
    try:
        logs = wait_for("the worker to tick", lambda: client.containers.get(worker["container_id"]).logs(), 10,
                        until=lambda out: b"tick" in out)
    finally:
        client.close()
    assert b"tick" in logs
    # A target the Procfile does not name, without --command: refused, nothing started.
    refused = builds.cli("worker", "deploy", env, "py", "nope")
    assert refused.exit_code == 2 and "no Procfile line nope" in refused.output


def test_a_failing_build_or_an_unknown_source_touches_no_running_job(builds: Builds, tmp_path: Path) -> None:
    env = builds.new_env()
    builds.cli.ok("services", "add", env, "web", "--type", "code", "--scale", "2")
    app = write_tree(tmp_path / "app", DOCKERFILE_APP)
    builds.cli.ok("push", env, "web", str(app), "--wait")
    before = builds.containers(env, "web")

    write_tree(app, {"Dockerfile": DOCKERFILE_APP["Dockerfile"] + "RUN echo about to fail && false\n"})
    result = builds.cli("push", env, "web", str(app), "--wait")
    assert result.exit_code == 1 and "about to fail" in result.output, result.output
    op = ops_json(builds.cli, env)[0]
    assert op["state"] == "failed" and op["error"].startswith("build "), op["error"]
    assert "returned a non-zero code" in op["error"]
    assert builds.containers(env, "web") == before
    states = [(r["number"], r["state"], r["current"]) for r in
              json.loads(builds.cli.ok("releases", "list", env, "web", "--json"))]
    assert states == [(1, "succeeded", True), (2, "failed", False)]

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README").write_text("nothing to build\n")
    refused = builds.cli("push", env, "web", str(empty))
    assert refused.exit_code == 2 and "neither a Dockerfile nor a Procfile" in refused.output
    assert len(json.loads(builds.cli.ok("releases", "list", env, "web", "--json"))) == 2


def test_missing_images_are_pulled_and_one_that_cannot_be_fails_before_anything_stops(builds: Builds) -> None:
    env = builds.new_env()
    builds.cli.ok("services", "add", env, "web", "--type", "code", "--scale", "2", "--command",
                  "mkdir -p /w && echo pulled > /w/index.html && exec httpd -f -p $PORT -h /w")
    # An image in the registry that neither host has.
    source = builds.client(builds.h1)
    image = f"{REGISTRY}/library/pulled:{uuid.uuid4().hex[:6]}"
    source.images.get(BUSYBOX).tag(image)
    for line in source.images.push(image, stream=True, decode=True):
        assert "error" not in line, line
    source.images.remove(image)
    source.close()
    builds.cli.ok("push", env, "web", image, "--wait")
    jobs = jobs_json(builds.cli, env, "web")
    assert {j["host"] for j in jobs} == {builds.h1, builds.h2} and all(get(j["port"]) == "pulled\n" for j in jobs)
    before = builds.containers(env, "web")

    missing = f"{REGISTRY}/library/nothing-here:1"
    result = builds.cli("push", env, "web", missing, "--wait")
    assert result.exit_code == 1
    op = ops_json(builds.cli, env)[0]
    assert "could not be pulled" in op["error"] and "manifest unknown" in op["error"].lower(), op["error"]
    assert all(s["state"] == "skipped" for s in op["steps"] if s["action"] in ("stop", "start"))
    assert builds.containers(env, "web") == before


def test_git_push_builds_and_redeploys_and_a_wrong_token_is_refused(builds: Builds, tmp_path: Path) -> None:
    env = builds.new_env()
    builds.cli.ok("services", "add", env, "web", "--type", "code", "--scale", "1")
    token = builds.cli.ok("tokens", "create", f"git-{uuid.uuid4().hex[:6]}", "--role", "user").strip()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    repo = write_tree(tmp_path / "repo", DOCKERFILE_APP)

    def git(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args], cwd=repo,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 or not check, done.stdout + done.stderr
        return done

    git("init", "-q", "-b", "main")
    git("add", ".")
    git("commit", "-qm", "first")
    commit = git("rev-parse", "HEAD").stdout.strip()
    with platform_process(["api", "--port", str(port)], builds.platform.environ, builds.workdir / "api.log",
                          ready=lambda _log: _serving(base)):
        wrong = git("push", f"http://u:not-a-token@127.0.0.1:{port}/git/{env}/web.git", "main", check=False)
        assert wrong.returncode != 0 and "Authentication failed" in wrong.stderr, wrong.stderr
        assert requests.get(f"{base}/git/{env}/web.git/info/refs?service=git-receive-pack",
                            timeout=5).status_code == 401
        pushed = git("push", f"http://u:{token}@127.0.0.1:{port}/git/{env}/web.git", "main")
    # The push's own output showed the build and the operation's end.
    assert "remote:" in pushed.stderr and "Successfully built" in pushed.stderr, pushed.stderr
    assert "succeeded" in pushed.stderr
    (release,) = json.loads(builds.cli.ok("releases", "list", env, "web", "--json"))
    assert (release["commit"], release["state"], release["current"]) == (commit, "succeeded", True)
    (job,) = jobs_json(builds.cli, env, "web")
    assert get(job["port"]) == "built from a Dockerfile\n"


def _serving(base: str) -> bool:
    try:
        return requests.get(f"{base}/api/v1/openapi.json", timeout=1).status_code == 200
    except requests.ConnectionError:
        return False
