"""Consensus lease latency and throughput on 3 and 5 local hosts, next to the raw round trips.

Two setups, both on loopback with mutual-TLS peers and every host a consensus member:

**Real daemons** (``python -m vmwebd.daemon`` processes, as in tests/test_leases_chaos.py):

* the user-API round trip of a trivial call (``ListTemplates``), p50 / p99;
* ``CreateCluster`` of a 1-VM cluster (leases name + vni + ip + mac: 4 keys in one round when no
  candidate was taken meanwhile), one at a time at host1, p50 / p99;
* the same with one client per host all at once: clusters/s and leases/s, and how many failed.

**In-process nodes** (every node in this process on one reactor: no scheduler noise between
hosts, but they share one CPU thread, so a round's CPU work is serialised):

* the raw peer round trip: one SOAP ``Deliver`` of an empty gossip envelope over HTTPS, answered;
* ``LeaseService.propose`` of one fresh key, p50 / p99;
* ``propose`` of 64 fresh keys in one compare-and-set, p50 / p99;
* single-key proposals with 8 in flight, from every host in turn: leases/s (and failures).

Plus one ``os.fsync`` of a small write on this disk, measured in the same run. The target printed
next to the figures: single-key p50 within 2.5 peer round trips plus one fsync (Cassandra's LWT
needs 4 round trips). Runtime is bounded: a few rounds of each, about two minutes in all.

    .venv/bin/python bench/leases.py [--sizes 3 5] [--rounds 20] [--creates 12]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from twisted.internet import defer, reactor, task  # noqa: E402

from vmwebd.config import load_config  # noqa: E402
from vmwebd.demo import write_host_config  # noqa: E402
from vmwebd.errors import NoQuorum  # noqa: E402
from vmwebd.gossip import pki  # noqa: E402
from vmwebd.gossip.codec import encode  # noqa: E402
from vmwebd.gossip.messages import Envelope, Gossip  # noqa: E402
from vmwebd.node import Node  # noqa: E402


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def ms(xs) -> tuple[float, float]:
    """(p50, p99) of a list of seconds, in milliseconds."""
    return statistics.median(xs) * 1000, pct(xs, 99) * 1000


def fsync_ms(directory: Path, n: int = 50) -> tuple[float, float]:
    """p50 and p99 of one os.fsync after a 128-byte append, on the disk holding ``directory``."""
    path = directory / "fsync-probe"
    times = []
    with open(path, "wb") as f:
        for _ in range(n):
            f.write(b"x" * 128)
            f.flush()
            t = time.perf_counter()
            os.fsync(f.fileno())
            times.append(time.perf_counter() - t)
    path.unlink()
    return ms(times)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- real daemons ------------------------------------------------------------------------------
def measure_daemons(n: int, creates: int) -> dict:
    """Starts ``n`` daemons, measures the user API and CreateCluster, stops them."""
    from tests.test_leases_chaos import SmallPoolGrid
    from tests.test_peers_process import wait_until
    base = Path(tempfile.mkdtemp(prefix=f"vmweb-bench-leases-{n}-"))
    grid = SmallPoolGrid(base, n, pool_cidr="10.90.0.0/20", timing="lan")   # ~4,000 addresses
    try:
        wait_until(grid.all_alive, 60, f"{n} hosts to see each other alive", every=0.5)
        owner = _owner()
        c = grid.client(0, 30)
        c.call("ListTemplates")                         # first call: authentication, warm caches
        rtt = []
        for _ in range(50):
            t = time.perf_counter()
            c.call("ListTemplates")
            rtt.append(time.perf_counter() - t)
        seq, failed = [], 0
        for i in range(creates):
            t = time.perf_counter()
            try:
                c.call("CreateCluster", f"seq{i}", "lab", owner, 1)
                seq.append(time.perf_counter() - t)
            except Exception as e:          # noqa: BLE001 (reported, not fatal)
                failed += 1
                print(f"  create seq{i} failed: {e}", flush=True)
        print(f"  {n} daemons: sequential creates done", flush=True)
        # one client per host, all at once
        per_host = max(creates // n, 2)
        clients = [grid.client(i, 30) for i in range(n)]
        done, errors, lat = [0], [], []
        lock = threading.Lock()

        def worker(i):
            for k in range(per_host):
                t = time.perf_counter()
                try:
                    clients[i].call("CreateCluster", f"par{i}-{k}", "lab", owner, 1)
                    with lock:
                        done[0] += 1
                        lat.append(time.perf_counter() - t)
                except Exception as e:      # noqa: BLE001
                    with lock:
                        errors.append(getattr(e, "code", type(e).__name__))
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        wall = time.perf_counter() - t
        print(f"  {n} daemons: concurrent creates done", flush=True)
        return {"api": ms(rtt), "create": ms(seq) if seq else (float("nan"),) * 2, "create_failed": failed,
                "par_create": ms(lat) if lat else (float("nan"),) * 2, "par_rate": done[0] / wall,
                "par_failed": errors}
    finally:
        grid.close()


def _owner() -> str:
    from tests.test_leases_chaos import ADMIN
    return ADMIN


# -- in-process nodes ----------------------------------------------------------------------------
@defer.inlineCallbacks
def grid_in_process(base: Path, n: int):
    pki.init_ca(base / "ca")
    peer_ports = [free_port() for _ in range(n)]
    members = " ".join(f"host{i + 1}" for i in range(n))
    nodes = []
    for i in range(n):
        hid = f"host{i + 1}"
        pki.issue_host_cert(base / "ca", hid, base / hid / "pki", ["127.0.0.1"])
        cfg = write_host_config(base / hid, hid, 0, peer_ports[i], 16, 65536, extra=(
            f'<peers seeds="127.0.0.1:{peer_ports[0]}" cert-dir="{base / hid / "pki"}" '
            f'timing="local" members="{members}"/>'))
        node = Node(load_config(cfg), reactor, fsync=True, rng=random.Random(i))
        yield node.start()
        nodes.append(node)
    for _ in range(400):        # bounded: 20 s for everyone to see everyone
        if all(len(nd.gossip.core.alive()) == n for nd in nodes):
            break
        yield task.deferLater(reactor, 0.05, lambda: None)
    return nodes


@defer.inlineCallbacks
def measure_in_process(n: int, rounds: int):
    base = Path(tempfile.mkdtemp(prefix=f"vmweb-bench-paxos-{n}-"))
    nodes = yield grid_in_process(base, n)
    try:
        result = yield _measure_in_process(n, rounds, base, nodes)
        return result
    finally:
        for nd in nodes:
            yield nd.stop(leave=False)


@defer.inlineCallbacks
def _timed_propose(node, cas):
    t = time.perf_counter()
    try:
        yield node.leases.propose(cas)
    except NoQuorum:
        return None
    return time.perf_counter() - t


@defer.inlineCallbacks
def _measure_in_process(n, rounds, base, nodes):
    a, b = nodes[0], nodes[1]
    rtt = []
    for _ in range(rounds):
        env = Envelope(a.host_id, a.peer_address, b.host_id, Gossip())
        t = time.perf_counter()
        ok = yield a.gossip.client.send(b.peer_address, encode(env))
        rtt.append(time.perf_counter() - t)
        assert ok, "peer round trip failed"
    single, failed = [], 0
    for i in range(rounds):
        dt = yield _timed_propose(a, {f"bench/single/{n}/{i}": (None, "bench")})
        if dt is None:
            failed += 1
        else:
            single.append(dt)
    batched = []
    for i in range(max(rounds // 4, 5)):
        dt = yield _timed_propose(a, {f"bench/batch/{n}/{i}/{k}": (None, "bench") for k in range(64)})
        if dt is None:
            failed += 1
        else:
            batched.append(dt)
    total = rounds * 2
    sem = defer.DeferredSemaphore(8)
    t = time.perf_counter()
    times = yield defer.gatherResults([
        sem.run(_timed_propose, nodes[i % n], {f"bench/tput/{n}/{i}": (None, "bench")})
        for i in range(total)])
    wall = time.perf_counter() - t
    ok = [x for x in times if x is not None]
    print(f"  {n} in-process nodes: done", flush=True)
    return {"peer": ms(rtt), "single": ms(single), "batch": ms(batched) if batched else (float("nan"),) * 2,
            "failed": failed, "tput": len(ok) / wall, "tput_failed": total - len(ok),
            "tput_lat": ms(ok) if ok else (float("nan"),) * 2, "fsync": fsync_ms(base)}


# -- report ----------------------------------------------------------------------------------------
def report(sizes, daemons: dict, inproc: dict) -> None:
    print("\nReal daemons (separate processes), user API over HTTP, peers over mutual TLS:")
    print(f"{'hosts':>5} {'API RTT p50/p99 ms':>19} {'CreateCluster p50/p99 ms':>25} "
          f"{'in API RTTs':>11} {'concurrent p50/p99 ms':>22} {'clusters/s':>10} {'leases/s':>9} {'failed':>7}")
    for n in sizes:
        d = daemons.get(n)
        if d is None:
            continue
        a50, a99 = d["api"]
        c50, c99 = d["create"]
        p50, p99 = d["par_create"]
        print(f"{n:>5} {a50:>8.2f} / {a99:<8.2f} {c50:>11.1f} / {c99:<11.1f} {c50 / a50:>11.1f} "
              f"{p50:>10.1f} / {p99:<9.1f} {d['par_rate']:>10.1f} {d['par_rate'] * 4:>9.1f} "
              f"{d['create_failed'] + len(d['par_failed']):>7}")
        if d["par_failed"]:
            print(f"      concurrent failures: {sorted(d['par_failed'])}")
    print("\nIn-process nodes (one reactor), LeaseService.propose:")
    print(f"{'hosts':>5} {'peer RTT p50/p99 ms':>20} {'fsync p50/p99 ms':>17} {'single p50/p99 ms':>18} "
          f"{'target ms':>9} {'(p50-fsync)/RTT':>15} {'batch64 p50/p99 ms':>19} {'keys/s batched':>14} "
          f"{'leases/s (8 in flight)':>22} {'failed':>6}")
    for n in sizes:
        r = inproc.get(n)
        if r is None:
            continue
        r50, r99 = r["peer"]
        f50, f99 = r["fsync"]
        s50, s99 = r["single"]
        b50, b99 = r["batch"]
        target = 2.5 * r50 + f50
        verdict = "met" if s50 <= target else "MISSED"
        print(f"{n:>5} {r50:>9.2f} / {r99:<8.2f} {f50:>7.2f} / {f99:<7.2f} {s50:>8.2f} / {s99:<7.2f} "
              f"{target:>9.2f} {(s50 - f50) / r50:>11.1f} {verdict:<3} {b50:>8.1f} / {b99:<8.1f} "
              f"{64000 / b50:>14.0f} {r['tput']:>22.0f} {r['failed'] + r['tput_failed']:>6}")
    print("\ntarget: single-key p50 within 2.5 peer round trips plus one fsync "
          "(Cassandra's LWT needs 4 round trips)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--rounds", type=int, default=20, help="in-process proposals of each kind")
    ap.add_argument("--creates", type=int, default=12, help="CreateCluster calls at the daemons")
    ap.add_argument("--skip-daemons", action="store_true")
    args = ap.parse_args()
    daemons, inproc = {}, {}
    if not args.skip_daemons:
        for n in args.sizes:    # blocking clients; before the reactor runs
            daemons[n] = measure_daemons(n, args.creates)

    @defer.inlineCallbacks
    def run(_reactor):
        for n in args.sizes:
            inproc[n] = yield measure_in_process(n, args.rounds)
        report(args.sizes, daemons, inproc)
    task.react(run)   # runs the reactor, then exits the process
    return 0


if __name__ == "__main__":
    sys.exit(main())
