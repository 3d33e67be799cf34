"""Which host gets the next job. Pure: no I/O, only the numbers it is given."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace

from orchestrator.sizes import Size


@dataclass(frozen=True)
class HostLoad:
    """What placement knows about a host. ``cpus``/``memory_mb`` of 0 mean "not reported": no cap."""

    name: str
    schedulable: bool = True
    address: str = ""  # hosts sharing an address share one port space
    cpus: float = 0.0
    memory_mb: int = 0
    used_cpus: float = 0.0
    used_memory_mb: int = 0
    used_ports: frozenset[int] = field(default_factory=frozenset)
    # Images its running jobs run: there already (Docker keeps an image a container uses), so a
    # start there needs no check of it first.
    images: frozenset[str] = field(default_factory=frozenset)
    # Of ``used_*``, what jobs that running operations are stopping hold: room they still take
    # (``fits``), but gone from the spread once those operations are through (``settled_load``).
    leaving_cpus: float = 0.0
    leaving_memory_mb: int = 0

    def fits(self, size: Size) -> bool:
        cpu_ok = self.cpus <= 0 or self.used_cpus + size.cpus <= self.cpus + 1e-9
        mem_ok = self.memory_mb <= 0 or self.used_memory_mb + size.memory_mb <= self.memory_mb
        return cpu_ok and mem_ok

    @property
    def load(self) -> float:
        """The larger of the committed CPU and memory fractions (absolute memory when unreported)."""
        return _load(self.used_cpus, self.used_memory_mb, self.cpus, self.memory_mb)

    @property
    def settled_load(self) -> float:
        """``load`` once the jobs being stopped are gone: what placement spreads by. Several
        operations at once (20 redeploys) each place while the others' old jobs still run: by
        ``load`` each would avoid the hosts of the others' old and new jobs alike, and the fleet
        end uneven (8 to 14 jobs a host, where 10 each fit)."""
        return _load(self.used_cpus - self.leaving_cpus, self.used_memory_mb - self.leaving_memory_mb,
                     self.cpus, self.memory_mb)

    def with_job(self, size: Size, port: int | None, span: int = 1) -> HostLoad:
        ports = self.used_ports | set(range(port, port + span)) if port is not None else self.used_ports
        return replace(
            self,
            used_cpus=self.used_cpus + size.cpus,
            used_memory_mb=self.used_memory_mb + size.memory_mb,
            used_ports=ports,
        )


def _load(cpus_used: float, memory_used: int, cpus: float, memory_mb: int) -> float:
    cpu = cpus_used / cpus if cpus > 0 else 0.0
    mem = memory_used / memory_mb if memory_mb > 0 else 0.0
    if cpus <= 0 and memory_mb <= 0:
        return memory_used / 1_000_000
    return max(cpu, mem)


def choose_host(hosts: Sequence[HostLoad], size: Size, service_jobs: Mapping[str, int]) -> str | None:
    """The schedulable host that fits ``size`` with the fewest jobs of this service, then the
    lightest settled load, then the name (for determinism); None when no host fits."""
    candidates = [h for h in hosts if h.schedulable and h.fits(size)]
    if not candidates:
        return None
    best = min(candidates, key=lambda h: (service_jobs.get(h.name, 0), h.settled_load, h.name))
    return best.name


class Chooser:
    """``choose_host`` for a plan that places job after job, each changing one host: a heap of
    (jobs of this service, settled load, name), so a choice costs the logarithm of the fleet, not a scan
    of every host (a 50-job redeploy on 100 hosts: 5,000 host looks became a few hundred).
    ``hosts`` and ``service_jobs`` are read as they are at each choice; after placing on a host,
    the caller says so (``changed``). A host that does not fit the size is passed over, and
    stays for the next choice."""

    def __init__(self, hosts: Mapping[str, HostLoad], service_jobs: Mapping[str, int]) -> None:
        self._hosts = hosts
        self._jobs = service_jobs
        self._heap = [self._key(h.name) for h in hosts.values() if h.schedulable]
        heapq.heapify(self._heap)

    def _key(self, name: str) -> tuple[int, float, str]:
        return self._jobs.get(name, 0), self._hosts[name].settled_load, name

    def changed(self, name: str) -> None:
        if self._hosts[name].schedulable:
            heapq.heappush(self._heap, self._key(name))

    def choose(self, size: Size) -> str | None:
        passed: list[tuple[int, float, str]] = []
        chosen = None
        while self._heap:
            entry = heapq.heappop(self._heap)
            if entry != self._key(entry[2]):
                continue  # an older entry of a host placed on since: its newer one is in the heap
            if self._hosts[entry[2]].fits(size):
                chosen = entry
                break
            passed.append(entry)
        for entry in passed:
            heapq.heappush(self._heap, entry)
        if chosen is None:
            return None
        heapq.heappush(self._heap, chosen)  # still its key until the caller places a job there
        return chosen[2]


def free_port(used: AbstractSet[int], port_min: int, port_max: int,
              usable: Callable[[int], bool] = lambda _port: True, *, span: int = 1) -> int | None:
    """The lowest port of the range that no job on the host holds and ``usable`` accepts (a node
    passes a check that nothing outside the platform answers on it), with the ``span - 1``
    ports after it free too (a job that holds several)."""
    for port in range(port_min, port_max - span + 2):
        held = range(port, port + span)
        if not any(p in used for p in held) and all(usable(p) for p in held):
            return port
    return None
