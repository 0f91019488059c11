"""A deterministic simulator of many hosts running the peer protocol in one process.

Every host is a real :class:`~vmwebd.gossip.core.GossipCore` over a real
:class:`~vmwebd.dom.document.Dom`; only the network and the clock are simulated. The network can
drop, duplicate, delay (and so reorder) messages, partition and heal; hosts can crash (losing all
but their durable DOM) and restart, or be *slow* (:meth:`Simulation.slow`: a CPU-starved daemon
that reads its messages late while its timers still fire on time). Everything is driven by one seeded ``random.Random``: the
same seed gives the same run.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

from vmwebd.dom.document import Dom
from vmwebd.dom.hlc import HybridClock
from vmwebd.gossip.core import ALIVE, DEAD, LEFT, GossipConfig, GossipCore, Output
from vmwebd.gossip.domport import DomPortAdapter
from vmwebd.gossip.messages import Envelope

ENVELOPE_OVERHEAD = 200  # bytes an envelope costs beyond its entities (headers, SOAP wrapping)


@dataclass
class NetStats:
    messages: int = 0
    bytes: int = 0
    dropped: int = 0
    duplicated: int = 0


@dataclass
class SimHost:
    id: str
    dom: Dom
    core: GossipCore | None
    crashed: bool = False
    detected_dead_at: dict = field(default_factory=dict)  # node -> first time we saw it dead
    lag: float = 0.0  # seconds between a message's arrival and its handling (see Simulation.slow)


class Simulation:
    def __init__(
        self,
        n: int,
        seed: int,
        config: GossipConfig,
        drop: float = 0.0,
        dup: float = 0.0,
        delay: tuple[float, float] = (0.001, 0.005),
        tick: float = 0.05,
        validate: bool = False,
        start_at: float = 1_000.0,
    ):
        self.rng = random.Random(seed)
        self.cfg = config
        self.drop, self.dup, self.delay = drop, dup, delay
        self.tick_step = tick
        self.validate = validate
        # Tick only the cores that have something due at this tick (see _due); the runs are the
        # same as ticking every core every time (tests/test_gossip_sim.py checks it), only faster.
        self.lazy_ticks = True
        self.now = start_at
        self.stats = NetStats()
        self._queue: list = []
        self._seq = itertools.count()
        self._cut: set[frozenset] = set()  # unordered pairs of hosts that cannot talk
        self._groups: list[set[str]] | None = None
        self.hosts: dict[str, SimHost] = {}
        ids = [f"h{i}" for i in range(n)]
        for hid in ids:
            dom = Dom(HybridClock(hid, self._now_ms))
            self.hosts[hid] = SimHost(hid, dom, None)
        for hid in ids:
            self._boot(hid, seeds=(ids[0],), known=())

    # -- time and wiring ------------------------------------------------------------------
    def _now_ms(self) -> int:
        return int(self.now * 1000)

    def _boot(self, hid: str, seeds, known):
        h = self.hosts[hid]
        # The adapter reads the vector of the core built on it (vmwebd/dom/gc.py), as the daemon's.
        port = DomPortAdapter(h.dom, validate=self.validate, complete=lambda: core.cvv)
        core = h.core = GossipCore(
            hid,
            hid,
            self.cfg,
            random.Random(self.rng.random()),
            port,
            self.now,
            seeds=tuple(seeds),
            known=tuple(known),
        )
        h.crashed = False

    def _reachable(self, a: str, b: str) -> bool:
        if frozenset((a, b)) in self._cut:
            return False
        if self._groups is not None:
            return any(a in g and b in g for g in self._groups)
        return True

    def _carry(self, src: str, out: Output):
        h = self.hosts[src]
        for node, _old, new in out.changes:
            if new in (DEAD, LEFT) and node not in h.detected_dead_at:
                h.detected_dead_at[node] = self.now
            if new == ALIVE:
                h.detected_dead_at.pop(node, None)
        for s in out.sends:
            dst = s.addr
            size = ENVELOPE_OVERHEAD + sum(h.core.dom.size_of(e) for e in _entities(s.envelope))
            self.stats.messages += 1
            self.stats.bytes += size
            if not self._reachable(src, dst) or self.rng.random() < self.drop:
                self.stats.dropped += 1
                continue
            copies = 2 if self.rng.random() < self.dup else 1
            self.stats.duplicated += copies - 1
            for _ in range(copies):
                t = self.now + self.rng.uniform(*self.delay)
                heapq.heappush(self._queue, (t, next(self._seq), dst, s.envelope, False))

    def run(self, seconds: float, until=None) -> bool:
        """Advances simulated time; stops early (returning True) when ``until()`` holds."""
        end = self.now + seconds
        next_tick = self.now
        while self.now < end:
            if until is not None and until():
                return True
            if self._queue and self._queue[0][0] <= next_tick:
                t, _, dst, env, late = heapq.heappop(self._queue)
                self.now = max(self.now, t)
                h = self.hosts.get(dst)
                if h is not None and not h.crashed:
                    if h.lag > 0 and not late:
                        # arrived, but the host gets to it only after its backlog (FIFO: the lag
                        # is the same for every message, so arrival order is kept)
                        heapq.heappush(self._queue, (t + h.lag, next(self._seq), dst, env, True))
                    else:
                        self._carry(dst, h.core.receive(env, self.now))
                continue
            self.now = next_tick
            for hid, h in self.hosts.items():
                if not h.crashed and (not self.lazy_ticks or _due(h, self.now)):
                    self._carry(hid, h.core.tick(self.now))
            next_tick = self.now + self.tick_step
        return until() if until is not None else False

    # -- actions --------------------------------------------------------------------------
    def write(self, hid: str, *recs) -> list:
        """A local write at ``hid`` (durable at once), pushed by its core."""
        h = self.hosts[hid]
        els = [h.dom.put(r) for r in recs]
        self._carry(hid, h.core.local_changes(els, self.now))
        return els

    def crash(self, hid: str):
        h = self.hosts[hid]
        h.crashed = True
        h.core = None

    def restart(self, hid: str):
        known = [(o, o) for o in self.hosts if o != hid]
        self._boot(hid, seeds=(next(iter(self.hosts)),), known=known)

    def stop(self, hid: str):
        """A clean stop: the host says it leaves, then goes."""
        h = self.hosts[hid]
        self._carry(hid, h.core.leave(self.now))
        h.crashed = True

    def slow(self, hid: str, lag: float):
        """Makes ``hid`` handle every inbound message ``lag`` seconds after it arrives, as a
        daemon starved of CPU does: Acks, refutations and rumors reach its core late, while its
        timers (probe deadlines, suspicion timeouts) still fire on time — Twisted runs due timers
        before it reads a backlog of input. ``lag=0`` makes it normal again."""
        self.hosts[hid].lag = lag

    def partition(self, *groups):
        self._groups = [set(g) for g in groups]

    def cut(self, a: str, b: str):
        self._cut.add(frozenset((a, b)))

    def heal(self):
        self._groups = None
        self._cut.clear()

    def fault(self, action: str, x: int, y: int) -> bool:
        """One step of a generated fault schedule: ``crash`` a live host, ``restart`` a crashed
        one, ``partition`` the hosts in two, ``cut`` one pair, ``heal`` — hosts picked by ``x``
        and ``y``. False when ``action`` is none of these (it is the caller's)."""
        ids = list(self.hosts)
        live = [h.id for h in self.live()]
        if action == "crash":
            if len(live) > 1:
                self.crash(live[x % len(live)])
        elif action == "restart":
            down = [i for i in ids if self.hosts[i].crashed]
            if down:
                self.restart(down[x % len(down)])
        elif action == "partition":
            cut = 1 + x % (len(ids) - 1)
            self.partition(ids[:cut], ids[cut:])
        elif action == "cut":
            self.cut(ids[x % len(ids)], ids[y % len(ids)])
        elif action == "heal":
            self.heal()
        else:
            return False
        return True

    # -- observations ---------------------------------------------------------------------
    def live(self) -> list[SimHost]:
        return [h for h in self.hosts.values() if not h.crashed]

    def digests(self) -> set[str]:
        return {h.dom.digest() for h in self.live()}

    def converged(self) -> bool:
        return len(self.digests()) == 1

    def holders(self, kind: str, id_: str, version=None) -> int:
        n = 0
        for h in self.live():
            v = h.dom.version_of(kind, id_)
            if v is not None and (version is None or v >= version):
                n += 1
        return n


def _due(h: SimHost, now: float) -> bool:
    """Whether ``h.core.tick(now)`` would do anything. Mirrors the conditions of
    :meth:`GossipCore.tick`; the only thing a tick does when none holds is move the gossip timer
    on (its queue being empty), which we do here so the timer keeps the same phase."""
    c = h.core
    cfg = c.cfg
    p = c._probe
    if p is not None:
        if p.acked or now >= p.deadline or (not p.indirect and now >= p.timeout_at):
            return True
    elif now >= c._next_probe:
        return True
    if now >= c._next_sync:
        return True
    if c._suspicions and any(now >= s.deadline() for s in c._suspicions.values()):
        return True
    if c._relays and any(
        now >= r.expires or (r.nack_at is not None and now >= r.nack_at) for r in c._relays.values()
    ):
        return True
    if now >= c._next_gossip:
        if len(c.queue):
            return True
        c._next_gossip = now + cfg.gossip_interval
    return False


def _entities(env: Envelope):
    yield from env.entities
    yield from getattr(env.msg, "entities", ())
