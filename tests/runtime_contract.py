"""One contract for every Runtime: the same tests run on FakeRuntime and on DockerRuntime, so the
in-memory twin cannot drift from the real thing.

A test module subclasses ``RuntimeContract`` (named ``Test...``) and provides the ``target``
fixture: a runtime plus the images and the unique label the tests use. Everything a test creates
carries ``target.label``, so the real runtime's fixture can clean up by label.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pytest

from workers.runtime.base import ContainerError, ContainerSpec, ContainerState, Runtime

LONG_COMMAND = "sleep 300"
CRASH_COMMAND = "exit 3"
STOP_TIMEOUT = 2


@dataclass
class Target:
    runtime: Runtime
    image: str  # present; runs LONG_COMMAND for as long as it is left alone
    crash_image: str  # present; a container of it running CRASH_COMMAND exits at once
    missing_image: str  # never present
    label: tuple[str, str]  # carried by everything a test creates
    prefix: str = field(default_factory=lambda: f"orch-contract-{uuid.uuid4().hex[:8]}")

    def spec(self, suffix: str, *, image: str | None = None, command: str | None = LONG_COMMAND,
             labels: Mapping[str, str] | None = None, environment: Mapping[str, str] | None = None,
             memory_mb: int | None = 64, cpus: float | None = 0.25) -> ContainerSpec:
        return ContainerSpec(
            name=f"{self.prefix}-{suffix}",
            image=image or self.image,
            labels={self.label[0]: self.label[1], **(labels or {})},
            environment=dict(environment or {"GREETING": "hi"}),
            command=command,
            memory_mb=memory_mb,
            cpus=cpus,
        )

    def crash_spec(self, suffix: str) -> ContainerSpec:
        return self.spec(suffix, image=self.crash_image, command=CRASH_COMMAND)

    def mine(self, extra: Mapping[str, str] | None = None) -> list[ContainerState]:
        return self.runtime.find({self.label[0]: self.label[1], **(extra or {})})


def wait_for(check: Callable[[], ContainerState | None], until: Callable[[ContainerState | None], bool],
             timeout: float = 10.0) -> ContainerState | None:
    deadline = time.monotonic() + timeout
    state = check()
    while not until(state) and time.monotonic() < deadline:
        time.sleep(0.1)
        state = check()
    return state


class RuntimeContract:
    """What every Runtime promises; see workers/runtime/base.py."""

    @pytest.fixture
    def target(self) -> Target:
        raise NotImplementedError("a contract test module provides the target fixture")

    # --- images ---

    def test_has_image(self, target: Target) -> None:
        assert target.runtime.has_image(target.image) is True
        assert target.runtime.has_image(target.missing_image) is False

    def test_run_of_a_missing_image_fails_with_a_reason(self, target: Target) -> None:
        spec = target.spec("noimage", image=target.missing_image)
        with pytest.raises(ContainerError, match="image"):
            target.runtime.run(spec)
        assert target.runtime.inspect(spec.name) is None

    # --- run ---

    def test_run_creates_and_starts(self, target: Target) -> None:
        spec = target.spec("run", labels={"orchestrator.job": "j1"})
        state = target.runtime.run(spec)
        assert state.status == "running"
        assert state.name == spec.name
        assert state.id
        assert dict(spec.labels).items() <= dict(state.labels).items()
        inspected = target.runtime.inspect(spec.name)
        assert inspected is not None
        assert (inspected.id, inspected.status) == (state.id, "running")
        assert [c.id for c in target.mine()] == [state.id]

    def test_run_again_adopts_the_same_container(self, target: Target) -> None:
        spec = target.spec("adopt")
        first = target.runtime.run(spec)
        again = target.runtime.run(spec)
        assert again.id == first.id
        assert again.status == "running"
        assert [c.id for c in target.mine()] == [first.id]

    def test_concurrent_runs_of_one_spec_make_one_container(self, target: Target) -> None:
        # Redelivered twins of one start step: a few rounds, so a race shows up reliably.
        for round_ in range(3):
            spec = target.spec(f"race{round_}")
            results: list[ContainerState] = []
            errors: list[BaseException] = []

            def start(spec: ContainerSpec = spec, results: list[ContainerState] = results,
                      errors: list[BaseException] = errors) -> None:
                try:
                    results.append(target.runtime.run(spec))
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=start) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, [f"{type(e).__name__}: {e}" for e in errors]
            assert len({r.id for r in results}) == 1
            assert [c.name for c in target.mine() if c.name == spec.name] == [spec.name]

    def test_run_again_with_another_config_replaces_the_container(self, target: Target) -> None:
        first = target.runtime.run(target.spec("reconf", environment={"GREETING": "hi"}))
        changed = target.spec("reconf", environment={"GREETING": "hello"})
        second = target.runtime.run(changed)
        assert second.id != first.id  # a stale container is never adopted
        assert second.status == "running"
        assert [c.id for c in target.mine()] == [second.id]

    def test_a_container_that_exits_at_once_is_not_running(self, target: Target) -> None:
        spec = target.crash_spec("crash")
        target.runtime.run(spec)
        state = wait_for(lambda: target.runtime.inspect(spec.name),
                         lambda s: s is not None and s.status != "running")
        assert state is not None, "the crashed container must still be inspectable"
        assert state.status != "running"
        assert state.exit_code != 0
        assert [c.name for c in target.mine()] == [spec.name]  # list shows containers that are not running

    # --- inspect / stop / list ---

    def test_inspect_of_a_missing_name_is_none(self, target: Target) -> None:
        assert target.runtime.inspect(f"{target.prefix}-nobody") is None

    def test_logs_of_a_missing_name_are_empty(self, target: Target) -> None:
        assert target.runtime.logs(f"{target.prefix}-nobody") == ""

    def test_stop_of_a_missing_container_succeeds(self, target: Target) -> None:
        target.runtime.stop(f"{target.prefix}-nobody", timeout=STOP_TIMEOUT)

    def test_stop_removes(self, target: Target) -> None:
        spec = target.spec("stop")
        target.runtime.run(spec)
        target.runtime.stop(spec.name, timeout=STOP_TIMEOUT)
        assert target.runtime.inspect(spec.name) is None
        assert target.mine() == []
        target.runtime.stop(spec.name, timeout=STOP_TIMEOUT)  # redelivered: still fine

    def test_stop_removes_a_crashed_container(self, target: Target) -> None:
        spec = target.crash_spec("stopcrash")
        target.runtime.run(spec)
        wait_for(lambda: target.runtime.inspect(spec.name), lambda s: s is not None and s.status != "running")
        target.runtime.stop(spec.name, timeout=STOP_TIMEOUT)
        assert target.runtime.inspect(spec.name) is None

    def test_concurrent_stops_all_succeed(self, target: Target) -> None:
        spec = target.spec("stoprace")
        target.runtime.run(spec)
        errors: list[BaseException] = []

        def stop() -> None:
            try:
                target.runtime.stop(spec.name, timeout=STOP_TIMEOUT)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=stop) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, [f"{type(e).__name__}: {e}" for e in errors]
        assert target.runtime.inspect(spec.name) is None

    def test_run_after_stop_makes_a_new_container(self, target: Target) -> None:
        spec = target.spec("again")
        first = target.runtime.run(spec)
        target.runtime.stop(spec.name, timeout=STOP_TIMEOUT)
        second = target.runtime.run(spec)
        assert second.id != first.id and second.status == "running"

    def test_list_filters_by_all_labels(self, target: Target) -> None:
        a = target.runtime.run(target.spec("la", labels={"orchestrator.service": "web", "orchestrator.kind": "deploy"}))
        b = target.runtime.run(target.spec("lb", labels={"orchestrator.service": "web", "orchestrator.kind": "worker"}))
        c = target.runtime.run(target.spec("lc", labels={"orchestrator.service": "db", "orchestrator.kind": "deploy"}))
        assert {s.id for s in target.mine()} == {a.id, b.id, c.id}
        assert {s.id for s in target.mine({"orchestrator.service": "web"})} == {a.id, b.id}
        assert {s.id for s in target.mine({"orchestrator.kind": "deploy"})} == {a.id, c.id}
        assert [s.id for s in target.mine({"orchestrator.service": "web", "orchestrator.kind": "deploy"})] == [a.id]
        assert target.mine({"orchestrator.service": "web", "orchestrator.kind": "nope"}) == []
        assert target.mine({"orchestrator.service": "cache"}) == []
        (listed,) = target.mine({"orchestrator.service": "db"})
        assert listed.name == target.spec("lc").name and listed.status == "running"
