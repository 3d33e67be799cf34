"""choose_host and free_port: pure placement over many cases."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.placement import Chooser, HostLoad, choose_host, free_port
from orchestrator.sizes import NAMED_SIZES, Size

S = NAMED_SIZES["s"]  # 256m, 0.5 CPU
H = HostLoad


@pytest.mark.parametrize(
    ("hosts", "service_jobs", "expected"),
    [
        pytest.param([H("a")], {}, "a", id="one host"),
        pytest.param([], {}, None, id="no host"),
        # Lightest load wins.
        pytest.param([H("a", memory_mb=1000, used_memory_mb=500), H("b", memory_mb=1000, used_memory_mb=250)],
                     {}, "b", id="lighter memory"),
        pytest.param([H("a", cpus=4, used_cpus=1), H("b", cpus=4, used_cpus=3)], {}, "a", id="lighter cpu"),
        pytest.param([H("a", cpus=4, used_cpus=3, memory_mb=4096), H("b", cpus=4, memory_mb=4096, used_memory_mb=2048)],
                     {}, "b", id="load is the larger of cpu and memory"),
        pytest.param([H("a", cpus=2, memory_mb=1000, used_memory_mb=500), H("b", cpus=8, memory_mb=8000,
                                                                           used_memory_mb=2000)],
                     {}, "b", id="load is relative to capacity"),
        pytest.param([H("a", used_memory_mb=512), H("b", used_memory_mb=256)], {}, "b",
                     id="unreported capacity: less committed memory"),
        # Fewest jobs of the service wins before load.
        pytest.param([H("a"), H("b", used_memory_mb=4000)], {"a": 1}, "b", id="spread before load"),
        pytest.param([H("a", memory_mb=1000), H("b", memory_mb=1000, used_memory_mb=700)], {"a": 2, "b": 1}, "b",
                     id="fewer of the service on a busier host"),
        pytest.param([H("a"), H("b")], {"a": 1, "b": 1}, "a", id="equal spread falls back to load then name"),
        pytest.param([H("a", used_memory_mb=10), H("b")], {"a": 1, "b": 1}, "b", id="equal spread, lighter wins"),
        pytest.param([H("a"), H("b")], {"c": 5}, "a", id="jobs on unknown hosts are ignored"),
        # Unreported capacity (0) means no cap.
        pytest.param([H("a", used_memory_mb=10**6, used_cpus=500)], {}, "a", id="unreported capacity never full"),
        pytest.param([H("a", cpus=0, memory_mb=1024, used_memory_mb=1000)], {}, None, id="memory cap only"),
        pytest.param([H("a", cpus=1, memory_mb=0, used_cpus=0.75)], {}, None, id="cpu cap only"),
        # A host that does not fit is never chosen.
        pytest.param([H("a", memory_mb=1024, used_memory_mb=1000), H("b", used_memory_mb=10**5)], {}, "b",
                     id="full host skipped even when lighter"),
        pytest.param([H("a", memory_mb=1024, used_memory_mb=1000)], {}, None, id="nothing fits"),
        pytest.param([H("a", memory_mb=256)], {}, "a", id="exact memory fit"),
        pytest.param([H("a", cpus=1.0, used_cpus=0.5)], {}, "a", id="exact cpu fit"),
        pytest.param([H("a", cpus=0.3, memory_mb=4096)], {}, None, id="too few cpus"),
        pytest.param([H("a", memory_mb=255)], {}, None, id="one megabyte short"),
        pytest.param([H("a", memory_mb=1024, used_memory_mb=900), H("b", memory_mb=1024)], {"b": 9}, "b",
                     id="a host that fits beats spread on one that does not"),
        # Jobs that running operations are stopping count for room, not for the spread.
        pytest.param([H("a", memory_mb=1024, used_memory_mb=768, leaving_memory_mb=768),
                      H("b", memory_mb=1024, used_memory_mb=256)], {}, "a", id="its jobs are leaving: lighter"),
        pytest.param([H("a", memory_mb=1024, used_memory_mb=1000, leaving_memory_mb=1000),
                      H("b", memory_mb=1024, used_memory_mb=256)], {}, "b", id="leaving jobs still take room"),
        # Draining hosts take nothing.
        pytest.param([H("a", schedulable=False), H("b", used_memory_mb=9000)], {}, "b", id="draining skipped"),
        pytest.param([H("a", schedulable=False)], {}, None, id="only draining"),
        # Ties are broken by name, whatever the order given.
        pytest.param([H("b"), H("a"), H("c")], {}, "a", id="tie by name"),
        pytest.param([H("c", memory_mb=100), H("b"), H("a")], {}, "a", id="tie by name among fitting"),
    ],
)
def test_choose_host(hosts: list[HostLoad], service_jobs: dict[str, int], expected: str | None) -> None:
    assert choose_host(hosts, S, service_jobs) == expected


def test_a_cpu_only_size_fits_by_cpu_with_float_rounding() -> None:
    # Ten 0.1 CPU jobs on a one-CPU host: float sums must not refuse the tenth.
    host = H("a", cpus=1.0)
    tiny = Size(64, 0.1)
    for _ in range(10):
        assert choose_host([host], tiny, {}) == "a"
        host = host.with_job(tiny, None)
    assert choose_host([host], tiny, {}) is None


def test_with_job_adds_load_and_port() -> None:
    host = H("a", cpus=2, memory_mb=1024, used_ports=frozenset({5000})).with_job(S, 5001)
    assert (host.used_cpus, host.used_memory_mb, host.used_ports) == (0.5, 256, frozenset({5000, 5001}))
    assert host.with_job(S, None).used_ports == frozenset({5000, 5001})


@pytest.mark.parametrize(
    ("used", "low", "high", "expected"),
    [
        (set(), 5000, 5010, 5000),
        ({5000}, 5000, 5010, 5001),
        ({5000, 5001, 5003}, 5000, 5010, 5002),
        ({4999, 5011}, 5000, 5010, 5000),
        (set(range(5000, 5011)), 5000, 5010, None),
        (set(), 5000, 5000, 5000),
        ({5000}, 5000, 5000, None),
        ({5009}, 5000, 5010, 5000),
        (set(range(5000, 5010)), 5000, 5010, 5010),
        (set(), 5001, 5000, None),
    ],
)
def test_free_port(used: set[int], low: int, high: int, expected: int | None) -> None:
    assert free_port(frozenset(used), low, high) == expected


# --- properties ------------------------------------------------------------------------------------

host_strategy = st.builds(
    HostLoad,
    name=st.sampled_from("abcdefgh"),
    schedulable=st.booleans(),
    cpus=st.sampled_from([0.0, 1.0, 2.0, 4.0]),
    memory_mb=st.sampled_from([0, 512, 1024, 4096]),
    used_cpus=st.sampled_from([0.0, 0.5, 1.0, 3.5]),
    used_memory_mb=st.integers(0, 4096),
    leaving_memory_mb=st.sampled_from([0, 0, 256, 1024]),
)
fleet_strategy = st.lists(host_strategy, max_size=6, unique_by=lambda h: h.name)
jobs_strategy = st.dictionaries(st.sampled_from("abcdefgh"), st.integers(0, 4))
size_strategy = st.sampled_from(list(NAMED_SIZES.values()))


@settings(max_examples=300)
@given(fleet=fleet_strategy, service_jobs=jobs_strategy, size=size_strategy, seed=st.randoms())
def test_property_choice_is_eligible_best_spread_and_order_free(
    fleet: list[HostLoad], service_jobs: dict[str, int], size: Size, seed: random.Random,
) -> None:
    chosen = choose_host(fleet, size, service_jobs)
    eligible = [h for h in fleet if h.schedulable and h.fits(size)]
    if not eligible:
        assert chosen is None
        return
    assert chosen is not None
    best = next(h for h in eligible if h.name == chosen)
    # Spread: no eligible host holds fewer of the service's jobs than the one chosen...
    fewest = min(service_jobs.get(h.name, 0) for h in eligible)
    assert service_jobs.get(chosen, 0) == fewest
    # ...and among those, none is lighter once the jobs being stopped are gone.
    assert all(best.settled_load <= h.settled_load for h in eligible if service_jobs.get(h.name, 0) == fewest)
    shuffled = list(fleet)
    seed.shuffle(shuffled)
    assert choose_host(shuffled, size, service_jobs) == chosen


@settings(max_examples=100)
@given(host_count=st.integers(1, 6), jobs=st.integers(0, 30))
def test_property_repeated_choices_spread_evenly(host_count: int, jobs: int) -> None:
    fleet = {f"h{i}": H(f"h{i}", cpus=64, memory_mb=65536) for i in range(host_count)}
    counts: dict[str, int] = {}
    for _ in range(jobs):
        name = choose_host(list(fleet.values()), S, counts)
        assert name is not None
        fleet[name] = fleet[name].with_job(S, None)
        counts[name] = counts.get(name, 0) + 1
        # No host takes a second job of the service while an eligible host has none (and so on).
        spread = [counts.get(h, 0) for h in fleet]
        assert max(spread) - min(spread) <= 1


@given(used=st.frozensets(st.integers(5000, 5020)), low=st.integers(5000, 5010), high=st.integers(5000, 5020))
def test_property_free_port_is_the_lowest_free(used: frozenset[int], low: int, high: int) -> None:
    port = free_port(used, low, high)
    free = [p for p in range(low, high + 1) if p not in used]
    assert port == (free[0] if free else None)


@settings(max_examples=300)
@given(fleet=fleet_strategy, service_jobs=jobs_strategy,
       sizes=st.lists(st.tuples(size_strategy, st.sampled_from([None, *"abcdefgh"])), max_size=25))
def test_property_the_chooser_chooses_as_choose_host_job_after_job(
    fleet: list[HostLoad], service_jobs: dict[str, int], sizes: list[tuple[Size, str | None]],
) -> None:
    """The heap of a plan's placements picks what choose_host would at every step, whatever
    fits or not, including after jobs pinned to a host (a database's)."""
    hosts = {h.name: h for h in fleet}
    counts = dict(service_jobs)
    chooser = Chooser(hosts, counts)
    for size, pinned in sizes:
        if pinned is not None and pinned in hosts:
            chosen: str | None = pinned  # placed there whatever the heap says
        else:
            chosen = chooser.choose(size)
            assert chosen == choose_host(list(hosts.values()), size, counts)
        if chosen is None:
            continue
        hosts[chosen] = hosts[chosen].with_job(size, None)
        counts[chosen] = counts.get(chosen, 0) + 1
        chooser.changed(chosen)
