"""Helpers for the e2e tests that run platform processes (control worker, API, Flower, dev):
start one with the test platform's ORCH_* environment, wait until it is ready, always stop it.
Also the ``api`` fixture (import it into a test module to use it)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import ROOT, Cli


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (from the kernel's ephemeral range, so never a job's port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@contextmanager
def platform_process(args: list[str], env: dict[str, str], log: Path,
                     ready: Callable[[str], bool], timeout: float = 30) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m orchestrator.cli ARGS`` with ``env``; yields once ``ready(log text)`` holds."""
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args],
                                env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + timeout
        while not ready(log.read_text(errors="replace")):
            if proc.poll() is not None:
                raise RuntimeError(f"{args} exited {proc.returncode}: {log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{args} not ready in {timeout}s: {log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield proc
    finally:
        stop(proc)


def op_json(cli: Cli, op_id: int | str) -> dict[str, Any]:
    return json.loads(cli.ok("ops", "show", str(op_id), "--json"))  # type: ignore[no-any-return]


def wait_op(cli: Cli, op_id: int | str, timeout: float = 60) -> dict[str, Any]:
    """Poll ``ops show OP --json`` until the operation ends; return its last JSON."""
    deadline = time.monotonic() + timeout
    while True:
        op = op_json(cli, op_id)
        if op["state"] in ("succeeded", "failed"):
            return op
        if time.monotonic() > deadline:
            raise AssertionError(f"operation {op_id} still {op['state']} after {timeout}s: {op}")
        time.sleep(0.2)


@dataclass
class Api:
    base: str
    user: str
    support: str

    def call(self, method: str, path: str, token: str | None = None, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers.update(kwargs.pop("headers", {}))
        return requests.request(method, self.base + path, headers=headers, timeout=30, **kwargs)

    def as_user(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.call(method, path, self.user, **kwargs)

    def as_support(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.call(method, path, self.support, **kwargs)


def serving(base: str) -> bool:
    try:
        return requests.get(f"{base}/api/v1/openapi.json", timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


@pytest.fixture(scope="module", name="api")
def api_fixture(platform_env: dict[str, str], node: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """``orchestrator api --port P`` in its own process, and one token of each role."""
    cli = Cli(platform_env)
    suffix = uuid.uuid4().hex[:6]
    user = cli.ok("tokens", "create", f"user-{suffix}", "--role", "user").strip()
    support = cli.ok("tokens", "create", f"support-{suffix}", "--role", "support").strip()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("api") / "api.log"
    with platform_process(["api", "--port", str(port)], platform_env, log, ready=lambda _: serving(base)):
        yield Api(f"{base}/api/v1", user, support)
