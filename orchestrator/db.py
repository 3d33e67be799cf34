"""The catalogue's engine: SQLite (default) or PostgreSQL, schema made on first use."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic_core import PydanticUndefined
from sqlalchemy import Enum as SAEnum
from sqlalchemy import Table, Update, event, insert, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session, SQLModel, create_engine

from orchestrator import models  # noqa: F401  (registers the tables)


def normalise_url(url: str) -> str:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engines(url: str) -> tuple[Engine, Engine]:
    """(writer, reader) engines with the schema in place. On SQLite (WAL mode) the writer begins
    every transaction IMMEDIATE, so the CLI, the nodes and the API write to one file without
    "database is locked"; the reader takes no write lock, so reads run beside the one writer.
    Elsewhere both are one engine."""
    url = normalise_url(url)
    writer = _engine(url, immediate=True)
    reader = _engine(url, immediate=False) if url.startswith("sqlite") else writer
    if not _schema_current(reader):
        SQLModel.metadata.create_all(writer)
        add_missing_columns(writer)
    return writer, reader


def make_engine(url: str) -> Engine:
    return make_engines(url)[0]


def _engine(url: str, *, immediate: bool) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    path = url.split("///", 1)[-1]
    if path and path != ":memory:":
        _private_file(Path(path))
    # A node runs its step threads, its heartbeat and its watcher on one pool: room for them all.
    connect_args: dict[str, Any] = {"check_same_thread": False, "timeout": 60}
    if immediate and path and path != ":memory:":
        connect_args["factory"] = TurnTaking
    engine = create_engine(url, connect_args=connect_args, pool_size=20, max_overflow=20, pool_timeout=60)
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "handle_error", _sqlite_error)
    if immediate:
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def _private_file(path: Path) -> None:
    """The SQLite catalogue holds credentials: only its owner may read it. Made 0600 (SQLite
    gives its -wal and -shm files the same mode), and brought back to 0600 if it was opened up."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    for each in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if each.exists() and each.stat().st_mode & 0o077:
            each.chmod(0o600)


def _schema_current(engine: Engine) -> bool:
    """Every table, column and index there already: the common case, checked without a write
    lock, at every start of every process (on PostgreSQL, one query for all the tables' columns
    and one for their indexes)."""
    with engine.connect() as conn:
        inspector = inspect(conn)
        wanted = SQLModel.metadata.sorted_tables
        if not {t.name for t in wanted} <= set(inspector.get_table_names()):
            return False
        names = [t.name for t in wanted]
        columns = inspector.get_multi_columns(filter_names=names)
        indexes = inspector.get_multi_indexes(filter_names=names)
        for table in wanted:
            if not {c.name for c in table.columns} <= {c["name"] for c in columns[(None, table.name)]}:
                return False
            if not {i.name for i in table.indexes} <= {i["name"] for i in indexes[(None, table.name)]}:
                return False
        if _missing_enum_values(conn):
            return False
    return True


def _missing_enum_values(conn: Any) -> list[tuple[str, str]]:
    """PostgreSQL keeps enum columns as types of their own: (type, label) for every label the
    models have and the database's type lacks (new operation kinds, step actions, ...)."""
    if conn.dialect.name != "postgresql":
        return []
    wanted: dict[str, list[str]] = {}
    for table in SQLModel.metadata.sorted_tables:
        for column in table.columns:
            name = getattr(column.type, "name", None)
            if isinstance(column.type, SAEnum) and name:
                wanted.setdefault(name, list(column.type.enums))
    missing = []
    for name, labels in wanted.items():
        have = {row[0] for row in conn.exec_driver_sql(
            "SELECT e.enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid WHERE t.typname = %(n)s",
            {"n": name})}
        if have:  # a type not there yet is made by create_all, whole
            missing += [(name, label) for label in labels if label not in have]
    return missing


def _missing_indexes(inspector: Any, table: Any) -> list[Any]:
    """The table's indexes (by name) that the database does not have yet."""
    have = {i["name"] for i in inspector.get_indexes(table.name)}
    return [index for index in table.indexes if index.name not in have]


# What rows that were there before a column get, when its default is not what they are:
# operations older than logging are history, not events waiting to be written.
BACKFILL = {("operation", "logged"): 'UPDATE "operation" SET "logged" = 2'}


def add_missing_columns(engine: Engine) -> list[str]:
    """Bring an older catalogue up to the current tables: create_all makes missing tables, this
    adds missing columns (every column added since is nullable or has a default), then missing
    indexes. Additive only: nothing is dropped or rewritten. Returns what it added, as
    table.column, and as table.index for an index."""
    added = []
    with engine.begin() as conn:
        inspector = inspect(conn)  # on this connection: SQLite holds one writer at a time
        for table in SQLModel.metadata.sorted_tables:
            have = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in have:
                    continue
                kind = column.type.compile(dialect=engine.dialect)
                default = _default_sql(column)
                conn.exec_driver_sql(
                    f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}{default}'
                )
                if (table.name, column.name) in BACKFILL:
                    conn.exec_driver_sql(BACKFILL[table.name, column.name])
                added.append(f"{table.name}.{column.name}")
        for table in SQLModel.metadata.sorted_tables:  # their columns are all there now
            for index in _missing_indexes(inspect(conn), table):
                index.create(conn)
                added.append(f"{table.name}.{index.name}")
        for name, label in _missing_enum_values(conn):
            conn.exec_driver_sql(f"ALTER TYPE \"{name}\" ADD VALUE IF NOT EXISTS '{label}'")
            added.append(f"{name}.{label}")
    return added


def _default_sql(column: Any) -> str:
    """A literal DEFAULT for NOT NULL columns (the model field's default), so rows already there
    stay valid."""
    if column.nullable:
        return ""
    value = _model_default(column)
    if isinstance(value, bool):  # a boolean literal: PostgreSQL refuses 0/1 for a boolean
        return f" NOT NULL DEFAULT {'TRUE' if value else 'FALSE'}"
    if isinstance(value, int | float):
        return f" NOT NULL DEFAULT {value}"
    text = json.dumps(value) if isinstance(value, dict | list) else str(value or "")
    return " NOT NULL DEFAULT '" + text.replace("'", "''") + "'"


def _model_default(column: Any) -> Any:
    for model in _table_models():
        if getattr(model, "__table__", None) is column.table and column.name in model.model_fields:
            return model.model_fields[column.name].get_default(call_default_factory=True)
    return ""


def _table_models() -> list[type[SQLModel]]:
    found, todo = [], list(SQLModel.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if hasattr(cls, "__table__"):
            found.append(cls)
    return found
def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # let the "begin" listener issue BEGIN IMMEDIATE
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


# A connection opened while the file could not be written stays read-only for good: such errors
# drop the connection, so the next use opens a fresh one and works once the file is writable.
_STALE_CONNECTION = ("readonly database", "disk i/o error", "unable to open database")


def _sqlite_error(context: Any) -> None:
    if any(text in str(context.original_exception).lower() for text in _STALE_CONNECTION):
        context.is_disconnect = True


def _sqlite_begin(conn: Any) -> None:
    dbapi_conn = conn.connection.dbapi_connection
    if isinstance(dbapi_conn, TurnTaking):
        dbapi_conn.take_turn()
    try:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    except BaseException:
        if isinstance(dbapi_conn, TurnTaking):
            dbapi_conn.end_turn()
        raise


_holders: set[int] = set()  # the threads that hold a turn (on one of their connections)


class TurnTaking(sqlite3.Connection):
    """A writer connection that waits for its turn at the catalogue on a lock file beside it
    (``flock``), held from its BEGIN IMMEDIATE to its commit or rollback.

    SQLite's own wait for its write lock (``busy_timeout``) sleeps and tries again, its sleeps
    growing to 25-100 ms, whether or not the lock came free meanwhile: with the control worker,
    the nodes and the CLI writing short transactions at once, writers slept while the lock lay
    free (the control worker's redeploys spent 80% of their wall time in BEGIN IMMEDIATE, the
    machine 40% idle). ``flock`` wakes a waiter as the lock is let go. Every process of the
    platform writes through this; any other writer still meets SQLite's lock, and waits as
    before. A thread that holds a turn on another connection (a transaction opened inside
    another, a mistake) does not wait for itself here: SQLite's lock makes it fail as before."""

    def __init__(self, database: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(database, *args, **kwargs)
        try:
            self._turn_fd = os.open(f"{database}-turn", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:  # (a directory it may not write in): SQLite's own lock alone, as before
            self._turn_fd = -1
        self._holder: int | None = None  # the thread that took the turn (ends it, or another)

    def take_turn(self) -> None:
        me = threading.get_ident()
        if me in _holders or self._turn_fd < 0:  # its turn is on another connection: no waiting for itself
            return
        fcntl.flock(self._turn_fd, fcntl.LOCK_EX)  # (lets go of the GIL while it waits)
        self._holder = me
        _holders.add(me)

    def end_turn(self) -> None:
        if self._holder is not None:
            _holders.discard(self._holder)
            self._holder = None
            fcntl.flock(self._turn_fd, fcntl.LOCK_UN)

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self.end_turn()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self.end_turn()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.end_turn()
            if self._turn_fd >= 0:
                os.close(self._turn_fd)
                self._turn_fd = -1


def session(engine: Engine) -> Session:
    return Session(engine, expire_on_commit=False)


def table(model: type[SQLModel]) -> Table:
    """A model's table, for statements built once with bound names (``update_rows``): Core on
    the table, none of the ORM's work per execution."""
    found = model.__table__  # type: ignore[attr-defined]
    assert isinstance(found, Table)
    return found


def insert_rows(session: Session, model: type[SQLModel], rows: Sequence[dict[str, Any]]) -> None:
    """New rows of ``model`` in one plain INSERT of many rows: each row's values, and for the
    fields it leaves out their defaults, as making the model would (a factory called, a primary
    key left unset to the database). No row object is made: building one costs a model 50-70 µs
    of pydantic and SQLAlchemy bookkeeping, and the unit of work more at its flush."""
    if not rows:
        return
    defaults: dict[str, Any] = {}
    factories: dict[str, Callable[[], Any]] = {}
    key = {column.name for column in table(model).primary_key.columns}
    for name, field in model.model_fields.items():
        if field.default_factory is not None:
            factories[name] = field.default_factory  # type: ignore[assignment]
        elif field.default is not PydanticUndefined and not (name in key and field.default is None):
            defaults[name] = field.default
    session.flush()
    session.connection().execute(insert(table(model)), [
        {**defaults, **{name: make() for name, make in factories.items() if name not in row}, **row}
        for row in rows])


def update_rows(session: Session, statement: Update, where: dict[str, Any], model: type[SQLModel], ident: Any,
                values: dict[str, Any]) -> int:
    """Run an UPDATE of ``model``'s row ``ident`` as plain SQL: ``statement`` is built once, on
    the table (its WHERE's values bound by name, given in ``where``; names that are no column's),
    and sets the columns ``values`` names: compiled once per set of columns, no statement built
    and no cache key made per call. The rows it changed. The ORM's own bulk UPDATE also brings
    every loaded object it may match up to date in Python, by evaluating its WHERE against each
    one in the session (a node's shared transaction holds many: that was a quarter of a node's
    CPU per step); here only the session's copy of that one row, if it holds it, gets ``values``
    (as loaded, not as changes to write; not expired: another work of a shared transaction may
    read its copy once the session closed). Pending changes are flushed first, as the ORM's
    autoflush would."""
    session.flush()
    changed = session.connection().execute(statement, {**where, **values}).rowcount
    if changed:
        loaded = session.identity_map.get(session.identity_key(model, ident))
        if loaded is not None:
            for name, value in values.items():
                set_committed_value(loaded, name, value)
    return int(changed)
