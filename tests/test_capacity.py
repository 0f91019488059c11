"""Capacity and quotas decided with the leases (vmwebd/lease/capacity.py).

The values and the builder on their own, then the property that matters, in the deterministic
Paxos simulator with faults: hosts placing and removing VMs at the same time, each from its own
stale view, never get a host promised more than it has nor an owner past their quota, and the
counters always add up to the reservations they sum.
"""

from __future__ import annotations

import itertools
import random
from collections import defaultdict

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmwebd.errors import NoCapacity, QuotaExceeded
from vmwebd.lease import paxos
from vmwebd.lease.capacity import PREFIXES, Entry, Ledger, Usage, cap_key, encode, parse, quota_key, usage
from vmwebd.lease.paxos import Refused
from vmwebd.lease.paxos_sim import PaxosSim


# -- values and the builder ------------------------------------------------------------------
@given(
    st.sets(
        st.tuples(
            st.from_regex(r"[a-z][a-z0-9-]{0,5}/[a-z]{1,4}[0-9]{0,2}", fullmatch=True),
            st.text("0123456789abcdef", min_size=1, max_size=8),
            st.integers(0, 64),
            st.integers(0, 10**6),
        ),
        max_size=20,
    )
)
@pytest.mark.property
def test_sets_round_trip(items):
    entries = {Entry(*t) for t in items}
    assert parse(encode(entries, sizes=True)) == entries
    assert parse(encode({Entry(e.vm, e.token) for e in entries}, sizes=False)) == {
        Entry(e.vm, e.token) for e in entries
    }


def ledger_of(values: dict) -> Ledger:
    return Ledger(values.get)


def apply(values: dict, ops: dict) -> None:
    """Decides ``ops`` as the proposer would, on ``values``."""
    for k, (update, _) in ops.items():
        values[k] = update.apply(values.get(k))


def test_reserve_move_unreserve_keep_each_set_what_it_says():
    values: dict = {}
    led = ledger_of(values)
    ch = led.change()
    ch.reserve("c/a", "h1", 2, 1024, "alice", "t1")
    ch.reserve("c/b", "h1", 1, 512, "alice", "t2")
    apply(values, ch.ops())
    assert led.change().usage("h1") == Usage(2, 3, 1536)
    assert len(parse(values[quota_key("alice")])) == 2
    ch = led.change()
    ch.move("c/a", "t1", 2, 1024, "h1", "h2", keep_source=True)
    apply(values, ch.ops())
    assert set(led.change().find("c/a", ["h1", "h2"])) == {"h1", "h2"}  # both, while moving
    ch = led.change()
    ch.unreserve("c/a", "t1", ["h1"], None)
    apply(values, ch.ops())
    assert led.change().usage("h1") == Usage(1, 1, 512) and led.change().usage("h2").vms == 1
    ch = led.change()  # a re-placement off a dead host: a new token
    ch.move("c/b", "t2", 1, 512, "h1", "h3", keep_source=False, owner="alice", new_token="t9")
    apply(values, ch.ops())
    assert values[cap_key("h1")] is None
    assert Entry("c/b", "t9") in parse(values[quota_key("alice")])
    for vm, tok in (("c/a", "t1"), ("c/b", "t9")):
        ch = led.change()
        ch.unreserve(vm, tok, ["h1", "h2", "h3"], "alice")
        apply(values, ch.ops())
    assert all(v is None for v in values.values()), values


def test_the_builder_refuses_past_capacity_and_quota_naming_them():
    values: dict = {}
    led = ledger_of(values)
    ch = led.change()
    ch.reserve("c/a", "h1", 2, 2048, "alice", "t")
    with pytest.raises(NoCapacity, match="'h1' has 1024 MiB"):
        ch.ops(capacity=lambda h: (8, 1024))
    ch = led.change()
    ch.reserve("c/a", "h1", 1, 512, "alice", "t")
    ch.reserve("c/b", "h1", 1, 512, "alice", "t")
    with pytest.raises(QuotaExceeded, match="'alice' has a quota of 1 VMs"):
        ch.ops(quota=lambda o: 1)
    # a change that only frees is never refused, even on a host already over its capacity
    values[cap_key("h1")] = encode({Entry("c/z", "t", 9, 99999)}, sizes=True)
    ch = led.change()
    ch.unreserve("c/z", "t", ["h1"], None)
    apply(values, ch.ops(capacity=lambda h: (1, 1)))
    assert values[cap_key("h1")] is None


def test_the_proposer_refuses_an_update_that_no_longer_fits():
    """Judged again on the value decided meanwhile, an update past the limit is refused; applied
    again to its own result it changes nothing (idempotent)."""
    values: dict = {}
    ch = ledger_of(values).change()
    ch.reserve("c/a", "h1", 2, 1024, "alice", "t")
    ((update, _),) = [v for k, v in ch.ops(capacity=lambda h: (8, 1536)).items() if k.startswith("cap/")]
    done = update.apply(None)
    assert update.apply(done) == done
    full = encode({Entry("c/x", "t", 1, 1024)}, sizes=True)
    with pytest.raises(Refused, match="'h1' has 512 MiB"):
        update.apply(full)


def test_operations_in_flight_here_count_for_placements_here_and_a_change_knows_if_it_is_in():
    """A placement at this host sees what the operations in flight here are about to reserve;
    values a conflict reports tell whether a change was applied."""
    values: dict = {}
    led = ledger_of(values)
    a = led.change()
    a.reserve("c/a", "h1", 1, 512, "alice", "t")
    ops_a = a.ops()
    led.begin(ops_a)
    b = led.change()
    assert b.usage("h1") == Usage(1, 1, 512)
    b.reserve("c/b", "h1", 1, 512, "alice", "t")
    ops_b = b.ops()
    led.end(ops_a)
    assert led.value(cap_key("h1")) is None
    before = dict(values)
    apply(values, ops_a)
    apply(values, ops_b)
    assert a.applied(values) and b.applied(values)
    assert not b.applied({k: before.get(k) for k in ops_b})


# -- the property, in the simulator -----------------------------------------------------------
HOSTS = ("h0", "h1", "h2")
CAPACITY = {"h0": (8, 4096), "h1": (4, 2048), "h2": (4, 3072)}  # (vCPUs with overcommit, MiB)
QUOTA = {"alice": 9, "bob": 6}


class Grid:
    """Three Paxos hosts in the simulator, each with a ledger reading its own acceptor's
    committed values (a stale view of the grid, as a replica is), and clients at every host
    creating, migrating and removing VMs at the same time, as the daemons do: each builds a
    change, proposes it, and on a conflict builds it again from the values reported."""

    def __init__(self, seed: int, drop: float, dup: float, crash: bool, partition: bool):
        self.sim = PaxosSim(n=3, seed=seed, drop=drop, dup=dup, deadline=2.0)
        self.rng = random.Random(seed)
        self.ledgers = {h: Ledger(lambda k, h=h: self._read(h, k)) for h in HOSTS}
        self.ids = itertools.count()
        self.outcomes = defaultdict(int)
        self.home: dict[str, tuple] = {}  # VM -> (hosts it is reserved on, token, owner)
        self.unsure: set[str] = set()  # VMs an operation of unknown outcome touched
        if crash:
            self.sim.at(0.3, self.sim.crash, "h1")
            self.sim.at(1.5, self.sim.restart, "h1")
        if partition:
            self.sim.at(0.2, self.sim.partition, {"h0"}, {"h1", "h2"})
            self.sim.at(1.2, self.sim.heal)

    def _read(self, h: str, key: str):
        core = self.sim.cores[h]
        return core.committed(key)[1] if core is not None else None

    def _attempts(self, h: str, build, vms=()):
        """Proposes ``build(change)`` until decided (or applied, or refused): yields CAS
        operations, is sent their results; returns True if the change is in. An operation whose
        proposer crashed or lost its quorum may still have been applied: ``vms`` become unsure."""
        view: dict = {}
        for _ in range(30):
            ch = self.ledgers[h].change(view)
            try:
                ops = build(ch)
            except (NoCapacity, QuotaExceeded) as e:
                self.outcomes[type(e).__name__] += 1
                return False
            if not ops:
                return True
            result = yield h, ops
            if isinstance(result, paxos.Decided) or (
                isinstance(result, paxos.Conflict) and ch.applied(result.seen)
            ):
                self.outcomes["decided"] += 1
                return True
            if isinstance(result, paxos.Conflict):
                view = dict(result.seen)
                continue
            self.outcomes["no quorum"] += 1
            self.unsure.update(vms)
            return False
        return False

    def create(self, h: str, owner: str, n: int):
        vms = [
            (f"c{next(self.ids)}/vm{i}", self.rng.choice((1, 2)), self.rng.choice((512, 1024)))
            for i in range(n)
        ]
        placed = {}

        def build(ch):
            for vm, c, m in vms:
                fits = [
                    x
                    for x in HOSTS
                    if ch.usage(x).vcpus + c <= CAPACITY[x][0]
                    and ch.usage(x).memory_mib + m <= CAPACITY[x][1]
                ]
                if not fits:
                    raise NoCapacity("full")
                placed[vm] = self.rng.choice(fits)
                ch.reserve(vm, placed[vm], c, m, owner, "t")
            return ch.ops(capacity=CAPACITY.get, quota=QUOTA.get)

        if (yield from self._attempts(h, build)):
            for vm, c, m in vms:
                self.home[vm] = ((placed[vm],), "t", owner, c, m)

    def remove(self, h: str, vm: str):
        hosts, tok, owner, _c, _m = self.home[vm]

        def build(ch):
            ch.unreserve(vm, tok, HOSTS, owner)
            return ch.ops()

        if (yield from self._attempts(h, build, [vm])):
            del self.home[vm]

    def migrate(self, h: str, vm: str, ends_on_dest: bool):
        hosts, tok, owner, c, m = self.home[vm]
        src = hosts[0]
        dest = self.rng.choice([x for x in HOSTS if x != src])

        def start(ch):
            ch.move(vm, tok, c, m, src, dest, keep_source=True)
            return ch.ops(capacity=CAPACITY.get)

        if not (yield from self._attempts(h, start, [vm])):
            return
        self.home[vm] = ((src, dest), tok, owner, c, m)
        keep, drop = (dest, src) if ends_on_dest else (src, dest)

        def settle(ch):
            ch.unreserve(vm, tok, [drop], None)
            return ch.ops()

        if (yield from self._attempts(h, settle, [vm])):
            self.home[vm] = ((keep,), tok, owner, c, m)

    def run(self, tasks: list, limit: float = 40.0) -> None:
        """Runs client tasks concurrently: each proposes, waits for its result, goes on."""
        sim = self.sim
        waiting = {}  # op id -> (task, host, ops)

        def advance(task, value, first=False):
            try:
                h, ops = task.send(None) if first else task.send(value)
            except StopIteration:
                return
            op = f"op{next(self.ids)}"
            self.ledgers[h].begin(ops)
            waiting[op] = (task, h, ops)
            sim.propose(h, op, ops)

        for t in tasks:
            advance(t, None, first=True)
        end = sim.now + limit
        while waiting and sim.now < end:
            if not sim.step():
                break
            for op in [o for o in waiting if sim.result(o) is not None or not sim.alive(waiting[o][1])]:
                task, h, ops = waiting.pop(op)
                self.ledgers[h].end(ops)
                advance(task, sim.result(op))

    def decided(self) -> dict:
        """The value each key ends with: the last one chosen (in ballot order)."""
        out = {}
        for k in {k for (k, _b, _v) in self.sim.chosen_at}:
            hist = self.sim.history(k)
            out[k] = hist[-1][1] if hist else None
        return out


def check_limits(sim: PaxosSim) -> None:
    """No value ever chosen for a host's set exceeds its capacity, nor an owner's its quota."""
    for key, _ballot, value in sim.chosen_at:
        if key.startswith("cap/"):
            u = usage(parse(value))
            cap = CAPACITY[key[4:]]
            assert u.vcpus <= cap[0] and u.memory_mib <= cap[1], (key, u, cap)
        elif key.startswith("quota/"):
            assert len(parse(value)) <= QUOTA[key[6:]], (key, value)


def check_reserved(g: Grid) -> None:
    """Every VM its clients know placed is in the set of every host it is on (more may be
    reserved — leftovers of operations that failed, for the sweep — never less)."""
    values = g.decided()
    for vm, (hosts, tok, owner, c, m) in g.home.items():
        if vm in g.unsure:
            continue
        for h in hosts:
            assert Entry(vm, tok, c, m) in parse(values.get(cap_key(h))), (vm, h)
        assert Entry(vm, tok) in parse(values.get(quota_key(owner))), (vm, owner)


def play(seed: int, drop: float, dup: float, crash: bool, partition: bool) -> Grid:
    g = Grid(seed, drop, dup, crash, partition)
    rng = random.Random(seed ^ 0x5EED)
    g.run([g.create(HOSTS[i % 3], ("alice", "bob")[i % 2], rng.randint(1, 3)) for i in range(9)])
    g.sim.heal()
    vms = sorted(g.home)
    rng.shuffle(vms)
    tasks = [g.migrate(HOSTS[i % 3], vm, rng.random() < 0.5) for i, vm in enumerate(vms[:6])]
    tasks += [g.remove(HOSTS[i % 3], vm) for i, vm in enumerate(vms[6:10])]
    tasks += [g.create(HOSTS[i % 3], ("alice", "bob")[i % 2], rng.randint(1, 2)) for i in range(4)]
    g.run(tasks)
    g.sim.run_until_idle()
    return g


@pytest.mark.slow
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    drop=st.sampled_from([0.0, 0.05, 0.2]),
    dup=st.sampled_from([0.0, 0.1]),
    crash=st.booleans(),
    partition=st.booleans(),
)
def test_no_schedule_promises_a_host_more_than_it_has(seed, drop, dup, crash, partition):
    """Clients at three hosts create, move and remove VMs at once from stale views, with lost,
    duplicated and delayed messages, a crash and a partition: no value ever decided puts a host
    past its capacity or an owner past their quota, every VM placed is reserved where it runs,
    and Paxos itself stays safe."""
    g = play(seed, drop, dup, crash, partition)
    g.sim.check_safety(registers=PREFIXES)
    check_limits(g.sim)
    check_reserved(g)


def test_a_fault_free_race_fills_the_grid_up_to_its_capacity():
    """Without faults, concurrent creates at three hosts fill them up to their capacity; the
    rest are refused by name (NoCapacity or QuotaExceeded), none goes over."""
    g = play(7, 0.0, 0.0, False, False)
    g.sim.check_safety(registers=PREFIXES)
    check_limits(g.sim)
    check_reserved(g)
    assert g.outcomes["decided"] >= 3 and g.outcomes["NoCapacity"] + g.outcomes["QuotaExceeded"] >= 1, (
        g.outcomes
    )


# -- the sweep, on a real node ----------------------------------------------------------------
@pytest_twisted.inlineCallbacks
def test_the_sweep_removes_leftovers_after_grace_and_records_vms_missing(start_node):
    """An entry for a VM that is not there (an operation that failed half-way) is removed by
    the host's full reconcile pass once it has been stale for the grace period, and a VM placed
    here that is in no entry (made before reservations existed) is recorded; a leftover is kept
    while the grace period runs."""
    h = yield start_node()
    node = h.node
    yield h.call("CreateCluster", "c1", "lab", "alice", 2)
    yield node.reconciler.settled()
    led = node.allocator.ledger
    real = sorted(led.entries(cap_key("host1")), key=lambda e: e.vm)
    assert [e.vm for e in real] == ["c1/pc0", "c1/pc1"]
    ghost = Entry("gone/vm0", "t0", 1, 512)
    yield node.allocator.transact(
        lambda ch: (ch.adjust(cap_key("host1"), add=[ghost], remove=[real[0]]), ch.ops())[1]
    )
    yield node.reconciler.settled()  # a full pass within the grace period
    entries = led.entries(cap_key("host1"))
    assert ghost in entries and real[0] in entries  # the missing VM is recorded at once
    node.reconciler.capacity.grace_s = 0
    yield node.reconciler.settled()
    assert led.entries(cap_key("host1")) == frozenset(real)
    assert {e.vm for e in led.entries(quota_key("alice"))} == {"c1/pc0", "c1/pc1"}


def test_updates_of_one_key_share_a_round_and_each_is_judged_in_turn():
    """Many placements on one host at one proposer travel together: updates of a shared key
    join one round and are applied in arrival order, each against its limit (the one that
    does not fit any more is refused alone)."""
    sim = PaxosSim(n=3, seed=3)
    led = Ledger(lambda k: None)
    ops = []
    for i in range(6):
        ch = led.change()
        ch.reserve(f"c{i}/vm0", "h0", 1, 1024, "alice", "t")
        ops.append(ch.ops(capacity=CAPACITY.get))  # h0: 4096 MiB, so four fit
    for i, o in enumerate(ops):
        sim.propose("h0", f"u{i}", o)
    assert sim.run_until_done()
    results = [sim.result(f"u{i}") for i in range(6)]
    assert [type(r).__name__ for r in results] == ["Decided"] * 4 + ["Conflict"] * 2, results
    assert len({r.ballot for r in results[1:4]}) == 1  # those queued went together
    assert len(parse(sim.history(cap_key("h0"))[-1][1])) == 4
    sim.check_safety(registers=PREFIXES)


def test_a_large_capacity_set_is_a_valid_lease_for_peers():
    """A host's set of a few thousand VMs is a lease value peers accept (the schema's lease
    value is not limited like other text): replicas never refuse one another's capacity sets."""
    from lxml import etree

    from vmwebd.dom.validate import entity_error

    big = encode(
        {Entry(f"cluster-{i // 50:04d}/compute{i % 50}", f"{i:08x}", 1, 512) for i in range(5000)}, sizes=True
    )
    assert len(big) > 100_000
    el = etree.Element("{urn:vmweb:dom:1}lease", id="cap/host1", v="1000.0@host1", holder=big)
    assert entity_error(el) is None
    el.set("holder", "x" * 5_000_000)
    assert entity_error(el) is not None
