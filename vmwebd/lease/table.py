"""The lease table interface: all-or-nothing claims on unique keys.

The allocator talks to a :class:`LeaseTable`; the one implementation,
:class:`vmwebd.lease.service.PaxosLeaseTable`, decides every claim by Paxos among the member hosts
(a grid of one host is a Paxos group of one) and records decided leases in the DOM.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet import defer


class LeaseConflict(Exception):
    """A key is already held by someone else."""

    def __init__(self, key: str, holder: str, current: str | None = None, seen: dict | None = None):
        super().__init__(f"{key} is already leased to {holder}")
        self.key, self.holder = key, holder
        #: The key's decided value as the round saw it (None: free), and the values of every
        #: key of the operation: counters learn them to retry.
        self.current = current
        self.seen = seen or {}


class LeaseTable(Protocol):
    def holder(self, key: str) -> str | None:
        """The holder of ``key`` in the local replica (may lag behind the decided value)."""

    def acquire(self, claims: dict[str, str]) -> defer.Deferred:
        """Leases every key to its holder, or none of them (fails with LeaseConflict)."""

    def release(self, holders: dict[str, str]) -> defer.Deferred:
        """Gives keys back, each only if still held by the given holder (else a no-op for it)."""

    def cas(self, ops: dict[str, tuple[str | None, str | None]]) -> defer.Deferred:
        """Sets every key from its expected value to its new one (None: free), all or none;
        fails with LeaseConflict (``current`` = the value found) when a key holds another."""
