"""Issue 4, end to end: databases, caches and a code service that uses them, for real.

Real Redis broker, a real node process, the real dockerd and the locally built images
(scripts/build-images). Every check looks at Docker itself, at the service's own protocol
(SQL, Redis, memcached, HTTP) or at the catalogue through the CLI's JSON.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator

import docker
import psycopg
import pytest

from tests.conftest import Cli, containers
from tests.harness import HTTPD, SAMPLE_IMAGE
from tests.helpers import ops_json
from tests.integration.service_helpers import (
    MARIADB,
    MEMCACHED,
    POSTGRES,
    PYAPP,
    PYAPP_WEB,
    REDIS,
    add_and_wait,
    container_env,
    deploy_port,
    get_json,
    remove_env_leftovers,
    text,
    the_container,
    vars_json,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def env(cli: Cli, env_name: str, docker_client: docker.DockerClient) -> Iterator[str]:
    """The sandbox env of ``env_name``; its containers and its data volumes go afterwards."""
    yield env_name
    remove_env_leftovers(cli, docker_client, env_name)


# --- tests -----------------------------------------------------------------------------------------


def test_code_service_reaches_postgres_and_redis_and_data_survives_redeploy(
        cli: Cli, env: str, docker_client: docker.DockerClient) -> None:
    add_and_wait(cli, env, "db", "--type", "postgresql", "--image", POSTGRES)
    add_and_wait(cli, env, "cache", "--type", "redis", "--image", REDIS)
    cli.ok("services", "add", env, "web", "--type", "code", "--command", PYAPP_WEB)
    assert containers(docker_client, env, "web") == {}  # nothing before the first push
    cli.ok("push", env, "web", PYAPP, "--wait")

    report = get_json(deploy_port(cli, env, "web"))
    assert report["database"] == "ok", report
    assert report["redis"] == "ok", report

    # A row written through the code service's own DATABASE_URL...
    url = vars_json(cli, env, "web", secrets=True)["DATABASE_URL"]["value"]
    with psycopg.connect(url, connect_timeout=5) as conn:
        conn.execute("create table notes (id serial primary key, body text not null)")
        conn.execute("insert into notes (body) values ('kept across redeploys')")

    db_before = the_container(docker_client, env, "db")
    port_before = deploy_port(cli, env, "db")
    volumes_before = [m["Name"] for m in db_before.attrs["Mounts"] if m["Type"] == "volume"]
    assert volumes_before == [f"orch_{env}_db_data"], db_before.attrs["Mounts"]
    labels = docker_client.volumes.get(volumes_before[0]).attrs["Labels"]  # cleaned up by label
    assert labels == {"orchestrator.env": env, "orchestrator.service": "db"}, labels

    # ...survives a redeploy of the database: new container, same port, same named volume.
    cli.ok("redeploy", env, "db", "--wait")
    db_after = the_container(docker_client, env, "db")
    assert db_after.id != db_before.id
    assert deploy_port(cli, env, "db") == port_before
    assert [m["Name"] for m in db_after.attrs["Mounts"] if m["Type"] == "volume"] == volumes_before
    assert vars_json(cli, env, "web", secrets=True)["DATABASE_URL"]["value"] == url
    with psycopg.connect(url, connect_timeout=5) as conn:
        rows = conn.execute("select body from notes").fetchall()
    # (bytes while the image's database is SQL_ASCII: see test_postgres_database_is_utf8)
    assert [text(body) for (body,) in rows] == ["kept across redeploys"]
    assert get_json(deploy_port(cli, env, "web"))["database"] == "ok"  # the app's URL stays true

    # One copy of the data: scale above 1 is refused, nothing changes.
    ops_before = len(ops_json(cli, env))
    refused = cli("scale", env, "db", "2")
    assert refused.exit_code == 2, refused.output
    assert "scale" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert len(ops_json(cli, env)) == ops_before
    assert len(containers(docker_client, env, "db")) == 1


def test_postgres_database_is_utf8(cli: Cli, env: str) -> None:
    add_and_wait(cli, env, "db", "--type", "postgresql", "--image", POSTGRES)
    cli.ok("services", "add", env, "web", "--type", "code", "--command", PYAPP_WEB)
    url = vars_json(cli, env, "web", secrets=True)["DATABASE_URL"]["value"]
    with psycopg.connect(url, connect_timeout=5) as conn:
        encoding = conn.execute("show server_encoding").fetchone()
        assert encoding is not None and text(encoding[0]) == "UTF8"
        assert conn.execute("select 'caf\u00e9'::text").fetchone() == ("caf\u00e9",)


def test_database_scale_above_one_refused_at_creation(cli: Cli, env: str) -> None:
    for kind, image in (("postgresql", POSTGRES), ("mysql", MARIADB)):
        refused = cli("services", "add", env, "db2", "--type", kind, "--image", image, "--scale", "2")
        assert refused.exit_code == 2, refused.output
        assert "scale" in refused.stderr
        listed = json.loads(cli.ok("services", "list", env, "--json"))
        assert [s["name"] for s in listed] == []
    assert ops_json(cli, env) == []


def test_mariadb_deploys_and_accepts_tcp(cli: Cli, env: str, docker_client: docker.DockerClient) -> None:
    add_and_wait(cli, env, "mdb", "--type", "mysql", "--image", MARIADB)
    port = deploy_port(cli, env, "mdb")

    # The MySQL protocol greets first: a handshake packet of protocol version 10.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        greeting = sock.recv(1024)
    assert len(greeting) > 5 and greeting[4] == 10, greeting
    container = the_container(docker_client, env, "mdb")
    mounts = [m["Name"] for m in container.attrs["Mounts"] if m["Type"] == "volume"]
    assert mounts == [f"orch_{env}_mdb_data"]
    image_env = container_env(container)
    assert image_env["MYSQL_USER"] == "app" and image_env["MYSQL_DATABASE"] == "mdb"
    assert image_env["MYSQL_PASSWORD"] and image_env["MYSQL_ROOT_PASSWORD"]

    # A code service gets a mysql:// DATABASE_URL with the same credentials and port.
    cli.ok("services", "add", env, "web", "--type", "code", "--command", PYAPP_WEB)
    url = vars_json(cli, env, "web", secrets=True)["DATABASE_URL"]["value"]
    assert url == f"mysql://app:{image_env['MYSQL_PASSWORD']}@127.0.0.1:{port}/mdb"


def test_mariadb_app_credentials_work(cli: Cli, env: str, docker_client: docker.DockerClient) -> None:
    add_and_wait(cli, env, "mdb", "--type", "mysql", "--image", MARIADB)
    port = deploy_port(cli, env, "mdb")
    found = vars_json(cli, env, "mdb", secrets=True)
    password, database = found["MYSQL_PASSWORD"]["value"], found["MYSQL_DATABASE"]["value"]
    result = the_container(docker_client, env, "mdb").exec_run(
        ["mariadb", "-uapp", f"-p{password}", "-h127.0.0.1", f"-P{port}", database, "-N",
         "-e", "select current_user()"])
    assert result.exit_code == 0, result.output
    assert result.output.decode().strip() == "app@%"


def test_memcached_answers_version(cli: Cli, env: str) -> None:
    add_and_wait(cli, env, "mc", "--type", "memcached", "--image", MEMCACHED)
    port = deploy_port(cli, env, "mc")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"version\r\n")
        answer = sock.recv(256)
    assert answer.startswith(b"VERSION ") and answer.endswith(b"\r\n"), answer

    cli.ok("services", "add", env, "web", "--type", "code", "--command", PYAPP_WEB)
    found = vars_json(cli, env, "web")
    assert found["MEMCACHED_URL"]["value"] == f"memcached://127.0.0.1:{port}"
    assert found["MEMCACHED_URL"]["source"] == "connection"


def test_variables_sources_masking_and_precedence(cli: Cli, env: str,
                                                  docker_client: docker.DockerClient) -> None:
    add_and_wait(cli, env, "db", "--type", "postgresql", "--image", POSTGRES)
    add_and_wait(cli, env, "cache", "--type", "redis", "--image", REDIS)
    cli.ok("services", "add", env, "web", "--type", "code", "--command", PYAPP_WEB)
    cli.ok("vars", "set", env, "web", "GREETING=hi", "API_TOKEN=tok-123456")

    masked = vars_json(cli, env, "web")
    shown = vars_json(cli, env, "web", secrets=True)
    db_port, cache_port = deploy_port(cli, env, "db"), deploy_port(cli, env, "cache")

    assert {n: r["source"] for n, r in masked.items() if r["source"] != "job"} == {
        "DATABASE_URL": "connection", "DB_URL": "connection",
        "REDIS_URL": "connection", "CACHE_URL": "connection",
        "GREETING": "user", "API_TOKEN": "user",
    }
    job_vars = {n for n, r in masked.items() if r["source"] == "job"}
    assert {"PORT", "ORCH_ENV", "ORCH_SERVICE", "ORCH_JOB", "ORCH_RELEASE"} <= job_vars

    # Secrets masked unless asked: passwords in URLs and secret-looking names.
    assert masked["DATABASE_URL"]["secret"] and masked["REDIS_URL"]["secret"]
    assert masked["DATABASE_URL"]["value"] == f"postgresql://app:*****@127.0.0.1:{db_port}/db"
    assert masked["REDIS_URL"]["value"].endswith(f"*****@127.0.0.1:{cache_port}/0")
    assert masked["API_TOKEN"]["value"] == "*****" and masked["API_TOKEN"]["secret"]
    assert masked["GREETING"]["value"] == "hi" and not masked["GREETING"]["secret"]
    assert shown["API_TOKEN"]["value"] == "tok-123456"
    password = re.fullmatch(rf"postgresql://app:(.+)@127\.0\.0\.1:{db_port}/db",
                            shown["DATABASE_URL"]["value"])
    assert password and "*" not in password.group(1)
    assert re.fullmatch(rf"redis://:[^*@]+@127\.0\.0\.1:{cache_port}/0", shown["REDIS_URL"]["value"])
    text = cli.ok("vars", "list", env, "web")
    assert password.group(1) not in text and "tok-123456" not in text

    # The database's own variables: the platform's, the password masked.
    db_vars = vars_json(cli, env, "db")
    assert db_vars["POSTGRES_PASSWORD"]["source"] == "platform"
    assert db_vars["POSTGRES_PASSWORD"]["value"] == "*****"
    assert vars_json(cli, env, "db", secrets=True)["POSTGRES_PASSWORD"]["value"] == password.group(1)

    # Which wins (README): connection < user < platform. A user DATABASE_URL wins over the
    # connection one; a user POSTGRES_PASSWORD does not win over the stored credentials.
    cli.ok("vars", "set", env, "web", "DATABASE_URL=postgresql://elsewhere.invalid/x")
    assert vars_json(cli, env, "web")["DATABASE_URL"] == {
        "name": "DATABASE_URL", "source": "user", "secret": False,
        "value": "postgresql://elsewhere.invalid/x"}
    cli.ok("vars", "set", env, "db", "POSTGRES_PASSWORD=mine")
    db_row = vars_json(cli, env, "db", secrets=True)["POSTGRES_PASSWORD"]
    assert db_row["source"] == "platform" and db_row["value"] == password.group(1)

    cli.ok("push", env, "web", PYAPP, "--wait")
    web = container_env(the_container(docker_client, env, "web"))
    assert web["DATABASE_URL"] == "postgresql://elsewhere.invalid/x"
    assert web["PORT"] == str(deploy_port(cli, env, "web"))
    assert web["GREETING"] == "hi" and web["API_TOKEN"] == "tok-123456"
    assert web["REDIS_URL"] == shown["REDIS_URL"]["value"]
    assert web["ORCH_ENV"] == env and web["ORCH_SERVICE"] == "web" and web["ORCH_RELEASE"] == "1"
    assert web["ORCH_KIND"] == "deploy" and web["ORCH_JOB"] in containers(docker_client, env, "web")
    assert get_json(int(web["PORT"]))["database"].startswith("error")  # it did go elsewhere


def test_user_cannot_override_platform_job_variables(cli: Cli, env: str,
                                                     docker_client: docker.DockerClient) -> None:
    cli.ok("services", "add", env, "web", "--type", "code", "--command", HTTPD)
    for name in ("PORT", "ORCH_ENV"):
        result = cli("vars", "set", env, "web", f"{name}=1")
        assert result.exit_code == 2 and name in result.stderr, result.output
    rows = json.loads(cli.ok("vars", "list", env, "web", "--json"))
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names)), f"listed twice: {names}"
    assert {r["name"]: r["source"] for r in rows}["PORT"] == "job"
    cli.ok("push", env, "web", SAMPLE_IMAGE, "--wait")
    job_env = container_env(the_container(docker_client, env, "web"))
    assert job_env["PORT"] == str(deploy_port(cli, env, "web")) and job_env["ORCH_ENV"] == env
