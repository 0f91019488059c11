"""The Paxos core on the deterministic simulator: safety under random faulty schedules, liveness in
benign conditions, batching, and durable promises across restarts."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmwebd.dom.hlc import Version
from vmwebd.lease import paxos
from vmwebd.lease.paxos_sim import PaxosSim

KEYS = ("ip/lab/10.0.0.1", "ip/lab/10.0.0.2", "mac/52:54:00:00:00:01")
HOLDERS = ("vm:a", "vm:b", "vm:c")
GRID = 0.01  # schedule times are multiples of 10 ms, so ballots of different incarnations can meet
FAULTS = ("crash", "restart", "rewind", "partition", "heal")
WINDOW = 0.8  # faults and operations happen in the first 0.8 s


# -- random schedules ------------------------------------------------------------------------------
def run_schedule(n, seed, drop, dup, max_delay, ops, faults, core=paxos.PaxosCore, stable=False) -> PaxosSim:
    """Plays one schedule, then heals, restarts everyone and probes every key; checks safety.
    ``stable``: which proposers run rounds within terms (PaxosSim)."""
    sim = PaxosSim(n, seed, drop=drop, dup=dup, delay=(0.001, max_delay), core_factory=core, stable=stable)
    extra = 6 - len(ops)  # at most 6 operations in all (before the probes)
    for i, (step, host, keys, holder, kind) in enumerate(ops):
        # kind 0: a release; 1: an acquisition the holder releases again 50-250 ms later (while
        # there is room); else an acquisition it keeps.
        cas = {KEYS[k]: ((holder, None) if kind == 0 else (None, holder)) for k in keys}
        sim.at(step * GRID, sim.propose, sim.hosts[host % n], f"op{i}", cas)
        if kind == 1 and extra > 0:
            extra -= 1
            back = {k: (holder, None) for k in cas}
            sim.at(
                (step + 5 + 5 * (i + host) % 25) * GRID,
                sim.propose,
                sim.hosts[(host + 1) % n],
                f"op{i}-release",
                back,
            )
    for step, kind, host, arg in faults:
        h, t = sim.hosts[host % n], step * GRID
        if kind == "crash":
            sim.at(t, sim.crash, h)
        elif kind == "restart":
            sim.at(t, sim.restart, h, arg * GRID)  # the new clock reads arg*10 ms behind
        elif kind == "rewind":
            # Restarts with a clock reading the time some operation was proposed at again.
            sim.at(t, sim.restart, h, max(0, step - ops[arg % len(ops)][0]) * GRID)
        elif kind == "partition":
            side = {x for j, x in enumerate(sim.hosts) if arg >> j & 1}
            sim.at(t, sim.partition, side, set(sim.hosts) - side)
        else:
            sim.at(t, sim.heal)
    sim.run_until(WINDOW)
    sim.heal()
    for h in sim.hosts:
        sim.restart(h)
    sim.run_until_idle(limit=sim.deadline + 1)
    # Probes after the faults: every key is read (and maybe taken) on top of whatever was left.
    for i, key in enumerate(KEYS):
        sim.propose(sim.hosts[sim.rng.randrange(n)], f"probe{i}", {key: (None, "vm:p")})
    sim.run_until_idle(limit=sim.deadline + 1)
    sim.check_safety()
    return sim


def op_strategy():
    # (step, host, key indexes, holder, kind) — releases are by a named holder, which may or may
    # not hold the keys; acquisitions of the same free key by different holders race.
    return st.tuples(
        st.integers(0, 40),
        st.integers(0, 4),
        st.lists(st.integers(0, len(KEYS) - 1), min_size=1, max_size=3, unique=True),
        st.sampled_from(HOLDERS),
        st.integers(0, 3),
    )


def fault_strategy():
    # (step, kind, host, arg): arg is the restart clock lag in steps, or the partition's bit mask.
    return st.tuples(st.integers(0, 70), st.sampled_from(FAULTS), st.integers(0, 4), st.integers(0, 31))


schedules = st.tuples(
    st.sampled_from([3, 5]),
    st.integers(0, 2**32 - 1),
    st.sampled_from([0.0, 0.05, 0.2]),
    st.sampled_from([0.0, 0.1, 0.3]),
    st.sampled_from([0.005, 0.03, 0.2]),
    st.lists(op_strategy(), min_size=2, max_size=6),
    st.lists(fault_strategy(), max_size=8),
)


@pytest.mark.property
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules)
def test_random_faulty_schedules_are_safe(schedule):
    """1,000 random schedules with drops, duplicates, reordering, partitions, crashes and restarts
    (with clocks reading earlier) and concurrent proposers on the same keys never break safety."""
    run_schedule(*schedule)


def random_schedule(rng: random.Random):
    """The same shape of schedule as the hypothesis strategy, from a plain RNG."""
    n = rng.choice([3, 5])
    ops = [
        (
            rng.randint(0, 40),
            rng.randint(0, 4),
            rng.sample(range(len(KEYS)), rng.randint(1, 3)),
            rng.choice(HOLDERS),
            rng.randint(0, 3),
        )
        for _ in range(rng.randint(2, 6))
    ]
    faults = [
        (rng.randint(0, 70), rng.choice(FAULTS), rng.randint(0, 4), rng.randint(0, 31))
        for _ in range(rng.randint(0, 8))
    ]
    return (
        n,
        rng.getrandbits(32),
        rng.choice([0.0, 0.05, 0.2]),
        rng.choice([0.0, 0.1, 0.3]),
        rng.choice([0.005, 0.03, 0.2]),
        ops,
        faults,
    )


class _NoRepair(paxos.PaxosCore):
    """Mutant: ignores values accepted but not committed (no in-flight repair)."""

    def _on_promise(self, src, m, now):
        entries = {k: (None, None, cb, cv) for k, (ab, av, cb, cv) in m.entries.items()}
        super()._on_promise(src, paxos.Promise(m.op, m.ballot, entries), now)


class _AcceptBelowPromise(paxos.PaxosCore):
    """Mutant: an acceptor accepts whatever ballot it is sent."""

    def _on_accept(self, src, m):
        for k, v in m.values.items():
            self._out.persist.append(("accept", k, m.ballot, v))
            st_ = self.keys.setdefault(k, paxos.KeyState())
            st_.acc_ballot, st_.acc_value = m.ballot, v
        self._out.sends.append((src, paxos.Accepted(m.op, m.ballot)))


@pytest.mark.parametrize("mutant", [_NoRepair, _AcceptBelowPromise])
def test_the_checker_catches_broken_cores(mutant):
    """A core without in-flight repair, or whose acceptors ignore promises, fails the safety checks
    within a few hundred random schedules (the checks are not vacuous)."""
    rng = random.Random(7)
    for _ in range(600):
        try:
            run_schedule(*random_schedule(rng), core=mutant)
        except AssertionError:
            return
    pytest.fail(f"{mutant.__name__} survived 600 schedules")


# -- ballot reserves ------------------------------------------------------------------------------
def _lone_core(now_ms, records=(), reserve_ms=500):
    """A proposer among two silent members: its rounds never end (each operation gets a round of
    its own, up to 64), which leaves its ballots to look at."""
    from vmwebd.dom.hlc import HybridClock

    core = paxos.PaxosCore(
        "h0",
        HybridClock("h0", now_ms),
        random.Random(1),
        ["h0", "h1", "h2"],
        reserve_ms=reserve_ms,
        parallel_rounds=64,
    )
    core.restore(list(records))
    return core


def test_ballots_within_a_reserve_are_recorded_once():
    """The first round records a reserve 500 ms of clock ahead; rounds below it record nothing;
    the first ballot past it records the next. With no reserve, every ballot is recorded."""
    now = [1000]
    core = _lone_core(lambda: now[0])
    outs = []
    for i, at in enumerate([1000, 1001, 1200, 1499, 1500, 1501]):
        now[0] = at
        outs.append(core.propose(f"op{i}", {f"k{i}": (None, "x")}, at / 1000))
    ballots = [[r for r in o.persist if r[0] == "ballot"] for o in outs]
    assert [len(b) for b in ballots] == [1, 0, 0, 0, 1, 0]
    assert ballots[0][0][2] == Version(1500, 0, "h0") and ballots[4][0][2] == Version(2000, 0, "h0")
    assert all(o.started for o in outs)
    every = _lone_core(lambda: now[0], reserve_ms=0)
    out = every.propose("a", {"k": (None, "x")}, 1.5)
    assert [r[2] for r in out.persist if r[0] == "ballot"] == [out.started[0][1]]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["propose", "restart"]), st.integers(0, 900), st.integers(0, 3000)),
        max_size=40,
    )
)
def test_a_restarted_proposer_never_uses_a_ballot_twice(steps):
    """Whatever the proposals, restarts and clock readings going back (up to 3 s) after a
    restart, a proposer restored from its persisted records makes every ballot above every ballot
    it made before: none is used twice."""
    wall = [5000]
    back = [0]
    records: list = []
    core = _lone_core(lambda: wall[0] - back[0])
    used: list[Version] = []
    for n, (what, advance, clock_back) in enumerate(steps):
        wall[0] += advance
        if what == "restart":
            back[0] = clock_back
            core = _lone_core(lambda: wall[0] - back[0], records)
            continue
        out = core.propose(f"op{n}", {f"k{n}": (None, "x")}, wall[0] / 1000)
        records.extend(out.persist)
        for _, ballot, _ in out.started:
            assert all(paxos._gt(ballot, b) for b in used), (ballot, used[-1])
            used.append(ballot)


# -- targeted schedules ---------------------------------------------------------------------------
def test_restart_with_an_earlier_clock_never_reuses_a_ballot():
    """A proposer that crashes after sending an Accept, and restarts with a clock reading earlier,
    never proposes another value at the same ballot (which let a later round overwrite a decided
    lease with the other value, without a release)."""
    sim = PaxosSim(3, seed=1, delay=(0.005, 0.005), thrifty=False)  # every phase asks everyone
    k = KEYS[0]
    # h0's own store is slow: its loopback Prepare is still queued when the remote promises come.
    sim.hold(lambda src, dst, m: src == dst == "h0")
    # Its Accept(vm:a) reaches only h1 before it crashes.
    sim.hold(lambda src, dst, m: src == "h0" and dst == "h2" and isinstance(m, paxos.Accept))
    sim.run_until(0.1)
    sim.propose("h0", "a", {k: (None, "vm:a")})
    sim.run_until(0.125)
    assert sim.accepts[(k, sim.ops["a"].ballots[0], "vm:a")] == {"h1"}
    sim.crash("h0")
    sim.stop_holding()
    sim.drop_held()
    # h0 comes back 100 ms later with a clock that reads 100 ms behind: the same milliseconds again.
    sim.run_until(0.2)
    sim.restart("h0", clock_back=0.1)
    sim.partition({"h0", "h2"}, {"h1"})
    sim.hold(lambda src, dst, m: isinstance(m, paxos.Commit))  # its commits get lost
    sim.propose("h0", "b", {k: (None, "vm:b")})
    assert sim.run_until_done(["b"], limit=1.0)
    assert isinstance(sim.result("b"), paxos.Decided)
    sim.stop_holding()
    sim.drop_held()
    # A later round by h1 gathers its promises from h1 (which accepted vm:a) and h2 (vm:b).
    sim.partition({"h1", "h2"}, {"h0"})
    sim.run_until(sim.now + 0.1)
    sim.propose("h1", "c", {k: (None, "vm:c")})
    assert sim.run_until_done(["c"], limit=3.0)
    sim.check_safety()
    assert sim.result("c") == paxos.Conflict("c", k, "vm:b")


def test_restarted_acceptor_keeps_its_promises():
    """An acceptor restarted from its records (with a clock reading earlier) refuses a Prepare or
    an Accept below the ballot it promised before the crash, and still reports what it accepted."""
    sim = PaxosSim(3, seed=2)
    high, low = Version(5000, 0, "h2"), Version(4000, 0, "h1")
    sim.inject("h2", "h0", paxos.Accept("x", Version(3000, 0, "h2"), {"k": "vm:a"}))
    sim.inject("h2", "h0", paxos.Prepare("p", high, ("k",)))
    sim.crash("h0")
    sim.restart("h0", clock_back=10.0)
    # Restoring observed every recorded ballot: its own next ballot is above them.
    assert sim.cores["h0"].clock.tick() > high
    sim.hold(lambda src, dst, m: src == "h0")
    sim.inject("h1", "h0", paxos.Prepare("q", low, ("k",)))
    sim.inject("h1", "h0", paxos.Accept("q", low, {"k": "vm:b"}))
    sim.inject("h2", "h0", paxos.Prepare("r", Version(6000, 0, "h2"), ("k",)))
    replies = [m for _, _, m in sim.held]
    assert [type(m) for m in replies] == [paxos.Nack, paxos.Nack, paxos.Promise]
    assert replies[0].promised == high and replies[1].promised == high
    assert replies[2].entries["k"][:2] == (Version(3000, 0, "h2"), "vm:a")


# -- liveness in benign conditions ----------------------------------------------------------------
@pytest.mark.parametrize("n", [3, 5])
@pytest.mark.parametrize("stable", [False, "first"])
def test_without_faults_every_operation_completes(n, stable):
    """Without faults, concurrent acquisitions and releases of the same keys from every host all
    end in Decided or Conflict within the deadline, and exactly one acquirer of a free key wins
    (with the first host running its rounds within terms, too)."""
    for seed in range(30):
        sim = PaxosSim(n, seed, delay=(0.001, 0.02), stable=stable)
        rng = random.Random(seed)
        for i, h in enumerate(sim.hosts):
            sim.propose(h, f"acq{i}", {KEYS[0]: (None, HOLDERS[i % 3] + f"/{i}")})
        sim.at(0.01, sim.propose, sim.hosts[0], "batch", {k: (None, "vm:a") for k in KEYS[1:]})
        sim.at(rng.uniform(0, 0.05), sim.propose, sim.hosts[-1], "rel", {KEYS[1]: ("vm:a", None)})
        start = sim.now
        assert sim.run_until_done([f"acq{i}" for i in range(n)] + ["batch", "rel"], limit=sim.deadline)
        sim.check_safety()
        kinds = {op: type(sim.result(op)) for op in sim.ops}
        assert set(kinds.values()) <= {paxos.Decided, paxos.Conflict}, kinds
        assert max(t for rs in sim.results.values() for t, _ in rs) - start < sim.deadline
        winners = [op for op in sim.ops if op.startswith("acq") and kinds[op] is paxos.Decided]
        assert len(winners) == 1, kinds
        # (A winner whose own value was finished by a repair reports nothing left to change.)
        holder = sim.ops[winners[0]].cas[KEYS[0]][1]
        for op in sim.ops:
            if op.startswith("acq") and op not in winners:
                assert sim.result(op) == paxos.Conflict(op, KEYS[0], holder)


@pytest.mark.parametrize("stable", [False, "first"])
@pytest.mark.parametrize("n,down", [(3, ["h2"]), (5, ["h3", "h4"]), (5, ["h0", "h4"])])
def test_a_minority_crashed_still_decides(n, down, stable):
    """With a minority of the acceptors crashed, operations from the live hosts still decide."""
    sim = PaxosSim(n, seed=3, drop=0.05, dup=0.1, delay=(0.001, 0.02), stable=stable)
    for h in down:
        sim.crash(h)
    live = [h for h in sim.hosts if h not in down]
    for i, h in enumerate(live):
        sim.propose(h, f"op{i}", {f"ip/lab/10.0.2.{i}": (None, f"vm:{h}")})
    assert sim.run_until_done(limit=sim.deadline)
    assert all(isinstance(sim.result(op), paxos.Decided) for op in sim.ops)
    sim.check_safety()


@pytest.mark.parametrize("stable", [False, "first"])
@pytest.mark.parametrize("how", ["partition", "crash"])
@pytest.mark.parametrize("n", [3, 5])
def test_without_a_majority_an_operation_fails_with_noquorum_in_time(n, how, stable):
    """With a majority unreachable, an operation fails with NoQuorum within the deadline, saying
    how many acceptors answered (the proposer and the hosts on its side) and how many are needed."""
    sim = PaxosSim(n, seed=4, delay=(0.001, 0.02), stable=stable)
    side = sim.hosts[: (n - 1) // 2]  # h0 (and h1 of 5): a minority
    if how == "partition":
        sim.partition(side, set(sim.hosts) - set(side))
    else:
        for h in sim.hosts[len(side) :]:
            sim.crash(h)
    sim.run_until(0.3)
    start = sim.now
    sim.propose("h0", "op", {KEYS[0]: (None, "vm:a")})
    assert sim.run_until_done(limit=sim.deadline + sim.tick_interval)
    ((t, r),) = sim.results["op"]
    assert r == paxos.NoQuorum("op", reachable=len(side), needed=n // 2 + 1, members=n)
    assert sim.deadline <= t - start <= sim.deadline + sim.tick_interval
    sim.check_safety()


# -- batching ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [3, 5])
def test_sixty_four_keys_decide_in_one_round(n):
    """One operation over 64 keys is decided with one Prepare and one Accept per acceptor of a
    majority, and every acceptor then has all 64 committed."""
    sim = PaxosSim(n, seed=5, delay=(0.001, 0.005))
    keys = [f"ip/lab/10.0.1.{i}" for i in range(64)]
    sim.propose("h0", "batch", {k: (None, "vm:x") for k in keys})
    assert sim.run_until_done(limit=sim.deadline)
    r = sim.result("batch")
    assert isinstance(r, paxos.Decided) and r.values == {k: "vm:x" for k in keys}
    assert sim.rounds("batch") == 1
    # Thrifty: each phase asks a bare majority (this host and the nearest others).
    assert sim.sent["Prepare"] == sim.majority and sim.sent["Accept"] == sim.majority
    sim.run_until(sim.now + 0.1)
    for h in sim.hosts:
        assert all(sim.cores[h].committed(k) == (r.ballot, "vm:x") for k in keys)
    sim.check_safety()


# -- batching and the transport (bundles, inline answers) --------------------------------------------
BATCH_KEYS = tuple(f"ip/lab/10.0.3.{i}" for i in range(6))


def run_batched_schedule(n, seed, drop, dup, max_delay, inline, bundle, parallel, ops, faults):
    """Bursts of operations at few hosts (so rounds carry several), over a transport with or
    without bundles and inline answers, with faults; then heals, probes and checks safety."""
    sim = PaxosSim(
        n,
        seed,
        drop=drop,
        dup=dup,
        delay=(0.001, max_delay),
        inline=inline,
        bundle=bundle,
        parallel_rounds=parallel,
    )
    for i, (step, host, keys, holder, release) in enumerate(ops):
        cas = {BATCH_KEYS[k]: ((holder, None) if release else (None, holder)) for k in keys}
        sim.at(step * GRID, sim.propose, sim.hosts[host % min(n, 2)], f"op{i}", cas)
    for step, kind, host, arg in faults:
        h, t = sim.hosts[host % n], step * GRID
        if kind == "crash":
            sim.at(t, sim.crash, h)
        elif kind in ("restart", "rewind"):
            sim.at(t, sim.restart, h, arg * GRID)
        elif kind == "partition":
            side = {x for j, x in enumerate(sim.hosts) if arg >> j & 1}
            sim.at(t, sim.partition, side, set(sim.hosts) - side)
        else:
            sim.at(t, sim.heal)
    sim.run_until(WINDOW)
    sim.heal()
    for h in sim.hosts:
        sim.restart(h)
    sim.run_until_idle(limit=sim.deadline * sim.cores[sim.hosts[0]].contended_factor + 1)
    for i, key in enumerate(BATCH_KEYS):
        sim.propose(sim.hosts[i % n], f"probe{i}", {key: (None, "vm:p")})
    sim.run_until_idle(limit=sim.deadline * 5 + 1)
    sim.check_safety()
    return sim


batched_schedules = st.tuples(
    st.sampled_from([3, 5]),
    st.integers(0, 2**32 - 1),
    st.sampled_from([0.0, 0.1, 0.3]),
    st.sampled_from([0.0, 0.1, 0.3]),
    st.sampled_from([0.005, 0.03, 0.1]),
    st.booleans(),
    st.booleans(),
    st.sampled_from([1, 2, 3]),
    st.lists(
        st.tuples(
            st.integers(0, 12),
            st.integers(0, 1),
            st.lists(st.integers(0, len(BATCH_KEYS) - 1), min_size=1, max_size=3, unique=True),
            st.sampled_from(HOLDERS),
            st.booleans(),
        ),
        min_size=2,
        max_size=12,
    ),
    st.lists(fault_strategy(), max_size=6),
)


@pytest.mark.property
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batched_schedules)
def test_random_batched_schedules_are_safe(schedule):
    """Bursts of operations batched into shared rounds, answers inline or as requests, messages
    bundled or not, with drops, duplicates, reordering, partitions, crashes and restarts: the
    same safety checks hold for every operation of every batch."""
    run_batched_schedule(*schedule)


def test_the_checker_catches_a_broken_core_in_batched_schedules():
    """Without in-flight repair, batched schedules with faults break safety too (the batched
    property test is not vacuous)."""
    rng = random.Random(11)
    for _ in range(600):
        n = rng.choice([3, 5])
        ops = [
            (
                rng.randint(0, 12),
                rng.randint(0, 1),
                rng.sample(range(len(BATCH_KEYS)), rng.randint(1, 3)),
                rng.choice(HOLDERS),
                rng.random() < 0.3,
            )
            for _ in range(rng.randint(2, 12))
        ]
        faults = [
            (rng.randint(0, 70), rng.choice(FAULTS), rng.randint(0, 4), rng.randint(0, 31))
            for _ in range(rng.randint(0, 6))
        ]
        sim_args = (
            n,
            rng.getrandbits(32),
            rng.choice([0.0, 0.1, 0.3]),
            rng.choice([0.0, 0.1, 0.3]),
            rng.choice([0.005, 0.03, 0.1]),
            rng.random() < 0.5,
            rng.random() < 0.5,
            rng.choice([1, 2, 3]),
            ops,
            faults,
        )
        try:
            _run_with_core(_NoRepair, *sim_args)
        except AssertionError:
            return
    pytest.fail("_NoRepair survived 600 batched schedules")


def _run_with_core(core, *args):
    original = PaxosSim.__init__

    def init(self, *a, **kw):
        original(self, *a, core_factory=core, **kw)

    PaxosSim.__init__ = init
    try:
        return run_batched_schedule(*args)
    finally:
        PaxosSim.__init__ = original


def test_operations_asked_during_a_round_share_the_next_one():
    """Ten operations on distinct keys asked at once at one host: one round starts at once, a
    second one beside it, and the other eight share a third ballot; all are decided."""
    sim = PaxosSim(3, seed=8, delay=(0.002, 0.004))
    for i in range(10):
        sim.propose("h0", f"op{i}", {f"ip/lab/10.0.4.{i}": (None, f"vm:{i}")})
    assert sim.run_until_done(limit=1.0)
    assert all(isinstance(sim.result(f"op{i}"), paxos.Decided) for i in range(10))
    ballots = {sim.result(f"op{i}").ballot for i in range(10)}
    assert len(ballots) == 3
    assert sim.sent["Prepare"] == 3 * sim.majority
    sim.check_safety()


def test_a_conflict_in_a_batch_does_not_hold_up_the_others():
    """Of three operations in one round, the one whose key is held by someone else gets its
    Conflict, and the two others are decided at that same ballot."""
    sim = PaxosSim(3, seed=9, delay=(0.002, 0.004), parallel_rounds=1)
    sim.propose("h1", "held", {"ip/lab/10.0.5.1": (None, "vm:other")})
    assert sim.run_until_done(limit=1.0)
    sim.run_until(sim.now + 0.05)
    sim.propose("h0", "first", {"ip/lab/10.0.5.9": (None, "vm:a")})  # the round the others wait for
    for i, key in enumerate(["ip/lab/10.0.5.1", "ip/lab/10.0.5.2", "ip/lab/10.0.5.3"]):
        sim.propose("h0", f"b{i}", {key: (None, "vm:a")})
    assert sim.run_until_done(limit=1.0)
    assert sim.result("b0") == paxos.Conflict("b0", "ip/lab/10.0.5.1", "vm:other")
    b1, b2 = sim.result("b1"), sim.result("b2")
    assert isinstance(b1, paxos.Decided) and isinstance(b2, paxos.Decided) and b1.ballot == b2.ballot
    assert sim.rounds("b0") == sim.rounds("b1") == 1
    sim.check_safety()


def test_an_operation_on_a_key_in_flight_waits_for_the_repair_and_the_others_go_on():
    """A round finds one key accepted but not committed (a proposer died mid-round): that value
    is repaired in the same Accept as the other operations' values, which are decided then;
    the operation on that key is decided (or conflicts) on the next ballot, after the repair."""
    sim = PaxosSim(3, seed=10, delay=(0.002, 0.004), parallel_rounds=1)
    k = "ip/lab/10.0.6.1"
    sim.hold(lambda src, dst, m: src == "h2" and isinstance(m, paxos.Commit))
    sim.propose("h2", "gone", {k: (None, "vm:dead")})
    assert sim.run_until_done(["gone"], limit=1.0)
    sim.crash("h2")  # decided, but its Commit never left
    sim.stop_holding()
    sim.drop_held()
    sim.propose("h0", "first", {"ip/lab/10.0.6.9": (None, "vm:a")})
    sim.propose("h0", "on-k", {k: (None, "vm:a")})
    sim.propose("h0", "other", {"ip/lab/10.0.6.2": (None, "vm:a")})
    assert sim.run_until_done(limit=1.0)
    assert sim.result("on-k") == paxos.Conflict("on-k", k, "vm:dead")
    assert isinstance(sim.result("other"), paxos.Decided)
    assert sim.rounds("other") == 1 and sim.rounds("on-k") == 2
    sim.check_safety()


@pytest.mark.parametrize(
    "inline, thrifty, requests", [(False, False, 10), (True, False, 6), (False, True, 6), (True, True, 4)]
)
def test_answers_inline_and_thrifty_phases_save_requests(inline, thrifty, requests):
    """One uncontended operation at three hosts: with every answer a request of its own and
    every phase asking both others, 10 requests; answers riding back inline, 6 (Prepare, Accept,
    Commit to each); phases asking a bare majority, 6 or, with inline answers, 4 (Prepare and
    Accept to one other host, the Commit to both)."""
    sim = PaxosSim(3, seed=12, delay=(0.002, 0.002), inline=inline, thrifty=thrifty)
    sim.propose("h0", "op", {"ip/lab/10.0.7.1": (None, "vm:a")})
    assert sim.run_until_done(limit=1.0)
    sim.run_until(sim.now + 0.05)
    assert isinstance(sim.result("op"), paxos.Decided)
    assert sim.requests == requests


def test_a_commit_and_the_next_prepare_travel_in_one_bundle():
    """With one round at a time and work waiting, the Commit of a round and the Prepare of the
    next go to each acceptor in one request."""
    counts = {}
    for bundle in (False, True):
        sim = PaxosSim(3, seed=13, delay=(0.002, 0.002), bundle=bundle, parallel_rounds=1, thrifty=False)
        for i in range(3):
            sim.propose("h0", f"op{i}", {"ip/lab/10.0.8.1": (None if i == 0 else f"vm:{i - 1}", f"vm:{i}")})
        assert sim.run_until_done(limit=1.0)
        sim.run_until(sim.now + 0.05)
        assert [type(sim.result(f"op{i}")) for i in range(3)] == [paxos.Decided] * 3
        counts[bundle] = sim.requests
    assert counts[True] == counts[False] - 2 * 2


# -- waiting operations and large values -------------------------------------------------------------
def test_an_operation_waiting_behind_a_slow_round_is_not_failed_as_without_a_majority():
    """With one round at a time, an operation queued behind a round whose Accepts are slow waits
    for it: every acceptor answers the proposer, so the queued one gets the contended deadline
    and is decided once the round ahead ends; it never fails saying nobody answered."""
    sim = PaxosSim(3, seed=5, parallel_rounds=1, deadline=1.0)
    k = KEYS[0]
    sim.hold(lambda src, dst, m: isinstance(m, paxos.Accept))
    sim.propose("h0", "first", {k: (None, "vm:a")})
    sim.propose("h0", "second", {k: ("vm:a", None)})
    sim.run_until(2.0)  # past the deadline of both: neither has failed
    assert sim.result("first") is None and sim.result("second") is None
    sim.stop_holding()
    sim.release()
    assert sim.run_until_done(["first", "second"], limit=5.0)
    assert isinstance(sim.result("first"), paxos.Decided)
    assert isinstance(sim.result("second"), paxos.Decided)
    sim.check_safety()


def test_a_queued_operation_without_a_majority_still_fails_fast():
    """The same queue with the majority gone: the queued operation fails with NoQuorum at its
    deadline, counting the one host it heard."""
    sim = PaxosSim(3, seed=6, parallel_rounds=1, deadline=1.0)
    k = KEYS[0]
    sim.partition({"h0"}, {"h1", "h2"})
    sim.propose("h0", "first", {k: (None, "vm:a")})
    sim.propose("h0", "second", {k: ("vm:a", None)})
    assert sim.run_until_done(["first", "second"], limit=1.0 + 2 * sim.tick_interval)
    assert sim.result("second") == paxos.NoQuorum("second", reachable=1, needed=2, members=3)


def _big(tag: str, n: int = 40) -> str:
    return ",".join(f"{tag}{i:04d}:token:1:64" for i in range(n))


@pytest.mark.parametrize("elide_at", [None, paxos.BIG_VALUE])
def test_large_values_cross_the_wire_once_per_change(elide_at):
    """A key holding a large value, changed again and again: with elision a Promise names the
    committed value the proposer has (KNOWN) and a Commit to an acceptor that accepted names
    its accepted value; without, both carry it whole. Same decisions either way."""
    from lxml import etree

    from vmwebd.gossip.codec import encode
    from vmwebd.gossip.messages import Envelope

    sim = PaxosSim(3, seed=7, elide_at=elide_at)
    k = "cap/host1"
    value = None
    for i in range(6):
        new = _big(f"v{i}-")
        sim.propose("h0", f"op{i}", {k: (value, new)})
        assert sim.run_until_done([f"op{i}"], limit=3.0)
        assert isinstance(sim.result(f"op{i}"), paxos.Decided)
        value = new
    sim.run_until(sim.now + 0.5)  # the last Commit reaches every acceptor
    sim.check_safety(registers=("cap/",))
    for h in sim.hosts:
        assert sim.cores[h].committed(k)[1] == value
    # What the last round's messages weigh on the wire.
    sim.propose("h0", "last", {k: (value, _big("z-"))})
    seen = []
    sim.hold(lambda src, dst, m: src != dst and (seen.append(m) or False))
    assert sim.run_until_done(["last"], limit=3.0)
    sizes: dict[str, list] = {}
    for m in seen:
        env = Envelope(src="h0", src_addr="127.0.0.1:1", dst="h1", msg=m)
        sizes.setdefault(type(m).__name__, []).append(len(etree.tostring(encode(env))))
    small = {kind: sum(1 for n in ns if n < len(value) / 2) for kind, ns in sizes.items()}
    if elide_at is None:
        assert small.get("Promise", 0) == 0 and small.get("Commit", 0) == 0
    else:
        # Every Promise; the Commit to each acceptor whose Accepted was heard (the one outside
        # the bare majority asked gets the value whole).
        assert small["Promise"] == len(sizes["Promise"]) >= 1
        assert small["Commit"] >= 1
    assert min(sizes["Accept"]) > len(value)  # the new value itself travels once


def test_answers_slower_than_the_retry_timer_count_as_a_majority_answering():
    """On a network slower than the proposer's first retries (every message takes over a
    second), the answers to a ballot already given up still show that a majority is there: the
    operation is not failed at the deadline as without a majority, and is decided once the
    retries wait long enough."""
    sim = PaxosSim(3, seed=8, delay=(1.2, 1.5), deadline=3.0)
    sim.propose("h0", "slow", {KEYS[0]: (None, "vm:a")})
    assert sim.run_until_done(["slow"], limit=sim.deadline * 5 + 1)
    assert isinstance(sim.result("slow"), paxos.Decided), sim.result("slow")
    sim.check_safety()


@pytest.mark.parametrize("seed", range(3))
def test_the_retry_timer_waits_for_members_slower_than_it(seed):
    """Members that take 0.8-1 s to answer a Prepare (an overloaded grid): once the proposer
    has heard how slow they are, it no longer gives up each ballot just before its answers
    arrive. Eight operations one after another are all decided with at most 5 Prepares each
    (with a fixed 0.5 s first retry: 54-100 Prepares for the eight)."""
    sim = PaxosSim(3, seed=seed, delay=(0.4, 0.5), deadline=3.0)
    for i in range(8):
        sim.propose("h0", f"op{i}", {f"ip/lab/10.0.0.{i + 1}": (None, "vm:a")})
        assert sim.run_until_done([f"op{i}"], limit=sim.deadline * 5 + 1)
        assert isinstance(sim.result(f"op{i}"), paxos.Decided), sim.result(f"op{i}")
    assert sim.sent["Prepare"] <= 8 * 5 + 2, dict(sim.sent)
    sim.check_safety()


# -- terms: phase 1 once for many rounds ------------------------------------------------------------
@pytest.mark.property
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules, st.sampled_from(["first", True]))
def test_random_faulty_schedules_are_safe_within_terms(schedule, stable):
    """The same random faulty schedules with rounds run within terms: by the grid's one
    proposer (the others running both phases), or by every proposer at once (each taking terms
    from the others): safety holds."""
    run_schedule(*schedule, stable=stable)


class _TermIgnored(paxos.PaxosCore):
    """Mutant: an acceptor takes any ballot its per-key promises allow, whatever term it
    promised."""

    def _bound(self, ballot, keys):
        term, self.term = self.term, None
        try:
            return super()._bound(ballot, keys)
        finally:
            self.term = term


class _StartKept(paxos.PaxosCore):
    """Mutant: a new term of the same proposer keeps the start of the one before (its ballots
    from before stay allowed, though its new term never learns what they set)."""

    def _term_span(self, owner, m, end):
        if self.term is not None and self.term[0] == owner:
            return min(m.ballot, self.term[1]), max(end, self.term[2])
        return m.ballot, end


class _DirectBesideRepairs(paxos.PaxosCore):
    """Mutant: rounds skip phase 1 while a round of ours with both phases (repairs) is out."""

    def _may_skip_phase1(self, rnd):
        return True


@pytest.mark.parametrize("mutant", [_TermIgnored, _DirectBesideRepairs])
def test_the_checker_catches_broken_terms(mutant):
    """Each way of getting terms wrong found while building them breaks the safety checks
    within a few hundred random schedules with every proposer taking terms."""
    rng = random.Random(3)
    for _ in range(800):
        try:
            run_schedule(*random_schedule(rng), core=mutant, stable=True)
        except AssertionError:
            return
    pytest.fail(f"{mutant.__name__} survived 800 schedules")


@pytest.mark.parametrize("n", [3, 5])
def test_within_a_term_a_lease_is_one_accept_phase(n):
    """At the grid's proposer, the first operation takes a term (one prepare for every key);
    the operations after it are phase 2 alone: an Accept to a bare majority and the Commit,
    no Prepare; decided in one round trip of the simulated network and this host's own
    acceptance (asked once another acceptor has accepted)."""
    sim = PaxosSim(n, seed=21, delay=(0.002, 0.002), stable="first")
    sim.propose("h0", "first", {"ip/lab/10.0.9.1": (None, "vm:a")})
    assert sim.run_until_done(limit=1.0)
    sim.run_until(sim.now + 0.05)
    assert sim.sent["Prepare"] == n // 2 + 1  # the term prepare, to a bare majority
    before = dict(sim.sent)
    for i in range(5):
        sim.propose("h0", f"op{i}", {f"ip/lab/10.0.9.{i + 2}": (None, "vm:b")})
        t = sim.now
        assert sim.run_until_done([f"op{i}"], limit=1.0)
        assert isinstance(sim.result(f"op{i}"), paxos.Decided)
        # to an acceptor and back, then to our own and back (a hop each way, in the simulator)
        assert sim.now - t <= 4 * 0.002 + 1e-9
    assert sim.sent["Prepare"] == before["Prepare"]
    assert sim.sent["Accept"] - before["Accept"] == 5 * (n // 2 + 1)


def test_within_a_term_a_conflict_and_a_read_wait_for_a_majority():
    """Within a term, an operation that finds its key held, or finds nothing to change, is
    answered once a majority accepted the round's reads (never from this host's view alone):
    with every Accept held, neither has an answer; released, both do."""
    sim = PaxosSim(3, seed=22, delay=(0.002, 0.002), stable="first")
    k = "ip/lab/10.0.10.1"
    sim.propose("h0", "take", {k: (None, "vm:a")})
    assert sim.run_until_done(limit=1.0)
    sim.hold(lambda src, dst, m: isinstance(m, paxos.Accept))
    sim.propose("h0", "again", {k: (None, "vm:a")})  # nothing to change
    sim.propose("h0", "rival", {k: (None, "vm:b")})  # held by vm:a
    sim.run_until(sim.now + 0.1)
    assert sim.result("again") is None and sim.result("rival") is None
    sim.stop_holding()
    sim.release()
    assert sim.run_until_done(limit=1.0)
    assert sim.result("again") == paxos.Decided("again", None, {})
    assert isinstance(sim.result("rival"), paxos.Conflict) and sim.result("rival").holder == "vm:a"
    sim.check_safety()


def test_another_proposer_ends_the_term_and_both_decide():
    """A proposer running both phases (a stand-in for an unreachable grid proposer) is refused
    below the term, goes above it, and decides; the term's holder, refused in turn on that key,
    takes a new term that learns the value and conflicts truthfully."""
    sim = PaxosSim(3, seed=23, delay=(0.002, 0.004), stable="first")
    k = "ip/lab/10.0.11.1"
    sim.propose("h0", "warm", {"ip/lab/10.0.11.9": (None, "vm:a")})
    assert sim.run_until_done(limit=1.0)
    sim.propose("h1", "plain", {k: (None, "vm:b")})
    assert sim.run_until_done(limit=2.0)
    assert isinstance(sim.result("plain"), paxos.Decided)
    sim.propose("h0", "late", {k: (None, "vm:a")})
    assert sim.run_until_done(limit=2.0)
    assert sim.result("late").holder == "vm:b"
    sim.check_safety()


def test_a_term_prepare_names_only_what_differs():
    """An acceptor answers a term prepare with the keys whose committed values differ from the
    proposer's (by digest bucket) and the keys in flight, not its whole table."""
    sim = PaxosSim(3, seed=24, delay=(0.002, 0.002))
    for i in range(40):
        sim.propose("h1", f"fill{i}", {f"ip/lab/10.0.12.{i}": (None, "vm:a")})
    assert sim.run_until_done(limit=5.0)
    sim.run_until(sim.now + 0.1)  # every Commit in
    core = sim.cores["h0"]
    digest = tuple(core._digest)
    assert any(digest) and digest == tuple(sim.cores["h2"]._digest)
    core.receive(
        "h2",
        paxos.Prepare("t", Version(10**6, 0, "h2"), (), end=Version(10**6 + 9, 0, "h2"), digest=digest),
        1.0,
    )
    out = core.receive(
        "h2",
        paxos.Prepare("u", Version(10**6 + 1, 0, "h2"), (), end=Version(10**6 + 9, 0, "h2"), digest=digest),
        1.0,
    )
    assert [m.entries for _, m in out.sends] == [{}]
    stale = list(digest)
    b = paxos.bucket_of("ip/lab/10.0.12.7")
    stale[b] ^= 1
    out = core.receive(
        "h2",
        paxos.Prepare(
            "v", Version(10**6 + 2, 0, "h2"), (), end=Version(10**6 + 9, 0, "h2"), digest=tuple(stale)
        ),
        1.0,
    )
    (promise,) = [m for _, m in out.sends]
    assert promise.whole and "ip/lab/10.0.12.7" in promise.entries
    assert all(paxos.bucket_of(key) == b for key in promise.entries)


@pytest.mark.parametrize("core, safe", [(paxos.PaxosCore, True), (_StartKept, False)])
def test_a_late_accept_from_a_term_given_up_is_refused(core, safe):
    """An Accept of a round its proposer gave up (no answer until its deadline) that arrives
    once the proposer holds a new term is refused: the new term never learnt its value, so a
    later round would give the key to another holder. Kept from the term before, as the
    mutant does, it is taken and the key ends up held twice."""
    sim = PaxosSim(3, seed=25, delay=(0.002, 0.002), stable="first", core_factory=core)
    k = "ip/lab/10.0.13.1"
    sim.propose("h0", "warm", {"ip/lab/10.0.13.9": (None, "vm:w")})
    assert sim.run_until_done(limit=1.0)
    sim.hold(lambda src, dst, m: isinstance(m, paxos.Accept) and k in m.values)
    sim.propose("h0", "lost", {k: (None, "vm:a")})
    assert sim.run_until_done(["lost"], limit=30.0)
    assert isinstance(sim.result("lost"), paxos.NoQuorum)
    sim.stop_holding()
    first = min(m.ballot for _, _, m in sim.held)
    sim.propose("h0", "warm2", {"ip/lab/10.0.13.8": (None, "vm:w")})  # a new term
    assert sim.run_until_done(["warm2"], limit=1.0)
    sim.release(lambda src, dst, m: m.ballot == first)
    sim.drop_held()
    sim.run_until(sim.now + 0.05)
    sim.propose("h0", "other", {k: (None, "vm:b")})
    assert sim.run_until_done(limit=5.0)
    if safe:
        sim.check_safety()
        assert sim.result("other") == paxos.Decided("other", sim.result("other").ballot, {k: "vm:b"})
    else:
        with pytest.raises(AssertionError, match="went from 'vm:a' to 'vm:b'"):
            sim.check_safety()


def test_within_a_term_an_operation_without_a_majority_leaves_nothing_in_flight():
    """Within a term, with every other acceptor gone, an operation fails with NoQuorum and no
    acceptor has taken its value (our own accepts only after another did): once the others
    are back, a new operation on the key finds it free."""
    sim = PaxosSim(3, seed=26, delay=(0.002, 0.002), stable="first")
    k = "ip/lab/10.0.14.1"
    sim.propose("h0", "warm", {"ip/lab/10.0.14.9": (None, "vm:w")})
    assert sim.run_until_done(limit=1.0)
    sim.run_until(sim.now + 0.05)  # every answer in
    sim.partition({"h0"}, {"h1", "h2"})
    sim.propose("h0", "cut", {k: (None, "vm:a")})
    assert sim.run_until_done(["cut"], limit=10.0)
    assert isinstance(sim.result("cut"), paxos.NoQuorum)
    assert not [key for key, _, _ in sim.accepts if key == k]
    sim.heal()
    sim.propose("h0", "after", {k: (None, "vm:b")})
    assert sim.run_until_done(["after"], limit=10.0)
    assert isinstance(sim.result("after"), paxos.Decided)
    sim.check_safety()
