"""The everyday commands on the real Docker engine: change a service, cancel an operation,
remove a service or a whole environment (data volumes kept unless asked)."""

from __future__ import annotations

import json
import re
import uuid

import docker
import pytest
import sqlalchemy

from tests.conftest import Cli, containers
from tests.harness import HTTPD, SAMPLE_IMAGE, remove_containers, retire, wait_for
from tests.helpers import jobs_json, op_json, op_of, ops_json, wait_op

pytestmark = pytest.mark.e2e

POSTGRES = "orch/postgres:15"


def test_services_update_takes_effect_at_the_next_redeploy(cli: Cli, env_name: str,
                                                            docker_client: docker.DockerClient) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD, "--scale", "1")
    cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--wait")
    before = containers(docker_client, env_name, "web")
    out = cli.ok("services", "update", env_name, "web", "--size", "m",
                 "--command", "mkdir -p /w && echo changed > /w/index.html && exec httpd -f -p $PORT -h /w")
    assert "command, size" in out and "next redeploy" in out
    assert containers(docker_client, env_name, "web") == before  # nothing restarts now
    cli.ok("redeploy", env_name, "web", "--wait")
    (job,) = jobs_json(cli, env_name, "web")
    container = docker_client.containers.get(job["container_id"])
    assert container.attrs["HostConfig"]["Memory"] == 512 * 1024 * 1024  # size m: 512 MiB
    assert container.exec_run(["cat", "/w/index.html"]).output.decode().strip() == "changed"
    # Bad input: one line, exit 2, nothing changed.
    for args, says in [(["--size", "huge"], "size"), (["--image", "Not An Image"], "image"),
                       (["--health-path", "no-slash"], "health path"), ([], "nothing to update")]:
        result = cli("services", "update", env_name, "web", *args)
        assert result.exit_code == 2 and says in result.output, (args, result.output)
    code_image = cli("services", "update", env_name, "web", "--image", SAMPLE_IMAGE)
    assert code_image.exit_code == 2 and "push" in code_image.output


def test_cancel_ends_an_overlap_redeploy_and_the_next_redeploy_restores_the_scale(
        cli: Cli, env_name: str, docker_client: docker.DockerClient) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD, "--scale", "2")
    cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--wait")
    cli.ok("services", "update", env_name, "web", "--overlap", "60", "--support")
    op = op_of(cli.ok("redeploy", env_name, "web"))
    wait_for("the overlap wait to run", lambda: op_json(cli, op)["steps"], 30,
             until=lambda steps: any(s["action"] == "wait" and s["state"] == "running" for s in steps))
    queued = op_of(cli.ok("scale", env_name, "web", "3"))  # waits behind the redeploy
    assert op_json(cli, queued)["state"] == "queued"

    out = cli.ok("ops", "cancel", str(op))
    assert f"operation {op} cancelled" in out
    cancelled = op_json(cli, op)
    assert cancelled["state"] == "cancelled"
    assert all(s["state"] == "skipped" for s in cancelled["steps"] if s["action"] == "stop")
    # The service is free: the queued scale runs, and it brings the service to exactly 3.
    wait_op(cli, queued, 60, succeed=True)
    assert len(containers(docker_client, env_name, "web")) == 3
    assert len(jobs_json(cli, env_name, "web")) == 3
    # A queued operation cancels without running anything; an ended one is refused.
    cli.ok("services", "update", env_name, "web", "--overlap", "0", "--support")
    again = cli("ops", "cancel", str(op))
    assert again.exit_code == 2 and "ended already" in again.output


def test_services_rm_leaves_no_container_or_row_and_keeps_data_unless_asked(
        cli: Cli, env_name: str, docker_client: docker.DockerClient) -> None:
    cli.ok("services", "add", env_name, "db", "--type", "postgresql", "--image", POSTGRES)
    wait_for("db deployed", lambda: ops_json(cli, env_name)[0]["state"], 120, until=lambda s: s == "succeeded")
    volume = next(v for v in docker_client.volumes.list(filters={"label": f"orchestrator.env={env_name}"}))
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD, "--scale", "2")
    cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--wait")
    cli.ok("worker", "deploy", env_name, "web", "w", "--command", "sleep 600", "--wait")

    refused = cli("services", "rm", env_name, "service-proxy")
    assert refused.exit_code == 2
    cli.ok("services", "rm", env_name, "web", "--wait")
    assert containers(docker_client, env_name, "web", running=False) == {}
    names = {s["name"] for s in json.loads(cli.ok("services", "list", env_name, "--json"))}
    assert names == {"db"}
    assert cli("jobs", "list", env_name, "web").exit_code == 2
    # Its rows (service, jobs, operations, releases, worker targets) go once the watcher's
    # grace (ORCH_REMOVED_GRACE, 1 s here) has passed.
    wait_for("web's rows to go", lambda: rows(cli, env_name, "web"), 20, until=lambda n: n == 0)
    # The name is free again.
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD)

    cli.ok("services", "rm", env_name, "db", "--wait")  # its data stays
    assert containers(docker_client, env_name, "db", running=False) == {}
    assert docker_client.volumes.get(volume.name) is not None
    cli.ok("services", "add", env_name, "db", "--type", "postgresql", "--image", POSTGRES)
    wait_for("db deployed again", lambda: ops_json(cli, env_name)[0]["state"], 120, until=lambda s: s == "succeeded")
    cli.ok("services", "rm", env_name, "db", "--delete-data", "--wait")
    with pytest.raises(docker.errors.NotFound):
        docker_client.volumes.get(volume.name)


def rows(cli: Cli, env: str, service: str) -> int:
    """Catalogue rows of the service (by its name or a removed NAME.removed.ID) and its jobs,
    operations, releases and worker targets."""
    engine = sqlalchemy.create_engine(cli.env["ORCH_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            ids = [r[0] for r in conn.execute(sqlalchemy.text(
                "SELECT s.id FROM service s JOIN environment e ON e.id = s.env_id WHERE e.name = :env "
                "AND (s.name = :svc OR s.name LIKE :removed)"), {"env": env, "svc": service,
                                                                 "removed": f"{service}.removed.%"})]
            count = len(ids)
            for table in ("job", "operation", "release", "workertarget"):
                for svc_id in ids:
                    count += conn.execute(sqlalchemy.text(f"SELECT count(*) FROM {table} WHERE service_id = :i"),
                                          {"i": svc_id}).scalar_one()
            return count
    finally:
        engine.dispose()


def test_env_rm_removes_every_service_and_frees_the_name(cli: Cli, docker_client: docker.DockerClient) -> None:
    name = f"r{uuid.uuid4().hex[:8]}"
    out = cli.ok("env", "create", name, "--sandbox")  # logging and the service proxy run
    for op in [line.split()[1] for line in out.splitlines() if line.startswith("operation ")]:
        wait_op(cli, op, 60, succeed=True)
    try:
        cli.ok("services", "add", name, "web", "--type", "code", "--command", HTTPD, "--scale", "2")
        cli.ok("push", name, "web", SAMPLE_IMAGE, "--wait")
        assert len(containers(docker_client, name)) == 4
        cli.ok("env", "rm", name, "--wait")
        assert containers(docker_client, name, running=False) == {}
        assert name not in {e["name"] for e in json.loads(cli.ok("env", "list", "--json"))}
        assert cli("env", "show", name).exit_code == 2
        cli.ok("env", "create", name, "--sandbox", "--no-defaults")  # the name is free again
    finally:
        retire(cli.env["ORCH_DATABASE_URL"], name)
        remove_containers(docker_client, name)



def test_run_passes_on_output_and_exit_code_and_leaves_no_container(
        cli: Cli, env_name: str, docker_client: docker.DockerClient) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD, "--scale", "1")
    cli.ok("vars", "set", env_name, "web", "GREETING=hello")
    cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--wait")
    before = containers(docker_client, env_name, running=False)

    done = cli.popen("run", env_name, "web", "--", "sh", "-c", 'echo "$GREETING from $ORCH_KIND"; ls /var/www; exit 3')
    out, err = done.communicate(timeout=60)
    assert done.returncode == 3, (out, err)
    assert "hello from run" in out and "index.html" in out
    assert containers(docker_client, env_name, running=False) == before  # its container is gone
    op = ops_json(cli, env_name)[0]  # recorded: what ran, its output and exit code
    assert (op["kind"], op["state"], op["params"]["argv"][0]) == ("run", "failed", "sh")
    assert "@" in op["params"]["requested_by"]  # who asked: USER@HOST
    assert op["steps"][-1]["exit_code"] == 3 and "hello from run" in op["steps"][-1]["output"]
    ok = cli.popen("run", env_name, "web", "--", "true")
    assert ok.wait(timeout=60) == 0
    missing = cli("run", env_name, "nope", "--", "true")
    assert missing.exit_code == 2


def test_exec_runs_in_a_job(cli: Cli, env_name: str, docker_client: docker.DockerClient) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD, "--scale", "2")
    cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--wait")
    jobs = jobs_json(cli, env_name, "web")
    target = jobs[1]["id"]
    done = cli.popen("exec", env_name, "web", "--job", target, "--", "sh", "-c", "echo job=$ORCH_JOB; exit 4")
    out, err = done.communicate(timeout=60)
    assert done.returncode == 4 and f"job={target}" in out, (out, err)
    first = cli.popen("exec", env_name, "web", "--", "cat", "/var/www/index.html")
    out, _ = first.communicate(timeout=60)
    assert first.returncode == 0 and "sample app" in out
    unknown = cli("exec", env_name, "web", "--job", "nope", "--", "true")
    assert unknown.exit_code == 2 and "no running job nope" in unknown.output
    assert containers(docker_client, env_name, "web") == {j["id"]: j["container_id"] for j in jobs}


def test_commands_that_start_operations_print_json(cli: Cli, env_name: str) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD, "--scale", "1")
    started = json.loads(cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--json"))
    assert set(started) == {"operation"} and isinstance(started["operation"], int)
    wait_op(cli, started["operation"], 60, succeed=True)
    result = cli("scale", env_name, "web", "2", "--json", "--wait")
    assert result.exit_code == 0 and json.loads(result.stdout) == {"operation": started["operation"] + 1}
    assert len(jobs_json(cli, env_name, "web")) == 2


def test_run_streams_output_past_what_the_operation_keeps(cli: Cli, env_name: str) -> None:
    cli.ok("services", "add", env_name, "web", "--type", "code", "--command", HTTPD, "--scale", "0")
    cli.ok("push", env_name, "web", SAMPLE_IMAGE, "--wait")
    done = cli.popen("run", env_name, "web", "--", "seq", "1", "60000")  # about 330 KiB
    out, err = done.communicate(timeout=120)
    assert done.returncode == 0, err
    whole = "".join(f"{n}\n" for n in range(1, 60001))
    # Printed: the whole output, or (when it came faster than the CLI read it past what the
    # operation keeps) its end, with a line saying exactly how much was not kept.
    missed = re.findall(r"^\[\.\.\. (\d+) characters of output not kept \.\.\.\]$", err, flags=re.MULTILINE)
    assert out == whole[sum(map(int, missed)):] and len(missed) <= 1, (missed, out[:40])
    assert out.endswith("60000\n") and len(out) >= 256 * 1024
    step = ops_json(cli, env_name)[0]["steps"][-1]
    assert step["output"].endswith("60000\n") and step["output_dropped"] > 0
    assert len(step["output"]) == 256 * 1024
