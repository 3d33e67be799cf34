"""Live progress lines read an operation as the catalogue's model or as the API's JSON alike."""

from __future__ import annotations

from typing import Any

from orchestrator.cli.remote import view
from orchestrator.progress import Progress


def op(state: str, steps: list[tuple[str, str, str]], **extra: Any) -> Any:
    return view({"id": 7, "kind": "redeploy", "env": "shop", "service": "web", "state": state, "error": None,
                 "steps": [{"stage": stage, "name": name, "state": st, "error": None, "output": output,
                            "output_dropped": 0} for stage, name, st, output in
                           [(int(s[0]), s[1], s[2], extra.get("output", {}).get(s[1])) for s in steps]]})


def test_each_step_change_is_one_line_counting_done_of_all() -> None:
    lines: list[str] = []
    progress = Progress(lines.append)
    progress.update(op("running", [("0", "stop a", "running"), ("0", "stop b", "pending"),
                                   ("1", "start c", "pending")]))
    progress.update(op("running", [("0", "stop a", "succeeded"), ("0", "stop b", "running"),
                                   ("1", "start c", "pending")], output={"stop b": "hello\n"}))
    progress.done(op("succeeded", [("0", "stop a", "succeeded"), ("0", "stop b", "succeeded"),
                                   ("1", "start c", "skipped")]))
    assert [line.split("] ", 1)[1] if line.startswith("[") else line for line in lines] == [
        "operation 7 redeploy shop/web: running",
        "  -> [0/3] stop a running",
        "  ok [1/3] stop a succeeded",
        "           | hello",  # a step's output (a build's), as it comes
        "  -> [1/3] stop b running",
        "operation 7 redeploy shop/web: succeeded",
        "  ok [3/3] stop b succeeded",
        "  -- [3/3] start c skipped",
        "operation 7 succeeded",
    ], lines
