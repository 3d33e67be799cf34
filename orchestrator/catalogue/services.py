"""Environments, services, their variables, worker targets and releases."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import delete, func, update
from sqlmodel import Session, col, select

from orchestrator import names, rules, service_types
from orchestrator.errors import BadInput, NotFound
from orchestrator.models import (
    Environment,
    Job,
    Operation,
    OpState,
    Release,
    ReleaseState,
    Service,
    ServicePublic,
    ServiceType,
    Site,
    Step,
    WorkerTarget,
    utcnow,
)
from orchestrator.rules import MAX_ID, check_name


def create_env(*, session: Session, name: str, sandbox: bool) -> Environment:
    check_name("environment", name)
    if session.exec(select(Environment).where(Environment.name == name)).first() is not None:
        raise BadInput(f"environment {name} exists already")
    env = Environment(name=name, sandbox=sandbox)
    session.add(env)
    session.flush()
    return env


def get_env(*, session: Session, name: str, for_update: bool = False) -> Environment:
    """With ``for_update``, its row is locked until the transaction ends (PostgreSQL's FOR NO KEY
    UPDATE: its services may still be added): what is decided on its services is decided once."""
    query = select(Environment).where(Environment.name == name, col(Environment.removed_at).is_(None))
    env = session.exec(query.with_for_update(key_share=True).execution_options(populate_existing=True)
                       if for_update else query).first()
    if env is None:
        raise NotFound(f"no environment named {name}")
    return env


def get_env_by_id(*, session: Session, env_id: int) -> Environment:
    env = session.get(Environment, env_id)
    if env is None:
        raise NotFound(f"no environment {env_id}")
    return env


def list_envs(*, session: Session) -> list[Environment]:
    query = select(Environment).where(col(Environment.removed_at).is_(None)).order_by(col(Environment.name))
    return list(session.exec(query))


def add_service(*, session: Session, env: Environment, name: str, type: ServiceType,
                image: str | None, command: str | None, scale: int, size: str) -> Service:
    check_name("service", name)
    rules.check_scale(type, scale)
    rules.check_size(size)
    kind = service_types.profile(type)
    image = image or kind.default_image
    if not image and type != ServiceType.code:
        raise BadInput(f"a {type} service needs --image")
    exists = select(Service).where(Service.env_id == env.id, Service.name == name)
    if session.exec(exists).first() is not None:
        raise BadInput(f"service {name} exists already in {env.name}")
    service = Service(env_id=env.id or 0, name=name, type=type, image=image, command=command,
                      scale=scale, size=size,
                      credentials=service_types.new_credentials(type, name),
                      volume=names.volume_name(env.name, name) if kind.data_dir else None)
    kept = _kept_data(session, env, name, type) if kind.data_dir else None
    if kept is not None:
        # The data of a removed database of that name (kept): its volume, on its host, opened
        # with its credentials; the old row lets go of it.
        service.credentials, service.volume, service.host = dict(kept.credentials), kept.volume, kept.host
        kept.volume = kept.host = None
        session.add(kept)
    session.add(service)
    session.flush()
    return service


def get_service(*, session: Session, env: str, name: str,
                for_update: bool = False) -> tuple[Environment, Service]:
    """The environment and its service; with ``for_update``, the service's row is locked until the
    transaction ends against updates of it (PostgreSQL's FOR NO KEY UPDATE: rows that refer to it
    may still be added meanwhile; SQLite's writer holds the whole file already)."""
    environment = get_env(session=session, name=env)
    query = select(Service).where(Service.env_id == environment.id, Service.name == name,
                                  col(Service.removed_at).is_(None))
    service = session.exec(query.with_for_update(key_share=True).execution_options(populate_existing=True)
                           if for_update else query).first()
    if service is None:
        raise NotFound(f"no service named {name} in environment {env}")
    return environment, service


def list_services(*, session: Session, env: Environment,
                  types: Sequence[ServiceType] | None = None) -> list[Service]:
    """The environment's services (of ``types`` only, when given), by name."""
    query = (select(Service).where(Service.env_id == env.id, col(Service.removed_at).is_(None))
             .order_by(col(Service.name)))
    if types is not None:
        query = query.where(col(Service.type).in_(list(types)))
    return list(session.exec(query))


def unfinished_operations(*, session: Session, service: Service) -> list[Operation]:
    query = select(Operation).where(Operation.service_id == service.id,
                                    col(Operation.state).in_((OpState.queued, OpState.running)))
    return list(session.exec(query.order_by(col(Operation.id))))


def mark_service_removed(*, session: Session, service: Service, data_deleted: bool = False) -> None:
    """A removed service keeps its history under a name no request can give (NAME.removed.ID):
    its worker targets and sites go, it never heals; the name is free for a new service. A
    database whose data was kept keeps its volume, host and credentials on the row, for a new
    service of that name to take over (``add_service``)."""
    for worker in workers_of(session=session, service=service):
        session.delete(worker)
    for site in session.exec(select(Site).where(Site.service_id == service.id)):
        session.delete(site)
    service.name = f"{service.name}.removed.{service.id}"
    service.removed_at = utcnow()
    service.scale, service.heal_wanted, service.heal_gave_up = 0, False, True
    service.port = None
    if data_deleted or service.volume is None:
        service.volume = service.host = None
    session.add(service)
    session.flush()
    env = session.get(Environment, service.env_id)
    if env is not None and env.removing:  # (its row locked: a service added meanwhile is seen)
        env = session.exec(select(Environment).where(Environment.id == env.id).with_for_update(key_share=True)
                           .execution_options(populate_existing=True)).first()
        if env is not None and not list_services(session=session, env=env):
            mark_env_removed(session=session, env=env)


def _kept_data(session: Session, env: Environment, name: str, type: ServiceType) -> Service | None:
    """The latest removed database of that name and type whose volume was kept, in this
    environment or in a removed one of the same name (their volumes have the same name)."""
    envs = select(Environment.id).where(
        (col(Environment.id) == env.id) | col(Environment.name).startswith(f"{env.name}.removed."))
    query = (select(Service).where(col(Service.env_id).in_(envs), col(Service.removed_at).is_not(None),
                                   col(Service.volume).is_not(None), Service.type == type,
                                   (col(Service.name) == name) | col(Service.name).startswith(f"{name}.removed."))
             .order_by(col(Service.removed_at).desc()))
    return session.exec(query).first()


def purge_removed(*, session: Session, before: datetime) -> list[str]:
    """Delete the rows of services removed before ``before`` (their steps, operations, jobs,
    releases) and of environments removed then with no service left; a kept database's row
    stays while a new service may take its data over (its volume). The names purged."""
    purged = []
    for svc in session.exec(select(Service).where(col(Service.removed_at).is_not(None),
                                                  col(Service.removed_at) < before,
                                                  col(Service.volume).is_(None))):
        ops = [op.id for op in session.exec(select(Operation).where(Operation.service_id == svc.id))]
        session.exec(delete(Step).where(col(Step.op_id).in_(ops)))
        session.exec(delete(Operation).where(col(Operation.service_id) == svc.id))
        session.exec(delete(Job).where(col(Job.service_id) == svc.id))
        session.exec(delete(Release).where(col(Release.service_id) == svc.id))
        session.exec(delete(Site).where(col(Site.service_id) == svc.id))
        session.exec(delete(WorkerTarget).where(col(WorkerTarget.service_id) == svc.id))
        purged.append(svc.name)
        session.delete(svc)
    session.flush()
    for env in session.exec(select(Environment).where(col(Environment.removed_at).is_not(None),
                                                      col(Environment.removed_at) < before)):
        if session.exec(select(Service.id).where(Service.env_id == env.id)).first() is None:
            session.exec(delete(Operation).where(col(Operation.env_id) == env.id))
            session.exec(delete(Site).where(col(Site.env_id) == env.id))
            purged.append(env.name)
            session.delete(env)
    return purged


def mark_env_removed(*, session: Session, env: Environment) -> None:
    """Its services all removed: the environment goes too, its name and proxy ports free."""
    env.name = f"{env.name}.removed.{env.id}"
    env.removed_at = utcnow()
    env.http_port = env.https_port = None
    session.add(env)
    session.flush()


def update_service(*, session: Session, service: Service, overlap: int | None,
                   redeployable: bool | None, support: bool) -> Service:
    """The support-only settings: the overlap period and the redeployable flag."""
    if overlap is None and redeployable is None:
        raise BadInput("nothing to update: give the overlap or the redeployable flag")
    if not support:
        raise BadInput("only support may set the overlap period or the redeployable flag")
    if overlap is not None:
        rules.check_overlap(overlap)
        if overlap and service.type != ServiceType.code:
            raise BadInput("an overlap period is for code services only")
        service.overlap = overlap
    if redeployable is not None:
        service.redeployable = redeployable
    session.add(service)
    return service


def set_variables(*, session: Session, service: Service, values: dict[str, str]) -> None:
    """User variables; they take effect at the next redeploy."""
    values = rules.check_variables(values)
    rules.check_variables_total({**service.variables, **values})
    service.variables = {**service.variables, **values}
    session.add(service)


def unset_variables(*, session: Session, service: Service, keys: Iterable[str]) -> None:
    keys = list(keys)
    missing = [k for k in keys if k not in service.variables]
    if missing:
        raise BadInput(f"service {service.name} has no variable {missing[0]}")
    service.variables = {k: v for k, v in service.variables.items() if k not in keys}
    session.add(service)


def want_heal(*, session: Session, service_id: int) -> None:
    """The service may be below its scale for a reason no operation will mend: the watcher heals
    it (``watcher.heal``), with a back-off."""
    session.exec(update(Service).where(col(Service.id) == service_id).values(heal_wanted=True))


def service_public(service: Service, env: Environment) -> ServicePublic:
    return ServicePublic(env=env.name, **service.model_dump(exclude={"env_id", "credentials"}))


def workers_of(*, session: Session, service: Service) -> list[WorkerTarget]:
    query = select(WorkerTarget).where(WorkerTarget.service_id == service.id)
    return list(session.exec(query.order_by(col(WorkerTarget.name))))


def find_worker(*, session: Session, service: Service, name: str) -> WorkerTarget | None:
    query = select(WorkerTarget).where(WorkerTarget.service_id == service.id, WorkerTarget.name == name)
    return session.exec(query).first()


def get_worker(*, session: Session, service: Service, name: str) -> WorkerTarget:
    worker = find_worker(session=session, service=service, name=name)
    if worker is None:
        raise NotFound(f"service {service.name} has no worker target {name}")
    return worker


def add_release(*, session: Session, service: Service, image: str, build: str | None = None,
                source_id: int | None = None, commit: str | None = None, command: str | None = None,
                processes: dict[str, str] | None = None) -> Release:
    """The service's next release; a built one records how, from what, and its Procfile."""
    last = session.exec(
        select(func.max(Release.number)).where(Release.service_id == service.id)
    ).first()
    release = Release(service_id=service.id or 0, number=(last or 0) + 1, image=image,
                      state=ReleaseState.building, build=build, source_id=source_id, commit=commit,
                      command=command, processes=processes or {})
    session.add(release)
    session.flush()
    return release


def next_release_number(*, session: Session, service: Service) -> int:
    last = session.exec(select(func.max(Release.number)).where(Release.service_id == service.id)).first()
    return (last or 0) + 1


def get_release(*, session: Session, service: Service, number: int) -> Release:
    if not 0 < number <= MAX_ID:
        raise NotFound(f"service {service.name} has no release {number}")
    release = session.exec(
        select(Release).where(Release.service_id == service.id, Release.number == number)
    ).first()
    if release is None:
        raise NotFound(f"service {service.name} has no release {number}")
    return release


def list_releases(*, session: Session, service: Service) -> list[Release]:
    query = select(Release).where(Release.service_id == service.id).order_by(col(Release.number))
    return list(session.exec(query))
