"""Scale of a grid of real daemons: writes, idle cost, reads and convergence as the DOM grows.

Starts ``--daemons`` real ``vmwebd`` processes on 127.0.0.1 (one libvirt test-driver host each,
sized so that ``--vms`` small VMs fit; a ``tiny`` template of 1 vCPU / 64 MiB VMs in the bench's
own templates dir), one grid under its own CA with mutual TLS between peers, the first five
hosts consensus members (``--members K``; 0 for every host: a grid of 16 would run Paxos among
16 acceptors, which nobody should configure), the daemon's own gossip timing ``lan``
(``--timing local`` for the process tests' faster one), no fsync. The admin creates ``--users`` accounts with big quotas. Then, in one run:

* ``--clients`` threads create clusters of ``--cluster-size`` VMs up to ``--vms`` in all, each
  request at the next host in turn; each CreateCluster's acknowledgement latency is recorded and
  each failure counted by faultcode (``Server.NoQuorum``...), or by exception type when there was
  no SOAP answer;
* at each checkpoint (1,000, 2,000, 5,000, 10,000 VMs, and ``--vms``; a quarter, half and all of
  ``--vms`` for runs below 1,000): writes stop; the time from the last acknowledged write until
  every daemon's ``GetDigest`` is the same (polled at all daemons at once), then until every VM is
  reported running and the digests agree again (the quiet point); then, with nothing written,
  each daemon's CPU over ``--idle-window`` seconds (% of one core, psutil) and RSS (median and
  max over daemons); then p50/p99 over ``--reads`` calls each of ListHosts, ListClusters,
  GetCluster (a random cluster), GetDom and the owner web page (``/owner``, logged in as the
  admin, who sees every cluster), each call at a random daemon;
* membership transitions the daemons logged (``host X: alive -> suspect``, ``-> dead``, from
  vmwebd/gossip/service.py) in each stretch;
* at the end: kill -9 of the last daemon, restarted at once on its state dir: the time until it
  is READY and until its digest equals the others'.

Every wait is bounded by ``--timeout`` (a creation stretch by ``--create-timeout``); the bench's
processes are killed (their process groups) on any exit. Prints a row per checkpoint as it goes,
a summary table at the end, and writes the figures as JSON with ``--json FILE``.

    .venv/bin/python bench/scale.py --quick                    # 4 daemons, 400 VMs: a few minutes
    .venv/bin/python bench/scale.py --daemons 8 --vms 2000 --json /tmp/scale.json
    .venv/bin/python bench/scale.py                            # 16 daemons, 10,000 VMs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import requests  # noqa: E402

from tests.procs import ADMIN, Daemon, bootstrap_admin, free_port  # noqa: E402
from vmwebd.client import ApiClient, ApiFault  # noqa: E402
from vmwebd.config import DEFAULT_RECONCILE_INTERVAL  # noqa: E402
from vmwebd.demo import write_host_config  # noqa: E402
from vmwebd.gossip import pki  # noqa: E402

TEMPLATE = "tiny"
VM_VCPUS, VM_MEMORY_MIB = 1, 64
CPU_OVERCOMMIT = 4.0  # the default setting `cpu_overcommit`
READ_OPS = ("ListHosts", "ListClusters", "ListClusters HTTP", "GetCluster", "GetDom", "owner page")
# ListClusters POSTed as raw SOAP and its answer read, not parsed: the daemon's share of the time
# (zeep's parsing of a few MB of answer is the client's).
LIST_CLUSTERS_SOAP = (
    b'<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
    b'xmlns:tns="urn:vmweb:api:1"><soapenv:Body><tns:ListClusters/></soapenv:Body>'
    b'</soapenv:Envelope>'
)
TRANSITION = re.compile(r"host (\S+): (\w+) -> (suspect|dead)\b")
LOG_PROBLEM = re.compile(r"\[[^\]]*#(error|critical)\]")  # an entry logged as error or critical
EXCEPTION = re.compile(r"^\s*(?:Failure: )?((?:builtins\.)?[\w.]*(?:Error|Exception|Exit)\b.*)")


# -- small helpers ------------------------------------------------------------------------------
def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def p50_p99_ms(xs) -> tuple[float, float]:
    return (statistics.median(xs) * 1000, pct(xs, 99) * 1000) if xs else (float("nan"), float("nan"))


def fault_code(e: BaseException) -> str:
    return e.code if isinstance(e, ApiFault) else type(e).__name__


def checkpoints_for(vms: int) -> list[int]:
    marks = [m for m in (1000, 2000, 5000, 10000) if m < vms] + [vms]
    if len(marks) == 1:
        marks = sorted({max(1, vms // 4), max(1, vms // 2), vms})
    return marks


def bounded_poll(pred, timeout: float, every: float = 0.2):
    """Calls ``pred`` until it returns a true value (returned with the seconds it took), or
    ``timeout`` passes: then (None, seconds). Exceptions count as false (a host restarting)."""
    t0 = time.monotonic()
    while True:
        try:
            v = pred()
            if v:
                return v, time.monotonic() - t0
        except Exception:  # noqa: BLE001 (a host may be restarting; retried until the deadline)
            pass
        if time.monotonic() - t0 > timeout:
            return None, time.monotonic() - t0
        time.sleep(every)


class GroupDaemon(Daemon):
    """A :class:`tests.procs.Daemon` in its own process group, so that cleaning up kills the group
    (anything it started too), not only the daemon."""

    def __init__(self, *args, **kw):
        super().__init__(*args, own_session=True, **kw)

    def start(self, wait: bool = True) -> "GroupDaemon":
        if self.notify is not None:  # a restart: the old socket goes with the old process
            self.notify.close()
        return super().start(wait)

    def kill9(self) -> None:
        """SIGKILL to the daemon's whole process group; waits (bounded) for the daemon to exit."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def close(self) -> None:
        try:
            if self.proc is not None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                self.proc.wait(30)
        finally:
            if self.notify is not None:
                self.notify.close()
                self.notify = None


# -- the grid -----------------------------------------------------------------------------------
class ScaleGrid:
    def __init__(self, base: Path, args):
        self.base, self.args = base, args
        n = args.daemons
        per_host = math.ceil(args.vms / n)
        # Room for twice each host's even share, so spread placement never runs out.
        self.cpus = max(16, math.ceil(2 * per_host * VM_VCPUS / CPU_OVERCOMMIT))
        self.memory_mib = max(8192, 2 * per_host * VM_MEMORY_MIB + 2048)
        templates = base / "templates"
        templates.mkdir(parents=True)
        (templates / f"{TEMPLATE}.xml").write_text(
            f'<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<template name="{TEMPLATE}" description="Scale bench: N small identical VMs">\n'
            f'  <network mode="isolated" pool="lab"/>\n'
            f'  <role name="node" count="rest" vcpus="{VM_VCPUS}" memory-mib="{VM_MEMORY_MIB}" '
            f'image="debian-12"/>\n</template>\n'
        )
        ca = base / "ca"
        pki.init_ca(ca, grid_name="scale-bench")
        self.ca = ca / "ca.crt"
        api = [free_port() for _ in range(n)]
        peer = [free_port() for _ in range(n)]
        k = n if args.members <= 0 else min(args.members, n)
        members = " ".join(f"host{i + 1}" for i in range(k))
        clusters = math.ceil(args.vms / args.cluster_size)
        self.daemons: list[GroupDaemon] = []
        for i in range(n):
            hid = f"host{i + 1}"
            cert = base / hid / "pki"
            pki.issue_host_cert(ca, hid, cert, ["127.0.0.1"])
            cfg = write_host_config(
                base / hid,
                hid,
                api[i],
                peer[i],
                self.cpus,
                self.memory_mib,
                templates_dir=templates,
                reconcile_interval=args.reconcile_interval,
                max_vms=max(256, args.cluster_size),
                image_mib=16,  # the test driver's pool holds 100 GiB; every overlay counts 16 MiB
                extra=f'<peers seeds="127.0.0.1:{peer[0]}" cert-dir="{cert}" timing="{args.timing}" '
                f'members="{members}"/>',
            )
            cfg.write_text(
                cfg.read_text().replace('max-clusters="1000"', f'max-clusters="{max(1000, 2 * clusters)}"')
            )
            bootstrap_admin(base / hid / "state")
            self.daemons.append(GroupDaemon(cfg, api_port=api[i]))
        self._local = threading.local()
        self._pools: list[ThreadPoolExecutor] | None = None
        self._log_offsets: dict[str, int] = {}

    @property
    def n(self) -> int:
        return len(self.daemons)

    def start(self) -> float:
        t = time.monotonic()
        for d in self.daemons:
            d.start(wait=False)
        for d in self.daemons:
            d.wait_ready(timeout=self.args.timeout)
        return time.monotonic() - t

    def client(self, i: int, timeout: float = 120.0) -> ApiClient:
        """This thread's admin client of host ``i`` (made once per thread: each fetches the WSDL)."""
        cache = self._local.__dict__.setdefault("clients", {})
        c = cache.get(i)
        if c is None:
            c = cache[i] = ApiClient(self.daemons[i].url, timeout=timeout, user=ADMIN[0], password=ADMIN[1])
        return c

    def forget_client(self, i: int) -> None:
        self._local.__dict__.setdefault("clients", {}).pop(i, None)

    def call(self, i: int, op: str, *args):
        try:
            return self.client(i).call(op, *args)
        except ApiFault:
            raise
        except Exception:
            self.forget_client(i)  # a transport error: a fresh client next time
            raise

    def at_all(self, op: str, *args, hosts=None) -> list:
        """``op`` at every host (or ``hosts``) at once; exceptions as values. Each host's calls
        run on that host's own thread, so its client (and WSDL) is made once."""
        hosts = list(range(self.n)) if hosts is None else hosts
        if self._pools is None:
            self._pools = [ThreadPoolExecutor(max_workers=1) for _ in range(self.n)]

        def one(i):
            try:
                return self.call(i, op, *args)
            except Exception as e:  # noqa: BLE001 (returned to the caller)
                return e

        futures = [self._pools[i].submit(one, i) for i in hosts]
        return [f.result(timeout=300) for f in futures]  # each call is bounded by its client's timeout

    def all_alive(self) -> bool:
        views = self.at_all("ListHosts")
        return all(
            not isinstance(v, Exception) and len(v) == self.n and {h["liveness"] for h in v} == {"alive"}
            for v in views
        )

    def digests(self, hosts=None) -> list:
        return self.at_all("GetDigest", hosts=hosts)

    def close(self) -> None:
        for p in self._pools or ():
            p.shutdown(wait=False, cancel_futures=True)
        for d in self.daemons:
            try:
                d.close()
            except Exception as e:  # noqa: BLE001 (clean up the others anyway)
                print(f"  closing {d.config.parent.name}: {e}", file=sys.stderr)

    # -- logs -------------------------------------------------------------------------------------
    def new_log_events(self) -> dict:
        """Membership transitions (observer, host) to suspect and to dead, and problem lines
        (tracebacks, critical or error entries), logged since the previous call."""
        suspect, dead, problems, exceptions = [], [], [], []
        for d in self.daemons:
            name = d.config.parent.name
            if not d.log_path.exists():
                continue
            with open(d.log_path, "rb") as f:  # the log is appended to across restarts
                f.seek(self._log_offsets.get(name, 0))
                data = f.read()
            complete = data.rfind(b"\n") + 1  # a line still being written waits for next time
            self._log_offsets[name] = self._log_offsets.get(name, 0) + complete
            for line in data[:complete].decode("utf-8", "replace").splitlines():
                m = TRANSITION.search(line)
                if m:
                    (suspect if m.group(3) == "suspect" else dead).append((name, m.group(1)))
                if LOG_PROBLEM.search(line):
                    problems.append(f"{name}: {line.strip()[:300]}")
                m = EXCEPTION.match(line)
                if m and line[:1].isspace():  # a traceback's last line
                    exceptions.append(f"{name}: {m.group(1)[:300]}")
        return {"suspect": suspect, "dead": dead, "problems": problems, "exceptions": exceptions}


def same_digest(results) -> str | None:
    ok = [r for r in results if not isinstance(r, Exception)]
    if len(ok) != len(results):
        return None
    ds = {r["digest"] for r in ok}
    return ok[0]["digest"] if len(ds) == 1 else None


# -- the phases ---------------------------------------------------------------------------------
class Bench:
    def __init__(self, grid: ScaleGrid, args):
        self.grid, self.args = grid, args
        self.users = [f"bench{i + 1}" for i in range(args.users)]
        self.password = "bench-user-password"
        self.created: list[str] = []  # cluster names, in acknowledgement order
        self.vms = 0
        self.next_index = 0
        self.rng = random.Random(args.seed)
        self.web: dict[int, requests.Session] = {}
        self.totals = Counter()  # membership transitions since the grid came up

    def setup_users(self) -> None:
        g = self.grid
        for u in self.users:
            g.call(0, "CreateUser", u, self.password, "user", min(100_000, 10 * self.args.vms + 1000))
        want = set(self.users)

        def everywhere():
            return all(
                not isinstance(r, Exception) and want <= {u["name"] for u in r or []}
                for r in g.at_all("ListUsers")
            )

        ok, _ = bounded_poll(everywhere, self.args.timeout)
        if not ok:
            raise RuntimeError(f"the bench users did not reach every host within {self.args.timeout} s")

    # -- writes --------------------------------------------------------------------------------
    def create_until(self, target: int) -> dict:
        """Creates clusters until ``target`` VMs exist (bounded by --create-timeout and a number
        of attempts); returns the stretch's figures."""
        g, args = self.grid, self.args
        lock = threading.Lock()
        lat: list[float] = []
        failures: Counter = Counter()
        state = {"reserved": self.vms, "attempts": 0, "last_ack": None}
        needed = math.ceil((target - self.vms) / args.cluster_size)
        max_attempts = 2 * needed + 20
        deadline = time.monotonic() + args.create_timeout

        def worker():
            while True:
                with lock:
                    if (
                        state["reserved"] >= target
                        or state["attempts"] >= max_attempts
                        or time.monotonic() > deadline
                    ):
                        return
                    count = min(args.cluster_size, target - state["reserved"])
                    state["reserved"] += count
                    state["attempts"] += 1
                    j = self.next_index
                    self.next_index += 1
                name, host, owner = f"c{j:05d}", j % g.n, self.users[j % len(self.users)]
                try:
                    g.client(host)  # made (WSDL fetched) before the clock starts
                except Exception as e:  # noqa: BLE001 (counted like a failed request)
                    with lock:
                        state["reserved"] -= count
                        failures[fault_code(e)] += 1
                    continue
                t = time.perf_counter()
                try:
                    g.call(host, "CreateCluster", name, TEMPLATE, owner, count)
                except Exception as e:  # noqa: BLE001 (counted by faultcode)
                    with lock:
                        state["reserved"] -= count
                        failures[fault_code(e)] += 1
                    continue
                dt = time.perf_counter() - t
                with lock:
                    lat.append(dt)
                    self.created.append(name)
                    self.vms += count
                    state["last_ack"] = time.monotonic()

        t0 = time.monotonic()
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.clients)]
        for th in threads:
            th.start()
        for th in threads:  # each call is bounded by the client's timeout; the loop by deadline
            th.join(args.create_timeout + 300)
        wall = time.monotonic() - t0
        p50, p99 = p50_p99_ms(lat)
        return {
            "vms": self.vms,
            "clusters": len(self.created),
            "create_p50_ms": p50,
            "create_p99_ms": p99,
            "clusters_per_s": len(lat) / wall if wall > 0 else float("nan"),
            "stretch_s": wall,
            "failures": dict(failures),
            "last_ack": state["last_ack"] or time.monotonic(),
        }

    # -- convergence -------------------------------------------------------------------------
    def converge(self, since: float) -> dict:
        """Seconds from ``since`` (the last acknowledged write) until every digest is the same;
        then until every VM runs and the digests agree again. ``None`` if not within --timeout."""
        g, args = self.grid, self.args
        rounds = [0, 0]

        def equal():
            rounds[0] += 1
            d = same_digest(g.digests())
            rounds[1] += d is not None
            return d

        d, _ = bounded_poll(equal, args.timeout, every=0.1)
        t_equal = time.monotonic() - since if d else None

        def running():
            cl = g.call(0, "ListClusters", None) or []
            vms = [v for c in cl for v in c["vms"]]
            return len(vms) == self.vms and all(v["state"] == "running" for v in vms)

        ok, _ = bounded_poll(running, args.timeout, every=0.5)
        t_running = time.monotonic() - since if ok else None
        d2, _ = bounded_poll(equal, args.timeout, every=0.1)
        t_quiet = time.monotonic() - since if (ok and d2) else None
        ents = [r["entities"] for r in g.digests() if not isinstance(r, Exception)]
        return {
            "digests_equal_s": t_equal,
            "all_running_s": t_running,
            "quiet_s": t_quiet,
            "digest_polls": rounds[0],
            "digest_polls_equal": rounds[1],
            "entities": max(ents) if ents else None,
        }

    # -- idle cost --------------------------------------------------------------------------
    def idle(self) -> dict:
        procs = [psutil.Process(d.proc.pid) for d in self.grid.daemons]

        def cpu(p):
            t = p.cpu_times()
            return t.user + t.system

        t0 = time.monotonic()
        before = [cpu(p) for p in procs]
        time.sleep(self.args.idle_window)  # the measurement window itself, nothing else runs
        after = [cpu(p) for p in procs]
        wall = time.monotonic() - t0
        pcts = [100 * (a - b) / wall for a, b in zip(after, before)]
        rss = [p.memory_info().rss / 2**20 for p in procs]
        return {
            "idle_cpu_pct_median": statistics.median(pcts),
            "idle_cpu_pct_max": max(pcts),
            "rss_mib_median": statistics.median(rss),
            "rss_mib_max": max(rss),
            "idle_cpu_pct": pcts,
            "rss_mib": rss,
        }

    # -- reads --------------------------------------------------------------------------------
    def web_session(self, i: int) -> requests.Session:
        s = self.web.get(i)
        if s is None:
            base = self.grid.daemons[i].url
            s = requests.Session()
            page = s.get(base + "/login", timeout=30)
            token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
            r = s.post(
                base + "/login",
                data={"csrf": token, "name": ADMIN[0], "password": ADMIN[1]},
                allow_redirects=False,
                timeout=60,
            )
            if r.status_code != 303:
                raise RuntimeError(f"web login at host{i + 1} answered {r.status_code}")
            self.web[i] = s
        return s

    def reads(self) -> dict:
        g, rng = self.grid, self.rng
        for i in range(g.n):  # log in (scrypt) and fetch the WSDLs before timing
            self.web_session(i)
            g.client(i)
        out, errors = {}, Counter()
        for op in READ_OPS:
            times = []
            for _ in range(self.args.reads):
                i = rng.randrange(g.n)
                t = time.perf_counter()
                try:
                    if op == "owner page":
                        r = self.web_session(i).get(g.daemons[i].url + "/owner", timeout=120)
                        if r.status_code != 200:
                            raise RuntimeError(f"HTTP {r.status_code}")
                    elif op == "GetCluster":
                        g.call(i, op, rng.choice(self.created))
                    elif op == "ListClusters":
                        g.call(i, op, None)
                    elif op == "ListClusters HTTP":
                        r = requests.post(
                            g.daemons[i].url + "/soap",
                            data=LIST_CLUSTERS_SOAP,
                            auth=ADMIN,
                            headers={
                                "Content-Type": "text/xml; charset=utf-8",
                                "SOAPAction": '"ListClusters"',
                            },
                            timeout=120,
                        )
                        if r.status_code != 200 or b"ListClustersResponse" not in r.content:
                            raise RuntimeError(f"HTTP {r.status_code}")
                    else:
                        g.call(i, op)
                except Exception as e:  # noqa: BLE001 (counted)
                    errors[f"{op}: {fault_code(e)}"] += 1
                    continue
                times.append(time.perf_counter() - t)
            out[op] = p50_p99_ms(times)
        return {"reads_ms": out, "read_errors": dict(errors)}

    def events_since_last(self) -> dict:
        ev = self.grid.new_log_events()
        for k in ("suspect", "dead"):
            self.totals[k] += len(ev[k])
        return ev

    # -- kill -9 and restart -----------------------------------------------------------------
    def kill_and_restart(self) -> dict:
        g, args = self.grid, self.args
        i = g.n - 1
        d = g.daemons[i]
        d.kill9()
        t0 = time.monotonic()
        d.start(wait=False)
        d.wait_ready(timeout=args.timeout)
        ready = time.monotonic() - t0

        def caught_up():
            return same_digest(g.digests())

        ok, _ = bounded_poll(caught_up, args.timeout, every=0.1)
        converged = time.monotonic() - t0 if ok else None

        def seen_alive():
            views = g.at_all("ListHosts")
            return all(
                not isinstance(v, Exception)
                and {h["id"]: h["liveness"] for h in v}.get(f"host{i + 1}") == "alive"
                for v in views
            )

        ok2, _ = bounded_poll(seen_alive, args.timeout, every=0.2)
        alive = time.monotonic() - t0 if ok2 else None
        return {"host": f"host{i + 1}", "ready_s": ready, "digest_equal_s": converged, "seen_alive_s": alive}


# -- report -------------------------------------------------------------------------------------
def fmt(x, spec=".2f", none="—"):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def pair(p, spec=".0f"):
    return f"{fmt(p[0], spec)}/{fmt(p[1], spec)}"


HEADER = (
    f"{'VMs':>6} {'create p50/p99 ms':>17} {'cl/s':>5} {'fail':>4} {'equal s':>7} {'quiet s':>7} "
    f"{'CPU% med/max':>12} {'RSS MiB med/max':>15} "
    + " ".join(f"{op + ' ms':>14}" for op in READ_OPS)
    + f" {'susp/dead':>9}"
)


def row(cp: dict) -> str:
    fails = sum(cp["failures"].values())
    reads = cp.get("reads_ms", {})
    return (
        f"{cp['vms']:>6} {pair((cp['create_p50_ms'], cp['create_p99_ms'])):>17} "
        f"{fmt(cp['clusters_per_s'], '.1f'):>5} {fails:>4} {fmt(cp['digests_equal_s'], '.1f'):>7} "
        f"{fmt(cp['quiet_s'], '.1f'):>7} "
        f"{pair((cp['idle_cpu_pct_median'], cp['idle_cpu_pct_max']), '.1f'):>12} "
        f"{pair((cp['rss_mib_median'], cp['rss_mib_max'])):>15} "
        + " ".join(f"{pair(reads.get(op, (None, None))):>14}" for op in READ_OPS)
        + f" {str(cp['suspicions']) + '/' + str(cp['deaths']):>9}"
    )


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--daemons", type=int, default=16)
    ap.add_argument("--vms", type=int, default=10_000)
    ap.add_argument("--cluster-size", type=int, default=50)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--users", type=int, default=4, help="cluster owners, used in turn")
    ap.add_argument("--idle-window", type=float, default=60.0, help="seconds of idle CPU measurement")
    ap.add_argument("--reads", type=int, default=50, help="calls of each read operation per checkpoint")
    ap.add_argument("--timeout", type=float, default=300.0, help="bound of every wait, seconds")
    ap.add_argument("--create-timeout", type=float, default=1800.0, help="bound of one creation stretch")
    ap.add_argument("--members", type=int, default=5, help="consensus members: the first K hosts (0: all)")
    ap.add_argument("--timing", choices=["local", "lan"], default="lan", help="gossip timing preset")
    ap.add_argument(
        "--reconcile-interval",
        type=float,
        default=DEFAULT_RECONCILE_INTERVAL,
        help="the reconciler's full pass (default: the daemon's own default)",
    )
    ap.add_argument("--checkpoints", type=int, nargs="+", help="VM counts to stop and measure at")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the daemons' directories (logs, state)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a small run: --daemons 4 --vms 400 --cluster-size 50 --idle-window 10",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.daemons, args.vms, args.cluster_size, args.idle_window = 4, 400, 50, 10.0
    if args.daemons < 2 or args.vms < 1 or args.cluster_size < 1 or args.clients < 1:
        ap.error("need --daemons >= 2, --vms, --cluster-size and --clients >= 1")
    if args.vms > 60_000:
        ap.error("--vms above 60,000 does not fit the address pool (10.77.0.0/16)")
    if math.ceil(args.vms / args.cluster_size) > 3_900:
        ap.error("more than 3,900 clusters do not fit the network ids (100-4095)")
    return args


def code_version() -> str:
    """The commit the daemons run, and whether the working tree differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "vmwebd"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head + (f" + {len(dirty.splitlines())} changed files in vmwebd/" if dirty else "")


def main(argv=None) -> int:
    args = parse_args(argv)
    marks = sorted(set(args.checkpoints or checkpoints_for(args.vms)))
    marks = [m for m in marks if 0 < m <= args.vms]
    base = Path(tempfile.mkdtemp(prefix="vmweb-bench-scale-"))

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)  # runs the finally below: the daemons are killed

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    grid = None
    failed = True
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("json",)}, "checkpoints": []}
    try:
        grid = ScaleGrid(base, args)
        result["config"].update(
            host_cpus=grid.cpus,
            host_memory_mib=grid.memory_mib,
            machine_cpus=len(os.sched_getaffinity(0)),
            code=code_version(),
        )
        print(
            f"{args.daemons} daemons on 127.0.0.1 ({grid.cpus} CPUs, {grid.memory_mib} MiB each, "
            f"test driver), {args.vms} VMs in clusters of {args.cluster_size} ({TEMPLATE}: "
            f"{VM_VCPUS} vCPU, {VM_MEMORY_MIB} MiB), {args.clients} clients, timing {args.timing}, "
            f"consensus members {args.members or args.daemons}, "
            f"reconcile interval {args.reconcile_interval:g} s, checkpoints {marks}; code {result['config']['code']}; "
            f"dir {base}",
            flush=True,
        )
        started = grid.start()
        ok, t_alive = bounded_poll(grid.all_alive, args.timeout, every=0.5)
        if not ok:
            raise RuntimeError(
                f"the {grid.n} daemons did not all see each other alive within {args.timeout} s"
            )
        print(
            f"grid up: every daemon READY after {started:.1f} s, all alive everywhere {t_alive:.1f} s later",
            flush=True,
        )
        result["startup"] = {"ready_s": started, "all_alive_s": t_alive}
        bench = Bench(grid, args)
        bench.setup_users()
        startup_ev = bench.events_since_last()  # transitions while starting are not the run's
        result["startup"].update(suspicions=len(startup_ev["suspect"]), deaths=len(startup_ev["dead"]))
        print("\n" + HEADER, flush=True)
        for mark in marks:
            cp = bench.create_until(mark)
            last_ack = cp.pop("last_ack")
            cp.update(bench.converge(last_ack))
            cp.update(bench.idle())
            cp.update(bench.reads())
            ev = bench.events_since_last()
            cp.update(
                suspicions=len(ev["suspect"]),
                deaths=len(ev["dead"]),
                suspect_events=ev["suspect"],
                dead_events=ev["dead"],
                log_problems=len(ev["problems"]),
                log_exceptions=ev["exceptions"],
            )
            result["checkpoints"].append(cp)
            print(row(cp), flush=True)
            for what in ("failures", "read_errors"):
                if cp[what]:
                    print(f"       {what}: {cp[what]}", flush=True)
            gone = [
                f"{d.config.parent.name} (exit {d.proc.returncode})" for d in grid.daemons if not d.alive()
            ]
            if gone:
                raise RuntimeError(
                    f"daemons exited during the run: {', '.join(gone)}; see their logs in {base}"
                )
            if ev["problems"] or ev["exceptions"]:
                kinds = Counter(e.split(": ", 1)[1] for e in ev["exceptions"])
                print(
                    f"       {len(ev['problems'])} error/critical log entries; exceptions: "
                    + "; ".join(f"{k} (x{n})" for k, n in kinds.most_common(5)),
                    flush=True,
                )
            if cp["vms"] < mark:
                print(
                    f"       stopped short of {mark} VMs (attempts or --create-timeout used up)", flush=True
                )
                break
        rs = bench.kill_and_restart()
        ev = bench.events_since_last()
        rs.update(
            suspicions=len(ev["suspect"]),
            deaths=len(ev["dead"]),
            log_problems=len(ev["problems"]),
            log_exceptions=ev["exceptions"],
        )
        result["restart"] = rs
        result["membership_total"] = {
            "suspicions": bench.totals["suspect"] - result["startup"]["suspicions"],
            "deaths": bench.totals["dead"] - result["startup"]["deaths"],
        }
        report(result, args)
        failed = False
    finally:
        if grid is not None:
            grid.close()
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2, default=str))
            print(f"figures written to {args.json}")
        if args.keep or failed:
            print(f"daemons' directories kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


def report(result: dict, args) -> None:
    print(
        f"\nSummary: {args.daemons} daemons, {len(os.sched_getaffinity(0))} CPUs on this machine; latencies in ms "
        f"(p50/p99); 'equal s': last write → every GetDigest equal; 'quiet s': → every VM running "
        f"and the digests equal again; CPU and RSS per daemon over {args.idle_window:.0f} s idle; reads "
        f"over {args.reads} calls each at random daemons; susp/dead: membership transitions logged "
        f"in the stretch"
    )
    print(HEADER)
    for cp in result["checkpoints"]:
        print(row(cp))
    rs = result["restart"]
    print(
        f"\nkill -9 of {rs['host']} and restart on its state dir: READY after {fmt(rs['ready_s'], '.1f')} s, "
        f"its digest equal to the others' after {fmt(rs['digest_equal_s'], '.1f')} s, seen alive everywhere "
        f"after {fmt(rs['seen_alive_s'], '.1f')} s; {rs['suspicions']} suspicions and {rs['deaths']} deaths "
        f"logged meanwhile"
    )
    tot = result["membership_total"]
    print(
        f"membership transitions during the whole run: {tot['suspicions']} to suspect, {tot['deaths']} to dead"
    )


if __name__ == "__main__":
    sys.exit(main())
