"""Failures: a missing image fails before anything stops; a container that exits at once fails the
operation with the reason and the service's state; steps are idempotent when Docker changed
behind the platform's back."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import docker
import pytest

from tests.conftest import Cli, containers
from tests.harness import HTTPD, SAMPLE_IMAGE, wait_for
from tests.helpers import jobs_json, op_json, op_of, ops_json, service_json

pytestmark = pytest.mark.e2e

# Exits 3 with a message when CRASH is set (a variable: it takes effect at the next start).
CRASHY = 'if [ -n "$CRASH" ]; then echo "boom: $CRASH"; exit 3; fi; exec ' + HTTPD


def runs_now(error: str) -> tuple[int, int]:
    """(running, wanted) from the "now runs N of M deploy jobs" part of an operation's error."""
    match = re.search(r"runs (\d+) of (\d+) deploy jobs", error)
    assert match, f"the error does not say how many jobs the service runs: {error!r}"
    return int(match.group(1)), int(match.group(2))


def failed_op(cli: Cli, *args: str) -> dict[str, Any]:
    result = cli(*args, "--wait")
    assert result.exit_code == 1, (result.exit_code, result.output)
    op = op_json(cli, op_of(result.stdout))
    assert op["state"] == "failed" and op["error"], op
    return op


def push_missing_image(cli: Cli, env: str, client: docker.DockerClient
                       ) -> tuple[dict[str, str], list[dict[str, Any]], str, dict[str, Any]]:
    """web runs 2 jobs of SAMPLE_IMAGE, then a push of an image no host has fails."""
    cli.ok("services", "add", env, "web", "--type", "code", "--command", HTTPD, "--scale", "2")
    cli.ok("push", env, "web", SAMPLE_IMAGE, "--wait")
    before = containers(client, env, "web")
    jobs_before = jobs_json(cli, env, "web")
    assert len(before) == 2 and all(j["state"] == "running" for j in jobs_before)
    missing = f"orch/missing-{uuid.uuid4().hex[:8]}:1"
    return before, jobs_before, missing, failed_op(cli, "push", env, "web", missing)


def test_push_of_a_missing_image_fails_before_anything_stops(
        cli: Cli, env_name: str, docker_client: docker.DockerClient) -> None:
    before, jobs_before, missing, op = push_missing_image(cli, env_name, docker_client)

    failed = [s for s in op["steps"] if s["state"] == "failed"]
    assert [s["action"] for s in failed] == ["check_image"], op["steps"]
    assert missing in failed[0]["error"] and missing in op["error"]
    # Nothing was stopped or started: every later step was skipped without running.
    later = [s for s in op["steps"] if s["action"] in ("stop", "start")]
    assert later and all(s["state"] == "skipped" and s["started_at"] is None for s in later), later
    assert min(s["stage"] for s in later) > failed[0]["stage"]

    # Docker runs the very same containers, and the catalogue still lists them running.
    assert containers(docker_client, env_name, "web") == before
    assert len(containers(docker_client, env_name, "web", running=False)) == 2
    running = {j["id"]: j for j in jobs_json(cli, env_name, "web") if j["state"] == "running"}
    assert running == {j["id"]: j for j in jobs_before}
    # The failed release did not become the current one: a redeploy runs the last good image.
    svc = service_json(cli, env_name, "web")
    assert (svc["image"], svc["release"]) == (SAMPLE_IMAGE, 1)
    cli.ok("redeploy", env_name, "web", "--wait")
    after = containers(docker_client, env_name, "web")
    assert len(after) == 2 and not set(after.values()) & set(before.values())
    images = {docker_client.containers.get(c).attrs["Config"]["Image"] for c in after.values()}
    assert images == {SAMPLE_IMAGE}
    assert {j["id"]: j["container_id"] for j in jobs_json(cli, env_name, "web")} == after


def test_push_of_a_missing_image_leaves_the_catalogue_as_it_was(
        cli: Cli, env_name: str, docker_client: docker.DockerClient) -> None:
    """The jobs the failed operation planned but never started are not left behind 'scheduled'
    (listed, counted as running in the error, holding ports and memory)."""
    _, jobs_before, _, op = push_missing_image(cli, env_name, docker_client)
    assert runs_now(op["error"]) == (2, 2)
    assert jobs_json(cli, env_name, "web") == jobs_before


def test_first_push_whose_container_exits_at_once_fails_with_the_reason(
        cli: Cli, env_name: str, docker_client: docker.DockerClient) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", "echo oops; exit 3",
           "--scale", "2")
    op = failed_op(cli, "push", env_name, "web", SAMPLE_IMAGE)
    assert "exit code 3" in op["error"] and "oops" in op["error"], op["error"]
    assert runs_now(op["error"]) == (0, 2)
    starts = [s for s in op["steps"] if s["action"] == "start"]
    assert starts and all(s["state"] == "failed" for s in starts), starts
    # Docker keeps nothing of the failed jobs, and the catalogue agrees.
    assert containers(docker_client, env_name, "web", running=False) == {}
    assert jobs_json(cli, env_name, "web") == []


def test_redeploy_whose_containers_exit_at_once_says_what_runs(
        cli: Cli, env_name: str, docker_client: docker.DockerClient) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", CRASHY, "--scale", "2")
    cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--wait")
    assert len(containers(docker_client, env_name, "web")) == 2

    cli.ok("vars", "set", env_name, "web", "CRASH=now")
    op = failed_op(cli, "redeploy", env_name, "web")
    assert "exit code 3" in op["error"] and "boom: now" in op["error"], op["error"]
    running, wanted = runs_now(op["error"])
    assert wanted == 2
    # What the error says is what Docker runs and what the catalogue lists.
    assert len(containers(docker_client, env_name, "web")) == running
    assert len([j for j in jobs_json(cli, env_name, "web") if j["state"] == "running"]) == running
    assert len(containers(docker_client, env_name, "web", running=False)) == running


def test_overlap_redeploy_whose_new_containers_exit_at_once_keeps_the_old_ones(
        cli: Cli, env_name: str, docker_client: docker.DockerClient) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", CRASHY, "--scale", "2")
    cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--wait")
    cli.ok("services", "update", env_name, "web", "--overlap", "30", "--support")
    before = containers(docker_client, env_name, "web")
    cli.ok("vars", "set", env_name, "web", "CRASH=overlap")

    op = failed_op(cli, "redeploy", env_name, "web")
    assert "exit code 3" in op["error"] and "boom: overlap" in op["error"], op["error"]
    assert runs_now(op["error"]) == (2, 2)
    # The new jobs failed before the overlap wait: it and the stops of the old jobs never ran.
    assert all(s["state"] == "skipped" for s in op["steps"] if s["action"] in ("wait", "stop"))
    assert containers(docker_client, env_name, "web") == before
    assert len(containers(docker_client, env_name, "web", running=False)) == 2
    assert {j["id"]: j["container_id"] for j in jobs_json(cli, env_name, "web")} == before


def test_scale_up_whose_new_containers_exit_at_once_keeps_the_old_ones(
        cli: Cli, env_name: str, docker_client: docker.DockerClient) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", CRASHY, "--scale", "2")
    cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--wait")
    before = containers(docker_client, env_name, "web")
    cli.ok("vars", "set", env_name, "web", "CRASH=scaled")  # only the new jobs get it

    op = failed_op(cli, "scale", env_name, "web", "4")
    assert "exit code 3" in op["error"] and "boom: scaled" in op["error"], op["error"]
    assert runs_now(op["error"]) == (2, 4)
    assert containers(docker_client, env_name, "web") == before
    assert len(containers(docker_client, env_name, "web", running=False)) == 2
    jobs = jobs_json(cli, env_name, "web")
    assert {j["id"]: j["container_id"] for j in jobs} == before


def test_containers_removed_behind_the_platform_are_noticed(
        cli: Cli, env_name: str, docker_client: docker.DockerClient) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD, "--scale", "3")
    cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--wait")
    removed = containers(docker_client, env_name, "web")
    for cid in removed.values():
        docker_client.containers.get(cid).remove(force=True)

    # The node's heartbeat (every 0.5 s here) sees the containers gone and fails their jobs.
    deadline = time.monotonic() + 10
    while True:
        every = jobs_json(cli, env_name, "web", everything=True)
        failed = {j["id"]: j for j in every if j["id"] in removed and j["state"] == "failed"}
        if len(failed) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert set(failed) == set(removed), every
    assert all("removed outside the platform" in (j["error"] or "") for j in failed.values())

    # Self-healing: heal operations bring the service back to its scale, with no one asking (a
    # heartbeat may have seen only some of the removals: then a second heal follows its back-off).
    def healed_state() -> tuple[bool, Any]:
        heals = [o for o in ops_json(cli, env_name) if o["trigger"] == "heal"]
        running = containers(docker_client, env_name, "web")
        jobs = {j["id"]: j["container_id"] for j in jobs_json(cli, env_name, "web")}
        done = bool(heals) and all(o["state"] == "succeeded" for o in heals)
        return done and len(running) == 3 and jobs == running, (heals, running, jobs)

    heals, healed, _ = wait_for("healed back to 3 jobs", healed_state, 40, every=0.3,
                                until=lambda r: r[0], retry=())[1]
    assert {o["kind"] for o in heals} == {"recover"}
    assert not set(healed) & set(removed)
    assert service_json(cli, env_name, "web")["heal_attempts"] == len(heals)

    # A redeploy still replaces them all, and a user's operation that succeeds resets the count.
    result = cli("redeploy", env_name, "web", "--wait")
    assert result.exit_code == 0, result.output
    now = containers(docker_client, env_name, "web")
    assert len(now) == 3 and not set(now) & set(healed)
    assert {j["id"]: j["container_id"] for j in jobs_json(cli, env_name, "web")} == now
    assert service_json(cli, env_name, "web")["heal_attempts"] == 0


def test_redeploy_after_containers_were_removed_or_stopped_behind_the_platform(
        cli: Cli, env_name: str, docker_client: docker.DockerClient) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD, "--scale", "3")
    cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--wait")
    before = list(containers(docker_client, env_name, "web").values())
    docker_client.containers.get(before[0]).remove(force=True)  # gone
    docker_client.containers.get(before[1]).stop(timeout=1)  # exited, still there

    result = cli("redeploy", env_name, "web", "--wait")
    assert result.exit_code == 0, result.output
    now = containers(docker_client, env_name, "web")
    assert len(now) == 3 and not set(now.values()) & set(before)
    assert len(containers(docker_client, env_name, "web", running=False)) == 3  # old ones removed
    assert {j["id"]: j["container_id"] for j in jobs_json(cli, env_name, "web")} == now
