"""Consensus lease latency and throughput on 3 and 5 local hosts, next to the raw round trips.

Everything is measured in one run and printed side by side with its target (a before/after
comparison cannot be had from one run). Three setups, all on loopback with mutual-TLS peers and
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

**One process per host** (each host a child process running one node on its own reactor, built
as the in-process nodes are; this process drives them with one-line commands on their stdin,
each answered with one JSON line, and every time is taken in the child, so the commands add
nothing to it; the hosts' CPU work runs in parallel, as far as this machine's cores allow):

* the raw peer round trip from host1's process to host2's, p50 / p99;
* one ``os.fsync``, as above;
* ``propose`` of one fresh key, one at a time, at host1 (the grid's proposer), and separately at
  host2 (which forwards its requests to host1), p50 / p99 — target: p50 within 2.5 peer round
  trips plus one fsync;
* single-key proposals with 1, 8 and 64 in flight in all (each host running its share, rounded
  up, all started at once): leases/s from the start command to the last host's finish, p50 /
  p99, failures, how many were forwarded — target: at least 2,000 leases/s with many in flight;
* warnings and errors each host logged while measuring — target: none (a host's directory and
  logs are kept when it logged any, or anything failed).

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
        [--skip-in-process] [--skip-processes] [--skip-daemons]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
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
def write_grid(base: Path, n: int, peer_ports: list[int]) -> list[Path]:
    """A grid CA and ``n`` host directories (host1..hostN, every one a consensus member, host1
    the seed); returns their configs."""
    pki.init_ca(base / "ca")
    members = " ".join(f"host{i + 1}" for i in range(n))
    configs = []
    for i in range(n):
        hid = f"host{i + 1}"
        pki.issue_host_cert(base / "ca", hid, base / hid / "pki", ["127.0.0.1"])
        configs.append(
            write_host_config(
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
        )
    return configs


# Proposals per request in flight at each throughput level: 60 each keeps 64 in flight for some
# seconds, long enough for the periodic work (anti-entropy, reconcile passes, compaction) to take
# its share, where 12 each (a fraction of a second) measured a burst. Side by side on 2026-12-03,
# 3 in-process hosts, 64 in flight, two runs each: 928 / 1,041 leases/s over 768 proposals,
# 896 / 924 over 3,840.
SUSTAINED_PER_SLOT = 60


@defer.inlineCallbacks
def grid_in_process(base: Path, n: int):
    nodes = []
    for i, cfg in enumerate(write_grid(base, n, [free_port() for _ in range(n)])):
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
        total = max(rounds * 2, inflight * SUSTAINED_PER_SLOT)
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


# -- one process per host ----------------------------------------------------------------------
# Each host is a child process (this file run with --host) running one Node on its own reactor.
# The parent writes one command per line on a child's stdin; the child answers each with one
# JSON line on its stdout. Times are taken in the child, so the channel adds nothing to them.
HOST_READY_S = 60.0  # a child's start and its wait for everyone alive
HOST_REPLY_S = 300.0  # one command's answer


def host_process(cfg: Path, index: int, n: int) -> None:
    """A child: starts the host of ``cfg`` as grid_in_process starts each node, waits (bounded)
    until it sees all ``n`` hosts alive, says so, then runs commands until its stdin closes or
    ``stop``. Its warnings and errors go to ``bench-host.log`` next to the config and are
    counted from ready on."""
    import json
    from math import inf

    from twisted.internet.error import ReactorNotRunning
    from twisted.internet.stdio import StandardIO
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        formatEvent,
        globalLogBeginner,
        globalLogPublisher,
        textFileLogObserver,
    )
    from twisted.protocols.basic import LineReceiver

    log_file = open(cfg.parent / "bench-host.log", "a")  # open for the process' life
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(log_file), [LogLevelFilterPredicate(LogLevel.warn)])],
        redirectStandardIO=False,
    )
    problems: Counter = Counter()
    state: dict = {"node": None, "counting": False, "stopping": None}

    def watch(event):
        level = event.get("log_level")
        if state["counting"] and level is not None and level >= LogLevel.warn:
            problems[(formatEvent(event) or "")[:90]] += 1

    globalLogPublisher.addObserver(watch)

    @defer.inlineCallbacks
    def rtt(to, count):
        node = state["node"]
        addr = node.peer_address_of(to)
        times, failed = [], 0
        for _ in range(int(count)):
            env = Envelope(node.host_id, node.peer_address, to, Gossip())
            t = time.perf_counter()
            ok = yield node.gossip.client.send(addr, encode(env))
            if ok:
                times.append(time.perf_counter() - t)
            else:
                failed += 1
        return {"times": times, "failed": failed}

    @defer.inlineCallbacks
    def single(prefix, count):
        node = state["node"]
        forwarded = node.leases.forwarded
        times, failed = [], 0
        for i in range(int(count)):
            dt = yield _timed_propose(node, {f"{prefix}/{i}": (None, "bench")})
            if dt is None:
                failed += 1
            else:
                times.append(dt)
        return {"times": times, "failed": failed, "forwarded": node.leases.forwarded - forwarded}

    @defer.inlineCallbacks
    def tput(prefix, inflight, count):
        node = state["node"]
        forwarded = node.leases.forwarded
        sem = defer.DeferredSemaphore(int(inflight))
        first = time.time()
        results = yield defer.gatherResults(
            [sem.run(_timed_propose, node, {f"{prefix}/{i}": (None, "bench")}) for i in range(int(count))],
            consumeErrors=True,
        )
        last = time.time()
        times = [x for x in results if x is not None]
        return {
            "times": times,
            "failed": len(results) - len(times),
            "first": first,
            "last": last,
            "forwarded": node.leases.forwarded - forwarded,
        }

    def stats():
        node = state["node"]
        return {
            "problems": dict(problems),
            "requests": node.paxos_transport.requests,
            "forwarded": node.leases.forwarded,
        }

    @defer.inlineCallbacks
    def stop_node():
        """Stops the node once (as measure_in_process does: peers are not told)."""
        if state["stopping"] is None:
            state["counting"] = False
            node, state["node"] = state["node"], None
            state["stopping"] = node.stop(leave=False) if node is not None else defer.succeed(None)
        yield state["stopping"]

    class Control(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line):
            words = line.decode().split()
            if not words:
                return
            if words[0] == "stop":
                d = stop_node().addCallback(lambda _: {"stopped": True})
                d.addErrback(lambda f: {"error": f"{f.type.__name__}: {f.getErrorMessage()}"})
                d.addCallback(self.answer).addCallback(lambda _: self.transport.loseConnection())
                return
            command = {"rtt": rtt, "single": single, "tput": tput, "stats": stats}.get(words[0])
            if command is None or state["node"] is None:
                self.answer({"error": f"cannot run {words[0]!r} now"})
                return
            d = defer.maybeDeferred(command, *words[1:])
            d.addErrback(lambda f: {"error": f"{f.type.__name__}: {f.getErrorMessage()}"})
            d.addCallback(self.answer)

        def answer(self, obj):
            self.sendLine(json.dumps(obj).encode())

        def connectionLost(self, reason):
            # stdin closed (the parent ended or is gone), or after ``stop``: end here too
            stop_node().addBoth(lambda _: end())

    def end():
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass  # stopping already (a signal)

    control = Control()

    @defer.inlineCallbacks
    def boot():
        try:
            node = Node(load_config(cfg), reactor, fsync=True, rng=random.Random(index))
            state["node"] = node
            yield node.start()
            waited = inf
            t = time.perf_counter()
            for _ in range(600):  # bounded: 30 s for this host to see everyone alive
                if len(node.gossip.core.alive()) == n:
                    waited = time.perf_counter() - t
                    break
                yield task.deferLater(reactor, 0.05, lambda: None)
            alive = node.gossip.core.alive()
            state["counting"] = True
            control.answer({"ready": len(alive) == n, "alive": alive, "waited": waited})
        except Exception as e:  # noqa: BLE001 (said to the parent, which gives up)
            control.answer({"error": f"{type(e).__name__}: {e}"})

    StandardIO(control)
    # However the reactor ends (the parent's stop, its stdin closing, a signal), the node stops
    # first: its thread pools would keep the process from exiting.
    reactor.addSystemEventTrigger("before", "shutdown", stop_node)
    reactor.callWhenRunning(boot)
    reactor.run()
    log_file.close()


class HostProcess:
    """The parent's side of one child host: its process, its answers (read by a thread into a
    queue, so every wait is bounded), its log."""

    def __init__(self, cfg: Path, index: int, n: int):
        import queue
        import subprocess

        self.name = f"host{index + 1}"
        self.log_path = cfg.parent / "bench-host.log"
        self.stderr_path = cfg.parent / "bench-host.stderr"
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--host", str(cfg), str(index), str(n)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=REPO,
                env=env,
                start_new_session=True,  # a Ctrl-C reaches the parent only, which stops it
            )
        self.answers: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        import json

        for line in self.proc.stdout:
            try:
                self.answers.put(json.loads(line))
            except ValueError:
                pass  # not an answer (nothing else should write there)
        self.answers.put(None)

    def send(self, *words) -> None:
        self.proc.stdin.write(" ".join(str(w) for w in words) + "\n")
        self.proc.stdin.flush()

    def answer(self, timeout: float = HOST_REPLY_S) -> dict:
        import queue

        try:
            got = self.answers.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{self.name}: no answer within {timeout} s{self._tail()}") from None
        if got is None:
            raise RuntimeError(f"{self.name} exited ({self.proc.poll()}){self._tail()}")
        if "error" in got:
            raise RuntimeError(f"{self.name}: {got['error']}{self._tail()}")
        return got

    def call(self, *words, timeout: float = HOST_REPLY_S) -> dict:
        self.send(*words)
        return self.answer(timeout)

    def _tail(self) -> str:
        text = ""
        for path in (self.stderr_path, self.log_path):
            if path.exists():
                text += f"\n--- {path} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-20:])
        return text


def close_hosts(hosts: list[HostProcess]) -> None:
    """Asks every host to ``stop`` and closes its stdin; then terminates, then kills those
    still running, all hosts at once at each step (bounded)."""
    import subprocess

    for h in hosts:
        try:
            if h.proc.poll() is None:
                h.send("stop")
        except OSError:
            pass  # it has gone already
    deadline = time.monotonic() + 15
    for h in hosts:
        try:
            h.answer(max(deadline - time.monotonic(), 0.1))
        except Exception:  # noqa: BLE001 (it is ended below whatever it said)
            pass
        try:
            h.proc.stdin.close()
        except OSError:
            pass
    for end in (None, "terminate", "kill"):
        running = [h for h in hosts if h.proc.poll() is None]
        if not running:
            return
        for h in running:
            if end is not None:
                print(f"  {h.name} still runs after its stop: {end}", file=sys.stderr, flush=True)
                getattr(h.proc, end)()
        deadline = time.monotonic() + 10
        for h in running:
            try:
                h.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass


def measure_processes(n: int, rounds: int) -> dict:
    """Starts ``n`` child hosts, measures at them, stops them; their directory is removed unless
    something failed or was logged (then it is kept for its logs)."""
    import shutil
    from math import ceil

    from tests.procs import free_port as reserved_port

    base = Path(tempfile.mkdtemp(prefix=f"vmweb-bench-procs-{n}-"))
    configs = write_grid(base, n, [reserved_port() for _ in range(n)])
    hosts: list[HostProcess] = []
    keep = True
    try:
        for i, cfg in enumerate(configs):
            hosts.append(HostProcess(cfg, i, n))
        waited = []
        for h in hosts:
            ready = h.answer(HOST_READY_S)
            if not ready["ready"]:
                raise RuntimeError(f"{h.name} sees only {ready['alive']} alive after 30 s{h._tail()}")
            waited.append(ready["waited"])
        rtt = hosts[0].call("rtt", "host2", rounds)
        single = {h.name: h.call("single", f"bench/procs/{n}/single/{h.name}", rounds) for h in hosts[:2]}
        tput = {}
        for inflight in (1, 8, 64):
            total = max(rounds * 2, inflight * SUSTAINED_PER_SLOT)
            each, per_host = ceil(total / n), ceil(inflight / n)
            t0 = time.time()
            for h in hosts:
                h.send("tput", f"bench/procs/{n}/tput/{inflight}/{h.name}", per_host, each)
            answers = [h.answer() for h in hosts]
            wall = max(a["last"] for a in answers) - t0
            ok = [x for a in answers for x in a["times"]]
            tput[inflight] = {
                "rate": len(ok) / wall,
                "lat": ms(ok) if ok else (float("nan"),) * 2,
                "failed": sum(a["failed"] for a in answers),
                "in_flight": per_host * n,
                "count": each * n,
                "start_skew": max(a["first"] for a in answers) - t0,
                "forwarded": sum(a["forwarded"] for a in answers),
            }
        stats = {h.name: h.call("stats") for h in hosts}
        result = {
            "peer": ms(rtt["times"]),
            "peer_failed": rtt["failed"],
            "single": {
                name: {
                    "lat": ms(r["times"]) if r["times"] else (float("nan"),) * 2,
                    "failed": r["failed"],
                    "forwarded": r["forwarded"],
                }
                for name, r in single.items()
            },
            "tput": tput,
            "fsync": fsync_ms(base),
            "requests": sum(s["requests"] for s in stats.values()),
            "log_problems": {name: Counter(s["problems"]) for name, s in stats.items()},
            "waited": max(waited),
        }
        keep = bool(
            rtt["failed"]
            or any(r["failed"] for r in single.values())
            or any(t["failed"] for t in tput.values())
            or any(s["problems"] for s in stats.values())
        )
        print(f"  {n} host processes: done", flush=True)
        return result
    except (KeyboardInterrupt, SystemExit):
        keep = False  # interrupted: nothing to look at
        raise
    finally:
        close_hosts(hosts)
        if keep:
            print(f"  {n} host processes: their directories and logs are kept in {base}", flush=True)
        else:
            shutil.rmtree(base, ignore_errors=True)


# -- report ----------------------------------------------------------------------------------------
LEASES_PER_S = 2000
CREATE_P50_MS, CLUSTERS_PER_S = 300, 20


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(sizes, daemons: dict, inproc: dict, procs: dict) -> None:
    if inproc:
        report_in_process(sizes, inproc)
    if procs:
        report_processes(sizes, procs)
    if daemons:
        report_daemons(sizes, daemons)


def report_in_process(sizes, inproc: dict) -> None:
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


def report_processes(sizes, procs: dict) -> None:
    print("\nOne process per host (a Node on its own reactor in each), LeaseService.propose:")
    print(
        f"{'hosts':>5} {'peer RTT p50/p99 ms':>20} {'fsync p50/p99 ms':>17} {'at':>5} "
        f"{'1 lease p50/p99 ms':>19} {'target: 2.5 RTT + fsync':>24} {'forwarded':>9}"
    )
    for n in sizes:
        r = procs.get(n)
        if r is None:
            continue
        r50, r99 = r["peer"]
        f50, f99 = r["fsync"]
        target = 2.5 * r50 + f50
        for k, (at, s) in enumerate(r["single"].items()):
            s50, s99 = s["lat"]
            lead = f"{n:>5} {r50:>9.2f} / {r99:<8.2f} {f50:>7.2f} / {f99:<7.2f}"
            lead = lead if k == 0 else " " * len(lead)
            print(
                f"{lead} {at:>5} {s50:>8.2f} / {s99:<8.2f} {target:>10.2f} ms {_verdict(s50 <= target):<6} "
                f"({(s50 - f50) / r50:.1f} RTT) {s['forwarded']:>6}"
                + (f"  {s['failed']} failed" if s["failed"] else "")
            )
    for n in sizes:
        r = procs.get(n)
        if r is None:
            continue
        logged = {h: sum(c.values()) for h, c in r["log_problems"].items()}
        print(
            f"  {n} hosts: {r['requests']} consensus requests in all; every host saw all alive "
            f"{r['waited']:.1f} s after its start at most; a throughput run started at every host "
            f"{max(t['start_skew'] for t in r['tput'].values()) * 1000:.1f} ms after the command at most; "
            f"warnings/errors logged while measuring, "
            f"by host: {logged}"
            + (f"; {r['peer_failed']} peer round trips failed" if r["peer_failed"] else "")
        )
        for h, c in r["log_problems"].items():
            for line, count in c.most_common(3):
                print(f"      {h}: {count} x {line}")
    print(
        f"\n{'hosts':>5} {'in flight':>9} {'(actual)':>8} {'leases/s':>9} {'p50/p99 ms':>17} {'failed':>6} "
        f"{'forwarded':>9}   target: {LEASES_PER_S:,} leases/s with many in flight"
    )
    for n in sizes:
        r = procs.get(n)
        if r is None:
            continue
        for inflight, t in sorted(r["tput"].items()):
            p50, p99 = t["lat"]
            verdict = _verdict(t["rate"] >= LEASES_PER_S) if inflight == 64 else ""
            print(
                f"{n:>5} {inflight:>9} {t['in_flight']:>8} {t['rate']:>9.0f} {p50:>8.1f} / {p99:<6.1f} "
                f"{t['failed']:>6} {t['forwarded']:>6}/{t['count']:<5} {verdict}"
            )


def report_daemons(sizes, daemons: dict) -> None:
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
    ap.add_argument(
        "--rounds",
        type=int,
        default=40,
        help="proposals of each kind at the in-process and per-process hosts",
    )
    ap.add_argument("--creates", type=int, default=20, help="CreateCluster calls at the daemons")
    ap.add_argument("--clients", type=int, default=2, help="clients per host creating at once")
    ap.add_argument("--skip-daemons", action="store_true")
    ap.add_argument("--skip-in-process", action="store_true")
    ap.add_argument("--skip-processes", action="store_true", help="no run with one process per host")
    # A child of measure_processes: one host (its config, its index, the grid's size).
    ap.add_argument("--host", nargs=3, metavar=("CONFIG", "INDEX", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.host:
        host_process(Path(args.host[0]), int(args.host[1]), int(args.host[2]))
        return 0
    daemons, inproc, procs = {}, {}, {}
    # Until the reactor runs (it has its own handler): a SIGTERM ends the blocking parts through
    # their clean-ups, which stop the processes they started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if not args.skip_daemons:
        for n in args.sizes:  # blocking clients; before the reactor runs
            daemons[n] = measure_daemons(n, args.creates, args.clients)
    if not args.skip_processes:
        for n in args.sizes:  # blocking: the hosts run in their own processes
            procs[n] = measure_processes(n, args.rounds)

    @defer.inlineCallbacks
    def run(_reactor):
        for n in args.sizes if not args.skip_in_process else ():
            inproc[n] = yield measure_in_process(n, args.rounds)
        report(args.sizes, daemons, inproc, procs)

    task.react(run)  # runs the reactor, then exits the process
    return 0


if __name__ == "__main__":
    sys.exit(main())
