"""The CLI as a client of the HTTP API. With ``ORCH_API_URL`` set (and ``ORCH_API_TOKEN``), the
commands that start an operation (``push IMAGE``, ``redeploy``, ``scale``, ``rollback``, ``worker
scale``) and the ones that read or follow one (``ops show``, ``ops watch``, ``--wait``) ask a running
``orchestrator api``, which has the catalogue and the broker open already, instead of opening them
in this process: such a call loads the standard library and click only, no SQLAlchemy, pydantic or
Celery (half a second of imports, and the broker's connection, saved per call). Every other
command, and all of them without ``ORCH_API_URL``, use the catalogue directly.

The answer keeps the CLI's contract: a refused request is one line on stderr and exit 2 (the API's
own words), an API that cannot be reached or fails is one line and exit 1.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from orchestrator.errors import BadInput

if TYPE_CHECKING:
    from orchestrator.cli import wire

ENV_FILE = ".orchestrator.env"  # the settings file (orchestrator.settings reads it too)
TIMEOUT = 30.0  # seconds one request may take


class ApiUnavailable(Exception):
    """The API could not be reached, or failed (5xx; a redirect, 408, 429): not the request's fault (exit 1)."""


@dataclass(frozen=True)
class Remote:
    url: str  # where `orchestrator api` listens, e.g. http://127.0.0.1:8000 (/api/v1 is added)
    token: str

    def get(self, path: str) -> Any:
        return self.call("GET", path)[0]

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.call("POST", path, body or {})[0]

    def poll(self, path: str, etag: str | None, wait: float) -> tuple[Any, str | None]:
        """A long poll: ``path``'s answer and its ETag as soon as it differs from ``etag``, or
        (None, ``etag``) when it did not change within ``wait`` seconds (the API's 304)."""
        query = f"{path}?wait={wait:g}" if etag is not None else path
        return self.call("GET", query, headers={"If-None-Match": etag} if etag is not None else {},
                         timeout=TIMEOUT + wait)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, *,
             headers: dict[str, str] | None = None, timeout: float = TIMEOUT) -> tuple[Any, str | None]:
        """``path`` under /api/v1, quoted part by part by the caller (``quoted``): the answer's
        JSON (None for a 304) and its ETag. (The HTTP client is imported here: ``--help`` loads
        this module and needs none of it.)"""
        from orchestrator.cli import wire

        url = f"{self.url}/api/v1{path}"
        data = None if body is None else json.dumps(body).encode()
        sent = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json",
                "Accept": "application/json", **(headers or {})}
        try:
            if url.startswith("http://") and not _proxied():
                answer = wire.request(url, method, sent, data, timeout)
            else:
                answer = _by_urllib(url, method, sent, data, timeout)
            if answer.status == 304:  # not changed (a long poll that waited in vain)
                return None, answer.headers.get("etag")
            if 200 <= answer.status < 300:
                return json.loads(answer.body or b"null"), answer.headers.get("etag")
        except (wire.BadAnswer, OSError, ValueError) as exc:
            raise ApiUnavailable(f"the API at {self.url} cannot be reached: {exc}") from None
        detail = _detail(answer)
        if answer.status >= 500 or answer.status < 400 or answer.status in (408, 429):  # not the request's fault
            raise ApiUnavailable(f"the API at {self.url} answered {answer.status}: {detail}")
        raise BadInput(detail)  # 4xx: the request was refused, nothing changed


def _by_urllib(url: str, method: str, headers: dict[str, str], data: bytes | None, timeout: float) -> wire.Answer:
    """An https:// request (or one through a proxy of ``http_proxy``), by the standard library
    (imported here: only these need it). A redirect is answered as it is, not followed (the
    token would go to wherever it points)."""
    import http.client
    import urllib.error
    import urllib.request

    from orchestrator.cli import wire

    class Unfollowed(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    request = urllib.request.Request(url, method=method, data=data, headers=headers)
    try:
        with urllib.request.build_opener(Unfollowed).open(request, timeout=timeout) as answer:
            return wire.Answer(answer.status, answer.reason, {k.lower(): v for k, v in answer.headers.items()},
                               answer.read())
    except urllib.error.HTTPError as exc:
        try:
            body = exc.read()
        except (OSError, http.client.HTTPException):
            body = b""
        return wire.Answer(exc.code, str(exc.reason), {k.lower(): v for k, v in (exc.headers or {}).items()}, body)
    except urllib.error.URLError as exc:
        raise OSError(exc.reason) from None
    except http.client.HTTPException as exc:
        raise wire.BadAnswer(str(exc) or type(exc).__name__) from None


def _proxied() -> bool:
    """Whether the environment names an HTTP proxy: then urllib asks (it knows ``no_proxy``)."""
    return any(os.environ.get(name) for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"))


def quoted(*parts: str) -> str:
    """A path of names, each quoted (a name never holds a slash, but input is input)."""
    return "".join("/" + urllib.parse.quote(part, safe="") for part in parts)


def _detail(answer: wire.Answer) -> str:
    """The API's reason, on one line: its ``detail`` (a validation error's list, shortened)."""
    try:
        detail = json.loads(answer.body).get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):  # FastAPI's 422: [{"loc": [...], "msg": ...}]
        detail = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', [])[1:])}: {e.get('msg')}"
                           for e in detail if isinstance(e, dict))
    text = str(detail) if detail else f"HTTP {answer.status} {answer.reason}"
    return " ".join(text.split())[:2000]


def remote() -> Remote | None:
    """The API to ask, from ``ORCH_API_URL`` and ``ORCH_API_TOKEN`` (the environment first, then
    ``.orchestrator.env`` in the working directory); None when no URL is set."""
    values = {key: os.environ[key] for key in ("ORCH_API_URL", "ORCH_API_TOKEN") if key in os.environ}
    if len(values) < 2:
        values = {**_env_file(Path(ENV_FILE)), **values}
    url = values.get("ORCH_API_URL", "").strip().rstrip("/")
    if not url:
        return None
    if not url.startswith(("http://", "https://")):
        raise BadInput(f"ORCH_API_URL {url!r} is not an http:// or https:// URL")
    url = url.removesuffix("/api/v1")
    token = values.get("ORCH_API_TOKEN", "").strip()
    if not token:
        raise BadInput("ORCH_API_URL is set but ORCH_API_TOKEN is not (`orchestrator tokens create NAME`)")
    for key, value in (("ORCH_API_URL", url), ("ORCH_API_TOKEN", token)):
        if any(c.isspace() or not c.isprintable() for c in value):  # a pasted line break, say
            raise BadInput(f"{key} holds a space, a line break or another control character")
    return Remote(url, token)


def _env_file(path: Path) -> dict[str, str]:
    """The ORCH_API_* lines of a dotenv file: KEY=VALUE, optionally quoted; comments skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    found: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.strip().removeprefix("export ").partition("=")
        key, value = key.strip(), value.strip()
        if sep and key in ("ORCH_API_URL", "ORCH_API_TOKEN"):
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            found[key] = value
    return found


def view(data: Any) -> Any:
    """JSON as attributes (an operation and its steps read as the catalogue's models read)."""
    if isinstance(data, dict):
        return SimpleNamespace(**{key: view(value) for key, value in data.items()})
    if isinstance(data, list):
        return [view(item) for item in data]
    return data
