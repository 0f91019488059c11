"""Twisted services for the parts of a node that are not services themselves.

:class:`vmwebd.node.Node` is a ``MultiService`` of these: :class:`Part` runs a start and a stop
callable, :class:`Loop` calls a function every few seconds on a given clock and :class:`Paused`
is a listening port bound early (its address is needed to build other parts) that accepts
connections once started. Unlike ``MultiService``, the node starts and stops its parts one after
the other, waiting for a part whose start or stop returns a Deferred (see
:meth:`vmwebd.node.Node.startService`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task


class Part(Service):
    """A service whose start and stop are ``start()`` and ``stop()`` (either may be left out, and
    either may return a Deferred, returned by ``startService`` / ``stopService``)."""

    def __init__(
        self, name: str, start: Callable[[], Any] | None = None, stop: Callable[[], Any] | None = None
    ):
        self.name = name
        self._start, self._stop = start, stop

    def startService(self) -> defer.Deferred[Any] | None:
        Service.startService(self)
        return defer.maybeDeferred(self._start) if self._start is not None else None

    def stopService(self) -> defer.Deferred[Any]:
        Service.stopService(self)
        return defer.maybeDeferred(self._stop) if self._stop is not None else defer.succeed(None)


class Loop(Service):
    """Calls ``fn`` every ``interval`` seconds of ``clock``, the first time one interval after it
    starts; with ``first``, ``fn`` runs once at start and the start waits for it (a failure then
    fails the start). A call under way when the loop stops is not waited for."""

    def __init__(self, name: str, fn: Callable[[], Any], interval: float, clock: Any, first: bool = False):
        self.name = name
        self.fn, self.interval, self.first = fn, interval, first
        self._loop = task.LoopingCall(fn)
        # LoopingCall takes its clock this way (Twisted's API; it has no constructor argument).
        self._loop.clock = clock

    def startService(self) -> defer.Deferred[Any] | None:
        Service.startService(self)
        if not self.first:
            self._loop.start(self.interval, now=False)
            return None

        def loop(result: Any) -> Any:
            if self.running:
                self._loop.start(self.interval, now=False)
            return result

        return defer.maybeDeferred(self.fn).addCallback(loop)

    def stopService(self) -> None:
        Service.stopService(self)
        if self._loop.running:
            self._loop.stop()


class Paused(Service):
    """A listening ``port`` bound before the parts it serves were built (its address goes into
    them): it takes no connection until started (the kernel queues them meanwhile), and stops
    listening when stopped, or when never started, on :meth:`close`."""

    def __init__(self, name: str, port: Any):
        self.name = name
        self.port = port
        port.stopReading()

    def startService(self) -> None:
        Service.startService(self)
        self.port.startReading()

    def stopService(self) -> defer.Deferred[Any]:
        Service.stopService(self)
        return self.close()

    def close(self) -> defer.Deferred[Any]:
        return defer.maybeDeferred(self.port.stopListening)


__all__ = ["Part", "Loop", "Paused"]
