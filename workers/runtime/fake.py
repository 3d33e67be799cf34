"""An in-memory Runtime for unit tests of the node's logic; the contract tests keep it honest."""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace

from orchestrator.names import LABEL_JOB
from workers.runtime.base import ContainerError, ContainerSpec, ContainerState, ContainerStats, config_hash


class FakeRuntime:
    def __init__(self, images: set[str] | None = None, crashing: set[str] | None = None) -> None:
        self.images = set(images or ())
        self.crashing = set(crashing or ())  # images whose containers exit at once
        self.containers: dict[str, ContainerState] = {}
        self.hashes: dict[str, str] = {}
        self.ports: dict[str, int] = {}  # container name -> the PORT it was given
        self.cpus, self.memory_mb = 4.0, 8192
        self.answering = True  # False: a daemon that does not answer (ping)
        self.registry: set[str] = set()  # images a pull finds (share one set between runtimes)
        self.volumes: set[str] = set()  # named volumes its containers made
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def has_image(self, image: str) -> bool:
        return image in self.images

    def run(self, spec: ContainerSpec) -> ContainerState:
        with self._lock:
            if spec.image not in self.images:
                raise ContainerError(f"image {spec.image} is not on this host")
            state = self.containers.get(spec.name)
            wanted = config_hash(spec)
            if state is not None and self.hashes.get(spec.name) != wanted:
                state = None  # same name, other config: replaced, as Docker's runtime does
            self.hashes[spec.name] = wanted
            starting = state is None or state.status != "running"  # not an adoption of a running one
            if state is None:
                state = ContainerState(
                    id=f"fake{next(self._ids):060d}", name=spec.name, status="created",
                    exit_code=0, restart_count=0, labels=dict(spec.labels),
                )
            if spec.image in self.crashing or (starting and self._start_fails(spec)):
                state = replace(state, status="exited", exit_code=1)
            else:
                state = replace(state, status="running")
            self.containers[spec.name] = state
            self.volumes |= {v for v in spec.volumes if not v.startswith("/")}
            if "PORT" in spec.environment:
                self.ports[spec.name] = int(spec.environment["PORT"])
            return state

    def _start_fails(self, spec: ContainerSpec) -> bool:
        """Whether this start of ``spec`` exits at once (a subclass injects failures here)."""
        return False

    def inspect(self, name: str) -> ContainerState | None:
        return self.containers.get(name)

    def logs(self, name: str, tail: int = 20) -> str:
        state = self.containers.get(name)
        return "crashed\n" if state is not None and state.exit_code else ""

    def stop(self, name: str, timeout: int) -> None:
        with self._lock:
            self.containers.pop(name, None)
            self.hashes.pop(name, None)
            self.ports.pop(name, None)

    def _all(self) -> list[ContainerState]:
        """Every container, as of now: read under the lock, which starts and stops in other
        threads hold while they change the maps (iterating them meanwhile raises)."""
        with self._lock:
            return list(self.containers.values())

    def find(self, labels: Mapping[str, str]) -> list[ContainerState]:
        return [c for c in self._all() if all(c.labels.get(k) == v for k, v in labels.items())]

    def jobs(self) -> list[ContainerState]:
        return [c for c in self._all() if LABEL_JOB in c.labels]

    def stats(self, name: str) -> ContainerStats | None:
        """A running container here uses one CPU second and 16 MiB per restart it had, plus one."""
        state = self.containers.get(name)
        if state is None or state.status != "running":
            return None
        return ContainerStats(cpu_seconds=1.0 + state.restart_count, memory_bytes=(1 + state.restart_count) << 24)

    def listening(self, port: int) -> bool:
        """Whether a running container of this runtime was given ``port`` (it "listens")."""
        with self._lock:
            return any(self.containers[name].status == "running" for name, p in self.ports.items()
                       if p == port and name in self.containers)

    def ping(self) -> bool:
        return self.answering

    def capacity(self) -> tuple[float, int]:
        return self.cpus, self.memory_mb

    def run_once(self, spec: ContainerSpec, output: Callable[[str], None], timeout: float) -> int:
        if spec.image not in self.images:
            raise ContainerError(f"image {spec.image} is not on this host")
        output(f"ran {spec.command}")
        return 1 if spec.image in self.crashing else 0

    def exec(self, name: str, argv: list[str], output: Callable[[str], None]) -> int:
        if name not in self.containers:
            raise ContainerError(f"container {name} is not on this host")
        output(f"ran {' '.join(argv)}")
        return 0

    def remove_volume(self, name: str) -> None:
        self.volumes.discard(name)

    def pull(self, image: str) -> None:
        if image not in self.registry:
            raise ContainerError(f"manifest for {image} not found: manifest unknown")
        self.images.add(image)

    def build(self, context: bytes, tag: str, output: Callable[[str], None]) -> None:
        output(f"Step 1/1 : building {len(context)} bytes")
        if b"FAIL" in context:
            output("error: the build failed")
            raise ContainerError("The command '/bin/sh -c false' returned a non-zero code: 1")
        self.images.add(tag)
        output(f"Successfully tagged {tag}")

    def push(self, tag: str, output: Callable[[str], None]) -> str:
        digest = "sha256:" + hashlib.sha256(tag.encode()).hexdigest()
        repository = tag.rsplit(":", 1)[0]
        self.registry |= {tag, f"{repository}@{digest}"}
        self.images.add(f"{repository}@{digest}")
        output(f"{tag.rsplit(':', 1)[1]}: digest: {digest}")
        return digest
