"""The allocator's retry loop: conflicts are retried with other candidates, within a visible bound."""

import ipaddress
import random

import pytest
import pytest_twisted
from twisted.internet import defer

from vmwebd.config import IpPool, MacPool, VniRange
from vmwebd.errors import NameTaken, PoolExhausted
from vmwebd.lease.allocator import AllocationContended, Allocator
from vmwebd.lease.table import LeaseConflict


class RacingTable:
    """A lease table where another host wins the first ``lose`` IP claims it sees (as under contention)."""

    def __init__(self, lose: int):
        self.held = {}
        self.lose = lose
        self.claims = []

    def holder(self, key):
        return self.held.get(key)

    def acquire(self, claims):
        self.claims.append(dict(claims))
        for k, h in claims.items():
            if k in self.held and self.held[k] != h:
                return defer.fail(LeaseConflict(k, self.held[k]))
        if self.lose:
            self.lose -= 1
            k = next(k for k in claims if k.startswith("ip/"))
            self.held[k] = "vm:someone-else#x"
            return defer.fail(LeaseConflict(k, self.held[k]))
        self.held.update(claims)
        return defer.succeed(None)

    def release(self, holders):
        for k, h in holders.items():
            if self.held.get(k) == h:
                del self.held[k]
        return defer.succeed(None)


def allocator(table, cidr="10.0.0.0/24", lane=None):
    pools = {"lab": IpPool("lab", ipaddress.ip_network(cidr))}
    return Allocator(table, pools, MacPool(), VniRange(100, 200), random.Random(1), max_rounds=4, lane=lane)


@pytest_twisted.inlineCallbacks
def test_conflicts_are_retried_with_other_candidates():
    """After losing addresses to another host, the allocator retries elsewhere and succeeds."""
    t = RacingTable(lose=2)
    vni, addrs = yield allocator(t).allocate_cluster("c1", "tok", ["c1/a", "c1/b"], "lab")
    assert len(t.claims) == 3
    ips = {a.ip for a in addrs.values()}
    assert len(ips) == 2 and not any(t.held.get(f"ip/lab/{ip}", "").startswith("vm:someone") for ip in ips)


@pytest_twisted.inlineCallbacks
def test_retry_bound_is_reached_and_named():
    """When every round loses, the allocator gives up after max_rounds with a clear error."""
    t = RacingTable(lose=100)
    with pytest.raises(AllocationContended, match="gave up after 4 rounds"):
        yield allocator(t).allocate_cluster("c1", "tok", ["c1/a"], "lab")
    assert len(t.claims) == 4
    # later rounds draw among more candidates instead of the next lowest ones
    firsts = [min(k for k in c if k.startswith("ip/")) for c in t.claims]
    assert len(set(firsts)) == 4


@pytest_twisted.inlineCallbacks
def test_name_conflict_is_name_taken_and_pool_exhaustion_is_reported():
    """A held cluster name is NameTaken; a pool too small is PoolExhausted naming the pool."""
    t = RacingTable(lose=0)
    a = allocator(t, cidr="10.0.0.0/29")
    yield a.allocate_cluster("c1", "tok", ["c1/a"], "lab")
    with pytest.raises(NameTaken):
        yield a.allocate_cluster("c1", "other", ["c1/b"], "lab")
    with pytest.raises(PoolExhausted, match="'lab'"):
        yield a.allocate_cluster("c2", "tok2", [f"c2/n{i}" for i in range(9)], "lab")


class PendingTable(RacingTable):
    """A lease table whose claims stay pending until the test fires them (rounds in flight)."""

    def __init__(self):
        super().__init__(lose=0)
        self.pending = []

    def acquire(self, claims):
        self.claims.append(dict(claims))
        d = defer.Deferred()
        self.pending.append((d, dict(claims)))
        return d


@pytest_twisted.inlineCallbacks
def test_concurrent_allocations_at_one_host_claim_different_candidates():
    """Two clusters allocated at the same time at one host ask for different addresses and
    network ids (each would otherwise lose to the other); once they end, the candidates are free
    to pick again if the claims failed."""
    t = PendingTable()
    a = allocator(t)
    d1 = a.allocate_cluster("c1", "t1", ["c1/a"], "lab")
    d2 = a.allocate_cluster("c2", "t2", ["c2/a"], "lab")
    (p1, c1), (p2, c2) = t.pending
    assert not ({k for k in c1 if not k.startswith("name/")} & set(c2))
    for d, claims in t.pending:
        t.held.update(claims)
        d.callback(None)
    r1, r2 = yield defer.gatherResults([d1, d2])
    assert r1[0] != r2[0] and r1[1]["c1/a"].ip != r2[1]["c2/a"].ip
    assert a._claiming == set()


@pytest_twisted.inlineCallbacks
def test_hosts_in_different_lanes_propose_different_candidates_whatever_they_know():
    """Two hosts allocating at once, each knowing nothing of the other's claims, ask for different
    addresses and network ids (every other one of the pool each); a lane with nothing free left
    falls back to any free address."""
    t1, t2 = RacingTable(lose=0), RacingTable(lose=0)
    a1, a2 = allocator(t1, lane=lambda: (0, 2)), allocator(t2, lane=lambda: (1, 2))
    vni1, addrs1 = yield a1.allocate_cluster("c1", "t1", ["c1/a", "c1/b"], "lab")
    vni2, addrs2 = yield a2.allocate_cluster("c2", "t2", ["c2/a", "c2/b"], "lab")
    assert vni1 != vni2
    assert not {a.ip for a in addrs1.values()} & {a.ip for a in addrs2.values()}
    small = allocator(RacingTable(lose=0), cidr="10.0.0.0/29", lane=lambda: (1, 2))  # 6 usable addresses
    _, addrs = yield small.allocate_cluster("c3", "t3", [f"c3/n{i}" for i in range(5)], "lab")
    assert len({a.ip for a in addrs.values()}) == 5
