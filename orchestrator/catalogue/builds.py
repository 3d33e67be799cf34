"""Builds in the catalogue: pushed sources, build steps' output, what a build made."""

from __future__ import annotations

import hashlib

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from orchestrator.errors import NotFound
from orchestrator.models import BuildSource, Release, ReleasePublic, ReleaseState, Service, Step

MAX_OUTPUT = 256 * 1024  # characters of a build's output kept with its step (the last ones)


def store_source(*, session: Session, data: bytes) -> BuildSource:
    """A pushed source, once per content. The same content pushed to two services at once
    (PostgreSQL: neither sees the other's row before it commits) is the other's row."""
    digest = hashlib.sha256(data).hexdigest()
    query = select(BuildSource).where(BuildSource.sha256 == digest)
    found = session.exec(query).first()
    if found is not None:
        return found
    source = BuildSource(sha256=digest, data=data, size=len(data))
    try:
        with session.begin_nested():  # (a savepoint: this transaction goes on after a clash)
            session.add(source)
    except IntegrityError:
        found = session.exec(query).first()
        if found is None:
            raise
        return found
    return source


def get_source(*, session: Session, source_id: int) -> BuildSource:
    source = session.get(BuildSource, source_id)
    if source is None:
        raise NotFound(f"no source {source_id}")
    return source


def append_output(*, session: Session, step_id: int, text: str) -> None:
    """More of a build step's output (the last MAX_OUTPUT characters are kept)."""
    step = session.get(Step, step_id)
    if step is not None:
        whole = (step.output or "") + text
        step.output = whole[-MAX_OUTPUT:]
        step.output_dropped += len(whole) - len(step.output)
        session.add(step)


def record_image(*, session: Session, service_id: int, number: int, image: str) -> None:
    """What a release's build made: its image by digest, the same bytes from now on. The
    service runs it too when that release is its current one."""
    session.exec(update(Release).where(col(Release.service_id) == service_id, col(Release.number) == number)
                 .values(image=image))
    session.exec(update(Service).where(col(Service.id) == service_id, col(Service.release) == number)
                 .values(image=image))


def set_release_state(*, session: Session, service_id: int, number: int, state: ReleaseState,
                      only_from: ReleaseState | None = None) -> None:
    """``only_from``: change it only from that state."""
    query = update(Release).where(col(Release.service_id) == service_id, col(Release.number) == number)
    if only_from is not None:
        query = query.where(col(Release.state) == only_from)
    session.exec(query.values(state=state))


def release_views(*, session: Session, service: Service) -> list[ReleasePublic]:
    releases = session.exec(select(Release).where(Release.service_id == service.id).order_by(col(Release.number)))
    return [ReleasePublic(number=r.number, image=r.image, state=r.state, current=r.number == service.release,
                          build=r.build, commit=r.commit, created_at=r.created_at) for r in releases]

