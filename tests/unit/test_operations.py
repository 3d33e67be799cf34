"""Operations from request to finish on the inline dispatch and fake runtimes: what the catalogue
says afterwards and what the runtimes hold must agree."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from unittest.mock import patch

from sqlalchemy import update
from sqlmodel import col

from orchestrator import catalogue, operations, requests
from orchestrator.dispatch import SendFailed
from orchestrator.models import (
    Job,
    JobKind,
    JobState,
    OpKind,
    OpParams,
    OpState,
    OpTrigger,
    ReleaseBefore,
    ScaleChange,
    StepAction,
    StepState,
    WorkerBefore,
    utcnow,
)
from orchestrator.models import Step as StepRow
from orchestrator.watcher import LOST_ADVANCE_AFTER
from tests.unit.world import CRASHING, ENV, IMAGE, IMAGE_2, World
from workers.inline import SentChain


def ids(jobs: Sequence[Job]) -> set[str]:
    return {j.id for j in jobs}


def stage_actions(world: World, op_id: int) -> list[set[StepAction]]:
    stages: dict[int, set[StepAction]] = {}
    for step in world.steps(op_id):
        stages.setdefault(step.stage, set()).add(step.action)
    return [stages[i] for i in sorted(stages)]


def assert_runtimes_match_catalogue(world: World, service: str) -> None:
    """Every active job has its container on its host, and no other container is left."""
    jobs = world.jobs(service)
    assert all(j.state == JobState.running for j in jobs)
    assert world.all_containers(service) == {j.id: j.host for j in jobs}


# --- deploy, redeploy ------------------------------------------------------------------------------


def test_first_push_deploys_jobs_spread_across_hosts(world: World) -> None:
    op = world.code_service("web", scale=3)
    assert (op.kind, op.trigger, op.state, op.error) == (OpKind.deploy, OpTrigger.push, OpState.succeeded, None)
    jobs = world.jobs("web")
    assert len(jobs) == 3
    assert_runtimes_match_catalogue(world, "web")
    assert sorted(Counter(j.host for j in jobs).values()) == [1, 2]
    for job in jobs:
        assert (job.release, job.image, job.kind, job.op_id) == (1, IMAGE, JobKind.deploy, op.id)
        assert world.runtimes[job.host].ports[job.container_name] == job.port
    svc = world.service("web")
    assert (svc.release, svc.image, svc.active_op_id) == (1, IMAGE, None)


def test_push_redeploys_every_job_with_new_ids_and_removes_the_old_containers(world: World) -> None:
    world.code_service("web", scale=3)
    old = world.jobs("web")
    op = requests.request_push(world.platform, env=ENV, service="web", image=IMAGE_2)
    assert op.kind == OpKind.redeploy
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.succeeded
    new = world.jobs("web")
    assert len(new) == 3 and ids(new).isdisjoint(ids(old))
    assert all((j.release, j.image) == (2, IMAGE_2) for j in new)
    assert_runtimes_match_catalogue(world, "web")
    assert {world.job(j.id).state for j in old} == {JobState.stopped}
    assert stage_actions(world, op.id or 0) == [{StepAction.check_image}, {StepAction.stop}, {StepAction.start}]


def test_a_request_takes_three_write_transactions_record_and_claim_being_one(world: World) -> None:
    """Each write transaction is a turn at SQLite's one writer that every process waits for: a
    request records its operation and claims the free service in one, plans and records the steps
    in a second, and marks the first stage sent in a third (after the broker took it)."""
    world.code_service("web", scale=2)
    with world.write_turns() as writes:
        op = requests.request_redeploy(world.platform, env=ENV, service="web")
    assert len(writes) == 3
    assert (op.state, world.service("web").active_op_id) == (OpState.running, op.id)
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.succeeded


def test_a_request_behind_a_running_operation_is_recorded_queued_and_claims_nothing(world: World) -> None:
    world.code_service("web", scale=2)
    first = requests.request_redeploy(world.platform, env=ENV, service="web")
    with world.write_turns() as writes:
        second = requests.request_redeploy(world.platform, env=ENV, service="web")
    assert len(writes) == 1
    assert (second.state, world.service("web").active_op_id) == (OpState.queued, first.id)
    world.run_all()
    assert [world.operation(o.id or 0).state for o in (first, second)] == [OpState.succeeded] * 2


def test_manual_redeploy_and_rollback_replace_every_job(world: World) -> None:
    world.code_service("web", scale=2)
    requests.request_push(world.platform, env=ENV, service="web", image=IMAGE_2)
    world.run_all()
    before = ids(world.jobs("web"))
    op = requests.request_redeploy(world.platform, env=ENV, service="web")
    world.run_all()
    assert (op.trigger, world.operation(op.id or 0).state) == (OpTrigger.manual, OpState.succeeded)
    after = world.jobs("web")
    assert ids(after).isdisjoint(before) and {j.release for j in after} == {2}

    op = requests.request_redeploy(world.platform, env=ENV, service="web", release=1)
    world.run_all()
    assert (op.trigger, world.operation(op.id or 0).state) == (OpTrigger.rollback, OpState.succeeded)
    assert {(j.release, j.image) for j in world.jobs("web")} == {(1, IMAGE)}
    assert (world.service("web").release, world.service("web").image) == (1, IMAGE)
    assert_runtimes_match_catalogue(world, "web")


def test_overlap_redeploy_starts_the_new_jobs_waits_then_stops_the_old(world: World) -> None:
    world.code_service("web", scale=2)
    with world.platform.session() as s:
        catalogue.update_service(session=s, service=world.service("web"), overlap=5, redeployable=None,
                                 support=True)
        s.commit()
    old = ids(world.jobs("web"))
    op = requests.request_redeploy(world.platform, env=ENV, service="web")
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.succeeded
    # No image check: the hosts run that image already (their running jobs do).
    assert stage_actions(world, op.id or 0) == [{StepAction.start}, {StepAction.wait}, {StepAction.stop}]
    (wait,) = world.steps(op.id or 0, StepAction.wait)
    assert wait.seconds == 5
    assert {st.job_id for st in world.steps(op.id or 0, StepAction.stop)} == old
    assert ids(world.jobs("web")).isdisjoint(old)
    assert_runtimes_match_catalogue(world, "web")


# --- scale -----------------------------------------------------------------------------------------


def test_scale_up_starts_only_the_extra_jobs(world: World) -> None:
    world.code_service("web", scale=2)
    old = ids(world.jobs("web"))
    op = requests.request_scale(world.platform, env=ENV, service="web", scale=4)
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.succeeded
    jobs = world.jobs("web")
    assert len(jobs) == 4 and old < ids(jobs)
    assert world.steps(op.id or 0, StepAction.stop) == []
    assert len(world.steps(op.id or 0, StepAction.start)) == 2
    assert Counter(j.host for j in jobs) == {"h1": 2, "h2": 2}
    assert_runtimes_match_catalogue(world, "web")
    assert world.service("web").scale == 4


def test_scale_down_stops_only_the_surplus(world: World) -> None:
    world.code_service("web", scale=4)
    old = ids(world.jobs("web"))
    op = requests.request_scale(world.platform, env=ENV, service="web", scale=1)
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.succeeded
    (kept,) = world.jobs("web")
    assert kept.id in old
    assert world.steps(op.id or 0, StepAction.start) == []
    stopped = {st.job_id for st in world.steps(op.id or 0, StepAction.stop)}
    assert stopped == old - {kept.id}
    assert_runtimes_match_catalogue(world, "web")


def test_scale_to_the_current_scale_succeeds_at_once_and_frees_the_service(world: World) -> None:
    world.code_service("web", scale=2)
    op = requests.request_scale(world.platform, env=ENV, service="web", scale=2)
    assert (op.state, world.steps(op.id or 0)) == (OpState.succeeded, [])
    assert world.dispatch.sent == [] and world.service("web").active_op_id is None


# --- worker targets --------------------------------------------------------------------------------


def workers(world: World, service: str, target: str) -> list[str]:
    found = [j for j in world.jobs(service) if j.kind == JobKind.worker and j.target == target]
    assert all(j.port is None and j.command == "work --hard" for j in found)
    return [j.id for j in found]


def test_worker_deploy_scale_and_rm(world: World) -> None:
    world.code_service("web", scale=1)
    (web,) = world.jobs("web")
    p = world.platform

    op = requests.request_worker_deploy(p, env=ENV, service="web", target="q", command="work --hard")
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.succeeded
    first = workers(world, "web", "q")
    assert len(first) == 1
    assert world.worker("web", "q").scale == 1  # type: ignore[union-attr]

    for change, count in (("+2", 3), ("-1", 2), ("4", 4)):
        before = set(workers(world, "web", "q"))
        op = requests.request_worker_scale(p, env=ENV, service="web", target="q", scale=change)
        world.run_all()
        assert world.operation(op.id or 0).state == OpState.succeeded, change
        now = set(workers(world, "web", "q"))
        assert len(now) == count and world.worker("web", "q").scale == count  # type: ignore[union-attr]
        assert before <= now or now <= before  # only extras started, or only surplus stopped

    op = requests.request_worker_rm(p, env=ENV, service="web", target="q")
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.succeeded
    assert workers(world, "web", "q") == [] and world.worker("web", "q") is None
    assert [j.id for j in world.jobs("web")] == [web.id]  # the deploy job was never touched
    assert_runtimes_match_catalogue(world, "web")


def test_a_redeploy_replaces_the_worker_jobs_with_their_command(world: World) -> None:
    world.code_service("web", scale=1)
    requests.request_worker_deploy(world.platform, env=ENV, service="web", target="q", command="work --hard")
    requests.request_worker_scale(world.platform, env=ENV, service="web", target="q", scale=2)
    world.run_all()
    old = set(workers(world, "web", "q"))
    requests.request_push(world.platform, env=ENV, service="web", image=IMAGE_2)
    world.run_all()
    new = workers(world, "web", "q")
    assert len(new) == 2 and old.isdisjoint(new)
    assert {world.job(j).release for j in new} == {2}
    assert_runtimes_match_catalogue(world, "web")


# --- one operation at a time per service -----------------------------------------------------------


def test_operations_of_one_service_run_one_at_a_time_in_request_order(world: World) -> None:
    world.code_service("web", scale=2)
    p = world.platform
    ops = [requests.request_push(p, env=ENV, service="web", image=IMAGE_2),
           requests.request_scale(p, env=ENV, service="web", scale=3),
           requests.request_scale(p, env=ENV, service="web", scale=1)]
    assert [o.state for o in ops] == [OpState.running, OpState.queued, OpState.queued]
    assert world.service("web").active_op_id == ops[0].id
    assert len(world.dispatch.sent) == 1  # only the first one was sent
    world.run_all()
    done = [world.operation(o.id or 0) for o in ops]
    assert [o.state for o in done] == [OpState.succeeded] * 3
    for earlier, later in itertools.pairwise(done):
        assert earlier.finished_at is not None and later.started_at is not None
        assert earlier.finished_at <= later.started_at
    (job,) = world.jobs("web")
    assert job.release == 2  # the scales ran after the push, in the order asked
    assert world.service("web").scale == 1
    assert_runtimes_match_catalogue(world, "web")


def test_operations_of_different_services_run_side_by_side(world: World) -> None:
    world.code_service("web", scale=1)
    world.code_service("api", scale=1)
    web = requests.request_scale(world.platform, env=ENV, service="web", scale=2)
    api = requests.request_scale(world.platform, env=ENV, service="api", scale=3)
    assert (web.state, api.state) == (OpState.running, OpState.running)
    world.run_all()
    assert world.operation(web.id or 0).state == world.operation(api.id or 0).state == OpState.succeeded
    assert (len(world.jobs("web")), len(world.jobs("api"))) == (2, 3)


# --- failures --------------------------------------------------------------------------------------


def test_a_crashing_release_fails_and_the_last_good_release_stays_current(world: World) -> None:
    world.code_service("web", scale=2)
    op = requests.request_push(world.platform, env=ENV, service="web", image=CRASHING)
    world.run_all()
    failed = world.operation(op.id or 0)
    assert failed.state == OpState.failed and failed.error is not None
    assert "container exited at once (exit code 1)" in failed.error
    assert "Service web now runs 0 of 2 deploy jobs. Release 1 stays current." in failed.error
    svc = world.service("web")
    assert (svc.release, svc.image, svc.active_op_id) == (1, IMAGE, None)
    # Without overlap the old jobs had stopped: a revert started the last good release again.
    revert = world.operations("web")[-1]
    assert (revert.kind, revert.trigger, revert.state) == (OpKind.revert, OpTrigger.revert, OpState.succeeded)
    assert {(j.release, j.image, j.state) for j in world.jobs("web")} == {(1, IMAGE, JobState.running)}
    assert len(world.jobs("web")) == 2
    assert_runtimes_match_catalogue(world, "web")  # no crashed container left
    # The next redeploy runs the last good release again.
    op = requests.request_redeploy(world.platform, env=ENV, service="web")
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.succeeded
    assert {(j.release, j.image) for j in world.jobs("web")} == {(1, IMAGE)}
    assert_runtimes_match_catalogue(world, "web")


def test_an_image_missing_on_a_host_fails_before_anything_stops(world: World) -> None:
    world.code_service("web", scale=2)
    old = ids(world.jobs("web"))
    world.runtimes["h2"].images.discard(IMAGE_2)
    op = requests.request_push(world.platform, env=ENV, service="web", image=IMAGE_2)
    world.run_all()
    failed = world.operation(op.id or 0)
    assert failed.state == OpState.failed
    assert failed.error == (f"check image {IMAGE_2} on h2: image {IMAGE_2} is not on host h2 and could not be "
                            f"pulled: manifest for {IMAGE_2} not found: manifest unknown. Service web now runs "
                            "2 of 2 deploy jobs. Release 1 stays current.")
    assert ids(world.jobs("web")) == old
    assert_runtimes_match_catalogue(world, "web")
    assert {st.state for st in world.steps(op.id or 0, StepAction.stop)} == {StepState.skipped}
    planned = world.jobs("web", states=[JobState.failed])
    assert len(planned) == 2 and all(j.error and "never started" in j.error for j in planned)
    assert (world.service("web").release, world.service("web").image) == (1, IMAGE)


def test_a_failed_scale_keeps_the_old_scale(world: World) -> None:
    world.code_service("web", scale=1)
    (job,) = world.jobs("web")
    other = next(h for h in world.runtimes if h != job.host)
    world.runtimes[other].images.discard(IMAGE)  # a host that runs nothing of it lacks the image
    op = requests.request_scale(world.platform, env=ENV, service="web", scale=4)
    world.run_all()
    failed = world.operation(op.id or 0)
    assert failed.state == OpState.failed
    assert failed.error is not None and failed.error.endswith(
        "Service web now runs 1 of 4 deploy jobs. Its scale stays 1.")
    assert world.service("web").scale == 1 and len(world.jobs("web")) == 1
    assert world.steps(op.id or 0, StepAction.start) and {st.state for st in world.steps(
        op.id or 0, StepAction.start)} == {StepState.skipped}  # the check failed first: nothing started


def test_a_plan_error_fails_the_operation_at_once_and_changes_nothing(world: World) -> None:
    world.code_service("web", scale=2)
    op = requests.request_scale(world.platform, env=ENV, service="web", scale=500)
    assert op.state == OpState.failed and op.error is not None and "no up host has room" in op.error
    assert world.service("web").scale == 2 and world.service("web").active_op_id is None
    assert world.dispatch.sent == []


def test_a_failed_worker_operation_puts_the_worker_target_back(world: World) -> None:
    world.code_service("web", scale=1)
    requests.request_worker_deploy(world.platform, env=ENV, service="web", target="q", command="work --hard")
    world.run_all()
    for runtime in world.runtimes.values():
        runtime.images.discard(IMAGE)

    op = requests.request_worker_scale(world.platform, env=ENV, service="web", target="q", scale="+2")
    world.run_all()
    failed = world.operation(op.id or 0)
    assert failed.state == OpState.failed
    assert failed.error is not None and failed.error.endswith("Worker target q stays at scale 1.")
    assert world.worker("web", "q").scale == 1  # type: ignore[union-attr]

    op = requests.request_worker_deploy(world.platform, env=ENV, service="web", target="new", command="x")
    world.run_all()
    failed = world.operation(op.id or 0)
    assert failed.state == OpState.failed
    assert failed.error is not None and failed.error.endswith("Worker target new is not kept.")
    assert world.worker("web", "new") is None


class BrokerDown:
    """A Dispatch whose broker cannot be reached."""

    def send_stage(self, op_id: int, stages: Sequence[Sequence[StepRow]], index: int, *, env: str,
                   service: str, rung: Sequence[str] = ()) -> None:
        raise SendFailed("connection refused")

    def send_host_steps(self, hosts: Sequence[str]) -> None:
        raise SendFailed("connection refused")

    def send_finish(self, op_id: int, *, env: str, service: str, host: str | None) -> None:
        raise SendFailed("connection refused")

    def revoke(self, step_ids: Sequence[int]) -> None:
        pass


def test_an_operation_that_cannot_be_sent_fails_and_restores_the_spec(world: World) -> None:
    world.code_service("web", scale=2)
    old = ids(world.jobs("web"))
    inline = world.platform.dispatch
    world.platform.dispatch = BrokerDown()
    push = requests.request_push(world.platform, env=ENV, service="web", image=IMAGE_2)
    scale = requests.request_scale(world.platform, env=ENV, service="web", scale=5)
    world.platform.dispatch = inline
    sent = "could not send the operation to the broker: connection refused. Service web now runs 2 of 2 deploy jobs."
    assert (push.state, push.error) == (OpState.failed, f"{sent} Release 1 stays current.")
    assert (scale.state, scale.error) == (OpState.failed, f"{sent} Its scale stays 2.")
    for op in (push, scale):
        assert {st.state for st in world.steps(op.id or 0)} == {StepState.skipped}
    svc = world.service("web")
    assert (svc.release, svc.image, svc.scale, svc.active_op_id) == (1, IMAGE, 2, None)
    assert ids(world.jobs("web")) == old  # what it planned holds no room: never started
    assert_runtimes_match_catalogue(world, "web")

    op = requests.request_scale(world.platform, env=ENV, service="web", scale=3)  # the service is free
    world.run_all()
    assert world.operation(op.id or 0).state == OpState.succeeded
    assert len(world.jobs("web")) == 3


# --- typed parameters ------------------------------------------------------------------------------


def test_typed_parameters_round_trip_through_the_catalogue(world: World) -> None:
    world.code_service("web", scale=1)
    p = world.platform
    push = requests.request_push(p, env=ENV, service="web", image=IMAGE_2)
    scale = requests.request_scale(p, env=ENV, service="web", scale=2)
    deploy = requests.request_worker_deploy(p, env=ENV, service="web", target="q", command="work --hard")
    world.run_all()
    shrink = requests.request_worker_scale(p, env=ENV, service="web", target="q", scale="-1")
    world.run_all()
    expected = {
        push.id: OpParams(release=2, image=IMAGE_2, release_before=ReleaseBefore(release=1, image=IMAGE)),
        scale.id: OpParams(scale=2, scale_before=1),
        deploy.id: OpParams(target="q", command="work --hard", worker_before=WorkerBefore(existed=False)),
        shrink.id: OpParams(target="q", worker_scale=ScaleChange(number=-1, relative=True),
                            worker_before=WorkerBefore(command="work --hard", scale=1)),
    }
    for op_id, params in expected.items():
        op = world.operation(op_id or 0)
        assert op.parameters == params
        assert op.params == params.model_dump(mode="json", exclude_none=True)  # plain JSON in the row


# --- a stage at a time: the advance ---------------------------------------------------------------


def a_redeploy_after_its_first_stage(world: World) -> tuple[int, int]:
    """A redeploy of 2 jobs whose first stage ran (by hand) and whose node stopped right after
    ending it, before the advance it does at once (``operations.stage_ended``): (its operation,
    how many stages it has)."""
    world.code_service("web", scale=2)
    op = requests.request_redeploy(world.platform, env=ENV, service="web")
    chain = world.take_chain(op.id or 0)
    assert chain.first == 0 and len(chain.stages) >= 2
    with patch.object(operations, "stage_ended", lambda *_args: None):
        world.run_stages(chain, 1)
    return op.id or 0, len(chain.stages)


def sent_stages(world: World, op_id: int) -> list[int]:
    return [m.first for m in world.dispatch.sent if isinstance(m, SentChain) and m.op_id == op_id]


def test_the_advance_sends_the_next_stage_once(world: World) -> None:
    op_id, stages = a_redeploy_after_its_first_stage(world)
    p = world.platform
    assert operations.advance(p, op_id, 1, env=ENV, service="web")
    assert sent_stages(world, op_id) == [1]
    # A redelivered advance (its node died before acknowledging it) sends nothing again.
    assert not operations.advance(p, op_id, 1, env=ENV, service="web")
    assert sent_stages(world, op_id) == [1]
    world.run_all()  # each stage's advance, then the finish
    assert world.operation(op_id).state == OpState.succeeded
    assert world.operation(op_id).sent_stage == stages - 1
    assert_runtimes_match_catalogue(world, "web")


def test_the_advance_sends_nothing_after_a_step_that_did_not_succeed(world: World) -> None:
    op_id, _ = a_redeploy_after_its_first_stage(world)
    (first, *_rest) = [st for st in world.steps(op_id) if st.stage == 0]
    with world.platform.session() as s:  # e.g. the watcher failed it as its lease ran out
        s.exec(update(StepRow).where(col(StepRow.id) == first.id).values(state=StepState.failed))
        s.commit()
    assert operations.advance(world.platform, op_id, 1, env=ENV, service="web") is False  # not None: never
    assert sent_stages(world, op_id) == []
    assert {st.state for st in world.steps(op_id) if st.stage >= 1} == {StepState.pending}


def test_the_advance_sends_nothing_for_a_cancelled_operation(world: World) -> None:
    op_id, _ = a_redeploy_after_its_first_stage(world)
    operations.cancel(world.platform, op_id)
    assert not operations.advance(world.platform, op_id, 1, env=ENV, service="web")
    assert sent_stages(world, op_id) == []
    assert world.operation(op_id).state == OpState.cancelled


def fail_step(world: World, step_id: int | None) -> None:
    with world.platform.session() as s:  # as the watcher does (a ran-out lease, a host down)
        s.exec(update(StepRow).where(col(StepRow.id) == step_id).values(state=StepState.failed, error="lost"))
        s.commit()


def test_no_stage_is_sent_after_a_step_of_a_later_one_failed(world: World) -> None:
    """A host that went down fails its steps of stages not sent yet: the operation is ending, so
    nothing more is sent (no stop of old jobs), and its finish does not wait for unsent stages."""
    op_id, stages = a_redeploy_after_its_first_stage(world)
    last = [st for st in world.steps(op_id) if st.stage == stages - 1]
    fail_step(world, last[0].id)
    assert operations.advance(world.platform, op_id, 1, env=ENV, service="web") is False
    assert sent_stages(world, op_id) == []
    assert operations.finish(world.platform, op_id) is True  # not None: nothing it waits for runs
    ended = world.operation(op_id)
    assert ended.state == OpState.failed and ended.error is not None and ended.error.startswith(last[0].name)


def test_an_advance_that_could_not_reach_the_broker_leaves_its_stage_to_the_watcher(world: World) -> None:
    """Part of the stage may have gone out: it is never sent twice (a step would run twice);
    the watcher fails its steps as never picked up, which ends the operation."""
    op_id, _ = a_redeploy_after_its_first_stage(world)
    inline = world.platform.dispatch
    world.platform.dispatch = BrokerDown()
    assert not operations.advance(world.platform, op_id, 1, env=ENV, service="web")
    world.platform.dispatch = inline
    assert world.operation(op_id).sent_stage == 1
    assert not operations.advance(world.platform, op_id, 1, env=ENV, service="web")
    assert sent_stages(world, op_id) == []
    backdate_stage(world, op_id, 0, world.platform.settings.pickup_timeout + 5)
    world.watch()
    world.run_all()
    ended = world.operation(op_id)
    assert ended.state == OpState.failed and ended.error is not None and "never picked up" in ended.error
    # Its jobs never started: they hold nothing. It had stopped the old ones first (no overlap):
    # the service is healed back to its scale.
    assert not [j for j in world.jobs("web") if j.op_id == op_id]  # active ones: none of its
    world.watch()
    world.run_all()
    assert len([j for j in world.jobs("web") if j.state == JobState.running]) == 2
    assert_runtimes_match_catalogue(world, "web")


def backdate_stage(world: World, op_id: int, stage: int, seconds: float) -> None:
    """The steps of ``stage`` ended ``seconds`` ago."""
    with world.platform.session() as s:
        s.exec(update(StepRow).where(col(StepRow.op_id) == op_id, col(StepRow.stage) == stage)
               .values(finished_at=utcnow() - timedelta(seconds=seconds)))
        s.commit()


def test_the_watcher_sends_a_stage_whose_advance_was_lost(world: World) -> None:
    """The advance runs on the node whose step ended the stage before: should that node die
    right after, the watcher sends the stage, once."""
    op_id, _ = a_redeploy_after_its_first_stage(world)
    world.watch()
    assert sent_stages(world, op_id) == []  # the stage just ended: its advance may be on its way
    backdate_stage(world, op_id, 0, LOST_ADVANCE_AFTER + 1)
    world.watch()
    world.watch()
    assert sent_stages(world, op_id) == [1]
    world.run_all()
    assert world.operation(op_id).state == OpState.succeeded
    assert_runtimes_match_catalogue(world, "web")


def test_a_stage_sent_in_part_before_a_step_failed_still_ends(world: World) -> None:
    """Its send failed part-way (the stage stays claimed), then a step of a later stage failed
    (its host went down): the stage's steps that never came are failed as never picked up, and
    the operation ends instead of waiting for them for ever."""
    op_id, stages = a_redeploy_after_its_first_stage(world)
    inline = world.platform.dispatch
    world.platform.dispatch = BrokerDown()
    assert operations.advance(world.platform, op_id, 1, env=ENV, service="web") is False
    world.platform.dispatch = inline
    fail_step(world, next(st for st in world.steps(op_id) if st.stage == stages - 1).id)
    assert operations.finish(world.platform, op_id) is None  # stage 1 was sent (claimed): wait for it
    backdate_stage(world, op_id, 0, world.platform.settings.pickup_timeout + 5)
    world.watch()
    world.run_all()
    assert world.operation(op_id).state == OpState.failed
    assert {st.state for st in world.steps(op_id) if st.stage == 1} == {StepState.failed}


def test_the_claim_itself_refuses_a_stage_after_a_failed_step(world: World) -> None:
    """On PostgreSQL a failure committed after the advance read the steps still stops the stage."""
    op_id, stages = a_redeploy_after_its_first_stage(world)
    fail_step(world, next(st for st in world.steps(op_id) if st.stage == stages - 1).id)
    with world.platform.session() as s:
        assert not catalogue.claim_stage(session=s, op_id=op_id, stage=1)
    assert world.operation(op_id).sent_stage == 0



def test_what_a_running_operation_stops_is_leaving_in_the_host_loads(world: World) -> None:
    """Placement spreads by the load that stays once running operations are through: the jobs
    they stop still take room, but are counted as leaving (20 redeploys at once, each placing
    while the others' old jobs still ran, left 100 hosts holding 8 to 14 jobs each)."""
    from orchestrator.sizes import parse_size

    world.code_service("web", scale=2)
    old = {j.host: j for j in world.jobs("web")}
    op = requests.request_redeploy(world.platform, env=ENV, service="web")
    chain = world.take_chain(op.id or 0)  # planned and sent: its stops wait
    size = parse_size(world.service("web").size)

    def loads() -> dict[str, tuple[float, float]]:
        with world.platform.reader() as s:
            return {h.name: (h.used_cpus, h.leaving_cpus) for h in catalogue.host_loads(session=s)}

    during = loads()
    for host in old:  # its old job and its new one take room; the old one is leaving
        used, leaving = during[host]
        assert leaving == size.cpus and used >= 2 * size.cpus - 1e-9, (host, during)
    world.run_stages(chain)  # (its finish is left out: it comes now)
    operations.finish(world.platform, op.id or 0)
    assert world.operation(op.id or 0).state == OpState.succeeded
    assert all(leaving == 0 for _used, leaving in loads().values())
