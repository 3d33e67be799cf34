"""API tokens: only a hash of each is kept."""

from __future__ import annotations

import hashlib
import secrets

from sqlmodel import Session, select

from orchestrator.errors import BadInput
from orchestrator.models import ApiToken, Role
from orchestrator.rules import check_name


def create_token(*, session: Session, name: str, role: Role) -> str:
    """A new bearer token; only its hash is stored, so the returned value is shown once."""
    check_name("token", name)
    if session.exec(select(ApiToken).where(ApiToken.name == name)).first() is not None:
        raise BadInput(f"token {name} exists already")
    raw = "orch_" + secrets.token_urlsafe(32)
    session.add(ApiToken(name=name, role=role, token_hash=_token_hash(raw)))
    session.flush()
    return raw


def role_of_token(*, session: Session, raw: str) -> Role | None:
    token = session.exec(select(ApiToken).where(ApiToken.token_hash == _token_hash(raw))).first()
    return token.role if token is not None else None


def _token_hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()
