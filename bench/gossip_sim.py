"""Gossip at scale in the deterministic simulator, with memberlist's LAN timing.

For each size N (``--sizes``, default 8 64 512 1000) the script boots N simulated hosts (real
:class:`~vmwebd.gossip.core.GossipCore` over real DOMs; only network and clock are simulated), lets
the cluster stabilise (every host knows every other one alive, the join rumors have drained), then:

* steady state: messages and bytes per host per second over a quiet window;
* spread: writes one change at one host and measures the time until 99.99 % of the hosts hold it
  (for N < 10,000 that is all of them), and the traffic per host per second during that window;
* failure detection: crashes one host and measures the time until the first host suspects it, and
  until every live host has declared it dead;
* a slow host (``--slow-n`` hosts, default 8; ``--slow-lag`` seconds, default 3): one host reads
  every message that late (a CPU-starved daemon), for ``--slow-for`` simulated seconds, once with
  Lifeguard off (plain SWIM) and once on: how often a healthy host is declared dead, how often the
  slow host is, how many suspicions the slow host raised, and the traffic.

``--without-lifeguard`` runs the main table with Lifeguard off, for comparison.

Anchors printed alongside: Serf's convergence model (gossip 200 ms, fanout 3) gives ~2.0 s to
reach 99.99 % of 100 hosts and ~2.2 s for 1,000; SWIM's expected time until some member first
probes a failed one is e/(e-1) ≈ 1.58 protocol periods (a suspicion is then raised at the end of
that probe period). Simulated time only; wall time is printed so the cost of the simulator shows.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vmwebd.dom.records import VClusterRec  # noqa: E402
from vmwebd.gossip.core import DEAD, LAN, LEFT, SUSPECT  # noqa: E402
from vmwebd.gossip.sim import Simulation  # noqa: E402

SERF = {100: 2.0, 1000: 2.2}
SWIM_PERIODS = math.e / (math.e - 1)


def membership_complete(sim: Simulation) -> bool:
    n = len(sim.live())
    return all(len(h.core.members) >= n and len(h.core.alive()) == n for h in sim.live())


def quiet(sim: Simulation) -> bool:
    return all(len(h.core.queue) == 0 for h in sim.live())


def stabilise(sim: Simulation, limit: float) -> float:
    """Runs until membership is complete and the join rumors have drained; returns simulated seconds."""
    t0 = sim.now
    while sim.now - t0 < limit:
        sim.run(1.0)
        if membership_complete(sim) and quiet(sim):
            return sim.now - t0
    raise SystemExit(f"N={len(sim.hosts)}: membership not complete after {limit:.0f} simulated seconds")


def window(sim: Simulation, seconds: float = None, until=None, limit: float = 120.0):
    """Runs a window; returns (simulated seconds, messages/host/s, bytes/host/s, reached)."""
    m0, b0, t0 = sim.stats.messages, sim.stats.bytes, sim.now
    reached = sim.run(seconds if seconds is not None else limit, until=until)
    dt = sim.now - t0
    n = len(sim.hosts)
    return dt, (sim.stats.messages - m0) / n / dt, (sim.stats.bytes - b0) / n / dt, reached


def watch_changes(sim: Simulation, victim: str) -> dict:
    """Records when the first host suspects ``victim``."""
    seen = {"suspect": None}
    carry = sim._carry

    def logged(src, out):
        if seen["suspect"] is None:
            for node, _old, new in out.changes:
                if node == victim and new == SUSPECT:
                    seen["suspect"] = sim.now
        carry(src, out)

    sim._carry = logged
    return seen


def bench(n: int, seed: int, steady: float, cfg=LAN) -> dict:
    wall = time.perf_counter()
    sim = Simulation(n, seed, cfg)
    stable = stabilise(sim, limit=300.0)
    r = {"n": n, "stabilise": stable}
    # steady state
    dt, r["steady_msgs"], r["steady_bytes"], _ = window(sim, steady)
    # spread of one change: count holders with a DOM listener (O(1) per change)
    holders = {"n": 0}
    for h in sim.hosts.values():
        h.dom.subscribe(lambda kind, id_, c=holders: c.__setitem__("n", c["n"] + (id_ == "bench")))
    need = math.ceil(0.9999 * n)
    sim.write("h0", VClusterRec(id="bench", owner="bench"))
    dt, r["spread_msgs"], r["spread_bytes"], ok = window(sim, until=lambda: holders["n"] >= need, limit=120)
    r["spread"] = dt if ok else float("nan")
    sim.run(30)  # let the rumor drain before the next measurement
    # failure detection
    victim = f"h{n // 2}"
    seen = watch_changes(sim, victim)
    sim.crash(victim)
    t0 = sim.now
    live = [h for h in sim.hosts.values() if not h.crashed]
    ok = sim.run(300, until=lambda: all(victim in h.detected_dead_at for h in live))
    r["first_suspect"] = (seen["suspect"] - t0) if seen["suspect"] is not None else float("nan")
    r["all_dead"] = (sim.now - t0) if ok else float("nan")
    r["suspicion_timeout"] = cfg.suspicion_timeout(n)
    r["suspicion_max"] = cfg.suspicion_max_timeout(n)
    r["wall"] = time.perf_counter() - wall
    return r


def slow_host(n: int, seed: int, lag: float, seconds: float, cfg) -> dict:
    """One host reads its messages ``lag`` seconds late for ``seconds``: who gets declared dead."""
    sim = Simulation(n, seed, cfg)
    stabilise(sim, limit=300.0)
    slow = "h1"
    changes = []
    carry = sim._carry

    def logged(src, out):
        changes.extend((src, node, new) for node, _old, new in out.changes)
        carry(src, out)

    sim._carry = logged
    sim.slow(slow, lag)
    m0, b0 = sim.stats.messages, sim.stats.bytes
    sim.run(seconds)
    dead = [c for c in changes if c[2] in (DEAD, LEFT)]
    return {
        "healthy_dead": sum(1 for c in dead if c[1] != slow),
        "healthy_dead_by_slow": sum(1 for c in dead if c[1] != slow and c[0] == slow),
        "slow_dead": sum(1 for c in dead if c[1] == slow),
        "slow_suspects": sum(1 for c in changes if c[0] == slow and c[2] == SUSPECT),
        "score": sim.hosts[slow].core.health_score,
        "msgs": (sim.stats.messages - m0) / n / seconds,
        "bytes": (sim.stats.bytes - b0) / n / seconds,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 64, 512, 1000])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steady", type=float, default=20.0, help="steady-state window, simulated seconds")
    ap.add_argument("--without-lifeguard", action="store_true", help="main table with Lifeguard off")
    ap.add_argument("--slow-n", type=int, default=8, help="hosts in the slow-host run (0: skip it)")
    ap.add_argument("--slow-lag", type=float, default=3.0, help="the slow host's lag, seconds")
    ap.add_argument("--slow-for", type=float, default=600.0, help="slow-host run, simulated seconds")
    args = ap.parse_args(argv)
    cfg = LAN.without_lifeguard() if args.without_lifeguard else LAN
    print(
        f"LAN preset: gossip {LAN.gossip_interval * 1000:.0f} ms, probe {LAN.probe_interval:.0f} s, "
        f"fanout {LAN.fanout}, retransmit mult {LAN.retransmit_mult}, suspicion mult {LAN.suspicion_mult}, "
        f"sync {LAN.sync_interval:.0f} s; Lifeguard {'off' if args.without_lifeguard else 'on'} "
        f"(health multiplier up to {cfg.awareness_max_multiplier}, suspicion max {cfg.suspicion_max_timeout_mult}x)"
    )
    rows = []
    for n in args.sizes:
        r = bench(n, args.seed, args.steady, cfg)
        rows.append(r)
        print(f"  N={n}: done in {r['wall']:.1f} s wall", flush=True)
    hdr = (
        "N",
        "stable s",
        "spread s",
        "Serf s",
        "steady msg/h/s",
        "steady B/h/s",
        "spread msg/h/s",
        "spread B/h/s",
        "1st suspect s",
        "(periods)",
        "SWIM periods",
        "all dead s",
        "susp. timeout s",
        "max susp. s",
        "wall s",
    )
    print()
    print(" | ".join(hdr))
    for r in rows:
        serf = SERF.get(r["n"])
        print(
            " | ".join(
                [
                    f"{r['n']}",
                    f"{r['stabilise']:.0f}",
                    f"{r['spread']:.2f}",
                    f"~{serf:.1f}" if serf else "-",
                    f"{r['steady_msgs']:.2f}",
                    f"{r['steady_bytes']:.0f}",
                    f"{r['spread_msgs']:.2f}",
                    f"{r['spread_bytes']:.0f}",
                    f"{r['first_suspect']:.2f}",
                    f"{r['first_suspect'] / LAN.probe_interval:.2f}",
                    f"{SWIM_PERIODS:.2f} (+1 to fail)",
                    f"{r['all_dead']:.2f}",
                    f"{r['suspicion_timeout']:.1f}",
                    f"{r['suspicion_max']:.1f}",
                    f"{r['wall']:.0f}",
                ]
            )
        )
    print(
        f"\nAnchors: Serf's convergence model ~2.0 s at 100 hosts, ~2.2 s at 1,000 (99.99 %); SWIM's "
        f"expected first detection e/(e-1) = {SWIM_PERIODS:.2f} periods until a member probes the failed "
        f"one. One crash per size: the first-suspect time is a single sample."
    )
    if args.slow_n:
        print(
            f"\nOne slow host among {args.slow_n}, reading every message {args.slow_lag:g} s late, "
            f"for {args.slow_for:g} simulated seconds:"
        )
        print(
            " | ".join(
                (
                    "Lifeguard",
                    "healthy declared dead",
                    "(by the slow host)",
                    "slow host declared dead",
                    "suspicions by the slow host",
                    "its health score",
                    "msg/h/s",
                    "B/h/s",
                )
            )
        )
        for name, c in (("off", LAN.without_lifeguard()), ("on", LAN)):
            r = slow_host(args.slow_n, args.seed, args.slow_lag, args.slow_for, c)
            print(
                " | ".join(
                    [
                        name,
                        f"{r['healthy_dead']}",
                        f"{r['healthy_dead_by_slow']}",
                        f"{r['slow_dead']}",
                        f"{r['slow_suspects']}",
                        f"{r['score']}",
                        f"{r['msgs']:.2f}",
                        f"{r['bytes']:.0f}",
                    ]
                )
            )


if __name__ == "__main__":
    main()
