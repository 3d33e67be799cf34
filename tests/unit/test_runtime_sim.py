"""The simulated hosts' runtime: the runtime contract (as FakeRuntime and DockerRuntime pass it),
then what it adds: every image present, injected latencies and start failures, a death."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from tests.runtime_contract import RuntimeContract, Target
from workers.runtime.base import ContainerError, ContainerSpec
from workers.runtime.sim import INJECTED_OUTPUT, SimRuntime

IMAGE = "orch/busybox:1"
CRASH_IMAGE = "orch/crashing:1"
MISSING = "orch/missing:0"


class TestSimRuntime(RuntimeContract):
    @pytest.fixture
    def target(self) -> Target:
        runtime = SimRuntime(absent={MISSING}, crashing={CRASH_IMAGE})
        return Target(runtime=runtime, image=IMAGE, crash_image=CRASH_IMAGE, missing_image=MISSING,
                      label=("orch-contract", "sim"))


class TestSimRuntimeWithLatencies(RuntimeContract):
    """Latencies change nothing the contract promises (concurrent twins still make one container)."""

    @pytest.fixture
    def target(self) -> Target:
        runtime = SimRuntime(absent={MISSING}, crashing={CRASH_IMAGE}, start_latency=0.01, stop_latency=0.01)
        return Target(runtime=runtime, image=IMAGE, crash_image=CRASH_IMAGE, missing_image=MISSING,
                      label=("orch-contract", "sim-slow"))


def spec(name: str, image: str = "any/image:7", port: int | None = None) -> ContainerSpec:
    environment = {"PORT": str(port)} if port is not None else {}
    return ContainerSpec(name=name, image=image, labels={"orchestrator.job": name}, environment=environment,
                         command="serve")


def timed(fn: object) -> float:
    assert callable(fn)
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def test_every_image_exists_and_pulls_are_no_ops() -> None:
    runtime = SimRuntime()
    assert runtime.has_image("whatever/anything:42")
    runtime.pull("whatever/anything:42")
    assert runtime.run(spec("a")).status == "running"
    assert runtime.capacity() == (16.0, 65536)


def test_an_absent_image_is_not_found_by_a_pull() -> None:
    runtime = SimRuntime(absent={MISSING})
    with pytest.raises(ContainerError, match="manifest unknown"):
        runtime.pull(MISSING)


def test_a_started_container_listens_on_its_port_until_stopped() -> None:
    runtime = SimRuntime()
    runtime.run(spec("a", port=31000))
    assert runtime.listening(31000) and not runtime.listening(31001)
    runtime.stop("a", timeout=5)
    assert not runtime.listening(31000)


def test_start_latency_is_slept_in_each_start_and_starts_overlap() -> None:
    runtime = SimRuntime(start_latency=0.3)
    assert 0.3 <= timed(lambda: runtime.run(spec("one"))) < 0.6
    threads = [threading.Thread(target=runtime.run, args=(spec(f"c{i}"),)) for i in range(5)]

    def all_five() -> None:
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    assert timed(all_five) < 0.9  # five starts of 0.3 s at once, not one after the other (1.5 s)
    assert len(runtime.jobs()) == 6


def test_stop_latency_is_slept_for_a_running_container_at_most_its_timeout() -> None:
    runtime = SimRuntime(stop_latency=0.3)
    runtime.run(spec("a"))
    assert 0.3 <= timed(lambda: runtime.stop("a", timeout=5)) < 0.6
    assert timed(lambda: runtime.stop("a", timeout=5)) < 0.1  # gone already: nothing to wait for
    runtime.run(spec("b"))
    assert timed(lambda: runtime.stop("b", timeout=0)) < 0.1  # killed at once
    assert runtime.jobs() == []


def test_no_latency_by_default() -> None:
    runtime = SimRuntime()
    assert timed(lambda: [runtime.run(spec(f"c{i}")) for i in range(50)]) < 0.2


def test_injected_failures_exit_at_once_with_their_output() -> None:
    runtime = SimRuntime(fail_rate=1.0)
    state = runtime.run(spec("a", port=31000))
    assert (state.status, state.exit_code) == ("exited", 1)
    assert runtime.inspect("a") == state
    assert runtime.logs("a").strip() == INJECTED_OUTPUT
    assert not runtime.listening(31000)
    runtime.stop("a", timeout=0)
    assert runtime.inspect("a") is None and runtime.logs("a") == ""


def test_the_fail_rate_is_a_probability() -> None:
    runtime = SimRuntime(fail_rate=0.3, seed=7)
    failed = sum(runtime.run(spec(f"c{i}")).status == "exited" for i in range(1000))
    assert 240 <= failed <= 360
    again = SimRuntime(fail_rate=0.3, seed=7)  # the same seed: the same failures
    assert [again.run(spec(f"c{i}")).status for i in range(50)] == \
        [state.status for state in (runtime.inspect(f"c{i}") for i in range(50)) if state is not None]


def test_a_running_container_adopted_again_is_never_failed() -> None:
    runtime = SimRuntime(fail_rate=0.0)
    first = runtime.run(spec("a"))
    runtime.fail_rate = 1.0
    again = runtime.run(spec("a"))  # a redelivered start: the container already runs
    assert (again.id, again.status) == (first.id, "running")


def test_rates_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError):
        SimRuntime(fail_rate=1.5)
    with pytest.raises(ValueError):
        SimRuntime(start_latency=-1)


def test_a_dead_host_answers_nothing_and_its_calls_hang_until_released() -> None:
    runtime = SimRuntime(name="sim3")
    runtime.run(spec("a"))
    runtime.start_latency = 5.0
    errors: list[BaseException] = []

    def start() -> None:
        try:
            runtime.run(spec("b"))
        except BaseException as exc:
            errors.append(exc)

    starting = threading.Thread(target=start)
    starting.start()  # in its 5 s of latency when the host dies
    time.sleep(0.1)
    runtime.die()
    assert not runtime.ping()
    hung = threading.Thread(target=start)
    hung.start()
    starting.join(0.3)
    hung.join(0.3)
    assert starting.is_alive() and hung.is_alive()  # hung, as on a vanished machine
    runtime.release()
    starting.join(2)
    hung.join(2)
    assert not starting.is_alive() and not hung.is_alive()
    assert len(errors) == 2 and all(isinstance(e, ContainerError) and "sim3 died" in str(e) for e in errors)
    with pytest.raises(ContainerError, match="died"):
        runtime.inspect("a")


def test_listings_read_while_other_threads_start_and_stop_containers() -> None:
    """A simulated host's box steps start and stop its containers in many threads while its
    heartbeat lists them and its starts ask which ports listen: a listing reads the maps as they
    stand (it raised "dictionary changed size during iteration", which failed a step)."""
    runtime = SimRuntime()
    errors: list[BaseException] = []
    done = threading.Event()

    def churn(worker: int) -> None:
        try:
            for i in range(3000):
                name = f"c{worker}-{i % 50}"
                runtime.run(spec(name, port=31000 + i % 50))
                if i % 2:
                    runtime.stop(name, timeout=0)
        except BaseException as exc:  # (reported below)
            errors.append(exc)

    def list_all() -> None:
        try:
            while not done.is_set():
                runtime.jobs()
                runtime.find({"orchestrator.job": "c0-1"})
                runtime.listening(31007)
                runtime.logs("c1-3")
        except BaseException as exc:
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can: the race shows at once
    try:
        readers = [threading.Thread(target=list_all) for _ in range(2)]
        writers = [threading.Thread(target=churn, args=(w,)) for w in range(2)]
        for t in readers + writers:
            t.start()
        for t in writers:
            t.join(timeout=60)
        done.set()
        for t in readers:
            t.join(timeout=60)
    finally:
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in readers + writers)
    assert errors == []
