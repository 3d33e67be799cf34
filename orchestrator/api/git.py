"""``git push`` to a code service: git's smart HTTP protocol at /git/{env}/{svc}.git, served by
Debian's ``git http-backend`` (CGI), authenticated by the platform's tokens (basic auth, the token
as the password). Each service has a bare repository; its post-receive hook runs
``orchestrator git receive ENV SVC``, which builds each pushed branch's commit and redeploys:
what it prints reaches the pusher as ``remote:`` lines."""

from __future__ import annotations

import base64
import binascii
import os
import shlex
import subprocess
import sys
from pathlib import Path

from fastapi import APIRouter, Request, Response, status
from starlette.concurrency import run_in_threadpool

from orchestrator import catalogue, rules
from orchestrator.errors import BadInput
from orchestrator.models import ServiceType
from orchestrator.platform import Platform

HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"
PUSH_TIMEOUT = 3600  # seconds a push (its build and operation included) may take
HOOK = """#!/bin/sh
# Written by the platform: each pushed branch is built and deployed (orchestrator git receive).
exec {python} -m orchestrator.cli git receive {env} {svc}
"""


def repository(root: Path, env: str, svc: str) -> Path:
    """The service's bare repository, made (with its hook) on first use."""
    path = root / env / f"{svc}.git"
    if not (path / "HEAD").exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        subprocess.run(["git", "init", "--bare", "--quiet", str(path)], check=True, capture_output=True)
    hook = path / "hooks" / "post-receive"
    text = HOOK.format(python=shlex.quote(sys.executable), env=env, svc=svc)
    if not hook.exists() or hook.read_text() != text:
        hook.write_text(text)
        hook.chmod(0o700)
    return path


def _unauthorized(message: str) -> Response:
    return Response(f"{message}\n", status_code=status.HTTP_401_UNAUTHORIZED, media_type="text/plain",
                    headers={"WWW-Authenticate": 'Basic realm="orchestrator"'})


def _token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        _user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return password or None


def git_router(platform: Platform) -> APIRouter:
    router = APIRouter()

    @router.api_route("/git/{env}/{svc}.git/{path:path}", methods=["GET", "POST"], include_in_schema=False)
    async def git(env: str, svc: str, path: str, request: Request) -> Response:
        token = _token(request)
        if token is None:
            return _unauthorized("a token is needed: git remote add platform http://user:TOKEN@HOST/git/ENV/SVC.git")
        with platform.reader() as s:
            role = catalogue.role_of_token(session=s, raw=token)
            if role is None:
                return _unauthorized("that token is not valid")
            try:
                rules.check_name("environment", env)
                rules.check_name("service", svc)
                _environment, service = catalogue.get_service(session=s, env=env, name=svc)
            except BadInput as exc:  # NotFound included
                return Response(f"{exc}\n", status_code=status.HTTP_404_NOT_FOUND, media_type="text/plain")
        if service.type != ServiceType.code:
            return Response(f"{svc} is a {service.type} service: only code services take pushes\n",
                            status_code=status.HTTP_404_NOT_FOUND, media_type="text/plain")
        body = await request.body()
        return await run_in_threadpool(_backend, platform, env, svc, path, request, body, role)

    return router


def _backend(platform: Platform, env: str, svc: str, path: str, request: Request, body: bytes,
             role: str) -> Response:
    root = Path(platform.settings.git_dir)
    repository(root, env, svc)
    cgi = {
        **os.environ,  # the hook's `orchestrator` reaches the same catalogue and broker
        "GIT_PROJECT_ROOT": str(root),
        "GIT_HTTP_EXPORT_ALL": "1",
        "PATH_INFO": f"/{env}/{svc}.git/{path}",
        "REQUEST_METHOD": request.method,
        "QUERY_STRING": request.url.query,
        "CONTENT_TYPE": request.headers.get("content-type", ""),
        "CONTENT_LENGTH": str(len(body)),
        "REMOTE_USER": str(role),  # set: http-backend takes pushes (receive-pack)
        "REMOTE_ADDR": request.client.host if request.client else "",
        "HTTP_CONTENT_ENCODING": request.headers.get("content-encoding", ""),
        "GIT_PROTOCOL": request.headers.get("git-protocol", ""),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                    os.environ.get("PYTHONPATH")])),
    }
    try:
        done = subprocess.run([HTTP_BACKEND], input=body, env=cgi, capture_output=True, timeout=PUSH_TIMEOUT)
    except subprocess.TimeoutExpired:
        return Response("the push took too long\n", status_code=status.HTTP_504_GATEWAY_TIMEOUT)
    head, _, content = done.stdout.partition(b"\r\n\r\n")
    if not _:
        head, _, content = done.stdout.partition(b"\n\n")
    headers: dict[str, str] = {}
    code = status.HTTP_200_OK
    for line in head.decode(errors="replace").splitlines():
        name, _, value = line.partition(":")
        if name.lower() == "status":
            code = int(value.strip().split()[0])
        elif name.strip():
            headers[name.strip()] = value.strip()
    if done.returncode != 0 and not content:
        return Response(done.stderr.decode(errors="replace")[-2000:] or "git http-backend failed\n",
                        status_code=status.HTTP_500_INTERNAL_SERVER_ERROR, media_type="text/plain")
    media = headers.pop("Content-Type", None)
    return Response(content, status_code=code, headers=headers, media_type=media)
