"""The Runtime protocol: everything a node does to its Docker host goes through it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol


class ContainerError(Exception):
    """A container operation failed; the message says why in one line."""


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str
    labels: Mapping[str, str]
    environment: Mapping[str, str]
    command: str | None = None  # run through /bin/sh -c so $PORT and friends expand
    args: tuple[str, ...] = ()  # without a command: arguments to the image's own entrypoint
    memory_mb: int | None = None
    cpus: float | None = None
    volumes: Mapping[str, str] = field(default_factory=dict)  # volume name -> mount path


@dataclass(frozen=True)
class ContainerState:
    id: str
    name: str
    status: str  # Docker's: created, running, restarting, exited, ...
    exit_code: int
    restart_count: int
    labels: Mapping[str, str]


@dataclass(frozen=True)
class ContainerStats:
    """What a running container has used: CPU seconds since it started, memory now."""

    cpu_seconds: float
    memory_bytes: int


def config_hash(spec: ContainerSpec) -> str:
    """A short hash of everything that makes a container what it is (kept in a label)."""
    body = json.dumps(
        [spec.image, spec.command, list(spec.args), sorted(spec.environment.items()), spec.memory_mb,
         spec.cpus, sorted(spec.volumes.items())],
        separators=(",", ":"),
    )
    return hashlib.sha256(body.encode()).hexdigest()[:16]


class Runtime(Protocol):
    def has_image(self, image: str) -> bool:
        """Whether ``image`` is present on the host."""

    def run(self, spec: ContainerSpec) -> ContainerState:
        """Create and start the container; one of that name and config already there is adopted
        (started if it is not running), so a redelivered start never makes a second container.
        One of that name with another config is replaced."""

    def inspect(self, name: str) -> ContainerState | None:
        """The container's state, or None when there is none of that name."""

    def logs(self, name: str, tail: int = 20) -> str:
        """The last lines the container wrote; empty when it is gone."""

    def stop(self, name: str, timeout: int) -> None:
        """Stop (SIGTERM, SIGKILL after ``timeout`` s) and remove; a missing container is fine."""

    def find(self, labels: Mapping[str, str]) -> list[ContainerState]:
        """Containers, running or not, carrying all of ``labels``."""

    def jobs(self) -> list[ContainerState]:
        """Containers, running or not, of any platform job (labelled orchestrator.job)."""

    def ping(self) -> bool:
        """Whether the host's Docker answers (quickly): no heartbeat without it."""

    def capacity(self) -> tuple[float, int]:
        """What the host has: (CPUs, memory in MB)."""

    def run_once(self, spec: ContainerSpec, output: Callable[[str], None], timeout: float) -> int:
        """Run a container until it exits (no restart), each line of its output to ``output``,
        then remove it; its exit code. Killed after ``timeout`` seconds (ContainerError). One
        of that name already there is replaced."""

    def exec(self, name: str, argv: list[str], output: Callable[[str], None]) -> int:
        """Run ``argv`` in the running container ``name``, its output to ``output``; its exit code."""

    def stats(self, name: str) -> ContainerStats | None:
        """CPU and memory the running container ``name`` uses; None when it does not run."""

    def remove_volume(self, name: str) -> None:
        """Delete a named volume (its data); one that is not there is fine."""

    def pull(self, image: str) -> None:
        """Pull ``image`` (ContainerError with the registry's reason when it cannot)."""

    def build(self, context: bytes, tag: str, output: Callable[[str], None]) -> None:
        """Build a tar build context (Dockerfile at its root) as ``tag``, reusing the layer
        cache, each line of output to ``output``; ContainerError when it fails."""

    def push(self, tag: str, output: Callable[[str], None]) -> str:
        """Push ``tag`` to its registry; returns the image's digest (sha256:...)."""
