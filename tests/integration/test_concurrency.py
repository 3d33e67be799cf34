"""One operation per service at a time; different services (and the jobs of one stage) in parallel.

Times come from ``ops show N --json``: an operation's and its steps' started_at/finished_at, as the
CLI and the node recorded them in the catalogue.
"""

from __future__ import annotations

import re
import subprocess
from datetime import datetime
from itertools import pairwise
from typing import Any

import docker
import pytest

from tests.conftest import Cli, containers
from tests.harness import HTTPD, SAMPLE_IMAGE
from tests.helpers import jobs_json, op_json, ts

pytestmark = pytest.mark.e2e


def op_id_of(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, int, str]:
    """Wait for a ``--wait`` command; its exit status, the operation id it printed, its output."""
    out, err = proc.communicate(timeout=timeout)
    match = re.search(r"operation (\d+)", out)
    assert match, f"no operation id in {out!r} {err!r}"
    return proc.returncode, int(match.group(1)), out + err


def step_period(op: dict[str, Any]) -> tuple[datetime, datetime]:
    """From the first step's start to the last step's end."""
    steps = op["steps"]
    assert steps and all(s["started_at"] and s["finished_at"] for s in steps), steps
    return min(ts(s["started_at"]) for s in steps), max(ts(s["finished_at"]) for s in steps)


def started_jobs(op: dict[str, Any]) -> set[str]:
    return {s["job"] for s in op["steps"] if s["action"] == "start"}


def stopped_jobs(op: dict[str, Any]) -> set[str]:
    return {s["job"] for s in op["steps"] if s["action"] == "stop"}


@pytest.mark.parametrize("overlap", [0, 2], ids=["no-overlap", "overlap"])
def test_two_redeploys_of_one_service_are_serialized(cli: Cli, env_name: str, overlap: int,
                                                     docker_client: docker.DockerClient) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD, "--scale", "2")
    cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--wait")
    if overlap:
        cli.ok("services", "update", env_name, "web", "--overlap", str(overlap), "--support")
    original = containers(docker_client, env_name, "web")
    assert len(original) == 2

    procs = [cli.popen("redeploy", env_name, "web", "--wait") for _ in range(2)]
    results = [op_id_of(p) for p in procs]
    for code, op_id, output in results:
        assert code == 0, f"operation {op_id} failed: {output}"
    first, second = sorted((op_json(cli, op_id) for _, op_id, _ in results), key=lambda o: o["id"])
    for op in (first, second):
        assert op["state"] == "succeeded" and op["kind"] == "redeploy", op
        assert all(s["state"] == "succeeded" for s in op["steps"]), op["steps"]

    # The second was asked for while the first ran (else this test proves nothing) ...
    assert ts(second["created_at"]) < ts(first["finished_at"])
    # ... and it waited: none of its steps started before the first operation ended.
    _, first_end = step_period(first)
    second_start, _ = step_period(second)
    assert second_start >= first_end, (first["steps"], second["steps"])
    assert ts(second["started_at"]) >= ts(first["finished_at"])
    # Not interleaved: the first replaced the original jobs, the second replaced the first's.
    assert stopped_jobs(first) == set(original)
    assert stopped_jobs(second) == started_jobs(first)
    assert len(started_jobs(second)) == 2

    final = containers(docker_client, env_name, "web")
    assert len(final) == 2, final
    assert set(final) == started_jobs(second)
    assert not set(final.values()) & set(original.values())
    assert len(containers(docker_client, env_name, "web", running=False)) == 2  # no leftovers
    catalogue = jobs_json(cli, env_name, "web")
    assert {j["id"]: j["container_id"] for j in catalogue} == final
    assert all(j["state"] == "running" for j in catalogue)


def test_three_requests_at_once_run_in_request_order(cli: Cli, env_name: str,
                                                     docker_client: docker.DockerClient) -> None:
    """A redeploy, a scale up and a redeploy of one service asked for at once: each waits for
    the one before it, and the end state follows all three."""
    # Jobs that take 2s to listen make each operation (every one starts jobs) last that long, so
    # the three requests are all made while the first runs and really queue.
    slow = "sleep 2; " + HTTPD
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", slow, "--scale", "1")
    cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--wait")
    pushed = set(containers(docker_client, env_name, "web"))
    assert len(pushed) == 1
    asked = [("redeploy",), ("scale", "3"), ("redeploy",)]
    procs = [cli.popen(kind, env_name, "web", *rest, "--wait") for kind, *rest in asked]
    results = [op_id_of(p) for p in procs]
    assert all(code == 0 for code, _, _ in results), results
    mine = [op_json(cli, op_id) for _, op_id, _ in results]
    assert [o["kind"] for o in mine] == [kind for kind, *_ in asked], mine  # each its own operation
    assert all(o["state"] == "succeeded" for o in mine), mine
    # Request order: the order the platform recorded the requests in (ids, creation times).
    ops = sorted(mine, key=lambda o: o["id"])
    assert [ts(o["created_at"]) for o in ops] == sorted(ts(o["created_at"]) for o in ops), ops
    for earlier, later in pairwise(ops):
        # Asked for before the one before it ended (else it had nothing to wait for) ...
        assert ts(later["created_at"]) < ts(earlier["finished_at"]), (earlier, later)
        # ... it started after that one ended, and so did every step of it.
        assert ts(later["started_at"]) >= ts(earlier["finished_at"]), (earlier, later)
        assert step_period(later)[0] >= step_period(earlier)[1], (earlier, later)
    # Each worked on the jobs the one before it left: replayed in request order, the operations
    # end with exactly the jobs that run now.
    jobs = pushed
    for op in ops:
        if op["kind"] == "redeploy":  # replaces every job there is
            assert stopped_jobs(op) == jobs and len(started_jobs(op)) == len(jobs), (jobs, op["steps"])
        else:  # the scale to 3 adds jobs beside those there are
            assert not stopped_jobs(op) and len(started_jobs(op)) == 3 - len(jobs), (jobs, op["steps"])
        assert not started_jobs(op) & jobs
        jobs = (jobs - stopped_jobs(op)) | started_jobs(op)
    final = containers(docker_client, env_name, "web")
    assert len(final) == 3
    assert set(final) == jobs
    assert {j["id"] for j in jobs_json(cli, env_name, "web")} == set(final)


def test_operations_on_two_services_run_in_parallel(cli: Cli, env_name: str,
                                                    docker_client: docker.DockerClient) -> None:
    # An overlap period makes each redeploy last a few seconds, so "parallel" is unambiguous.
    for svc in ("alpha", "beta"):
        cli.ok("services", "add", env_name, svc, "--type", "code", "--command", HTTPD, "--scale", "1")
        cli.ok("push", env_name, svc, SAMPLE_IMAGE, "--wait")
        cli.ok("services", "update", env_name, svc, "--overlap", "3", "--support")
    before = {svc: containers(docker_client, env_name, svc) for svc in ("alpha", "beta")}

    procs = [cli.popen("redeploy", env_name, svc, "--wait") for svc in ("alpha", "beta")]
    results = [op_id_of(p) for p in procs]
    assert all(code == 0 for code, _, _ in results), results
    alpha, beta = (op_json(cli, op_id) for _, op_id, _ in results)
    assert (alpha["service"], beta["service"]) == ("alpha", "beta")
    a_start, a_end = step_period(alpha)
    b_start, b_end = step_period(beta)
    assert a_start < b_end and b_start < a_end, "the two services' operations did not overlap"
    # Each ran for at least its overlap period, and together they took well under the sum.
    assert (a_end - a_start).total_seconds() >= 3 and (b_end - b_start).total_seconds() >= 3
    assert (max(a_end, b_end) - min(a_start, b_start)).total_seconds() < 5.5

    for svc in ("alpha", "beta"):
        now = containers(docker_client, env_name, svc)
        assert len(now) == 1 and not set(now.values()) & set(before[svc].values())


def test_start_steps_of_one_stage_run_in_parallel(cli: Cli, env_name: str,
                                                  docker_client: docker.DockerClient) -> None:
    # Each job needs a moment before it listens, so serial starts could not overlap.
    slow = "sleep 1; " + HTTPD
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", slow, "--scale", "4")
    code, op_id, output = op_id_of(cli.popen("push", env_name, "web", SAMPLE_IMAGE, "--wait"))
    assert code == 0, output
    op = op_json(cli, op_id)
    starts = [s for s in op["steps"] if s["action"] == "start"]
    assert len(starts) == 4
    assert max(ts(s["started_at"]) for s in starts) < min(ts(s["finished_at"]) for s in starts)
    # Four jobs that each need a second, started in well under four seconds.
    assert (max(ts(s["finished_at"]) for s in starts)
            - min(ts(s["started_at"]) for s in starts)).total_seconds() < 3
    assert len(containers(docker_client, env_name, "web")) == 4
