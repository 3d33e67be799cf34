"""The ``api`` fixture: ``orchestrator api`` in its own process with the test platform's
environment, and a token of each role (import ``api_fixture`` into a test module to use it)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from tests.conftest import Cli
from tests.harness import free_port, platform_process


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
