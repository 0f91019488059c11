"""Safety of the consensus leases under random schedules: drops, duplicates, reordering,
partitions, crashes and restarts at any step, with concurrent proposers on the same keys."""
from __future__ import annotations

import random
from collections import defaultdict

from hypothesis import given, settings, strategies as st

from vmwebd.dom.hlc import HybridClock
from vmwebd.lease import paxos


class PaxosNet:
    """N Paxos hosts on a faulty network, driven step by step from one seeded RNG.

    A host's durable state is exactly the records its core asked to persist; they are recorded
    BEFORE its messages enter the network (persist before send). A crash loses everything else.
    """

    def __init__(self, n: int, rng: random.Random, drop=0.1, dup=0.1):
        self.rng = rng
        self.ids = [f"h{i}" for i in range(n)]
        self.now = 0.0
        self.drop, self.dup = drop, dup
        self.disk = {h: [] for h in self.ids}
        self.cores = {h: self._core(h) for h in self.ids}
        self.inflight = []          # (src, dst, msg)
        self.groups = None
        self.results = {}           # op -> list of results
        self.ops = {}               # op -> (host, cas)
        self.accepts = defaultdict(set)   # (key, ballot, value) -> acceptors that accepted it

    def _core(self, h):
        core = paxos.PaxosCore(h, HybridClock(h, lambda: int(self.now * 1000)),
                               random.Random(self.rng.random()), self.ids, retry_after=0.3, deadline=3.0)
        core.restore(list(self.disk[h]))
        return core

    def reachable(self, a, b):
        return self.groups is None or any(a in g and b in g for g in self.groups)

    def carry(self, h, out: paxos.Output):
        self.disk[h].extend(out.persist)          # durable first
        for rec in out.persist:
            kind, key, ballot, value = rec
            if kind == "accept":
                self.accepts[(key, ballot, value)].add(h)
        for r in out.results:
            self.results.setdefault(r.op, []).append(r)
        for dst, msg in out.sends:
            if self.rng.random() < self.drop:
                continue
            self.inflight.append((h, dst, msg))
            if self.rng.random() < self.dup:
                self.inflight.append((h, dst, msg))

    def propose(self, h, op, cas):
        if self.cores[h] is None:
            return
        self.ops[op] = (h, cas)
        self.carry(h, self.cores[h].propose(op, cas, self.now))

    def step(self):
        """Delivers one random in-flight message (reordering), or ticks time forward."""
        self.now += 0.01
        if self.inflight and self.rng.random() < 0.85:
            src, dst, msg = self.inflight.pop(self.rng.randrange(len(self.inflight)))
            if self.cores[dst] is not None and self.reachable(src, dst):
                self.carry(dst, self.cores[dst].receive(src, msg, self.now))
        else:
            self.now += 0.05
            for h in self.ids:
                if self.cores[h] is not None:
                    self.carry(h, self.cores[h].tick(self.now))

    def crash(self, h):
        self.cores[h] = None

    def restart(self, h):
        if self.cores[h] is None:
            self.cores[h] = self._core(h)

    # -- invariants ------------------------------------------------------------------------
    def check(self):
        majority = len(self.ids) // 2 + 1
        committed = defaultdict(dict)            # key -> {ballot: value}
        for h in self.ids:
            for kind, key, ballot, value in self.disk[h]:
                if kind == "commit":
                    prev = committed[key].get(ballot, value)
                    assert prev == value, f"{key} committed two values at ballot {ballot}"
                    committed[key][ballot] = value
                    # (c) every committed value was accepted by a majority at that ballot
                    assert len(self.accepts[(key, ballot, value)]) >= majority, \
                        f"{key}={value!r} committed at {ballot} without a majority of accepts"
        decided = defaultdict(dict)              # key -> {ballot: (expected, new)}
        for op, results in self.results.items():
            # (d) one result per operation
            assert len(results) == 1, f"operation {op} got {results}"
            r = results[0]
            if isinstance(r, paxos.Decided) and r.ballot is not None:
                _, cas = self.ops[op]
                for key, value in r.values.items():
                    assert cas[key][1] == value
                    decided[key][r.ballot] = cas[key]
            elif isinstance(r, paxos.Conflict):
                _, cas = self.ops[op]
                assert r.key in cas and r.holder not in (cas[r.key][0], cas[r.key][1])
        # (a)+(b) per key, the decisions in ballot order form one history of compare-and-sets:
        # each decided CAS expected exactly the value the previous decision left. So two holders
        # can never both acquire a free key without a release in between.
        for key, by_ballot in decided.items():
            history = dict(committed.get(key, {}))
            for b, (exp, new) in by_ballot.items():
                history.setdefault(b, new)
            value = None
            for b in sorted(history):
                if b in by_ballot:
                    exp, new = by_ballot[b]
                    assert exp == value, f"{key}: CAS at {b} expected {exp!r} but the value was {value!r}"
                    assert history[b] == new
                value = history[b]


HOLDERS = ["vm:a", "vm:b", "vm:c"]
KEYS = ["ip/lab/10.0.0.1", "ip/lab/10.0.0.2", "mac/52:54:00:00:00:01"]


@st.composite
def schedules(draw):
    n = draw(st.sampled_from([3, 5]))
    events = []
    for i in range(draw(st.integers(2, 6))):
        keys = draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=3, unique=True))
        holder = draw(st.sampled_from(HOLDERS))
        release = draw(st.booleans()) and draw(st.booleans())
        cas = {k: ((holder, None) if release else (None, holder)) for k in keys}
        events.append(("propose", draw(st.integers(0, 40)), draw(st.integers(0, n - 1)), f"op{i}", cas))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["crash", "restart", "partition", "heal"]))
        events.append((kind, draw(st.integers(0, 80)), draw(st.integers(0, n - 1)), None, None))
    return n, sorted(events, key=lambda e: e[1]), draw(st.integers(0, 2**32 - 1))


@settings(max_examples=1000, deadline=None)
@given(schedules())
def test_random_schedules_never_violate_safety(schedule):
    """1,000 random faulty schedules: one value per ballot, majority-accepted commits, a single
    CAS history per key (no two holders of one key), one result per operation."""
    n, events, seed = schedule
    net = PaxosNet(n, random.Random(seed))
    step = 0
    for kind, at, host, op, cas in events:
        while step < at:
            net.step()
            step += 1
        h = net.ids[host]
        if kind == "propose":
            net.propose(h, op, cas)
        elif kind == "crash":
            net.crash(h)
        elif kind == "restart":
            net.restart(h)
        elif kind == "partition":
            side = set(net.rng.sample(net.ids, net.rng.randint(1, n - 1)))
            net.groups = [side, set(net.ids) - side]
        else:
            net.groups = None
    for _ in range(400):
        net.step()
    net.check()


def test_without_faults_every_operation_completes_and_conflicts_name_the_holder():
    """With no faults, concurrent acquisitions of one key all complete: one wins, the others
    get a Conflict naming the winner."""
    net = PaxosNet(3, random.Random(1), drop=0, dup=0)
    for i, h in enumerate(net.ids):
        net.propose(h, f"op{i}", {"ip/lab/10.0.0.9": (None, f"vm:{h}")})
    for _ in range(2000):
        net.step()
        if len(net.results) == 3:
            break
    net.check()
    outcomes = [r[0] for r in net.results.values()]
    winners = [r for r in outcomes if isinstance(r, paxos.Decided)]
    assert len(winners) == 1 and len(outcomes) == 3
    holder = winners[0].values["ip/lab/10.0.0.9"]
    assert all(r.holder == holder for r in outcomes if isinstance(r, paxos.Conflict))


def test_minority_down_still_decides_majority_down_fails_with_noquorum():
    """Two of five crashed: leases are decided. Three of five crashed: NoQuorum within the deadline."""
    net = PaxosNet(5, random.Random(2), drop=0, dup=0)
    net.crash("h3"), net.crash("h4")
    net.propose("h0", "ok", {"k": (None, "vm:a")})
    for _ in range(500):
        net.step()
    assert isinstance(net.results["ok"][0], paxos.Decided)
    net.crash("h2")
    start = net.now
    net.propose("h0", "nq", {"k2": (None, "vm:a")})
    while "nq" not in net.results:
        net.step()
    r = net.results["nq"][0]
    assert isinstance(r, paxos.NoQuorum) and (r.reachable, r.needed, r.members) == (2, 3, 5)
    assert net.now - start <= 3.0 + 0.1


def test_sixty_four_keys_decide_in_one_round():
    """A batch of 64 keys is decided with one prepare round and one accept round."""
    net = PaxosNet(3, random.Random(3), drop=0, dup=0)
    keys = {f"ip/lab/10.0.1.{i}": (None, "vm:x") for i in range(64)}
    net.propose("h0", "batch", keys)
    sent = defaultdict(int)
    while "batch" not in net.results:
        src, dst, msg = net.inflight[0]
        sent[type(msg).__name__] += 1
        net.inflight.pop(0)
        net.carry(dst, net.cores[dst].receive(src, msg, net.now))
    assert isinstance(net.results["batch"][0], paxos.Decided)
    assert sent["Prepare"] == 3 and sent["Accept"] == 3


def test_restarted_acceptor_keeps_its_promise():
    """An acceptor restarted from its records refuses a ballot lower than one it promised."""
    net = PaxosNet(3, random.Random(4), drop=0, dup=0)
    net.carry("h0", net.cores["h0"].receive("h2", paxos.Prepare("p", paxos.Version(10, 0, "h2"), ("k",)), 0))
    net.crash("h0")
    net.restart("h0")
    out = net.cores["h0"].receive("h1", paxos.Prepare("q", paxos.Version(5, 0, "h1"), ("k",)), 0)
    assert [type(m) for _, m in out.sends] == [paxos.Nack]
    assert out.sends[0][1].promised == paxos.Version(10, 0, "h2")
