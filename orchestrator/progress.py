"""Live progress of an operation for people at a terminal: one line per step change. It reads
an operation as the catalogue's model or as the API's JSON (``cli.remote.view``), so it imports
no model: a CLI that follows an operation through the API stays light."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.models import OperationPublic

_MARK = {  # by StepState (a StrEnum: its members are these strings)
    "pending": "..",
    "running": "->",
    "succeeded": "ok",
    "failed": "!!",
    "skipped": "--",
}


def follow(load: Callable[[], OperationPublic], echo: Callable[[str], None], poll: float = 0.1) -> int:
    """Print each step as it changes until the operation ends; 0 if it succeeded, else 1."""
    progress = Progress(echo)
    while True:
        op = load()
        progress.update(op)
        if op.state in ("succeeded", "failed", "cancelled"):
            progress.done(op)
            return 0 if op.state == "succeeded" else 1
        time.sleep(poll)


class Progress:
    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.t0 = time.monotonic()
        self.seen: dict[str, str] = {}
        self.shown: dict[str, int] = {}  # characters of each step's output printed
        self.op_state: str | None = None

    def _line(self, text: str) -> None:
        self.echo(f"[{time.monotonic() - self.t0:6.1f}s] {text}")

    def update(self, op: OperationPublic) -> None:
        if op.state != self.op_state:
            self.op_state = op.state
            self._line(f"operation {op.id} {op.kind} {op.env}/{op.service}: {op.state}")
        total = len(op.steps)
        for step in op.steps:
            key = f"{step.stage}:{step.name}"
            chars = step.output_dropped + len(step.output or "")  # from the output's start
            if step.output and chars > self.shown.get(key, 0):  # a build's output
                start = max(0, self.shown.get(key, 0) - step.output_dropped)
                if step.output_dropped > self.shown.get(key, 0):
                    self.echo(f"           | [... {step.output_dropped - self.shown.get(key, 0)} "
                              "characters not kept ...]")
                for line in step.output[start:].splitlines():
                    self.echo(f"           | {line}")
                self.shown[key] = chars
            if self.seen.get(key) == step.state or step.state == "pending":
                continue
            self.seen[key] = step.state
            done = sum(1 for s in op.steps if s.state in ("succeeded", "skipped"))
            error = f": {step.error}" if step.error else ""
            self._line(f"  {_MARK[step.state]} [{done}/{total}] {step.name} {step.state}{error}")

    def done(self, op: OperationPublic) -> None:
        self.update(op)
        if op.error:
            self._line(f"error: {op.error}")
        self._line(f"operation {op.id} {op.state}")
