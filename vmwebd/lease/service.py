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

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from vmwebd.dom.hlc import Version
from vmwebd.dom.records import LeaseRec
from vmwebd.dom.store import DurableStore
from vmwebd.errors import NoQuorum
from vmwebd.lease import paxos
from vmwebd.lease.table import LeaseConflict

log = Logger()
MEMBERS_KEY = "config/members"   # the consensus members, itself decided by consensus


def _encode(rec) -> bytes:
    kind, key, ballot, value = rec
    return json.dumps([kind, key, str(ballot), value]).encode()


def _decode(data: bytes):
    kind, key, ballot, value = json.loads(data)
    return (kind, key, Version.parse(ballot), value)


class LeaseService:
    def __init__(self, me: str, domsvc, store_dir, reactor, clock, rng, members, send,
                 fsync: bool = True, deadline: float = 3.0, tick_interval: float = 0.05,
                 compact_every: int = 20000):
        self.me = me
        self.domsvc = domsvc
        self.reactor = reactor
        self.send = send            # send(dst_host, msg) -> Deferred (a lost message is fine)
        self.store = DurableStore(store_dir, fsync=fsync)
        self.core = paxos.PaxosCore(me, clock, rng, members, deadline=deadline)
        self.tick_interval = tick_interval
        self.compact_every = compact_every
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="vmweb-paxos-store")
        self._pending: dict[str, defer.Deferred] = {}
        # Ballots of ours a lease record may still carry (see open_ballot_floor): by operation
        # (op id -> (since, ballots sent in a Prepare)), and decided but not yet recorded here.
        self._ballots_of_op: dict[str, tuple[float, set[Version]]] = {}
        self._unrecorded: dict[Version, tuple[float, Version]] = {}
        self._ids = itertools.count(1)
        self._loop = None
        self._since_compact = 0

    @defer.inlineCallbacks
    def start(self):
        self._pool.start()
        _, records = yield deferToThreadPool(self.reactor, self._pool, self.store.load)
        self.core.restore(_decode(r) for r in records)
        self._adopt_members()
        self.domsvc.dom.subscribe(lambda kind, id_: kind == "lease" and id_ == MEMBERS_KEY
                                  and self._adopt_members())
        self._since_compact = len(records)
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(self.tick_interval, now=False)

    def _tick(self):
        # Only rounds in flight have timers; an idle host skips the empty output's round trip.
        if self.core.ops:
            self._carry(self.core.tick(self.reactor.seconds()))

    def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for d in list(self._pending.values()):
            d.errback(NoQuorum("the daemon is stopping"))
        self._pending.clear()
        self._pool.stop()
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
        result = yield self.propose({MEMBERS_KEY: (",".join(current) if self._members_recorded() else None,
                                                   ",".join(new))})
        if isinstance(result, paxos.Conflict):
            raise InvalidArgument("host", f"the member list changed meanwhile (now {result.holder}); try again")
        self.core.set_members(new)
        return new

    def _members_recorded(self) -> bool:
        return self.core.committed(MEMBERS_KEY)[0] is not None or \
            self.domsvc.dom.get(LeaseRec, MEMBERS_KEY) is not None

    # -- proposals ------------------------------------------------------------------------
    def propose(self, cas: dict) -> defer.Deferred:
        """Runs one all-or-nothing CAS; fires with Decided or Conflict, fails with NoQuorum."""
        op_id = f"{self.me}-{next(self._ids)}-{int(self.reactor.seconds() * 1000)}"
        d = defer.Deferred()
        self._pending[op_id] = d
        self._carry(self.core.propose(op_id, cas, self.reactor.seconds()))
        return d

    def receive(self, src: str, msg) -> defer.Deferred:
        """A Paxos message from a peer (or ourselves); fires once its effects are durable."""
        return self._carry(self.core.receive(src, msg, self.reactor.seconds()))

    # -- carrying out the core's output --------------------------------------------------------
    def _carry(self, out: paxos.Output) -> defer.Deferred:
        self._hold_new_ballots(out)
        if out.persist:
            self._since_compact += len(out.persist)
            d = deferToThreadPool(self.reactor, self._pool, self.store.append_many,
                                  [_encode(r) for r in out.persist])
        else:
            d = defer.succeed(None)
        # Persist before you speak: nothing below runs until the records are durable.
        d.addCallback(lambda _: self._after_persist(out))
        d.addErrback(lambda f: log.failure("paxos state could not be persisted", failure=f))
        return d

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
        for table in (self._ballots_of_op, self._unrecorded):
            for key, (since, _) in list(table.items()):
                if now - since > self.HOLD_SECONDS:
                    del table[key]
        ballots = [b for _, bs in self._ballots_of_op.values() for b in bs]
        ballots += [b for _, b in self._unrecorded.values()]
        return min(ballots) if ballots else None

    def _hold_new_ballots(self, out: paxos.Output) -> None:
        """Holds the ballots of the rounds this output begins; at once, before anything else
        runs on the reactor, so no claim made meanwhile can pass them."""
        now = self.reactor.seconds()
        for _, msg in out.sends:
            if isinstance(msg, paxos.Prepare):
                self._ballots_of_op.setdefault(msg.op, (now, set()))[1].add(msg.ballot)

    def _release_ballots(self, out: paxos.Output) -> None:
        """Lets go of the ballots of ended rounds, but a decided one until it is recorded here."""
        now = self.reactor.seconds()
        dom = self.domsvc.dom
        for result in out.results:
            self._ballots_of_op.pop(result.op, None)
            ballot = getattr(result, "ballot", None)
            if isinstance(result, paxos.Decided) and ballot is not None:
                versions = [dom.version_of("lease", k) for k in result.values]
                if not all(v is not None and v >= ballot for v in versions):
                    self._unrecorded[ballot] = (now, ballot)
        # Commits in this output are recorded right after (``_record_commits``).
        for c in out.commits:
            self._unrecorded.pop(c.ballot, None)

    def _after_persist(self, out: paxos.Output):
        self._release_ballots(out)
        for dst, msg in out.sends:
            if dst == self.me:
                self.reactor.callLater(0, self.receive, self.me, msg)
            else:
                self.send(dst, msg)
        recorded = self._record_commits(out.commits) if out.commits else defer.succeed(None)
        for result in out.results:
            d = self._pending.pop(result.op, None)
            if d is None:
                continue
            if isinstance(result, paxos.NoQuorum) and result.reachable >= result.needed:
                d.errback(NoQuorum(
                    f"could not decide a lease in time: {result.reachable} of {result.members} "
                    "member hosts answered but the round did not complete (contention or slow "
                    "hosts); try again"))
            elif isinstance(result, paxos.NoQuorum):
                d.errback(NoQuorum(
                    f"cannot lease without a majority: {result.reachable} of {result.members} "
                    f"member hosts answered, {result.needed} needed"))
            else:
                # Our own commit reaches our acceptor through the loopback above; the caller
                # sees the lease in the DOM as soon as the commit is recorded here.
                d.callback(result)
        return recorded

    def _record_commits(self, commits) -> defer.Deferred:
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
                    entities.append(dom.put(LeaseRec(id=key, holder=holder, granted_at=c.ballot.wall_ms),
                                             version=c.ballot))
        if any(MEMBERS_KEY in c.values for c in commits):
            self._adopt_members()
        return self.domsvc.commit_local(entities)


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
            raise LeaseConflict(result.key, result.holder or "nobody")
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
