"""Who asks for what the platform does (the log's "asked by"): set by each way in around a
request (the CLI its USER@HOST, the API "api", the task API "send_task"), read where operations
are recorded (``requests``). Light on purpose: the CLI sets it before it imports anything else."""

from __future__ import annotations

from contextvars import ContextVar

asker: ContextVar[str | None] = ContextVar("asker", default=None)


def cli_user() -> str:
    """Who runs this CLI: USER@HOST."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user}@{socket.gethostname()}"
