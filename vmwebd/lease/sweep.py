"""Keeping the capacity and quota sets equal to what the DOM places, on every host.

The sets (:mod:`vmwebd.lease.capacity`) may hold more than what runs — an operation that failed
after some of its keys were decided, a migration abandoned without its end, a VM deleted by a
host that crashed before its release — and a VM made before reservations existed is in none.
Each host's reconciler, at its full pass, runs :class:`CapacitySweep`:

* **its own set** (``cap/<this host>``): entries whose VM is gone, is another creation (token),
  or is placed elsewhere with no migration from or to this host in flight are removed once they
  have been so for ``grace_s`` in a row (a create decides its reservations a moment before its
  VM records are written, and those may reach this replica later still); VMs the DOM places here
  that are in no entry are added (adopted: no limit is checked, they are there already);
* **owners' sets** (``quota/<owner>``): an entry whose VM is gone or another creation is removed
  after the same grace; a VM placed here missing from its owner's set is added.

Every change is a compare-and-set through the allocator's ledger; two hosts doing the same
removal are harmless (a removed entry is gone for both).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from vmwebd.dom.records import LeaseRec, VClusterRec, VmRec
from vmwebd.lease.capacity import QUOTA_PREFIX, Entry, cap_key, parse, quota_key

log = Logger()


class CapacitySweep:
    """``in_flight(now_ms)`` gives the migrations under way, by VM id."""

    def __init__(self, host_id: str, dom, allocator, now_ms, in_flight, grace_s: float = 300.0):
        self.host_id = host_id
        self.in_flight = in_flight
        self.dom = dom
        self.allocator = allocator
        self.now_ms = now_ms
        self.grace_s = grace_s
        self._stale_since: dict[tuple[str, Entry], int] = {}
        self.removed = 0
        self.adopted = 0

    def _stale(self, key: str, e: Entry, stale: bool, now: int) -> bool:
        """Has ``e`` of ``key`` been stale for the whole grace period?"""
        if not stale:
            self._stale_since.pop((key, e), None)
            return False
        since = self._stale_since.setdefault((key, e), now)
        return now - since >= self.grace_s * 1000

    def plan(self) -> tuple[dict[str, set], dict[str, set]]:
        """``(to remove, to add)``: entries per key, as this replica sees things now."""
        now = int(self.now_ms())
        flying = self.in_flight(now)
        remove: dict[str, set] = {}
        add: dict[str, set] = {}
        seen_keys = set()
        mine = cap_key(self.host_id)
        held = self._value(mine)
        for e in held:
            vm = self.dom.get(VmRec, e.vm)
            m = flying.get(e.vm)
            moving_here = m is not None and self.host_id in (m.source, m.dest)
            stale = (
                vm is None
                or (vm.token != e.token and not moving_here)
                or (vm.host != self.host_id and not moving_here)
            )
            seen_keys.add((mine, e))
            if self._stale(mine, e, stale, now):
                remove.setdefault(mine, set()).add(e)
        ids = {e.vm for e in held if e not in remove.get(mine, set())}
        for vm in self.dom.select(VmRec, "host", self.host_id):
            if vm.desired == "absent" or vm.id in ids:
                continue
            add.setdefault(mine, set()).add(Entry(vm.id, vm.token, vm.vcpus, vm.memory_mib))
        for key in self.dom.ids("lease"):
            if not key.startswith(QUOTA_PREFIX):
                continue
            for e in self._value(key):
                vm = self.dom.get(VmRec, e.vm)
                seen_keys.add((key, e))
                if self._stale(key, e, vm is None or vm.token != e.token, now):
                    remove.setdefault(key, set()).add(e)
        for vm in self.dom.select(VmRec, "host", self.host_id):
            c = self.dom.get(VClusterRec, vm.cluster)
            if vm.desired == "absent" or c is None:
                continue
            key = quota_key(c.owner)
            if Entry(vm.id, vm.token) not in self._value(key):
                add.setdefault(key, set()).add(Entry(vm.id, vm.token))
        for k in [k for k in self._stale_since if k not in seen_keys]:
            del self._stale_since[k]
        return remove, add

    def _value(self, key: str) -> frozenset:
        rec = self.dom.get(LeaseRec, key)
        return parse(rec.holder if rec else None)

    @defer.inlineCallbacks
    def run(self):
        """One sweep: at most one consensus operation per key that needs a change."""
        remove, add = self.plan()
        for key in sorted(set(remove) | set(add)):
            gone, new = remove.get(key, set()), add.get(key, set())

            def build(change, key=key, gone=gone, new=new):
                change.adjust(key, add=new, remove=gone)
                return change.ops()

            yield self.allocator.transact(build)
            self.removed += len(gone)
            self.adopted += len(new)
            log.info(
                "capacity set {key}: {r} entries of VMs not there removed, {a} VMs recorded",
                key=key,
                r=len(gone),
                a=len(new),
            )
            for e in gone:
                self._stale_since.pop((key, e), None)
