"""Sample code service: reports on $PORT whether DATABASE_URL and REDIS_URL work."""
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg2
import redis


def check() -> dict:
    report = {"job": os.environ.get("ORCH_JOB"), "release": os.environ.get("ORCH_RELEASE")}
    try:
        with psycopg2.connect(os.environ["DATABASE_URL"], connect_timeout=3) as conn, conn.cursor() as cur:
            cur.execute("select 1")
            report["database"] = "ok" if cur.fetchone()[0] == 1 else "bad"
    except Exception as exc:
        report["database"] = f"error: {exc}"
    try:
        r = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=3)
        r.incr("hits")
        report["redis"] = "ok"
    except Exception as exc:
        report["redis"] = f"error: {exc}"
    return report


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps(check()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def work() -> None:
    """Worker mode: count ticks in Redis so a test can see workers running."""
    r = redis.Redis.from_url(os.environ["REDIS_URL"])
    key = f"ticks:{os.environ.get('ORCH_TARGET', 'worker')}"
    while True:
        r.incr(key)
        time.sleep(0.5)


if __name__ == "__main__":
    if sys.argv[1:] == ["worker"]:
        work()
    ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
