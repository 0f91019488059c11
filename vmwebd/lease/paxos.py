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

import hashlib
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

#: Buckets of the committed-values digest a term prepare carries (see :func:`bucket_of`).
DIGEST_BUCKETS = 64


def bucket_of(key: str) -> int:
    """The digest bucket of ``key``: stable across hosts and restarts (not Python's hash)."""
    return hashlib.blake2b(key.encode(), digest_size=2).digest()[0] % DIGEST_BUCKETS


def _stamp(key: str, ballot: Version) -> int:
    """What a key committed at ``ballot`` adds to its bucket (XOR: added and taken back alike)."""
    return int.from_bytes(hashlib.blake2b(f"{key}\0{ballot}".encode(), digest_size=8).digest(), "big")


#: A value as messages carry it: itself, or a stand-in the receiver resolves.
Wire = Union[str, None, _Said]
#: What an acceptor answers per key: (accepted ballot, value, committed ballot, value).
Entry = tuple[Union[Version, None], Wire, Union[Version, None], Wire]
#: The same with every stand-in resolved (what a proposer reasons on).
Seen = tuple[Union[Version, None], Value, Union[Version, None], Value]
#: One operation: key -> (expected value, or an Update; new value).
Cas = dict[str, tuple[Union[Value, Update], Value]]
#: An acceptor record: (kind, key, ballot, value); kind promise | accept | commit | ballot | term
#: | top.
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
    #: A term prepare (see :class:`PaxosCore`, "Terms"): a promise for every key, below this
    #: ballot for everyone but the proposer (``keys`` is empty).
    end: Version | None = None
    #: With ``end``: the proposer's digest of its committed values (see :func:`bucket_of`);
    #: an acceptor answers the keys of the buckets where its own differs.
    digest: tuple[int, ...] = ()
    #: With ``end``: the start of the term the proposer holds and renews (its rounds under way
    #: in it stay allowed); None: a new term, which allows none of its earlier ballots.
    keep: Version | None = None


@dataclass(frozen=True)
class Promise:
    op: str
    ballot: Version
    # key -> (accepted ballot, accepted value, committed ballot, committed value)
    entries: dict[str, Entry]
    #: The answer to a term prepare: a promise for every key (an acceptor of an earlier version
    #: answers a term prepare as a prepare of no key, which must not count as one).
    whole: bool = False


@dataclass(frozen=True)
class Accept:
    op: str
    ballot: Version
    values: dict[str, Value]  # key -> value
    #: Keys the round read but does not change: an acceptor answers Accepted only if it has
    #: promised no higher ballot for them either (a term's reads are current when it does).
    reads: tuple[str, ...] = ()


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
    end: Version | None = None  # this ballot's Prepare is a term prepare up to this ballot
    direct: bool = False  # this ballot is phase 2 alone, within a term
    accept: Accept | None = None  # this ballot's Accept (asked again as it is)
    decided: bool = False  # a majority accepted this ballot's values
    hold_own: bool = False  # our own acceptor is asked once another has accepted (see _direct)
    #: Within a term: the results of operations judged without a change (a conflict, nothing
    #: to do), given once a majority has accepted the round (their reads are current then).
    deferred: list[Result] = field(default_factory=list)


def _gt(a: Version | None, b: Version | None) -> bool:
    return a is not None and (b is None or a > b)


class PaxosCore:
    """Acceptor for every key, and proposer for the operations started here.

    As a proposer it batches: operations asked while a round is under way wait in a queue, and
    the next round carries all of them whose keys overlap neither each other nor a round in
    flight (each still all-or-nothing on its own: after the promises, every operation is checked
    against the current values by itself, and only those that can go through are accepted; a
    conflict of one does not hold up the others). Up to ``parallel_rounds`` rounds run at once.

    **Terms** (``stable``: the grid's one proposer). Phase 1 is run once for every key and many
    rounds instead of once per round: a term prepare at ballot B asks each acceptor to promise
    that it takes no ballot below E = B + ``term_ms`` from anyone but this proposer, whose own
    ballots from B up to E it still takes. The acceptors answer the values this proposer may
    lack: every key accepted but not known committed, and the keys of every digest bucket where
    their committed values differ from the proposer's (the digest is carried in the prepare).
    With such promises from a majority the proposer learns the committed values it lacked,
    repairs what was in flight, and then each round is phase 2 alone: an Accept at a fresh
    ballot below E carrying the values to set and the keys only read, judged against the
    values this proposer knows (every decision from then on is its own). A Nack, a round
    retried, or a change of members ends the term; it is renewed by the next round once half
    of it has passed. Docs: docs/leases.md, "Terms".
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
        stable: bool = False,
        term_ms: int = 2000,
    ):
        self.me = me
        # Run rounds within terms (see the class docstring) when proposing; the lease service
        # sets it on the grid's proposer. Off: every round runs both phases.
        self.stable = stable
        self.term_ms = max(2, term_ms)
        self._term: tuple[Version, Version] | None = None  # (B, E) once a majority promised
        self._ranging: str | None = None  # the round whose term prepare is out
        self._no_terms_until = 0.0  # a term prepare got no majority: plain rounds until then
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
        # Acceptor: the term it promised, (proposer, start, end): no ballot below ``end`` but
        # that proposer's from ``start``; the highest ballot promised or accepted per proposer;
        # the committed-values digest and its keys per bucket; the keys accepted but not known
        # committed.
        self.term: tuple[str, Version, Version] | None = None
        self._top: dict[str, Version] = {}
        self._digest: list[int] = [0] * DIGEST_BUCKETS
        self._bucket_keys: list[set[str]] = [set() for _ in range(DIGEST_BUCKETS)]
        self._inflight: set[str] = set()
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
        if kind == "top":  # a proposer's highest ballot promised or accepted (see snapshot)
            self._topped(ballot)
            return
        if kind == "term":  # key: the proposer; ballot: the term's start; value: its end
            end = Version.parse(value)
            # Terms are granted in (start, end) order (a renewal keeps the start and moves the
            # end; any other term starts past the one before): an older record changes nothing.
            if self.term is None or (ballot, end) > (self.term[1], self.term[2]):
                self.term = (key, ballot, end)
            self._topped(ballot)
            return
        st = self.keys.setdefault(key, KeyState())
        if kind == "promise":
            if _gt(ballot, st.promised):
                st.promised = ballot
            self._topped(ballot)
        elif kind == "accept":
            if _gt(ballot, st.promised) or ballot == st.promised:
                st.promised = ballot
            if _gt(ballot, st.acc_ballot):
                st.acc_ballot, st.acc_value = ballot, value
            self._topped(ballot)
        elif kind == "commit":
            if _gt(ballot, st.com_ballot):
                b = bucket_of(key)
                if st.com_ballot is not None:
                    self._digest[b] ^= _stamp(key, st.com_ballot)
                self._digest[b] ^= _stamp(key, ballot)
                self._bucket_keys[b].add(key)
                st.com_ballot, st.com_value = ballot, value
        if _gt(st.acc_ballot, st.com_ballot):
            self._inflight.add(key)
        else:
            self._inflight.discard(key)

    def snapshot(self) -> list[Record]:
        """Records that rebuild, on their own, what :meth:`restore` of every record so far
        built: the acceptor's state per key, its term, the highest ballot it promised or
        accepted per proposer, and our proposer's latest ballot reserve. What a compaction of
        the store keeps instead of every record."""
        recs: list[Record] = []
        if self._reserved is not None:
            recs.append(("ballot", self.me, self._reserved, None))
        for ballot in self._top.values():  # per proposer: what a term prepare is checked against
            recs.append(("top", "", ballot, None))
        if self.term is not None:
            owner, start, end = self.term
            recs.append(("term", owner, start, str(end)))
        for k, st in self.keys.items():
            if st.promised is not None:
                recs.append(("promise", k, st.promised, None))
            if st.acc_ballot is not None:
                recs.append(("accept", k, st.acc_ballot, st.acc_value))
            if st.com_ballot is not None:
                recs.append(("commit", k, st.com_ballot, st.com_value))
        return recs

    def _topped(self, ballot: Version) -> None:
        if _gt(ballot, self._top.get(ballot.origin)):
            self._top[ballot.origin] = ballot

    def _bound(self, ballot: Version, keys: Iterable[str]) -> Version | None:
        """The highest promise that forbids ``ballot`` for ``keys`` (None: it is allowed)."""
        higher = [
            p for k in keys if k in self.keys and (p := self.keys[k].promised) is not None and p > ballot
        ]
        if self.term is not None:
            owner, start, end = self.term
            if end > ballot and not (owner == ballot.origin and ballot >= start):
                higher.append(end)
        return max(higher) if higher else None

    def _record(self, rec: Record) -> None:
        self._apply_record(rec)
        self._out.persist.append(rec)

    def _on_prepare(self, src: str, m: Prepare) -> None:
        self.clock.observe(m.ballot)
        if m.end is not None:
            self._on_term_prepare(src, m, m.end)
            return
        # Equal ballot: a duplicated Prepare; promising it again is harmless.
        bound = self._bound(m.ballot, m.keys)
        if bound is not None:
            self._out.sends.append((src, Nack(m.op, m.ballot, bound)))
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

    def _on_term_prepare(self, src: str, m: Prepare, end: Version) -> None:
        """Promises every key below ``end`` to the proposer of ``m.ballot`` (see the class
        docstring), unless another proposer holds a term past it or was promised or accepted a
        higher ballot for any key; answers what the proposer may lack."""
        owner = m.ballot.origin
        bound = [b for o, b in self._top.items() if o != owner and b > m.ballot]
        if self.term is not None and self.term[0] != owner and self.term[2] > m.ballot:
            bound.append(self.term[2])
        if bound:
            self._out.sends.append((src, Nack(m.op, m.ballot, max(bound))))
            return
        start, end = self._term_span(owner, m, end)
        if self.term != (owner, start, end):
            self._record(("term", owner, start, str(end)))
        keys = set(self._inflight)
        if len(m.digest) == DIGEST_BUCKETS:
            for b, mine in enumerate(self._digest):
                if mine != m.digest[b]:
                    keys |= self._bucket_keys[b]
        else:  # no digest (or another layout): everything
            keys = set(self.keys)
        entries: dict[str, Entry] = {}
        for k in keys:
            st = self.keys[k]
            entries[k] = (st.acc_ballot, st.acc_value, st.com_ballot, st.com_value)
        self._out.sends.append((src, Promise(m.op, m.ballot, entries, whole=True)))

    def _term_span(self, owner: str, m: Prepare, end: Version) -> tuple[Version, Version]:
        """The (start, end) a term prepare is granted. A renewal of the term we promised keeps
        its start: the proposer's rounds under way in it stay allowed. Any other term (after its
        restart, or after it gave one up) allows none of its ballots from before: an Accept of
        those arriving late could set a value its new term never learnt."""
        if self.term is not None and self.term[0] == owner and m.keep is not None and m.keep == self.term[1]:
            return self.term[1], max(end, self.term[2])
        return m.ballot, end

    def _on_accept(self, src: str, m: Accept) -> None:
        self.clock.observe(m.ballot)
        bound = self._bound(m.ballot, list(m.values) + list(m.reads))
        if bound is not None:
            self._out.sends.append((src, Nack(m.op, m.ballot, bound)))
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
        if rnd.accept is not None and not rnd.decided:
            # Begun again after its Accept left (a Nack, no majority in time): those values may
            # yet be chosen, unknown to a term's reads. The term ends; a new one learns them.
            self._term = None
        if rnd.end is not None and rnd.phase == "prepare" and len(rnd.promises) < self.majority:
            self._no_terms_until = now + self.deadline  # maybe acceptors of an earlier version
        if self._ranging == rnd.id:
            self._ranging = None
        rnd.ballot = self.clock.tick()
        self._reserve_for(rnd.ballot)
        rnd.phase = "prepare"
        rnd.promises, rnd.accepted, rnd.values, rnd.carried = {}, set(), {}, []
        rnd.refs = set()
        rnd.own = {}
        rnd.deferred = []
        rnd.end, rnd.direct, rnd.accept, rnd.decided, rnd.hold_own = None, False, None, False, False
        rnd.attempts += 1
        rnd.started = now
        self._asked_at[rnd.ballot] = now
        if len(self._asked_at) > 64:
            del self._asked_at[next(iter(self._asked_at))]
        self._arm(rnd, now)
        self._out.started.append((rnd.id, rnd.ballot, tuple(rnd.ops)))
        keys = sorted({k for op in rnd.ops for k in self.ops[op].cas})
        if self.stable and self.me in self.members:
            term = self._term
            renew = term is None or rnd.ballot.wall_ms >= term[1].wall_ms - self.term_ms // 2
            if renew and self._ranging is None and now >= self._no_terms_until:
                self._term_prepare(rnd, now)
                return
            if term is not None and term[0] < rnd.ballot < term[1] and self._may_skip_phase1(rnd):
                self._direct(rnd, keys, now)
                return
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

    def _may_skip_phase1(self, rnd: _Round) -> bool:
        """Phase 2 alone only while every other round of ours is too: the values a round with
        both phases accepts (repairs) are known here once decided, not before."""
        return all(r.direct or r is rnd for r in self.rounds.values())

    def _term_prepare(self, rnd: _Round, now: float) -> None:
        """Phase 1 for every key at once (see the class docstring), with the round's operations
        judged once a majority promised."""
        self._ranging = rnd.id
        rnd.end = Version(rnd.ballot.wall_ms + self.term_ms, 0, self.me)
        rnd.known = {}
        keep = self._term[0] if self._term is not None else None
        rnd.prepare = Prepare(rnd.id, rnd.ballot, (), {}, end=rnd.end, digest=tuple(self._digest), keep=keep)
        self._ask(rnd, rnd.prepare, self._quorum(), now)

    def _direct(self, rnd: _Round, keys: list[str], now: float) -> None:
        """Phase 2 alone, within our term: the operations are judged against the values this
        host knows committed (in a term, every decision is ours and known here at once)."""
        rnd.direct = True
        current = {k: (self.keys[k].com_value if k in self.keys else None) for k in keys}
        values = self._judge(rnd, current, {}, now, defer=True)
        changed = set(values)
        rnd.values = values
        rnd.phase = "accept"
        rnd.accept = Accept(rnd.id, rnd.ballot, dict(values), tuple(k for k in keys if k not in changed))
        # Our own acceptor accepts last, once another has: with the others gone (a partition,
        # a crash), nothing is accepted anywhere, and the operation that fails for want of a
        # majority leaves no value in flight for the next term to repair (a lease taken by a
        # request its caller was told had failed).
        targets = self._quorum()
        remote = [m for m in targets if m != self.me]
        if remote and len(targets) > len(remote):
            self._ask(rnd, rnd.accept, remote, now)
            rnd.asked.add(self.me)
            rnd.hold_own = True
        else:
            self._ask(rnd, rnd.accept, targets, now)

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
        msg = rnd.prepare if rnd.phase == "prepare" else rnd.accept
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
        if self._ranging == rnd.id:
            self._ranging = None
        if rnd.accept is not None and not rnd.decided:
            # Given up before a majority accepted: its values may yet be chosen, which the
            # term's reads would not know.
            self._term = None
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
        if (rnd.end is not None) != m.whole:
            return  # a term prepare answered as a plain one (an earlier version): not a promise
        entries = self._read_entries(rnd, m.entries)
        if entries is None:
            return
        self._heard(rnd, src)
        self._answered(src)
        rnd.promises[src] = entries
        self._arm(rnd, now)
        if len(rnd.promises) < self.majority:
            return
        keys = {k for op in rnd.ops for k in self.ops[op].cas}
        if rnd.end is not None:
            keys |= {k for entries in rnd.promises.values() for k in entries}
        inflight, current = {}, {}
        for k in keys:
            acc_b, acc_v, com_b, com_v = None, None, None, None
            if rnd.end is not None and k in self.keys:
                # A term prepare names only what differs from ours: our own committed value
                # is a known decision too (a plain one asks every acceptor of a majority).
                com_b, com_v = self.keys[k].com_ballot, self.keys[k].com_value
            for entries in rnd.promises.values():
                ab, av, cb, cv = entries.get(k, (None, None, None, None))
                if _gt(ab, acc_b):
                    acc_b, acc_v = ab, av
                if _gt(cb, com_b):
                    com_b, com_v = cb, cv
            current[k] = com_v
            if _gt(acc_b, com_b):
                inflight[k] = acc_v
            if rnd.end is not None and com_b is not None:
                # What we lacked is learnt: from now on in the term, every key's current value
                # is the one our acceptor has committed.
                self._learn(k, com_b, com_v)
        if rnd.end is not None:
            self._ranging = None
            self._term = (rnd.ballot, rnd.end)
        # Someone else's round on these keys may have been decided: its values are proposed
        # again at our ballot (repair), and the operations on those keys wait for our next
        # ballot. Every other operation is judged on its own against the current values.
        values = self._judge(rnd, current, inflight, now, defer=False)
        if not values:
            self._end_round(rnd, now)
            return
        rnd.values = values
        rnd.phase = "accept"
        # The members that promised are a majority and likely to accept; any other may too.
        promised = [m for m in self.members if m in rnd.promises]
        rnd.accept = Accept(rnd.id, rnd.ballot, dict(values))
        self._ask(rnd, rnd.accept, promised if self.thrifty else list(self.members), now)

    def _learn(self, key: str, ballot: Version, value: Value) -> None:
        """Records a value decided at ``ballot`` that our acceptor had not committed (and
        tells the DOM: a Commit of one key)."""
        st = self.keys.get(key)
        if st is None or _gt(ballot, st.com_ballot):
            self._record(("commit", key, ballot, value))
            self._out.commits.append(Commit(ballot, {key: value}))

    def _judge(
        self, rnd: _Round, current: dict[str, Value], inflight: dict[str, Value], now: float, defer: bool
    ) -> dict[str, Value]:
        """Judges the round's operations in arrival order against ``current`` (each on its own:
        those on a key in flight wait for the next ballot): returns the values to accept, the
        repairs included. An operation that fails, or needs no change, has its result at once,
        or (``defer``) once the round is accepted."""
        values = dict(inflight)
        after = dict(current)  # what each key holds once the operations before are in
        for op_id in list(rnd.ops):
            op = self.ops[op_id]
            if not inflight.keys().isdisjoint(op.cas):
                continue
            mine = {}
            result: Result | None = None
            for k, (expected, new) in sorted(op.cas.items(), key=lambda kv: kv[0]):
                cur = after[k]
                if isinstance(expected, Update):
                    try:
                        new = expected.apply(cur)
                    except Refused:
                        result = Conflict(op_id, k, cur, {x: after[x] for x in op.cas})
                        break
                    expected = cur
                if cur == new:
                    continue
                if cur != expected:
                    result = Conflict(op_id, k, cur, {x: after[x] for x in op.cas})
                    break
                mine[k] = new
            else:
                if not mine:
                    result = Decided(op_id, None, {})
                else:
                    values.update(mine)
                    after.update(mine)
                    rnd.carried.append(op_id)
                    rnd.own[op_id] = mine
            if result is not None:
                if defer:
                    rnd.deferred.append(result)
                else:
                    self._finish(op_id, result)
        return values

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
        if rnd.hold_own and src != self.me:
            rnd.hold_own = False
            self._out.sends.append((self.me, rnd.accept))
        if m.refs:
            rnd.refs.add(src)
        self._arm(rnd, now)
        if len(rnd.accepted) < self.majority:
            return
        rnd.decided = True
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
        for mem in self.members if rnd.values else ():  # a round of reads alone sets nothing
            self._out.sends.append((mem, short if mem in rnd.refs and mem != self.me else commit))
        if self.me in self.members:
            # Our acceptor knows the decision at once (its Commit through the loopback comes
            # later): a term's next round reads it there.
            for k, v in rnd.values.items():
                st = self.keys.get(k)
                if st is None or _gt(rnd.ballot, st.com_ballot):
                    self._record(("commit", k, rnd.ballot, v))
        if rnd.attempts == 1:
            self.round_time += 0.2 * (now - rnd.started - self.round_time)
        for op_id in list(rnd.carried):
            self._finish(op_id, Decided(op_id, rnd.ballot, rnd.own.get(op_id, {})))
        for result in rnd.deferred:
            self._finish(result.op, result)
        rnd.deferred = []
        if rnd.ops:
            # Operations waiting on a repaired key: our next ballot (the round succeeded: a
            # term it began or ran in goes on).
            rnd.end, rnd.direct = None, False
            self._prepare(rnd, now)
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
        if rnd.direct or rnd.end is not None:
            self._term = None  # someone else proposes: no term (a new one is asked on retry)
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
        members = tuple(sorted(members))
        if members != self.members:
            self._term = None  # promised by a majority of the members before
        self.members = members

    def _flush(self) -> Output:
        out, self._out = self._out, Output()
        return out
