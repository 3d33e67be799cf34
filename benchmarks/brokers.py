"""Which broker keeps an operation going when a node restarts: Redis against RabbitMQ, in one run.

    .venv/bin/python benchmarks/brokers.py [--rounds 3]

For each broker, a throwaway platform (a temp SQLite catalogue; Redis database 12 as the result
backend, flushed before and after; ports 32750-32767; one host on the default Docker daemon, its
node with a heartbeat every 0.5 s and the default step lease of 15 s) runs a code service of 2 jobs
that take 3 s to listen. Each round asks `scale 4`, SIGKILLs the node 1 s later (its start steps
are under way), starts it again 1 s after that, and measures:

  outcome     how the scale operation ended;
  ended       seconds from the kill to the operation's end;
  at scale    whether the service then runs the 4 jobs asked for (a failed scale keeps 2).

With RabbitMQ the dead node's unacknowledged step messages come back as soon as its connection
drops, and the restarted node carries them out: the operation goes on. With Redis they come back
only after the visibility timeout (an hour), so the steps' leases run out and the operation fails
(and the service keeps its old scale). Everything it made is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import docker
from kombu import Connection

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness import (  # noqa: E402
    DEFAULT_DOCKER_URL,
    SAMPLE_IMAGE,
    Platform,
    PlatformEnv,
    remove_containers,
    retire,
    stop_process,
    wait_for,
)

BROKERS = {
    "redis": None,  # the platform's default: Redis
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//",
}
RESULTS_DB = 12
SLOW = "sleep 3 && exec httpd -f -p $PORT -h /var/www"


def run_broker(name: str, url: str | None, rounds: int, workdir: Path) -> list[dict[str, Any]]:
    env = PlatformEnv(database_url=f"sqlite:///{workdir / name / 'catalogue.db'}", redis_db=RESULTS_DB,
                      ports=(32750, 32767), stop_timeout=2, heartbeat_interval=0.5, broker_url=url,
                      result_backend=f"redis://127.0.0.1:6379/{RESULTS_DB}")
    (workdir / name).mkdir()
    env.flush()
    platform = Platform(env, workdir / name)
    host, app = f"b{uuid.uuid4().hex[:6]}", f"b{uuid.uuid4().hex[:6]}"
    client = docker.DockerClient(base_url=DEFAULT_DOCKER_URL, version="auto")
    results = []
    try:
        platform.ok("hosts", "add", host, "--docker-url", DEFAULT_DOCKER_URL)
        platform.start_node(host)
        platform.ok("env", "create", app, "--sandbox", "--no-defaults")
        platform.ok("services", "add", app, "web", "--type", "code", "--command", SLOW, "--scale", "2")
        platform.ok("push", app, "web", SAMPLE_IMAGE, "--wait")
        for _ in range(rounds):
            op_id = int(platform.ok("scale", app, "web", "4").split()[1])
            time.sleep(1.0)
            stop_process(platform.nodes[host], signal.SIGKILL)
            killed = time.monotonic()
            time.sleep(1.0)
            platform.start_node(host)
            op = wait_for(f"operation {op_id} ends", lambda op_id=op_id: json.loads(
                platform.ok("ops", "show", str(op_id), "--json")), 90, every=0.2,
                until=lambda o: o["state"] in ("succeeded", "failed"), retry=())
            ended = time.monotonic() - killed
            running = [j for j in json.loads(platform.ok("jobs", "list", app, "web", "--json"))
                       if j["state"] == "running"]
            results.append({"outcome": op["state"], "ended": ended, "at scale": len(running) == 4})
            log(f"{name}: scale {op['state']} {ended:.1f}s after the kill; {len(running)} jobs run"
                + (f" ({op['error'][:100]}...)" if op["error"] else ""))
            platform.ok("scale", app, "web", "2", "--wait")
    finally:
        retire(env.database_url, app)
        platform.stop_nodes()
        remove_containers(client, app)
        client.close()
        env.flush()
        if url is not None:
            with Connection(url) as conn:
                channel = conn.channel()
                for queue in (f"host.{host}", "orchestrator"):
                    try:
                        channel.queue_delete(queue)
                    except Exception:  # never declared: nothing to delete
                        channel = conn.channel()
    return results


def log(text: str) -> None:
    print(text, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="orch-bench-brokers-"))
    table = {name: run_broker(name, url, args.rounds, workdir) for name, url in BROKERS.items()}
    log("\nA node SIGKILLed 1 s into a scale 2 -> 4 and started again 1 s later, "
        f"{args.rounds} rounds per broker:")
    log(f"{'broker':10} {'succeeded':>10} {'at scale':>9} {'ended after (s), median':>24}")
    for name, rows in table.items():
        ends = sorted(r["ended"] for r in rows)
        log(f"{name:10} {sum(r['outcome'] == 'succeeded' for r in rows):>7}/{len(rows):<2} "
            f"{sum(r['at scale'] for r in rows):>6}/{len(rows):<2} {ends[len(ends) // 2]:>24.1f}")


if __name__ == "__main__":
    main()
