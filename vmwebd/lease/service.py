"""The Twisted layer of the consensus leases, and the lease table built on it.

:class:`LeaseService` drives a :class:`~vmwebd.lease.paxos.PaxosCore`: it persists acceptor
records (its own durable store, ``<state dir>/paxos``) on a dedicated thread BEFORE sending any
message that depends on them, delivers messages to itself directly and to peers through the peer
transport, ticks the core on the injected clock, and records every commit it learns as a lease
entity in the DOM, versioned with the deciding ballot.

:class:`PaxosLeaseTable` is the allocator's lease table on top of it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from vmwebd.blocking import ThreadPoolRunner
from vmwebd.dom.hlc import Version
from vmwebd.dom.records import LeaseRec
from vmwebd.dom.store import DurableStore
from vmwebd.errors import NoQuorum
from vmwebd.lease import paxos
from vmwebd.lease.table import LeaseConflict
from vmwebd.wiring import BlockingRunner, EntitySink, PeerSender

log = Logger()
MEMBERS_KEY = "config/members"  # the consensus members, itself decided by consensus
#: Forward requests out to the proposer at once, and operations one of them carries at most.
FORWARDS_IN_FLIGHT = 2
FORWARDS_PER_BUNDLE = 16
#: How long a Commit alone waits for the next message to its host before it leaves by itself.
COMMIT_LINGER_S = 0.02


def _row(rec) -> list:
    """An acceptor record as JSON holds it: a journal record alone, or one of a snapshot's."""
    kind, key, ballot, value = rec
    return [kind, key, str(ballot), value]


def _unrow(row) -> tuple:
    kind, key, ballot, value = row
    return (kind, key, Version.parse(ballot), value)


def _encode(rec) -> bytes:
    return json.dumps(_row(rec)).encode()


def _decode(data: bytes):
    return _unrow(json.loads(data))


class GroupCommit:
    """Appends records to a store through ``run_blocking`` (the store's own thread in
    production), many callers' records in one write and one fsync: while a write is under way, what arrives waits and goes down together in the next.
    Each caller's Deferred fires once its records are durable, in the order they were handed in.

    Records nothing waits for (:meth:`append_later`) ride along with the next write, or go down
    by themselves ``later_s`` after they came if none comes: they never hold up a write others
    wait for. ``clock`` schedules those later writes.

    Writes are handed to ``run_blocking`` one at a time (the next only once the one before is
    done), so they reach the store in the order they were handed in, whatever the runner."""

    def __init__(self, run_blocking: BlockingRunner, append_many, clock, later_s: float = 0.1, compact=None):
        self.run_blocking = run_blocking
        self.append_many = append_many
        self.compact_store = compact  # compact(snapshot): replaces the store's journal
        self._compact_with: Callable[[], list] | None = None
        self.later_s = later_s
        self.clock = clock
        self._batch: list = []
        self._later: list = []
        self._later_call = None
        self._waiters: list[defer.Deferred] = []
        self._writing: list[defer.Deferred] = []  # the waiters of the write under way
        self._busy = False
        self.writes = 0  # how many writes (fsyncs) it took

    def append(self, records) -> defer.Deferred:
        d = defer.Deferred()
        self._batch.extend(records)
        self._waiters.append(d)
        if not self._busy:
            self._write()
        return d

    def barrier(self) -> defer.Deferred:
        """Fires once every record handed to :meth:`append` so far is durable: at once when none
        is waiting or being written, else with the write that takes the last of them."""
        if self._batch:
            d = defer.Deferred()
            self._waiters.append(d)  # goes down with the next write, which is bound to happen
            return d
        if self._busy:
            d = defer.Deferred()
            self._writing.append(d)  # fired with the write under way
            return d
        return defer.succeed(None)

    def compact(self, snapshot: Callable[[], list]) -> None:
        """Makes the next write a compaction: ``snapshot()``, called when that write starts
        (on this thread), must give the state every record handed in so far built, which
        ``compact`` (on the store's side) writes in place of the journal; those records are not
        written on their own."""
        self._compact_with = snapshot
        if not self._busy:
            self._write()

    def append_later(self, records) -> None:
        self._later.extend(records)
        if self._later_call is None or not self._later_call.active():
            self._later_call = self.clock.callLater(self.later_s, self._flush_later)

    def _flush_later(self) -> None:
        if self._later and not self._busy:
            self._write()

    def _write(self) -> None:
        batch, waiters = self._later + self._batch, self._waiters
        self._batch, self._later, self._waiters = [], [], []
        self._writing = waiters
        self._busy = True
        self.writes += 1
        job, arg = self.append_many, batch
        if self._compact_with is not None and self.compact_store is not None:
            job, arg = self.compact_store, self._compact_with()
            self._compact_with = None

        def done(result):
            self._busy = False
            for d in waiters:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(None)
            if self._batch:
                self._write()
            elif self._later and (self._later_call is None or not self._later_call.active()):
                self._later_call = self.clock.callLater(self.later_s, self._flush_later)

        self.run_blocking(job, arg).addBoth(done)


class LeaseService:
    """Carries out what the Paxos core decides: persists, then sends; ticks it when it asks to.

    ``send(dst, msgs)`` carries a list of messages to one peer (the transport bundles them and
    hands what the peer answers inline back to :meth:`receive`); a lost message is fine.
    ``on_round(outcome, seconds)``, if given, hears of every proposal once it ends: outcome
    ``decided``, ``conflict``, ``noquorum`` or ``error``, and its seconds on the reactor's clock.
    ``run_blocking`` carries out the store's work (its load, every group write): by default a
    thread of its own, which :meth:`start` starts and :meth:`stop` stops; the node passes that
    explicitly, a test on a ``task.Clock`` an inline runner (:mod:`vmwebd.blocking`)."""

    def __init__(
        self,
        me: str,
        domsvc,
        store_dir,
        reactor,
        clock,
        rng,
        members,
        send: PeerSender,
        fsync: bool = True,
        deadline: float = 3.0,
        compact_every: int = 20000,
        parallel_rounds: int = 1,
        on_round=None,
        proposer_for: Callable[[], str | None] | None = None,
        non_members_alive: Callable[[], bool] | None = None,
        note_own: EntitySink | None = None,
        run_blocking: BlockingRunner | None = None,
    ):
        self.me = me
        self.on_round = on_round
        self.domsvc = domsvc
        self.reactor = reactor
        self.send = send
        self.store = DurableStore(store_dir, fsync=fsync)
        self.core = paxos.PaxosCore(
            me, clock, rng, members, deadline=deadline, parallel_rounds=parallel_rounds
        )
        self.compact_every = compact_every
        self.run_blocking: BlockingRunner = run_blocking or ThreadPoolRunner.dedicated(
            reactor, "vmweb-paxos-store"
        )
        self._writer = GroupCommit(self.run_blocking, self.store.append_many, reactor, compact=self._compact)
        self.compactions = 0
        self._pending: dict[str, defer.Deferred] = {}
        # Ballots of ours a lease record may still carry (see open_ballot_floor): by round
        # (round id -> (since, ballots sent in a Prepare)), and decided but not yet recorded here.
        self._ballots_of_round: dict[str, tuple[float, set[Version]]] = {}
        self._unrecorded: dict[Version, tuple[float, Version]] = {}
        self._ids = itertools.count(1)
        self._timer = None
        self._running = False
        self._since_compact = 0
        #: Are there live hosts that are not consensus members? Only they need this host's
        #: decided leases pushed by gossip at once: every member learns them from the Commit
        #: (and anti-entropy brings what a lost Commit missed). Given by the node.
        self.non_members_alive = non_members_alive or (lambda: True)
        #: Tells gossip about own decided leases recorded without a push (see GossipService.note_own).
        self.note_own = note_own or (lambda entities: None)
        #: The host that runs this host's proposals (None: this one). One proposer for the grid
        #: batches what many proposers would fight over: operations on shared keys (a host's
        #: capacity set, an owner's quota) from every host meet in its rounds instead of
        #: pre-empting each other's ballots. Given by the node; any choice is safe.
        self.proposer_for = proposer_for or (lambda: None)
        #: How long a forwarded operation waits for its outcome before running here instead:
        #: longer than the proposer itself may take to end it (its deadline, stretched while a
        #: majority answers), so a proposer that is merely slow is not doubled by a second run
        #: here — that only adds load where there is too much. A proposer that cannot be
        #: reached is left at once.
        self.forward_timeout = deadline * (self.core.contended_factor + 1)
        self._forwarded: dict[str, defer.Deferred] = {}
        self._serving: dict[str, defer.Deferred] = {}
        self._raw: set[str] = set()
        self.forwarded = 0  # operations sent to another proposer
        self.fell_back = 0  # of those, run here after all (no answer in time)
        #: Forward requests to one proposer at a time; operations asked meanwhile leave
        #: together, in one bundle, when one returns (see _send_forwards).
        self.forwards_in_flight = FORWARDS_IN_FLIGHT
        self._forward_queue: dict[str, list[paxos.Forward]] = {}
        self._forwards_out: dict[str, int] = {}
        self._fallbacks: dict[str, object] = {}
        #: Commits to a peer wait up to this long for the next message to it (within a term, the
        #: next round's Accept) and ride in its request: at a steady rate a decision costs one
        #: request to one acceptor, not one to every member. Nothing waits on a Commit (the
        #: requester is answered at the decision, and our own DOM has the value then); a member
        #: learns the value that much later. 0: Commits leave with the decision.
        self.commit_linger = COMMIT_LINGER_S
        self._lingering: dict[str, list] = {}
        self._linger_call = None

    @defer.inlineCallbacks
    def start(self):
        self.run_blocking.start()
        records = yield self.run_blocking(self._load)
        self.core.restore(records)
        self._adopt_members()
        self.domsvc.dom.subscribe(
            lambda kind, id_: kind == "lease" and id_ == MEMBERS_KEY and self._adopt_members()
        )
        self._since_compact = len(records)
        self._running = True
        self._schedule()

    def _schedule(self) -> None:
        """Wakes the core when it next has a timer due (a retry, a deadline), and not before:
        no polling, and no fixed delay added to a retry."""
        if not self._running:
            return
        due = self.core.next_timer()
        if due is None:
            return
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= due:
                return
            self._timer.cancel()
        self._timer = self.reactor.callLater(max(0.0, due - self.reactor.seconds()), self._tick)

    def _tick(self):
        self._timer = None
        self._carry(self.core.tick(self.reactor.seconds()))

    def stop(self):
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        self._lingering.clear()  # lost Commits: the members learn those values by anti-entropy
        for d in list(self._pending.values()):
            d.errback(NoQuorum("the daemon is stopping"))
        self._pending.clear()
        # Operations asked of the proposer and not answered yet end too (their fallback timers
        # with them): run here after the stop, they would write to a closed store.
        self._forward_queue.clear()
        for op_id in list(self._forwarded):
            d = self._forwarded.pop(op_id)
            if not d.called:
                d.errback(NoQuorum("the daemon is stopping"))
        self.run_blocking.stop()
        self.store.close()

    # -- membership ------------------------------------------------------------------------
    def members(self) -> tuple[str, ...]:
        return self.core.members

    def _adopt_members(self) -> None:
        """Uses the newest decided member list we know (our acceptor's or the DOM's record)."""
        best_ballot, best = self.core.committed(MEMBERS_KEY)
        rec_v = self.domsvc.dom.version_of("lease", MEMBERS_KEY)
        rec = self.domsvc.dom.get(LeaseRec, MEMBERS_KEY)
        if rec is not None and rec_v is not None and (best_ballot is None or rec_v > best_ballot):
            best = rec.holder
        if best:
            members = tuple(sorted(best.split(",")))
            if members != self.core.members:
                log.info("consensus members are now {members}", members=", ".join(members))
                self.core.set_members(members)

    @defer.inlineCallbacks
    def change_members(self, add: str | None = None, remove: str | None = None):
        """Adds or removes one member, decided by the current members (so quorums overlap)."""
        from vmwebd.errors import InvalidArgument, NoSuchHost

        current = tuple(self.core.members)
        if add is not None:
            if add in current:
                raise InvalidArgument("host", f"{add!r} is already a consensus member")
            new = tuple(sorted(current + (add,)))
        else:
            if remove not in current:
                raise NoSuchHost(remove)
            if len(current) == 1:
                raise InvalidArgument("host", f"{remove!r} is the last consensus member")
            new = tuple(m for m in current if m != remove)
        result = yield self.propose(
            {MEMBERS_KEY: (",".join(current) if self._members_recorded() else None, ",".join(new))}
        )
        if isinstance(result, paxos.Conflict):
            raise InvalidArgument(
                "host", f"the member list changed meanwhile (now {result.holder}); try again"
            )
        self.core.set_members(new)
        return new

    def _members_recorded(self) -> bool:
        return (
            self.core.committed(MEMBERS_KEY)[0] is not None
            or self.domsvc.dom.get(LeaseRec, MEMBERS_KEY) is not None
        )

    # -- proposals ------------------------------------------------------------------------
    def propose(self, cas: dict) -> defer.Deferred:
        """Runs one all-or-nothing CAS; fires with Decided or Conflict, fails with NoQuorum.
        Runs it here, or at the host :attr:`proposer_for` names (then here after all if that
        host does not answer within :attr:`forward_timeout`)."""
        op_id = f"{self.me}-{next(self._ids)}-{int(self.reactor.seconds() * 1000)}"
        d = defer.Deferred()
        if self.on_round is not None:
            d.addBoth(self._round_ended, self.reactor.seconds())
        to = self.proposer_for() if self._running else None
        if to is not None and to != self.me:
            self._forward(to, op_id, cas, d)
        else:
            self._propose_here(op_id, cas, d)
        return d

    def _propose_here(self, op_id: str, cas: dict, d: defer.Deferred, stable: bool = True) -> None:
        """Runs the operation with this host as its proposer: the grid's one (``stable``: its
        rounds run within terms, phase 2 alone), or a stand-in for a proposer that did not
        answer (both phases every round, so two proposers do not take terms from each other)."""
        self._pending[op_id] = d
        self.core.stable = stable
        self._carry(self.core.propose(op_id, cas, self.reactor.seconds()))

    def _forward(self, to: str, op_id: str, cas: dict, d: defer.Deferred) -> None:
        """Asks ``to`` to run the operation; its Outcome comes back in the answer."""
        self.forwarded += 1
        self._forwarded[op_id] = d

        def here(_=None):
            if self._forwarded.pop(op_id, None) is None:
                return  # answered meanwhile
            self.fell_back += 1
            self._propose_here(op_id, cas, d, stable=False)

        timer = self.reactor.callLater(self.forward_timeout, here)

        def stop_timer(result):
            self._fallbacks.pop(op_id, None)
            if timer.active():
                timer.cancel()
            return result

        d.addBoth(stop_timer)
        self._fallbacks[op_id] = here
        self._forward_queue.setdefault(to, []).append(paxos.Forward(op_id, cas))
        self._send_forwards(to)

    def _send_forwards(self, to: str) -> None:
        """Sends the operations waiting for ``to``, at most :attr:`forwards_in_flight` requests
        at a time, each carrying all that waited (up to FORWARDS_PER_BUNDLE, in one bundle).

        A request is answered once every operation in it is decided there (their Outcomes ride
        back on it), and the proposer's rounds take what waits anyway; so operations asked while
        requests are out lose nothing by waiting for one to return, and a busy host sends one
        request per round instead of one per operation (each a SOAP request the proposer, the
        grid's busiest host, must serve)."""
        queue = self._forward_queue.get(to)
        while queue and self._forwards_out.get(to, 0) < self.forwards_in_flight:
            batch = [f for f in queue[:FORWARDS_PER_BUNDLE] if f.op in self._forwarded]
            del queue[:FORWARDS_PER_BUNDLE]
            if not batch:
                continue
            self._forwards_out[to] = self._forwards_out.get(to, 0) + 1

            def returned(ok, batch=batch):
                self._forwards_out[to] -= 1
                if not ok:  # not delivered: the proposer is gone; run them here now
                    for f in batch:
                        fallback = self._fallbacks.get(f.op)
                        if fallback is not None:
                            fallback()
                self._send_forwards(to)

            # The answer comes once the operations are decided there: wait for it as long as that.
            self.send(to, batch, timeout=self.forward_timeout).addCallbacks(
                returned, lambda f: returned(False)
            )
        if not queue:
            self._forward_queue.pop(to, None)

    def _outcome(self, m: paxos.Outcome) -> None:
        d = self._forwarded.pop(m.op, None)
        if d is not None:
            self._settle(d, m.result)

    def _serve(self, m: paxos.Forward) -> defer.Deferred:
        """Runs a forwarded operation here; fires with its Outcome (a duplicate of one being run
        gets the same)."""
        d = self._serving.get(m.op)
        if d is None:
            d = self._serving[m.op] = defer.Deferred()
            self._raw.add(m.op)
            self._propose_here(m.op, m.cas, d)

            def done(result):
                self.reactor.callLater(self.forward_timeout, self._serving.pop, m.op, None)
                return result

            d.addBoth(done)
        out = defer.Deferred()
        d.addBoth(lambda r: (out.callback(paxos.Outcome(m.op, r)), r)[1])
        return out

    def _round_ended(self, result, started: float):
        if isinstance(result, paxos.Decided):
            outcome = "decided"
        elif isinstance(result, paxos.Conflict):
            outcome = "conflict"
        elif isinstance(result, Failure) and result.check(NoQuorum):
            outcome = "noquorum"
        else:
            outcome = "error"
        self.on_round(outcome, self.reactor.seconds() - started)
        return result

    def receive(self, src: str, msgs, inline: bool = False) -> defer.Deferred:
        """Paxos messages from a peer (or ourselves), taken in order; fires once their effects
        are durable. With ``inline`` (the peer reads answers in its request's response), what
        the core answers to ``src`` is not sent: the Deferred fires with those messages."""
        if not isinstance(msgs, (list, tuple)):
            msgs = [msgs]
        if not self._running:
            # Not started (the acceptor's state is not loaded) or stopped (the store is closed):
            # a lost message, which the proposer copes with.
            return defer.succeed([] if inline else None)
        served = []
        for m in msgs:
            if isinstance(m, paxos.Forward):
                d = self._serve(m)
                if not inline:
                    d.addCallback(lambda o: self.send(src, [o]))
                served.append(d)
        outcomes = [m for m in msgs if isinstance(m, paxos.Outcome)]
        msgs = [m for m in msgs if not isinstance(m, (paxos.Forward, paxos.Outcome))]
        if not msgs:
            for m in outcomes:
                self._outcome(m)
            if inline and served:
                # Commits lingering for the asking host ride back before the Outcomes they decide.
                return defer.gatherResults(served).addCallback(lambda rs: self._lingering.pop(src, []) + rs)
            return defer.succeed([] if inline else None)
        out = self.core.receive_all(src, msgs, self.reactor.seconds())
        replies = []
        if inline and src != self.me:
            replies = [m for dst, m in out.sends if dst == src]
            out.sends = [(dst, m) for dst, m in out.sends if dst != src]
        d = self._carry(out)
        # Outcomes after the Commits that came with them: their values are in the DOM by then
        # (a commit record holds nothing up) when the requester reads them.
        for m in outcomes:
            self._outcome(m)
        if not inline:
            return d
        # Commits lingering for the asking host ride back too (before the Outcomes they decide).
        return defer.gatherResults([d] + served).addCallback(
            lambda rs: replies + self._lingering.pop(src, []) + list(rs[1:])
        )

    # -- carrying out the core's output --------------------------------------------------------
    def _carry(self, out: paxos.Output) -> defer.Deferred:
        """Persists the output's records, then speaks: sends, results, DOM records. Fires once
        the records are durable and the messages handed to the transport."""
        self._hold_new_ballots(out)
        self._since_compact += len(out.persist)
        # A commit record is knowledge, not a promise: nothing said depends on it (lost in a
        # crash, the value shows as accepted-not-committed and is repaired to the same value),
        # so it rides along with the next write instead of holding up promises behind it.
        later = [_encode(r) for r in out.persist if r[0] == "commit"]
        now = [_encode(r) for r in out.persist if r[0] != "commit"]
        if later:
            self._writer.append_later(later)
        if now:
            d = self._writer.append(now)
        elif out.started:
            # A round begins with a ballot covered by a reserve recorded before (see
            # PaxosCore._reserve_for): its Prepare leaves once that record is durable.
            d = self._writer.barrier()
        else:
            d = defer.succeed(None)
        if self._since_compact >= self.compact_every:
            # The journal holds every promise and acceptance since the last compaction: the
            # acceptor's state replaces it with the next write (a restart replays no more than
            # the state is big).
            self._since_compact = 0
            self.compactions += 1
            self._writer.compact(self._snapshot)
        # Persist before you speak: nothing below runs until the records are durable.
        d.addCallback(lambda _: self._after_persist(out))
        d.addErrback(lambda f: log.failure("paxos state could not be persisted", failure=f))
        self._schedule()
        return d

    def _snapshot(self) -> list:
        """The acceptor's state as records (see PaxosCore.snapshot), taken on the reactor; the
        store's thread encodes them (:meth:`_compact`)."""
        return self.core.snapshot()

    def _compact(self, records: list) -> None:
        """On the store's thread: the snapshot, a JSON list of the records a restore replays,
        replaces the journal."""
        self.store.compact(json.dumps([_row(r) for r in records]).encode())

    def _load(self) -> list:
        """On the store's thread: every record a restore replays, the snapshot's first."""
        snapshot, records = self.store.load()
        rows = [_unrow(r) for r in json.loads(snapshot)] if snapshot is not None else []
        return rows + [_decode(r) for r in records]

    # -- ballots not yet in the DOM ----------------------------------------------------------
    #: A ballot held back from this host's anti-entropy claims for longer than this is let go
    #: (an operation ends within its hard deadline; this only bounds a leak).
    HOLD_SECONDS = 60.0

    def open_ballot_floor(self) -> Version | None:
        """The lowest ballot of ours that may still be recorded in the DOM as a lease's version.

        A lease record carries its deciding ballot as version, stamped when the round began and
        recorded when it ends; meanwhile this host writes other things with later stamps. Were
        it to claim, in anti-entropy, that it holds everything it wrote up to those later stamps,
        a peer would count itself complete past the ballot and never ask for the lease record
        (a lost Commit message would then leave replicas apart for good). The gossip layer keeps
        its claims about this host below the floor."""
        now = self.reactor.seconds()
        for table in (self._ballots_of_round, self._unrecorded):
            for key, (since, _) in list(table.items()):
                if now - since > self.HOLD_SECONDS:
                    del table[key]
        ballots = [b for _, bs in self._ballots_of_round.values() for b in bs]
        ballots += [b for _, b in self._unrecorded.values()]
        return min(ballots) if ballots else None

    def _hold_new_ballots(self, out: paxos.Output) -> None:
        """Holds the ballots of the rounds this output begins; at once, before anything else
        runs on the reactor, so no claim made meanwhile can pass them."""
        now = self.reactor.seconds()
        for round_id, ballot, _ in out.started:
            self._ballots_of_round.setdefault(round_id, (now, set()))[1].add(ballot)

    def _release_ballots(self, out: paxos.Output) -> None:
        """Lets go of the ballots of ended rounds, but a decided one until it is recorded here."""
        now = self.reactor.seconds()
        dom = self.domsvc.dom
        for result in out.results:
            ballot = getattr(result, "ballot", None)
            if isinstance(result, paxos.Decided) and ballot is not None:
                versions = [dom.version_of("lease", k) for k in result.values]
                if not all(v is not None and v >= ballot for v in versions):
                    self._unrecorded[ballot] = (now, ballot)
        for round_id in out.ended:
            self._ballots_of_round.pop(round_id, None)
        for c in out.commits:
            self._unrecorded.pop(c.ballot, None)

    def _after_persist(self, out: paxos.Output):
        # What this host decided is in its DOM at once (the caller's next read sees it); our
        # acceptor's own commit record follows through the loopback below.
        decided = [m for dst, m in out.sends if dst == self.me and isinstance(m, paxos.Commit)]
        if decided:
            self._record_commits(decided, spread=self.non_members_alive(), own=True).addErrback(
                lambda f: log.failure("decided leases could not be recorded", failure=f)
            )
        self._release_ballots(out)
        by_dst: dict[str, list] = {}
        for dst, msg in out.sends:
            by_dst.setdefault(dst, []).append(msg)
        for dst in list(by_dst):
            if (
                dst != self.me
                and self.commit_linger > 0
                and all(isinstance(m, paxos.Commit) for m in by_dst[dst])
            ):
                # Before the results: the answer to a forwarded operation takes the Commits
                # lingering for its requester along (see receive), whose DOM then has the value
                # when the answer is read.
                self._lingering.setdefault(dst, []).extend(by_dst.pop(dst))
                if self._linger_call is None or not self._linger_call.active():
                    self._linger_call = self.reactor.callLater(self.commit_linger, self._send_lingering)
        # Results first: a decided operation is decided once a majority accepted it, and its
        # value is in our DOM (above); its requester need not wait while the Commits are encoded
        # and handed to the transport (about 0.4 ms of this thread per peer, measured in process).
        for result in out.results:
            d = self._pending.pop(result.op, None)
            if d is None:
                continue
            if result.op in self._raw:
                self._raw.discard(result.op)
                d.callback(result)  # a forwarded operation: its requester settles it
                continue
            self._settle(d, result)
        for dst, msgs in by_dst.items():
            if dst == self.me:
                self.reactor.callLater(0, self.receive, self.me, msgs)
            else:
                # Commits waiting for this host go first, in the same request (order kept).
                self.send(dst, self._lingering.pop(dst, []) + msgs)
        if out.commits:
            self._record_commits(out.commits, spread=False).addErrback(
                lambda f: log.failure("committed leases could not be recorded", failure=f)
            )

    def _send_lingering(self) -> None:
        self._linger_call = None
        lingering, self._lingering = self._lingering, {}
        for dst, msgs in lingering.items():
            self.send(dst, msgs)

    @staticmethod
    def _settle(d: defer.Deferred, result) -> None:
        """Fires a proposal's Deferred with its result (NoQuorum as the error users see)."""
        if d.called:
            return
        if isinstance(result, paxos.NoQuorum) and result.reachable >= result.needed:
            d.errback(
                NoQuorum(
                    f"could not decide a lease in time: {result.reachable} of {result.members} "
                    "member hosts answered but the round did not complete (contention or slow "
                    "hosts); try again"
                )
            )
        elif isinstance(result, paxos.NoQuorum):
            d.errback(
                NoQuorum(
                    f"cannot lease without a majority: {result.reachable} of {result.members} "
                    f"member hosts answered, {result.needed} needed"
                )
            )
        else:
            d.callback(result)

    def _record_commits(self, commits, spread: bool, own: bool = False) -> defer.Deferred:
        """Writes decided leases into the DOM, versioned by their ballot. ``spread``: also
        pushed to peers at once as this host's change (what this host decided, when hosts that
        are not members need it); else only made durable here: the members learn every decision
        from its Commit, so pushing it too cost each round a request per member and peer."""
        dom = self.domsvc.dom
        entities = []
        for c in commits:
            for key, holder in c.values.items():
                have = dom.version_of("lease", key)
                if have is not None and have >= c.ballot:
                    continue
                if holder is None:
                    entities.append(dom.delete("lease", key, version=c.ballot))
                else:
                    entities.append(
                        dom.put(
                            LeaseRec(id=key, holder=holder, granted_at=c.ballot.wall_ms), version=c.ballot
                        )
                    )
        if any(MEMBERS_KEY in c.values for c in commits):
            self._adopt_members()
        if spread:
            return self.domsvc.commit_local(entities)
        d = self.domsvc.commit(entities)
        if own:
            d.addCallback(lambda r: (self.note_own(entities), r)[1])
        return d


class PaxosLeaseTable:
    """Leases decided by Paxos among the member hosts; the DOM holds what was decided."""

    def __init__(self, service: LeaseService, max_release_rounds: int = 4):
        self.service = service
        self.max_release_rounds = max_release_rounds

    def holder(self, key: str) -> str | None:
        rec = self.service.domsvc.dom.get(LeaseRec, key)
        return rec.holder if rec else None

    @defer.inlineCallbacks
    def acquire(self, claims: dict[str, str]):
        result = yield self.service.propose({k: (None, h) for k, h in claims.items()})
        if isinstance(result, paxos.Conflict):
            raise LeaseConflict(result.key, result.holder or "nobody", result.holder, result.seen)
        yield self._seen(result)
        return result

    @defer.inlineCallbacks
    def cas(self, ops: dict):
        result = yield self.service.propose(dict(ops))
        if isinstance(result, paxos.Conflict):
            raise LeaseConflict(result.key, result.holder or "nobody", result.holder, result.seen)
        yield self._seen(result)
        return result

    @defer.inlineCallbacks
    def release(self, holders: dict[str, str]):
        todo = dict(holders)
        for _ in range(self.max_release_rounds):
            if not todo:
                return
            result = yield self.service.propose({k: (h, None) for k, h in todo.items()})
            if isinstance(result, paxos.Conflict):
                # Someone else holds it now (or it is free already): not ours to release.
                todo.pop(result.key, None)
                continue
            yield self._seen(result)
            return
        log.warn("gave up releasing {n} leases after {r} rounds", n=len(todo), r=self.max_release_rounds)

    def _seen(self, result) -> defer.Deferred:
        """Waits (bounded) until the decided values are recorded in the local DOM, so that the
        caller's next read of the lease table sees them."""
        if not isinstance(result, paxos.Decided) or result.ballot is None:
            return defer.succeed(None)
        dom = self.service.domsvc.dom
        keys = list(result.values)

        def recorded():
            versions = [dom.version_of("lease", k) for k in keys]
            return all(v is not None and v >= result.ballot for v in versions)

        return self.service.domsvc.wait_for(recorded, 5.0)
