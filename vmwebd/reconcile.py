"""Each host converges its hypervisor to the DOM, for the VMs the DOM assigns to it.

The DOM holds desired state (a VM's host and desired power state, written by whoever took the
request) and observed state (a VM's ``status`` part, written only by the host that runs it). One
pass of :class:`Reconciler`:

1. ensures the network of every cluster with VMs here, and removes networks no VM here needs;
2. for each VM assigned here: creates its overlay and domain and starts it (``running``), shuts it
   down (``stopped``), or destroys it, deletes its overlay, gives back its addresses and deletes it
   from the DOM (``absent``); a VM found stopped or missing behind our back is started again and
   the restart is counted in its status;
3. destroys domains of ours that the DOM no longer knows (orphans), and
4. deletes clusters being destroyed once no VM of theirs is left, giving back name and network id.

Passes never overlap; a kick during a pass schedules one more. All hypervisor calls go through the
driver, which runs them off the reactor thread.
"""
from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from twisted.internet import defer, task
from twisted.logger import Logger

from vmwebd.dom.records import LeaseRec, MigrationRec, VClusterRec, VmRec, VmStatus, status_of
from vmwebd.errors import VmwebError
from vmwebd.hv.driver import DomainSpec
from vmwebd.lease.allocator import parse_holder
from vmwebd.migrate.state import STALE_MS, TERMINAL, in_flight

log = Logger()
PREFIX = "vmweb-"


def domain_name(vm_id: str) -> str:
    cluster, _, name = vm_id.partition("/")
    return f"{PREFIX}{cluster}-{name}"


def volume_name(vm_id: str) -> str:
    return domain_name(vm_id) + ".qcow2"


def network_name(cluster: str) -> str:
    return f"{PREFIX}{cluster}"


def bridge_name(vni: int) -> str:
    return f"vmbr{vni}"


@dataclass(frozen=True)
class StorageLayout:
    pool: str                      # libvirt storage pool holding base images and overlays
    dir: str = ""                  # its directory
    console_dir: str = ""          # where guests' serial consoles are logged (real guests only)


def guest_token(vm_id: str) -> str:
    """A per-VM value handed to the guest on its kernel command line (tests find it on disk)."""
    return hashlib.sha256(vm_id.encode()).hexdigest()[:16]


class Reconciler:
    def __init__(self, host_id: str, domsvc, driver, allocator, storage: StorageLayout,
                 clock, now_ms, interval: float = 5.0, images=None, ip_pools=()):
        self.host_id = host_id
        self.images = images
        self.ip_pools = tuple(ip_pools)
        self.domsvc = domsvc
        self.dom = domsvc.dom
        self.driver = driver
        self.allocator = allocator
        self.storage = storage
        self.clock = clock
        self.now_ms = now_ms
        self.interval = interval
        self.status_batch = 16
        # Longer than any request takes between leasing and recording what the leases are for.
        self.lease_grace_s = 300.0
        self._running = False
        self._again = False
        self._scheduled = None
        self._loop = None
        self.passes = 0
        self._idle_waiters: list[defer.Deferred] = []

    # -- scheduling -----------------------------------------------------------------------
    def start(self) -> None:
        self._loop = task.LoopingCall(self.kick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)
        self.dom.subscribe(self._on_change)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()

    def _on_change(self, kind: str, id_: str) -> None:
        if kind in ("vm", "vcluster", "migration"):
            self.kick()

    def kick(self) -> None:
        """Asks for a pass soon (coalesced with other kicks)."""
        if self._running:
            self._again = True
            return
        if self._scheduled is None or not self._scheduled.active():
            self._scheduled = self.clock.callLater(0, self._run)

    def settled(self) -> defer.Deferred:
        """Fires after the next complete pass that started after this call."""
        d = defer.Deferred()
        self._idle_waiters.append(d)
        self.kick()
        return d

    @defer.inlineCallbacks
    def _run(self):
        self._running = True
        waiters, self._idle_waiters = self._idle_waiters, []
        try:
            while True:
                self._again = False
                try:
                    yield self.run_once()
                except Exception:
                    log.failure("reconcile pass on {host} failed", host=self.host_id)
                if not self._again:
                    break
                waiters += self._idle_waiters
                self._idle_waiters = []
        finally:
            self._running = False
        for d in waiters:
            d.callback(None)

    # -- one pass -------------------------------------------------------------------------
    @defer.inlineCallbacks
    def run_once(self):
        self.passes += 1
        # VMs being moved belong to their migration until it ends: leave them (and their
        # domains, here as source or destination) alone.
        moving = in_flight(self.dom, self.now_ms())
        moving_domains = {domain_name(v) for v in moving}
        mine = [vm for vm in self.dom.all(VmRec) if vm.host == self.host_id and vm.id not in moving]
        clusters = {c.id: c for c in self.dom.all(VClusterRec)}
        domains = {d.name: d for d in (yield self.driver.list_domains())}

        # 1. networks
        want_nets = {}
        for vm in mine:
            c = clusters.get(vm.cluster)
            if c is not None and vm.desired != "absent":
                want_nets[network_name(c.id)] = bridge_name(c.vni)
        have_nets = set((yield self.driver.list_networks()))
        for net, bridge in sorted(want_nets.items()):
            if net not in have_nets:
                yield self._guard(f"network {net}", self.driver.define_network(net, bridge))

        # 2. VMs assigned here; status writes are committed in groups (one fsync each)
        pending = []
        for vm in mine:
            status = yield self._reconcile_vm(vm, domains.get(domain_name(vm.id)), clusters.get(vm.cluster))
            if status is not None:
                pending.append(status)
            if len(pending) >= self.status_batch:
                yield self._write_statuses(pending)
                pending = []
        yield self._write_statuses(pending)

        # 3. orphans
        known = {domain_name(vm.id) for vm in mine}
        for name in sorted(domains):
            if name.startswith(PREFIX) and name not in known and name not in moving_domains:
                log.info("removing orphan domain {name} on {host}", name=name, host=self.host_id)
                yield self._guard(f"orphan {name}", self._remove_domain(name))
        for net in sorted(have_nets):
            if net.startswith(PREFIX) and net not in want_nets:
                yield self._guard(f"network {net}", self.driver.destroy_network(net))

        # 4. finished cluster destructions
        live_vm_clusters = {vm.cluster for vm in self.dom.all(VmRec)}
        for c in clusters.values():
            if c.state == "destroying" and c.id not in live_vm_clusters:
                # Leases first: once the cluster is gone from the DOM, its destroy is done.
                yield self.allocator.release_cluster(c.id, c.vni, c.token)
                yield self.domsvc.delete(("vcluster", c.id))
                log.info("cluster {name} destroyed", name=c.id)

        # 5. leases whose holder never came to be (a crash between taking the leases and
        #    recording the cluster) or is gone: give them back after a grace period
        yield self._release_orphan_leases()

    def _release_orphan_leases(self):
        now = self.now_ms()
        stale = {}
        for lease in self.dom.all(LeaseRec):
            if now - lease.granted_at < self.lease_grace_s * 1000:
                continue
            kind, ref, token = parse_holder(lease.holder)
            if kind == "vm":
                vm = self.dom.get(VmRec, ref)
                c = self.dom.get(VClusterRec, vm.cluster) if vm else None
                if c is None or c.token != token:
                    stale[lease.id] = lease.holder
            elif kind == "vcluster":
                c = self.dom.get(VClusterRec, ref)
                if c is None or c.token != token:
                    stale[lease.id] = lease.holder
            elif kind == "migration":
                m = self.dom.get(MigrationRec, token)
                if m is None or m.phase in TERMINAL or now - m.started_at >= STALE_MS:
                    stale[lease.id] = lease.holder
        if not stale:
            return defer.succeed(None)
        log.info("releasing {n} leases whose holders do not exist: {keys}", n=len(stale),
                 keys=", ".join(sorted(stale)[:10]))
        return self.allocator.table.release(stale)

    def _write_statuses(self, statuses):
        # A VM may have been deleted meanwhile (e.g. by a destroy on another host): skip it.
        live = [st for st in statuses if self.dom.get(VmRec, st.id) is not None]
        return self.domsvc.put(*live)

    @defer.inlineCallbacks
    def _guard(self, what, d):
        try:
            yield d
        except VmwebError as e:
            log.warn("{what} on {host}: {err}", what=what, host=self.host_id, err=e)

    @defer.inlineCallbacks
    def _remove_domain(self, name: str):
        yield self.driver.destroy(name)
        yield self.driver.undefine(name)
        yield self.driver.delete_volume(self.storage.pool, name + ".qcow2")

    @defer.inlineCallbacks
    def _reconcile_vm(self, vm: VmRec, dom_info, cluster: VClusterRec | None):
        prev = status_of(self.dom, vm)
        name = domain_name(vm.id)
        state = dom_info.state if dom_info is not None else "missing"
        restarts = prev.restarts if prev else 0
        detail = prev.detail if prev else ""
        try:
            if vm.desired == "absent":
                yield self._remove_domain(name)
                yield self.allocator.release_vm(vm, cluster.token if cluster else "")
                yield self.domsvc.delete(("vm", vm.id))
                log.info("VM {vm} removed from {host}", vm=vm.id, host=self.host_id)
                return None
            if vm.desired == "running":
                if state != "running":
                    if prev is not None and prev.state == "running":
                        restarts += 1
                        detail = f"found {state} behind our back; restarted"
                    else:
                        detail = ""
                    if state == "missing":
                        yield self._create(vm, cluster)
                    yield self.driver.start(name)
                    state = "running"
            elif vm.desired == "stopped":
                if state == "running":
                    yield self.driver.destroy(name)
                    state = "shutoff"
                detail = ""
        except VmwebError as e:
            state, detail = "error", str(e)
            log.warn("VM {vm} on {host}: {err}", vm=vm.id, host=self.host_id, err=e)
        if prev is None or (prev.state, prev.detail, prev.restarts) != (state, detail, restarts):
            return VmStatus(id=vm.id, host=self.host_id, state=state, detail=detail,
                            restarts=restarts, observed_at=int(self.now_ms()), token=vm.token)
        return None

    @defer.inlineCallbacks
    def _create(self, vm: VmRec, cluster: VClusterRec | None):
        if cluster is None:
            raise VmwebError(f"VM {vm.id}: its cluster {vm.cluster!r} is not in the DOM")
        image = yield self.images.ensure(vm.image)
        disk = yield self.driver.create_overlay(self.storage.pool, volume_name(vm.id), image.path,
                                                image.size_mib, image.format)
        yield self.driver.define(self.spec_for(vm, cluster, image, disk))

    def _prefix_of(self, ip: str) -> int:
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError:
            return 24
        return next((p.cidr.prefixlen for p in self.ip_pools if addr in p.cidr), 24)

    def spec_for(self, vm: VmRec, cluster: VClusterRec, image, disk: str) -> DomainSpec:
        """The domain of ``vm`` on this host, over overlay ``disk`` (also used by migrations)."""
        rec = image.record
        name = domain_name(vm.id)
        cmdline = None
        if rec.kernel:
            cmdline = " ".join(x for x in (
                rec.cmdline, f"vmweb.name={name}", f"vmweb.token={guest_token(vm.id)}",
                f"guestip={vm.ip}/{self._prefix_of(vm.ip)}" if vm.ip else "") if x)
        serial = None
        if self.driver.runs_guests and self.storage.console_dir:
            serial = f"{self.storage.console_dir}/{name}.log"
        return DomainSpec(
            name=name, vcpus=vm.vcpus, memory_mib=vm.memory_mib, disk_path=disk,
            network=network_name(cluster.id), mac=vm.mac, ip=vm.ip,
            kernel=rec.kernel or None, initrd=rec.initrd or None, cmdline=cmdline,
            serial_log=serial,
            metadata={"vm": vm.id, "cluster": cluster.id, "owner": cluster.owner})
