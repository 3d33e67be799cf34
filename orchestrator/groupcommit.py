"""Short write transactions of one process's threads, committed together: one transaction (one
write lock, one commit) for whatever is waiting, instead of one each.

A node process runs many step tasks at once (and a simulated fleet, many hosts' heartbeats);
each begins and ends its steps in a short transaction. On SQLite, whose one writer serialises
them, each transaction is a wait for the lock and a commit; on PostgreSQL, a round trip and a
commit. ``GroupCommit.run(work)`` gives ``work`` a session and returns what it returns, as a
transaction of its own would, but the works that arrive while one transaction runs go together in
the next (leader and followers: the first waiting thread runs the lot, nobody sleeps to wait for
company, so one alone pays nothing). If the catalogue fails (an SQLAlchemy error: locked, gone,
a commit that may or may not have landed), every work of the transaction gets that error, as
it would have alone; if a work itself raises anything else, each work is run again alone, so that
failure is its own. A work must therefore only touch the catalogue through its session (it may
run twice, the first time rolled back), may run in another thread than its caller's, and must
never call ``run`` itself (it would wait for its own transaction). Works of one transaction share
its session: an object one loaded is the one a later one gets (its state as of that load, or
as that transaction's own updates left it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Waiting(Generic[T]):
    def __init__(self, work: Callable[[Session], T]) -> None:
        self.work = work
        self.woken = threading.Event()
        self.lead = False  # woken to run the next transaction, not with its result
        self.result: T | None = None
        self.error: BaseException | None = None
        self.done = False

    def set(self, result: T | None = None, error: BaseException | None = None) -> None:
        self.result, self.error, self.done = result, error, True

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class GroupCommit:
    def __init__(self, open_session: Callable[[], Session], most: int = 64) -> None:
        self.open_session = open_session
        self.most = most  # works in one transaction at most (a long one holds the lock long)
        self._lock = threading.Lock()
        self._queue: list[_Waiting[Any]] = []
        self._leading = False
        self.transactions = 0  # how many it committed (or tried), for tests and benchmarks
        self.works = 0

    def run(self, work: Callable[[Session], T]) -> T:
        """``work(session)`` committed, in a transaction shared with whoever waits meanwhile."""
        me: _Waiting[T] = _Waiting(work)
        with self._lock:
            self._queue.append(me)
            lead = not self._leading
            self._leading = True
        if not lead:
            try:
                me.woken.wait()
            except BaseException:  # interrupted while waiting: out of the queue, and the lead passed on
                self._leave(me)
                raise
            if not me.lead:
                return me.outcome()
        with self._lock:
            batch, self._queue = self._queue[:self.most], self._queue[self.most:]
        try:
            self._commit(batch)
        finally:
            with self._lock:
                if self._queue:  # the next waiting thread runs the next transaction
                    self._queue[0].lead = True
                    self._queue[0].woken.set()
                else:
                    self._leading = False
        return me.outcome()

    def _leave(self, me: _Waiting[Any]) -> None:
        with self._lock:
            if me in self._queue:
                self._queue.remove(me)
            if me.lead:  # it was handed the next transaction: hand it on
                if self._queue:
                    self._queue[0].lead = True
                    self._queue[0].woken.set()
                else:
                    self._leading = False

    def _commit(self, batch: list[_Waiting[Any]]) -> None:
        self.transactions += 1
        self.works += len(batch)
        try:
            with self.open_session() as s:
                results = [w.work(s) for w in batch]
                s.commit()
        except SQLAlchemyError as exc:
            # The catalogue's failure (locked, gone, a commit that may or may not have landed):
            # everyone's, as it would have been in transactions of their own; each caller
            # handles it as it would have (a step task asks again later).
            for w in batch:
                w.set(error=exc)
        except Exception as exc:
            if len(batch) == 1:
                batch[0].set(error=exc)
            else:  # a work's own failure (a bug) must not be the others': each alone
                log.warning("a shared transaction of %d works failed (%s): each alone", len(batch), exc)
                for w in batch:
                    self._alone(w)
        else:
            for w, result in zip(batch, results, strict=True):
                w.set(result)
        finally:
            for w in batch:
                if not w.done:  # interrupted (a BaseException): nobody may take that for a result
                    w.set(error=RuntimeError("the catalogue transaction was interrupted"))
                w.woken.set()

    def _alone(self, w: _Waiting[Any]) -> None:
        self.transactions += 1
        try:
            with self.open_session() as s:
                result = w.work(s)
                s.commit()
        except Exception as exc:
            w.set(error=exc)
        else:
            w.set(result)
