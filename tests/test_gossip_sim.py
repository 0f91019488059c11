"""The peer protocol at scale in the deterministic simulator: convergence, catch-up, failure detection.

Simulated time only; hypothesis picks seeds, faults and schedules. Bounds are derived from the
config (probe interval, suspicion timeout, sync interval), not tuned to pass.
"""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from vmwebd.dom.records import VClusterRec
from vmwebd.gossip.core import ALIVE, DEAD, LEFT, LOCAL_TEST, SUSPECT, GossipConfig
from vmwebd.gossip.sim import Simulation

CFG = LOCAL_TEST   # probe 0.5 s, timeout 0.2 s, suspicion mult 3, gossip 0.1 s, sync 2 s
# Small sync messages, so anti-entropy regularly has more to send than one message holds.
SMALL_SYNC = GossipConfig(**{**CFG.__dict__, "max_sync_bytes": 600})


def membership_complete(sim):
    ids = {h.id for h in sim.live()}
    return all(set(h.core.alive()) == ids for h in sim.live())


def record_changes(sim):
    """Wraps the simulator's output handling to log every (time, host, node, old, new) change."""
    log = []
    carry = sim._carry

    def logged(src, out):
        log.extend((sim.now, src, *ch) for ch in out.changes)
        carry(src, out)
    sim._carry = logged
    return log


def sync_bound(cfg, n):
    """Time for anti-entropy to spread anything to n hosts: a few sync rounds per doubling."""
    rounds = 2 * max(1, n.bit_length())
    return rounds * 1.5 * cfg.sync_interval + cfg.suspicion_timeout(n) + 10


events = st.lists(st.tuples(st.sampled_from(["write", "write", "write", "crash", "restart", "partition",
                                             "cut", "heal", "run"]),
                            st.integers(0, 99), st.integers(0, 99), st.floats(0.0, 3.0)),
                  min_size=1, max_size=25)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(5, 9), seed=st.integers(0, 2**32), drop=st.floats(0, 0.3), dup=st.floats(0, 0.2),
       slow=st.floats(0.002, 0.3), small_sync=st.booleans(), schedule=events)
def test_replicas_converge_after_any_faults_once_healed_and_restarted(n, seed, drop, dup, slow, small_sync,
                                                                     schedule):
    """After writes under drops, duplicates, delays, partitions and crashes, healing and restarting everyone
    brings every replica to the same digest, holding every write, within a bounded time."""
    cfg = SMALL_SYNC if small_sync else CFG
    sim = Simulation(n, seed, cfg, drop=drop, dup=dup, delay=(0.001, slow))
    ids = list(sim.hosts)
    latest = {}   # cluster id -> version of its last write
    k = 0
    for action, x, y, dt in schedule:
        live = [h.id for h in sim.live()]
        if action == "write" and live:
            hid = live[x % len(live)]
            k += 1
            cid = f"c{y % 12}"
            sim.write(hid, VClusterRec(id=cid, owner=f"u{k}", count=k))[0]
            latest[cid] = sim.hosts[hid].dom.version_of("vcluster", cid)
        else:
            sim.fault(action, x, y)
        sim.run(dt)
    sim.heal()
    for i in ids:
        if sim.hosts[i].crashed:
            sim.restart(i)
    bound = sync_bound(cfg, n)
    t0 = sim.now
    done = sim.run(bound, until=lambda: sim.converged() and all(sim.holders("vcluster", c, v) == n
                                                                 for c, v in latest.items()))
    assert done, (f"not converged {bound:.0f} s after healing: {len(sim.digests())} digests, "
                  f"holders {[sim.holders('vcluster', c, v) for c, v in latest.items()]}")
    assert sim.now - t0 <= bound
    assert len(sim.live()) == n


@settings(max_examples=10, deadline=None)
@given(n=st.integers(5, 12), seed=st.integers(0, 2**32), writes=st.integers(1, 20), drop=st.floats(0, 0.2))
def test_restarted_host_catches_up_on_writes_made_while_it_was_down(n, seed, writes, drop):
    """A host that was down while others wrote gets every one of those writes after it restarts."""
    sim = Simulation(n, seed, CFG, drop=drop)
    assert sim.run(30, until=lambda: membership_complete(sim))
    victim = f"h{1 + seed % (n - 1)}"
    sim.crash(victim)
    others = [h for h in sim.hosts if h != victim]
    for i in range(writes):
        sim.write(others[i % len(others)], VClusterRec(id=f"c{i}", owner="u"))
        sim.run(0.3)
    sim.run(5)
    sim.restart(victim)
    bound = sync_bound(CFG, n)
    assert sim.run(bound, until=lambda: all(sim.hosts[victim].dom.version_of("vcluster", f"c{i}")
                                            for i in range(writes)))
    assert sim.run(bound, until=sim.converged)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(5, 12), seed=st.integers(0, 2**32), drop=st.floats(0, 0.05), dup=st.floats(0, 0.1))
def test_crashed_host_is_declared_dead_by_every_live_host_within_the_bound(n, seed, drop, dup):
    """A crashed host is marked dead by every live host within a bound set by probe interval and suspicion timeout."""
    cfg = CFG
    sim = Simulation(n, seed, cfg, drop=drop, dup=dup)
    assert sim.run(30, until=lambda: membership_complete(sim))
    sim.run(2)
    victim = f"h{seed % n}"
    sim.crash(victim)
    t0 = sim.now
    # the first prober reaches it within a round of probes over n-1 members (plus the period under way);
    # its suspicion spreads in a few gossip rounds; each host then declares it dead after the timeout
    bound = (n + 1) * cfg.probe_interval + cfg.suspicion_timeout(n) + 20 * cfg.gossip_interval
    assert sim.run(bound, until=lambda: all(h.core.status_of(victim) == DEAD for h in sim.live()))
    assert all(h.detected_dead_at[victim] >= t0 for h in sim.live())


@settings(max_examples=8, deadline=None)
@given(n=st.integers(5, 12), seed=st.integers(0, 2**32), dup=st.floats(0, 0.3), writes=st.integers(0, 10))
def test_no_false_suspicion_in_a_lossless_network(n, seed, dup, writes):
    """Without loss or crashes (delays well under the probe timeout), no live host is ever suspected or declared dead."""
    sim = Simulation(n, seed, CFG, dup=dup, delay=(0.001, 0.02))
    log = record_changes(sim)
    for i in range(writes):
        sim.write(f"h{i % n}", VClusterRec(id=f"c{i}", owner="u"))
        sim.run(0.7)
    sim.run(40)
    bad = [c for c in log if c[4] in (SUSPECT, DEAD, LEFT)]
    assert bad == []
    assert membership_complete(sim)
    assert all(h.core.status_of(o) == ALIVE for h in sim.live() for o in sim.hosts)
    assert sim.converged()


@settings(max_examples=8, deadline=None)
@given(n=st.integers(5, 12), seed=st.integers(0, 2**32), dup=st.floats(0, 0.2))
def test_cleanly_stopped_host_is_seen_as_left(n, seed, dup):
    """A host that stops cleanly is recorded as 'left' (not dead) by every other host."""
    sim = Simulation(n, seed, CFG, dup=dup)
    assert sim.run(30, until=lambda: membership_complete(sim))
    gone = f"h{seed % n}"
    sim.stop(gone)
    assert sim.run(10 * CFG.gossip_interval * n, until=lambda: all(h.core.status_of(gone) == LEFT
                                                                     for h in sim.live()))
    sim.run(CFG.suspicion_timeout(n) + 5)   # and it stays left: no one probes or suspects it
    assert all(h.core.status_of(gone) == LEFT for h in sim.live())


@settings(max_examples=6, deadline=None)
@given(n=st.integers(6, 10), seed=st.integers(0, 2**32), drop=st.floats(0, 0.1), cut=st.integers(1, 5))
def test_partition_heals_and_both_sides_rejoin_and_converge(n, seed, drop, cut):
    """Sides of a partition that declared each other dead become alive again after healing, and their DOMs converge."""
    sim = Simulation(n, seed, CFG, drop=drop)
    assert sim.run(30, until=lambda: membership_complete(sim))
    ids = list(sim.hosts)
    left, right = ids[:cut], ids[cut:]
    sim.partition(left, right)
    sim.write(left[0], VClusterRec(id="west", owner="u"))
    sim.write(right[0], VClusterRec(id="east", owner="u"))
    bound = (n + 1) * CFG.probe_interval + CFG.suspicion_timeout(n) + 5
    assert sim.run(bound, until=lambda: all(sim.hosts[a].core.status_of(b) == DEAD
                                            for a in left for b in right)
                   and all(sim.hosts[b].core.status_of(a) == DEAD for a in left for b in right))
    assert sim.run(sync_bound(CFG, n), until=lambda: sim.holders("vcluster", "west") == len(left)
                   and sim.holders("vcluster", "east") == len(right))
    sim.heal()
    # every dead_sync_every-th sync goes to a dead host: that, and the refutation it causes, rejoins
    heal_bound = 3 * CFG.dead_sync_every * 1.5 * CFG.sync_interval + sync_bound(CFG, n)
    assert sim.run(heal_bound, until=lambda: membership_complete(sim) and sim.converged()
                   and sim.holders("vcluster", "west") == n and sim.holders("vcluster", "east") == n)


@settings(max_examples=5, deadline=None)
@given(n=st.integers(5, 9), seed=st.integers(0, 2**32), drop=st.floats(0, 0.2), dup=st.floats(0, 0.2))
def test_ticking_only_cores_with_work_due_changes_nothing(n, seed, drop, dup):
    """The simulator's lazy ticking gives exactly the run that ticking every core every time gives."""
    runs = []
    for lazy in (True, False):
        sim = Simulation(n, seed, CFG, drop=drop, dup=dup, delay=(0.001, 0.2))
        sim.lazy_ticks = lazy
        log = record_changes(sim)
        sim.run(5)
        sim.write("h1", VClusterRec(id="a", owner="u"))
        sim.crash("h2")
        sim.run(8)
        sim.partition(list(sim.hosts)[:2], list(sim.hosts)[2:])
        sim.write("h0", VClusterRec(id="b", owner="u"))
        sim.run(8)
        sim.heal()
        sim.restart("h2")
        sim.stop("h3")
        sim.run(15)
        runs.append((log, sim.stats, sorted(sim.digests()), sim.now,
                     [h.core.member_states() for h in sim.live()]))
    assert runs[0] == runs[1]
