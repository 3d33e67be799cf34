"""Removing services and environments in the catalogue: names freed, history kept, a kept
database's data found again by the service that takes its name."""

from __future__ import annotations

import pytest

from orchestrator import catalogue
from orchestrator.errors import NotFound
from orchestrator.models import ServiceType
from tests.unit.world import ENV, World


def test_a_database_added_again_takes_over_the_kept_data_with_its_credentials(world: World) -> None:
    with world.platform.session() as s:
        env = catalogue.get_env(session=s, name=ENV)
        old = catalogue.add_service(session=s, env=env, name="db", type=ServiceType.postgresql, image=None,
                                    command=None, scale=1, size="s")
        old.host = "h2"
        catalogue.mark_service_removed(session=s, service=old)
        assert catalogue.list_services(session=s, env=env) == []
        new = catalogue.add_service(session=s, env=env, name="db", type=ServiceType.postgresql, image=None,
                                    command=None, scale=1, size="s")
        assert (new.credentials, new.volume, new.host) == (old.credentials, "orch_e_db_data", "h2")
        assert (old.volume, old.host) == (None, None)  # let go of: no third service takes it too
        s.rollback()


def test_deleted_data_is_not_taken_over(world: World) -> None:
    with world.platform.session() as s:
        env = catalogue.get_env(session=s, name=ENV)
        old = catalogue.add_service(session=s, env=env, name="db", type=ServiceType.postgresql, image=None,
                                    command=None, scale=1, size="s")
        catalogue.mark_service_removed(session=s, service=old, data_deleted=True)
        new = catalogue.add_service(session=s, env=env, name="db", type=ServiceType.postgresql, image=None,
                                    command=None, scale=1, size="s")
        assert new.credentials != old.credentials and new.host is None
        s.rollback()


def test_a_removed_service_is_never_found_by_its_old_or_new_name(world: World) -> None:
    with world.platform.session() as s:
        env = catalogue.get_env(session=s, name=ENV)
        svc = catalogue.add_service(session=s, env=env, name="api", type=ServiceType.code, image=None,
                                    command="serve", scale=1, size="s")
        catalogue.mark_service_removed(session=s, service=svc)
        for name in ("api", svc.name):
            with pytest.raises(NotFound):
                catalogue.get_service(session=s, env=ENV, name=name)
        s.rollback()


def test_removed_rows_are_purged_after_the_grace_but_kept_data(world: World) -> None:
    from datetime import timedelta

    from sqlmodel import select

    from orchestrator import requests
    from orchestrator.models import Operation, Service, utcnow

    requests.add_service(world.platform, env=ENV, name="api", type=ServiceType.code, image=None,
                         command="serve", scale=1, size="s")
    with world.platform.session() as s:
        env = catalogue.get_env(session=s, name=ENV)
        api = catalogue.get_service(session=s, env=ENV, name="api")[1]
        db = catalogue.add_service(session=s, env=env, name="db", type=ServiceType.postgresql, image=None,
                                   command=None, scale=1, size="s")
        catalogue.mark_service_removed(session=s, service=api)
        catalogue.mark_service_removed(session=s, service=db)  # its data kept: its row stays
        s.commit()
        assert catalogue.purge_removed(session=s, before=utcnow() - timedelta(minutes=5)) == []
        assert catalogue.purge_removed(session=s, before=utcnow() + timedelta(seconds=1)) == [api.name]
        s.commit()
        left = {svc.name for svc in s.exec(select(Service))}
        assert left == {db.name} and not list(s.exec(select(Operation).where(Operation.service_id == api.id)))


def test_cancel_revokes_the_tasks_of_the_steps_it_skips(world: World) -> None:
    from orchestrator import operations, requests
    from orchestrator.models import OpState, StepState
    from tests.unit.world import IMAGE_2

    world.code_service("web", scale=2)
    op = requests.request_push(world.platform, env=ENV, service="web", image=IMAGE_2)
    cancelled = operations.cancel(world.platform, op.id or 0)  # sent, nothing ran yet
    assert cancelled.state == OpState.cancelled
    skipped = [st.id for st in world.steps(op.id or 0) if st.state == StepState.skipped]
    assert skipped and world.dispatch.revoked == skipped
    world.run_all()  # the tasks that run anyway do nothing
    assert {j.release for j in world.jobs("web")} == {1} and len(world.jobs("web")) == 2
