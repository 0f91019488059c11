"""A small deterministic simulator for Paxos cores, and the safety checker that goes with it.

N acceptor hosts, each a :class:`~vmwebd.lease.paxos.PaxosCore`, on a simulated network with
per-message random drop, duplication and delay (so reordering), partitions and heal; hosts crash
(the core and everything not persisted is gone) and restart (a new core restored from exactly the
records the old one emitted, with a fresh :class:`~vmwebd.dom.hlc.HybridClock` that may read an
earlier wall time). Time is simulated; one seeded :class:`random.Random` drives everything.

The simulator carries out a core's :class:`~vmwebd.lease.paxos.Output` the way ``LeaseService``
does: the ``persist`` records are written to the host's disk BEFORE its ``sends`` enter the network
(persist before send). A host reaches itself without loss, after a delay, like the service's
loopback; a crash loses those messages too.

It also carries messages the way the peer transport does: the messages of one output for one
host travel as one request (a bundle: lost, duplicated and delayed together, taken in order), and
a host's answers to the host whose request it is handling ride back on that request's response
(inline: lost with it, and answered again when the request is duplicated) instead of travelling
as requests of their own. Both can be turned off (``bundle``, ``inline``), as for an older peer.

It also records what safety is judged on: every acceptance (who accepted which value for which key
at which ballot, and when a majority was reached — the value is then *chosen*), every commit an
acceptor recorded, and every result with its time. :meth:`PaxosSim.check_safety` checks them.

Used by ``tests/test_paxos.py``; reusable by a benchmark (``sent`` counts messages by kind,
``requests`` the peer requests they took).
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from vmwebd.dom.hlc import HybridClock
from vmwebd.lease import paxos


@dataclass
class Proposal:
    host: str
    cas: dict
    at: float
    ballots: list = field(default_factory=list)  # every ballot the proposer used, in order


class PaxosSim:
    """N Paxos hosts on a faulty simulated network; see the module docstring."""

    def __init__(
        self,
        n: int = 3,
        seed: int = 0,
        *,
        drop: float = 0.0,
        dup: float = 0.0,
        delay: tuple[float, float] = (0.001, 0.010),
        retry_after: float = 0.5,
        deadline: float = 3.0,
        tick_interval: float = 0.05,
        core_factory=paxos.PaxosCore,
        inline: bool = True,
        bundle: bool = True,
        parallel_rounds: int = 2,
        thrifty: bool = True,
        elide_at: int | None | str = "mixed",
        stable: bool | str = False,
    ):
        self.core_factory = core_factory  # PaxosCore, or a variant under test
        self.inline = inline  # answers ride back on the request's response
        self.bundle = bundle  # one request per host for an output's messages
        self.parallel_rounds = parallel_rounds
        self.thrifty = thrifty  # phases ask a bare majority first
        # Values named by ballot instead of carried from this length on (PaxosCore.elide_at);
        # "mixed": each core draws every value (1) or the daemon's threshold, so schedules
        # cover both paths and grids where proposers differ.
        self.elide_at = elide_at
        # Proposers running rounds within terms (PaxosCore.stable): all, none, or "first" (the
        # first host only: one proposer for the grid, the others plain, as the service runs them).
        self.stable = stable
        self._elide_rng = random.Random(seed * 7919 + 1)  # apart: other draws stay as they were
        self.rng = random.Random(seed)
        self.hosts = [f"h{i}" for i in range(n)]
        self.majority = n // 2 + 1
        self.drop, self.dup, self.delay = drop, dup, delay
        self.retry_after, self.deadline = retry_after, deadline
        self.tick_interval = tick_interval
        self.now = 0.0
        self._events: list = []  # (time, seq, kind, payload)
        self._seq = itertools.count()
        self.disk: dict[str, list] = {h: [] for h in self.hosts}
        self.cores: dict[str, paxos.PaxosCore | None] = {}
        self.groups: list[set] | None = None  # None: everyone reaches everyone
        self.ops: dict[str, Proposal] = {}
        self.results: dict[str, list] = defaultdict(list)  # op -> [(time, result)]
        # (key, ballot, value) -> hosts that accepted it; and when a majority first had.
        self.accepts: dict[tuple, set] = defaultdict(set)
        self.chosen_at: dict[tuple, float] = {}
        self.commits: list = []  # (time, host, Commit) applied by an acceptor
        self.sent: Counter = Counter()  # message kind -> number sent
        self.requests = 0  # peer requests (a bundle or an inline answer is one)
        self.crashes = 0
        self._holds: list = []
        self._held: list = []  # (src, dst, msg) held back by ``hold``
        for h in self.hosts:
            self.cores[h] = self._boot(h, clock_back=0.0)
        self._push(self.tick_interval, "tick", None)

    # -- hosts ------------------------------------------------------------------------------
    def _boot(self, h: str, clock_back: float) -> paxos.PaxosCore:
        def now_ms(back=clock_back):
            return max(0, int(round((self.now - back) * 1000)))

        core = self.core_factory(
            h,
            HybridClock(h, now_ms),
            random.Random(self.rng.getrandbits(64)),
            self.hosts,
            retry_after=self.retry_after,
            deadline=self.deadline,
            parallel_rounds=self.parallel_rounds,
            thrifty=self.thrifty,
            elide_at=self._elide_at(),
            stable=self.stable is True or (self.stable == "first" and h == self.hosts[0]),
        )
        core.restore(list(self.disk[h]))
        return core

    def _elide_at(self) -> int | None:
        if self.elide_at == "mixed":
            return self._elide_rng.choice((1, paxos.BIG_VALUE))
        return self.elide_at

    def alive(self, h: str) -> bool:
        return self.cores[h] is not None

    def crash(self, h: str) -> None:
        """Drops the core: its operations and every message on the way to it are lost."""
        if self.cores[h] is None:
            return
        self.cores[h] = None
        self.crashes += 1
        self._events = [e for e in self._events if not (e[2] in ("msg", "unit") and e[3][1] == h)]
        self._held = [m for m in self._held if m[1] != h]
        heapq.heapify(self._events)

    def restart(self, h: str, clock_back: float = 0.0) -> None:
        """A new core restored from the host's records; its clock reads ``clock_back`` s behind."""
        if self.cores[h] is None:
            self.cores[h] = self._boot(h, clock_back)

    # -- network ----------------------------------------------------------------------------
    def partition(self, *groups) -> None:
        """Only hosts in the same group reach each other (hosts in no group reach nobody)."""
        self.groups = [set(g) for g in groups]

    def heal(self) -> None:
        self.groups = None

    def reachable(self, a: str, b: str) -> bool:
        return a == b or self.groups is None or any(a in g and b in g for g in self.groups)

    def _push(self, at: float, kind: str, payload) -> None:
        heapq.heappush(self._events, (at, next(self._seq), kind, payload))

    def hold(self, pred) -> None:
        """From now on, messages with ``pred(src, dst, msg)`` true are held back when sent, until
        released or dropped (for targeted schedules)."""
        self._holds.append(pred)

    def stop_holding(self) -> None:
        """Holds no more new messages (those already held stay held)."""
        self._holds.clear()

    @property
    def held(self) -> list:
        """The messages held back: (src, dst, msg)."""
        return list(self._held)

    def release(self, pred=None) -> None:
        """Sends the held messages with ``pred(src, dst, msg)`` true (default: all) now."""
        keep = []
        for src, dst, msg in self._held:
            if pred is None or pred(src, dst, msg):
                self._push(self.now + self.rng.uniform(*self.delay), "msg", (src, dst, msg))
            else:
                keep.append((src, dst, msg))
        self._held = keep

    def drop_held(self, pred=None) -> None:
        """Loses the held messages with ``pred(src, dst, msg)`` true (default: all)."""
        self._held = [m for m in self._held if pred is not None and not pred(*m)]

    def _send(self, src: str, dst: str, msgs: list, answer: bool = False) -> None:
        """Sends ``msgs`` from ``src`` to ``dst`` as one request (a bundle of one or more
        messages). A request that asks for answers inline (``inline``) gets the receiver's
        messages back to ``src`` on its response; ``answer``: this is such a response. Lost,
        duplicated and delayed as a whole: a duplicated request is answered twice."""
        for msg in msgs:
            self.sent[type(msg).__name__] += 1
        if self._holds:
            held = [m for m in msgs if any(pred(src, dst, m) for pred in self._holds)]
            self._held.extend((src, dst, m) for m in held)
            msgs = [m for m in msgs if not any(m is x for x in held)]
            if not msgs:
                return
        lo, hi = self.delay
        if src == dst:
            # The service's loopback: never lost, but the local store's fsync delays it like a
            # network hop, so remote answers may come first.
            for msg in msgs:
                self._push(self.now + self.rng.uniform(lo, hi), "msg", (src, dst, msg))
            return
        self.requests += 0 if answer else 1
        unit = (src, dst, tuple(msgs), self.inline and not answer)
        if self.rng.random() < self.drop:
            return
        self._push(self.now + self.rng.uniform(lo, hi), "unit", unit)
        if self.rng.random() < self.dup:
            self._push(self.now + self.rng.uniform(lo, hi), "unit", unit)

    # -- carrying out a core's output -------------------------------------------------------
    def _carry(self, h: str, out: paxos.Output, reply_to: str | None = None) -> None:
        """Carries out host ``h``'s output; with ``reply_to``, what goes to that host rides on
        the response of the request being answered."""
        # Persist before send: the records are on disk before any message leaves.
        for rec in out.persist:
            self.disk[h].append(rec)
            kind, key, ballot, value = rec
            if kind == "accept":
                hosts = self.accepts[(key, ballot, value)]
                hosts.add(h)
                if len(hosts) >= self.majority:
                    self.chosen_at.setdefault((key, ballot, value), self.now)
        for c in out.commits:
            self.commits.append((self.now, h, c))
        for _, ballot, op_ids in out.started:
            for op_id in op_ids:
                if op_id in self.ops:
                    bl = self.ops[op_id].ballots
                    if not bl or bl[-1] != ballot:
                        bl.append(ballot)
        by_dst: dict[str, list] = {}
        for dst, msg in out.sends:
            by_dst.setdefault(dst, []).append(msg)
        for dst, msgs in by_dst.items():
            answer = dst == reply_to and dst != h
            if self.bundle or answer or dst == h:
                self._send(h, dst, msgs, answer=answer)
            else:
                for msg in msgs:
                    self._send(h, dst, [msg])
        for r in out.results:
            self.results[r.op].append((self.now, r))

    def propose(self, h: str, op_id: str, cas: dict) -> None:
        """Starts operation ``op_id`` at host ``h`` now (nothing happens if ``h`` is down)."""
        assert op_id not in self.ops, f"operation id {op_id} used twice"
        self.ops[op_id] = Proposal(h, dict(cas), self.now)
        core = self.cores[h]
        if core is not None:
            self._carry(h, core.propose(op_id, cas, self.now))

    def inject(self, src: str, dst: str, msg) -> None:
        """Delivers ``msg`` to ``dst`` now, as if ``src`` had sent it (for targeted schedules)."""
        core = self.cores[dst]
        if core is not None:
            self._carry(dst, core.receive(src, msg, self.now))

    def pending(self) -> list:
        """Operations still running on a live host."""
        return [op for h in self.hosts if self.cores[h] is not None for op in self.cores[h].ops]

    def at(self, t: float, fn, *args) -> None:
        """Runs ``fn(*args)`` at simulated time ``t`` (e.g. ``sim.at(1.0, sim.crash, "h1")``)."""
        self._push(max(t, self.now), "call", (fn, args))

    # -- running ----------------------------------------------------------------------------
    def step(self) -> bool:
        """Processes the next event (a delivery, a tick of every live host, or a scheduled call)."""
        if not self._events:
            return False
        t, _, kind, payload = heapq.heappop(self._events)
        self.now = max(self.now, t)
        if kind == "msg":
            src, dst, msg = payload
            core = self.cores[dst]
            if core is not None and self.reachable(src, dst):
                self._carry(dst, core.receive(src, msg, self.now))
        elif kind == "unit":
            src, dst, msgs, inline = payload
            core = self.cores[dst]
            if core is not None and self.reachable(src, dst):
                self._carry(dst, core.receive_all(src, msgs, self.now), reply_to=src if inline else None)
        elif kind == "tick":
            for h in self.hosts:
                core = self.cores[h]
                if core is not None:
                    self._carry(h, core.tick(self.now))
            self._push(self.now + self.tick_interval, "tick", None)
        else:
            fn, args = payload
            fn(*args)
        return True

    def run_until(self, t: float, max_steps: int = 10**6) -> None:
        """Processes every event up to simulated time ``t``."""
        for _ in range(max_steps):
            if not self._events or self._events[0][0] > t:
                break
            self.step()
        self.now = max(self.now, t)

    def run_until_done(self, ops=None, limit: float = 60.0) -> bool:
        """Runs until every operation in ``ops`` (default: all) has a result, or ``limit`` s more
        have passed; says whether they all finished."""
        ops = list(self.ops) if ops is None else list(ops)
        end = self.now + limit
        while any(op not in self.results for op in ops):
            if not self._events or self._events[0][0] > end:
                return False
            self.step()
        return True

    def run_until_idle(self, limit: float = 60.0) -> bool:
        """Runs until no live host has an operation running, or ``limit`` s more have passed."""
        end = self.now + limit
        while self.pending():
            if not self._events or self._events[0][0] > end:
                return False
            self.step()
        return True

    def result(self, op_id: str):
        """The (single) result of an operation, or None."""
        rs = self.results.get(op_id)
        return rs[0][1] if rs else None

    def rounds(self, op_id: str) -> int:
        """How many ballots (prepare rounds) the operation used."""
        return len(self.ops[op_id].ballots)

    # -- safety -----------------------------------------------------------------------------
    def history(self, key: str) -> list:
        """The chosen values of ``key`` (accepted by a majority), in ballot order: (ballot, value, time)."""
        return sorted(
            ((b, v, t) for (k, b, v), t in self.chosen_at.items() if k == key), key=lambda e: (e[0], e[2])
        )

    def check_safety(self, registers: tuple[str, ...] = ()) -> None:
        """Raises AssertionError naming the first safety violation found. Keys starting with
        one of ``registers`` are compare-and-set registers (counters, reservations): their
        values may change from one to another directly, not only through a release."""
        # (a) one value per key and ballot, among everything any acceptor accepted.
        per_ballot = defaultdict(set)
        for key, ballot, value in self.accepts:
            per_ballot[(key, ballot)].add(value)
        for (key, ballot), values in per_ballot.items():
            assert len(values) == 1, f"{key}: values {sorted(map(repr, values))} accepted at ballot {ballot}"

        # (c) every commit an acceptor recorded was accepted by a majority at its ballot.
        for h, records in self.disk.items():
            for kind, key, ballot, value in records:
                if kind == "commit":
                    assert (key, ballot, value) in self.chosen_at, (
                        f"{h} committed {key}={value!r} at {ballot}, accepted by only "
                        f"{sorted(self.accepts.get((key, ballot, value), ()))}"
                    )

        keys = {k for (k, _, _) in self.chosen_at} | {k for p in self.ops.values() for k in p.cas}
        hist = {k: self.history(k) for k in keys}
        # Updates of one key decided in one round are applied in turn, in arrival order.
        composed = defaultdict(list)
        for op_id, prop in self.ops.items():
            rs = self.results.get(op_id)
            r = rs[0][1] if rs else None
            if isinstance(r, paxos.Decided) and r.ballot is not None:
                for key in r.values:
                    if isinstance(prop.cas.get(key, (None,))[0], paxos.Update):
                        composed[(key, r.ballot)].append(op_id)

        # (a)+(b) per key, the chosen values in ballot order are one history of acquires and
        # releases: each change is some operation's compare-and-set from the value before it,
        # and a held key is never acquired by another holder before it is released.
        for key, entries in hist.items():
            prev = None
            for ballot, value, _ in entries:
                if value != prev and not key.startswith(registers):
                    # (A register's values come from updates applied in turn, some of them by
                    # rounds whose proposer never learnt the outcome: its own invariants are
                    # checked by its callers.)
                    assert any(_asked(p.cas.get(key), prev, value) for p in self.ops.values()) or _folds(
                        [self.ops[o].cas[key][0] for o in composed[(key, ballot)]], prev, value
                    ), f"{key} went from {prev!r} to {value!r} at {ballot}: no operation asked that"
                    assert prev is None or value is None or key.startswith(registers), (
                        f"{key} held by {prev!r} was given to {value!r} at {ballot} without a release"
                    )
                prev = value

        for op_id, results in self.results.items():
            # (d) at most one result per operation, and only for proposed operations.
            assert op_id in self.ops, f"result for unknown operation {op_id}: {results}"
            assert len(results) == 1, f"operation {op_id} got {len(results)} results: {results}"
            t_end, r = results[0]
            prop = self.ops[op_id]
            if isinstance(r, paxos.Decided):
                for key, (expected, new) in prop.cas.items():
                    entries = hist[key]
                    if isinstance(expected, paxos.Update):
                        if r.ballot is not None and key in r.values:
                            # applied to the value decided just before it, or to the value
                            # an update before it in the same round set
                            before = [v for b, v, _ in entries if b < r.ballot]
                            cur = {before[-1] if before else None}
                            cur |= {
                                self.results[o][0][1].values[key]
                                for o in composed[(key, r.ballot)]
                                if o != op_id
                            }
                            assert any(_folds([expected], c, r.values[key]) for c in cur), (
                                f"{op_id}: update of {key} decided {r.values[key]!r} at "
                                f"{r.ballot} over none of {cur!r}"
                            )
                        continue
                    if r.ballot is not None and key in r.values:
                        assert r.values[key] == new, f"{op_id} decided {key}={r.values[key]!r}, asked {new!r}"
                        assert (key, r.ballot, new) in self.chosen_at, (
                            f"{op_id} reported {key}={new!r} decided at {r.ballot} but no majority accepted it"
                        )
                        before = [v for b, v, _ in entries if b < r.ballot]
                        cur = before[-1] if before else None
                        assert cur == expected, (
                            f"{op_id}: CAS {key} {expected!r}->{new!r} decided at {r.ballot}, but the "
                            f"value before it was {cur!r}"
                        )
                        # Linearizable in real time: after everything chosen before it started.
                        done = [b for b, _, t in entries if t <= prop.at]
                        assert not done or r.ballot > max(done), (
                            f"{op_id} decided {key} at {r.ballot}, below {max(done)} chosen before it began"
                        )
                    else:
                        # Nothing to change for this key: it must have read ``new`` as current.
                        assert new in self._readable(entries, prop.at, t_end), (
                            f"{op_id} found {key}={new!r} but it never was during the operation "
                            f"(history {[(str(b), v) for b, v, _ in entries]})"
                        )
            elif isinstance(r, paxos.Conflict):
                assert r.key in prop.cas, f"{op_id} conflict names {r.key}, not one of its keys"
                expected, new = prop.cas[r.key]
                if isinstance(expected, paxos.Update):
                    continue  # refused on the value the updates before it in its round left
                assert r.holder not in (expected, new), f"{op_id}: conflict on {r.key} with {r.holder!r}"
                assert r.holder in self._readable(hist[r.key], prop.at, t_end), (
                    f"{op_id}: conflict names {r.key} holder {r.holder!r}, which it was not during "
                    f"the operation (history {[(str(b), v) for b, v, _ in hist[r.key]]})"
                )

    @staticmethod
    def _readable(entries, start: float, end: float) -> set:
        """Values a linearizable read between ``start`` and ``end`` may return: the value chosen
        last (by ballot) before ``start``, or anything chosen by ``end`` above it."""
        done = [(b, v) for b, v, t in entries if t <= start]
        low = max(done)[0] if done else None
        out = {max(done)[1]} if done else {None}
        out |= {v for b, v, t in entries if t <= end and (low is None or b >= low)}
        return out


def _asked(change, prev, value) -> bool:
    """Could ``change`` (a compare-and-set pair or an update) take a key from ``prev`` to
    ``value``?"""
    if change is None:
        return False
    expected, new = change
    if isinstance(expected, paxos.Update):
        try:
            return expected.apply(prev) == value
        except paxos.Refused:
            return False
    return (expected, new) == (prev, value)


def _folds(updates, prev, value) -> bool:
    """Do ``updates``, applied in turn to ``prev``, give ``value``?"""
    if not updates:
        return False
    try:
        for u in updates:
            prev = u.apply(prev)
    except paxos.Refused:
        return False
    return prev == value
