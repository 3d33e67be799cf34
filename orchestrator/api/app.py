"""The HTTP API under /api/v1: a thin adapter over the catalogue and operations.

Bearer tokens (``orchestrator tokens create``) carry a role; support-only actions are checked
here, server-side. Bad input is a 4xx with a reason, never a 500; a 422 names the fields at
fault but never echoes what was sent (a body may hold a private key or a password).
"""

from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, StrictBool, StrictInt
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlmodel import Session

from orchestrator import catalogue, requests, rules, spec
from orchestrator.api.git import git_router
from orchestrator.errors import BadInput, NotFound, one_line
from orchestrator.models import (
    EnvironmentPublic,
    JobPublic,
    OperationPublic,
    ReleasePublic,
    Role,
    ServicePublic,
    SitePublic,
    VariableView,
)
from orchestrator.platform import Platform

MAX_NAME = 63


class OperationAccepted(BaseModel):
    id: int
    kind: str
    state: str
    url: str


class PushBody(BaseModel):
    image: str = Field(min_length=1, max_length=512)
    support: StrictBool = False  # push to a service marked not redeployable (the support role only)


class HookBody(BaseModel):
    env: str = Field(min_length=1, max_length=MAX_NAME)
    service: str = Field(min_length=1, max_length=MAX_NAME)
    image: str = Field(min_length=1, max_length=512)
    support: StrictBool = False


class RedeployBody(BaseModel):
    support: StrictBool = False


class ScaleBody(BaseModel):
    scale: StrictInt = Field(ge=0, le=rules.MAX_SCALE)  # true is not 1


class WorkerScaleBody(BaseModel):
    scale: str = Field(pattern=r"^[+-]?\d{1,4}$", description="N, +N or -N")


class ServicePatch(BaseModel):
    overlap: StrictInt | None = Field(default=None, ge=0, le=rules.MAX_OVERLAP)  # support only
    redeployable: StrictBool | None = None  # support only
    # Code services, any role, on its own: the path a deploy job must answer 2xx/3xx on; null
    # goes back to a TCP check. Takes effect at the next redeploy.
    health_path: str | None = None


class ProxyPorts(BaseModel):
    http_port: int | None
    https_port: int | None


class EnvironmentDetail(BaseModel):
    """One environment: what ``orchestrator env show --json`` shows, but its services (they
    have their own listing, /envs/{env}/services)."""

    name: str
    sandbox: bool
    proxy: ProxyPorts
    sites: list[SitePublic]


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


Db = Annotated[Session, Depends(_session)]
ReadDb = Annotated[Session, Depends(_reader)]
Who = Annotated[Role, Depends(_role)]


def create_api(platform: Platform) -> FastAPI:
    api = FastAPI(title="orchestrator", version="1", openapi_url="/api/v1/openapi.json",
                  docs_url="/docs")
    api.state.platform = platform
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

    def accepted(op: Any) -> JSONResponse:
        body = OperationAccepted(id=op.id, kind=op.kind, state=op.state,
                                 url=f"/api/v1/operations/{op.id}")
        return JSONResponse(body.model_dump(), status_code=status.HTTP_202_ACCEPTED)

    def start(request: Callable[..., Any], **kwargs: Any) -> JSONResponse:
        return accepted(request(platform, **kwargs))

    @v1.get("/envs", response_model=list[EnvironmentPublic])
    def list_envs(db: ReadDb, _: Who) -> Any:
        return catalogue.list_envs(session=db)

    @v1.get("/envs/{env}", response_model=EnvironmentDetail)
    def get_env(env: str, db: ReadDb, _: Who) -> Any:
        environment = catalogue.get_env(session=db, name=env)
        return EnvironmentDetail(
            name=environment.name, sandbox=environment.sandbox,
            proxy=ProxyPorts(http_port=environment.http_port, https_port=environment.https_port),
            sites=catalogue.list_sites(session=db, env=environment))

    @v1.get("/envs/{env}/sites", response_model=list[SitePublic])
    def list_sites(env: str, db: ReadDb, _: Who) -> Any:
        return catalogue.list_sites(session=db, env=catalogue.get_env(session=db, name=env))

    @v1.post("/envs/{env}/sites", status_code=202, response_model=OperationAccepted,
             responses={201: {"model": SitePublic,
                              "description": "Added; no service proxy in the environment, so no "
                                             "operation (a proxy deployed later serves it)"}})
    def add_site(env: str, body: SiteBody, _: Who) -> Any:
        """Route a host name to a code service: 202 with the operation that takes it live on the
        environment's service proxy, or 201 with the site when the environment has no proxy."""
        op = requests.add_site(platform, env=env, site=checked_text(body.name, "site") or "",
                               service=checked_text(body.service, "service") or "",
                               cert=checked_text(body.cert, "certificate"), key=checked_text(body.key, "key"))
        if op is not None:
            return accepted(op)
        site = SitePublic(name=rules.check_site_name(body.name), service=body.service,
                          tls=body.cert is not None)
        return JSONResponse(site.model_dump(mode="json"), status_code=status.HTTP_201_CREATED)

    @v1.delete("/envs/{env}/sites/{site}", status_code=202, response_model=OperationAccepted,
               responses={204: {"description": "Removed; no service proxy in the environment, "
                                               "so no operation"}})
    def remove_site(env: str, site: str, _: Who) -> Any:
        """Stop routing a host name: 202 with the operation that updates the environment's
        service proxy, or 204 when the environment has no proxy."""
        op = requests.remove_site(platform, env=env, site=site)
        if op is not None:
            return accepted(op)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @v1.get("/envs/{env}/services", response_model=list[ServicePublic])
    def list_services(env: str, db: ReadDb, _: Who) -> Any:
        environment = catalogue.get_env(session=db, name=env)
        return [catalogue.service_public(s, environment)
                for s in catalogue.list_services(session=db, env=environment)]

    @v1.get("/envs/{env}/services/{svc}", response_model=ServicePublic)
    def get_service(env: str, svc: str, db: ReadDb, _: Who) -> Any:
        environment, service = catalogue.get_service(session=db, env=env, name=svc)
        return catalogue.service_public(service, environment)

    @v1.patch("/envs/{env}/services/{svc}", response_model=ServicePublic)
    def patch_service(env: str, svc: str, body: ServicePatch, db: Db, who: Who) -> Any:
        """The overlap and the redeployable flag (support only), or, on its own, the health path
        of a code service (any role; null: a TCP check)."""
        given = body.model_fields_set
        if "health_path" in given:
            if given - {"health_path"}:
                raise BadInput("give health_path on its own")
            # Its own session: ``db`` has not begun, so it holds no write lock to wait on.
            requests.set_health_path(platform, env=env, service=svc, path=body.health_path)
            with platform.reader() as s:
                environment, service = catalogue.get_service(session=s, env=env, name=svc)
                return catalogue.service_public(service, environment)
        support_only(who)
        environment, service = catalogue.get_service(session=db, env=env, name=svc)
        catalogue.update_service(session=db, service=service, overlap=body.overlap,
                                 redeployable=body.redeployable, support=True)
        db.commit()
        return catalogue.service_public(service, environment)

    @v1.get("/envs/{env}/services/{svc}/variables", response_model=list[VariableView])
    def list_variables(env: str, svc: str, db: ReadDb, _: Who, show_secrets: bool = False) -> Any:
        """User and automatic variables with their source, secrets masked unless asked for."""
        environment, service = catalogue.get_service(session=db, env=env, name=svc)
        return spec.shown(spec.variables_for(db, environment, service), show_secrets=show_secrets)

    @v1.patch("/envs/{env}/services/{svc}/variables", response_model=list[VariableView])
    def change_variables(env: str, svc: str, body: VariablesBody, db: Db, _: Who) -> Any:
        """Set and unset user variables; answers with the listing, secrets masked."""
        environment, service = catalogue.get_service(session=db, env=env, name=svc)
        if not body.set and not body.unset:
            raise BadInput("give variables to set or unset")
        if body.unset:
            catalogue.unset_variables(session=db, service=service, keys=body.unset)
        if body.set:
            catalogue.set_variables(session=db, service=service, values=body.set)
        db.commit()
        return spec.shown(spec.variables_for(db, environment, service), show_secrets=False)

    @v1.get("/envs/{env}/services/{svc}/releases", response_model=list[ReleasePublic])
    def list_releases(env: str, svc: str, db: ReadDb, _: Who) -> Any:
        _env, service = catalogue.get_service(session=db, env=env, name=svc)
        return catalogue.release_views(session=db, service=service)

    @v1.get("/envs/{env}/jobs", response_model=list[JobPublic])
    def list_env_jobs(env: str, db: ReadDb, _: Who) -> Any:
        return catalogue.list_jobs(session=db, env=catalogue.get_env(session=db, name=env))

    @v1.get("/envs/{env}/services/{svc}/jobs", response_model=list[JobPublic])
    def list_jobs(env: str, svc: str, db: ReadDb, _: Who) -> Any:
        environment, service = catalogue.get_service(session=db, env=env, name=svc)
        return catalogue.list_jobs(session=db, env=environment, service=service)

    @v1.get("/operations", response_model=list[OperationPublic])
    def list_operations(db: ReadDb, _: Who, env: str | None = None) -> Any:
        environment = catalogue.get_env(session=db, name=env) if env else None
        return [catalogue.operation_public(session=db, op=op)
                for op in catalogue.list_operations(session=db, env=environment)]

    @v1.get("/operations/{op_id}", response_model=OperationPublic)
    def get_operation(op_id: int, db: ReadDb, _: Who) -> Any:
        return catalogue.operation_public(session=db, op=catalogue.get_operation(session=db, op_id=op_id))

    @v1.post("/envs/{env}/services/{svc}/push", status_code=202, response_model=OperationAccepted)
    def push(env: str, svc: str, body: PushBody, who: Who) -> Any:
        if body.support:
            support_only(who)
        return start(requests.request_push, env=env, service=svc, image=body.image, support=body.support)

    @v1.post("/hooks/push", status_code=202, response_model=OperationAccepted)
    def push_hook(body: HookBody, who: Who) -> Any:
        """The code-push webhook: a new image for a code service makes a release and deploys it."""
        if body.support:
            support_only(who)
        return start(requests.request_push, env=body.env, service=body.service, image=body.image,
                     support=body.support)

    @v1.post("/envs/{env}/services/{svc}/redeploy", status_code=202, response_model=OperationAccepted)
    def redeploy(env: str, svc: str, who: Who, body: RedeployBody | None = None) -> Any:
        support = bool(body and body.support)
        if support:
            support_only(who)
        return start(requests.request_redeploy, env=env, service=svc, support=support)

    @v1.post("/envs/{env}/services/{svc}/rollback/{release}", status_code=202,
             response_model=OperationAccepted)
    def rollback(env: str, svc: str, release: int, _: Who) -> Any:
        return start(requests.request_redeploy, env=env, service=svc, release=release)

    @v1.post("/envs/{env}/services/{svc}/scale", status_code=202, response_model=OperationAccepted)
    def scale(env: str, svc: str, body: ScaleBody, _: Who) -> Any:
        return start(requests.request_scale, env=env, service=svc, scale=body.scale)

    @v1.post("/envs/{env}/services/{svc}/workers/{target}/scale", status_code=202,
             response_model=OperationAccepted)
    def worker_scale(env: str, svc: str, target: str, body: WorkerScaleBody, _: Who) -> Any:
        return start(requests.request_worker_scale, env=env, service=svc, target=target,
                     scale=body.scale)

    api.include_router(v1)
    api.include_router(git_router(platform))
    return api
