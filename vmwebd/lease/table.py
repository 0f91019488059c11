"""The lease table: all-or-nothing claims on unique keys, recorded as lease entities in the DOM.

:class:`LeaseTable` is the interface the allocator uses. :class:`LocalLeaseTable` decides on the
local replica alone, serialising the claims made at this host; it is correct on one host. The
consensus-lease issue replaces it with a Paxos-backed table behind the same interface, so that
claims made at two hosts at once can never both win.
"""
from __future__ import annotations

from typing import Protocol

from twisted.internet import defer

from vmwebd.dom.records import LeaseRec


class LeaseConflict(Exception):
    """A key is already held by someone else."""

    def __init__(self, key: str, holder: str):
        super().__init__(f"{key} is already leased to {holder}")
        self.key, self.holder = key, holder


class LeaseTable(Protocol):
    def holder(self, key: str) -> str | None:
        """The holder of ``key`` in the local replica (may lag behind the decided value)."""

    def acquire(self, claims: dict[str, str]) -> defer.Deferred:
        """Leases every key to its holder, or none of them (fails with LeaseConflict)."""

    def release(self, keys: list[str]) -> defer.Deferred:
        """Gives keys back; releasing a key that is not held is a no-op."""


class LocalLeaseTable:
    """Leases decided on this host's replica, one claim at a time."""

    def __init__(self, domsvc, now_ms):
        self.domsvc = domsvc
        self.now_ms = now_ms
        self._lock = defer.DeferredLock()

    def holder(self, key: str) -> str | None:
        rec = self.domsvc.dom.get(LeaseRec, key)
        return rec.holder if rec else None

    def acquire(self, claims: dict[str, str]) -> defer.Deferred:
        return self._lock.run(self._acquire, claims)

    def _acquire(self, claims):
        for key, holder in claims.items():
            cur = self.holder(key)
            if cur is not None and cur != holder:
                return defer.fail(LeaseConflict(key, cur))
        now = int(self.now_ms())
        return self.domsvc.put(*[LeaseRec(id=k, holder=h, granted_at=now) for k, h in claims.items()])

    def release(self, keys: list[str]) -> defer.Deferred:
        return self._lock.run(lambda: self.domsvc.delete(*[("lease", k) for k in keys]))
