"""Consensus lease latency and throughput on 3 and 5 local hosts, next to the raw round trips.

Everything is measured in one run and printed side by side with its target (a before/after
comparison cannot be had from one run). Two setups, both on loopback with mutual-TLS peers and
every host a consensus member:

**In-process nodes** (every node in this process on one reactor: no scheduler noise between
hosts, but they share one CPU thread, so every host's work is serialised):

* the raw peer round trip: one SOAP ``Deliver`` of an empty gossip envelope over HTTPS, answered;
* one ``os.fsync`` of a small write on this disk;
* ``LeaseService.propose`` of one fresh key, one at a time, p50 / p99 — target: p50 within 2.5
  peer round trips plus one fsync;
* ``propose`` of 64 fresh keys in one compare-and-set, p50 / p99;
* single-key proposals with 1, 8 and 64 in flight, spread over every host: leases/s, p50 / p99,
  failures — target: at least 2,000 leases/s with many requests in flight.

**Real daemons** (``python -m vmwebd.daemon`` processes, as in tests/test_leases_chaos.py):

* the user-API round trip of a trivial call (``ListTemplates``), p50 / p99;
* ``CreateCluster`` of a 1-VM cluster (name + vni + ip + mac leased in one round), one at a
  time at host1, p50 / p99;
* the same with ``--clients`` clients per host, every host at once: p50 / p99, clusters/s,
  failures by faultcode — target: p50 within 300 ms, 20 clusters/s, no failure;
* errors in the daemons' logs (tracebacks, "connection was lost") — target: none;
* a capacity race: the same clients create 3-VM clusters all at once until the grid refuses
  them, then the most over-promised host (memory and vCPUs placed past its capacity) — target:
  0 (capacity is decided with the leases).

    .venv/bin/python bench/leases.py [--sizes 3 5] [--rounds 40] [--creates 20] [--clients 2]
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
from collections import Counter
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
LOG_ERRORS = ("Traceback", "Unhandled", "connection was lost", "Request.finish")


def measure_daemons(n: int, creates: int, clients: int) -> dict:
    """Starts ``n`` daemons, measures the user API and CreateCluster, stops them."""
    from tests.test_leases_chaos import SmallPoolGrid
    from tests.test_peers_process import wait_until

    base = Path(tempfile.mkdtemp(prefix=f"vmweb-bench-leases-{n}-"))
    grid = SmallPoolGrid(base, n, pool_cidr="10.90.0.0/20", timing="lan")  # ~4,000 addresses
    try:
        wait_until(grid.all_alive, 60, f"{n} hosts to see each other alive", every=0.5)
        owner = _owner()
        c = grid.client(0, 30)
        c.call("ListTemplates")  # first call: authentication, warm caches
        # The bench creates more clusters than a user's default quota of VMs allows.
        c.call("SetQuota", owner, 100_000)
        wait_until(
            lambda: all(
                any(u["name"] == owner and u["quota_vms"] >= 100_000 for u in grid.call(i, "ListUsers"))
                for i in range(n)
            ),
            30,
            "every host to know the bench user's quota",
            every=0.2,
        )
        rtt = []
        for _ in range(50):
            t = time.perf_counter()
            c.call("ListTemplates")
            rtt.append(time.perf_counter() - t)
        seq, failed = [], []
        for i in range(creates):
            t = time.perf_counter()
            try:
                c.call("CreateCluster", f"seq{i}", "lab", owner, 1)
                seq.append(time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001 (reported, not fatal)
                failed.append(_faultcode(e))
        print(f"  {n} daemons: sequential creates done", flush=True)
        # ``clients`` clients per host, every host at once: all for one owner (whose quota
        # every create changes), then each client for an owner of its own
        per_client = max(2 * creates // (n * clients), 3)
        owners = [f"bench{w}" for w in range(n * clients)]
        for o in owners:
            c.call("CreateUser", o, "bench-password-1", "user", 100_000)
        wait_until(
            lambda: all(set(owners) <= {u["name"] for u in grid.call(i, "ListUsers")} for i in range(n)),
            30,
            "every host to know the bench's users",
            every=0.2,
        )
        one = _concurrent(grid, n, clients, per_client, lambda w: owner, "par")
        print(f"  {n} daemons: concurrent creates (one owner) done", flush=True)
        many = _concurrent(grid, n, clients, per_client, lambda w: owners[w], "own")
        print(f"  {n} daemons: concurrent creates (an owner per client) done", flush=True)
        # The race starts from an empty grid: the creates above may have filled it already.
        empty_grid(grid, n)
        race = capacity_race(grid, n, clients, owner)
        print(f"  {n} daemons: capacity race done", flush=True)
        log_errors = Counter()
        for d in grid.daemons:
            for line in d.log().splitlines():
                for what in LOG_ERRORS:
                    if what in line:
                        log_errors[what] += 1
        return {
            "api": ms(rtt),
            "create": ms(seq) if seq else (float("nan"),) * 2,
            "create_failed": failed,
            "one": one,
            "many": many,
            "par_clients": n * clients,
            "log_errors": log_errors,
            "race": race,
        }
    finally:
        grid.close()


def _concurrent(grid, n: int, clients: int, per_client: int, owner_of, prefix: str) -> dict:
    """``clients`` clients per host create 1-VM clusters all at once (``per_client`` each)."""
    conns = [grid.client(i % n, 30) for i in range(n * clients)]
    done, errors, lat = [0], [], []
    lock = threading.Lock()

    def worker(w):
        for k in range(per_client):
            t = time.perf_counter()
            try:
                conns[w].call("CreateCluster", f"{prefix}{w}-{k}", "lab", owner_of(w), 1)
                with lock:
                    done[0] += 1
                    lat.append(time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(_faultcode(e))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n * clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    wall = time.perf_counter() - t
    return {"lat": ms(lat) if lat else (float("nan"),) * 2, "rate": done[0] / wall, "failed": errors}


def empty_grid(grid, n: int) -> None:
    """Destroys every cluster any host lists, until no host lists one (a host may learn of a
    cluster made at another a moment after its creator acknowledged it)."""
    from tests.test_peers_process import wait_until

    asked: set = set()

    def empty() -> bool:
        left = {cl["name"]: i for i in range(n) for cl in grid.call(i, "ListClusters", None) or []}
        for name, i in left.items():
            if name not in asked:
                grid.call(i, "DestroyCluster", name, True)  # at a host that knows it
                asked.add(name)
        return not left

    wait_until(empty, 300, "every host to have no cluster left", every=0.5)


def capacity_race(grid, n: int, clients: int, owner: str) -> dict:
    """``clients`` clients per host create 3-VM ``bigdata`` clusters all at once until the grid
    refuses each of them twice in a row; then, from the DOM, how far each host is promised past
    its memory and vCPUs (target: 0 everywhere)."""
    from lxml import etree

    conns = [grid.client(i % n, 30) for i in range(n * clients)]
    made, refused, lat = [0], Counter(), []
    lock = threading.Lock()

    def worker(w):
        misses = 0
        for k in range(200):
            t = time.perf_counter()
            try:
                conns[w].call("CreateCluster", f"full{w}-{k}", "bigdata", owner, 3)
                with lock:
                    made[0] += 1
                    lat.append(time.perf_counter() - t)
                misses = 0
            except Exception as e:  # noqa: BLE001
                with lock:
                    refused[_faultcode(e)] += 1
                misses += 1
                if misses >= 2:
                    return

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n * clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join(600)
    wall = time.perf_counter() - t
    c = grid.client(0, 30)
    dom = etree.fromstring(c.call("GetDom").encode())
    placed: dict = {}
    for vm in dom.iter("{urn:vmweb:dom:1}vm"):
        if vm.get("deleted") != "true" and vm.get("desired") != "absent":
            mem, cpu = placed.get(vm.get("host"), (0, 0))
            placed[vm.get("host")] = (mem + int(vm.get("memory-mib")), cpu + int(vm.get("vcpus")))
    over_mem, over_cpu = 0, 0.0
    for h in c.call("ListHosts"):
        mem, cpu = placed.get(h["id"], (0, 0))
        over_mem = max(over_mem, mem - h["memory_mib"])
        over_cpu = max(over_cpu, cpu - 4.0 * h["cpus"])
    return {
        "made": made[0],
        "refused": dict(refused),
        "wall": wall,
        "lat": ms(lat) if lat else (float("nan"),) * 2,
        "over_mem": max(over_mem, 0),
        "over_cpu": max(over_cpu, 0.0),
        "used_mem": sum(m for m, _ in placed.values()),
    }


def _faultcode(e) -> str:
    return getattr(e, "code", None) or type(e).__name__


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
        cfg = write_host_config(
            base / hid,
            hid,
            0,
            peer_ports[i],
            16,
            65536,
            extra=(
                f'<peers seeds="127.0.0.1:{peer_ports[0]}" cert-dir="{base / hid / "pki"}" '
                f'timing="local" members="{members}"/>'
            ),
        )
        node = Node(load_config(cfg), reactor, fsync=True, rng=random.Random(i))
        yield node.start()
        nodes.append(node)
    for _ in range(400):  # bounded: 20 s for everyone to see everyone
        if all(len(nd.gossip.core.alive()) == n for nd in nodes):
            break
        yield task.deferLater(reactor, 0.05, lambda: None)
    return nodes


@defer.inlineCallbacks
def measure_in_process(n: int, rounds: int):
    from twisted.logger import LogLevel, formatEvent, globalLogPublisher

    base = Path(tempfile.mkdtemp(prefix=f"vmweb-bench-paxos-{n}-"))
    problems = Counter()

    def watch(event):
        # Warnings and errors logged while measuring: a clean run has none.
        level = event.get("log_level")
        if level is not None and level >= LogLevel.warn:
            problems[(formatEvent(event) or "")[:90]] += 1

    nodes = yield grid_in_process(base, n)
    globalLogPublisher.addObserver(watch)
    try:
        result = yield _measure_in_process(n, rounds, base, nodes)
        result["log_problems"] = problems
        return result
    finally:
        globalLogPublisher.removeObserver(watch)
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
    tput = {}
    for inflight in (1, 8, 64):
        total = max(rounds * 2, inflight * 12)
        sem = defer.DeferredSemaphore(inflight)
        t = time.perf_counter()
        times = yield defer.gatherResults(
            [
                sem.run(_timed_propose, nodes[i % n], {f"bench/tput/{n}/{inflight}/{i}": (None, "bench")})
                for i in range(total)
            ]
        )
        wall = time.perf_counter() - t
        ok = [x for x in times if x is not None]
        tput[inflight] = {
            "rate": len(ok) / wall,
            "lat": ms(ok) if ok else (float("nan"),) * 2,
            "failed": total - len(ok),
        }
    print(f"  {n} in-process nodes: done", flush=True)
    return {
        "peer": ms(rtt),
        "single": ms(single),
        "batch": ms(batched) if batched else (float("nan"),) * 2,
        "failed": failed,
        "tput": tput,
        "fsync": fsync_ms(base),
        "requests": sum(nd.paxos_transport.requests for nd in nodes),
    }


# -- report ----------------------------------------------------------------------------------------
LEASES_PER_S = 2000
CREATE_P50_MS, CLUSTERS_PER_S = 300, 20


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(sizes, daemons: dict, inproc: dict) -> None:
    print("\nIn-process nodes (one reactor, one CPU thread for all hosts), LeaseService.propose:")
    print(
        f"{'hosts':>5} {'peer RTT p50/p99 ms':>20} {'fsync p50/p99 ms':>17} {'1 lease p50/p99 ms':>19} "
        f"{'target: 2.5 RTT + fsync':>24} {'64 keys p50/p99 ms':>19}"
    )
    for n in sizes:
        r = inproc.get(n)
        if r is None:
            continue
        r50, r99 = r["peer"]
        f50, f99 = r["fsync"]
        s50, s99 = r["single"]
        b50, b99 = r["batch"]
        target = 2.5 * r50 + f50
        print(
            f"{n:>5} {r50:>9.2f} / {r99:<8.2f} {f50:>7.2f} / {f99:<7.2f} {s50:>8.2f} / {s99:<8.2f} "
            f"{target:>10.2f} ms {_verdict(s50 <= target):<6} ({(s50 - f50) / r50:.1f} RTT) "
            f"{b50:>6.1f} / {b99:<8.1f}"
        )
    for n in sizes:
        r = inproc.get(n)
        if r is not None:
            print(
                f"  {n} hosts: {r['requests']} consensus requests in all; warnings/errors logged while "
                f"measuring: {sum(r['log_problems'].values())} {dict(r['log_problems'].most_common(3)) or ''}"
            )
    print(
        f"\n{'hosts':>5} {'in flight':>9} {'leases/s':>9} {'p50/p99 ms':>17} {'failed':>6}   "
        f"target: {LEASES_PER_S:,} leases/s with many in flight"
    )
    for n in sizes:
        r = inproc.get(n)
        if r is None:
            continue
        for inflight, t in sorted(r["tput"].items()):
            p50, p99 = t["lat"]
            verdict = _verdict(t["rate"] >= LEASES_PER_S) if inflight == 64 else ""
            print(
                f"{n:>5} {inflight:>9} {t['rate']:>9.0f} {p50:>8.1f} / {p99:<6.1f} {t['failed'] + (r['failed'] if inflight == 1 else 0):>6}   {verdict}"
            )
    print("\nReal daemons (separate processes), user API over HTTP, peers over mutual TLS:")
    print(
        f"{'hosts':>5} {'API RTT p50/p99 ms':>19} {'1 at a time p50/p99 ms':>23} {'clients':>7} "
        f"{'all at once p50/p99 ms':>23} {'clusters/s':>10} {'failed':>6} {'log errors':>10}"
    )
    for n in sizes:
        d = daemons.get(n)
        if d is None:
            continue
        a50, a99 = d["api"]
        c50, c99 = d["create"]
        for label, key in (("one owner", "one"), ("an owner per client", "many")):
            r = d[key]
            p50, p99 = r["lat"]
            failed = (d["create_failed"] if key == "one" else []) + r["failed"]
            print(
                f"{n:>5} {a50:>8.2f} / {a99:<8.2f} {c50:>10.1f} / {c99:<10.1f} {d['par_clients']:>7} "
                f"{p50:>10.1f} / {p99:<10.1f} {r['rate']:>10.1f} {len(failed):>6} "
                f"{sum(d['log_errors'].values()):>10}   ({label})"
            )
            if failed:
                print(f"      failures by faultcode: {dict(Counter(failed))}")
            print(
                f"      target: all at once p50 <= {CREATE_P50_MS} ms: {_verdict(p50 <= CREATE_P50_MS)}; "
                f">= {CLUSTERS_PER_S} clusters/s: {_verdict(r['rate'] >= CLUSTERS_PER_S)}; "
                f"no failure: {_verdict(not failed)}; clean logs: {_verdict(not d['log_errors'])}"
            )
        if d["log_errors"]:
            print(f"      log lines: {dict(d['log_errors'])}")
        r = d["race"]
        print(
            f"      capacity race ({d['par_clients']} clients, 3-VM bigdata clusters until "
            f"refused): {r['made']} clusters in {r['wall']:.1f} s, p50/p99 "
            f"{r['lat'][0]:.0f} / {r['lat'][1]:.0f} ms, refusals {r['refused']}; most "
            f"over-promised host: {r['over_mem']} MiB, {r['over_cpu']:g} vCPUs past capacity "
            f"(target 0: {_verdict(r['over_mem'] == 0 and r['over_cpu'] == 0)})"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--rounds", type=int, default=40, help="in-process proposals of each kind")
    ap.add_argument("--creates", type=int, default=20, help="CreateCluster calls at the daemons")
    ap.add_argument("--clients", type=int, default=2, help="clients per host creating at once")
    ap.add_argument("--skip-daemons", action="store_true")
    ap.add_argument("--skip-in-process", action="store_true")
    args = ap.parse_args()
    daemons, inproc = {}, {}
    if not args.skip_daemons:
        for n in args.sizes:  # blocking clients; before the reactor runs
            daemons[n] = measure_daemons(n, args.creates, args.clients)

    @defer.inlineCallbacks
    def run(_reactor):
        for n in args.sizes if not args.skip_in_process else ():
            inproc[n] = yield measure_in_process(n, args.rounds)
        report(args.sizes, daemons, inproc)

    task.react(run)  # runs the reactor, then exits the process
    return 0


if __name__ == "__main__":
    sys.exit(main())
