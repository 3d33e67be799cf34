"""The logging service's store (images/logging/logstore.py, stdlib only, run by the image's
python3): ingest through omprog's protocol, the queries, events, retention, and the HTTP server
in this process on a free port."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import socket
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CID = "c0ffee" * 10 + "abcd"
FILE = f"/docker/containers/{CID}/{CID}-json.log"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("logstore", ROOT / "images/logging/logstore.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["logstore"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


logstore = _load()


def message(log: str, *, time_: str = "2026-11-29T20:01:02.123456789Z", stream: str = "stdout",
            file: str = FILE, **attrs: str) -> str:
    base = {"ORCH_ENV": "shop", "ORCH_SERVICE": "web", "ORCH_JOB": "3f2a1b2c", "ORCH_KIND": "deploy",
            "ORCH_HOST": "local"}
    entry = {"log": log, "stream": stream, "attrs": {**base, **attrs}, "time": time_}
    return json.dumps({"file": file, "entry": entry})


def at(second: int, nanos: int = 0) -> str:
    """An RFC 3339 time, ``second`` seconds after 2026-11-29T20:00:00Z."""
    minute, sec = divmod(second, 60)
    return f"2026-11-29T20:{minute:02d}:{sec:02d}.{nanos:09d}Z"


T0 = 1_795_982_400  # 2026-11-29T20:00:00Z in unix seconds


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    path = str(tmp_path / "logs.db")
    logstore.init_db(path)
    conn = logstore.connect(path)
    yield conn
    conn.close()


def run_ingest(conn: sqlite3.Connection, lines: list[str]) -> list[str]:
    """Feed ``lines`` (messages and marks) to ingest; what it answered, one entry per line
    (keepalive dots kept as a prefix, as omprog sees them)."""
    replies: list[str] = []
    stdin = io.BytesIO("".join(line + "\n" for line in lines).encode())
    logstore.ingest(conn, stdin, replies.append)
    return replies


def batch(*messages: str) -> list[str]:
    return ["BEGIN TRANSACTION", *messages, "COMMIT TRANSACTION"]


def lines(conn: sqlite3.Connection, **filters: Any) -> list[str]:
    limit = filters.pop("limit", 1000)
    return [line["line"] for line in logstore.query_logs(conn, logstore.Filters(**filters), limit)]


# --- ingest ----------------------------------------------------------------------------------------------


def test_ingest_answers_per_the_omprog_protocol_and_stores(db: sqlite3.Connection) -> None:
    replies = run_ingest(db, [*batch(message("one\n"), message("two\n", time_=at(63))),
                              message("three\n", time_=at(64))])
    assert replies == ["OK", "OK", "DEFER_COMMIT", "DEFER_COMMIT", "OK", "OK"]
    stored = logstore.query_logs(db, logstore.Filters())
    assert [line["line"] for line in stored] == ["one", "two", "three"]
    first = stored[0]
    assert first == {"id": first["id"], "time": "2026-11-29T20:01:02.123456Z", "env": "shop", "service": "web",
                     "job": "3f2a1b2c", "kind": "deploy", "host": "local", "release": "", "stream": "stdout",
                     "line": "one"}


def test_a_batch_is_committed_only_at_its_commit_mark(db: sqlite3.Connection, tmp_path: Path) -> None:
    # rsyslog stopped (EOF) before the commit: nothing of that batch is stored, it is sent again
    run_ingest(db, ["BEGIN TRANSACTION", message("one\n"), message("two\n", time_=at(99))])
    assert lines(db) == []
    run_ingest(db, batch(message("one\n"), message("two\n", time_=at(99))))
    assert lines(db) == ["one", "two"]


def test_a_line_sent_again_is_stored_once(db: sqlite3.Connection) -> None:
    same = message("hello\n", time_=at(5))
    run_ingest(db, batch(same, same, message("hello\n", time_=at(5), stream="stderr")))
    run_ingest(db, batch(same))
    # another container, same text and time: another line
    other = message("hello\n", time_=at(5), file="/docker/containers/beef/beef-json.log.1")
    run_ingest(db, [other])
    assert db.execute("SELECT count(*) FROM logs").fetchone()[0] == 3
    assert logstore.stats(db, ":memory:")["lines"] == 3  # the counter follows what was stored


def test_malformed_messages_are_confirmed_and_counted(db: sqlite3.Connection) -> None:
    bad = ["not json", "[1, 2]", json.dumps({"file": FILE}), json.dumps({"file": FILE, "entry": {"log": "x"}}),
           message("bad time\n", time_="yesterday"), message("bad date\n", time_="2026-02-30T00:00:00Z"),
           "{" * 100000 + "}" * 100000]
    replies = run_ingest(db, [*batch(bad[0], message("good\n"), *bad[1:]), bad[0]])
    assert replies == ["OK", "OK", *["DEFER_COMMIT"] * 8, "OK", "OK"]
    assert lines(db) == ["good"]
    assert logstore.stats(db, ":memory:")["malformed"] == len(bad) + 1


def test_lines_come_back_in_time_order_whatever_the_arrival(db: sqlite3.Connection) -> None:
    run_ingest(db, batch(message("third\n", time_=at(30)), message("first\n", time_=at(10)),
                         message("second\n", time_=at(20)), message("last\n", time_="2026-11-29T21:01:00+01:00")))
    assert lines(db) == ["first", "second", "third", "last"]  # 21:01+01:00 is 20:01Z
    assert logstore.parse_time("2026-11-29T21:00:00+01:00") == T0 * 10**9


def test_times_keep_their_nanoseconds_and_show_microseconds() -> None:
    assert logstore.parse_time("2026-11-29T20:00:01.000000001Z") == (T0 + 1) * 10**9 + 1
    assert logstore.parse_time("2026-11-29T20:00:01Z") == (T0 + 1) * 10**9
    assert logstore.format_time((T0 + 1) * 10**9 + 123_456_789) == "2026-11-29T20:00:01.123456Z"


def test_a_store_failure_is_retried_not_reported(db: sqlite3.Connection, tmp_path: Path) -> None:
    """A failed commit must never reach rsyslog (it would drop the batch): ingest waits and
    says it is alive with dots meanwhile."""
    blocker = logstore.connect(str(tmp_path / "logs.db"))
    blocker.execute("BEGIN IMMEDIATE")
    db.execute("PRAGMA busy_timeout = 50")
    threading.Timer(0.5, lambda: blocker.execute("ROLLBACK")).start()
    replies = run_ingest(db, batch(message("patient\n")))
    assert replies[:3] == ["OK", "OK", "DEFER_COMMIT"]
    assert replies[-1] == "OK" and "." in replies[3:-1]
    assert lines(db) == ["patient"]
    blocker.close()


# --- queries ---------------------------------------------------------------------------------------------


@pytest.fixture
def filled(db: sqlite3.Connection) -> sqlite3.Connection:
    run_ingest(db, batch(
        message("GET /cart 200\n", time_=at(1)),
        message("Error: cart is empty\n", time_=at(2), stream="stderr"),
        message("error: lower case\n", time_=at(3)),
        message("worker ERROR loop\n", time_=at(4), ORCH_SERVICE="worker", ORCH_JOB="77aa", ORCH_KIND="worker"),
        message("ok\n", time_=at(5), ORCH_JOB="9b9b9b9b", ORCH_RELEASE="3"),
        message('quote " and 100% _done_\n', time_=at(6)),
    ))
    return db


def test_grep_is_a_case_sensitive_substring(filled: sqlite3.Connection) -> None:
    assert lines(filled, grep="Error") == ["Error: cart is empty"]
    assert lines(filled, grep="error") == ["error: lower case"]
    assert lines(filled, grep="ERROR") == ["worker ERROR loop"]
    assert lines(filled, grep="rror") == ["Error: cart is empty", "error: lower case"]
    assert lines(filled, grep="art") == ["GET /cart 200", "Error: cart is empty"]
    assert lines(filled, grep='" and 100%') == ['quote " and 100% _done_']  # no FTS syntax, no LIKE
    assert lines(filled, grep="_done_") == ['quote " and 100% _done_']
    assert lines(filled, grep="absent") == []


def test_short_grep_still_works_without_the_index(filled: sqlite3.Connection) -> None:
    assert lines(filled, grep="ok") == ["ok"]
    assert lines(filled, grep="E") == ["GET /cart 200", "Error: cart is empty", "worker ERROR loop"]
    assert lines(filled, grep='"') == ['quote " and 100% _done_']


def test_grep_uses_the_trigram_index(filled: sqlite3.Connection) -> None:
    where, args = logstore.Filters(grep="cart").where()
    plan = " ".join(str(row) for row in filled.execute(f"EXPLAIN QUERY PLAN SELECT id FROM logs WHERE {where}", args))
    assert "logs_fts" in plan and "VIRTUAL TABLE INDEX" in plan


def test_filters_by_service_job_kind_and_since(filled: sqlite3.Connection) -> None:
    assert lines(filled, service="worker") == ["worker ERROR loop"]
    assert lines(filled, job="9b9b9b9b") == ["ok"]
    assert lines(filled, kind="worker") == ["worker ERROR loop"]
    assert lines(filled, since=T0 + 5) == ["ok", 'quote " and 100% _done_']
    assert lines(filled, since=T0 + 4.5, service="web") == ["ok", 'quote " and 100% _done_']
    assert lines(filled, service="web", grep="rror", since=T0 + 2.5) == ["error: lower case"]
    assert logstore.query_logs(filled, logstore.Filters(job="9b9b9b9b"))[0]["release"] == "3"


def test_limit_keeps_the_last_lines_oldest_first(filled: sqlite3.Connection) -> None:
    assert lines(filled, limit=2) == ["ok", 'quote " and 100% _done_']
    assert lines(filled, limit=1, service="web", grep="rror") == ["error: lower case"]


def test_query_after_follows_arrival(filled: sqlite3.Connection) -> None:
    top = logstore.last_id(filled)
    run_ingest(filled, [message("late but old\n", time_=at(0)), message("late worker\n", ORCH_SERVICE="worker",
                                                                        time_=at(9))])
    new = logstore.query_after(filled, logstore.Filters(service="web"), top)
    assert [line["line"] for line in new] == ["late but old"]
    assert logstore.query_after(filled, logstore.Filters(), top, upto=top + 1)[0]["line"] == "late but old"


def test_events_are_stored_once_per_id(db: sqlite3.Connection) -> None:
    events = [{"id": "op-12-start", "time": "2026-11-29T20:00:07Z", "service": "web", "line": "operation 12 starts"},
              {"id": "op-12-end", "time": "2026-11-29T20:00:08.5Z", "service": "web", "line": "operation 12 ends"}]
    assert logstore.store_events(db, "shop", events) == 2
    assert logstore.store_events(db, "shop", events) == 0
    stored = logstore.query_logs(db, logstore.Filters(kind="event"))
    assert [(e["line"], e["env"], e["job"], e["host"], e["release"]) for e in stored] == [
        ("operation 12 starts", "shop", "", "", ""), ("operation 12 ends", "shop", "", "", "")]
    assert stored[1]["time"] == "2026-11-29T20:00:08.500000Z"
    for bad in ({"id": "x"}, [{"id": "", "time": "2026-11-29T20:00:07Z", "service": "web", "line": "l"}],
                [{"id": "x", "time": "soon", "service": "web", "line": "l"}], ["string"]):
        with pytest.raises(logstore.BadRequest):
            logstore.store_events(db, "shop", bad)


# --- retention ---------------------------------------------------------------------------------------------


def test_retention_deletes_lines_past_their_age(filled: sqlite3.Connection) -> None:
    result = logstore.enforce_retention(filled, retention=60 - 3.5, max_size=1 << 40, now=T0 + 60)
    assert result == {"aged": 3, "sized": 0}
    assert lines(filled) == ["worker ERROR loop", "ok", 'quote " and 100% _done_']
    assert logstore.stats(filled, ":memory:")["lines"] == 3
    assert lines(filled, grep="rror") == []
    assert lines(filled, grep="ERROR") == ["worker ERROR loop"]


def test_retention_keeps_the_store_under_its_size(db: sqlite3.Connection, tmp_path: Path) -> None:
    rows = [message(f"line {i:06d} " + "x" * 200 + "\n", time_=at(i // 1000, i % 1000)) for i in range(6000)]
    run_ingest(db, batch(*rows))
    path = str(tmp_path / "logs.db")
    used = logstore.used_bytes(db)
    cap = used // 2
    result = logstore.enforce_retention(db, retention=10**9, max_size=cap, now=T0)
    assert result["aged"] == 0 and 2000 < result["sized"] < 6000
    assert logstore.used_bytes(db) <= cap
    remaining = lines(db, limit=10000)
    assert remaining[-1].startswith("line 005999")  # the oldest went first
    assert len(remaining) == 6000 - result["sized"] == logstore.stats(db, path)["lines"]
    assert Path(path).stat().st_size <= cap * 1.1  # the file shrank (incremental vacuum)
    assert lines(db, grep="line 000000") == []


def test_sizes_and_ages_parse() -> None:
    assert logstore.parse_age("7d") == 7 * 86400
    assert logstore.parse_age("12h") == 43200
    assert logstore.parse_age("90") == 90
    assert logstore.parse_size("1g") == 1 << 30
    assert logstore.parse_size("500m") == 500 << 20
    assert logstore.parse_size("64KiB") == 64 << 10
    for bad in ("", "0d", "-1h", "7 days", "x"):
        with pytest.raises(ValueError):
            logstore.parse_age(bad)
    for bad in ("", "0", "1p", "big"):
        with pytest.raises(ValueError):
            logstore.parse_size(bad)


def test_settings_refuse_a_store_without_credentials(tmp_path: Path) -> None:
    environ = {"PORT": "31800", "LOG_USER": "u", "LOG_PASSWORD": "p", "LOG_DIR": str(tmp_path)}
    settings = logstore.Settings.from_environ(environ)
    assert (settings.retention, settings.max_size, settings.db) == (7 * 86400, 1 << 30, str(tmp_path / "logs.db"))
    for missing in ("LOG_USER", "LOG_PASSWORD", "PORT"):
        with pytest.raises(ValueError):
            logstore.Settings.from_environ({k: v for k, v in environ.items() if k != missing})
    assert logstore.main(["init"]) == 2  # this process has no LOG_USER


# --- HTTP ---------------------------------------------------------------------------------------------------


class Client:
    def __init__(self, port: int, user: str = "admin", password: str = "s3cret:pw") -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def request(self, path: str, *, method: str = "GET", body: bytes | None = None,
                auth: str | None = "default", timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
        headers = {} if auth is None else {"Authorization": self.auth if auth == "default" else auth}
        if body is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def json(self, path: str, **kwargs: Any) -> Any:
        status, _, body = self.request(path, **kwargs)
        assert status == 200, (status, body)
        return json.loads(body)


@pytest.fixture
def server(filled: sqlite3.Connection, tmp_path: Path) -> Iterator[tuple[Any, Client]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = logstore.Settings(db=str(tmp_path / "logs.db"), port=port, user="admin", password="s3cret:pw",
                                 retention=86400.0, max_size=1 << 30, env="shop")
    srv = logstore.LogServer(settings, ("127.0.0.1", port))
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv, Client(port)
    srv.shutdown()
    srv.server_close()


PATHS = [("GET", "/"), ("GET", "/api/logs"), ("GET", "/api/logs?follow=1"), ("GET", "/api/stats"),
         ("POST", "/api/events"), ("GET", "/nowhere"), ("DELETE", "/api/logs"), ("HEAD", "/")]


@pytest.mark.parametrize(("method", "path"), PATHS)
def test_every_path_needs_the_password(server: tuple[Any, Client], method: str, path: str) -> None:
    _, client = server
    bad = [None, "Basic " + base64.b64encode(b"admin:wrong").decode(), "Basic " + base64.b64encode(b"admin").decode(),
           "Basic " + base64.b64encode(b"other:s3cret:pw").decode(), "Basic !!!", "Bearer s3cret:pw", client.auth + "x"]
    for auth in bad:
        status, headers, body = client.request(path, method=method, auth=auth, body=b"[]" if method == "POST" else None)
        assert status == 401, (auth, status)
        assert headers["WWW-Authenticate"].startswith("Basic realm=")
        assert b"cart" not in body and b"<html" not in body
    status, _, _ = client.request(path if "follow" not in path else "/api/stats", method=method,
                                  body=b"[]" if method == "POST" else None)
    assert status != 401


def test_the_api_answers_in_json(server: tuple[Any, Client]) -> None:
    _, client = server
    got = client.json("/api/logs?service=web&grep=rror&limit=10")
    assert [line["line"] for line in got["lines"]] == ["Error: cart is empty", "error: lower case"]
    assert set(got["lines"][0]) == {"id", "time", "env", "service", "job", "kind", "host", "release", "stream", "line"}
    assert got["lines"][0]["time"] == "2026-11-29T20:00:02.000000Z"
    assert client.json(f"/api/logs?since={T0 + 4.5}&job=9b9b9b9b")["lines"][0]["line"] == "ok"
    stats = client.json("/api/stats")
    assert stats["lines"] == 6 and stats["malformed"] == 0 and stats["oldest"] == "2026-11-29T20:00:01.000000Z"
    assert stats["bytes"] > 0
    event = [{"id": "op-1", "time": "2026-11-29T20:00:09Z", "service": "web", "line": "deployed"}]
    assert client.json("/api/events", method="POST", body=json.dumps(event).encode()) == {"stored": 1}
    assert client.json("/api/events", method="POST", body=json.dumps(event).encode()) == {"stored": 0}
    assert client.json("/api/logs?kind=event")["lines"][0]["line"] == "deployed"


@pytest.mark.parametrize("query", ["limit=0", "limit=10001", "limit=x", "since=soon", "since=nan", "follow=2",
                                   "colour=red", "job=a&job=b"])
def test_bad_parameters_are_refused_in_one_line(server: tuple[Any, Client], query: str) -> None:
    _, client = server
    status, headers, body = client.request("/api/logs?" + query)
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert set(json.loads(body)) == {"error"} and b"\n" not in body


def test_bad_events_are_refused(server: tuple[Any, Client]) -> None:
    _, client = server
    for body in (b"not json", b'{"id": 1}', b'[{"id": "x"}]'):
        status, _, answer = client.request("/api/events", method="POST", body=body)
        assert status == 400 and "error" in json.loads(answer)


def test_the_dashboard_is_one_page_of_its_own(server: tuple[Any, Client]) -> None:
    _, client = server
    status, headers, body = client.request("/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "<title>shop · logs</title>" in page and "live tail" in page and "/api/logs" in page
    assert "http://" not in page and "https://" not in page and "<link" not in page  # nothing outside it
    assert "innerHTML" not in page  # lines are set as text, never parsed


def test_the_dashboard_escapes_its_title(tmp_path: Path) -> None:
    settings = logstore.Settings(db=str(tmp_path / "x.db"), port=0, user="u", password="p", retention=1.0,
                                 max_size=1, env="<script>")
    srv = logstore.LogServer(settings, ("127.0.0.1", 0))
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        client = Client(srv.server_address[1], "u", "p")
        page = client.request("/")[2].decode()
        assert "<script>·" not in page and "&lt;script&gt;" in page
    finally:
        srv.shutdown()
        srv.server_close()


def test_follow_streams_lines_stored_after_the_request(server: tuple[Any, Client], tmp_path: Path) -> None:
    _, client = server
    req = urllib.request.Request(client.base + "/api/logs?follow=1&service=web&grep=rror",
                                 headers={"Authorization": client.auth})
    with urllib.request.urlopen(req, timeout=5) as response:
        assert response.headers["Content-Type"] == "application/x-ndjson"
        first = [json.loads(response.readline()) for _ in range(2)]
        assert [line["line"] for line in first] == ["Error: cart is empty", "error: lower case"]
        writer = logstore.connect(str(tmp_path / "logs.db"))
        run_ingest(writer, [message("fresh error 1\n", time_=at(49)),
                            message("new error\n", time_=at(50), ORCH_SERVICE="other"),  # not this service
                            message("no match\n", time_=at(51)), message("fresh error 2\n", time_=at(52))])
        writer.close()
        started = time.monotonic()
        fresh = [json.loads(response.readline())["line"] for _ in range(2)]
        assert fresh == ["fresh error 1", "fresh error 2"] and time.monotonic() - started < 2
    # the client went away: the server's thread ends its stream
    deadline = time.monotonic() + 3
    while any(t.name != "MainThread" and t.is_alive() and "process_request" in t.name for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the follow stream outlived its client"
        time.sleep(0.05)


def test_a_jobs_line_cannot_pass_for_a_platform_event() -> None:
    """Events come only through the store's API, with its credentials: a line claiming the
    kind "event" (anyone who reaches the syslog port could send one) is refused as malformed."""
    with pytest.raises(logstore.Malformed, match="platform event"):
        logstore.parse_message(message("operation 1 (redeploy of web) succeeded", ORCH_KIND="event"))
    assert logstore.parse_message(message("hello"))[5] == "deploy"
