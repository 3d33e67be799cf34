"""The catalogue's listings at scale: with 10,000 jobs and 10,000 operations, each listing of the
CLI and of the API issues as many SQL statements as with ten of each (no query per row, nor per
service), and the API's lists come in pages. Statement counts, not timings: a count can fail
here, a timing only on a slow day (benchmarks/catalogue.py has the timings)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.bulk import ENV, LISTINGS, Catalogue, api_get, counting, make_catalogue

SMALL = {"jobs": 10, "operations": 10, "services": 2, "hosts": 2}
BIG = {"jobs": 10_000, "operations": 10_000, "services": 20, "hosts": 20}


@pytest.fixture(scope="module")
def catalogues(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Catalogue]]:
    made = {name: make_catalogue(f"sqlite:///{tmp_path_factory.mktemp(name) / 'c.db'}", **size)
            for name, size in (("small", SMALL), ("big", BIG))}
    yield made
    for c in made.values():
        c.close()


@pytest.mark.parametrize("name", list(LISTINGS))
def test_a_listing_issues_as_many_statements_at_10000_rows_as_at_10(name: str,
                                                                     catalogues: dict[str, Catalogue]) -> None:
    listing = LISTINGS[name]
    counts = {}
    for size, c in catalogues.items():
        with counting() as seen:
            listing(c)
        counts[size] = seen
    assert counts["big"].count == counts["small"].count, (
        f"{name}: {counts['small'].count} statements with {SMALL}, {counts['big'].count} with {BIG}:\n"
        + "\n".join(counts["big"].rows[:40]))
    assert counts["big"].count <= 12, "\n".join(counts["big"].rows)


def test_the_api_lists_that_grow_come_in_pages(catalogues: dict[str, Catalogue]) -> None:
    c = catalogues["big"]
    everything = {f"/api/v1/envs/{ENV}/jobs": c.filled.running, f"/api/v1/envs/{ENV}/services/svc0/jobs": 500,
                  "/api/v1/operations": c.filled.operations, f"/api/v1/operations?env={ENV}": c.filled.operations}
    for path, rows in everything.items():
        join = "&" if "?" in path else "?"
        first = c.get(path)
        assert len(first) == 100, path  # the default page
        assert len(c.get(f"{path}{join}limit=1000")) == min(rows, 1000), path
        assert len(c.get(f"{path}{join}limit=1000&offset={rows - 10}")) == 10, path
        second = c.get(f"{path}{join}offset=100")
        assert len(second) == 100 and not {repr(r) for r in first} & {repr(r) for r in second}, path
        assert api_get(c.api, f"{path}{join}limit=1001", c.filled.token)[0] == 422, path
        assert api_get(c.api, f"{path}{join}offset=-1", c.filled.token)[0] == 422, path
    newest = c.get("/api/v1/operations?limit=3")
    assert [op["id"] for op in newest] == [c.filled.operations - i for i in range(3)]
    assert [len(op["steps"]) for op in newest] == [2, 2, 2]


def test_ops_list_shows_the_newest_and_takes_a_limit(catalogues: dict[str, Catalogue]) -> None:
    c = catalogues["big"]
    newest = c.filled.operations
    assert [op["id"] for op in c.cli("ops", "list", ENV, "--limit", "2")] == [newest, newest - 1]
    assert len(c.cli("ops", "list")) == 50


def test_a_heartbeat_reads_what_runs_and_what_docker_lists_not_the_hosts_history(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host's heartbeat reconciles its running jobs with Docker's list; of its ended jobs (its
    history, which only grows) it reads those whose container Docker still lists, to remove them."""
    from sqlalchemy import event
    from sqlmodel import select

    from orchestrator import fleet
    from orchestrator.models import Job, JobState

    c = make_catalogue(f"sqlite:///{tmp_path / 'c.db'}", jobs=1500, operations=0, services=3, hosts=3)
    host = "h1"
    with c.platform.reader() as s:
        jobs = list(s.exec(select(Job).where(Job.host == host)))
    running = [j for j in jobs if j.state == JobState.running]
    ended = [j for j in jobs if j.state == JobState.stopped]
    assert len(ended) >= 100 and running, f"the bulk catalogue has history on {host}"
    listed = [fleet.Container(j.id, j.container_name, "running") for j in running + ended[:3]]
    loaded: list[str] = []  # jobs read whole (none: a beat reads the columns it needs)
    held: list[str] = []  # jobs whose columns it read

    def on_load(job: Job, _context: object) -> None:
        loaded.append(job.id)

    def seen(*row: Any) -> fleet.HeldJob:
        held.append(row[0])
        return real(*row)

    real = fleet.HeldJob
    event.listen(Job, "load", on_load)
    monkeypatch.setattr(fleet, "HeldJob", seen)
    try:
        done = fleet.heartbeat(c.platform, host=host, cpus=64.0, memory_mb=262144, containers=listed)
        out_of_step = list(held)
        held.clear()
        in_step = fleet.heartbeat(c.platform, host=host, cpus=64.0, memory_mb=262144,
                                  containers=listed[:len(running)])
    finally:
        event.remove(Job, "load", on_load)
        c.close()
    assert sorted(x.job_id for x in done.remove) == sorted(j.id for j in ended[:3])
    assert done.failed == [] and done.adopted == []
    # Read once to see the host out of step, once more to reconcile it in the write transaction;
    # not one of its ended jobs read whole.
    assert sorted(out_of_step) == sorted(2 * [j.id for j in running]) and loaded == []
    # A host in step is read once, outside the write transaction, and only beats in it.
    assert in_step == fleet.Reconciled() and sorted(held) == sorted(j.id for j in running)
