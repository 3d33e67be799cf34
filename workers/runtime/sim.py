"""A simulated Docker host for scale tests (``orchestrator sim run``): the in-memory runtime,
where every image exists and containers "run" until stopped, with latencies and start failures
injected when asked, and a death (``die``) as when the machine goes away."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterable, Mapping

from workers.runtime.base import ContainerError, ContainerSpec, ContainerState
from workers.runtime.fake import FakeRuntime

INJECTED_OUTPUT = "sim: injected start failure"


class SimRuntime(FakeRuntime):
    """FakeRuntime with every image present (but ``absent`` ones, which no pull finds), a
    realistic capacity, ``start_latency``/``stop_latency`` seconds slept in each start and each
    stop of a container (outside the lock: starts overlap as Docker's do), and starts that fail
    with probability ``fail_rate``: the container exits at once with code 1, as a program that
    crashes on start does, and the step reports it the same way."""

    def __init__(self, *, name: str = "sim", start_latency: float = 0.0, stop_latency: float = 0.0,
                 fail_rate: float = 0.0, seed: int | None = None, absent: Iterable[str] = (),
                 crashing: Iterable[str] = (), cpus: float = 16.0, memory_mb: int = 64 * 1024) -> None:
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError(f"fail rate {fail_rate} is not between 0 and 1")
        if start_latency < 0 or stop_latency < 0:
            raise ValueError("latencies are seconds, not negative")
        super().__init__(crashing=set(crashing))
        self.name = name
        self.start_latency, self.stop_latency, self.fail_rate = start_latency, stop_latency, fail_rate
        self.absent = frozenset(absent)
        self.cpus, self.memory_mb = cpus, memory_mb
        self.injected: set[str] = set()  # containers whose start was made to fail
        self._random = random.Random(seed)
        self._died = threading.Event()
        self._released = threading.Event()

    # --- death ------------------------------------------------------------------------------------

    def die(self) -> None:
        """The machine is gone: it answers no ping, and every call to it from now on (and every
        latency under way) hangs, as a call to a vanished machine does, until ``release``."""
        self.answering = False
        self._died.set()

    @property
    def dead(self) -> bool:
        return self._died.is_set()

    def release(self) -> None:
        """Let calls hung on a dead host end (with a ContainerError): the process is stopping."""
        self._released.set()

    def _reach(self) -> None:
        if self._died.is_set():
            self._hang()

    def _hang(self) -> None:
        self._released.wait()
        raise ContainerError(f"host {self.name} died")

    def _pause(self, seconds: float) -> None:
        if seconds > 0 and self._died.wait(seconds):
            self._hang()
        self._reach()

    # --- the runtime --------------------------------------------------------------------------------

    def has_image(self, image: str) -> bool:
        self._reach()
        return image not in self.absent

    def pull(self, image: str) -> None:
        self._reach()
        if image in self.absent:
            raise ContainerError(f"manifest for {image} not found: manifest unknown")
        self.images.add(image)

    def run(self, spec: ContainerSpec) -> ContainerState:
        self._pause(self.start_latency)
        self._present(spec.image)
        return super().run(spec)

    def _start_fails(self, spec: ContainerSpec) -> bool:
        failed = self.fail_rate > 0 and self._random.random() < self.fail_rate
        if failed:
            self.injected.add(spec.name)
        else:
            self.injected.discard(spec.name)
        return failed

    def stop(self, name: str, timeout: int) -> None:
        self._reach()
        if name in self.containers:
            self._pause(min(self.stop_latency, float(timeout)) if timeout > 0 else 0.0)
        super().stop(name, timeout)
        self.injected.discard(name)

    def inspect(self, name: str) -> ContainerState | None:
        self._reach()
        return super().inspect(name)

    def logs(self, name: str, tail: int = 20) -> str:
        self._reach()
        if name in self.injected and name in self.containers:
            return f"{INJECTED_OUTPUT}\n"
        return super().logs(name, tail)

    def find(self, labels: Mapping[str, str]) -> list[ContainerState]:
        self._reach()
        return super().find(labels)

    def jobs(self) -> list[ContainerState]:
        self._reach()
        return super().jobs()

    def run_once(self, spec: ContainerSpec, output: Callable[[str], None], timeout: float) -> int:
        self._pause(self.start_latency)
        self._present(spec.image)
        return super().run_once(spec, output, timeout)

    def _present(self, image: str) -> None:
        if image in self.absent:
            raise ContainerError(f"image {image} is not on this host")
        self.images.add(image)
