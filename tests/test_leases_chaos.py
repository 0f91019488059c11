"""Consensus leases under chaos: real daemons with a small address pool, concurrent requests at
every host, hosts paused (SIGSTOP), killed (SIGKILL) and restarted; then every replica agrees and
nothing unique was handed out twice. Also: without a majority, leasing fails fast and clearly.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from lxml import etree

from tests.procs import Daemon, free_port
from tests.test_peers_process import wait_until
from vmwebd.client import ApiClient, ApiFault
from vmwebd.demo import write_host_config
from vmwebd.gossip import pki

NS = "{urn:vmweb:dom:1}"
ADMIN, PASSWORD = "chaos", "chaos-password-1"  # the grid's first admin (when the API has users)
GRACE_MS = 300_000  # Reconciler.lease_grace_s: orphan leases younger than this may stay
EXPECTED_FAULTS = {
    "Server.NoQuorum",
    "Server.PoolExhausted",
    "Client.NameTaken",
    "Server.AllocationContended",
}


def _bootstrap_admin(state_dir: Path) -> None:
    """Makes ADMIN the first admin at this host's start, if the daemon has user accounts."""
    try:
        from vmwebd.accounts import write_bootstrap_admin
    except ImportError:
        return
    write_bootstrap_admin(state_dir, ADMIN, PASSWORD)


def api_client(address: str, timeout: float) -> ApiClient:
    """A user-API client that authenticates as ADMIN (HTTP Basic on every call)."""
    try:
        return ApiClient(address, timeout=timeout, user=ADMIN, password=PASSWORD)
    except TypeError:  # a client from before user accounts
        return ApiClient(address, timeout=timeout)


class NotAlive(dict):
    """Liveness views that are not yet all alive (falsy, and shown by wait_until on timeout)."""

    def __bool__(self):
        return False


class SmallPoolGrid:
    """``n`` real daemons on loopback, one CA, every host a consensus member, a /27 address pool."""

    def __init__(self, base: Path, n: int, pool_cidr: str = "10.88.0.0/27", timing: str = "local"):
        ca = base / "ca"
        pki.init_ca(ca, grid_name="chaos-grid")
        api = [free_port() for _ in range(n)]
        peer = [free_port() for _ in range(n)]
        members = " ".join(f"host{i + 1}" for i in range(n))
        self.daemons: list[Daemon] = []
        self._kept: dict[int, ApiClient] = {}
        for i in range(n):
            hid = f"host{i + 1}"
            cert = base / hid / "pki"
            pki.issue_host_cert(ca, hid, cert, ["127.0.0.1"])
            cfg = write_host_config(
                base / hid,
                hid,
                api[i],
                peer[i],
                8,
                16384,
                pool_cidr=pool_cidr,
                reserve="",
                reconcile_interval=0.5,
                extra=f'<peers seeds="127.0.0.1:{peer[0]}" cert-dir="{cert}" '
                f'timing="{timing}" members="{members}"/>',
            )
            _bootstrap_admin(base / hid / "state")
            self.daemons.append(Daemon(cfg, api_port=api[i]))
        for d in self.daemons:
            d.start(wait=False)
        for d in self.daemons:
            d.wait_ready()

    def client(self, i: int, timeout: float = 180.0) -> ApiClient:
        """A new client of host ``i`` (each fetches the WSDL: keep it, do not make one per call)."""
        return api_client(self.daemons[i].address, timeout)

    def call(self, i: int, op: str, *args):
        """Calls host ``i`` through a kept client (dropped after a transport error)."""
        c = self._kept.get(i)
        if c is None:
            c = self._kept[i] = self.client(i, 20)
        try:
            return c.call(op, *args)
        except ApiFault:
            raise
        except Exception:
            self._kept.pop(i, None)
            raise

    def restart(self, i: int) -> None:
        """SIGKILLs host ``i`` if it still runs, then starts it again (waits for READY)."""
        d = self.daemons[i]
        if d.alive():
            d.proc.send_signal(signal.SIGCONT)
            d.kill()
        if d.notify is not None:
            d.notify.close()
        d.start()

    def all_alive(self):
        """True once every host sees every host alive; else (falsy) the views, for the message."""
        n = len(self.daemons)
        views = {}
        for i in range(n):
            views[f"host{i + 1}"] = {h["id"]: h["liveness"] for h in self.call(i, "ListHosts")}
        if all(len(v) == n and set(v.values()) == {"alive"} for v in views.values()):
            return True
        return NotAlive(views)

    def close(self) -> None:
        for d in self.daemons:
            if d.alive():
                d.proc.send_signal(signal.SIGCONT)
            d.close()


# -- reading replicas ----------------------------------------------------------------------------
def replica(grid: SmallPoolGrid, i: int) -> dict:
    """The vcluster, vm and lease sections of host ``i``'s DOM: {(kind, id): element}, live and dead."""
    root = etree.fromstring(grid.call(i, "GetDom").encode())
    out = {}
    for kind in ("vcluster", "vm", "lease"):
        for el in root.iter(NS + kind):
            out[(kind, el.get("id"))] = el
    return out


def fingerprint(rep: dict) -> dict:
    return {k: (el.get("v"), el.get("deleted") == "true") for k, el in rep.items()}


def live(rep: dict, kind: str) -> dict:
    return {i: el for (k, i), el in rep.items() if k == kind and el.get("deleted") != "true"}


def check_replica(host: str, rep: dict, now_ms: int) -> list[str]:
    """Everything that must hold in one converged replica; returns the violations found."""
    bad = []
    clusters, vms, leases = live(rep, "vcluster"), live(rep, "vm"), live(rep, "lease")
    for attr in ("ip", "mac"):
        dup = {a: n for a, n in Counter(el.get(attr) for el in vms.values()).items() if n > 1}
        if dup:
            bad.append(f"{host}: duplicate {attr} among live VMs: {dup}")
    for vm_id, el in vms.items():
        c = clusters.get(el.get("cluster"))
        if c is None:
            bad.append(f"{host}: VM {vm_id} of missing cluster {el.get('cluster')}")
            continue
        holder = f"vm:{vm_id}#{c.get('token')}"
        for key in (f"ip/lab/{el.get('ip')}", f"mac/{el.get('mac')}"):
            got = leases.get(key)
            if got is None or got.get("holder") != holder:
                bad.append(
                    f"{host}: VM {vm_id} uses {key} but the lease says "
                    f"{None if got is None else got.get('holder')}"
                )
    for name, c in clusters.items():
        holder = f"vcluster:{name}#{c.get('token')}"
        for key in (f"name/vcluster/{name}", f"vni/{c.get('vni')}"):
            got = leases.get(key)
            if got is None or got.get("holder") != holder:
                bad.append(
                    f"{host}: cluster {name} uses {key} but the lease says "
                    f"{None if got is None else got.get('holder')}"
                )
    for key, el in leases.items():
        kind, _, rest = el.get("holder").partition(":")
        ref, _, token = rest.rpartition("#")
        if kind == "vm":
            vm = vms.get(ref)
            c = clusters.get(vm.get("cluster")) if vm is not None else None
        elif kind == "vcluster":
            c = clusters.get(ref)
        else:
            continue
        if c is None or c.get("token") != token:
            age = now_ms - int(el.get("granted-at"))
            if age >= GRACE_MS:
                bad.append(f"{host}: lease {key} held by missing {el.get('holder')} for {age} ms")
    return bad


# -- the chaos test ------------------------------------------------------------------------------
class Log:
    """What the clients saw: acknowledged creates and destroys, and fault counts."""

    def __init__(self):
        self.lock = threading.Lock()
        self.created: list[tuple[str, str, dict]] = []  # (name, host, reply)
        self.destroyed: set[str] = set()  # acknowledged or maybe destroyed
        self.outcomes: Counter = Counter()
        self.unexpected: list[str] = []
        self.timeline: list[tuple] = []  # (time, host, outcome, detail)

    def note(self, host: str, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            self.timeline.append((round(time.monotonic(), 1), host, outcome, detail[:90]))


def client_loop(grid: SmallPoolGrid, i: int, stop: threading.Event, log: Log, seed: int):
    """Keeps sending CreateCluster (and now and then DestroyCluster) to host ``i``."""
    rng = random.Random(seed)
    host = f"host{i + 1}"
    client = None
    serial = 0
    mine: list[str] = []
    while not stop.is_set():
        try:
            if client is None:
                client = grid.client(i, timeout=8)
            if mine and rng.random() < 0.25:
                name = mine.pop(rng.randrange(len(mine)))
                with log.lock:
                    log.destroyed.add(name)  # even unacknowledged: it may have happened
                client.call("DestroyCluster", name)
                with log.lock:
                    log.outcomes["destroy ok"] += 1
                continue
            if rng.random() < 0.4:
                name = f"shared{rng.randrange(6)}"  # every host races for these names
            else:
                serial += 1
                name = f"{host}-c{serial}"
            reply = client.call("CreateCluster", name, "lab", ADMIN, rng.randint(1, 3))
            with log.lock:
                log.created.append((name, host, reply))
            log.note(host, "create ok", name)
            if not name.startswith("shared"):
                mine.append(name)
        except ApiFault as f:
            log.note(host, f.code, f.message)
            if f.code not in EXPECTED_FAULTS:
                with log.lock:
                    log.unexpected.append(f"{host}: {f}")
        except Exception as e:  # transport: host paused, killed, restarting
            client = None
            log.note(host, f"transport {type(e).__name__}")
            stop.wait(0.3)


def chaos_loop(grid: SmallPoolGrid, stop: threading.Event, events: list, seed: int, until: float):
    """Pauses and kills hosts, at most two of five down at any moment, then brings them back."""
    rng = random.Random(seed)
    n = len(grid.daemons)
    stop.wait(2.0)
    while time.monotonic() < until and not stop.is_set():
        victims = rng.sample(range(n), rng.choice((1, 2)))
        actions = []
        for v in victims:
            how = rng.choice(("stop", "kill"))
            d = grid.daemons[v]
            if how == "stop":
                d.proc.send_signal(signal.SIGSTOP)
            else:
                d.kill()
            actions.append((v, how))
            events.append((round(time.monotonic(), 1), f"host{v + 1}", how))
        stop.wait(rng.uniform(2.0, 5.0))
        for v, how in actions:
            if how == "stop":
                grid.daemons[v].proc.send_signal(signal.SIGCONT)
            else:
                grid.restart(v)
            events.append((round(time.monotonic(), 1), f"host{v + 1}", "back"))
        stop.wait(rng.uniform(1.0, 2.5))


@pytest.fixture
def grid5(tmp_path):
    # LAN timing (probe timeout 0.5 s, not 0.2 s): five daemons and the clients share a couple of
    # CPUs here, and the local preset then flaps between suspect and dead without any fault.
    g = SmallPoolGrid(tmp_path, 5, timing="lan")
    try:
        wait_until(g.all_alive, 60, "five hosts to see each other alive", every=1.0)
        yield g
    finally:
        g.close()


# The 5-daemon chaos run (about a minute). It used to need the machine to itself: hosts flapped
# between suspect and alive because every delivery was schema-checked by libxml2's RelaxNG, which
# is exponential in optional attributes (vmwebd/dom/validate.py). With the linear validator it
# passed 3 runs of 3 here, so it runs in CI; VMWEB_CHAOS=0 skips it on a slow machine.
chaos = pytest.mark.skipif(
    os.environ.get("VMWEB_CHAOS") == "0", reason="5-daemon chaos run skipped: VMWEB_CHAOS=0"
)


@chaos
@pytest.mark.slow
def test_no_address_or_name_is_handed_out_twice_under_pauses_kills_and_restarts(grid5):
    """Concurrent creates at all 5 hosts with pauses and kill -9s: replicas converge, nothing unique doubles."""
    grid = grid5
    log, events, stop = Log(), [], threading.Event()
    until = time.monotonic() + 30.0
    workers = [
        threading.Thread(target=client_loop, args=(grid, i, stop, log, 100 + i), daemon=True)
        for i in range(5)
    ]
    chaos = threading.Thread(target=chaos_loop, args=(grid, stop, events, 7, until), daemon=True)
    for t in workers + [chaos]:
        t.start()
    chaos.join(60)
    stop.set()
    for t in workers:
        t.join(20)
    assert not chaos.is_alive() and not any(t.is_alive() for t in workers), "a client or chaos thread hung"
    for line in sorted(log.timeline + [(t, h, what, "") for t, h, what in events]):
        print(*line)
    print("outcomes:", dict(log.outcomes))
    assert log.outcomes["create ok"] > 0, log.outcomes
    assert not log.unexpected, log.unexpected

    for i, d in enumerate(grid.daemons):  # everyone back (the chaos loop restores, to be sure)
        if not d.alive():
            grid.restart(i)
    wait_until(grid.all_alive, 60, "all five hosts alive again in every view", every=1.0)

    # no cluster name acknowledged twice (names are never reused after a destroy)
    names = Counter(name for name, _, _ in log.created)
    assert [n for n, k in names.items() if k > 1] == []
    # acknowledged replies themselves carry no duplicate address
    # acknowledged replies never share an address, unless all but one of the sharers were destroyed
    for attr in ("ip", "mac"):
        users: dict[str, set] = {}
        for name, _, reply in log.created:
            for vm in reply["vms"]:
                users.setdefault(vm[attr], set()).add(name)
        shared = {a: u for a, u in users.items() if len(u - log.destroyed) > 1}
        assert shared == {}, f"{attr} acknowledged to two live clusters: {shared}"

    def converged():
        reps = [replica(grid, i) for i in range(5)]
        prints = [fingerprint(r) for r in reps]
        if any(p != prints[0] for p in prints[1:]):
            return None
        # destructions finished everywhere (every host is back, so every host gave its VMs back)
        if any(el.get("state") == "destroying" for el in live(reps[0], "vcluster").values()):
            return None
        return reps

    reps = wait_until(converged, 40, "the five replicas to agree on clusters, VMs and leases", every=0.5)

    now_ms = int(time.time() * 1000)
    problems = []
    for i, rep in enumerate(reps):
        problems += check_replica(f"host{i + 1}", rep, now_ms)
    assert problems == []
    clusters = live(reps[0], "vcluster")
    for name, host, reply in log.created:
        if name in log.destroyed:
            continue
        assert name in clusters, f"cluster {name} acknowledged by {host} is missing"
        vms = {vm_id: el for vm_id, el in live(reps[0], "vm").items() if el.get("cluster") == name}
        assert sorted((el.get("ip"), el.get("mac")) for el in vms.values()) == sorted(
            (vm["ip"], vm["mac"]) for vm in reply["vms"]
        ), f"cluster {name} changed addresses"
    for name in log.destroyed:
        assert name not in clusters, f"cluster {name} was destroyed but is still there"


# -- no majority ---------------------------------------------------------------------------------
@pytest.fixture
def grid3(tmp_path):
    g = SmallPoolGrid(tmp_path, 3)
    try:
        wait_until(g.all_alive, 40, "three hosts to see each other alive", every=1.0)
        yield g
    finally:
        g.close()


@pytest.mark.slow
def test_without_a_majority_leasing_fails_fast_naming_the_count_and_resumes_by_itself(grid3):
    """2 of 3 killed: CreateCluster fails with Server.NoQuorum within 6 s, reads work; back up, it works."""
    grid = grid3
    c0 = grid.client(0, 30)
    c0.call("CreateCluster", "before", "lab", ADMIN, 2)
    grid.daemons[1].kill()
    grid.daemons[2].kill()
    t = time.monotonic()
    with pytest.raises(ApiFault) as e:
        c0.call("CreateCluster", "lonely", "lab", ADMIN, 1)
    elapsed = time.monotonic() - t
    assert e.value.code == "Server.NoQuorum", e.value
    print(f"NoQuorum after {elapsed:.2f} s: {e.value.message}")
    assert elapsed <= 6.0, f"NoQuorum took {elapsed:.1f} s"
    assert "1 of 3 member hosts answered, 2 needed" in e.value.message, e.value.message
    # reads keep working at the survivor
    assert [c["name"] for c in c0.call("ListClusters", None)] == ["before"]
    assert len(c0.call("GetCluster", "before")["vms"]) == 2
    # the name was not taken by the failed attempt
    with pytest.raises(ApiFault) as e2:
        c0.call("GetCluster", "lonely")
    assert e2.value.code == "Client.NoSuchCluster"

    grid.restart(1)
    grid.restart(2)
    made = wait_until(
        lambda: c0.call("CreateCluster", "lonely", "lab", ADMIN, 1),
        30,
        "leases to resume once the killed hosts are back",
        every=0.5,
    )
    assert len(made["vms"]) == 1
    for i in (1, 2):
        wait_until(
            lambda i=i: "lonely" in {c["name"] for c in grid.call(i, "ListClusters", None)},
            20,
            f"host{i + 1} to learn of 'lonely'",
        )
