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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from vmwebd.dom.hlc import HybridClock, Version

Value = str | None  # a holder, or None for a free key


class Refused(Exception):
    """An :class:`Update` will not apply to the value it found (a limit it would pass)."""


class Update:
    """A change computed from a key's current value once a round holds the key (promises from a
    majority at its ballot), in place of a compare-and-set's expected value: ``{key: (update,
    None)}``. Concurrent updates of one key at several hosts then never conflict; each is
    applied in turn to the value decided before it. ``apply`` must be a pure function, and
    idempotent (applied again to its own result it changes nothing: a round that starts over
    may judge an operation whose values were already decided). It raises :class:`Refused` to
    fail the operation with a Conflict naming the key and the value found."""

    KIND = ""

    def apply(self, current: Value) -> Value:
        raise NotImplementedError

    def to_attrs(self) -> dict[str, str]:
        """The update as XML attributes (a forwarded operation carries it)."""
        raise NotImplementedError

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, str]) -> "Update":
        raise NotImplementedError


class _Said:
    """A stand-in for a value the receiver has already: large values (a capacity set holds an
    entry per VM) then cross the wire once per change instead of in every message about them.

    * :data:`KNOWN` in a :class:`Promise` entry: the committed value at the ballot the
      :class:`Prepare` said its proposer knows (:attr:`Prepare.known`).
    * :data:`ACCEPTED` in a :class:`Commit`: the value the receiver accepted at the commit's
      ballot (sent only to acceptors whose Accepted was heard).
    * :data:`ELIDED` in a forwarded :class:`Decided`: not carried back (the requester reads
      which keys were decided, never their values; the values are in the DOM)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


KNOWN = _Said("<known>")
ACCEPTED = _Said("<accepted>")
ELIDED = _Said("<elided>")
#: Values at least this long are named by ballot instead of carried (see :class:`_Said`).
BIG_VALUE = 256

#: A value as messages carry it: itself, or a stand-in the receiver resolves.
Wire = Union[str, None, _Said]
#: What an acceptor answers per key: (accepted ballot, value, committed ballot, value).
Entry = tuple[Union[Version, None], Wire, Union[Version, None], Wire]
#: The same with every stand-in resolved (what a proposer reasons on).
Seen = tuple[Union[Version, None], Value, Union[Version, None], Value]
#: One operation: key -> (expected value, or an Update; new value).
Cas = dict[str, tuple[Union[Value, Update], Value]]
#: An acceptor record: (kind, key, ballot, value); kind promise | accept | commit | ballot.
Record = tuple[str, str, Version, Value]


# -- messages (appended to the peer protocol's kinds; see messages.py) ---------------------------
@dataclass(frozen=True)
class Prepare:
    op: str
    ballot: Version
    keys: tuple[str, ...]
    #: key -> the committed ballot whose (large) value the proposer has: an acceptor whose
    #: committed ballot is that one answers :data:`KNOWN` instead of the value.
    known: dict[str, Version] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Promise:
    op: str
    ballot: Version
    # key -> (accepted ballot, accepted value, committed ballot, committed value)
    entries: dict[str, Entry]


@dataclass(frozen=True)
class Accept:
    op: str
    ballot: Version
    values: dict[str, Value]  # key -> value


@dataclass(frozen=True)
class Accepted:
    op: str
    ballot: Version
    #: The acceptor reads a Commit naming its accepted value (:data:`ACCEPTED`); False from a
    #: host of an earlier version, which must get values whole.
    refs: bool = False


@dataclass(frozen=True)
class Commit:
    ballot: Version
    values: dict[str, Wire]


@dataclass(frozen=True)
class Nack:
    op: str
    ballot: Version
    promised: Version  # the higher ballot the acceptor is bound to


@dataclass(frozen=True)
class Forward:
    """Asks the host it is sent to to run an operation as its proposer and answer with its
    :class:`Outcome` (see ``LeaseService``: one proposer for a grid's operations turns their
    rivalry over shared keys into batching). Every operation vmweb proposes is idempotent — a
    compare-and-set to a unique holder or an :class:`Update` — so running it twice (the answer
    lost, the requester then running it itself) changes nothing more."""

    op: str
    cas: Cas


@dataclass(frozen=True)
class Outcome:
    """The result of a forwarded operation: Decided, Conflict or NoQuorum."""

    op: str
    result: object


UPDATES: dict[str, type[Update]] = {}  # Update.KIND -> class, for the wire (Forward)


# -- results ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decided:
    op: str
    ballot: Version | None  # None: nothing had to change
    values: Mapping[str, Wire]  # what this operation set (key -> value; ELIDED over the wire)


@dataclass(frozen=True)
class Conflict:
    op: str
    key: str
    holder: Value
    #: The current value of every key of the operation as the round saw it: a caller keeping
    #: counters or sets learns them all at once instead of one conflict at a time.
    seen: dict[str, Value] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class NoQuorum:
    op: str
    reachable: int
    needed: int
    members: int


Result = Union[Decided, Conflict, NoQuorum]


@dataclass
class Output:
    persist: list[Record] = field(default_factory=list)  # acceptor records, durable before sends
    sends: list[tuple[str, Any]] = field(default_factory=list)  # (dst host, message)
    results: list[Result] = field(default_factory=list)  # Decided | Conflict | NoQuorum
    commits: list[Commit] = field(default_factory=list)  # Commit messages applied here (record in the DOM)
    # Rounds this proposer began or began again, (round id, ballot, op ids): a ballot in here is
    # about to be used; and rounds it ended (round id): none of their ballots will be used again.
    started: list[tuple[str, Version, tuple[str, ...]]] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)


@dataclass
class KeyState:
    promised: Version | None = None
    acc_ballot: Version | None = None
    acc_value: Value = None
    com_ballot: Version | None = None
    com_value: Value = None


_NO_BALLOT = Version(0, 0, "")


@dataclass
class _Op:
    """One compare-and-set asked of this proposer, until it has its result."""

    id: str
    cas: Cas  # key -> (expected, new)
    deadline: float
    hard_deadline: float = 0.0  # with a majority answering, retries go on until this time
    heard: set[str] = field(default_factory=set)  # members that answered a round carrying it
    since: float = 0.0  # when it was asked
    round: str | None = None  # the round carrying it now (None: queued)


@dataclass
class _Round:
    """One ballot's worth of work: the operations batched into it, and the Paxos state of the
    attempt. A round that must start over (a Nack, no progress, an in-flight value repaired
    first) keeps its operations and takes a new ballot."""

    id: str  # the ``op`` field of its messages
    ops: list[str]  # op ids carried, in arrival order
    ballot: Version = _NO_BALLOT  # set by the round's first Prepare
    phase: str = "prepare"  # prepare | accept | backoff
    promises: dict[str, dict[str, Seen]] = field(default_factory=dict)
    accepted: set[str] = field(default_factory=set)
    values: dict[str, Value] = field(default_factory=dict)  # what the Accept of this ballot carries
    carried: list[str] = field(default_factory=list)  # ops whose values are in that Accept
    own: dict[str, dict[str, Value]] = field(
        default_factory=dict
    )  # op -> the values it set (in turn, if shared)
    known: dict[str, tuple[Version, str]] = field(
        default_factory=dict
    )  # key -> (ballot, value) our Prepare named
    refs: set[str] = field(default_factory=set)  # acceptors whose Accepted said they read ACCEPTED
    prepare: Prepare | None = None  # this ballot's Prepare (asked again as it is)
    started: float = 0.0  # when the Prepare of this ballot left
    retry_at: float = 0.0
    attempts: int = 0
    asked: set[str] = field(default_factory=set)  # members sent this phase's message
    widen_at: float | None = None  # then ask every member again, if no majority answered yet
    wait: float = 0.0  # how long until the next widen


def _gt(a: Version | None, b: Version | None) -> bool:
    return a is not None and (b is None or a > b)


class PaxosCore:
    """Acceptor for every key, and proposer for the operations started here.

    As a proposer it batches: operations asked while a round is under way wait in a queue, and
    the next round carries all of them whose keys overlap neither each other nor a round in
    flight (each still all-or-nothing on its own: after the promises, every operation is checked
    against the current values by itself, and only those that can go through are accepted; a
    conflict of one does not hold up the others). Up to ``parallel_rounds`` rounds run at once.
    """

    def __init__(
        self,
        me: str,
        clock: HybridClock,
        rng: random.Random,
        members: Iterable[str],
        retry_after: float = 0.5,
        deadline: float = 3.0,
        contended_factor: float = 5.0,
        parallel_rounds: int = 1,
        round_keys: int = 1024,
        thrifty: bool = True,
        elide_at: int | None = BIG_VALUE,
        reserve_ms: int = 500,
    ):
        self.me = me
        self.clock = clock
        self.rng = rng
        self.members: tuple[str, ...] = tuple(sorted(members))
        self.retry_after = retry_after
        self.deadline = deadline
        self.contended_factor = contended_factor
        self.parallel_rounds = max(1, parallel_rounds)
        self.round_keys = round_keys  # a round takes more operations up to this many keys
        # Thrifty: a phase asks a bare majority (this host and the remote members that answered
        # best lately) and the others only if that majority has not answered in a few round
        # times; every request saved is CPU saved on every host.
        self.thrifty = thrifty
        # Values at least this long cross the wire once per change (see _Said); None: never.
        self.elide_at = elide_at
        # Ballots are made durable ahead, ``reserve_ms`` of clock at a time (see _reserve_for);
        # 0: each ballot is recorded on its own.
        self.reserve_ms = max(0, reserve_ms)
        self._reserved: Version | None = None  # the latest reserve handed out to persist
        self._missed: dict[str, int] = {}  # member -> phases it left unanswered lately
        self._answering: set[str] = set()  # members that answered since this core started
        self._heard_at: dict[str, float] = {}  # member -> when it last answered a round here
        self.keys: dict[str, KeyState] = {}
        self.ops: dict[str, _Op] = {}
        self.queue: list[str] = []  # op ids waiting for a round, in arrival order
        self.rounds: dict[str, _Round] = {}
        self._round_ids = 0
        # How long an uncontended round takes here (Prepare to decision), smoothed: a Nack backs
        # off a few of these, not a fixed time.
        self.round_time = 0.01
        # How long another member takes to answer a Prepare (smoothed, answers to ballots given
        # up included): the retry timer waits a few of these, so a proposer whose members are
        # slower than ``retry_after`` (an overloaded grid) does not give up every ballot just
        # before its answers arrive, adding load where there is too much.
        self.answer_time = 0.0
        self._asked_at: dict[Version, float] = {}  # recent ballots -> when their Prepare left
        self._out = Output()

    @property
    def majority(self) -> int:
        return len(self.members) // 2 + 1

    # -- acceptor ---------------------------------------------------------------------------
    def restore(self, records: Iterable[Record]) -> None:
        """Rebuilds acceptor state from persisted records (in order), after a restart."""
        for rec in records:
            self._apply_record(rec)

    def _apply_record(self, rec: Record) -> None:
        kind, key, ballot, value = rec
        self.clock.observe(ballot)
        if kind == "ballot":  # one of our own ballots (see _prepare): only the clock needs it
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

    def _record(self, rec: Record) -> None:
        self._apply_record(rec)
        self._out.persist.append(rec)

    def _on_prepare(self, src: str, m: Prepare) -> None:
        self.clock.observe(m.ballot)
        # Equal ballot: a duplicated Prepare; promising it again is harmless.
        higher = [
            p for k in m.keys if k in self.keys and (p := self.keys[k].promised) is not None and p > m.ballot
        ]
        if higher:
            self._out.sends.append((src, Nack(m.op, m.ballot, max(higher))))
            return
        entries: dict[str, Entry] = {}
        for k in m.keys:
            self._record(("promise", k, m.ballot, None))
            st = self.keys[k]
            av: Wire = st.acc_value
            cv: Wire = st.com_value
            if st.com_ballot is not None and m.known.get(k) == st.com_ballot:
                if st.acc_ballot == st.com_ballot:
                    av = KNOWN
                cv = KNOWN
            entries[k] = (st.acc_ballot, av, st.com_ballot, cv)
        self._out.sends.append((src, Promise(m.op, m.ballot, entries)))

    def _on_accept(self, src: str, m: Accept) -> None:
        self.clock.observe(m.ballot)
        higher = [
            p
            for k in m.values
            if k in self.keys and (p := self.keys[k].promised) is not None and p > m.ballot
        ]
        if higher:
            self._out.sends.append((src, Nack(m.op, m.ballot, max(higher))))
            return
        for k, v in m.values.items():
            self._record(("accept", k, m.ballot, v))
        self._out.sends.append((src, Accepted(m.op, m.ballot, refs=True)))

    def _on_commit(self, m: Commit) -> None:
        self.clock.observe(m.ballot)
        values: dict[str, Wire] = {}
        for k, w in m.values.items():
            st = self.keys.get(k)
            if isinstance(w, _Said):
                # ACCEPTED: the value we accepted at this ballot; if we have moved on to another
                # ballot's value meanwhile, this commit is learned later (repair, or the DOM).
                # Any other stand-in has no business in a Commit.
                if w is not ACCEPTED or st is None or st.acc_ballot != m.ballot:
                    continue
                v = st.acc_value
            else:
                v = w
            if st is None or _gt(m.ballot, st.com_ballot):
                self._record(("commit", k, m.ballot, v))
                values[k] = v
        if values:
            self._out.commits.append(m if values == m.values else Commit(m.ballot, values))

    def committed(self, key: str) -> tuple[Version | None, Value]:
        st = self.keys.get(key)
        return (st.com_ballot, st.com_value) if st else (None, None)

    # -- proposer ---------------------------------------------------------------------------
    def propose(self, op_id: str, cas: Cas, now: float) -> Output:
        """Asks for an all-or-nothing compare-and-set over ``cas = {key: (expected, new)}``: in
        a round of its own at once when a round may start, else in the next round."""
        self.ops[op_id] = _Op(
            op_id,
            dict(cas),
            now + self.deadline,
            hard_deadline=now + self.deadline * self.contended_factor,
            since=now,
        )
        self.queue.append(op_id)
        self._start_rounds(now)
        return self._flush()

    def _busy_keys(self) -> set[str]:
        return {k for r in self.rounds.values() for op in r.ops for k in self.ops[op].cas}

    def _take_queued(self, busy: set[str], room: int, one_anyway: bool) -> list[str]:
        """Queued operations that may join a round: keys disjoint from ``busy`` (other rounds
        in flight) and from each other, up to ``room`` keys (``one_anyway``: the first one
        whatever its size) — except that operations which all change a key by an
        :class:`Update` share it (they are applied in turn, in arrival order, in one round). An
        operation left waiting keeps the later ones on its keys waiting too (arrival order per
        key)."""
        taken: list[str] = []
        left: list[str] = []
        busy = set(busy)
        shared: set[str] = set()  # keys that only updates of the operations taken touch
        for op_id in self.queue:
            cas = self.ops[op_id].cas
            ups = {k for k, (exp, _) in cas.items() if isinstance(exp, Update)}
            clash = busy.intersection(cas)
            fits = len(cas) <= room or (one_anyway and not taken)
            if fits and clash <= (shared & ups):
                taken.append(op_id)
                room -= len(cas)
                shared |= ups - (busy - shared)
                shared -= set(cas) - ups
            else:
                left.append(op_id)
                shared -= set(cas)
            busy.update(cas)
        self.queue = left
        return taken

    def _start_rounds(self, now: float) -> None:
        while self.queue and len(self.rounds) < self.parallel_rounds:
            ops = self._take_queued(self._busy_keys(), self.round_keys, one_anyway=True)
            if not ops:
                return  # what waits overlaps a round in flight
            self._round_ids += 1
            rnd = _Round(f"{self.me}.{self._round_ids}", ops)
            self.rounds[rnd.id] = rnd
            for op_id in ops:
                self.ops[op_id].round = rnd.id
            self._prepare(rnd, now)

    def _prepare(self, rnd: _Round, now: float) -> None:
        # A round that starts over takes what waits meanwhile too (keys permitting).
        if self.queue:
            room = self.round_keys - sum(len(self.ops[op].cas) for op in rnd.ops)
            for op_id in self._take_queued(self._busy_keys(), room, one_anyway=False):
                rnd.ops.append(op_id)
                self.ops[op_id].round = rnd.id
        rnd.ballot = self.clock.tick()
        self._reserve_for(rnd.ballot)
        rnd.phase = "prepare"
        rnd.promises, rnd.accepted, rnd.values, rnd.carried = {}, set(), {}, []
        rnd.refs = set()
        rnd.own = {}
        rnd.attempts += 1
        rnd.started = now
        self._asked_at[rnd.ballot] = now
        if len(self._asked_at) > 64:
            del self._asked_at[next(iter(self._asked_at))]
        self._arm(rnd, now)
        self._out.started.append((rnd.id, rnd.ballot, tuple(rnd.ops)))
        keys = sorted({k for op in rnd.ops for k in self.ops[op].cas})
        # Large committed values this host's acceptor holds are named by ballot: the acceptors
        # that hold the same answer KNOWN instead of sending them back.
        rnd.known = {}
        if self.elide_at is not None:
            for k in keys:
                st = self.keys.get(k)
                if (
                    st is not None
                    and st.com_ballot is not None
                    and st.com_value is not None
                    and len(st.com_value) >= self.elide_at
                ):
                    rnd.known[k] = (st.com_ballot, st.com_value)
        rnd.prepare = Prepare(rnd.id, rnd.ballot, tuple(keys), {k: b for k, (b, _) in rnd.known.items()})
        self._ask(rnd, rnd.prepare, self._quorum(), now)

    def _reserve_for(self, ballot: Version) -> None:
        """Makes sure ``ballot`` is below a reserve handed out to persist.

        A ballot must be durable before a message carrying it leaves: our own promise may not be
        (the loopback can come after the remote ones), and a restart with a clock reading earlier
        would then reuse the ballot for other values. Instead of one record per ballot (an fsync
        on the way of every round), a ``ballot`` record names a stamp ``reserve_ms`` of clock
        ahead, and every ballot below it is covered: restoring the record moves the clock past
        it, so a restarted proposer's ballots are above every ballot it used before. The record
        is not applied here (that would move the clock ahead now). Carrying out the output, the
        lease service sends a round's first messages only once every record handed in before
        them is durable, the reserve included (``Output.started`` says a round began)."""
        if self._reserved is not None and _gt(self._reserved, ballot):
            return
        reserve = ballot
        if self.reserve_ms:
            reserve = Version(ballot.wall_ms + self.reserve_ms, 0, self.me)
        self._reserved = reserve
        self._out.persist.append(("ballot", self.me, reserve, None))

    def _quorum(self) -> list[str]:
        """Whom a phase asks first: everyone, or (thrifty) this host and the remote members that
        missed the fewest answers lately; among equals the ones after this host in the ring of
        members (each proposer leans on other acceptors, and keeps to them, so the Commit of a
        round and the Prepare of the next travel together)."""
        if not self.thrifty or len(self.members) <= 2:
            return list(self.members)
        ring = sorted(set(self.members) | {self.me})
        at = ring.index(self.me)
        others = [m for m in ring[at + 1 :] + ring[:at] if m in self.members]
        others.sort(key=lambda m: (m not in self._answering, self._missed.get(m, 0)))
        first = others[: self.majority - (1 if self.me in self.members else 0)]
        return ([self.me] if self.me in self.members else []) + first

    def _ask(self, rnd: _Round, msg: Prepare | Accept, targets: Iterable[str], now: float) -> None:
        rnd.asked = set(targets)
        rnd.wait = max(0.005, 3 * self.round_time)
        rnd.widen_at = now + rnd.wait
        for m in self.members:
            if m in rnd.asked:
                self._out.sends.append((m, msg))

    def _widen(self, rnd: _Round, now: float) -> None:
        """A phase got no majority in a few round times: ask every member that has not answered
        it (again: a message or its answer may be lost; the same ballot's message is harmless
        twice), remember which asked ones stayed silent (asked last from now on), and look
        again after twice as long. A round that still gets nowhere is retried with a new ballot
        (``retry_at``)."""
        answered = set(rnd.promises) if rnd.phase == "prepare" else rnd.accepted
        for m in rnd.asked - answered - {self.me}:
            self._missed[m] = self._missed.get(m, 0) + 1
        msg = rnd.prepare if rnd.phase == "prepare" else Accept(rnd.id, rnd.ballot, dict(rnd.values))
        rest = [m for m in self.members if m not in answered and m != self.me]
        rnd.asked |= set(rest)
        rnd.wait *= 2
        rnd.widen_at = now + rnd.wait
        for m in rest:
            self._out.sends.append((m, msg))

    def _answered(self, src: str) -> None:
        self._answering.add(src)
        if src in self._missed:
            del self._missed[src]

    def _arm(self, rnd: _Round, now: float) -> None:
        """(Re)sets the timer after which a round with no progress is retried with a new ballot.
        It grows with the attempts (a slow majority must not be overtaken by our own retries)
        and is pushed back by every answer that moves the round forward."""
        base = max(self.retry_after, min(3 * self.answer_time, self.deadline))
        backoff = base * min(2 ** (rnd.attempts - 1), 8)
        rnd.retry_at = now + backoff * (1 + self.rng.random())

    def _finish(self, op_id: str, result: Result) -> None:
        op = self.ops.pop(op_id, None)
        if op is None:
            return
        if op.round is not None and op.round in self.rounds:
            rnd = self.rounds[op.round]
            rnd.ops.remove(op_id)
            if op_id in rnd.carried:
                rnd.carried.remove(op_id)
        elif op_id in self.queue:
            self.queue.remove(op_id)
        self._out.results.append(result)

    def _end_round(self, rnd: _Round, now: float) -> None:
        self.rounds.pop(rnd.id, None)
        self._out.ended.append(rnd.id)
        for op_id in rnd.ops:  # left without a result: wait for the next round
            op = self.ops.get(op_id)
            if op is not None:
                op.round = None
                self.queue.insert(0, op_id)
        self._start_rounds(now)

    def _heard(self, rnd: _Round, src: str) -> None:
        for op_id in rnd.ops:
            self.ops[op_id].heard.add(src)

    def _on_promise(self, src: str, m: Promise, now: float) -> None:
        self._heard_at[src] = now  # late or not, it answers (see tick)
        asked = self._asked_at.get(m.ballot)
        if asked is not None and src != self.me:
            self.answer_time += 0.2 * (now - asked - self.answer_time)
        rnd = self.rounds.get(m.op)
        if rnd is None or rnd.phase != "prepare" or m.ballot != rnd.ballot:
            return
        entries = self._read_entries(rnd, m.entries)
        if entries is None:
            return
        self._heard(rnd, src)
        self._answered(src)
        rnd.promises[src] = entries
        self._arm(rnd, now)
        if len(rnd.promises) < self.majority:
            return
        inflight, current = {}, {}
        for k in {k for op in rnd.ops for k in self.ops[op].cas}:
            acc_b, acc_v, com_b, com_v = None, None, None, None
            for entries in rnd.promises.values():
                ab, av, cb, cv = entries.get(k, (None, None, None, None))
                if _gt(ab, acc_b):
                    acc_b, acc_v = ab, av
                if _gt(cb, com_b):
                    com_b, com_v = cb, cv
            current[k] = com_v
            if _gt(acc_b, com_b):
                inflight[k] = acc_v
        # Someone else's round on these keys may have been decided: its values are proposed
        # again at our ballot (repair), and the operations on those keys wait for our next
        # ballot. Every other operation is judged on its own against the current values.
        values = dict(inflight)
        after = dict(current)  # what each key holds once the operations before are in
        for op_id in list(rnd.ops):
            op = self.ops[op_id]
            if not inflight.keys().isdisjoint(op.cas):
                continue
            mine = {}
            for k, (expected, new) in sorted(op.cas.items(), key=lambda kv: kv[0]):
                cur = after[k]
                if isinstance(expected, Update):
                    try:
                        new = expected.apply(cur)
                    except Refused:
                        self._finish(op_id, Conflict(op_id, k, cur, {x: after[x] for x in op.cas}))
                        break
                    expected = cur
                if cur == new:
                    continue
                if cur != expected:
                    self._finish(op_id, Conflict(op_id, k, cur, {x: after[x] for x in op.cas}))
                    break
                mine[k] = new
            else:
                if not mine:
                    self._finish(op_id, Decided(op_id, None, {}))
                else:
                    values.update(mine)
                    after.update(mine)
                    rnd.carried.append(op_id)
                    rnd.own[op_id] = mine
        if not values:
            self._end_round(rnd, now)
            return
        rnd.values = values
        rnd.phase = "accept"
        # The members that promised are a majority and likely to accept; any other may too.
        promised = [m for m in self.members if m in rnd.promises]
        self._ask(
            rnd,
            Accept(rnd.id, rnd.ballot, dict(values)),
            promised if self.thrifty else list(self.members),
            now,
        )

    @staticmethod
    def _read_entries(rnd: _Round, entries: dict[str, Entry]) -> dict[str, Seen] | None:
        """A promise's entries with :data:`KNOWN` replaced by the value our Prepare named; None
        for a promise that names a value we did not, or carries another stand-in (it is
        ignored, like a lost one)."""
        out: dict[str, Seen] = {}
        for k, (ab, av, cb, cv) in entries.items():
            if not isinstance(av, _Said) and not isinstance(cv, _Said):
                out[k] = (ab, av, cb, cv)
                continue
            kn = rnd.known.get(k)
            if (
                kn is None
                or kn[0] != cb
                or cv is not KNOWN
                or (isinstance(av, _Said) and (av is not KNOWN or ab != cb))
            ):
                return None
            out[k] = (ab, kn[1] if isinstance(av, _Said) else av, cb, kn[1])  # av: KNOWN
        return out

    def _on_accepted(self, src: str, m: Accepted, now: float) -> None:
        self._heard_at[src] = now
        rnd = self.rounds.get(m.op)
        if rnd is None or rnd.phase != "accept" or m.ballot != rnd.ballot:
            return
        self._heard(rnd, src)
        self._answered(src)
        rnd.accepted.add(src)
        if m.refs:
            rnd.refs.add(src)
        self._arm(rnd, now)
        if len(rnd.accepted) < self.majority:
            return
        commit = Commit(rnd.ballot, dict(rnd.values))
        # An acceptor whose Accepted we heard has the values: large ones are named, not sent.
        big = (
            {k for k, v in rnd.values.items() if v is not None and len(v) >= self.elide_at}
            if self.elide_at is not None
            else set()
        )
        short = (
            Commit(rnd.ballot, {k: ACCEPTED if k in big else v for k, v in rnd.values.items()})
            if big
            else commit
        )
        for mem in self.members:
            self._out.sends.append((mem, short if mem in rnd.refs and mem != self.me else commit))
        if rnd.attempts == 1:
            self.round_time += 0.2 * (now - rnd.started - self.round_time)
        for op_id in list(rnd.carried):
            self.ops[op_id]
            self._finish(op_id, Decided(op_id, rnd.ballot, rnd.own.get(op_id, {})))
        if rnd.ops:
            self._prepare(rnd, now)  # operations waiting on a repaired key: our next ballot
        else:
            self._end_round(rnd, now)

    def _on_nack(self, src: str, m: Nack, now: float) -> None:
        self._heard_at[src] = now
        self.clock.observe(m.promised)
        rnd = self.rounds.get(m.op)
        if rnd is None or m.ballot != rnd.ballot or rnd.phase == "backoff":
            return
        self._heard(rnd, src)
        self._answered(src)
        # Someone with a higher ballot is working on these keys: back off a random while of a
        # few round times, growing with our attempts (so two proposers do not duel in
        # lock-step), then retry with a higher ballot.
        rnd.phase = "backoff"
        spread = min(self.retry_after, max(0.002, self.round_time) * 2 * min(rnd.attempts, 8))
        rnd.retry_at = now + spread * self.rng.random()

    # -- inputs -----------------------------------------------------------------------------
    def receive(self, src: str, msg: object, now: float) -> Output:
        self._dispatch(src, msg, now)
        return self._flush()

    def receive_all(self, src: str, msgs: Iterable[object], now: float) -> Output:
        """Several messages from one host (a bundle), in order; one output for all of them."""
        for msg in msgs:
            self._dispatch(src, msg, now)
        return self._flush()

    def next_timer(self) -> float | None:
        """When :meth:`tick` next has something to do (a retry, a deadline), if ever."""
        times = [r.retry_at for r in self.rounds.values()]
        times += [r.widen_at for r in self.rounds.values() if r.widen_at is not None and r.phase != "backoff"]
        times += [min(op.deadline, op.hard_deadline) for op in self.ops.values()]
        return min(times) if times else None

    def _dispatch(self, src: str, msg: object, now: float) -> None:
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

    def tick(self, now: float) -> Output:
        for op in list(self.ops.values()):
            # No majority heard within the deadline: fail fast. A majority answering but the
            # round not done (proposers pre-empting each other, a slow host): go on, bounded.
            # An operation counts the members that answered this proposer since it was asked,
            # in any round or to an earlier ballot: one waiting for a round waits on other
            # operations, and answers that come after the ballot they answer was given up
            # (hosts slower than the retry timer) come from a majority that is there.
            heard = max(
                len(op.heard), sum(1 for m in self.members if self._heard_at.get(m, -1.0) >= op.since)
            )
            contended = heard >= self.majority
            if now >= (op.hard_deadline if contended else op.deadline):
                self._finish(op.id, NoQuorum(op.id, heard, self.majority, len(self.members)))
        for rnd in list(self.rounds.values()):
            if not rnd.ops:
                self._end_round(rnd, now)
            elif now >= rnd.retry_at:
                self._prepare(rnd, now)
            elif rnd.widen_at is not None and now >= rnd.widen_at and rnd.phase != "backoff":
                self._widen(rnd, now)
        self._start_rounds(now)
        return self._flush()

    def set_members(self, members: Iterable[str]) -> None:
        self.members = tuple(sorted(members))

    def _flush(self) -> Output:
        out, self._out = self._out, Output()
        return out
