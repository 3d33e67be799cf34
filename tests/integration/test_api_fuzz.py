"""Schemathesis over the live HTTP API (``orchestrator api`` in its own process) with a support
token: every operation of the OpenAPI document, valid and invalid data, with path parameters
either generated or naming things that exist (a seeded environment, service, worker target,
release and operation), must never get a server error."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import docker
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from tests.conftest import Cli
from tests.harness import HTTPD, remove_containers, retire
from tests.helpers import op_of, wait_op
from tests.integration.api import Api, api_fixture  # noqa: F401 (the api fixture)

pytestmark = pytest.mark.e2e

EXAMPLES = 25  # per operation and mode; the whole run stays well under a minute
BUDGET = 90.0  # seconds, a hard stop for the run whatever the examples cost
# An image that does not exist: operations the fuzzer starts fail at their image check and never
# start containers (a fuzzed scale of 1000 must not start 1000 of them).
NO_IMAGE = "orch/fuzz-missing:1"
# Calls that remove what they name: never given the seeded names (the run checks them at its end).
REMOVING = {("DELETE", "/api/v1/envs/{env}"), ("DELETE", "/api/v1/envs/{env}/services/{svc}")}
WORKER_CMD = "trap 'exit 0' TERM; while true; do sleep 1; done"


def seed(cli: Cli) -> dict[str, Any]:
    """An environment with a code service that has a release, a worker target and operations."""
    env = f"fz{uuid.uuid4().hex[:6]}"
    cli.ok("env", "create", env, "--sandbox", "--no-defaults")
    cli.ok("services", "add", env, "web", "--type", "code", "--command", HTTPD, "--scale", "1")
    cli.ok("vars", "set", env, "web", "GREETING=hi")
    pushed = cli("push", env, "web", NO_IMAGE, "--wait")
    assert pushed.exit_code == 1, pushed.output  # fails at the image check, as intended
    op = op_of(pushed.output)
    assert wait_op(cli, op)["state"] == "failed"
    cli("worker", "deploy", env, "web", "mailer", "--command", WORKER_CMD, "--wait")
    return {"env": env, "svc": "web", "target": "mailer", "release": 1, "op_id": op}


def test_no_server_error(api: Api, platform_env: dict[str, str], docker_client: docker.DockerClient) -> None:
    cli = Cli(platform_env)
    known = seed(cli)
    envs_before = {e["name"] for e in json.loads(cli.ok("env", "list", "--json"))}
    schema = schemathesis.openapi.from_url(f"{api.base}/openapi.json")
    auth = {"Authorization": f"Bearer {api.support}"}
    base = api.base.removesuffix("/api/v1")
    server_errors: list[str] = []
    calls = 0
    per_operation: dict[str, int] = {}
    deadline = time.monotonic() + BUDGET

    results = list(schema.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) == len(results), [r for r in results if not isinstance(r, Ok)]  # a valid schema
    assert len(operations) >= 15, [o.label for o in operations]
    for operation in operations:
        names = {p.name for p in operation.path_parameters}
        removing = (operation.method.upper(), operation.path) in REMOVING
        existing = {} if removing else {k: v for k, v in known.items() if k in names}
        strategies = [operation.as_strategy(GenerationMode.POSITIVE),
                      operation.as_strategy(GenerationMode.NEGATIVE)]
        if existing:
            strategies += [operation.as_strategy(GenerationMode.POSITIVE, path_parameters=existing),
                           operation.as_strategy(GenerationMode.NEGATIVE, path_parameters=existing)]

        @settings(max_examples=EXAMPLES * len(strategies), deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=st.one_of(strategies))
        def run(case: Any) -> None:
            nonlocal calls
            if time.monotonic() > deadline:
                return
            response = case.call(base_url=base, headers=auth, timeout=30)
            calls += 1
            if response.status_code >= 500:  # every server error is kept, and fails the test below
                server_errors.append(f"{case.method} {case.formatted_path} {response.status_code}: "
                                     f"{response.text[:200]!r} (body {case.body!r:.200}, query {case.query!r})")

        before = calls
        run()
        per_operation[operation.label] = calls - before

    print(f"fuzz: {calls} calls over {len(operations)} operations: {per_operation}")
    assert calls >= 10 * len(operations), f"only {calls} calls in {BUDGET}s"
    # Every operation was called (the budget did not run out before it), so a server error in any
    # of them would be among server_errors.
    assert all(per_operation.values()), f"not called within {BUDGET}s: {per_operation}"
    assert not server_errors, f"{len(server_errors)} server errors in {calls} calls:\n" + "\n".join(server_errors[:30])
    # The seeded service is still readable: the fuzzing left the catalogue consistent.
    cli.ok("services", "show", known["env"], "web", "--json")
    # What the fuzzer created (environments, with their included services; services in the seeded
    # one) runs no container after the test.
    made = {e["name"] for e in json.loads(cli.ok("env", "list", "--json"))} - envs_before
    retire(cli.env["ORCH_DATABASE_URL"], known["env"], *made)
    remove_containers(docker_client, known["env"], *made)
