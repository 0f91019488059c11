"""The peer protocol core: SWIM membership plus DOM dissemination, as a plain object.

:class:`GossipCore` keeps no reactor, socket or libvirt handle. It is fed envelopes
(:meth:`receive`) and clock readings (:meth:`tick`), is told of local DOM changes
(:meth:`local_changes`), and returns an :class:`Output`: what to persist (entities merged from
peers) and what to send. The Twisted layer persists first, then sends; the simulator does the
same in memory. Randomness comes from the injected ``random.Random``.

Membership (SWIM with suspicion and incarnations, plus HashiCorp's Lifeguard extensions):
  every probe period ping the next member (round robin over a shuffled list); no Ack within the
  probe timeout → ask ``indirect_checks`` others to ping it (PingReq); no Ack by the end of the
  period → *suspect*; still suspect when its suspicion timer runs out → *dead*. A host that hears
  itself suspected or declared dead refutes with a higher incarnation. A clean stop spreads *left*.
  Membership states travel as rumors piggybacked on every message.
  Lifeguard, so that a host too slow to read its Acks in time does not accuse healthy peers:
  *local health* — a score (0 .. ``awareness_max_multiplier`` - 1) raised by this host's failed
  probes (by the nacks it missed), by having to refute, lowered by each successful probe; the probe
  period and timeout are multiplied by score + 1. *Dynamic suspicion* — a suspicion's timer starts
  at ``suspicion_max_timeout_mult`` × the SWIM timeout and shrinks towards it, logarithmically, with
  each other host that independently suspects the same member. *Buddy system* — a Ping to a
  suspect carries the suspicion, so the target refutes in its Ack. *Nacks* — a PingReq helper that
  cannot reach the target says so, which tells the requester its own links are fine.
Dissemination:
  a local change is sent at once to ``fanout`` random live peers and queued as a rumor; every
  ``gossip_interval`` queued rumors go to ``fanout`` random live peers; a host that learns
  something new from a rumor queues it in turn. Every ``sync_interval`` a push-pull anti-entropy
  round with one peer exchanges complete version vectors and then only what differs, bounded by
  ``max_sync_bytes`` per message (Scuttlebutt-style; see :meth:`vmwebd.dom.document.Dom.delta`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Protocol, Sequence

from vmwebd.gossip.broadcast import BroadcastQueue
from vmwebd.gossip.messages import (
    PROTOCOL_VERSION,
    Ack,
    Envelope,
    Gossip,
    MemberState,
    Ping,
    PingReq,
    ProbeNack,
    Sync,
    SyncDelta,
    SyncReply,
)

ALIVE, SUSPECT, DEAD, LEFT = "alive", "suspect", "dead", "left"
_RANK = {ALIVE: 0, SUSPECT: 1, DEAD: 2, LEFT: 2}


@dataclass(frozen=True)
class GossipConfig:
    """Protocol timing and sizes (seconds, bytes). Presets below; the defaults are LAN."""

    probe_interval: float = 1.0  # memberlist LAN: 1 s
    probe_timeout: float = 0.5  # memberlist LAN: 500 ms
    indirect_checks: int = 3
    suspicion_mult: int = 4  # memberlist LAN: 4
    gossip_interval: float = 0.2  # memberlist LAN: 200 ms
    fanout: int = 3  # memberlist LAN: 3 (GossipNodes)
    retransmit_mult: int = 4  # memberlist LAN: 4
    sync_interval: float = 10.0  # memberlist LAN push-pull: 30 s; ours is shorter
    dead_sync_every: int = 3  # every Nth sync goes to a dead (not left) host, to heal partitions
    max_gossip_bytes: int = 64 * 1024
    max_sync_bytes: int = 1024 * 1024
    # Lifeguard (docs/gossip.md, "Local health" and "Suspicion timeouts"); without_lifeguard()
    # turns all four off, which is plain SWIM with suspicion.
    awareness_max_multiplier: int = 8  # memberlist: 8; probe period and timeout up to 8x; 1 = off
    suspicion_max_timeout_mult: int = 6  # memberlist: 6; unconfirmed suspicion waits 6x; 1 = off
    buddy_system: bool = True  # a Ping to a suspect carries the suspicion
    probe_nacks: bool = True  # PingReq helpers nack when the target does not answer

    def suspicion_timeout(self, n: int) -> float:
        """The shortest suspicion: once enough other hosts confirm it (SWIM's fixed timeout)."""
        return self.suspicion_mult * max(1.0, math.log10(max(n, 1))) * self.probe_interval

    def suspicion_max_timeout(self, n: int) -> float:
        """The longest suspicion: nobody else has confirmed it."""
        return max(1, self.suspicion_max_timeout_mult) * self.suspicion_timeout(n)

    def suspicion_confirmations(self, live: int) -> int:
        """How many independent confirmations bring a suspicion down to the shortest timeout, in a
        grid where ``live`` members (this host included) are alive or suspect. As memberlist: two
        fewer than ``suspicion_mult`` — peers probe out of phase with each other, so asking for
        more would rarely bring the timer to its minimum before it ran out anyway; none when fewer
        hosts than that could confirm (neither the accuser nor the accused can)."""
        k = self.suspicion_mult - 2
        return k if 0 < k <= live - 2 else 0

    def without_lifeguard(self) -> "GossipConfig":
        """The same timing as plain SWIM: fixed suspicion timeout, no local health, no buddy, no nacks."""
        return replace(
            self,
            awareness_max_multiplier=1,
            suspicion_max_timeout_mult=1,
            buddy_system=False,
            probe_nacks=False,
        )


LAN = GossipConfig()
LOCAL_TEST = GossipConfig(
    probe_interval=0.5, probe_timeout=0.2, suspicion_mult=3, gossip_interval=0.1, sync_interval=2.0
)


def suspicion_timeout_after(confirmations: int, k: int, lo: float, hi: float) -> float:
    """Time from the start of a suspicion until the member is declared dead, after
    ``confirmations`` independent confirmations: ``hi`` with none, falling with log(c + 1) /
    log(k + 1) to ``lo`` at ``k`` confirmations, never below ``lo`` (nor above ``hi``). Logarithmic,
    so the first confirmations — the strongest evidence that the accuser is not the problem —
    shorten it most."""
    if k < 1 or hi <= lo:
        return lo
    frac = math.log(max(0, confirmations) + 1) / math.log(k + 1)
    return min(hi, max(lo, hi - frac * (hi - lo)))


class Awareness:
    """Lifeguard's local health multiplier: how far this host trusts its own timing.

    The score stays in 0 .. ``max_multiplier`` - 1; timeouts are scaled by score + 1. A host whose
    probes fail because it reads its Acks late (CPU starvation, a stalled reactor) sees its score
    rise and so probes less often and waits longer, instead of accusing healthy peers."""

    def __init__(self, max_multiplier: int):
        self.max_multiplier = max(1, max_multiplier)
        self.score = 0

    def apply(self, delta: int) -> None:
        self.score = min(self.max_multiplier - 1, max(0, self.score + delta))

    def scale(self, seconds: float) -> float:
        return seconds * (self.score + 1)


@dataclass
class Suspicion:
    """One suspicion timer: started at ``start`` with at most ``hi`` seconds to run, shortened by
    each distinct confirming accuser down to ``lo`` at ``k`` of them. The accuser that started it
    does not count (our own suspicion, gossiped back to us, is no confirmation)."""

    start: float
    k: int
    lo: float
    hi: float
    accusers: set[str] = field(default_factory=set)
    confirmations: int = 0

    def confirm(self, by: str) -> bool:
        """Counts ``by`` once; False when it adds nothing (unknown, seen, or already enough)."""
        if not by or by in self.accusers or self.confirmations >= self.k:
            return False
        self.accusers.add(by)
        self.confirmations += 1
        return True

    def deadline(self) -> float:
        return self.start + suspicion_timeout_after(self.confirmations, self.k, self.lo, self.hi)


#: A DOM entity as the core sees it: opaque, handed back to the DomPort (an lxml element in the
#: daemon). The core never looks inside.
Entity = Any
#: A complete version vector: origin host -> the greatest (wall ms, counter) held from it.
Vector = dict[str, tuple[int, int]]
#: A summary of what a replica holds above its complete vector: origin -> checkpoints
#: (stamp, hash of the parts from that origin up to the stamp), in stamp order.
Held = dict[str, list[tuple[tuple[int, int], str]]]


class DomPort(Protocol):
    """What the core needs of the DOM; the core knows nothing of the schema."""

    # in memory; returns the changed entities' new state
    def merge(self, entities: Sequence[Entity]) -> list[Entity]: ...
    # (entities they lack, newest first within budget bytes; our complete vector for them);
    # ``held``: their summary of what they hold above ``theirs`` (see ``held_above``)
    def delta(
        self, theirs: Vector, mine_complete: Vector, budget: int, held: Held | None = None
    ) -> tuple[list[Entity], Vector]: ...
    # what we hold above our complete vector, for the other side's delta to skip
    def held_above(self, complete: Vector) -> Held: ...
    def size_of(self, entity: Entity) -> int: ...
    def key_of(self, entity: Entity) -> tuple[str, ...]: ...
    def stamps_of(self, entity: Entity) -> list[tuple[str, tuple[int, int]]]: ...


@dataclass
class Member:
    node: str
    addr: str
    incarnation: int
    status: str
    since: float
    by: str = ""  # while suspect: the accuser whose suspicion we hold

    def state(self) -> MemberState:
        return MemberState(
            self.node, self.addr, self.incarnation, self.status, self.by if self.status == SUSPECT else ""
        )


@dataclass
class Send:
    dst: str | None
    addr: str
    envelope: Envelope


@dataclass
class Output:
    sends: list[Send] = field(default_factory=list)
    persist: list[Entity] = field(default_factory=list)  # entities merged from peers (durable before sends)
    changes: list[tuple[str, str, str]] = field(default_factory=list)  # (node, old, new) status

    def extend(self, other: "Output") -> "Output":
        self.sends += other.sends
        self.persist += other.persist
        self.changes += other.changes
        return self


@dataclass
class _Probe:
    seq: int
    target: str
    started: float
    timeout_at: float  # no Ack by then: indirect probes (probe_timeout, scaled by health)
    deadline: float  # no Ack by then: suspect (probe_interval, scaled by health)
    indirect: bool = False
    acked: bool = False
    helpers: tuple[str, ...] = ()  # asked to ping the target for us
    nacks: set[str] = field(default_factory=set)


@dataclass
class _Relay:
    src: str
    src_addr: str
    seq: int  # the requester's
    target: str
    expires: float
    nack_at: float | None  # when to nack the requester, if it asked and the target is silent


class GossipCore:
    def __init__(
        self,
        me: str,
        addr: str,
        config: GossipConfig,
        rng: random.Random,
        dom: DomPort,
        now: float,
        incarnation: int = 0,
        cvv: Vector | None = None,
        seeds: tuple[str, ...] = (),
        known: tuple[tuple[str, str], ...] = (),
    ):
        self.me = me
        self.addr = addr
        self.cfg = config
        self.rng = rng
        self.dom = dom
        self.members: dict[str, Member] = {me: Member(me, addr, incarnation, ALIVE, now)}
        for node, a in known:  # from the durable DOM: hosts we knew before a restart
            if node != me:
                # incarnation -1: any live rumor about it, even incarnation 0, is newer
                self.members[node] = Member(node, a, -1, DEAD, now)
        self.seeds = tuple(s for s in seeds if s != addr)
        self.cvv: dict[str, tuple[int, int]] = dict(cvv or {})
        self.queue = BroadcastQueue(config.retransmit_mult)
        self._seq = 0
        self._probe: _Probe | None = None
        self._order: list[str] = []
        self._relays: dict[int, _Relay] = {}
        self.awareness = Awareness(config.awareness_max_multiplier)
        self._suspicions: dict[str, Suspicion] = {}
        # Helpers that have nacked us before: only their missing nacks count against our health,
        # so helpers running an older protocol (which never nack) cannot make us look unhealthy.
        self._nackers: set[str] = set()
        self._next_probe = now + rng.random() * config.probe_interval
        self._next_gossip = now + rng.random() * config.gossip_interval
        self._next_sync = now
        self._syncs = 0
        self._out = Output()
        self.queue.put(("m", me), self.members[me].state(), 64)

    # -- views ----------------------------------------------------------------------------
    def alive(self) -> list[str]:
        return sorted(n for n, m in self.members.items() if m.status in (ALIVE, SUSPECT))

    def status_of(self, node: str) -> str | None:
        m = self.members.get(node)
        return m.status if m else None

    def member_states(self) -> tuple[MemberState, ...]:
        return tuple(m.state() for m in sorted(self.members.values(), key=lambda m: m.node))

    @property
    def incarnation(self) -> int:
        return self.members[self.me].incarnation

    @property
    def health_score(self) -> int:
        """Lifeguard's local health score: 0 is healthy; timeouts are scaled by score + 1."""
        return self.awareness.score

    def suspected_since(self, node: str) -> float | None:
        """When the suspicion of ``node`` now running here began (None if not suspect)."""
        s = self._suspicions.get(node)
        return s.start if s is not None else None

    def suspicion_deadline(self, node: str) -> float | None:
        """When ``node``, suspect here, is to be declared dead unless it refutes (None if not suspect)."""
        s = self._suspicions.get(node)
        return s.deadline() if s is not None else None

    # -- inputs ---------------------------------------------------------------------------
    def local_changes(self, entities: Iterable[Entity], now: float, push: bool = True) -> Output:
        """Local DOM writes: raise our own complete vector, queue as rumors and (``push``) push
        what is queued at once to ``fanout`` random live peers. Without ``push`` the caller
        pushes later (:meth:`push`), with whatever else was queued by then."""
        for el in entities:
            for origin, stamp in self.dom.stamps_of(el):
                if origin == self.me and stamp > self.cvv.get(self.me, (-1, -1)):
                    self.cvv[self.me] = stamp
            self.queue.put(("e",) + self.dom.key_of(el), el, self.dom.size_of(el))
        if push:
            return self.push(now)
        return self._flush()

    def push(self, now: float) -> Output:
        """Sends the queued rumors to ``fanout`` random live peers now."""
        for peer in self._random_peers(self.cfg.fanout):
            self._send(peer, Gossip())
        return self._flush()

    def push_to(self, nodes: Iterable[str], now: float) -> Output:
        """Sends queued rumors to ``nodes`` now, whatever the failure detector thinks of them
        (not to hosts that left): for a change that one host is waiting on, such as a migration's
        next phase, a loaded host wrongly marked dead must not wait for anti-entropy."""
        for node in sorted(set(nodes)):
            m = self.members.get(node)
            if node != self.me and m is not None and m.status != LEFT:
                self._send(node, Gossip())
        return self._flush()

    def receive(self, env: Envelope, now: float) -> Output:
        if env.version > PROTOCOL_VERSION or (env.dst is not None and env.dst != self.me):
            return self._flush()  # a newer protocol, or meant for a host that was here before
        for ms in env.members:
            self._apply_member(ms, now)
        self._merge(env.entities)
        msg = env.msg
        if isinstance(msg, Ping):
            if msg.target == self.me:
                self._send_to(env.src, env.src_addr, Ack(msg.seq, self.me))
        elif isinstance(msg, Ack):
            if self._probe is not None and msg.seq == self._probe.seq and msg.target == self._probe.target:
                self._probe.acked = True
            elif msg.seq in self._relays:
                r = self._relays.pop(msg.seq)
                if r.target == msg.target:
                    self._send_to(r.src, r.src_addr, Ack(r.seq, r.target))
        elif isinstance(msg, PingReq):
            self._seq += 1
            # The nack uses the unscaled timeout: it must reach the requester before its (scaled)
            # probe period ends, or the requester would blame itself for our slowness.
            nack_at = now + self.cfg.probe_timeout if msg.nack and self.cfg.probe_nacks else None
            self._relays[self._seq] = _Relay(
                env.src, env.src_addr, msg.seq, msg.target, now + self.cfg.probe_interval, nack_at
            )
            self._send_to(msg.target, msg.target_addr, Ping(self._seq, msg.target))
        elif isinstance(msg, ProbeNack):
            self._nackers.add(env.src)
            p = self._probe
            if p is not None and msg.seq == p.seq and msg.target == p.target and env.src in p.helpers:
                p.nacks.add(env.src)
        elif isinstance(msg, Sync):
            for ms in msg.members:
                self._apply_member(ms, now)
            ents, claims = self.dom.delta(msg.cvv, self.cvv, self.cfg.max_sync_bytes, msg.held)
            self._send_to(
                env.src,
                env.src_addr,
                SyncReply(
                    tuple(ents), claims, dict(self.cvv), self.member_states(), self.dom.held_above(self.cvv)
                ),
                rumors=False,
            )
        elif isinstance(msg, SyncReply):
            for ms in msg.members:
                self._apply_member(ms, now)
            self._merge(msg.entities)
            self._claim(msg.claims)
            ents, claims = self.dom.delta(msg.cvv, self.cvv, self.cfg.max_sync_bytes, msg.held)
            if ents:
                self._send_to(env.src, env.src_addr, SyncDelta(tuple(ents), claims), rumors=False)
        elif isinstance(msg, SyncDelta):
            self._merge(msg.entities)
            self._claim(msg.claims)
        return self._flush()

    def tick(self, now: float) -> Output:
        cfg = self.cfg
        # probe in progress
        p = self._probe
        if p is not None and not p.acked:
            if not p.indirect and now >= p.timeout_at:
                p.indirect = True
                probed = self.members.get(p.target)
                helpers = [x for x in self._random_peers(cfg.indirect_checks + 1) if x != p.target]
                p.helpers = tuple(helpers[: cfg.indirect_checks])
                for h in p.helpers:
                    self._send(h, PingReq(p.seq, p.target, probed.addr if probed else "", cfg.probe_nacks))
            if now >= p.deadline:
                # Lifeguard: helpers that nacked in time show our own links and timing are fine and
                # the target is the problem; each nack we expected and missed hints that we are
                # slow. With no nacks to go by, any failed probe counts once against us.
                expected = [h for h in p.helpers if h in self._nackers]
                self.awareness.apply(len(set(expected) - p.nacks) if expected else 1)
                self._suspect(p.target, now)
                self._probe = None
        elif p is not None and p.acked:
            self.awareness.apply(-1)
            self._probe = None
        if self._probe is None and now >= self._next_probe:
            self._next_probe = now + self.awareness.scale(cfg.probe_interval)
            target = self._next_probe_target()
            if target is not None:
                self._seq += 1
                self._probe = _Probe(
                    self._seq,
                    target,
                    now,
                    now + self.awareness.scale(cfg.probe_timeout),
                    now + self.awareness.scale(cfg.probe_interval),
                )
                m = self.members[target]
                # buddy system: a suspect target learns of the suspicion from the probe itself and
                # refutes in its Ack, instead of waiting for the rumor to find it
                extra = (m.state(),) if cfg.buddy_system and m.status == SUSPECT else ()
                self._send(target, Ping(self._seq, target), extra=extra)
        # suspicion timeouts
        for node, s in list(self._suspicions.items()):
            if now >= s.deadline():
                m = self.members[node]
                self._set(m, DEAD, m.incarnation, now)
                self.queue.put(("m", m.node), m.state(), 64)
        # relays: nack the requester once the target has been silent too long; forget stale ones
        for seq, r in list(self._relays.items()):
            if r.nack_at is not None and now >= r.nack_at:
                r.nack_at = None
                self._send_to(r.src, r.src_addr, ProbeNack(r.seq, r.target))
            if now >= r.expires:
                del self._relays[seq]
        # rumors
        if now >= self._next_gossip:
            self._next_gossip = now + cfg.gossip_interval
            if len(self.queue):
                for peer in self._random_peers(cfg.fanout):
                    self._send(peer, Gossip())
        # anti-entropy (and joining through seeds while alone)
        if now >= self._next_sync:
            self._next_sync = now + cfg.sync_interval * (0.5 + self.rng.random())
            self._syncs += 1
            self._start_sync()
        return self._flush()

    def leave(self, now: float) -> Output:
        """A clean stop: spread that we left (to several peers at once)."""
        me = self.members[self.me]
        self._set(me, LEFT, me.incarnation + 1, now)
        self.queue.put(("m", self.me), me.state(), 64)
        for peer in self._random_peers(max(self.cfg.fanout, 3)):
            self._send(peer, Gossip())
        return self._flush()

    # -- internals ------------------------------------------------------------------------
    def _start_sync(self) -> None:
        live = [n for n in self.alive() if n != self.me]
        dead = [n for n, m in self.members.items() if m.status == DEAD]
        sync = Sync(dict(self.cvv), self.member_states(), self.dom.held_above(self.cvv))
        if not live:
            targets = [(None, a) for a in self.seeds] + [(n, self.members[n].addr) for n in dead]
            if targets:
                dst, addr = self.rng.choice(targets)
                self._send_to(dst, addr, sync, rumors=False)
            return
        if dead and self._syncs % self.cfg.dead_sync_every == 0:
            self._send(self.rng.choice(sorted(dead)), sync, rumors=False)
        else:
            self._send(self.rng.choice(live), sync, rumors=False)

    def _next_probe_target(self) -> str | None:
        candidates = [n for n in self.alive() if n != self.me]
        if not candidates:
            return None
        while self._order and self._order[0] not in candidates:
            self._order.pop(0)
        if not self._order:
            self._order = list(candidates)
            self.rng.shuffle(self._order)
        return self._order.pop(0)

    def _random_peers(self, k: int) -> list[str]:
        peers = [n for n in self.alive() if n != self.me]
        self.rng.shuffle(peers)
        return peers[:k]

    def _claim(self, claims: Mapping[str, Sequence[int]]) -> None:
        for origin, claimed in claims.items():
            wall, counter = claimed
            stamp = (wall, counter)
            if stamp > self.cvv.get(origin, (-1, -1)):
                self.cvv[origin] = stamp

    def _merge(self, entities: Sequence[Entity]) -> None:
        if not entities:
            return
        changed = self.dom.merge(entities)
        for el in changed:
            self.queue.put(("e",) + self.dom.key_of(el), el, self.dom.size_of(el))
        self._out.persist.extend(changed)

    def _set(self, m: Member, status: str, incarnation: int, now: float, by: str = "") -> None:
        if m.status != status:
            self._out.changes.append((m.node, m.status, status))
            m.since = now
            if status == SUSPECT:
                self._start_suspicion(m, by, now)
            else:
                self._suspicions.pop(m.node, None)
                m.by = ""
        m.status = status
        m.incarnation = incarnation

    def _start_suspicion(self, m: Member, by: str, now: float) -> None:
        live = sum(1 for x in self.members.values() if x.status in (ALIVE, SUSPECT))
        n = len(self.members)
        self._suspicions[m.node] = Suspicion(
            now,
            self.cfg.suspicion_confirmations(live),
            self.cfg.suspicion_timeout(n),
            self.cfg.suspicion_max_timeout(n),
            {by} if by else set(),
        )
        m.by = by

    def _confirm(self, m: Member, by: str) -> bool:
        """Another accuser of a member we already suspect; True when it shortened the timer."""
        s = self._suspicions.get(m.node)
        return s is not None and s.confirm(by)

    def _suspect(self, node: str, now: float) -> None:
        m = self.members.get(node)
        if m is None:
            return
        if m.status == ALIVE:
            self._set(m, SUSPECT, m.incarnation, now, by=self.me)
            self.queue.put(("m", node), m.state(), 64)
        elif m.status == SUSPECT and self._confirm(m, self.me):
            # our own failed probe of someone another host accused: an independent confirmation,
            # spread so that the others' timers shrink too
            self.queue.put(("m", node), MemberState(node, m.addr, m.incarnation, SUSPECT, self.me), 64)

    def _apply_member(self, ms: MemberState, now: float) -> None:
        """SWIM's rules for a rumor about a member (including ourselves: refute)."""
        if ms.node == self.me:
            me = self.members[self.me]
            if me.status == LEFT:
                return
            if ms.status in (SUSPECT, DEAD, LEFT) and ms.incarnation >= me.incarnation:
                self._set(me, ALIVE, ms.incarnation + 1, now)
                self.queue.put(("m", self.me), me.state(), 64)
                # being accused hints that we answered too late: trust our own timing a bit less
                self.awareness.apply(1)
            return
        m = self.members.get(ms.node)
        if m is None:
            if ms.status in (ALIVE, SUSPECT):
                m = Member(ms.node, ms.addr, ms.incarnation, ms.status, now)
                self.members[ms.node] = m
                self._out.changes.append((ms.node, "unknown", ms.status))
                if ms.status == SUSPECT:
                    self._start_suspicion(m, ms.by, now)
                self.queue.put(("m", ms.node), m.state(), 64)
            elif ms.status in (DEAD, LEFT):
                self.members[ms.node] = Member(ms.node, ms.addr, ms.incarnation, ms.status, now)
            return
        newer = ms.incarnation > m.incarnation
        same = ms.incarnation == m.incarnation
        if ms.status == ALIVE:
            accept = newer
        elif ms.status == SUSPECT:
            accept = newer or (same and m.status == ALIVE)
        else:  # dead / left override alive and suspect at the same incarnation
            accept = newer or (same and _RANK[m.status] < _RANK[ms.status])
        if accept and ms.status == SUSPECT and m.status == SUSPECT:
            # a suspicion at a newer incarnation of a member we already suspect: the timer runs
            # on (as memberlist), but its accuser confirms it
            m.incarnation = ms.incarnation
            if ms.addr:
                m.addr = ms.addr
            self._confirm(m, ms.by)
            self.queue.put(("m", ms.node), ms, 64)
        elif accept:
            if ms.addr:
                m.addr = ms.addr
            self._set(m, ms.status, ms.incarnation, now, by=ms.by)
            self.queue.put(("m", ms.node), m.state(), 64)
        elif ms.status == SUSPECT and m.status == SUSPECT and same and self._confirm(m, ms.by):
            # another host suspects it on its own: pass the confirmation on
            self.queue.put(("m", ms.node), ms, 64)

    def _send(self, node: str, msg: object, rumors: bool = True, extra: tuple[MemberState, ...] = ()) -> None:
        m = self.members.get(node)
        if m is not None:
            self._send_to(node, m.addr, msg, rumors, extra)

    def _send_to(
        self,
        node: str | None,
        addr: str,
        msg: object,
        rumors: bool = True,
        extra: tuple[MemberState, ...] = (),
    ) -> None:
        members: tuple[MemberState, ...] = extra
        entities: tuple[Entity, ...] = ()
        if rumors:
            items = self.queue.take(self.cfg.max_gossip_bytes, len(self.members))
            members += tuple(i for i in items if isinstance(i, MemberState))
            entities = tuple(i for i in items if not isinstance(i, MemberState))
        self._out.sends.append(Send(node, addr, Envelope(self.me, self.addr, node, msg, members, entities)))

    def _flush(self) -> Output:
        out, self._out = self._out, Output()
        return out
