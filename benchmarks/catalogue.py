"""The catalogue's listings at 100 and at 10,000 rows: the time of each listing of the CLI and of
the API (in this process: the CLI's start-up is `cli.py`'s), and the SQL statements it issues.

    .venv/bin/python benchmarks/catalogue.py [--runs 5] [--sizes 100,10000] [--no-postgres] [--src DIR]

For each size N it fills a catalogue in bulk (tests/bulk.py: 20 hosts, an environment of 20 code
services, N jobs, four in five running, and N operations of two steps each) and times every
listing of tests.bulk.LISTINGS: `hosts list`, `jobs list`, `ops list`, `services list` and
`status` through the CLI's code (CliRunner, a new platform per call as a CLI process makes, so the
schema check is in), and the API's lists (its ASGI app called in this process). It does so on a
temp SQLite file and, when PostgreSQL answers at 127.0.0.1:5432 (database `test`, or
ORCH_TEST_POSTGRES_URL), on a throwaway database made there and dropped at the end.

It prints the median time of each listing, the rows it returned, and the statements it issued
(without the schema check a process runs as it opens the catalogue), per size and database.
`--src DIR` runs the `orchestrator/` of another tree (e.g. `git archive HEAD | tar -x -C
/tmp/head`) under the same listings, to compare a change.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

@contextmanager
def postgres_database() -> Iterator[str | None]:
    """A throwaway database on the PostgreSQL server (None when it does not answer). Made by this
    tree's ``tests/harness.py``, loaded by its path: with ``--src`` the ``tests`` package on the
    path is the other tree's, which may not have it."""
    spec = importlib.util.spec_from_file_location("orch_bench_harness", ROOT / "tests" / "harness.py")
    assert spec is not None and spec.loader is not None
    harness = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # (its dataclasses look it up)
    spec.loader.exec_module(harness)
    with ExitStack() as stack:
        try:
            url: str | None = stack.enter_context(harness.fresh_database("orch_bench", strict=False))
        except Exception as exc:  # any reason it is not there: say it, go on without it
            print(f"PostgreSQL: not used ({type(exc).__name__}: {str(exc).strip()[:120]})")
            url = None
        yield url


def rows_of(result: object) -> str:
    if isinstance(result, list):
        return str(len(result))
    if isinstance(result, dict) and isinstance(result.get("services"), list):
        return f"{len(result['services'])} svc"
    return "1"


def measure(url: str, size: int, runs: int) -> dict[str, tuple[float, str, int]]:
    """Each listing's (median seconds, rows, statements) on a catalogue of ``size`` jobs and operations."""
    from tests.bulk import LISTINGS, counting, make_catalogue

    began = time.perf_counter()
    catalogue = make_catalogue(url, jobs=size, operations=size)
    print(f"  filled {size} jobs, {size} operations, {2 * size} steps in {time.perf_counter() - began:.1f}s",
          flush=True)
    found = {}
    try:
        for name, listing in LISTINGS.items():
            result = listing(catalogue)  # warm: compiled statements, the API's first request
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                listing(catalogue)
                times.append(time.perf_counter() - start)
            with counting() as seen:
                listing(catalogue)
            found[name] = (statistics.median(times), rows_of(result), seen.count)
    finally:
        catalogue.close()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each listing (median)")
    parser.add_argument("--sizes", default="100,10000", help="jobs (and operations) per catalogue")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--src", type=Path, help="the tree whose orchestrator/ runs (default this one)")
    args = parser.parse_args()
    if args.src is not None:
        sys.path.insert(0, str(args.src.resolve()))
    from tests.bulk import LISTINGS
    sizes = [int(s) for s in args.sizes.split(",")]
    load = os.getloadavg()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {load[0]:.2f} {load[1]:.2f}, "
          f"median of {args.runs} runs; code from {args.src or ROOT}")

    with tempfile.TemporaryDirectory(prefix="orch-catalogue-bench-") as tmp, ExitStack() as stack:
        pg = None if args.no_postgres else stack.enter_context(postgres_database())
        databases = {"sqlite": lambda size: f"sqlite:///{Path(tmp) / f'c{size}.db'}"}
        if pg is not None:
            databases["postgresql"] = lambda _size: pg
        for db, url_of in databases.items():
            print(f"\n== {db}")
            results = {size: measure(url_of(size), size, args.runs) for size in sizes}
            header = "".join(f"{f'{size} rows':>26}" for size in sizes)
            print(f"\n{'listing':<38}{header}")
            print(f"{'':<38}" + "".join(f"{'time':>10}{'rows':>8}{'stmts':>8}" for _ in sizes))
            for name in LISTINGS:
                cells = "".join(f"{results[s][name][0] * 1000:8.1f}ms{results[s][name][1]:>8}{results[s][name][2]:>8}"
                                for s in sizes)
                print(f"{name:<38}{cells}")


if __name__ == "__main__":
    main()
