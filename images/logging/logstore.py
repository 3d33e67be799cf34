#!/usr/bin/python3
"""The log store of one environment's logging service: SQLite behind rsyslog, and its HTTP side.

    logstore init     check the settings, create the database (the entrypoint runs it first)
    logstore ingest   rsyslog's omprog program: messages on stdin, each stored before confirmed
    logstore serve    the dashboard and the JSON API on $PORT (HTTP basic auth on every path),
                      and the retention thread

Each message is one line of JSON, ``{"file": <Docker's log file>, "entry": <its line>}`` (see
orchestrator/logship.py). A line is stored once: its key is the sha256 of the container id (from
the file's path), the entry's time, stream and text, so a line sent again (a shipper that lost
its state, an acknowledgement lost in a restart) is ignored.

The database (``$LOG_DIR/logs.db``, WAL) holds ``logs`` (one row per line), ``logs_fts`` (an FTS5
trigram index on the text, external content kept by triggers; without positions: a substring
search asks for lines holding its trigrams, then instr() confirms) and ``counters`` (malformed
messages). Python's standard library only.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import hmac
import html
import json
import os
import re
import select
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

DEFAULT_DIR = "/var/lib/orch-logs"
DB_NAME = "logs.db"
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10000
MAX_BODY = 8 * 1024 * 1024  # POST /api/events
FOLLOW_POLL = 0.2  # seconds between looks for new lines in a follow stream
FOLLOW_PAGE = 1000  # new lines sent at most per look
KEEPALIVE = 5.0  # a blank line after this long without a line, so proxies keep the stream
RETENTION_EVERY = 60.0
DELETE_CHUNK = 5000  # lines deleted per transaction: ingest waits at most one chunk
COLUMNS = ("id", "time", "env", "service", "job", "kind", "host", "release", "stream", "line")
RECORD = ("key", "time", "env", "service", "job", "kind", "host", "release", "stream", "line")

SCHEMA = """
CREATE TABLE IF NOT EXISTS logs (
  id INTEGER PRIMARY KEY,
  key BLOB NOT NULL UNIQUE,
  time INTEGER NOT NULL,
  env TEXT NOT NULL,
  service TEXT NOT NULL,
  job TEXT NOT NULL,
  kind TEXT NOT NULL,
  host TEXT NOT NULL,
  release TEXT NOT NULL,
  stream TEXT NOT NULL,
  line TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_time ON logs(time);
CREATE INDEX IF NOT EXISTS logs_service_time ON logs(service, time);
CREATE INDEX IF NOT EXISTS logs_job_time ON logs(job, time);
CREATE VIRTUAL TABLE IF NOT EXISTS logs_fts USING fts5(
  line, content='logs', content_rowid='id', tokenize='trigram', detail='none', columnsize=0
);
CREATE TRIGGER IF NOT EXISTS logs_fts_insert AFTER INSERT ON logs BEGIN
  INSERT INTO logs_fts(rowid, line) VALUES (new.id, new.line);
END;
CREATE TRIGGER IF NOT EXISTS logs_fts_delete AFTER DELETE ON logs BEGIN
  INSERT INTO logs_fts(logs_fts, rowid, line) VALUES ('delete', old.id, old.line);
END;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO counters(name, value) VALUES ('malformed', 0);
INSERT OR IGNORE INTO counters(name, value) SELECT 'lines', count(*) FROM logs;
"""
INSERT = f"INSERT OR IGNORE INTO logs({', '.join(RECORD)}) VALUES ({', '.join('?' * len(RECORD))})"
COUNT = "UPDATE counters SET value = value + ? WHERE name = ?"  # lines and malformed, kept with them


class Malformed(ValueError):
    """A message that is not a Docker log line as the shipper sends it."""


class BadRequest(ValueError):
    """A request the API refuses (400), with a one-line reason."""


# --- settings ---------------------------------------------------------------------------------------

_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?")
_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_age(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``90s`` (or plain seconds) -> seconds."""
    match = _AGE.fullmatch(text.strip().lower())
    if not match or float(match[1]) <= 0:
        raise ValueError(f"age {text!r}: a positive number with s, m, h, d or w, like 7d")
    return float(match[1]) * _AGE_UNITS[match[2]]


def parse_size(text: str) -> int:
    """``1g``, ``500m``, ``64k`` (or plain bytes; powers of 1024) -> bytes."""
    match = _SIZE.fullmatch(text.strip().lower())
    if not match or float(match[1]) <= 0:
        raise ValueError(f"size {text!r}: a positive number with k, m, g or t, like 1g")
    return int(float(match[1]) * _SIZE_UNITS[match[2]])


@dataclass(frozen=True)
class Settings:
    """What ``serve`` runs with, from the container's environment."""

    db: str
    port: int
    user: str
    password: str
    retention: float  # seconds
    max_size: int  # bytes
    env: str = ""

    @classmethod
    def from_environ(cls, environ: dict[str, str] | os._Environ[str]) -> Settings:
        user, password = environ.get("LOG_USER", ""), environ.get("LOG_PASSWORD", "")
        if not user or not password:
            raise ValueError("LOG_USER and LOG_PASSWORD must be set: every page needs them")
        port = environ.get("PORT", "")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"PORT {port!r} is not a TCP port")
        return cls(db=db_path(environ), port=int(port), user=user, password=password,
                   retention=parse_age(environ.get("LOG_RETENTION", "7d")),
                   max_size=parse_size(environ.get("LOG_MAX_SIZE", "1g")), env=environ.get("ORCH_ENV", ""))


def db_path(environ: dict[str, str] | os._Environ[str]) -> str:
    return os.path.join(environ.get("LOG_DIR", DEFAULT_DIR), DB_NAME)


# --- the database -----------------------------------------------------------------------------------


def connect(path: str) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, and willing to wait
    for the other writer (ingest, events, retention) for a while."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA synchronous = NORMAL")  # WAL: a commit survives a crash of the process
    return conn


def init_db(path: str) -> None:
    """Create the database if it is new. auto_vacuum must be chosen before the first table:
    incremental, so retention can give pages back to the file system."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with closing(connect(path)) as conn:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA} COMMIT;")


# --- what a line is -----------------------------------------------------------------------------------

_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?([Zz]|[+-]\d\d:\d\d)")


def parse_time(text: object) -> int:
    """RFC 3339 (Docker's, with nanoseconds) -> nanoseconds since the epoch."""
    match = _RFC3339.fullmatch(text) if isinstance(text, str) else None
    if not match:
        raise Malformed(f"time {text!r} is not RFC 3339")
    year, month, day, hour, minute, second = (int(match[i]) for i in range(1, 7))
    try:
        datetime(year, month, day, hour, minute, min(second, 59))  # a real date (leap second: :60)
    except ValueError as exc:
        raise Malformed(f"time {text!r}: {exc}") from None
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    zone = match[8]
    if zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return seconds * 1_000_000_000 + int((match[7] or "")[:9].ljust(9, "0"))


def format_time(ns: int) -> str:
    """Nanoseconds since the epoch -> RFC 3339 in UTC with microseconds."""
    seconds, rest = divmod(ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{rest // 1000:06d}Z"


def parse_message(text: str) -> tuple[Any, ...]:
    """One message from rsyslog -> a row of ``logs`` (in RECORD's order); Malformed if it is not
    ``{"file": ".../<container id>/<id>-json.log", "entry": <a Docker json-file line>}``."""
    try:
        message = json.loads(text)
    except ValueError:
        raise Malformed("not JSON") from None
    if not isinstance(message, dict):
        raise Malformed("not a JSON object")
    path, entry = message.get("file"), message.get("entry")
    if not isinstance(path, str) or not isinstance(entry, dict):
        raise Malformed("no file or no entry")
    container = os.path.basename(os.path.dirname(path))
    log, stream, when = entry.get("log"), entry.get("stream"), entry.get("time")
    if not container or not isinstance(log, str) or not isinstance(stream, str) or not isinstance(when, str):
        raise Malformed("the entry has no container, log, stream or time")
    attrs = entry.get("attrs") or {}
    if not isinstance(attrs, dict):
        raise Malformed("attrs is not an object")

    def attr(name: str) -> str:
        value = attrs.get(name, "")
        return _text(value if isinstance(value, str) else str(value))

    if attr("ORCH_KIND") == "event":  # the platform's events come through its API, never as a job's line
        raise Malformed("a job's line cannot be a platform event")
    key = hashlib.sha256("\0".join((container, when, stream, log)).encode("utf-8", "surrogatepass")).digest()
    line = log[:-1] if log.endswith("\n") else log
    return (key, parse_time(when), attr("ORCH_ENV"), attr("ORCH_SERVICE"), attr("ORCH_JOB"), attr("ORCH_KIND"),
            attr("ORCH_HOST"), attr("ORCH_RELEASE"), _text(stream), _text(line))


def _text(value: str) -> str:
    """JSON may carry lone surrogates (\\ud800) that SQLite cannot store as text."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode()
    return value


# --- ingest: rsyslog's omprog program ----------------------------------------------------------------------

BEGIN = b"BEGIN TRANSACTION"
COMMIT = b"COMMIT TRANSACTION"


def _stderr(text: str) -> None:
    print(f"logstore: {text}", file=sys.stderr, flush=True)


def store_rows(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]], malformed: int = 0,
               keepalive: Callable[[], None] = lambda: None, sleep: Callable[[float], None] = time.sleep) -> int:
    """Insert ``rows`` (a line already stored is ignored) and count ``malformed`` in one
    transaction; the number of new lines. A failure (the database busy past the timeout, the disk
    full) is retried until it works: telling rsyslog that a commit failed would lose the batch
    (omprog's deferred messages are not retried, rsyslog issue 2420), so ingest waits instead,
    and rsyslog's queue holds the lines. ``keepalive`` is called while waiting (omprog's timeout)."""
    delay = 0.05
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                stored = max(conn.executemany(INSERT, rows).rowcount, 0) if rows else 0
                if stored:
                    conn.execute(COUNT, (stored, "lines"))
                if malformed:
                    conn.execute(COUNT, (malformed, "malformed"))
                conn.execute("COMMIT")
                return stored
            except BaseException:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            _stderr(f"storing {len(rows)} lines failed ({exc}); retrying in {delay:g}s")
            keepalive()
            sleep(delay)
            delay = min(delay * 2, 2.0)


class _Batch:
    """The lines of one transaction, inserted as they come (inside an open SQLite transaction)
    and committed at the commit mark; if an insert fails, the whole batch is written again then,
    by store_rows, until it works."""

    def __init__(self, conn: sqlite3.Connection, keepalive: Callable[[], None]) -> None:
        self.conn, self.keepalive = conn, keepalive
        self.rows: list[tuple[Any, ...]] = []
        self.malformed = 0
        self.stored = 0
        self.failed = False
        self.warned = 0.0

    def add(self, raw: bytes) -> None:
        try:
            row = parse_message(raw.decode("utf-8", "replace"))
        except Exception as exc:  # Malformed, or JSON nested too deep: never stop the pipe
            self.malformed += 1
            if time.monotonic() - self.warned > 10:  # at most one in 10 s: its own log is shipped too
                self.warned = time.monotonic()
                _stderr(f"malformed message ({exc}): {raw[:200]!r}")
            return
        self.rows.append(row)
        if self.failed:
            return
        try:
            if not self.conn.in_transaction:
                self.conn.execute("BEGIN IMMEDIATE")
            self.stored += self.conn.execute(INSERT, row).rowcount
        except sqlite3.Error as exc:
            _stderr(f"storing a line failed ({exc}); the batch is written again at its end")
            self.failed = True

    def commit(self) -> int:
        """Commit the batch (retried until it works); the number of new lines. Then empty."""
        if not self.failed and self.conn.in_transaction:
            try:
                if self.stored:
                    self.conn.execute(COUNT, (self.stored, "lines"))
                if self.malformed:
                    self.conn.execute(COUNT, (self.malformed, "malformed"))
                self.conn.execute("COMMIT")
                self.malformed = 0
            except sqlite3.Error as exc:
                _stderr(f"committing {len(self.rows)} lines failed ({exc}); retrying")
                self.failed = True
        if self.failed or self.malformed:
            self.rollback()
            self.stored = store_rows(self.conn, self.rows, self.malformed, self.keepalive)
        stored = self.stored
        self.rows, self.malformed, self.stored, self.failed = [], 0, 0, False
        return stored

    def rollback(self) -> None:
        if self.conn.in_transaction:
            with suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")


def ingest(conn: sqlite3.Connection, stdin: Iterable[bytes], reply: Callable[[str], None]) -> None:
    """omprog's protocol with confirmMessages="on": ``OK`` once ready; then for each message
    either ``OK`` once it is committed, or, inside a transaction (useTransactions="on"),
    ``DEFER_COMMIT`` for each message and ``OK`` for the commit mark once the whole batch is
    committed. A malformed message is confirmed too (never block the pipe on it) and counted.

    A message of a transaction is answered first and stored next: rsyslog prepares and sends
    the next one meanwhile. At EOF (rsyslog stopping) an open transaction is rolled back: it was
    not confirmed, rsyslog keeps those messages and sends them again."""
    batch = _Batch(conn, keepalive=lambda: reply("."))  # omprog skips leading dots: its timeout restarts
    reply("OK")
    in_batch = False
    try:
        for raw in stdin:
            if raw.startswith(b"{") or raw.rstrip(b"\r\n") not in (BEGIN, COMMIT):
                if in_batch:
                    reply("DEFER_COMMIT")
                    batch.add(raw)
                else:  # no transactions (useTransactions="off"): each message is one
                    batch.add(raw)
                    batch.commit()
                    reply("OK")
            elif raw.startswith(BEGIN):
                in_batch = True
                reply("OK")
            else:
                batch.commit()
                in_batch = False
                reply("OK")
    finally:
        batch.rollback()


_REPLIES = {"OK": b"OK\n", "DEFER_COMMIT": b"DEFER_COMMIT\n", ".": b"."}


def _reply_on_stdout(text: str) -> None:
    data = _REPLIES.get(text) or (text + "\n").encode()
    while data:
        data = data[os.write(1, data):]


# --- what the API reads -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """Which lines a query wants; None (or "") means any."""

    service: str | None = None
    job: str | None = None
    kind: str | None = None
    since: float | None = None  # unix seconds
    grep: str | None = None  # a substring, case-sensitive like grep

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        for column in ("service", "job", "kind"):
            value = getattr(self, column)
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        if self.since is not None:
            clauses.append("time >= ?")
            args.append(int(self.since * 1_000_000_000))
        if self.grep:
            if len(self.grep) >= 3:  # the trigram index narrows (case-insensitively) ...
                clauses.append("id IN (SELECT rowid FROM logs_fts WHERE logs_fts MATCH ?)")
                args.append(trigram_query(self.grep))
            clauses.append("instr(line, ?) > 0")  # ... instr() decides, case-sensitively
            args.append(self.grep)
        return " AND ".join(clauses) or "1", args


def trigram_query(text: str) -> str:
    """An FTS5 query for the lines that hold every trigram of a set covering ``text`` (each third
    one and the last): all the lines that contain it, and a few more. The index keeps no
    positions (detail=none: a third smaller, faster to write), so a phrase cannot be asked."""
    starts = list(range(0, len(text) - 2, 3))
    if starts[-1] != len(text) - 3:
        starts.append(len(text) - 3)
    return " AND ".join('"' + text[i:i + 3].replace('"', '""') + '"' for i in starts)


def _line(row: Sequence[Any]) -> dict[str, Any]:
    line = dict(zip(COLUMNS, row, strict=True))
    line["time"] = format_time(row[1])
    return line


def query_logs(conn: sqlite3.Connection, filters: Filters, limit: int = DEFAULT_LIMIT) -> list[dict[str, Any]]:
    """The last ``limit`` lines that match, oldest first (by time, then arrival)."""
    where, args = filters.where()
    rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM logs WHERE {where} ORDER BY time DESC, id DESC LIMIT ?",
                        [*args, limit]).fetchall()
    return [_line(row) for row in reversed(rows)]


def query_after(conn: sqlite3.Connection, filters: Filters, after_id: int, upto: int | None = None,
                limit: int = 1000) -> list[dict[str, Any]]:
    """Lines stored after line ``after_id`` (up to line ``upto``) that match, in the order they
    were stored."""
    where, args = filters.where()
    top = (1 << 62) if upto is None else upto
    rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM logs WHERE id > ? AND id <= ? AND {where} "
                        "ORDER BY id LIMIT ?", [after_id, top, *args, limit]).fetchall()
    return [_line(row) for row in rows]


def last_id(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(max(id), 0) FROM logs").fetchone()[0])


def store_events(conn: sqlite3.Connection, env: str, events: object) -> int:
    """The platform's events (``[{"id", "time", "service", "line"}]``) as lines of kind "event";
    the key is the event's id, so an event sent again is stored once. The number of new ones."""
    if not isinstance(events, list):
        raise BadRequest("the body must be a JSON list of events")
    rows = []
    for n, event in enumerate(events):
        if not isinstance(event, dict):
            raise BadRequest(f"event {n} is not an object")
        ident, when, service, line = (event.get(k) for k in ("id", "time", "service", "line"))
        if not isinstance(ident, str) or not ident:
            raise BadRequest(f"event {n}: id must be a non-empty string")
        if not isinstance(service, str) or not isinstance(line, str):
            raise BadRequest(f"event {n}: service and line must be strings")
        try:
            ns = parse_time(when)
        except Malformed as exc:
            raise BadRequest(f"event {n}: {exc}") from None
        key = hashlib.sha256(b"event\0" + ident.encode("utf-8", "surrogatepass")).digest()
        rows.append((key, ns, env, _text(service), "", "event", "", "", "", _text(line)))
    return store_rows(conn, rows)


def stats(conn: sqlite3.Connection, path: str) -> dict[str, Any]:
    """What the store holds: lines (counted as they are stored and deleted: count(*) would read a
    whole index each time), bytes on disk (the database and its WAL), the oldest line's time and
    the malformed messages received."""
    counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
    oldest = conn.execute("SELECT min(time) FROM logs").fetchone()[0]
    size = 0
    for name in (path, path + "-wal"):
        with suppress(OSError):
            size += os.path.getsize(name)
    return {"lines": counters.get("lines", 0), "bytes": size,
            "oldest": None if oldest is None else format_time(oldest), "malformed": counters.get("malformed", 0)}


# --- retention ---------------------------------------------------------------------------------------------


def used_bytes(conn: sqlite3.Connection) -> int:
    """The database's pages in use (the file's size without its free pages)."""
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int((pages - free) * page_size)


def _delete_chunks(conn: sqlite3.Connection, select: str, args: Sequence[Any], most: int | None = None) -> int:
    deleted = 0
    while most is None or deleted < most:
        chunk = DELETE_CHUNK if most is None else min(DELETE_CHUNK, most - deleted)
        conn.execute("BEGIN IMMEDIATE")
        try:
            n = conn.execute(f"DELETE FROM logs WHERE id IN ({select} LIMIT ?)", [*args, chunk]).rowcount
            conn.execute(COUNT, (-n, "lines"))
            conn.execute("COMMIT")
        except BaseException:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        deleted += n
        if n < chunk:
            break
    return deleted


def merge_index(conn: sqlite3.Connection, pages: int = 500) -> None:
    """Merge the FTS5 index into one b-tree, ``pages`` pages per transaction (ingest waits for
    one step at most). Deleting lines only adds deletion markers to the index; they go, and the
    index shrinks, when its b-trees are merged."""
    conn.execute("INSERT INTO logs_fts(logs_fts, rank) VALUES ('merge', ?)", (-pages,))
    while True:
        before = conn.total_changes
        conn.execute("INSERT INTO logs_fts(logs_fts, rank) VALUES ('merge', ?)", (pages,))
        if conn.total_changes - before < 2:  # FTS5's documented sign of no more work
            return


def enforce_retention(conn: sqlite3.Connection, retention: float, max_size: int,
                      now: float | None = None) -> dict[str, int]:
    """Delete the lines older than ``retention`` seconds, then, while the database uses more
    than ``max_size`` bytes (its pages in use), the oldest lines: as many as should bring it to
    90 % of the cap (the share of lines that share of the size is), in chunks of DELETE_CHUNK
    lines, each its own short transaction (ingest waits for one chunk at most), then the index
    is merged (``merge_index``) so that it shrinks too, and measured again.

    Then the free pages go back to the file system: the database has auto_vacuum=INCREMENTAL,
    ``PRAGMA incremental_vacuum`` truncates the file (through executescript: Python's execute
    runs that pragma one page at a time) and a TRUNCATE checkpoint empties the WAL. Lines
    deleted for their age leave the index to FTS5's automatic merges (a whole merge rewrites the
    index: worth it only to get under the cap). Returns the numbers of lines deleted."""
    now = time.time() if now is None else now
    aged = _delete_chunks(conn, "SELECT id FROM logs WHERE time < ?", [int((now - retention) * 1_000_000_000)])
    sized = 0
    for _ in range(10):  # each round measures again; a few are enough unless lines are huge
        used = used_bytes(conn)
        if used <= max_size:
            break
        count = conn.execute("SELECT count(*) FROM logs").fetchone()[0]
        if not count:
            break
        want = max(1, -(-count * (used - int(max_size * 0.9)) // used))
        sized += _delete_chunks(conn, "SELECT id FROM logs ORDER BY time, id", [], most=want)
        merge_index(conn)
    if aged or sized:
        conn.executescript("PRAGMA incremental_vacuum;")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    return {"aged": aged, "sized": sized}


def retention_loop(settings: Settings, stopping: threading.Event) -> None:
    with closing(connect(settings.db)) as conn:
        while True:
            try:
                result = enforce_retention(conn, settings.retention, settings.max_size)
                if result["aged"] or result["sized"]:
                    _stderr(f"retention: deleted {result['aged']} lines past their age, "
                            f"{result['sized']} over the size cap")
            except sqlite3.Error as exc:
                _stderr(f"retention failed: {exc}")
            if stopping.wait(RETENTION_EVERY):
                return


# --- the HTTP side --------------------------------------------------------------------------------------------

QUERY_PARAMS = {"service", "job", "kind", "since", "grep", "limit", "follow"}


def parse_params(query: str) -> tuple[Filters, int, bool]:
    """``/api/logs``'s query string -> (filters, limit, follow); BadRequest says what is wrong."""
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=False, errors="strict")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"bad query string: {exc}") from None
    unknown = sorted(set(params) - QUERY_PARAMS)
    if unknown:
        raise BadRequest(f"unknown parameter {unknown[0]!r}; known: {', '.join(sorted(QUERY_PARAMS))}")
    for name, values in params.items():
        if len(values) > 1:
            raise BadRequest(f"parameter {name!r} given {len(values)} times")
    one = {name: values[0] for name, values in params.items()}
    since = None
    if one.get("since"):
        try:
            since = float(one["since"])
        except ValueError:
            raise BadRequest(f"since {one['since']!r} is not a number (unix seconds)") from None
        if since != since or since in (float("inf"), float("-inf")) or abs(since) > 1e11:
            raise BadRequest(f"since {one['since']!r} is not a time (unix seconds)")
    limit = DEFAULT_LIMIT
    if "limit" in one:
        if not one["limit"].isdigit() or not 1 <= int(one["limit"]) <= MAX_LIMIT:
            raise BadRequest(f"limit {one['limit']!r} must be a whole number from 1 to {MAX_LIMIT}")
        limit = int(one["limit"])
    follow = one.get("follow", "0").lower()
    if follow not in ("0", "1", "true", "false", ""):
        raise BadRequest(f"follow {one['follow']!r} must be 1 or 0")
    filters = Filters(service=one.get("service") or None, job=one.get("job") or None,
                      kind=one.get("kind") or None, since=since, grep=one.get("grep") or None)
    return filters, limit, follow in ("1", "true")


class LogServer(ThreadingHTTPServer):
    """The dashboard and the API of one store; each request opens its own connection."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, settings: Settings, address: tuple[str, int] | None = None) -> None:
        self.settings = settings
        self.stopping = threading.Event()
        self.user = settings.user.encode()
        self.password = settings.password.encode()
        super().__init__(address or ("0.0.0.0", settings.port), Handler)

    def shutdown(self) -> None:
        self.stopping.set()
        super().shutdown()


class Handler(BaseHTTPRequestHandler):
    server: LogServer
    server_version = "orch-logs"

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        pass  # its own output is shipped to itself: no line per request

    # every method goes through here: authentication first, on every path
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        if not self._authorized():
            self._send_json(401, {"error": "authentication required"},
                            {"WWW-Authenticate": 'Basic realm="orch logs", charset="UTF-8"'})
            return
        url = urlsplit(self.path)
        routes: dict[str, dict[str, Callable[[str], None]]] = {
            "/": {"GET": self._dashboard},
            "/api/logs": {"GET": self._logs},
            "/api/stats": {"GET": self._stats},
            "/api/events": {"POST": self._events},
        }
        if url.path not in routes:
            self._send_json(404, {"error": f"no such path: {url.path}"})
        elif method not in routes[url.path]:
            self._send_json(405, {"error": f"{method} is not allowed on {url.path}"},
                            {"Allow": ", ".join(routes[url.path])})
        else:
            try:
                routes[url.path][method](url.query)
            except BadRequest as exc:
                self._send_json(400, {"error": str(exc)})
            except (BrokenPipeError, ConnectionResetError):
                pass
            except sqlite3.Error as exc:
                self._send_json(503, {"error": f"the store cannot answer now: {exc}"})

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True)
        except ValueError:
            return False
        user, colon, password = decoded.partition(b":")
        # both compared whatever the first says: the time taken tells nothing
        user_ok = hmac.compare_digest(user, self.server.user)
        password_ok = hmac.compare_digest(password, self.server.password)
        return bool(colon) and user_ok and password_ok

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")
        self._send(status, body, "application/json", headers)

    def _connect(self) -> closing[sqlite3.Connection]:
        return closing(connect(self.server.settings.db))

    def _dashboard(self, query: str) -> None:
        page = DASHBOARD.replace("{{ENV}}", html.escape(self.server.settings.env or "logs"))
        self._send(200, page.encode(), "text/html; charset=utf-8",
                   {"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                               "style-src 'unsafe-inline'; img-src data:"})

    def _stats(self, query: str) -> None:
        with self._connect() as conn:
            self._send_json(200, stats(conn, self.server.settings.db))

    def _events(self, query: str) -> None:
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            raise BadRequest("a Content-Length is needed")
        if int(length) > MAX_BODY:
            raise BadRequest(f"the body is over {MAX_BODY} bytes: send fewer events at once")
        try:
            events = json.loads(self.rfile.read(int(length)))
        except ValueError:
            raise BadRequest("the body is not JSON") from None
        with self._connect() as conn:
            self._send_json(200, {"stored": store_events(conn, self.server.settings.env, events)})

    def _logs(self, query: str) -> None:
        filters, limit, follow = parse_params(query)
        with self._connect() as conn:
            if not follow:
                self._send_json(200, {"lines": query_logs(conn, filters, limit)})
                return
            conn.execute("BEGIN")  # one snapshot: the lines so far and where new ones start
            lines, after = query_logs(conn, filters, limit), last_id(conn)
            conn.execute("COMMIT")
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")
            self.end_headers()
            for chunk in self._follow(conn, filters, lines, after):
                self.wfile.write(chunk)

    def _follow(self, conn: sqlite3.Connection, filters: Filters, lines: list[dict[str, Any]],
                after: int) -> Iterator[bytes]:
        """The lines so far, then each new line as it is stored; a blank line after KEEPALIVE
        seconds without one; until the client goes away (or the server stops)."""
        def encode(batch: list[dict[str, Any]]) -> bytes:
            return b"".join(json.dumps(line, ensure_ascii=False).encode("utf-8", "replace") + b"\n" for line in batch)

        yield encode(lines)
        quiet_since = time.monotonic()
        while not self.server.stopping.wait(FOLLOW_POLL):
            if self._client_gone():
                return
            conn.execute("BEGIN")  # one snapshot: what is new up to the last line stored
            top = last_id(conn)
            new = query_after(conn, filters, after, upto=top, limit=FOLLOW_PAGE)
            conn.execute("COMMIT")
            # a full page: more may match below top; otherwise all up to top has been seen
            after = new[-1]["id"] if len(new) == FOLLOW_PAGE else top
            if new:
                quiet_since = time.monotonic()
                yield encode(new)
            elif time.monotonic() - quiet_since >= KEEPALIVE:
                quiet_since = time.monotonic()
                yield b"\n"

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


DASHBOARD = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ENV}} · logs</title>
<style>
  :root { --fg: #1f2328; --muted: #656d76; --rule: #d8dee4; --soft: #f6f8fa; --accent: #0969da; --err: #b42318; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); }
  header { display: flex; align-items: baseline; gap: 1rem; padding: .7rem 1rem; border-bottom: 1px solid var(--rule); }
  h1 { margin: 0; font-size: 1.05rem; font-weight: 600; }
  #status { color: var(--muted); font-size: .85rem; }
  form { position: sticky; top: 0; z-index: 1; display: flex; flex-wrap: wrap; gap: .6rem; align-items: flex-end;
         padding: .6rem 1rem; background: var(--soft); border-bottom: 1px solid var(--rule); }
  label { display: flex; flex-direction: column; gap: .15rem; font-size: .75rem; color: var(--muted); }
  input, select, button { font: inherit; padding: .3rem .5rem; border: 1px solid var(--rule); border-radius: 6px;
                          background: #fff; }
  button { background: var(--accent); border-color: var(--accent); color: #fff; cursor: pointer; }
  label.tail { flex-direction: row; align-items: center; gap: .35rem; font-size: .9rem; color: var(--fg);
               padding-bottom: .35rem; }
  table { width: 100%; border-collapse: collapse;
          font: 12.5px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
  th { text-align: left; font: 600 .75rem system-ui, sans-serif; color: var(--muted); padding: .35rem .6rem;
       border-bottom: 1px solid var(--rule); }
  td { padding: .15rem .6rem; border-bottom: 1px solid #eef1f4; vertical-align: top; white-space: nowrap; }
  td.line { width: 100%; white-space: pre-wrap; word-break: break-word; }
  tr.stderr td.line { color: var(--err); }
  tr.event td { background: #eef6ff; }
  td.time, td.job { color: var(--muted); }
  #empty { padding: 2rem 1rem; color: var(--muted); }
</style>
</head>
<body>
<header><h1>Logs of {{ENV}}</h1><span id="status"></span></header>
<form id="filters">
  <label>Service <input name="service" placeholder="any" size="14"></label>
  <label>Job <input name="job" placeholder="any" size="12"></label>
  <label>Since
    <select name="since">
      <option value="300">5 minutes</option><option value="3600" selected>1 hour</option>
      <option value="86400">1 day</option><option value="604800">7 days</option><option value="">all kept</option>
    </select></label>
  <label>Text <input name="grep" placeholder="substring, case-sensitive" size="28"></label>
  <label>Lines
    <select name="limit"><option>100</option><option selected>1000</option><option>10000</option></select></label>
  <button type="submit">Show</button>
  <label class="tail"><input type="checkbox" id="tail"> live tail</label>
</form>
<table>
  <thead><tr><th>Time (UTC)</th><th>Service</th><th>Job</th><th>Line</th></tr></thead>
  <tbody id="rows"></tbody>
</table>
<div id="empty" hidden>No lines match.</div>
<script>
"use strict";
const form = document.getElementById("filters"), rows = document.getElementById("rows");
const statusLine = document.getElementById("status"), tail = document.getElementById("tail");
const empty = document.getElementById("empty");
const MAX_ROWS = 20000;
let stream = null;  // the AbortController of the live tail

function query(follow) {
  const p = new URLSearchParams();
  for (const name of ["service", "job", "grep", "limit"]) {
    const value = form.elements[name].value.trim();
    if (value) p.set(name, value);
  }
  const since = form.elements.since.value;
  if (since) p.set("since", String(Date.now() / 1000 - Number(since)));
  if (follow) p.set("follow", "1");
  return "/api/logs?" + p.toString();
}

function say(text) { statusLine.textContent = text; }

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;  // text only: nothing from a log is ever parsed as HTML
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function add(line) {
  const row = document.createElement("tr");
  row.className = line.kind === "event" ? "event" : line.stream;
  cell(row, line.time.replace("T", " ").replace("Z", ""), "time").title =
    [line.time, line.kind, line.host && "host " + line.host, line.release && "release " + line.release]
      .filter(Boolean).join(" · ");
  cell(row, line.service);
  cell(row, line.job, "job");
  cell(row, line.line, "line");
  rows.appendChild(row);
  while (rows.childElementCount > MAX_ROWS) rows.firstElementChild.remove();
  empty.hidden = true;
}

function atBottom() { return window.innerHeight + window.scrollY >= document.body.scrollHeight - 60; }

async function failure(response) {
  try { return (await response.json()).error || response.statusText; } catch (e) { return response.statusText; }
}

function stop() { if (stream) { stream.abort(); stream = null; } }

async function show() {
  stop();
  say("loading…");
  try {
    const response = await fetch(query(false), {credentials: "same-origin"});
    if (!response.ok) { say(await failure(response)); return; }
    const body = await response.json();
    rows.replaceChildren();
    body.lines.forEach(add);
    empty.hidden = body.lines.length > 0;
    say(body.lines.length + (body.lines.length === 1 ? " line" : " lines"));
    window.scrollTo(0, document.body.scrollHeight);
  } catch (e) { say("failed: " + e.message); }
}

async function follow() {
  stop();
  const mine = stream = new AbortController();
  rows.replaceChildren();
  say("live tail: connecting…");
  try {
    const response = await fetch(query(true), {credentials: "same-origin", signal: mine.signal});
    if (!response.ok) { say(await failure(response)); tail.checked = false; return; }
    say("live tail");
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let pending = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      pending += decoder.decode(value, {stream: true});
      const parts = pending.split("\\n");
      pending = parts.pop();
      const follow = atBottom();
      for (const part of parts) if (part.trim()) add(JSON.parse(part));
      if (follow) window.scrollTo(0, document.body.scrollHeight);
    }
    if (stream === mine) { say("live tail ended"); tail.checked = false; stream = null; }
  } catch (e) {
    if (e.name !== "AbortError" && stream === mine) {
      say("live tail failed: " + e.message); tail.checked = false; stream = null;
    }
  }
}

form.addEventListener("submit", (event) => { event.preventDefault(); tail.checked ? follow() : show(); });
tail.addEventListener("change", () => { if (tail.checked) follow(); else { stop(); say("live tail paused"); } });
show();
</script>
</body>
</html>
"""


def serve(settings: Settings) -> None:
    init_db(settings.db)
    server = LogServer(settings)
    threading.Thread(target=retention_loop, args=(settings, server.stopping), name="retention", daemon=True).start()
    _stderr(f"serving the logs of {settings.env or '?'} on port {settings.port}")
    server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else "serve"
    try:
        if command == "init":
            init_db(Settings.from_environ(os.environ).db)
        elif command == "serve":
            serve(Settings.from_environ(os.environ))
        elif command == "ingest":
            path = db_path(os.environ)
            init_db(path)
            with closing(connect(path)) as conn:
                # short waits for the lock, each followed by a keepalive: omprog's confirmTimeout
                conn.execute("PRAGMA busy_timeout = 5000")
                ingest(conn, sys.stdin.buffer, _reply_on_stdout)
        else:
            _stderr(f"unknown command {command!r}: init, ingest or serve")
            return 2
    except ValueError as exc:  # the settings
        _stderr(str(exc))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
