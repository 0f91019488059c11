"""Leaderless Paxos per key, with batching: the consensus behind every lease. A plain object.

Each key is a compare-and-set register decided among the acceptor hosts, as Cassandra's
lightweight transactions do, with many keys sharing one round. One operation is a set of
``key: (expected, new)`` pairs that succeeds for all keys or for none:

1. **prepare** ``(ballot, keys)`` to every acceptor; an acceptor promises (for all keys at once)
   if the ballot is higher than any it promised for those keys, and answers, per key, the value
   it accepted last and the last value it knows committed; otherwise it refuses with the higher
   ballot it promised (Nack).
2. With promises from a majority: a key whose highest accepted value is newer than its highest
   committed one holds a round in flight — it is finished first (proposed again at our ballot),
   then the operation starts over. Otherwise each key's current value is the highest committed
   one; if it differs from ``expected`` (and from ``new``) the operation fails with a conflict
   naming the key and holder, having changed nothing.
3. **accept** ``(ballot, values)``: an acceptor accepts if it has not promised a higher ballot.
4. Accepted by a majority: decided. **commit** ``(ballot, values)`` goes to every acceptor.

Ballots are hybrid-logical-clock versions (:class:`~vmwebd.dom.hlc.Version`): unique per proposer,
and the lease entity recorded in the DOM carries the deciding ballot as its version, so the DOM's
newest-wins merge orders lease records exactly as Paxos decided them.

Acceptor state is returned in :attr:`Output.persist` and must be durable before
:attr:`Output.sends` go out (a promise or an acceptance must survive a crash). An operation that
cannot gather a majority within ``deadline`` seconds fails with NoQuorum, saying how many
acceptors answered and how many are needed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from vmwebd.dom.hlc import HybridClock, Version

Value = str | None      # a holder, or None for a free key


# -- messages (appended to the peer protocol's kinds; see messages.py) ---------------------------
@dataclass(frozen=True)
class Prepare:
    op: str
    ballot: Version
    keys: tuple[str, ...]


@dataclass(frozen=True)
class Promise:
    op: str
    ballot: Version
    # key -> (accepted ballot, accepted value, committed ballot, committed value)
    entries: dict


@dataclass(frozen=True)
class Accept:
    op: str
    ballot: Version
    values: dict            # key -> value


@dataclass(frozen=True)
class Accepted:
    op: str
    ballot: Version


@dataclass(frozen=True)
class Commit:
    ballot: Version
    values: dict


@dataclass(frozen=True)
class Nack:
    op: str
    ballot: Version
    promised: Version       # the higher ballot the acceptor is bound to


# -- results ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decided:
    op: str
    ballot: Version | None          # None: nothing had to change
    values: dict                    # what this operation set (key -> value)


@dataclass(frozen=True)
class Conflict:
    op: str
    key: str
    holder: Value


@dataclass(frozen=True)
class NoQuorum:
    op: str
    reachable: int
    needed: int
    members: int


@dataclass
class Output:
    persist: list = field(default_factory=list)     # acceptor records, durable before sends
    sends: list = field(default_factory=list)       # (dst host, message)
    results: list = field(default_factory=list)     # Decided | Conflict | NoQuorum
    commits: list = field(default_factory=list)     # Commit messages applied here (record in the DOM)


@dataclass
class KeyState:
    promised: Version | None = None
    acc_ballot: Version | None = None
    acc_value: Value = None
    com_ballot: Version | None = None
    com_value: Value = None


@dataclass
class _Op:
    id: str
    cas: dict               # key -> (expected, new)
    deadline: float
    hard_deadline: float = 0.0  # with a majority answering, retries go on until this time
    ballot: Version | None = None
    phase: str = "prepare"  # prepare | accept
    promises: dict = field(default_factory=dict)
    accepted: set = field(default_factory=set)
    heard: set = field(default_factory=set)
    values: dict = field(default_factory=dict)
    repair: bool = False
    retry_at: float = 0.0
    attempts: int = 0


def _gt(a: Version | None, b: Version | None) -> bool:
    return a is not None and (b is None or a > b)


class PaxosCore:
    """Acceptor for every key, and proposer for the operations started here."""

    def __init__(self, me: str, clock: HybridClock, rng: random.Random, members,
                 retry_after: float = 0.5, deadline: float = 3.0, contended_factor: float = 5.0):
        self.me = me
        self.clock = clock
        self.rng = rng
        self.members: tuple[str, ...] = tuple(sorted(members))
        self.retry_after = retry_after
        self.deadline = deadline
        self.contended_factor = contended_factor
        self.keys: dict[str, KeyState] = {}
        self.ops: dict[str, _Op] = {}
        self._out = Output()

    @property
    def majority(self) -> int:
        return len(self.members) // 2 + 1

    # -- acceptor ---------------------------------------------------------------------------
    def restore(self, records) -> None:
        """Rebuilds acceptor state from persisted records (in order), after a restart."""
        for rec in records:
            self._apply_record(rec)

    def _apply_record(self, rec) -> None:
        kind, key, ballot, value = rec
        self.clock.observe(ballot)
        if kind == "ballot":        # one of our own ballots (see _prepare): only the clock needs it
            return
        st = self.keys.setdefault(key, KeyState())
        if kind == "promise":
            if _gt(ballot, st.promised):
                st.promised = ballot
        elif kind == "accept":
            if _gt(ballot, st.promised) or ballot == st.promised:
                st.promised = ballot
            if _gt(ballot, st.acc_ballot):
                st.acc_ballot, st.acc_value = ballot, value
        elif kind == "commit":
            if _gt(ballot, st.com_ballot):
                st.com_ballot, st.com_value = ballot, value

    def _record(self, rec) -> None:
        self._apply_record(rec)
        self._out.persist.append(rec)

    def _on_prepare(self, src: str, m: Prepare):
        self.clock.observe(m.ballot)
        # Equal ballot: a duplicated Prepare; promising it again is harmless.
        higher = [self.keys[k].promised for k in m.keys
                  if k in self.keys and self.keys[k].promised is not None and self.keys[k].promised > m.ballot]
        if higher:
            self._out.sends.append((src, Nack(m.op, m.ballot, max(higher))))
            return
        entries = {}
        for k in m.keys:
            self._record(("promise", k, m.ballot, None))
            st = self.keys[k]
            entries[k] = (st.acc_ballot, st.acc_value, st.com_ballot, st.com_value)
        self._out.sends.append((src, Promise(m.op, m.ballot, entries)))

    def _on_accept(self, src: str, m: Accept):
        self.clock.observe(m.ballot)
        higher = [self.keys[k].promised for k in m.values
                  if k in self.keys and self.keys[k].promised is not None and self.keys[k].promised > m.ballot]
        if higher:
            self._out.sends.append((src, Nack(m.op, m.ballot, max(higher))))
            return
        for k, v in m.values.items():
            self._record(("accept", k, m.ballot, v))
        self._out.sends.append((src, Accepted(m.op, m.ballot)))

    def _on_commit(self, m: Commit):
        self.clock.observe(m.ballot)
        changed = False
        for k, v in m.values.items():
            st = self.keys.get(k)
            if st is None or _gt(m.ballot, st.com_ballot):
                self._record(("commit", k, m.ballot, v))
                changed = True
        if changed:
            self._out.commits.append(m)

    def committed(self, key: str) -> tuple[Version | None, Value]:
        st = self.keys.get(key)
        return (st.com_ballot, st.com_value) if st else (None, None)

    # -- proposer ---------------------------------------------------------------------------
    def propose(self, op_id: str, cas: dict, now: float) -> Output:
        """Starts an all-or-nothing compare-and-set over ``cas = {key: (expected, new)}``."""
        op = _Op(op_id, dict(cas), now + self.deadline,
                 hard_deadline=now + self.deadline * self.contended_factor)
        self.ops[op_id] = op
        self._prepare(op, now)
        return self._flush()

    def _prepare(self, op: _Op, now: float):
        op.ballot = self.clock.tick()
        # The ballot is durable before a message carrying it leaves: our own promise may not be
        # (the loopback can come after the remote ones), and a restart with a clock reading earlier
        # would then reuse the ballot for other values. Restoring this record moves the clock past it.
        self._record(("ballot", self.me, op.ballot, None))
        op.phase = "prepare"
        # ``heard`` is kept across attempts: it is what NoQuorum reports as reachable.
        op.promises, op.accepted, op.values, op.repair = {}, set(), {}, False
        op.attempts += 1
        self._arm(op, now)
        msg = Prepare(op.id, op.ballot, tuple(sorted(op.cas)))
        for m in self.members:
            self._out.sends.append((m, msg))

    def _arm(self, op: _Op, now: float) -> None:
        """(Re)sets the timer after which a round with no progress is retried with a new ballot.
        It grows with the attempts (a slow majority must not be overtaken by our own retries)
        and is pushed back by every answer that moves the round forward."""
        backoff = self.retry_after * min(2 ** (op.attempts - 1), 8)
        op.retry_at = now + backoff * (1 + self.rng.random())

    def _finish(self, op: _Op, result) -> None:
        self.ops.pop(op.id, None)
        self._out.results.append(result)

    def _on_promise(self, src: str, m: Promise, now: float):
        op = self.ops.get(m.op)
        if op is None or op.phase != "prepare" or m.ballot != op.ballot:
            return
        op.heard.add(src)
        op.promises[src] = m.entries
        self._arm(op, now)
        if len(op.promises) < self.majority:
            return
        inflight, current = {}, {}
        for k in op.cas:
            acc_b, acc_v, com_b, com_v = None, None, None, None
            for entries in op.promises.values():
                ab, av, cb, cv = entries.get(k, (None, None, None, None))
                if _gt(ab, acc_b):
                    acc_b, acc_v = ab, av
                if _gt(cb, com_b):
                    com_b, com_v = cb, cv
            current[k] = com_v
            if _gt(acc_b, com_b):
                inflight[k] = acc_v
        if inflight:
            # Finish someone else's round first (it may have been decided), then start over.
            op.repair, op.values = True, inflight
        else:
            values = {}
            for k, (expected, new) in sorted(op.cas.items()):
                cur = current[k]
                if cur == new:
                    continue
                if cur != expected:
                    self._finish(op, Conflict(op.id, k, cur))
                    return
                values[k] = new
            if not values:
                self._finish(op, Decided(op.id, None, {}))
                return
            op.values = values
        op.phase = "accept"
        msg = Accept(op.id, op.ballot, dict(op.values))
        for mem in self.members:
            self._out.sends.append((mem, msg))

    def _on_accepted(self, src: str, m: Accepted, now: float):
        op = self.ops.get(m.op)
        if op is None or op.phase != "accept" or m.ballot != op.ballot:
            return
        op.heard.add(src)
        op.accepted.add(src)
        self._arm(op, now)
        if len(op.accepted) < self.majority:
            return
        commit = Commit(op.ballot, dict(op.values))
        for mem in self.members:
            self._out.sends.append((mem, commit))
        if op.repair:
            self._prepare(op, now)
        else:
            self._finish(op, Decided(op.id, op.ballot, dict(op.values)))

    def _on_nack(self, src: str, m: Nack, now: float):
        self.clock.observe(m.promised)
        op = self.ops.get(m.op)
        if op is None or m.ballot != op.ballot:
            return
        op.heard.add(src)
        # Someone with a higher ballot is working on these keys: back off a random while
        # (so two proposers do not duel forever), then retry with a higher ballot.
        op.phase = "backoff"
        op.retry_at = now + self.retry_after * self.rng.random()

    # -- inputs -----------------------------------------------------------------------------
    def receive(self, src: str, msg, now: float) -> Output:
        if isinstance(msg, Prepare):
            self._on_prepare(src, msg)
        elif isinstance(msg, Accept):
            self._on_accept(src, msg)
        elif isinstance(msg, Commit):
            self._on_commit(msg)
        elif isinstance(msg, Promise):
            self._on_promise(src, msg, now)
        elif isinstance(msg, Accepted):
            self._on_accepted(src, msg, now)
        elif isinstance(msg, Nack):
            self._on_nack(src, msg, now)
        return self._flush()

    def tick(self, now: float) -> Output:
        for op in list(self.ops.values()):
            # No majority heard within the deadline: fail fast. A majority answering but the
            # round not done (proposers pre-empting each other, a slow host): go on, bounded.
            contended = len(op.heard) >= self.majority
            if now >= (op.hard_deadline if contended else op.deadline):
                self._finish(op, NoQuorum(op.id, len(op.heard), self.majority, len(self.members)))
            elif now >= op.retry_at:
                self._prepare(op, now)
        return self._flush()

    def set_members(self, members) -> None:
        self.members = tuple(sorted(members))

    def _flush(self) -> Output:
        out, self._out = self._out, Output()
        return out
