"""The ``orchestrator`` command: a thin adapter over requests, the catalogue and the fleet.

Exit status: 0 success, 1 the operation failed, 2 bad input (one line on stderr, nothing changed).
Each module adds one family of commands to ``main``, imported when one of its commands runs
(``base.COMMANDS``): ``--help`` and each command load only what they use.
"""

from __future__ import annotations

import os
import sys

from orchestrator.cli.base import main

__all__ = ["main", "run"]


def run() -> None:
    """The console script. Ends the process at once when the command is done: Celery's result
    backend otherwise spends a fraction of a second tearing down connections at exit."""
    try:
        main.main(prog_name="orchestrator")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
