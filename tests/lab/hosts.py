"""N real libvirt hosts on this machine, each in its own network and mount namespaces.

A host ``hN`` of a lab numbered ``k`` is:

* a network namespace ``vmwlab-k<k>-hN`` with ``lo`` up and a bridge ``br0`` holding ``eth0`` (one
  end of a veth pair whose other end, ``vwl<k>hN``, sits on the lab's bridge ``vwl<k>br`` in the
  root namespace); ``br0`` has the host's address ``10.77.<k>.N/24``. Guests' NICs go on ``br0``,
  so guests and hosts of one lab share one L2 segment, and nothing leaves this machine;
* a private mount namespace in which per-host directories (``<workdir>/hN/{etc,run,lib,cache,log}``)
  are bind-mounted over ``/etc/libvirt``, ``/run/libvirt``, ``/var/lib/libvirt``,
  ``/var/cache/libvirt`` and ``/var/log/libvirt``: the same path is a different file on each host,
  so storage copies between hosts are real;
* its own ``libvirtd`` (foreground, started as ``ip netns exec NS unshare -m --propagation private
  sh -c 'mount --bind ...; exec libvirtd -f ...'``, so the Popen's pid is libvirtd's), whose
  sockets are in ``<workdir>/hN/sock``: outside the bind-mounted directories, on the filesystem all
  namespaces share, so a client in the root namespace reaches it as
  ``qemu+unix:///system?socket=<workdir>/hN/sock/libvirt-sock``.

Anything else that has to run "on" a host (a vmwebd, qemu-img on its images, a test reading a
disk) runs through :meth:`LabHost.popen`/:meth:`LabHost.run`: ``nsenter -t <libvirtd pid> -n -m``.

Peer-to-peer migration: the source libvirtd, inside its own namespaces, connects to
:attr:`LabHost.migrate_uri` of the destination, which is the same ``qemu+unix`` URI: a pathname
unix socket is reached through the filesystem, whatever the caller's network namespace (only
abstract sockets are per network namespace), and the socket directory is not under the
bind-mounted paths. The migration stream and the NBD storage copy then go from the source QEMU to
the destination's ``migration_address`` (its 10.77.k.N) over the veths and the root bridge.
No TCP listener of libvirtd is needed.

A lab is recorded under ``/run/vmwlab`` (its number k, its owner's pid) while it runs; a new lab
first removes what any lab whose owner died left behind (its processes, found through
``ip netns pids``, its namespaces and its bridge), so a crashed run does not break the next.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from . import CACHE

RUNTIME = Path("/run/vmwlab")
NS_PREFIX = "vmwlab-"
#: The five libvirt directories each host gets its own copy of: inner path -> subdir of its root.
BIND_DIRS = {
    "/etc/libvirt": "etc",
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/cache/libvirt": "cache",
    "/var/log/libvirt": "log",
}
CAPS_CACHE = CACHE / "libvirt-caps"
IMAGES_DIR = "/var/lib/libvirt/images"
#: Where libvirtd writes QEMU's logs; made at start, so guests' serial logs can go there too.
LOG_DIR = "/var/log/libvirt/qemu"
_BINARIES = ("ip", "libvirtd", "qemu-system-x86_64", "qemu-img", "nsenter", "unshare")


def _quiet_libvirt() -> None:
    """Stops libvirt printing every error it raises on stderr (they are raised as exceptions)."""
    try:
        import libvirt
    except ImportError:
        return
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


_quiet_libvirt()


def _sh(*argv, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def lab_available() -> tuple[bool, str]:
    """Whether this machine can run a lab, and if not a reason that says what is missing."""
    if os.environ.get("VMWEB_REALHOSTS", "").strip() == "0":
        return False, "real-host tier disabled by VMWEB_REALHOSTS=0"
    if os.geteuid() != 0:
        return False, "real-host tier needs root (network namespaces, bind mounts, libvirtd)"
    missing = [b for b in _BINARIES if shutil.which(b) is None]
    if missing:
        return False, (f"real-host tier needs {', '.join(missing)} (bash scripts/bootstrap.sh installs them)")
    if not Path("/bin/busybox").exists():
        return False, "real-host tier needs busybox-static (the guest's userland)"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return False, "real-host tier needs the libvirt Python binding"
    r = subprocess.run(["unshare", "-n", "-m", "true"], capture_output=True, text=True)
    if r.returncode != 0:
        return False, f"cannot make network/mount namespaces here: {r.stderr.strip()}"
    if _sh("ip", "netns", "list", check=False).returncode != 0:
        return False, "`ip netns` does not work here"
    return True, ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_pids(ns: str) -> list[int]:
    r = _sh("ip", "netns", "pids", ns, check=False)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def _kill_netns(ns: str, grace: float = 3.0) -> None:
    """Ends every process in network namespace ``ns``: SIGTERM, then SIGKILL after ``grace``."""
    pids = _netns_pids(ns)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) and not _zombie(p) for p in pids):
        time.sleep(0.05)
    for pid in _netns_pids(ns):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _list_netns() -> list[str]:
    r = _sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def _remove_lab_k(k: int) -> None:
    """Removes what lab number ``k`` left: its processes, namespaces, bridge and record."""
    for ns in [n for n in _list_netns() if n.startswith(f"{NS_PREFIX}k{k}-")]:
        _kill_netns(ns)
        _sh("ip", "netns", "del", ns, check=False)
    for i in range(1, 64):
        if Path(f"/sys/class/net/vwl{k}h{i}").exists():
            _sh("ip", "link", "del", f"vwl{k}h{i}", check=False)
    if Path(f"/sys/class/net/vwl{k}br").exists():
        _sh("ip", "link", "del", f"vwl{k}br", check=False)
    (RUNTIME / f"k{k}.json").unlink(missing_ok=True)


class LabHost:
    """One libvirt host of a :class:`Lab`."""

    def __init__(self, lab: "Lab", index: int):
        self.lab = lab
        self.index = index
        self.name = f"h{index}"
        self.netns = f"{NS_PREFIX}k{lab.k}-{self.name}"
        self.addr = f"10.77.{lab.k}.{index}"
        self.root = lab.workdir / self.name
        self.sock_dir = self.root / "sock"
        if len(str(self.sock_dir / "libvirt-admin-sock")) > 100:  # sun_path holds 108 bytes
            raise ValueError(f"lab workdir {lab.workdir} is too long for unix socket paths")
        self.uri = f"qemu+unix:///system?socket={self.sock_dir}/libvirt-sock"
        #: What a source libvirtd (in its own namespaces) dials for PEER2PEER: see the module doc.
        self.migrate_uri = self.uri
        self.images_dir = IMAGES_DIR
        self.host_uuid = str(uuid.uuid4())
        self.libvirtd_pid: int | None = None
        self._proc: subprocess.Popen | None = None
        self._conn = None

    def __repr__(self):
        return f"<LabHost {self.name} {self.addr} pid={self.libvirtd_pid}>"

    # -- files --------------------------------------------------------------------------------
    def host_path(self, inner: str) -> Path:
        """The root-namespace path of the file this host sees at ``inner``."""
        inner = os.path.normpath(inner)
        for prefix, sub in BIND_DIRS.items():
            if inner == prefix or inner.startswith(prefix + "/"):
                return self.root / sub / os.path.relpath(inner, prefix)
        return Path(inner)  # not bind-mounted: the same file in every namespace

    # -- processes on the host ---------------------------------------------------------------
    def _enter(self, argv) -> list[str]:
        if self.libvirtd_pid is None:
            raise RuntimeError(f"{self.name} is not running")
        return ["nsenter", "-t", str(self.libvirtd_pid), "-n", "-m", "--", *map(str, argv)]

    def popen(self, argv, **kw) -> subprocess.Popen:
        """Starts ``argv`` inside this host's network and mount namespaces."""
        return subprocess.Popen(self._enter(argv), **kw)

    def run(self, argv, **kw) -> subprocess.CompletedProcess:
        """Runs ``argv`` inside this host's namespaces (kw as for subprocess.run; ``check`` and
        ``capture_output`` default to True, output as text)."""
        kw.setdefault("check", True)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self._enter(argv), **kw)

    def slow_migrations(self, mbit: int | None) -> None:
        """Limits what this host sends to libvirt's migration ports (QEMU's memory stream and the
        NBD storage copy, ports 49152-49215 at the destination) to ``mbit`` Mbit/s, as a slow link
        would; the hosts' other traffic (the vmwebd peers, the CLI) keeps its pace. ``None`` lifts
        the limit. A link is slowed rather than QEMU's own ``migrateSetMaxSpeed``: with QEMU 7.2
        under TCG, a long live move can leave the guest's memory corrupt at the destination (a
        general protection fault in the slab allocator and a kernel panic within a second of its
        arrival), in 5 of 7 moves throttled by QEMU and 2 of 13 over a link slowed this way
        (16-32 Mbit/s, some tens of seconds; counted on 2026-12-03). Tests that slow a move check
        what vmweb decides, and the guest's own counter only where its kernel did not panic."""
        dev = ("dev", "eth0")
        self.run(["tc", "qdisc", "del", *dev, "root"], check=False)  # none yet: an error, ignored
        if mbit is None:
            return
        # htb (this kernel has htb and tbf, not prio): what the filter does not classify goes
        # unshaped (no default class), migration traffic through class 1:30.
        self.run(["tc", "qdisc", "add", *dev, "root", "handle", "1:", "htb"])
        self.run(
            ["tc", "class", "add", *dev, "parent", "1:", "classid", "1:30", "htb", "rate", f"{mbit}mbit"]
        )
        self.run(
            ["tc", "filter", "add", *dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
             "match", "ip", "dport", "49152", "0xffc0", "flowid", "1:30"]
        )  # fmt: skip

    # -- libvirt -----------------------------------------------------------------------------
    def connect(self):
        """A new libvirt connection to this host's libvirtd (the caller closes it)."""
        import libvirt

        return libvirt.open(self.uri)

    @property
    def conn(self):
        """A connection kept by the lab for this host (closed by :meth:`Lab.stop`)."""
        if self._conn is None:
            self._conn = self.connect()
        return self._conn

    # -- set-up --------------------------------------------------------------------------------
    def _write_config(self) -> None:
        if self.root.exists():  # a previous lab's host: start afresh
            shutil.rmtree(self.root)
        for sub in BIND_DIRS.values():
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.sock_dir.mkdir(parents=True, exist_ok=True)
        self.host_path(IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        self.host_path(LOG_DIR).mkdir(parents=True, exist_ok=True)
        etc = self.root / "etc"
        (etc / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{self.sock_dir}"\n'
            'unix_sock_group = "root"\n'
            'unix_sock_rw_perms = "0770"\n'
            'auth_unix_rw = "none"\n'
            'auth_unix_ro = "none"\n'
            "listen_tcp = 0\n"
            "listen_tls = 0\n"
            f'host_uuid = "{self.host_uuid}"\n'
            'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
        )
        if self.lab.qemu_user:
            # A stock host's account and DAC rules (the distribution's qemu.conf defaults):
            # libvirtd gives QEMU the files a domain names while it runs, and remembers (in
            # extended attributes) whom to give them back to.
            account = (
                f'user = "{self.lab.qemu_user}"\ngroup = "{self.lab.qemu_user}"\ndynamic_ownership = 1\n'
            )
        else:
            account = 'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\n'
        (etc / "qemu.conf").write_text(
            account + 'security_driver = "none"\n'
            'stdio_handler = "file"\n'
            "cgroup_controllers = [ ]\n"
            "namespaces = [ ]\n"
            f'migration_host = "{self.addr}"\n'
            f'migration_address = "{self.addr}"\n'
        )

    def _setup_net(self) -> None:
        k, i = self.lab.k, self.index
        outer, peer = f"vwl{k}h{i}", f"vwl{k}h{i}p"
        _sh("ip", "netns", "add", self.netns)
        _sh("ip", "link", "add", outer, "type", "veth", "peer", "name", peer)
        _sh("ip", "link", "set", peer, "netns", self.netns)
        _sh("ip", "link", "set", outer, "master", self.lab.bridge, "up")
        ns = ("ip", "-n", self.netns)
        _sh(*ns, "link", "set", "lo", "up")
        _sh(*ns, "link", "set", peer, "name", "eth0")
        _sh(*ns, "link", "add", "br0", "type", "bridge")
        _sh(*ns, "link", "set", "br0", "type", "bridge", "forward_delay", "0")
        _sh(*ns, "link", "set", "eth0", "master", "br0", "up")
        _sh(*ns, "addr", "add", f"{self.addr}/24", "dev", "br0")
        _sh(*ns, "link", "set", "br0", "up")

    def _start_libvirtd(self) -> None:
        mounts = "; ".join(
            f"mkdir -p {inner} && mount --bind {self.root / sub} {inner}" for inner, sub in BIND_DIRS.items()
        )
        script = f"set -e; {mounts}; exec libvirtd -f /etc/libvirt/libvirtd.conf -p /run/libvirt/libvirtd.pid"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LIBVIRT", "VIR_"))}
        out = open(self.root / "libvirtd.out", "ab")
        self._proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        out.close()
        self.libvirtd_pid = self._proc.pid

    def _wait_ready(self, deadline: float) -> None:
        """Waits for the socket, then for a connection that answers with QEMU's capabilities
        (which makes libvirtd probe QEMU, or load the probe's cache)."""
        import libvirt

        sock = self.sock_dir / "libvirt-sock"
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"libvirtd of {self.name} exited ({self._proc.returncode}): {self._log_tail()}"
                )
            if sock.exists():
                try:
                    conn = libvirt.open(self.uri)
                    try:
                        conn.getDomainCapabilities(None, "x86_64", None, "qemu", 0)
                    finally:
                        conn.close()
                    return
                except libvirt.libvirtError as e:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"libvirtd of {self.name} does not answer: {e}") from e
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd of {self.name} made no socket: {self._log_tail()}")
            time.sleep(0.05)

    def _log_tail(self) -> str:
        text = ""
        for p in (self.root / "libvirtd.out", self.host_path("/var/log/libvirt/libvirtd.log")):
            try:
                text += p.read_text(errors="replace")[-1500:]
            except OSError:
                pass
        return text.strip()

    def _define_pool(self) -> None:
        import libvirt

        conn = self.conn
        try:
            pool = conn.storagePoolLookupByName("default")
        except libvirt.libvirtError:
            pool = None
        if pool is not None:
            if not pool.isActive():
                pool.create(0)
            return
        pool = conn.storagePoolDefineXML(
            f"<pool type='dir'><name>default</name><target><path>{IMAGES_DIR}</path></target></pool>", 0
        )
        pool.create(0)

    def _stop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None
        # QEMUs first (SIGTERM: they exit at once), then libvirtd, then anything left.
        if self._proc is not None and self._proc.poll() is None:
            for pid in _netns_pids(self.netns):
                if pid != self._proc.pid:
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        _kill_netns(self.netns)
        _sh("ip", "netns", "del", self.netns, check=False)


class Lab:
    """N libvirt hosts (see the module doc). A context manager: ``with Lab(2, workdir) as lab:``.

    ``lab.hosts[0]`` is h1 (address 10.77.k.1). :meth:`start` brings the hosts up (the network
    first, then every libvirtd at once when QEMU's capability probe is cached, else h1 first and
    its probe copied to the others); :meth:`stop` ends every process the lab started (libvirtd,
    QEMU, whatever ran through :meth:`LabHost.popen`), deletes the namespaces, veths and bridge.
    Each host's files are ``<workdir>/hN`` (emptied at start); the workdir is left for the caller
    after stop (images, logs).

    ``qemu_user``: run QEMU as that account with the distribution's DAC rules (``user``/``group``
    that account, ``dynamic_ownership = 1``), as a stock host does; by default QEMU runs as root.
    """

    def __init__(
        self,
        n: int = 2,
        workdir: Path | str | None = None,
        caps_cache: Path | None = CAPS_CACHE,
        qemu_user: str | None = None,
    ):
        if not 1 <= n <= 60:
            raise ValueError("a lab has 1 to 60 hosts")
        self.n = n
        self.workdir = Path(workdir) if workdir else None
        self.caps_cache = caps_cache
        self.qemu_user = qemu_user
        self.k: int | None = None
        self.bridge: str | None = None
        self.hosts: list[LabHost] = []
        self.timings: dict[str, float] = {}
        self._started = False

    def __enter__(self) -> "Lab":
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def __getitem__(self, i: int) -> LabHost:
        return self.hosts[i]

    # -- claiming a lab number -----------------------------------------------------------------
    def _claim(self) -> None:
        RUNTIME.mkdir(parents=True, exist_ok=True)
        with open(RUNTIME / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            live = set()
            for rec in RUNTIME.glob("k*.json"):
                try:
                    info = json.loads(rec.read_text())
                    k = int(info["k"])
                except (OSError, ValueError, KeyError):
                    rec.unlink(missing_ok=True)
                    continue
                if _alive(int(info.get("owner", 0))):
                    live.add(k)
                else:
                    _remove_lab_k(k)
            # Namespaces with our prefix that no live lab owns: a crash before the record, or a
            # record lost. Remove them too.
            for ns in _list_netns():
                if ns.startswith(NS_PREFIX + "k"):
                    try:
                        k = int(ns[len(NS_PREFIX) + 1 :].split("-")[0])
                    except ValueError:
                        continue
                    if k not in live:
                        _remove_lab_k(k)
            k = next((k for k in range(1, 255) if k not in live), None)
            if k is None:
                raise RuntimeError("254 labs are running")
            self.k = k
            self.bridge = f"vwl{k}br"
            (RUNTIME / f"k{k}.json").write_text(
                json.dumps({"k": k, "owner": os.getpid(), "workdir": str(self.workdir)})
            )

    # -- start / stop ------------------------------------------------------------------------
    def start(self) -> "Lab":
        ok, why = lab_available()
        if not ok:
            raise RuntimeError(why)
        t0 = time.monotonic()
        if self.workdir is None:
            import tempfile

            self.workdir = Path(tempfile.mkdtemp(prefix="vmwlab-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._claim()
        self._started = True
        atexit.register(self.stop)
        try:
            self.hosts = [LabHost(self, i) for i in range(1, self.n + 1)]
            _sh("ip", "link", "add", self.bridge, "type", "bridge")
            _sh("ip", "link", "set", self.bridge, "type", "bridge", "forward_delay", "0")
            _sh("ip", "link", "set", self.bridge, "up")
            for h in self.hosts:
                h._write_config()
                h._setup_net()
            self.timings["network"] = time.monotonic() - t0
            deadline = time.monotonic() + 60
            cached = self._seed_caps(self.hosts)
            first = self.hosts if cached else self.hosts[:1]
            self._start_hosts(first, deadline)
            if not cached:
                self._save_caps(self.hosts[0])
                self._seed_caps(self.hosts[1:])
                self._start_hosts(self.hosts[1:], deadline)
            for h in self.hosts:
                h._define_pool()
            self.timings["caps_cached"] = float(cached)
            self.timings["start"] = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise
        return self

    def _start_hosts(self, hosts, deadline) -> None:
        for h in hosts:
            h._start_libvirtd()
        if len(hosts) == 1:
            hosts[0]._wait_ready(deadline)
            return
        with concurrent.futures.ThreadPoolExecutor(len(hosts)) as ex:
            for f in [ex.submit(h._wait_ready, deadline) for h in hosts]:
                f.result()

    def _seed_caps(self, hosts) -> bool:
        """Puts a saved QEMU capability probe in each host's cache; False if none is saved.
        (libvirtd checks it against the QEMU and libvirtd binaries and probes again if stale.)"""
        src = self.caps_cache
        files = sorted(src.glob("*.xml")) if src and src.is_dir() else []
        if not files:
            return False
        for h in hosts:
            dest = h.host_path("/var/cache/libvirt/qemu/capabilities")
            dest.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copyfile(f, dest / f.name)
        return True

    def _save_caps(self, host: LabHost) -> None:
        files = list(host.host_path("/var/cache/libvirt/qemu/capabilities").glob("*.xml"))
        if not files or not self.caps_cache:
            return
        self.caps_cache.mkdir(parents=True, exist_ok=True)
        for f in files:
            tmp = self.caps_cache / (f.name + ".tmp")
            shutil.copyfile(f, tmp)
            os.replace(tmp, self.caps_cache / f.name)

    def stop(self) -> None:
        """Ends the lab's processes and removes its namespaces, veths and bridge. Idempotent."""
        if not self._started:
            return
        self._started = False
        atexit.unregister(self.stop)
        with concurrent.futures.ThreadPoolExecutor(max(1, len(self.hosts))) as ex:
            list(ex.map(lambda h: h._stop(), self.hosts))
        with open(RUNTIME / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _remove_lab_k(self.k)
