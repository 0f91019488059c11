"""The one allocator of unique things: cluster names, network ids, IP and MAC addresses.

It proposes candidates from the local replica and claims them, all or nothing, through a
:class:`~vmwebd.lease.table.LeaseTable`. When a candidate turns out to be taken (someone else won
it meanwhile), it retries with other candidates, at most ``max_rounds`` times: the bound is visible
and a test reaches it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twisted.internet import defer

from vmwebd.config import IpPool, MacPool, VniRange
from vmwebd.errors import InvalidArgument, NameTaken, PoolExhausted, ServerError
from vmwebd.lease.capacity import Ledger, is_capacity_key
from vmwebd.lease.pools import (
    ip_candidates,
    ip_key,
    mac_candidates,
    mac_key,
    name_key,
    vni_candidates,
    vni_key,
)
from vmwebd.lease.table import LeaseConflict, LeaseTable


@dataclass(frozen=True)
class VmAddress:
    ip: str
    mac: str


class AllocationContended(ServerError):
    faultcode = "Server.AllocationContended"


def vm_holder(vm_id: str, token: str) -> str:
    """The holder of a VM's addresses: the VM, in the creation of its cluster named by ``token``
    (a cluster made again under the same name has another token, so old leases never pass as
    the new cluster's)."""
    return f"vm:{vm_id}#{token}"


def cluster_holder(name: str, token: str) -> str:
    return f"vcluster:{name}#{token}"


def parse_holder(holder: str) -> tuple[str, str, str]:
    """``vm:lab1/pc0#1a2b`` → ``("vm", "lab1/pc0", "1a2b")``."""
    kind, _, rest = holder.partition(":")
    ref, _, token = rest.rpartition("#")
    return kind, ref, token


class Allocator:
    def __init__(
        self,
        table: LeaseTable,
        ip_pools: dict[str, IpPool],
        mac_pool: MacPool,
        vni_pool: VniRange,
        rng: random.Random,
        max_rounds: int = 8,
        lane: Callable[[], tuple[int, int]] | None = None,
        hosts: Callable[[], Iterable[str]] | None = None,
    ):
        self.table = table
        self.ip_pools = ip_pools
        self.mac_pool = mac_pool
        self.vni_pool = vni_pool
        self.rng = rng
        self.max_rounds = max_rounds
        # Keys this host is claiming right now: concurrent requests here must not pick the same
        # candidates (they could not share a round, and the later one would lose to the first).
        self._claiming: set[str] = set()
        #: (this host's place among the consensus members, how many): candidates come from this
        #: host's lane of each pool (every m-th address, network id) while it has free ones, so
        #: hosts allocating at the same moment never race for the same lowest free values.
        self.lane = lane or (lambda: (0, 1))
        #: Capacity and quota sets (:mod:`vmwebd.lease.capacity`), changed in the same
        #: operations as the addresses.
        self.ledger = Ledger(table.holder)
        #: The grid's hosts (whose capacity sets a VM may be in); the node gives its view.
        self.hosts = hosts or (lambda: ())

    def _taken(self, key: str) -> bool:
        return key in self._claiming or self.table.holder(key) is not None

    def pool(self, name: str) -> IpPool:
        """The address pool ``name`` (InvalidArgument naming the pool when there is none)."""
        return self._pool(name)

    def _pool(self, name: str) -> IpPool:
        try:
            return self.ip_pools[name]
        except KeyError:
            raise InvalidArgument("pool", f"no address pool named {name!r}") from None

    @defer.inlineCallbacks
    def allocate_cluster(self, name: str, token: str, vm_ids: list[str], pool: str, reserve=None):
        """Leases the cluster's name, a network id and one address pair per VM; with
        ``reserve(change) -> ops`` (which places the VMs on a :class:`~vmwebd.lease.capacity.
        Change` and returns its compare-and-set), their capacity and quota in the same
        operation, placed again from the values found whenever a counter moved meanwhile.

        Returns ``(vni, {vm_id: VmAddress})``; fails with NameTaken, PoolExhausted, NoCapacity or
        QuotaExceeded, having leased nothing.
        """
        result = yield self._allocate(vm_ids, pool, token, cluster=name, reserve=reserve)
        return result

    @defer.inlineCallbacks
    def allocate_vms(self, vm_ids: list[str], pool: str, token: str, reserve=None):
        """Leases one address pair per new VM of an existing cluster: ``{vm_id: VmAddress}``."""
        _, addrs = yield self._allocate(vm_ids, pool, token, cluster=None, reserve=reserve)
        return addrs

    @defer.inlineCallbacks
    def transact(self, build, max_rounds: int | None = None):
        """Runs one consensus operation ``build(change) -> {key: (expected, new)}`` (the change's
        own compare-and-set included), built again from the values found while a capacity set
        conflicts; another key's conflict fails it (LeaseConflict). ``build`` returning None
        means there is nothing to do. Fires with the operation decided (or None)."""
        view: dict = {}
        for _ in range(max_rounds or 2 * self.max_rounds):
            change = self.ledger.change(view)
            ops = build(change)
            if not ops:
                return None
            self.ledger.begin(ops)
            try:
                yield self.table.cas(ops)
            except LeaseConflict as c:
                if not is_capacity_key(c.key):
                    raise
                if change.applied(c.seen):
                    return ops  # it was decided; a set moved on since
                view = dict(c.seen)
                continue
            finally:
                self.ledger.end(ops)
            return ops
        raise AllocationContended(
            f"capacity sets kept moving: gave up after {max_rounds or 2 * self.max_rounds} rounds"
        )

    @defer.inlineCallbacks
    def _allocate(self, vm_ids, pool_name, token, cluster, reserve=None):
        pool = self._pool(pool_name)
        bad_ips: set[str] = set()
        bad_macs: set[str] = set()
        bad_vnis: set[int] = set()
        lane = self.lane()
        view: dict = {}
        rounds = self.max_rounds * (2 if reserve else 1)
        for _round in range(rounds):
            # Placed (and checked against capacity and quota) first: a full grid fails before
            # any address is drawn.
            change = self.ledger.change(view)
            held = reserve(change) if reserve else {}
            claims: dict[str, str] = {}
            vni = None
            if cluster is not None:
                claims[name_key("vcluster", cluster)] = cluster_holder(cluster, token)
                # After a conflict, draw among more free candidates: hosts racing for the lowest
                # free values at the same moment would otherwise keep colliding.
                spread = 8 * _round
                vnis = vni_candidates(
                    self.vni_pool,
                    self._taken,
                    1,
                    exclude=bad_vnis,
                    rng=self.rng if _round else None,
                    spread=spread,
                    lane=lane,
                )
                if not vnis:
                    raise PoolExhausted("vni", 1, 0)
                vni = vnis[0]
                claims[vni_key(vni)] = cluster_holder(cluster, token)
            ips = ip_candidates(
                pool,
                self._taken,
                len(vm_ids),
                exclude=bad_ips,
                rng=self.rng if _round else None,
                spread=8 * _round,
                lane=lane,
            )
            if len(ips) < len(vm_ids):
                raise PoolExhausted(pool_name, len(vm_ids), len(ips))
            macs = mac_candidates(self.mac_pool, self._taken, len(vm_ids), self.rng, exclude=bad_macs)
            if len(macs) < len(vm_ids):
                raise PoolExhausted("mac", len(vm_ids), len(macs))
            addrs = {}
            for vm_id, ip, mac in zip(vm_ids, ips, macs):
                claims[ip_key(pool_name, ip)] = vm_holder(vm_id, token)
                claims[mac_key(mac)] = vm_holder(vm_id, token)
                addrs[vm_id] = VmAddress(ip, mac)
            mine = set(claims) - self._claiming
            self._claiming |= mine
            ops = {k: (None, h) for k, h in claims.items()}
            ops.update(held)
            self.ledger.begin(held)
            try:
                yield self.table.cas(ops) if held else self.table.acquire(claims)
            except LeaseConflict as c:
                if is_capacity_key(c.key):
                    if change.applied(c.seen):
                        return vni, addrs  # decided after all; a set moved on since
                    # A set moved (another placement decided meanwhile): place again from the
                    # values the round found.
                    view = dict(c.seen)
                    continue
                if cluster is not None and c.key == name_key("vcluster", cluster):
                    raise NameTaken("virtual cluster", cluster) from None
                kind, _, rest = c.key.partition("/")
                if kind == "ip":
                    bad_ips.add(rest.split("/", 1)[1])
                elif kind == "mac":
                    bad_macs.add(rest)
                elif kind == "vni":
                    bad_vnis.add(int(rest))
                continue
            finally:
                self._claiming -= mine
                self.ledger.end(held)
            return vni, addrs
        raise AllocationContended(
            f"could not allocate addresses for {len(vm_ids)} VMs in pool {pool_name!r}: "
            f"candidates kept being taken, gave up after {rounds} rounds"
        )

    def vm_keys(self, vm, token: str) -> dict[str, str]:
        """Lease keys held by a VM (its IP and MAC), with their holder."""
        holder = vm_holder(vm.id, token)
        keys = [ip_key(p.name, vm.ip) for p in self.ip_pools.values() if vm.ip] + (
            [mac_key(vm.mac)] if vm.mac else []
        )
        return {k: holder for k in keys if self.table.holder(k) == holder}

    @defer.inlineCallbacks
    def release_vm(self, vm, token: str, hosts=None, owner: str | None = None):
        """Gives back a VM's addresses and its reservations (on ``hosts``, by default every host
        that holds one; and in ``owner``'s quota) in one operation; an address someone else
        holds now is left alone."""
        keys = self.vm_keys(vm, token)

        def build(change):
            ops = {k: (h, None) for k, h in keys.items()}
            where = hosts if hosts is not None else self.hosts()
            change.unreserve(vm.id, vm.token, where, owner)
            ops.update(change.ops())
            return ops

        for _ in range(len(keys) + 1):
            try:
                yield self.transact(build)
                return
            except LeaseConflict as c:
                keys.pop(c.key, None)  # not ours any more: not ours to give back

    def reserve_existing(self, vm, owner: str) -> defer.Deferred:
        """Records the reservation of a VM that has none on its host (made before reservations
        existed, or lost to a sweep): no limit is checked, the VM is already there."""

        def build(change):
            if vm.host in change.find(vm.id, [vm.host]):
                return None
            change.reserve(vm.id, vm.host, vm.vcpus, vm.memory_mib, owner, vm.token)
            return change.ops()

        return self.transact(build)

    def release_cluster(self, name: str, vni: int, token: str) -> defer.Deferred:
        holder = cluster_holder(name, token)
        return self.table.release({name_key("vcluster", name): holder, vni_key(vni): holder})
