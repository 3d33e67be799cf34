"""The Runtime on a real Docker engine, through docker-py. Containers use host networking."""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import docker
from docker.errors import APIError, ImageNotFound, NotFound
from docker.models import containers as docker_containers
from docker.models.containers import Container
from docker.tls import TLSConfig
from docker.utils import kwargs_from_env

from orchestrator.names import LABEL_CONFIG_HASH, LABEL_ENV, LABEL_JOB, LABEL_SERVICE, LOG_LABELS
from workers.runtime.base import ContainerError, ContainerSpec, ContainerState, ContainerStats, config_hash

# docker-py's own conversion of containers.create's options into the API's (not public: without
# it, a start goes through containers.create, as before).
_create_container_args = getattr(docker_containers, "_create_container_args", None)

PING_TIMEOUT = 5
BUILD_TIMEOUT = 1800
LOG_OPTIONS = {"max-size": "20m", "max-file": "3", "env": ",".join(LOG_LABELS)}


class DockerRuntime:
    def __init__(self, base_url: str, pool_size: int = 16, timeout: int = 120) -> None:
        tls: TLSConfig | bool = False
        if base_url.startswith("tcp://") and os.environ.get("DOCKER_TLS_VERIFY"):
            tls = kwargs_from_env().get("tls") or False  # client certificates from DOCKER_CERT_PATH
        self.client = docker.DockerClient(
            base_url=base_url, version="auto", timeout=timeout, max_pool_size=pool_size, tls=tls
        )
        # Pings must be quick: a daemon that hangs is one that does not answer.
        self.pinger = docker.APIClient(base_url=base_url, version="auto", timeout=PING_TIMEOUT, tls=tls)
        # Builds, pulls and pushes may stay silent for minutes (a pip install, a large layer).
        self.builder = docker.APIClient(base_url=base_url, version="auto", timeout=BUILD_TIMEOUT, tls=tls)

    def close(self) -> None:
        self.client.close()
        self.pinger.close()
        self.builder.close()

    def ping(self) -> bool:
        try:
            return bool(self.pinger.ping())
        except Exception:  # refused, timed out, an error page: it does not answer
            return False

    def has_image(self, image: str) -> bool:
        try:
            self.client.images.get(image)
        except ImageNotFound:
            return False
        return True

    def run(self, spec: ContainerSpec) -> ContainerState:
        wanted_hash = config_hash(spec)
        try:  # a new name, the common case: two calls to Docker, create and start
            return self._create_and_start(spec, wanted_hash)
        except ImageNotFound as exc:
            raise ContainerError(f"image {spec.image} is not on this host") from exc
        except APIError as exc:
            if exc.status_code != 409:
                raise ContainerError(_reason(exc)) from exc
        # The name is taken: by a twin (a redelivered step made it, maybe started it) or by a
        # stale container of another config.
        existing = self._get(spec.name)
        if existing is not None and existing.labels.get(LABEL_CONFIG_HASH) != wanted_hash:
            try:  # same name, other config: never adopt a stale container
                existing.remove(force=True, v=True)
            except NotFound:
                pass
            except APIError as exc:
                raise ContainerError(_reason(exc)) from exc
            existing = None
        if existing is None:
            try:
                existing = self._create(spec, wanted_hash)
            except APIError as exc:
                if exc.status_code != 409:  # 409: created meanwhile by a redelivered twin
                    raise ContainerError(_reason(exc)) from exc
                existing = self._await_twin(spec.name, exc)
        if existing.status == "running":
            return _state(existing)
        try:
            existing.start()
        except APIError as exc:
            raise ContainerError(_reason(exc)) from exc
        # Started: what the caller needs is known without another round trip to Docker.
        return replace(_state(existing), status="running")

    def _await_twin(self, name: str, conflict: APIError, timeout: float = 10.0) -> Container:
        """Docker reserves a name before the container can be looked up: wait for the twin."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self._get(name)
            if found is not None:
                return found
            time.sleep(0.05)
        raise ContainerError(_reason(conflict)) from conflict

    def _create_and_start(self, spec: ContainerSpec, wanted_hash: str) -> ContainerState:
        """Create and start by the low-level API: docker-py's ``containers.create`` asks Docker
        for the whole container again after creating it, which a start does not need."""
        if _create_container_args is None:
            container = self.client.containers.create(spec.image, **self._options(spec, wanted_hash, restart=True))
            container.start()
            return replace(_state(container), status="running")
        options = self._options(spec, wanted_hash, restart=True)
        created = self.client.api.create_container(**_create_container_args(
            {**options, "image": spec.image, "version": self.client.api.api_version}))
        self.client.api.start(created["Id"])
        return ContainerState(id=created["Id"], name=spec.name, status="running", exit_code=0, restart_count=0,
                              labels=options["labels"])

    def _create(self, spec: ContainerSpec, wanted_hash: str, *, restart: bool = True) -> Container:
        try:
            container: Container = self.client.containers.create(
                spec.image, **self._options(spec, wanted_hash, restart=restart))
        except ImageNotFound as exc:
            raise ContainerError(f"image {spec.image} is not on this host") from exc
        return container

    def _options(self, spec: ContainerSpec, wanted_hash: str, *, restart: bool) -> dict[str, Any]:
        """docker-py's create options for ``spec`` (its volumes made first)."""
        labels = {**spec.labels, LABEL_CONFIG_HASH: wanted_hash}
        options: dict[str, Any] = {
            "name": spec.name,
            "labels": labels,
            "environment": dict(spec.environment),
            "network_mode": "host",
            "restart_policy": {"Name": "unless-stopped" if restart else "no"},
            "detach": True,
            "init": True,  # a real PID 1 forwards SIGTERM, so stops are quick and graceful
            # Docker's own json-file log, bounded, each line labelled with the job's ORCH_*
            # variables: the host's log shipper reads it from there (``docker logs`` works as
            # ever, and a start never depends on the logging service).
            "log_config": {"Type": "json-file", "Config": dict(LOG_OPTIONS)},
        }
        if spec.command:
            options["entrypoint"] = ["/bin/sh", "-c"]
            options["command"] = [spec.command]
        elif spec.args:
            options["command"] = list(spec.args)
        if spec.memory_mb:
            options["mem_limit"] = f"{spec.memory_mb}m"
            options["memswap_limit"] = f"{spec.memory_mb}m"
        if spec.cpus:
            options["nano_cpus"] = int(spec.cpus * 1e9)
        if spec.volumes:
            owner = {k: v for k, v in spec.labels.items() if k in (LABEL_ENV, LABEL_SERVICE)}
            for name in spec.volumes:
                if name.startswith("/"):
                    continue  # a directory of the host (a proxy job's files), mounted as it is
                # Made here, not implicitly by the create, so it carries its owner's labels.
                # Creating a volume that exists returns it as it is.
                self.client.volumes.create(name=name, labels=owner)
            # A path ending ":ro" is mounted read-only (a log shipper's view of the job logs).
            options["volumes"] = {
                name: {"bind": path.removesuffix(":ro"), "mode": "ro" if path.endswith(":ro") else "rw"}
                for name, path in spec.volumes.items()}
        return options

    def inspect(self, name: str) -> ContainerState | None:
        container = self._get(name)
        return _state(container) if container is not None else None

    def logs(self, name: str, tail: int = 20) -> str:
        container = self._get(name)
        if container is None:
            return ""
        data: bytes = container.logs(tail=tail)
        return data.decode(errors="replace")

    def stop(self, name: str, timeout: int) -> None:
        try:  # by name: no lookup first (a call to Docker less per stop)
            self.client.api.stop(name, timeout=timeout)
            self.client.api.remove_container(name, v=True)
        except NotFound:
            return
        except APIError as exc:
            if exc.status_code == 409 and "in progress" in str(exc):
                return  # removal already under way
            raise ContainerError(_reason(exc)) from exc

    def find(self, labels: Mapping[str, str]) -> list[ContainerState]:
        filters: dict[str, str | list[str] | bool] = {"label": [f"{k}={v}" for k, v in labels.items()]}
        return [_state(c) for c in self.client.containers.list(all=True, filters=filters)]

    def jobs(self) -> list[ContainerState]:
        # sparse: one list call, no inspect per container (this runs every heartbeat)
        found = self.client.containers.list(all=True, sparse=True, filters={"label": [LABEL_JOB]})
        return [
            ContainerState(id=c.id or "", name=(c.attrs.get("Names") or ["/"])[0].lstrip("/"),
                           status=str(c.attrs.get("State", "")), exit_code=0, restart_count=0,
                           labels=dict(c.attrs.get("Labels") or {}))
            for c in found
        ]

    def run_once(self, spec: ContainerSpec, output: Callable[[str], None], timeout: float) -> int:
        existing = self._get(spec.name)
        if existing is not None:
            existing.remove(force=True, v=True)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            with contextlib.suppress(NotFound, APIError):
                self.client.containers.get(spec.name).kill()

        watchdog = threading.Timer(timeout, kill)
        watchdog.daemon = True
        try:
            container = self._create(spec, config_hash(spec), restart=False)
            # Attached before it starts, its output comes straight from it: following its log
            # file instead could miss lines when Docker rotates the file (a fast, long output).
            streamed = container.attach(stdout=True, stderr=True, stream=True, logs=True)
            container.start()
            watchdog.start()
            _lines(streamed, output)
            code = int(container.wait().get("StatusCode", -1))
        except APIError as exc:
            raise ContainerError(_reason(exc)) from exc
        finally:
            watchdog.cancel()
            with contextlib.suppress(NotFound, APIError):
                self.client.containers.get(spec.name).remove(force=True, v=True)
        if killed.is_set():
            raise ContainerError(f"killed after {timeout:g}s (ORCH_RUN_TIMEOUT)")
        return code

    def exec(self, name: str, argv: list[str], output: Callable[[str], None]) -> int:
        container = self._get(name)
        if container is None:
            raise ContainerError(f"container {name} is not on this host")
        try:
            created = self.client.api.exec_create(container.id, argv, stdout=True, stderr=True)
            _lines(self.client.api.exec_start(created["Id"], stream=True), output)
            return int(self.client.api.exec_inspect(created["Id"]).get("ExitCode") or 0)
        except APIError as exc:
            raise ContainerError(_reason(exc)) from exc

    def remove_volume(self, name: str) -> None:
        try:
            self.client.volumes.get(name).remove(force=True)
        except NotFound:
            return
        except APIError as exc:
            raise ContainerError(_reason(exc)) from exc

    def pull(self, image: str) -> None:
        try:  # a ref with its tag or digest; a failure may come in the stream, after a 200
            for chunk in self.builder.pull(image, stream=True, decode=True):
                if "error" in chunk:
                    raise ContainerError(" ".join(str(chunk["error"]).split()))
        except (APIError, NotFound) as exc:
            raise ContainerError(_reason(exc)) from exc
        if not self.has_image(image):
            raise ContainerError(f"the pull of {image} ended without the image")

    def build(self, context: bytes, tag: str, output: Callable[[str], None]) -> None:
        try:
            lines = self.builder.build(fileobj=io.BytesIO(context), custom_context=True, tag=tag, rm=True,
                                       forcerm=True, decode=True, network_mode="host")
            for chunk in lines:
                if "error" in chunk:
                    raise ContainerError(" ".join(str(chunk["error"]).split()))
                text = chunk.get("stream") or chunk.get("status") or ""
                for line in str(text).splitlines():
                    if line.strip():
                        output(line.rstrip())
        except APIError as exc:
            raise ContainerError(_reason(exc)) from exc

    def push(self, tag: str, output: Callable[[str], None]) -> str:
        repository, _, name = tag.rpartition(":")
        digest = ""
        try:
            for chunk in self.builder.push(repository, tag=name, stream=True, decode=True):
                if "error" in chunk:
                    raise ContainerError(" ".join(str(chunk["error"]).split()))
                digest = (chunk.get("aux") or {}).get("Digest", digest)
                if chunk.get("status") and not chunk.get("progressDetail"):
                    output(" ".join(filter(None, [chunk.get("id"), chunk["status"]])))
        except APIError as exc:
            raise ContainerError(_reason(exc)) from exc
        if not digest:
            raise ContainerError(f"the registry gave no digest for {tag}")
        return str(digest)

    def stats(self, name: str) -> ContainerStats | None:
        """One sample from Docker's stats API (``one-shot``: no wait for a second sample)."""
        try:
            raw = self.client.api.stats(name, stream=False, one_shot=True)
        except (NotFound, APIError):
            return None
        cpu = raw.get("cpu_stats", {}).get("cpu_usage", {}).get("total_usage")
        memory = raw.get("memory_stats", {}).get("usage")
        if cpu is None or memory is None:
            return None  # not running: Docker gives empty stats
        cache = raw.get("memory_stats", {}).get("stats", {}).get("cache", 0)  # page cache is not the job's
        return ContainerStats(cpu_seconds=int(cpu) / 1e9, memory_bytes=max(int(memory) - int(cache), 0))

    def containers_dir(self) -> str:
        """Where this engine keeps its containers' json-file logs (on its own machine)."""
        return f"{self.client.info()['DockerRootDir']}/containers"

    def capacity(self) -> tuple[float, int]:
        info = self.client.info()
        return float(info.get("NCPU", 0)), int(info.get("MemTotal", 0)) // (1024 * 1024)

    def _get(self, name: str) -> Container | None:
        try:
            container: Container = self.client.containers.get(name)
        except NotFound:
            return None
        return container


def _state(container: Container) -> ContainerState:
    attrs = container.attrs
    state = attrs.get("State", {})
    return ContainerState(
        id=container.id or "",
        name=container.name or "",
        status=state.get("Status", container.status),
        exit_code=int(state.get("ExitCode", 0)),
        restart_count=int(attrs.get("RestartCount", 0)),
        labels=dict(container.labels),
    )


def _lines(chunks: Any, output: Callable[[str], None]) -> None:
    """Whole lines out of a stream of byte chunks (a line may span chunks)."""
    rest = b""
    for chunk in chunks:
        rest += chunk
        *whole, rest = rest.split(b"\n")
        for line in whole:
            output(line.decode(errors="replace").rstrip("\r"))
    if rest:
        output(rest.decode(errors="replace"))


def _reason(exc: APIError) -> str:
    explanation = exc.explanation
    if isinstance(explanation, bytes):
        explanation = explanation.decode(errors="replace")
    return str(explanation or exc).splitlines()[0]
