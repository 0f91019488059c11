"""Three lease services on one ``task.Clock``: their store work done at once by an inline runner,
their messages carried by an in-memory transport that delivers in the next clock turn (and can
cut a host off). Each test runs in milliseconds: no thread, socket or real time is involved."""

from __future__ import annotations

import random

import pytest
from twisted.internet import defer, task

from vmwebd.blocking import InlineRunner
from vmwebd.dom.hlc import HybridClock
from vmwebd.dom.persist import DomService, load_dom
from vmwebd.dom.records import LeaseRec
from vmwebd.errors import NoQuorum
from vmwebd.lease import paxos
from vmwebd.lease.service import LeaseService

HOSTS = ("host1", "host2", "host3")
#: A wall clock well after the epoch, so ballots and versions look as in a real grid.
START_S = 1_700_000_000.0


class Wire:
    """Carries consensus messages between the services: each batch is delivered in its own
    clock turn (``clock.callLater(delay, ...)``), or dropped when either end is cut off."""

    def __init__(self, clock: task.Clock):
        self.clock = clock
        self.hosts: dict[str, LeaseService] = {}
        self.cut: set[str] = set()
        self.delay: dict[str, float] = {}  # extra seconds for messages to or from a host
        self.lost = lambda src, dst, msg: False  # which single messages are lost on the way
        self.delivered = 0
        self.dropped = 0

    def sender(self, src: str):
        def send(dst: str, msgs, timeout: float | None = None) -> defer.Deferred:
            if src in self.cut or dst in self.cut or dst not in self.hosts:
                self.dropped += len(msgs)
                return defer.succeed(False)
            kept = [m for m in msgs if not self.lost(src, dst, m)]
            self.dropped += len(msgs) - len(kept)
            if not kept:
                return defer.succeed(True)
            msgs = kept
            delay = self.delay.get(src, 0.0) + self.delay.get(dst, 0.0)
            self.clock.callLater(delay, self._deliver, src, dst, list(msgs))
            return defer.succeed(True)

        return send

    def _deliver(self, src: str, dst: str, msgs) -> None:
        if src in self.cut or dst in self.cut:  # cut off while the batch travelled
            self.dropped += len(msgs)
            return
        self.delivered += len(msgs)
        self.hosts[dst].receive(src, msgs)


class Grid:
    """Three hosts, each with its DOM service and acceptor store under ``tmp_path/<host>``."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.clock = task.Clock()
        self.clock.advance(START_S)
        self.wire = Wire(self.clock)
        self.rng = random.Random(11)
        self.domsvcs: dict[str, DomService] = {}
        for h in HOSTS:
            self.start(h)

    def start(self, host: str) -> LeaseService:
        """Builds ``host``'s DOM service and lease service over its state files and starts it."""
        hlc = HybridClock(host, lambda: int(self.clock.seconds() * 1000))
        run = InlineRunner()
        dom, store, n = load_dom(self.tmp_path / host / "dom", hlc, fsync=False)
        domsvc = DomService(dom, store, self.clock, journal_records=n, run_blocking=run)
        svc = LeaseService(
            host,
            domsvc,
            self.tmp_path / host / "paxos",
            self.clock,
            hlc,
            random.Random(self.rng.random()),
            HOSTS,
            self.wire.sender(host),
            fsync=False,
            run_blocking=run,
        )
        started = svc.start()
        assert started.called, "an inline runner loads the store at once"
        self.domsvcs[host] = domsvc
        self.wire.hosts[host] = svc
        return svc

    def restart(self, host: str) -> LeaseService:
        """Stops ``host``'s services and starts new ones over the same state files."""
        self.wire.hosts[host].stop()
        self.domsvcs[host].close()
        return self.start(host)

    def svc(self, host: str) -> LeaseService:
        return self.wire.hosts[host]

    def holder(self, host: str, key: str) -> str | None:
        rec = self.domsvcs[host].dom.get(LeaseRec, key)
        return rec.holder if rec else None

    def run(self, ds, limit_s: float = 20.0, step_s: float = 0.01) -> list:
        """Advances the clock in small steps until every Deferred in ``ds`` fired (or
        ``limit_s`` of clock time passed: then the test fails); returns their results, a
        failure as its exception."""
        results: list = [None] * len(ds)
        done = [False] * len(ds)
        for i, d in enumerate(ds):

            def settle(r, i=i):
                results[i] = r.value if isinstance(r, defer.Failure) else r
                done[i] = True

            d.addBoth(settle)
        spent = 0.0
        while not all(done):
            assert spent < limit_s, f"{done.count(False)} proposals still open after {limit_s} s"
            self.clock.advance(step_s)
            spent += step_s
        return results

    def quiet(self, seconds: float = 1.0, step_s: float = 0.01) -> None:
        """Lets ``seconds`` of clock time pass (messages in flight arrive, commits are recorded)."""
        for _ in range(int(seconds / step_s)):
            self.clock.advance(step_s)


@pytest.fixture
def grid(tmp_path):
    g = Grid(tmp_path)
    yield g
    for h in HOSTS:
        g.svc(h).stop()
        g.domsvcs[h].close()


def test_a_lease_is_decided_and_recorded_in_every_hosts_dom(grid):
    (result,) = grid.run([grid.svc("host1").propose({"ip/lab/10.0.0.5": (None, "vm:a")})])
    assert isinstance(result, paxos.Decided) and result.values == {"ip/lab/10.0.0.5": "vm:a"}
    grid.quiet()
    assert {h: grid.holder(h, "ip/lab/10.0.0.5") for h in HOSTS} == dict.fromkeys(HOSTS, "vm:a")
    # Recorded with the deciding ballot as version, everywhere.
    assert {grid.domsvcs[h].dom.version_of("lease", "ip/lab/10.0.0.5") for h in HOSTS} == {result.ballot}
    assert grid.clock.seconds() - START_S < 2.0 and grid.wire.dropped == 0


def test_two_concurrent_proposals_for_one_key_have_exactly_one_winner(grid):
    a = grid.svc("host1").propose({"mac/lab/02:00:00:00:00:01": (None, "vm:a")})
    b = grid.svc("host2").propose({"mac/lab/02:00:00:00:00:01": (None, "vm:b")})
    results = grid.run([a, b])
    won = [r for r in results if isinstance(r, paxos.Decided)]
    lost = [r for r in results if isinstance(r, paxos.Conflict)]
    assert len(won) == 1 and len(lost) == 1, results
    winner = won[0].values["mac/lab/02:00:00:00:00:01"]
    assert lost[0].holder == winner
    grid.quiet()
    assert {grid.holder(h, "mac/lab/02:00:00:00:00:01") for h in HOSTS} == {winner}


def test_with_one_host_of_three_cut_off_proposals_still_decide(grid):
    grid.wire.cut.add("host3")
    results = grid.run(
        [grid.svc("host1").propose({f"ip/lab/10.0.1.{i}": (None, f"vm:{i}")}) for i in range(5)]
    )
    assert all(isinstance(r, paxos.Decided) for r in results), results
    grid.quiet()
    assert [grid.holder("host2", f"ip/lab/10.0.1.{i}") for i in range(5)] == [f"vm:{i}" for i in range(5)]
    assert grid.holder("host3", "ip/lab/10.0.1.0") is None  # it heard nothing
    assert grid.wire.dropped > 0


def test_with_two_hosts_cut_off_a_proposal_fails_once_its_deadline_passed(grid):
    grid.wire.cut.update({"host2", "host3"})
    d = grid.svc("host1").propose({"ip/lab/10.0.2.1": (None, "vm:a")})
    grid.quiet(2.5)
    assert not d.called, "the proposal is still trying before its deadline (3 s)"
    (error,) = grid.run([d], limit_s=5.0)
    assert isinstance(error, NoQuorum)
    assert "cannot lease without a majority: 1 of 3 member hosts answered, 2 needed" in str(error)
    assert grid.holder("host1", "ip/lab/10.0.2.1") is None


def test_a_slow_host_is_waited_for_no_longer_than_a_majority_needs(grid):
    """Messages to and from host3 take 10 s: host1 and host2 decide without it, and host3 records
    the lease once its Commit arrives."""
    grid.wire.delay["host3"] = 5.0
    (result,) = grid.run([grid.svc("host1").propose({"ip/lab/10.0.4.1": (None, "vm:a")})], limit_s=2.0)
    assert isinstance(result, paxos.Decided)
    assert grid.holder("host3", "ip/lab/10.0.4.1") is None
    grid.quiet(12.0)
    assert grid.holder("host3", "ip/lab/10.0.4.1") == "vm:a"


def test_a_restarted_acceptor_keeps_what_it_accepted(grid):
    """host1 and host3 decide a lease while host2 is cut off, and the Commit to host3 is lost:
    host3 only accepted the value. host1 then goes away and host3 restarts over its state files.
    host2, which never heard of the lease, asks for the key with host3: host3's acceptor must
    still hold host1's value, so host2's proposal cannot win and no other value is decided."""
    key = "ip/lab/10.0.3.1"
    grid.wire.cut.add("host2")
    grid.wire.lost = lambda src, dst, m: dst == "host3" and isinstance(m, paxos.Commit)
    (first,) = grid.run([grid.svc("host1").propose({key: (None, "vm:a")})])
    assert isinstance(first, paxos.Decided)
    grid.quiet()
    assert grid.holder("host1", key) == "vm:a" and grid.holder("host3", key) is None
    grid.wire.cut, grid.wire.lost = {"host1"}, lambda src, dst, m: False
    grid.restart("host3")
    assert grid.svc("host3").core.committed(key) == (None, None)  # accepted, never told decided
    (second,) = grid.run([grid.svc("host2").propose({key: (None, "vm:b")})])
    assert isinstance(second, paxos.Conflict) and second.holder == "vm:a", second
    grid.quiet()
    assert grid.holder("host3", key) in (None, "vm:a") and grid.holder("host2", key) in (None, "vm:a")


def test_stopping_ends_the_operations_waiting_on_the_proposer(grid):
    """host2 forwards its operations to host1, whose answers are slow; host2 stops: the operation
    it forwarded fails at once naming the stop, and nothing runs at host2 when its fallback
    would have been due or when host1's outcome arrives."""
    host2 = grid.svc("host2")
    host2.proposer_for = lambda: "host1"  # what the node gives: the first member alive
    grid.wire.delay["host1"] = 5.0
    d = host2.propose({"k": (None, "vm:x")})
    grid.quiet(0.5)
    assert not d.called and host2.forwarded == 1
    host2.stop()
    (result,) = grid.run([d])
    assert isinstance(result, NoQuorum) and "stopping" in str(result)
    grid.quiet(host2.forward_timeout + 11)
    assert host2.fell_back == 0 and not host2._forwarded


def test_the_store_is_compacted_and_a_restart_keeps_everything(grid):
    """With a compaction every few records, the acceptors' stores hold a snapshot and a short
    journal instead of every record; a host restarted over them has the same acceptor state
    (every key's promise, acceptance and commit, the term it promised) and its proposer's ballots
    still go past every ballot it used."""
    for h in HOSTS:
        grid.svc(h).compact_every = 7
    keys = [f"ip/lab/10.0.4.{i}" for i in range(30)]
    results = grid.run([grid.svc("host1").propose({k: (None, f"vm:{k}")}) for k in keys[:20]])
    assert all(isinstance(r, paxos.Decided) for r in results)
    grid.quiet()
    for h in HOSTS:
        assert grid.svc(h).compactions >= (2 if h == "host1" else 1), h
        assert grid.svc(h).store.stats().records_since_snapshot < 20, h
    before = {h: grid.svc(h).core for h in HOSTS}
    for h in HOSTS:
        grid.restart(h)
    for h in HOSTS:
        old, new = before[h], grid.svc(h).core
        assert {k: vars(st) for k, st in new.keys.items()} == {k: vars(st) for k, st in old.keys.items()}, h
        assert new.term == old.term and new._top == old._top and new._digest == old._digest, h
        if old._reserved is not None:  # restored: the clock reads at least the last reserve
            assert new.clock.reading() >= old._reserved.stamp, h
    results = grid.run([grid.svc("host2").propose({k: (None, "vm:other")}) for k in keys[:3]])
    assert all(isinstance(r, paxos.Conflict) and r.holder == f"vm:{k}" for r, k in zip(results, keys))
    results = grid.run([grid.svc("host1").propose({k: (None, f"vm:{k}")}) for k in keys[20:]])
    assert all(isinstance(r, paxos.Decided) for r in results)
