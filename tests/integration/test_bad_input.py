"""Bad input exits 2 with a one-line reason on stderr and changes nothing.

Nothing changed = the catalogue as the CLI's own ``--json`` listings show it, and the containers
Docker runs (found by label), are the same before and after the bad command. The environment used
has a pushed code service (``web``, one running job) and a code service never pushed (``fresh``).
"""

from __future__ import annotations

import json
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import docker
import pytest
from click.testing import CliRunner, Result

from orchestrator.cli import main as cli_main
from tests.conftest import Cli, containers
from tests.harness import HTTPD, SAMPLE_IMAGE, remove_containers, retire

pytestmark = pytest.mark.e2e

UNKNOWN_ENV = "no-such-env"
UNKNOWN_SVC = "no-such-svc"


@dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[str], list[str]]  # env name -> CLI arguments
    says: str  # the reason on stderr mentions this (case-insensitive)
    touches_envs: tuple[str, ...] = ()  # other env names whose containers must not appear


CASES = [
    # unknown environment
    Case("unknown-env/services-add",
         lambda e: ["services", "add", UNKNOWN_ENV, "web2", "--type", "code"], UNKNOWN_ENV,
         (UNKNOWN_ENV,)),
    Case("unknown-env/services-list", lambda e: ["services", "list", UNKNOWN_ENV], UNKNOWN_ENV),
    Case("unknown-env/push", lambda e: ["push", UNKNOWN_ENV, "web", SAMPLE_IMAGE], UNKNOWN_ENV,
         (UNKNOWN_ENV,)),
    Case("unknown-env/redeploy", lambda e: ["redeploy", UNKNOWN_ENV, "web"], UNKNOWN_ENV,
         (UNKNOWN_ENV,)),
    Case("unknown-env/scale", lambda e: ["scale", UNKNOWN_ENV, "web", "2"], UNKNOWN_ENV,
         (UNKNOWN_ENV,)),
    Case("unknown-env/vars-set", lambda e: ["vars", "set", UNKNOWN_ENV, "web", "A=1"], UNKNOWN_ENV),
    Case("unknown-env/jobs-list", lambda e: ["jobs", "list", UNKNOWN_ENV], UNKNOWN_ENV),
    # unknown service
    Case("unknown-svc/push", lambda e: ["push", e, UNKNOWN_SVC, SAMPLE_IMAGE], UNKNOWN_SVC),
    Case("unknown-svc/redeploy", lambda e: ["redeploy", e, UNKNOWN_SVC], UNKNOWN_SVC),
    Case("unknown-svc/redeploy-support", lambda e: ["redeploy", e, UNKNOWN_SVC, "--support"],
         UNKNOWN_SVC),
    Case("unknown-svc/scale", lambda e: ["scale", e, UNKNOWN_SVC, "3"], UNKNOWN_SVC),
    Case("unknown-svc/vars-set", lambda e: ["vars", "set", e, UNKNOWN_SVC, "A=1"], UNKNOWN_SVC),
    Case("unknown-svc/vars-unset", lambda e: ["vars", "unset", e, UNKNOWN_SVC, "A"], UNKNOWN_SVC),
    Case("unknown-svc/update", lambda e: ["services", "update", e, UNKNOWN_SVC, "--overlap", "5",
                                          "--support"], UNKNOWN_SVC),
    Case("unknown-svc/show", lambda e: ["services", "show", e, UNKNOWN_SVC], UNKNOWN_SVC),
    Case("unknown-svc/rollback", lambda e: ["rollback", e, UNKNOWN_SVC, "1"], UNKNOWN_SVC),
    # names that are not DNS labels
    Case("not-dns/env-create-upper-underscore", lambda e: ["env", "create", "Bad_Name"], "Bad_Name",
         ("Bad_Name",)),
    Case("not-dns/env-create-leading-dash", lambda e: ["env", "create", "--", "-lead"], "-lead"),
    Case("not-dns/env-create-trailing-dash", lambda e: ["env", "create", "trail-"], "trail-"),
    Case("not-dns/env-create-dot", lambda e: ["env", "create", "a.b"], "a.b"),
    Case("not-dns/env-create-64-chars", lambda e: ["env", "create", "a" * 64], "a" * 64),
    Case("not-dns/services-add-upper-underscore",
         lambda e: ["services", "add", e, "Web_1", "--type", "code"], "Web_1"),
    Case("not-dns/services-add-dot", lambda e: ["services", "add", e, "web.1", "--type", "code"],
         "web.1"),
    Case("not-dns/services-add-64-chars",
         lambda e: ["services", "add", e, "w" * 64, "--type", "code"], "w" * 64),
    Case("not-dns/services-add-redis",
         lambda e: ["services", "add", e, "Cache", "--type", "redis", "--image", SAMPLE_IMAGE],
         "Cache"),
    # scale below 0
    Case("scale-below-0/services-add",
         lambda e: ["services", "add", e, "web2", "--type", "code", "--scale", "-1"], "scale"),
    Case("scale-below-0/scale", lambda e: ["scale", e, "web", "-1"], "-1"),
    Case("scale-below-0/scale-after-double-dash", lambda e: ["scale", e, "web", "--", "-1"], "scale"),
    # vars set without '='
    Case("vars-set/no-equals", lambda e: ["vars", "set", e, "web", "NOEQ"], "NOEQ"),
    Case("vars-set/second-pair-no-equals", lambda e: ["vars", "set", e, "web", "GOOD=1", "NOEQ"],
         "NOEQ"),
    # a code service never pushed
    Case("never-pushed/redeploy", lambda e: ["redeploy", e, "fresh"], "push"),
    Case("never-pushed/redeploy-support", lambda e: ["redeploy", e, "fresh", "--support"], "push"),
    # overlap without --support
    Case("overlap-without-support", lambda e: ["services", "update", e, "web", "--overlap", "5"],
         "support"),
    Case("not-redeployable-without-support",
         lambda e: ["services", "update", e, "web", "--not-redeployable"], "support"),
    # unknown --type, bad --size
    Case("unknown-type", lambda e: ["services", "add", e, "web2", "--type", "nosuch",
                                    "--image", SAMPLE_IMAGE], "nosuch"),
    Case("bad-size/word", lambda e: ["services", "add", e, "web2", "--type", "code",
                                     "--size", "huge"], "huge"),
    Case("bad-size/too-small", lambda e: ["services", "add", e, "web2", "--type", "code",
                                          "--size", "1m"], "size"),
    Case("bad-size/zero-cpus", lambda e: ["services", "add", e, "web2", "--type", "code",
                                          "--size", "256m:0"], "cpu"),
    Case("bad-size/redis", lambda e: ["services", "add", e, "cache", "--type", "redis",
                                      "--image", SAMPLE_IMAGE, "--size", "huge"], "huge"),
]


def as_json(cli: Cli, *args: str) -> Any:
    return json.loads(cli.ok(*args, "--json"))


def snapshot(cli: Cli, env: str, client: docker.DockerClient,
             other_envs: tuple[str, ...] = ()) -> dict[str, Any]:
    """Everything a bad command could have changed, as the CLI and Docker report it."""
    services = as_json(cli, "services", "list", env)
    state: dict[str, Any] = {
        "envs": as_json(cli, "env", "list"),
        "services": services,
        "jobs": as_json(cli, "jobs", "list", env, "--all"),
        "ops": as_json(cli, "ops", "list", env),
        "containers": containers(client, env, running=False),
        "running": containers(client, env),
    }
    for svc in services:
        name = svc["name"]
        state[f"vars:{name}"] = as_json(cli, "vars", "list", env, name)
        state[f"releases:{name}"] = as_json(cli, "releases", "list", env, name)
        state[f"show:{name}"] = as_json(cli, "services", "show", env, name)
    for other in other_envs:
        state[f"containers:{other}"] = containers(client, other, running=False)
    return state


@pytest.fixture(scope="module")
def bad_env(platform_env: dict[str, str], node: str,
            docker_client: docker.DockerClient) -> Iterator[str]:
    """One environment for every case (they change nothing, so they can share it)."""
    cli = Cli(platform_env)
    name = f"t{uuid.uuid4().hex[:8]}"
    cli.ok("env", "create", name, "--sandbox", "--no-defaults")
    cli.ok("services", "add", name, "web", "--type", "code", "--command", HTTPD, "--scale", "1")
    cli.ok("push", name, "web", SAMPLE_IMAGE, "--wait")
    cli.ok("vars", "set", name, "web", "KEEP=me")
    cli.ok("services", "add", name, "fresh", "--type", "code", "--command", HTTPD)
    assert len(containers(docker_client, name, "web")) == 1
    yield name
    retire(cli.env["ORCH_DATABASE_URL"], name)
    remove_containers(docker_client, name)


def reason_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def run_bad(platform_env: dict[str, str], args: list[str]) -> Result:
    """The bad command, run as a user runs it: the CLI's own exit (``SystemExit``) is its answer;
    any other exception escaping it is the crash a user would see as a traceback, so it fails the
    test with that traceback."""
    result = CliRunner().invoke(cli_main, args, env=platform_env, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        assert result.exc_info is not None
        crash = "".join(traceback.format_exception(*result.exc_info))
        pytest.fail(f"{args} crashed instead of refusing (exit {result.exit_code}):\n{crash}")
    return result


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_and_changes_nothing(case: Case, platform_env: dict[str, str],
                                               bad_env: str,
                                               docker_client: docker.DockerClient) -> None:
    cli = Cli(platform_env)
    before = snapshot(cli, bad_env, docker_client, case.touches_envs)
    result = run_bad(platform_env, case.args(bad_env))
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert case.says.lower() in result.stderr.lower(), result.stderr
    assert "Traceback" not in result.output  # nor printed one itself (a logged exception, say)
    after = snapshot(cli, bad_env, docker_client, case.touches_envs)
    assert after == before


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_reason_is_one_line(case: Case, platform_env: dict[str, str], bad_env: str) -> None:
    result = run_bad(platform_env, case.args(bad_env))
    assert result.exit_code == 2
    lines = reason_lines(result.stderr)
    assert len(lines) == 1, f"not a one-line reason: {result.stderr!r}"
    assert case.says.lower() in lines[0].lower()
    assert result.stdout == "", "bad input printed something on stdout"
