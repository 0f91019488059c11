"""Making the cluster DOM durable, and the one place that orders "persist, then speak".

:class:`DomService` owns a :class:`~vmwebd.dom.document.Dom` and a
:class:`~vmwebd.dom.store.DurableStore`. Every change, local or merged from a peer, is applied in
memory on the reactor thread and appended to the journal on a dedicated single-thread pool (so
journal order equals change order); :meth:`DomService.commit` returns a Deferred that fires only
once the records are on disk. Callers acknowledge a request, or send a message that depends on a
change, only after that Deferred fires.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from lxml import etree
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from vmwebd.dom.document import Dom, entity_bytes, entity_from_bytes
from vmwebd.dom.hlc import HybridClock
from vmwebd.dom.records import Record
from vmwebd.dom.store import DurableStore

log = Logger()
#: How long a local write's acknowledgement waits for the peers it was pushed to (seconds). A
#: healthy peer answers within milliseconds; one that does not (frozen, overloaded, partitioned)
#: must not hold every request for the transport's timeout. What it misses reaches it later by
#: rumor or anti-entropy (docs/gossip.md, "Acknowledgement").
PUSH_WAIT_S = 0.5


def load_dom(directory: str | Path, clock: HybridClock, fsync: bool = True) -> tuple[Dom, DurableStore, int]:
    """Opens the store in ``directory`` and rebuilds the replica from snapshot + journal (blocking).

    Returns the replica, the open store and the number of journal records after the snapshot."""
    store = DurableStore(directory, fsync=fsync)
    snapshot, records = store.load()
    dom = Dom(clock)
    if snapshot is not None:
        dom.load_xml(snapshot, what=f"DOM snapshot in {directory}")
    for i, rec in enumerate(records):
        dom.merge(entity_from_bytes(rec, what=f"journal record {i} in {directory}"), validate=False)
    return dom, store, len(records)


class DomService:
    """The replica plus its durable store, driven from the reactor thread.

    The store's writes run in order on a thread of its own; or, given ``run_blocking`` (a
    :class:`vmwebd.wiring.BlockingRunner` that runs one call at a time in the order given, such as
    a test's inline runner on a ``task.Clock``), through that runner, ``reactor`` then being
    only a clock."""

    def __init__(
        self,
        dom: Dom,
        store: DurableStore,
        reactor: Any,
        compact_every: int = 4096,
        journal_records: int = 0,
        run_blocking: Callable[..., defer.Deferred[Any]] | None = None,
    ) -> None:
        # reactor: an IReactorTime that is also an IReactorFromThreads (the real one, or a test's)
        self.dom = dom
        self.store = store
        self.reactor = reactor
        self.compact_every = compact_every
        self._pool: ThreadPool | None = None
        if run_blocking is None:
            pool = self._pool = ThreadPool(minthreads=1, maxthreads=1, name="vmweb-dom-store")
            pool.start()

            def run_blocking(f: Callable[..., Any], /, *args: Any) -> defer.Deferred[Any]:
                return deferToThreadPool(reactor, pool, f, *args)

        self._run = run_blocking
        self._since_snapshot = journal_records
        self._waiters: list[list[Any]] = []  # [predicate, Deferred, timer]
        # fn(entities) after local writes are durable; may return a Deferred (the push round)
        self.on_local_commit: list[Callable[[list[etree._Element]], object]] = []
        self._waiter_check: Any = None  # an IDelayedCall
        dom.subscribe(self._check_waiters)
        self.push_wait = PUSH_WAIT_S
        self.push_rounds = 0  # local writes whose push an acknowledgement waited for
        self.push_waits_cut = 0  # ... of which the push was not answered within push_wait

    def commit(self, entities: Sequence[etree._Element | None]) -> defer.Deferred[None]:
        """Persists entity states already applied to the replica; fires when they are durable."""
        records = [entity_bytes(e) for e in entities if e is not None]
        if not records:
            return defer.succeed(None)
        self._since_snapshot += len(records)
        snapshot = None
        if self._since_snapshot >= self.compact_every:
            # Serialise now, on the reactor thread, so the snapshot matches the journal order.
            snapshot = self.dom.to_xml(pretty=False)
            self._since_snapshot = 0
        return self._run(self._write, records, snapshot)

    def _write(self, records: list[bytes], snapshot: bytes | None) -> None:
        self.store.append_many(records)
        if snapshot is not None:
            self.store.compact(snapshot)

    def put(self, *recs: Record) -> defer.Deferred[None]:
        """Writes records (see Dom.put) and fires when they are durable (and handed to gossip)."""
        return self.commit_local([self.dom.put(r) for r in recs])

    def delete(self, *keys: tuple[str, str]) -> defer.Deferred[None]:
        return self.commit_local([self.dom.delete(kind, id_) for kind, id_ in keys])

    def commit_local(
        self, entities: Iterable[etree._Element | None], wait_push: bool = True
    ) -> defer.Deferred[None]:
        """Persists local writes already applied to the replica, then hands them to gossip.

        Fires once they are durable here and (``wait_push``) their first push was answered, or
        after ``push_wait``; without ``wait_push`` as soon as they are durable here, the push
        going on behind (a record nobody waits on at the peers, such as an audit entry)."""
        written = [e for e in entities if e is not None]
        if not written:
            # Nothing changed (every write was already there): nothing to push. Such calls were
            # more than half of one host's push rounds while creating clusters.
            return self.commit(written)

        def spread(result: None) -> defer.Deferred[None] | None:
            # Only once durable: a peer never learns of a change we could still lose. The caller
            # (and so the user's acknowledgement) waits for the first push round to be answered,
            # but at most push_wait: an acknowledged change is on disk here, and at the peers it
            # was pushed to that answer promptly (never held up by one that does not).
            answers = [fn(written) for fn in list(self.on_local_commit)]
            ds = [d for d in answers if isinstance(d, defer.Deferred)]
            if not ds or not wait_push:
                return result
            return self._bounded(defer.DeferredList(ds, consumeErrors=True)).addCallback(lambda _: result)

        return self.commit(written).addCallback(spread)

    def _bounded(self, pushed: defer.Deferred[Any]) -> defer.Deferred[None]:
        """Fires when ``pushed`` does or ``push_wait`` seconds have passed, whichever is first;
        ``pushed`` itself goes on (its sends keep their own timeout)."""
        self.push_rounds += 1
        out: defer.Deferred[None] = defer.Deferred()

        def expire() -> None:
            self.push_waits_cut += 1
            log.debug("a push was not answered within {s} s; acknowledging without it", s=self.push_wait)
            out.callback(None)

        timer = self.reactor.callLater(self.push_wait, expire)

        def answered(_: object) -> None:
            if timer.active():
                timer.cancel()
                out.callback(None)

        pushed.addBoth(answered)
        return out

    def barrier(self) -> defer.Deferred[None]:
        """Fires once everything handed to the store before this call is on disk (the store's
        single thread runs in order)."""
        return self._run(lambda: None)

    def forget(self, keys: Iterable[tuple[str, str]]) -> defer.Deferred[int]:
        """Removes collected tombstones (vmwebd/dom/gc.py) and writes a snapshot without them; fires
        with how many went. Should the daemon stop before the snapshot is down, the journal brings
        the tombstones back at the next start, and they are collected again."""
        n = sum(1 for kind, id_ in keys if self.dom.forget(kind, id_))
        if not n:
            return defer.succeed(0)
        snapshot = self.dom.to_xml(pretty=False)
        self._since_snapshot = 0
        return self._run(self.store.compact, snapshot).addCallback(lambda _: n)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> defer.Deferred[bool]:
        """Fires True as soon as ``predicate()`` holds (re-checked after every change to the
        replica), or False after ``timeout`` seconds: every wait is bounded."""
        if predicate():
            return defer.succeed(True)
        d: defer.Deferred[bool] = defer.Deferred()
        entry: list[Any] = [predicate, d, None]

        def expire() -> None:
            if entry in self._waiters:
                self._waiters.remove(entry)
                d.callback(False)

        entry[2] = self.reactor.callLater(timeout, expire)
        self._waiters.append(entry)
        return d

    def _check_waiters(self, kind: str, id_: str) -> None:
        if self._waiters and (self._waiter_check is None or not self._waiter_check.active()):
            # Checked on the next turn: the change that woke us may be one of several in a commit.
            self._waiter_check = self.reactor.callLater(0, self._run_waiters)

    def _run_waiters(self) -> None:
        for entry in list(self._waiters):
            predicate, d, timer = entry
            if predicate():
                self._waiters.remove(entry)
                timer.cancel()
                d.callback(True)

    def close(self) -> None:
        for _, _d, timer in self._waiters:
            timer.cancel()
        self._waiters.clear()
        if self._pool is not None:
            self._pool.stop()
        self.store.close()
