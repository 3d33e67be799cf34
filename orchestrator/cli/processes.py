"""The platform's processes: a host's node, simulated hosts, the control worker, the API (and its tokens),
Flower, and ``dev`` (all of them in one process)."""

from __future__ import annotations

import sys

import click

from orchestrator import catalogue
from orchestrator.cli.base import Context, main, pass_ctx
from orchestrator.errors import BadInput
from orchestrator.models import Role


@main.group()
def node() -> None:
    """The Celery worker node of a Docker host."""


@node.command("run")
@click.argument("name")
@click.option("--concurrency", type=click.IntRange(1, 256), default=None, help="Steps run at once (threads).")
@click.option("--loglevel", default="INFO", show_default=True)
@pass_ctx
def node_run(ctx: Context, name: str, concurrency: int | None, loglevel: str) -> None:
    """Consume queue host.NAME and drive that host's Docker engine."""
    from workers.node import run_node

    run_node(ctx.platform, name, concurrency=concurrency or ctx.settings.node_concurrency,
             loglevel=loglevel)


@main.group()
def sim() -> None:
    """Simulated hosts: many hosts served by one process, for scale tests."""


@sim.command("run")
@click.option("--hosts", "count", type=click.IntRange(1, 10000), required=True, help="How many hosts.")
@click.option("--prefix", default="sim", show_default=True, help="Hosts are PREFIX1..PREFIXN.")
@click.option("--start-latency", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Seconds each container start takes.")
@click.option("--stop-latency", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Seconds each stop of a running container takes (at most the stop timeout).")
@click.option("--fail-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Probability that a start fails (its container exits at once).")
@click.option("--control", "control_dir", type=click.Path(file_okay=False), default=None,
              help="A directory watched for files kill-HOST: each kills its host (heartbeats stop, "
                   "its queue is no longer consumed).")
@click.option("--seed", type=int, default=None, help="Seed of the injected failures.")
@click.option("--concurrency", type=click.IntRange(1, 256), default=32, show_default=True,
              help="Steps run at once (threads).")
@click.option("--loglevel", default="INFO", show_default=True)
@pass_ctx
def sim_run(ctx: Context, count: int, prefix: str, start_latency: float, stop_latency: float, fail_rate: float,
            control_dir: str | None, seed: int | None, concurrency: int, loglevel: str) -> None:
    """Register hosts PREFIX1..PREFIXN (16 CPUs, 64 GiB each, address HOST.sim.invalid) and serve
    all their queues in this process, each host with an in-memory runtime where every image
    exists, until stopped (SIGTERM, Ctrl-C)."""
    from pathlib import Path

    from workers.sim import SimOptions, run_sim

    options = SimOptions(hosts=count, prefix=prefix, start_latency=start_latency, stop_latency=stop_latency,
                         fail_rate=fail_rate, seed=seed,
                         control_dir=Path(control_dir) if control_dir is not None else None)
    run_sim(ctx.platform, options, concurrency=concurrency, loglevel=loglevel)


@main.group()
def control() -> None:
    """The control worker: runs the task API other services call (queue orchestrator)."""


@control.command("run")
@click.option("--concurrency", type=int, default=4, show_default=True)
@click.option("--loglevel", default="INFO", show_default=True)
@pass_ctx
def control_run(ctx: Context, concurrency: int, loglevel: str) -> None:
    """Run the control worker (queue orchestrator) until stopped."""
    from workers.node import run_control

    run_control(ctx.platform, concurrency=concurrency, loglevel=loglevel)


@main.command()
@click.option("--port", type=int, default=None, help="Serve the HTTP API on this port.")
@click.option("--demo", is_flag=True, help="Run a push, a redeploy and an overlap redeploy, then exit.")
def dev(port: int | None, demo: bool) -> None:
    """The whole platform in one process: catalogue, broker, a node for local Docker, the API."""
    from workers.embedded import dev_settings, run_dev

    sys.exit(run_dev(dev_settings(), api_port=port, demo=demo, echo=click.echo))


@main.command()
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--host", "bind", default="127.0.0.1", show_default=True, help="Address to bind.")
@pass_ctx
def api(ctx: Context, port: int, bind: str) -> None:
    """Serve the HTTP API under /api/v1 (OpenAPI at /api/v1/openapi.json)."""
    from orchestrator.api.serve import serve

    serve(ctx.platform, port, bind)


@main.group()
def tokens() -> None:
    """Bearer tokens for the HTTP API."""


@tokens.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice([r.value for r in Role]), default="user", show_default=True)
@pass_ctx
def tokens_create(ctx: Context, name: str, role: str) -> None:
    """Print a new token once; only its hash is kept."""
    with ctx.platform.session() as s:
        raw = catalogue.create_token(session=s, name=name, role=Role(role))
        s.commit()
    click.echo(raw)


@main.command()
@click.option("--port", type=int, default=5555, show_default=True)
@click.option("--basic-auth", required=True, metavar="USER:PASS", envvar="ORCH_FLOWER_BASIC_AUTH",
              help="Flower's login; better from ORCH_FLOWER_BASIC_AUTH, so it is not in the command line.")
@click.option("--address", default="127.0.0.1", show_default=True)
@pass_ctx
def flower(ctx: Context, port: int, basic_auth: str, address: str) -> None:
    """Flower on the platform's broker, behind basic auth: every step of every operation. The
    login goes to Flower inside this process, never in another process's command line."""
    user, sep, password = basic_auth.partition(":")
    if not sep or not user or not password:
        raise BadInput("--basic-auth must be USER:PASS")
    ctx.platform.app.start([
        "flower", f"--port={port}", f"--address={address}", f"--basic-auth={basic_auth}",
        "--persistent=False", "--purge_offline_workers=60",
        # Each step's keyword arguments name its operation, environment, service, host and job.
        "--tasks_columns=name,uuid,state,kwargs,received,started,runtime,worker,result",
    ])


@main.group()
def registry() -> None:
    """The platform's image registry (the CNCF distribution registry, Debian's docker-registry)."""


@registry.command("run")
@click.option("--port", type=click.IntRange(1024, 65535), required=True)
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Where it keeps the images (made if missing).")
@click.option("--address", default="127.0.0.1", show_default=True, help="Where it listens.")
def registry_run(port: int, data_dir: str, address: str) -> None:
    """Serve the registry until stopped. Point the platform at it with ORCH_REGISTRY=ADDRESS:PORT:
    built images are pushed there, and nodes pull from it. Docker talks to a registry on
    127.0.0.0/8 without TLS; for another address, configure TLS or Docker's insecure-registries."""
    import os
    import shutil
    from pathlib import Path

    binary = shutil.which("docker-registry") or shutil.which("registry")
    if binary is None:
        raise BadInput("docker-registry is not installed (Debian: apt-get install docker-registry)")
    data = Path(data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    config = data / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        "storage:\n"
        f"  filesystem:\n    rootdirectory: {data / 'storage'}\n"
        "  delete:\n    enabled: true\n"
        "http:\n"
        f"  addr: {address}:{port}\n"
    )
    click.echo(f"registry on {address}:{port}, images in {data / 'storage'}: export ORCH_REGISTRY={address}:{port}")
    sys.stdout.flush()
    os.execv(binary, [binary, "serve", str(config)])
