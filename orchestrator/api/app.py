"""The HTTP API under /api/v1: a thin adapter over the catalogue and operations.

Bearer tokens (``orchestrator tokens create``) carry a role; support-only actions are checked
here, server-side. Bad input is a 4xx with a reason, never a 500; a 422 names the fields at
fault but never echoes what was sent (a body may hold a private key or a password).

/docs is Swagger UI served from the ``swagger_ui_bundle`` package: it works offline.
"""

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, Field, StrictBool, StrictInt
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlmodel import Session
from starlette.types import ASGIApp, Receive, Scope, Send
from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

from orchestrator import catalogue, operations, requests, rules, spec, who
from orchestrator import logs as env_logs
from orchestrator import status as env_status
from orchestrator.api.git import git_router
from orchestrator.catalogue import LoggingDown
from orchestrator.errors import BadInput, NotFound, one_line
from orchestrator.metrics import PlatformCollector
from orchestrator.models import (
    DashboardPublic,
    Environment,
    EnvironmentPublic,
    JobPublic,
    Operation,
    OperationPublic,
    ReleasePublic,
    Role,
    ServicePublic,
    ServiceType,
    SitePublic,
    VariableView,
)
from orchestrator.platform import Platform

MAX_NAME = 63
MAX_IMAGE = 512
MAX_COMMAND = requests.MAX_ARGV  # bytes of a service's command, like a one-off command's words
MAX_SIZE = 64  # characters of a size: xs ... xl, or MEMORY[:CPUS]
MAX_WAIT = 30.0  # seconds a long poll of an operation may wait (it holds one of the server's threads)
WAIT_POLL = 0.025  # seconds between two looks at a polled operation's version (one aggregate query)
# Seconds a long poll that saw only steps move waits for more before it answers: a redeploy's
# steps begin and end by the dozen, and each answer is the whole operation (an operation's own
# change of state, its end, is answered at once).
WAIT_GATHER = 0.1

DESCRIPTION = """\
The orchestrator's control plane: environments of services run as containers on Docker hosts.

Every call takes a bearer token (`orchestrator tokens create NAME --role user|support`); some
settings are the support role's only (403 for the user role). A call that changes what runs
answers **202** with the operation it started (`GET /api/v1/operations/{id}` follows it). Bad
input is a 4xx whose `detail` is one line (a 422: a list naming the fields at fault), and
changes nothing; secrets (credentials, private keys) are never in a response.
"""

TAGS = [
    {"name": "envs", "description": "Environments: named sets of services, with their proxy's ports."},
    {"name": "services", "description": "Services: how an environment's jobs start, and how many run."},
    {"name": "releases", "description": "Releases of code services: pushed, listed, rolled back to."},
    {"name": "workers", "description": "Worker targets of code services: jobs that serve no traffic."},
    {"name": "variables", "description": "User variables of a service, and the automatic ones."},
    {"name": "commands", "description": "One-off commands: in a new container, or in a running job."},
    {"name": "sites", "description": "Host names the environment's service proxy routes to code services."},
    {"name": "jobs", "description": "Jobs: the containers the platform runs."},
    {"name": "logs", "description": "What the environment's jobs wrote and the platform did; how its services are."},
    {"name": "operations", "description": "Operations: every change, recorded and run step by step."},
    {"name": "hooks", "description": "Webhooks for code pushes."},
]

DOCS_STATIC = "/docs/static"  # Swagger UI's own files, from the swagger_ui_bundle package
DOCS_OPENAPI = "/docs/openapi.json"  # the document as OpenAPI 3.0, which that Swagger UI reads


class OperationAccepted(BaseModel):
    id: int
    kind: str
    state: str
    url: str


class RemovalAccepted(OperationAccepted):
    service: str


class PushBody(BaseModel):
    image: str = Field(min_length=1, max_length=MAX_IMAGE)
    support: StrictBool = False  # push to a service marked not redeployable (the support role only)


class HookBody(BaseModel):
    env: str = Field(min_length=1, max_length=MAX_NAME)
    service: str = Field(min_length=1, max_length=MAX_NAME)
    image: str = Field(min_length=1, max_length=MAX_IMAGE)
    support: StrictBool = False


class RedeployBody(BaseModel):
    support: StrictBool = False


class ScaleBody(BaseModel):
    scale: StrictInt = Field(ge=0, le=rules.MAX_SCALE)  # true is not 1


class WorkerScaleBody(BaseModel):
    scale: str = Field(pattern=r"^[+-]?\d{1,4}$", description="N, +N or -N")


class EnvBody(BaseModel):
    """A new environment (its name a DNS label). Proxy ports not given are the first free ones
    of the platform's range."""

    name: str = Field(max_length=255)
    sandbox: StrictBool = False  # a sandbox gets no monitoring service
    defaults: StrictBool = True  # create and deploy the included services (logging, the proxy, monitoring)
    http_port: StrictInt | None = None
    https_port: StrictInt | None = None


class ServiceBody(BaseModel):
    """A new service. Code services run their releases (``/push``), so take no image."""

    name: str = Field(max_length=255)
    type: ServiceType
    image: str | None = Field(default=None, max_length=MAX_IMAGE)
    command: str | None = Field(default=None, max_length=MAX_COMMAND)  # run through /bin/sh -c; $PORT is set
    scale: StrictInt = Field(default=1, ge=0, le=rules.MAX_SCALE)
    size: str = Field(default="s", max_length=MAX_SIZE, description="xs, s, m, l, xl or MEMORY[:CPUS]")


class ServicePatch(BaseModel):
    """What the next jobs of a service start with; each takes effect at its next redeploy."""

    # Any role: the image (not code services: theirs is their release's), the command (null or
    # "": the image's own), the size, and the health path of a code service (null: a TCP check).
    image: str | None = Field(default=None, max_length=MAX_IMAGE)
    command: str | None = Field(default=None, max_length=MAX_COMMAND)
    size: str | None = Field(default=None, max_length=MAX_SIZE)
    health_path: str | None = None
    # The support role only, in a PATCH of their own.
    overlap: StrictInt | None = Field(default=None, ge=0, le=rules.MAX_OVERLAP)
    redeployable: StrictBool | None = None


class RunBody(BaseModel):
    argv: list[str] = Field(description="The command's words, e.g. [\"python\", \"manage.py\", \"migrate\"]")


class ExecBody(RunBody):
    job: str | None = Field(default=None, max_length=255, description="The job (default: the first deploy job)")


class ProxyPorts(BaseModel):
    http_port: int | None
    https_port: int | None


class LogLine(BaseModel):
    """One line of an environment's log: a job's, or the platform's own event (kind "event")."""

    time: str
    env: str | None
    service: str | None
    job: str | None
    kind: str | None
    host: str | None
    release: str | None
    line: str


class EnvironmentDetail(BaseModel):
    """One environment: what ``orchestrator env show --json`` shows, but its services (they
    have their own listing, /envs/{env}/services)."""

    name: str
    sandbox: bool
    proxy: ProxyPorts
    sites: list[SitePublic]
    dashboards: dict[str, DashboardPublic]  # logging: its url, user, password (shown with show_secrets)


class EnvironmentCreated(EnvironmentDetail):
    operations: list[int]  # the operations that deploy its included services


class ServiceAdded(ServicePublic):
    operation: int | None  # the operation that deploys it (none for a code service: it waits for a push)


MAX_PEM = 64 * 1024


class SiteBody(BaseModel):
    """A host name the environment's proxy routes to a code service; with ``cert`` (PEM,
    the site's certificate first, then its chain) and ``key`` (PEM, unencrypted), on the HTTPS
    port too, chosen by SNI. The key is kept as a secret: no response ever holds it."""

    name: str
    service: str = Field(min_length=1, max_length=MAX_NAME)
    cert: str | None = Field(default=None, max_length=MAX_PEM)
    key: str | None = Field(default=None, max_length=MAX_PEM)


class VariablesBody(BaseModel):
    set: dict[str, str] = Field(default_factory=dict)
    unset: list[str] = Field(default_factory=list)


_bearer = HTTPBearer(auto_error=False)


def _platform(request: Request) -> Platform:
    platform: Platform = request.app.state.platform
    return platform


def _session(request: Request) -> Iterator[Session]:
    with _platform(request).session() as s:
        yield s


def _reader(request: Request) -> Iterator[Session]:
    with _platform(request).reader() as s:
        yield s


def _role(request: Request,
          creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Role:
    if creds is None or creds.scheme.lower() != "bearer":
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "a bearer token is required",
                            headers={"WWW-Authenticate": "Bearer"})
    with _platform(request).reader() as s:
        found = catalogue.role_of_token(session=s, raw=creds.credentials)
    if found is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown token",
                            headers={"WWW-Authenticate": "Bearer"})
    return found


def support_only(who: Role) -> None:
    if who != Role.support:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "only the support role may do this")


def checked_text(value: str | None, what: str) -> str | None:
    """JSON may carry lone surrogates (\\ud800), which no catalogue or parser takes: a 400
    (pydantic already refuses them, 422, in fields with a length limit)."""
    if value is not None:
        try:
            value.encode()
        except UnicodeEncodeError:
            raise BadInput(f"the {what} is not valid Unicode text") from None
    return value


def checked_command(value: str | None, what: str = "command") -> str | None:
    """Text a catalogue keeps and a process gets: valid Unicode, no NUL."""
    if checked_text(value, what) is not None and "\0" in (value or ""):
        raise BadInput(f"the {what} holds a NUL character")
    return value


def checked_argv(argv: list[str]) -> list[str]:
    for word in argv:
        checked_text(word, "command")
    return argv


def env_detail(db: Session, environment: Environment, show_secrets: bool = False) -> dict[str, Any]:
    """The fields of an EnvironmentDetail."""
    return {"name": environment.name, "sandbox": environment.sandbox,
            "proxy": ProxyPorts(http_port=environment.http_port, https_port=environment.https_port),
            "sites": catalogue.list_sites(session=db, env=environment),
            "dashboards": catalogue.dashboards(session=db, env=environment, show_secrets=show_secrets)}


def accepted_fields(op: Operation) -> dict[str, Any]:
    return {"id": op.id, "kind": op.kind, "state": op.state, "url": f"/api/v1/operations/{op.id}"}


def openapi_30(node: Any) -> Any:
    """FastAPI's OpenAPI 3.1 document, as the OpenAPI 3.0 that the bundled Swagger UI (4.x)
    reads: a null among ``anyOf`` becomes ``nullable``, JSON Schema's ``examples`` list an
    ``example``, a ``const`` a one-value ``enum``."""
    if isinstance(node, list):
        return [openapi_30(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: openapi_30(value) for key, value in node.items()}
    for key in ("anyOf", "oneOf"):
        options = out.get(key)
        if isinstance(options, list) and {"type": "null"} in options:
            rest = [o for o in options if o != {"type": "null"}]
            del out[key]
            if len(rest) == 1 and "$ref" not in rest[0]:
                out.update(rest[0])
            elif rest:
                out["allOf" if len(rest) == 1 else key] = rest
            out["nullable"] = True
    if isinstance(out.get("examples"), list):
        examples = out.pop("examples")
        if examples:
            out["example"] = examples[0]
    if "const" in out:
        out["enum"] = [out.pop("const")]
    return out


MAX_PAGE = 1000  # rows of a list per request


@dataclass(frozen=True)
class PageOf:
    """A page of a list that grows (jobs, operations): ``limit`` rows from ``offset``."""

    limit: int
    offset: int


def _page(limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
          offset: Annotated[int, Query(ge=0, le=rules.MAX_ID)] = 0) -> PageOf:
    return PageOf(limit, offset)


Db = Annotated[Session, Depends(_session)]
ReadDb = Annotated[Session, Depends(_reader)]
Who = Annotated[Role, Depends(_role)]
Page = Annotated[PageOf, Depends(_page)]


class _AskedByApi:
    """What a request asks for says it came through the API (the log's "asked by")."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        asked = who.asker.set("api")
        try:
            await self.app(scope, receive, send)
        finally:
            who.asker.reset(asked)


def create_api(platform: Platform) -> FastAPI:
    api = FastAPI(title="orchestrator", version="1", description=DESCRIPTION, openapi_tags=TAGS,
                  openapi_url="/api/v1/openapi.json", docs_url=None, redoc_url=None)
    api.state.platform = platform
    api.add_middleware(_AskedByApi)
    v1 = APIRouter(prefix="/api/v1")

    @api.exception_handler(SQLAlchemyError)
    async def catalogue_unavailable(_: Request, exc: SQLAlchemyError) -> JSONResponse:
        """A catalogue that fails for a while (locked, read-only, restarting) is a 503, and the
        next request tries again on a fresh connection."""
        cause = exc.orig if isinstance(exc, DBAPIError) else exc
        return JSONResponse({"detail": f"the catalogue is unavailable: {one_line(cause)}"},
                            status_code=status.HTTP_503_SERVICE_UNAVAILABLE, headers={"Retry-After": "1"})

    @api.exception_handler(BadInput)
    async def bad_input(_: Request, exc: BadInput) -> JSONResponse:
        code = status.HTTP_404_NOT_FOUND if isinstance(exc, NotFound) else status.HTTP_400_BAD_REQUEST
        return JSONResponse({"detail": one_line(exc)}, status_code=code)

    @api.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422 (each error's loc, msg and type), without the input it would echo: a
        missing field echoes the whole body, with any key or password in it."""
        errors = [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in exc.errors()]
        return JSONResponse({"detail": jsonable_encoder(errors)},
                            status_code=status.HTTP_422_UNPROCESSABLE_ENTITY)

    # Swagger UI, offline: its files from the swagger_ui_bundle package, never a CDN.
    api.mount(DOCS_STATIC, StaticFiles(directory=swagger_ui_path), name="docs-static")

    # The platform's metrics, for Prometheus: no token (nothing secret in them).
    registry = CollectorRegistry(auto_describe=True)
    registry.register(PlatformCollector(platform))

    @api.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=DOCS_OPENAPI, title="orchestrator API",
                                   swagger_js_url=f"{DOCS_STATIC}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_STATIC}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_STATIC}/favicon-32x32.png")

    @api.get(DOCS_OPENAPI, include_in_schema=False)
    def docs_openapi() -> JSONResponse:
        return JSONResponse({**openapi_30(api.openapi()), "openapi": "3.0.3"})

    def accepted(op: Operation) -> JSONResponse:
        body = OperationAccepted(**accepted_fields(op))
        return JSONResponse(body.model_dump(), status_code=status.HTTP_202_ACCEPTED)

    def start(request: Callable[..., Any], **kwargs: Any) -> JSONResponse:
        return accepted(request(platform, **kwargs))

    def read_service(env: str, svc: str) -> ServicePublic:
        """A service as it is now: read after a request that changed it in its own session."""
        with platform.reader() as s:
            environment, service = catalogue.get_service(session=s, env=env, name=svc)
            return catalogue.service_public(service, environment)

    def live_service(env: str, svc: str) -> None:
        """Removed services keep their history under NAME.removed.ID: no request may change them."""
        with platform.reader() as s:
            environment, service = catalogue.get_service(session=s, env=env, name=svc)
            if environment.removed_at is not None or service.removed_at is not None:
                raise NotFound(f"no service named {svc} in environment {env}")

    # Environments.

    @v1.get("/envs", response_model=list[EnvironmentPublic], tags=["envs"])
    def list_envs(db: ReadDb, _: Who) -> Any:
        """The environments, by name."""
        return catalogue.list_envs(session=db)

    @v1.post("/envs", status_code=201, response_model=EnvironmentCreated, tags=["envs"])
    def create_env(body: EnvBody, _: Who) -> Any:
        """Create an environment; unless defaults is false, its included services are added and deployed."""
        name = checked_text(body.name, "environment name") or ""
        started = requests.create_env(platform, name=name, sandbox=body.sandbox, defaults=body.defaults,
                                      http_port=body.http_port, https_port=body.https_port)
        with platform.reader() as s:
            detail = env_detail(s, catalogue.get_env(session=s, name=name))
        return EnvironmentCreated(**detail, operations=[op.id or 0 for op in started])

    @v1.get("/envs/{env}", response_model=EnvironmentDetail, tags=["envs"])
    def get_env(env: str, db: ReadDb, _: Who, show_secrets: bool = False) -> Any:
        """An environment: its proxy's ports, its sites and its dashboards."""
        return EnvironmentDetail(**env_detail(db, catalogue.get_env(session=db, name=env), show_secrets))

    @v1.delete("/envs/{env}", status_code=202, response_model=list[RemovalAccepted], tags=["envs"])
    def remove_env(env: str, _: Who, delete_data: bool = False) -> Any:
        """Remove every service of the environment (an operation each, listed), then the environment."""
        with platform.reader() as s:
            if catalogue.get_env(session=s, name=env).removed_at is not None:
                raise NotFound(f"no environment named {env}")
        started = requests.request_remove_env(platform, env=env, delete_data=delete_data)
        body = [RemovalAccepted(service=service, **accepted_fields(op)) for service, op in started]
        return JSONResponse(jsonable_encoder(body), status_code=status.HTTP_202_ACCEPTED)

    # Sites.

    @v1.get("/envs/{env}/sites", response_model=list[SitePublic], tags=["sites"])
    def list_sites(env: str, db: ReadDb, _: Who) -> Any:
        """The environment's sites, by name (never their keys)."""
        return catalogue.list_sites(session=db, env=catalogue.get_env(session=db, name=env))

    @v1.post("/envs/{env}/sites", status_code=202, response_model=OperationAccepted, tags=["sites"],
             responses={201: {"model": SitePublic,
                              "description": "Added; no service proxy in the environment, so no "
                                             "operation (a proxy deployed later serves it)"}})
    def add_site(env: str, body: SiteBody, _: Who) -> Any:
        """Route a host name to a code service: 202 with the proxy's operation, 201 with the site without a proxy."""
        op = requests.add_site(platform, env=env, site=checked_text(body.name, "site") or "",
                               service=checked_text(body.service, "service") or "",
                               cert=checked_text(body.cert, "certificate"), key=checked_text(body.key, "key"))
        if op is not None:
            return accepted(op)
        site = SitePublic(name=rules.check_site_name(body.name), service=body.service,
                          tls=body.cert is not None)
        return JSONResponse(site.model_dump(mode="json"), status_code=status.HTTP_201_CREATED)

    @v1.delete("/envs/{env}/sites/{site}", status_code=202, response_model=OperationAccepted, tags=["sites"],
               responses={204: {"description": "Removed; no service proxy in the environment, "
                                               "so no operation"}})
    def remove_site(env: str, site: str, _: Who) -> Any:
        """Stop routing a host name: 202 with the proxy's operation, 204 without a proxy."""
        op = requests.remove_site(platform, env=env, site=site)
        if op is not None:
            return accepted(op)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    # Services.

    @v1.get("/envs/{env}/services", response_model=list[ServicePublic], tags=["services"])
    def list_services(env: str, db: ReadDb, _: Who) -> Any:
        """The environment's services, by name (never their credentials)."""
        environment = catalogue.get_env(session=db, name=env)
        return [catalogue.service_public(s, environment)
                for s in catalogue.list_services(session=db, env=environment)]

    @v1.post("/envs/{env}/services", status_code=201, response_model=ServiceAdded, tags=["services"])
    def add_service(env: str, body: ServiceBody, _: Who) -> Any:
        """Add a service: databases, caches and included types deploy at once, code services at their first push."""
        name = rules.check_name("service", checked_text(body.name, "service name") or "")
        if body.type == ServiceType.code and body.image is not None:
            raise BadInput("a code service runs its releases: add it without an image, then push one "
                           f"(POST /api/v1/envs/{env}/services/{name}/push)")
        image = rules.check_image_reference(body.image) if body.image is not None else None
        command = checked_command(body.command)
        op = requests.add_service(platform, env=env, name=name, type=body.type, image=image,
                                  command=command if command and command.strip() else None,
                                  scale=body.scale, size=checked_text(body.size, "size") or "")
        return ServiceAdded(**read_service(env, name).model_dump(), operation=op.id if op is not None else None)

    @v1.get("/envs/{env}/services/{svc}", response_model=ServicePublic, tags=["services"])
    def get_service(env: str, svc: str, db: ReadDb, _: Who) -> Any:
        """A service (never its credentials)."""
        environment, service = catalogue.get_service(session=db, env=env, name=svc)
        return catalogue.service_public(service, environment)

    @v1.patch("/envs/{env}/services/{svc}", response_model=ServicePublic, tags=["services"])
    def patch_service(env: str, svc: str, body: ServicePatch, who: Who) -> Any:
        """Image, command, size, health path (any role) or overlap, redeployable (support): at the next redeploy."""
        given = body.model_fields_set
        support_settings = given & {"overlap", "redeployable"}
        if support_settings and given - support_settings:
            raise BadInput("give overlap and redeployable in a PATCH on its own, without image, command, "
                           "size or health_path")
        if body.overlap is not None or body.redeployable is not None:
            support_only(who)
        for field in ("image", "size"):
            if field in given and getattr(body, field) is None:
                raise BadInput(f"{field} may not be null")
        health_path = None
        if "health_path" in given:  # null: back to a TCP check ("" for requests.update_service)
            health_path = rules.check_health_path(body.health_path) if body.health_path is not None else ""
        # Its own session in requests.update_service: no write lock held here to wait on.
        requests.update_service(
            platform, env=env, service=svc, image=checked_text(body.image, "image"),
            command=(checked_command(body.command) or "") if "command" in given else None,
            size=checked_text(body.size, "size"), health_path=health_path, overlap=body.overlap,
            redeployable=body.redeployable, support=who == Role.support)
        return read_service(env, svc)

    @v1.delete("/envs/{env}/services/{svc}", status_code=202, response_model=OperationAccepted,
               tags=["services"])
    def remove_service(env: str, svc: str, _: Who, delete_data: bool = False) -> Any:
        """Stop every job of the service (out of the proxy first), then remove it; data kept unless delete_data."""
        live_service(env, svc)
        return start(requests.request_remove_service, env=env, service=svc, delete_data=delete_data)

    @v1.post("/envs/{env}/services/{svc}/redeploy", status_code=202, response_model=OperationAccepted,
             tags=["services"])
    def redeploy(env: str, svc: str, who: Who, body: RedeployBody | None = None) -> Any:
        """Replace the service's jobs with new ones of its current settings (support: even if not redeployable)."""
        support = bool(body and body.support)
        if support:
            support_only(who)
        return start(requests.request_redeploy, env=env, service=svc, support=support)

    @v1.post("/envs/{env}/services/{svc}/scale", status_code=202, response_model=OperationAccepted,
             tags=["services"])
    def scale(env: str, svc: str, body: ScaleBody, _: Who) -> Any:
        """Run this many deploy jobs of the service."""
        return start(requests.request_scale, env=env, service=svc, scale=body.scale)

    # Variables.

    @v1.get("/envs/{env}/services/{svc}/variables", response_model=list[VariableView], tags=["variables"])
    def list_variables(env: str, svc: str, db: ReadDb, _: Who, show_secrets: bool = False) -> Any:
        """User and automatic variables with their source, secrets masked unless asked for."""
        environment, service = catalogue.get_service(session=db, env=env, name=svc)
        return spec.shown(spec.variables_for(db, environment, service), show_secrets=show_secrets)

    @v1.patch("/envs/{env}/services/{svc}/variables", response_model=list[VariableView], tags=["variables"])
    def change_variables(env: str, svc: str, body: VariablesBody, db: ReadDb, _: Who) -> Any:
        """Set and unset user variables; answers with the listing, secrets masked."""
        requests.change_variables(platform, env=env, service=svc, values=body.set, unset=body.unset)
        environment, service = catalogue.get_service(session=db, env=env, name=svc)
        return spec.shown(spec.variables_for(db, environment, service), show_secrets=False)

    # Releases.

    @v1.get("/envs/{env}/services/{svc}/releases", response_model=list[ReleasePublic], tags=["releases"])
    def list_releases(env: str, svc: str, db: ReadDb, _: Who) -> Any:
        """The code service's releases, by number."""
        _env, service = catalogue.get_service(session=db, env=env, name=svc)
        return catalogue.release_views(session=db, service=service)

    @v1.post("/envs/{env}/services/{svc}/push", status_code=202, response_model=OperationAccepted,
             tags=["releases"])
    def push(env: str, svc: str, body: PushBody, who: Who) -> Any:
        """A new release of a code service from an image: the first deploys it, later ones redeploy it."""
        if body.support:
            support_only(who)
        return start(requests.request_push, env=env, service=svc, image=body.image, support=body.support)

    @v1.post("/envs/{env}/services/{svc}/rollback/{release}", status_code=202,
             response_model=OperationAccepted, tags=["releases"])
    def rollback(env: str, svc: str, release: int, _: Who) -> Any:
        """Redeploy an earlier release of the code service."""
        return start(requests.request_redeploy, env=env, service=svc, release=release)

    # Workers.

    @v1.post("/envs/{env}/services/{svc}/workers/{target}/scale", status_code=202,
             response_model=OperationAccepted, tags=["workers"])
    def worker_scale(env: str, svc: str, target: str, body: WorkerScaleBody, _: Who) -> Any:
        """Run N jobs of a worker target, or N more (+N) or fewer (-N)."""
        return start(requests.request_worker_scale, env=env, service=svc, target=target,
                     scale=body.scale)

    # One-off commands.

    @v1.post("/envs/{env}/services/{svc}/run", status_code=202, response_model=OperationAccepted,
             tags=["commands"])
    def run(env: str, svc: str, body: RunBody, who: Who) -> Any:
        """Run argv in a new container of the service until it exits; its operation keeps the output and exit code."""
        return start(requests.request_run, env=env, service=svc, argv=checked_argv(body.argv),
                     requested_by=f"api ({who})")

    @v1.post("/envs/{env}/services/{svc}/exec", status_code=202, response_model=OperationAccepted,
             tags=["commands"])
    def exec_(env: str, svc: str, body: ExecBody, who: Who) -> Any:
        """Run argv in a running job of the service; its operation keeps the output and exit code."""
        return start(requests.request_exec, env=env, service=svc, argv=checked_argv(body.argv),
                     job=checked_text(body.job, "job"), requested_by=f"api ({who})")

    # Logs.

    @v1.get("/envs/{env}/logs", response_model=list[LogLine], tags=["logs"],
            responses={200: {"content": {"application/x-ndjson": {}}}})
    def read_logs(env: str, _: Who, service: str | None = None, job: str | None = None, since: str | None = None,
                  grep: str | None = None, lines: int | None = None, follow: bool = False) -> Any:
        """The last matching lines, oldest first; follow=1: then each new one (NDJSON); 503: logging is down."""
        if lines is None:
            lines = env_logs.MAX_LINES if since is not None else 100
        query = env_logs.LogQuery(service=checked_text(service, "service"), job=checked_text(job, "job"),
                                  grep=checked_text(grep, "grep"), limit=lines,
                                  since=env_logs.parse_since(since) if since is not None else None)
        try:
            if not follow:
                return env_logs.read(platform, env, query)
            stream = env_logs.follow(platform, env, query)
        except LoggingDown as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, one_line(exc)) from None
        return StreamingResponse((json.dumps(line) + "\n" if line is not None else "\n" for line in stream),
                                 media_type="application/x-ndjson")

    @v1.get("/envs/{env}/status", tags=["logs"])
    def env_status_(env: str, _: Who) -> Any:
        """Each service's running and wanted jobs, and each check and alert from its monitoring."""
        return env_status.status(platform, env)

    # Jobs.

    @v1.get("/envs/{env}/jobs", response_model=list[JobPublic], tags=["jobs"])
    def list_env_jobs(env: str, db: ReadDb, _: Who, page: Page) -> Any:
        """The active jobs of the environment's services, a page at a time (limit, at most 1000, from offset)."""
        return catalogue.list_jobs(session=db, env=catalogue.get_env(session=db, name=env), limit=page.limit,
                                   offset=page.offset)

    @v1.get("/envs/{env}/services/{svc}/jobs", response_model=list[JobPublic], tags=["jobs"])
    def list_jobs(env: str, svc: str, db: ReadDb, _: Who, page: Page) -> Any:
        """The active jobs of the service, a page at a time: limit (default 100, at most 1000) from offset."""
        environment, service = catalogue.get_service(session=db, env=env, name=svc)
        return catalogue.list_jobs(session=db, env=environment, service=service, limit=page.limit,
                                   offset=page.offset)

    # Operations.

    @v1.get("/operations", response_model=list[OperationPublic], tags=["operations"])
    def list_operations(db: ReadDb, _: Who, page: Page, env: str | None = None) -> Any:
        """The operations, newest first (of env only, if given), a page at a time (limit, from offset)."""
        environment = catalogue.get_env(session=db, name=env) if env else None
        return catalogue.operations_public(
            session=db, ops=catalogue.list_operations(session=db, env=environment, limit=page.limit,
                                                      offset=page.offset))

    @v1.get("/operations/{op_id}", response_model=OperationPublic, tags=["operations"],
            responses={304: {"description": "Not changed within `wait` seconds (its ETag as sent)"}})
    async def get_operation(op_id: int, request: Request, response: Response, _: Who,
                            wait: Annotated[float, Query(ge=0, le=MAX_WAIT)] = 0) -> Any:
        """An operation and its steps (a one-off's output, exit code); If-None-Match + wait: a long poll."""
        # With `If-None-Match: ETAG` and `wait=SECONDS` the answer comes as soon as the
        # operation's state changes, and WAIT_GATHER seconds after the first change of a step
        # seen (a step begins or ends, output comes: what moves meanwhile comes in that answer),
        # or, when nothing did within `wait` seconds, a 304. A waiting poll holds no thread:
        # each look at the operation's version is one short query in the thread pool.
        seen = (request.headers.get("if-none-match") or "").removeprefix("W/")  # (a proxy may weaken it)
        deadline = time.monotonic() + wait
        moved: float | None = None  # when a step's change was first seen

        def version() -> str:
            with platform.reader() as s:
                return f'"{catalogue.operation_version(session=s, op_id=op_id)}"'

        def public() -> OperationPublic:
            with platform.reader() as s:
                return catalogue.operation_public(session=s, op=catalogue.get_operation(session=s, op_id=op_id))

        def answer(etag: str) -> OperationPublic:
            """The operation, with an ETag never newer than it: ``etag`` was read before it, and
            is read again after it until the two agree (a version only moves forward, and each
            read may see a later moment), so the next poll answers every change this body did
            not show, and none it did."""
            body = public()
            for _ in range(2):  # (an operation that moves fast: its last body, the version read before it)
                after = version()
                if after == etag:
                    break
                etag, body = after, public()
            response.headers["ETag"] = etag
            return body

        while True:
            etag = await run_in_threadpool(version)
            now = time.monotonic()
            if etag != seen:
                moved = now if moved is None else moved
                if (catalogue.version_state(etag.strip('"')) != catalogue.version_state(seen.strip('"'))
                        or now >= min(moved + WAIT_GATHER, deadline)):
                    return await run_in_threadpool(answer, etag)
            if now >= deadline or await request.is_disconnected():
                return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
            await asyncio.sleep(WAIT_POLL)

    @v1.post("/operations/{op_id}/cancel", response_model=OperationPublic, tags=["operations"])
    def cancel_operation(op_id: int, _: Who) -> Any:
        """End a queued or running operation at its next step boundary (cancelled); an ended one is a 400."""
        operations.cancel(platform, op_id)
        with platform.reader() as s:
            return catalogue.operation_public(session=s, op=catalogue.get_operation(session=s, op_id=op_id))

    # Hooks.

    @v1.post("/hooks/push", status_code=202, response_model=OperationAccepted, tags=["hooks"])
    def push_hook(body: HookBody, who: Who) -> Any:
        """The code-push webhook: a new image for a code service makes a release and deploys it."""
        if body.support:
            support_only(who)
        return start(requests.request_push, env=body.env, service=body.service, image=body.image,
                     support=body.support)

    api.include_router(v1)
    api.include_router(git_router(platform), tags=["git"])
    return api
