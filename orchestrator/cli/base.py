"""What every command shares: the command table and the group that loads each command's module
when it runs, the lazy context, the one place bad input becomes exit 2, output helpers, the
ENV SVC, --json and --wait options. Following an operation is in ``follow``.

Nothing here imports the catalogue, SQLAlchemy, pydantic or Celery: ``orchestrator --help`` loads
this module and click only (tests/unit/test_cli_startup.py).
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Sequence
from functools import cached_property
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar

import click

from orchestrator.cli.remote import ApiUnavailable
from orchestrator.errors import BadInput, one_line
from orchestrator.who import asker, cli_user

if TYPE_CHECKING:
    from orchestrator.cli.remote import Remote
    from orchestrator.platform import Platform
    from orchestrator.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    """Built lazily so ``--help`` and bad input need no database or broker; the one place the
    commands' settings and platform (the catalogue, and Celery once something is sent) are
    imported."""

    @cached_property
    def settings(self) -> Settings:
        from orchestrator.settings import get_settings

        return get_settings()

    @cached_property
    def platform(self) -> Platform:
        from orchestrator.platform import make_platform

        return make_platform(self.settings)

    @cached_property
    def remote(self) -> Remote | None:
        """The HTTP API to ask instead (``ORCH_API_URL``), for the commands that can; None: none."""
        from orchestrator.cli.remote import remote

        return remote()


pass_ctx = click.make_pass_decorator(Context, ensure=True)


def fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


# Each top-level command: the module of orchestrator.cli that adds it, and its line in
# `orchestrator --help` (None: a hidden command). A command's module is imported when the command
# runs, so each command loads what it uses and `--help` none of them; the lines are the first
# sentence of each command's help (test_cli_startup.py checks them against the commands).
COMMANDS: dict[str, tuple[str, str | None]] = {
    "api": ("processes", "Serve the HTTP API under /api/v1 (OpenAPI at /api/v1/openapi.json)."),
    "apply": ("manifest", "Make the environment what FILE declares: each change as the matching command would "
                          "make it (operations visible in `ops`); only what changed is redeployed."),
    "control": ("processes", "The control worker: runs the task API other services call (queue orchestrator)."),
    "dev": ("processes", "The whole platform in one process: catalogue, broker, a node for local Docker, the API."),
    "env": ("envs", "Environments: named sets of services."),
    "exec": ("deploys", "CMD in a running job's container (docker exec); its output streams here, its exit code "
                        "is ours."),
    "flower": ("processes", "Flower on the platform's broker, behind basic auth: every step of every operation."),
    "git": ("deploys", None),
    "hosts": ("hosts", "Docker hosts the platform runs jobs on."),
    "jobs": ("ops", "Jobs: one container each."),
    "logs": ("observe", "Lines of the environment's jobs (of SVC only, when given) and its platform events, oldest "
                        'first: TIME SERVICE JOB LINE, or with --json [{"time","env","service","job","kind","host",'
                        '"release","line"}] (with -f, one such object per line).'),
    "node": ("processes", "The Celery worker node of a Docker host."),
    "ops": ("ops", "Operations and their steps."),
    "plan": ("manifest", "Print what `apply FILE` would change (create, change, remove, redeploy); change nothing."),
    "push": ("deploys", "A new release of a code service: the first push deploys, later ones redeploy."),
    "redeploy": ("deploys", "Replace every job of the service with new ones from its current spec."),
    "registry": ("processes", "The platform's image registry (the CNCF distribution registry, Debian's "
                              "docker-registry)."),
    "releases": ("deploys", "Releases of code services."),
    "rollback": ("deploys", "Redeploy an earlier release."),
    "run": ("deploys", "A one-off job: CMD in a new container of the service (its current image, variables and "
                       "size) on a placed host; its output streams here, its exit code is ours, its container goes."),
    "scale": ("deploys", "Start only the extra jobs, or stop only the surplus."),
    "services": ("envs", "Services: how an environment's jobs start."),
    "sim": ("processes", "Simulated hosts: many hosts served by one process, for scale tests."),
    "sites": ("sites", "Sites: host names served by the environment's service proxy (HTTP, and HTTPS by SNI)."),
    "status": ("observe", "Every service (jobs running/wanted), each job's check and the firing alerts, from the "
                          'environment\'s monitoring; --json: {"services", "checks", "alerts", "monitoring": why '
                          "none}."),
    "tokens": ("processes", "Bearer tokens for the HTTP API."),
    "vars": ("envs", "User variables of a service (they take effect at the next redeploy)."),
    "worker": ("deploys", "Worker targets of a code service: jobs without a port, with their own command and scale."),
}


def load_commands(*names: str) -> None:
    """Import the modules that add these commands (every command's, when none is known)."""
    modules = {COMMANDS[n][0] for n in names if n in COMMANDS} or {module for module, _ in COMMANDS.values()}
    for module in sorted(modules):
        importlib.import_module(f"orchestrator.cli.{module}")


class OneLineGroup(click.Group):
    """Loads a command's module when the command is asked for (``COMMANDS``). Usage errors and
    refused requests end as one line on stderr and exit 2."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            load_commands(cmd_name)
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(COMMANDS) | set(self.commands))

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """click's own listing, from the table: the commands' modules stay unloaded."""
        shown = {name: summary for name, (_module, summary) in COMMANDS.items() if summary is not None}
        limit = formatter.width - 6 - max(map(len, shown))
        rows = [(name, click.Command(name, help=summary).get_short_help_str(limit))
                for name, summary in sorted(shown.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("standalone_mode", False)
        argv = args[0] if args else kwargs.get("args")
        if (argv is None and len(sys.argv) <= 1) or argv == []:
            # Bare `orchestrator`: its usage, readable, on stdout.
            click.echo(self.get_help(click.Context(self, info_name=kwargs.get("prog_name") or "orchestrator")))
            sys.exit(0)
        asked = asker.set(cli_user())  # what a command asks for says who asked
        try:
            return super().main(*args, **kwargs)
        except click.UsageError as exc:
            fail(" ".join(exc.format_message().split()))
        except BadInput as exc:
            fail(str(exc))
        except ApiUnavailable as exc:
            fail(str(exc), code=1)  # not the request's fault: exit 1, as a failed operation
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        except Exception as exc:
            if (unavailable := catalogue_unavailable(exc)) is None:
                raise
            fail(unavailable, code=1)  # not the request's fault: exit 1, as a failed operation
        finally:
            asker.reset(asked)


def catalogue_unavailable(exc: Exception) -> str | None:
    """What to say when ``exc`` is the catalogue's database failing; None for anything else.
    (SQLAlchemy is imported here, once something failed, not with every command.)"""
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    from orchestrator.dispatch import masked
    from orchestrator.settings import get_settings

    if not isinstance(exc, SQLAlchemyError):
        return None
    return (f"the catalogue is unavailable ({masked(get_settings().database_url)}): "
            f"{one_line(exc.orig if isinstance(exc, DBAPIError) else exc)}")


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """A small platform-as-a-service control plane."""


def env_svc(fn: F) -> F:
    """The ENV SVC arguments, as ``env_name`` and ``name``."""
    fn = click.argument("name", metavar="SVC")(fn)
    return click.argument("env_name", metavar="ENV")(fn)


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def _remember_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    ctx.meta["as_json"] = value
    return value


def wait_option(fn: F) -> F:
    """--wait (follow the operation to its end) and --json (print {"operation": ID}) of the
    commands that start an operation."""
    fn = click.option("--json", "as_json", is_flag=True, expose_value=False, callback=_remember_json,
                      help='Print {"operation": ID} (with --wait: only that, then the exit status).')(fn)
    return click.option("--wait", is_flag=True, help="Follow the operation to its end.")(fn)


def emit(data: Any) -> None:
    def plain(x: Any) -> Any:
        if hasattr(x, "model_dump"):  # a pydantic model (pydantic is not imported for --help)
            return x.model_dump(mode="json")
        if isinstance(x, SimpleNamespace):  # the API's JSON, read as attributes (remote.view)
            return {key: plain(value) for key, value in vars(x).items()}
        if isinstance(x, list):
            return [plain(i) for i in x]
        return x

    click.echo(json.dumps(plain(data), indent=2, default=str))


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    cells = [[("" if c is None else str(c)) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    # One write: click.echo flushes after each call, thousands of times for thousands of jobs.
    click.echo("\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells))


R = TypeVar("R")


def listing(rows: Sequence[R], *, as_json: bool, headers: Sequence[str],
            cells: Callable[[R], Sequence[Any]]) -> None:
    """Rows as JSON, or as a table with one line per row."""
    if as_json:
        emit(list(rows))
    else:
        table([cells(r) for r in rows], headers)
