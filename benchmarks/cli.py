"""How fast the CLI starts: the wall time of a few commands, each a whole process, against the
interpreter's bare start-up measured in the same run.

    .venv/bin/python benchmarks/cli.py [--runs 21] [--src DIR ...]

One run makes a throwaway SQLite catalogue in a temp dir (an environment `bench` with one host, no
jobs: what is timed is the start-up, not the catalogue's size; `catalogue.py` times listings at
scale) and times, round after round (the commands take turns, so a burst of load on the machine
falls on all of them alike):

  python -c pass                     the interpreter alone: the floor no command goes under
  orchestrator --help
  orchestrator hosts list            a catalogue command
  orchestrator ops list bench

It prints, per command and per tree (`--src`, repeatable: the `orchestrator/` and `workers/` of
another checkout, e.g. `git archive HEAD | tar -x -C /tmp/head`, to compare a change; default this
one): the median and the spread of the wall time, the median minus the bare start-up, and what
one extra run under `python -X importtime` says: the imports' total time, how many modules, and
which heavy packages were loaded (celery, kombu, fastapi, docker, sqlalchemy, ...).
Nothing here reaches Redis or Docker.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("celery", "kombu", "redis", "fastapi", "starlette", "uvicorn", "docker", "sqlalchemy", "sqlmodel",
         "prometheus_client", "cryptography", "yaml", "psycopg")
COMMANDS: dict[str, list[str]] = {
    "--help": ["--help"],
    "hosts list": ["hosts", "list"],
    "ops list bench": ["ops", "list", "bench"],
}


def environ(src: Path, workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])),
               ORCH_DATABASE_URL=f"sqlite:///{workdir / 'orchestrator.db'}",
               ORCH_BROKER_URL="redis://127.0.0.1:1/0")  # never reached: a command that did would fail
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


def run(argv: Sequence[str], env: dict[str, str], cwd: Path) -> float:
    began = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    took = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return took


def imports(argv: Sequence[str], env: dict[str, str], cwd: Path) -> tuple[float, int, list[str]]:
    """One run under -X importtime: the imports' total (the sum of each module's own time, in
    seconds), the number of modules, and the heavy packages among them."""
    done = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], env=env, cwd=cwd,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True)
    total, count, heavy = 0, 0, set()
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, _cumulative, name = line.removeprefix("import time:").split("|")
        total += int(own)
        count += 1
        if (top := name.strip().split(".")[0]) in HEAVY:
            heavy.add(top)
    return total / 1e6, count, sorted(heavy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=21, help="timed runs of each command (median)")
    parser.add_argument("--src", type=Path, action="append", help="a tree to time (repeatable; default this one)")
    args = parser.parse_args()
    trees = [p.resolve() for p in (args.src or [ROOT])]
    load = os.getloadavg()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {load[0]:.2f} {load[1]:.2f}, "
          f"{args.runs} runs each (median; spread = max - min of the middle half)")

    with tempfile.TemporaryDirectory(prefix="orch-cli-bench-") as tmp:
        workdirs = {tree: Path(tmp) / str(i) for i, tree in enumerate(trees)}
        for tree, workdir in workdirs.items():
            workdir.mkdir()
            env = environ(tree, workdir)
            run(cli("env", "create", "bench", "--sandbox", "--no-defaults"), env, workdir)
            run(cli("hosts", "add", "h1", "--docker-url", "unix:///var/run/docker.sock"), env, workdir)

        cases: list[tuple[str, Path | None, list[str]]] = [("python -c pass", None, [sys.executable, "-c", "pass"])]
        cases += [(name, tree, cli(*argv)) for tree in trees for name, argv in COMMANDS.items()]
        times: dict[int, list[float]] = {i: [] for i in range(len(cases))}
        for _ in range(args.runs):
            for i, (_name, tree, argv) in enumerate(cases):
                workdir = workdirs[tree or trees[0]]
                times[i].append(run(argv, environ(tree or trees[0], workdir), workdir))

        floor = statistics.median(times[0])
        print(f"\n{'command':<18} {'tree':<24} {'median':>8} {'spread':>8} {'-floor':>8}   "
              f"{'imports':>8} {'modules':>7}  heavy packages loaded")
        for i, (name, tree, argv) in enumerate(cases):
            runs = sorted(times[i])
            middle = runs[len(runs) // 4: len(runs) - len(runs) // 4] or runs
            median = statistics.median(runs)
            workdir = workdirs[tree or trees[0]]
            spent, count, heavy = imports(argv, environ(tree or trees[0], workdir), workdir)
            where = "" if tree is None else (str(tree) if len(str(tree)) <= 24 else "..." + str(tree)[-21:])
            print(f"{name:<18} {where:<24} {median * 1000:6.0f}ms {(middle[-1] - middle[0]) * 1000:6.0f}ms "
                  f"{(median - floor) * 1000:6.0f}ms   {spent * 1000:6.0f}ms {count:>7}  {' '.join(heavy) or '-'}")
        print("\n-floor: the median less the bare interpreter's (python -c pass). imports: the sum of every "
              "module's own time in one run under -X importtime (which itself slows imports a little).")


if __name__ == "__main__":
    main()
