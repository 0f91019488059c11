"""Runners for blocking work (file writes, fsyncs, store loads), as :class:`vmwebd.wiring.BlockingRunner`.

A service never calls the thread-pool functions of Twisted itself: it is given a runner, so the
same service runs in production with its blocking work on a thread pool (never on the reactor
thread) and in a test on a ``task.Clock`` with the work done at once on the test's thread
(:class:`InlineRunner`), where no real thread or time is needed to drive it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool


class ThreadPoolRunner:
    """Runs ``f(*args, **kw)`` on a thread pool and fires on the reactor thread with its result.

    Over ``reactor``'s shared pool by default (what ``threads.deferToThread`` uses), or over a
    dedicated pool (:meth:`dedicated`: one thread, so calls run in the order they were made, as
    a store's appends must); only a dedicated pool is started and stopped by :meth:`start` and
    :meth:`stop` (the reactor owns its own)."""

    def __init__(self, reactor: Any, pool: ThreadPool | None = None) -> None:
        self.reactor = reactor
        self.pool = pool

    @classmethod
    def dedicated(cls, reactor: Any, name: str) -> ThreadPoolRunner:
        """A runner over a pool of one thread of its own, named ``name`` (started by :meth:`start`)."""
        return cls(reactor, ThreadPool(minthreads=1, maxthreads=1, name=name))

    def __call__(self, f: Callable[..., Any], /, *args: Any, **kw: Any) -> defer.Deferred[Any]:
        pool = self.pool if self.pool is not None else self.reactor.getThreadPool()
        return deferToThreadPool(self.reactor, pool, f, *args, **kw)

    def start(self) -> None:
        if self.pool is not None and not self.pool.started:
            self.pool.start()

    def stop(self) -> None:
        if self.pool is not None and self.pool.started:
            self.pool.stop()

    def __repr__(self) -> str:
        return f"<ThreadPoolRunner {self.pool.name if self.pool is not None else 'reactor pool'}>"


class InlineRunner:
    """Runs ``f(*args, **kw)`` at once on the caller's thread; returns an already-fired Deferred
    (with its result, or its exception as a failure). For tests on a ``task.Clock``: the work
    is done before the call returns, so the test only advances the clock. Never for production:
    there the caller is the reactor thread, which blocking work must not hold."""

    def __init__(self) -> None:
        self.calls = 0  # how many calls it ran

    def __call__(self, f: Callable[..., Any], /, *args: Any, **kw: Any) -> defer.Deferred[Any]:
        self.calls += 1
        return defer.maybeDeferred(f, *args, **kw)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def __repr__(self) -> str:
        return "<InlineRunner>"


__all__ = ["ThreadPoolRunner", "InlineRunner"]
