"""Each host converges its hypervisor to the DOM, for the VMs the DOM assigns to it.

The DOM holds desired state (a VM's host and desired power state, written by whoever took the
request) and observed state (a VM's ``status`` part, written only by the host that runs it). One
pass of :class:`Reconciler`:

1. makes this host's network devices match its plan (:func:`vmwebd.net.plan.plan_host`: a bridge
   and a VXLAN device per cluster it holds VMs of, forwarding entries to the cluster's other
   hosts, NAT where asked) through its executor, which removes the devices no cluster here needs;
2. for each VM assigned here: writes its cloud-init seed (rebuilt whenever what it carries
   changes: the cluster's members, the owner's keys), creates its overlay and domain and starts it
   (``running``), shuts it down (``stopped``), or shuts it down, deletes its overlay, gives back its
   addresses and deletes it from the DOM (``absent``). A shutdown asks the guest first (ACPI) and
   powers it off once the setting ``stop_timeout_s`` has passed, or at once when the record says
   ``force`` (docs/lifecycle.md). A VM found stopped or missing behind our back is started again,
   and the restart counted in its status, when the setting ``restart_stopped`` is true; else its
   status says it was left off, until a user starts it;
3. destroys domains of ours that the DOM no longer knows (orphans), and
4. deletes clusters being destroyed once no VM of theirs is left, giving back name and network id.

Passes never overlap; a kick during a pass schedules one more. All hypervisor calls go through the
driver, which runs them off the reactor thread.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field

from twisted.internet import defer, threads
from twisted.logger import Logger

from vmwebd.dom.records import (
    HostRec,
    LeaseRec,
    MigrationRec,
    VClusterRec,
    VmRec,
    VmStatus,
    status_of,
)
from vmwebd.errors import VmwebError
from vmwebd.hv.driver import DomainSpec
from vmwebd.hv.naming import PREFIX, domain_name, network_name, seed_name, volume_name
from vmwebd.lease.allocator import parse_holder
from vmwebd.lease.sweep import CapacitySweep
from vmwebd.migrate.state import STALE_MS, TERMINAL, in_flight
from vmwebd.net import addressing
from vmwebd.net import seed as seeds
from vmwebd.net.devices import Applied, RecordedDevices
from vmwebd.net.plan import PlanCache, bridge_name, underlay_of
from vmwebd.settings import get_setting

log = Logger()


@dataclass(frozen=True)
class StorageLayout:
    pool: str  # libvirt storage pool holding base images and overlays
    dir: str = ""  # its directory
    console_dir: str = ""  # where guests' serial consoles are logged (real guests only)


#: What a VM's status detail says when it was found stopped and left so (restart_stopped false).
NOT_RESTARTED = "not restarted (restart_stopped is false)"


@dataclass
class _Stopping:
    """A guest asked to shut down, here: when it must be off by (``stop_clock`` seconds)."""

    token: str  # the creation of the VM it was asked for
    timeout: int  # stop_timeout_s when it was asked
    deadline: float
    asked_at: float  # when it was last asked (the request is repeated)
    call: object = field(default=None, repr=False)  # the next look at it


def guest_token(vm_id: str) -> str:
    """A per-VM value handed to the guest on its kernel command line (tests find it on disk)."""
    return hashlib.sha256(vm_id.encode()).hexdigest()[:16]


class Reconciler:
    """Keeps this host's hypervisor in step with the DOM.

    Changes are acted on as they come: a change to a VM (its main part: host, desired state,
    creation) that concerns this host, to a cluster, or to a migration from or to this host puts
    it in the next *change pass*, which looks only at those. A *full pass* over everything assigned
    here runs every ``interval`` seconds (jittered, so hosts do not sweep in step) and when asked
    (:meth:`kick`, :meth:`settled`): it finds what changed behind our back (a guest that stopped,
    an orphan domain, a network left over) and gives back leases whose holders never came to be.
    So a grid at rest costs a sweep per interval, and a change costs what it touches.
    """

    #: A change pass asks the hypervisor about each VM on its own up to this many, then lists all.
    FEW_DOMAINS = 32
    #: Leases checked for a missing holder per full pass (they are many; a pass stays short).
    LEASES_PER_PASS = 2000
    #: Seconds a change elsewhere in a cluster held here waits before its network pass, so that a
    #: burst of them (a cluster created or destroyed across the grid) costs one pass, not one each.
    NETWORK_DELAY = 0.2
    #: Seconds between two looks at a guest asked to shut down (a change pass over it alone).
    STOP_POLL = 1.0
    #: Seconds after which a guest still running is asked again (it may have missed the first
    #: request, e.g. while booting).
    STOP_RETRY = 10.0

    def __init__(
        self,
        host_id: str,
        domsvc,
        driver,
        allocator,
        storage: StorageLayout,
        clock,
        now_ms,
        interval: float = 30.0,
        images=None,
        rng=None,
        net=None,
    ):
        self.host_id = host_id
        #: This host's network executor (see vmwebd.net.devices).
        self.net = net if net is not None else RecordedDevices()
        self._net_failed: dict[int, str] = {}  # network id -> why its segment is not here
        self._net_dirty = False
        self._held: frozenset[str] = frozenset()  # clusters in the plan last applied
        self._seed_clusters: set[str] = set()  # clusters whose VMs here need their seed checked
        self._seeds: dict[str, object] = {}  # seed path -> the SeedSpec written there
        self._plans = PlanCache()
        self._underlays: dict[str, str] = {}
        self.images = images
        self.domsvc = domsvc
        self.dom = domsvc.dom
        self.driver = driver
        self.allocator = allocator
        self.storage = storage
        self.clock = clock
        self.now_ms = now_ms
        self.interval = interval
        self.rng = rng or random.Random()
        self.status_batch = 16
        # Longer than any request takes between leasing and recording what the leases are for.
        self.lease_grace_s = 300.0
        self._running = False
        self._again = False
        self._full = False  # the next pass looks at everything
        self._dirty_vms: set[str] = set()
        self._dirty_clusters: set[str] = set()
        self._seen: dict[str, tuple] = {}  # VM id -> (host, desired, token, cluster) last seen
        self._lease_cursor = 0
        self.capacity = CapacitySweep(
            host_id, self.dom, allocator, now_ms, lambda now: in_flight(self.dom, now)
        )
        self._scheduled = None
        self._sweep = None
        self.passes = 0
        self.full_passes = 0
        self._idle_waiters: list[defer.Deferred] = []
        self._quiet_waiters: list[defer.Deferred] = []
        #: Times graceful stops (a deadline and the looks until it); the reactor, or a test's
        #: ``task.Clock``.
        self.stop_clock = clock
        self._stopping: dict[str, _Stopping] = {}  # VM id -> its guest asked to shut down

    # -- scheduling -----------------------------------------------------------------------
    def start(self) -> None:
        self.dom.subscribe(self._on_change)
        self._next_sweep(first=True)

    def stop(self) -> None:
        for call in (self._scheduled, self._sweep):
            if call is not None and call.active():
                call.cancel()
        self._sweep = None
        for vm_id in list(self._stopping):
            self._forget_stop(vm_id)

    def _next_sweep(self, first: bool = False) -> None:
        if first:
            self.kick()
        delay = self.interval * self.rng.uniform(0.8, 1.2)
        self._sweep = self.clock.callLater(delay, self._sweep_due)

    def _sweep_due(self) -> None:
        self.kick()
        self._next_sweep()

    def _on_change(self, kind: str, id_: str) -> None:
        if kind == "vm":
            vm = self.dom.get(VmRec, id_)
            now = self._seen_key(vm) if vm is not None else None
            before = self._seen.get(id_)
            if now == before:
                return  # a status written, nothing this host acts on changed
            if now is None:
                self._seen.pop(id_, None)
            else:
                self._seen[id_] = now
            cluster = (now or before)[3]
            if cluster in self._held and (now or ())[:4] != (before or ())[:4]:
                # A member of a cluster held here came, went or moved: the segment's forwarding
                # entries and the members' seeds (their hosts file) may change.
                self._net_dirty = True
                self._seed_clusters.add(cluster)
                self._schedule(self.NETWORK_DELAY)
            if self.host_id in ((before or ("",))[0], (now or ("",))[0]):
                self._dirty_vms.add(id_)
                self._dirty_clusters.add((now or before)[3])
                self._schedule()
            elif now is None and before is not None:
                # A VM gone anywhere may be the last of a cluster being destroyed: every host
                # looks (as the full pass does), so the destroy ends wherever the last one went.
                self._dirty_clusters.add(before[3])
                self._schedule()
        elif kind == "vcluster":
            self._dirty_clusters.add(id_)
            self._schedule()
        elif kind == "migration":
            m = self.dom.get(MigrationRec, id_)
            if m is not None and self.host_id in (m.source, m.dest):
                self._dirty_vms.add(m.vm)
                self._schedule()
            if m is not None and m.vm.partition("/")[0] in self._held:
                self._net_dirty = True
                self._schedule(self.NETWORK_DELAY)
        elif kind == "host":
            addr = underlay_of(self.dom.get(HostRec, id_))
            if self._underlays.get(id_) != addr:
                self._underlays[id_] = addr
                if self._held:
                    self._net_dirty = True
                    self._schedule(self.NETWORK_DELAY)
        elif kind == "user":
            # Its SSH keys are in its VMs' seeds.
            owned = {c.id for c in self.dom.select(VClusterRec, "owner", id_)} & self._held
            if owned:
                self._seed_clusters |= owned
                self._schedule(self.NETWORK_DELAY)

    def _seen_key(self, vm: VmRec) -> tuple:
        """What of a VM's main part this host acts on: host, desired state, creation, cluster,
        and the part's version (a start asked again of a VM left off rewrites the part alone)."""
        return (vm.host, vm.desired, vm.token, vm.cluster, vm.force, self.dom.version_of("vm", vm.id))

    def kick(self) -> None:
        """Asks for a full pass soon (coalesced with other requests)."""
        self._full = True
        self._schedule()

    def _schedule(self, delay: float = 0.0) -> None:
        if self._running:
            self._again = True
            return
        if self._scheduled is None or not self._scheduled.active():
            self._scheduled = self.clock.callLater(delay, self._run)
        elif delay == 0 and self._scheduled.getTime() > self.clock.seconds():
            self._scheduled.reset(0)

    def pending(self) -> bool:
        """Is a pass running or asked for?"""
        return self._running or (self._scheduled is not None and self._scheduled.active())

    def idle(self) -> defer.Deferred:
        """Fires once no pass is running or asked for (at once if none is)."""
        if not self.pending():
            return defer.succeed(None)
        d = defer.Deferred()
        self._quiet_waiters.append(d)
        return d

    def settled(self) -> defer.Deferred:
        """Fires after the next complete full pass that started after this call."""
        d = defer.Deferred()
        self._idle_waiters.append(d)
        self.kick()
        return d

    @defer.inlineCallbacks
    def _run(self):
        self._running = True
        waiters, self._idle_waiters = self._idle_waiters, []
        done = []
        try:
            while True:
                self._again = False
                full, self._full = self._full, False
                vms, self._dirty_vms = self._dirty_vms, set()
                clusters, self._dirty_clusters = self._dirty_clusters, set()
                self._net_dirty = False
                try:
                    if full or vms or clusters:
                        yield self.run_once(None if full else (vms, clusters))
                    else:
                        yield self._network_pass()
                except Exception:
                    log.failure("reconcile pass on {host} failed", host=self.host_id)
                if full:
                    done += waiters
                    waiters = []
                waiters += self._idle_waiters
                self._idle_waiters = []
                if not (
                    self._again
                    or self._full
                    or self._dirty_vms
                    or self._dirty_clusters
                    or self._net_dirty
                    or self._seed_clusters
                ):
                    break
        finally:
            self._running = False
        # Waiters whose full pass has not run yet (an error stopped the loop) get one more.
        for d in done:
            d.callback(None)
        if waiters:
            self._idle_waiters = waiters + self._idle_waiters
            self.kick()
        if not self.pending():
            quiet, self._quiet_waiters = self._quiet_waiters, []
            for d in quiet:
                d.callback(None)

    # -- one pass -------------------------------------------------------------------------
    @defer.inlineCallbacks
    def run_once(self, changed=None):
        """One pass over everything assigned here (``changed`` None), or over the VMs and clusters
        in ``changed`` = (VM ids, cluster ids) only."""
        self.passes += 1
        full = changed is None
        if full:
            self.full_passes += 1
        # VMs being moved belong to their migration until it ends: leave them (and their
        # domains, here as source or destination) alone.
        moving = in_flight(self.dom, self.now_ms())
        moving_domains = {domain_name(v) for v in moving}
        if full:
            ours = self.dom.select(VmRec, "host", self.host_id)
            for vm in ours:
                self._seen.setdefault(vm.id, self._seen_key(vm))
            mine = [vm for vm in ours if vm.id not in moving]
            domains = {d.name: d for d in (yield self.driver.list_domains())}
            candidates = set(domains)
            cluster_ids = {c.id for c in self.dom.all(VClusterRec)}
        else:
            vm_ids, cluster_ids = changed
            mine = []
            for id_ in sorted(vm_ids):
                vm = self.dom.get(VmRec, id_)
                if vm is not None and vm.host == self.host_id and id_ not in moving:
                    mine.append(vm)
            names = [domain_name(id_) for id_ in sorted(vm_ids)]
            candidates = set(names)  # only these may be found orphans in this pass
            if len(names) > self.FEW_DOMAINS:
                domains = {d.name: d for d in (yield self.driver.list_domains())}
            else:
                domains = {}
                for name in names:
                    info = yield self.driver.state(name)
                    if info.state != "missing":
                        domains[name] = info
            cluster_ids = set(cluster_ids) | {vm.cluster for vm in mine}
        clusters = {c: self.dom.get(VClusterRec, c) for c in cluster_ids}
        clusters = {c: rec for c, rec in clusters.items() if rec is not None}

        # 1. network devices: this host's plan, applied (the executor changes only what differs)
        yield self.apply_network()
        if full:
            have_nets = set((yield self.driver.list_networks()))
        else:
            have_nets = set()

        # seeds of VMs here whose cluster's members or owner's keys changed (a full pass checks
        # only those not written since this daemon started: the rest follow changes)
        seed_clusters, self._seed_clusters = self._seed_clusters, set()
        yield self._refresh_seeds(seed_clusters, moving)
        if full:
            yield self._refresh_unknown_seeds(mine)

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

        # 3. orphans: domains of ours the DOM does not put here, networks no VM here needs
        known = {domain_name(vm.id) for vm in mine}
        for name in sorted(candidates & set(domains)):
            if name.startswith(PREFIX) and name not in known and name not in moving_domains:
                log.info("removing orphan domain {name} on {host}", name=name, host=self.host_id)
                yield self._guard(f"orphan {name}", self._remove_domain(name))
        # libvirt networks of ours are from before segments: each goes with the last VM of its
        # cluster here (domains defined on one still use it until they are made again)
        still = {network_name(vm.cluster) for vm in mine if vm.desired != "absent"}
        for net in sorted(have_nets - still):
            if net.startswith(PREFIX):
                yield self._guard(f"network {net}", self.driver.destroy_network(net))

        # 4. finished cluster destructions
        for c in sorted(cluster_ids):
            rec = clusters.get(c)
            if rec is not None and rec.state == "destroying" and not self.dom.count("vm", "cluster", c):
                # Leases first: once the cluster is gone from the DOM, its destroy is done.
                yield self.allocator.release_cluster(rec.id, rec.vni, rec.token)
                yield self.domsvc.delete(("vcluster", rec.id))
                log.info("cluster {name} destroyed", name=rec.id)

        # 5. leases whose holder never came to be (a crash between taking the leases and
        #    recording the cluster) or is gone: give them back after a grace period
        if full:
            yield self._release_orphan_leases()
            # 6. the capacity and quota sets: what the DOM places here, no more, no less
            yield self._guard("capacity sweep", self.capacity.run())

    @defer.inlineCallbacks
    def _network_pass(self):
        """What a change elsewhere in a cluster held here asks for: the devices and the seeds."""
        self.passes += 1
        yield self.apply_network()
        seed_clusters, self._seed_clusters = self._seed_clusters, set()
        if seed_clusters:
            yield self._refresh_seeds(seed_clusters, in_flight(self.dom, self.now_ms()))

    @defer.inlineCallbacks
    def apply_network(self):
        """Applies this host's network plan now; fires with the executor's :class:`Applied`.
        (Migrations call it before a guest arrives: the segment must be there first.)"""
        plan = self._plans.plan_host(self.dom, self.host_id)
        self._held = plan.clusters()
        try:
            result = yield self.net.apply(plan)
        except Exception as e:  # noqa: BLE001 (an executor bug must not stop reconciliation)
            log.failure("network plan on {host} not applied", host=self.host_id)
            result = Applied(failed={s.vni: f"network devices not made: {e}" for s in plan.segments})
        if result.removed:
            log.info(
                "removed network devices on {host}: {devs}", host=self.host_id, devs=", ".join(result.removed)
            )
        for vni, why in sorted(result.failed.items()):
            if self._net_failed.get(vni) != why:
                log.warn("segment {vni} on {host}: {why}", vni=vni, host=self.host_id, why=why)
        if result.changed or result.failed != self._net_failed:
            # VMs of a segment that failed (or recovered) get a pass to show it in their status
            failed_before = set(self._net_failed)
            self._net_failed = dict(result.failed)
            for seg in plan.segments:
                if seg.vni in failed_before ^ set(result.failed):
                    self._dirty_clusters.add(seg.cluster)
                    self._dirty_vms.update(vm.id for vm in self._mine_in(seg.cluster, ()))
        return result

    def segment_error(self, cluster: VClusterRec | None) -> str | None:
        """Why the segment of ``cluster`` could not be made here (None when it is fine)."""
        if cluster is None:
            return None
        why = self._net_failed.get(cluster.vni)
        return f"network segment {bridge_name(cluster.vni)}: {why}" if why else None

    def seed_path(self, vm_id: str) -> str:
        return f"{self.storage.dir}/{seed_name(vm_id)}" if self.storage.dir else ""

    def write_seed(self, vm: VmRec, force: bool = True) -> defer.Deferred:
        """Writes ``vm``'s cloud-init seed here (off the reactor); fires with its path. Without
        ``force``, a seed this daemon already wrote with the same content is left as it is
        (no thread, no read back: a full pass over thousands of VMs stays cheap)."""
        path = self.seed_path(vm.id)
        if not path:
            return defer.succeed(None)
        spec = seeds.seed_for(self.dom, vm)
        if not force and self._seeds.get(path) == spec:
            return defer.succeed(path)

        def written(_):
            self._seeds[path] = spec
            return path

        return threads.deferToThread(_write_seed, path, spec).addCallback(written)

    @defer.inlineCallbacks
    def _refresh_unknown_seeds(self, mine):
        for vm in mine:
            if vm.desired != "absent" and self.seed_path(vm.id) not in self._seeds:
                yield self._refresh_one(vm)

    @defer.inlineCallbacks
    def _refresh_one(self, vm):
        try:
            yield self.write_seed(vm, force=False)
        except Exception:  # noqa: BLE001 (one VM's seed must not stop the pass)
            log.failure("seed of {vm} on {host}", vm=vm.id, host=self.host_id)

    @defer.inlineCallbacks
    def _refresh_seeds(self, clusters, moving):
        for c in sorted(clusters):
            for vm in self._mine_in(c, moving):
                if vm.desired != "absent":
                    yield self._refresh_one(vm)

    def _mine_in(self, cluster: str, moving) -> list[VmRec]:
        """The VMs of ``cluster`` assigned here and not being moved."""
        return [
            vm
            for vm in self.dom.select(VmRec, "cluster", cluster)
            if vm.host == self.host_id and vm.id not in moving
        ]

    def _release_orphan_leases(self):
        """Gives back leases whose holder is gone; looks at a bounded slice of them per pass."""
        now = self.now_ms()
        ids = self.dom.ids("lease")
        if not ids:
            return defer.succeed(None)
        start = self._lease_cursor % len(ids)
        batch = ids[start : start + self.LEASES_PER_PASS]
        self._lease_cursor = start + len(batch)
        stale = {}
        for lease_id in batch:
            lease = self.dom.get(LeaseRec, lease_id)
            if lease is None or now - lease.granted_at < self.lease_grace_s * 1000:
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
        log.info(
            "releasing {n} leases whose holders do not exist: {keys}",
            n=len(stale),
            keys=", ".join(sorted(stale)[:10]),
        )
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
        if self.storage.dir:
            path = f"{self.storage.dir}/{name}.seed.iso"
            self._seeds.pop(path, None)
            yield threads.deferToThread(_unlink, path)

    @defer.inlineCallbacks
    def _reconcile_vm(self, vm: VmRec, dom_info, cluster: VClusterRec | None):
        prev = status_of(self.dom, vm)
        name = domain_name(vm.id)
        state = dom_info.state if dom_info is not None else "missing"
        restarts = prev.restarts if prev else 0
        detail = prev.detail if prev else ""
        try:
            if vm.desired == "absent":
                if state in ("running", "paused"):
                    state, detail = yield self._power_off(vm, name, state)
                    if state == "stopping":
                        return self._status(vm, prev, state, detail, restarts)
                self._forget_stop(vm.id)
                yield self._remove_domain(name)
                yield self.allocator.release_vm(
                    vm, cluster.token if cluster else "", owner=cluster.owner if cluster else None
                )
                yield self.domsvc.delete(("vm", vm.id))
                log.info("VM {vm} removed from {host}", vm=vm.id, host=self.host_id)
                return None
            net_error = self.segment_error(cluster)
            if vm.desired == "running" and net_error and state != "running":
                raise VmwebError(net_error)
            if vm.desired == "running":
                self._forget_stop(vm.id)
                if state != "running":
                    start, restarted, detail = self._should_start(vm, prev, state)
                    if restarted:
                        restarts += 1
                    if start:
                        if state == "missing":
                            yield self._create(vm, cluster)
                        yield self.driver.start(name)
                        state = "running"
            elif vm.desired == "stopped":
                if state in ("running", "paused"):
                    state, detail = yield self._power_off(vm, name, state)
                elif (
                    vm.id in self._stopping
                    or prev is None
                    or prev.state != "shutoff"
                    or NOT_RESTARTED in prev.detail
                ):
                    self._forget_stop(vm.id)
                    detail = ""  # e.g. its guest shut down when asked
                # else: off already, and its detail (how it was powered off) stays
        except VmwebError as e:
            state, detail = "error", str(e)
            log.warn("VM {vm} on {host}: {err}", vm=vm.id, host=self.host_id, err=e)
        return self._status(vm, prev, state, detail, restarts)

    def _status(self, vm: VmRec, prev, state: str, detail: str, restarts: int) -> VmStatus | None:
        """The status part to write for ``vm`` (None when the one recorded says the same)."""
        if prev is None or (prev.state, prev.detail, prev.restarts) != (state, detail, restarts):
            return VmStatus(
                id=vm.id,
                host=self.host_id,
                state=state,
                detail=detail,
                restarts=restarts,
                observed_at=int(self.now_ms()),
                token=vm.token,
            )
        return None

    def _should_start(self, vm: VmRec, prev, state: str) -> tuple[bool, bool, str]:
        """For a VM that should run and is found ``state``: (start it?, is that a restart of one
        stopped behind our back?, its status detail).

        A VM last seen running was stopped behind our back: started again only when the setting
        ``restart_stopped`` is true, else left off with a status saying so. A VM left off that
        way stays off until the setting becomes true or a user starts it (its main part written
        after that status). Any other VM (new, or stopped by a user and now asked to run) starts.
        """
        if prev is None or prev.host != self.host_id:
            # Never seen running here: new, or placed here from another host (an evacuation).
            return True, False, ""
        left_off = prev.state != "running" and NOT_RESTARTED in prev.detail
        if not left_off and prev.state != "running":
            return True, False, ""
        if get_setting(self.dom, "restart_stopped") == "true":
            return True, True, f"found {state} behind our back; restarted"
        if left_off and self._asked_after_status(vm):
            return True, False, ""
        if left_off:
            return False, False, prev.detail
        log.info(
            "VM {vm} on {host} found {state}; not restarted (restart_stopped is false)",
            vm=vm.id,
            host=self.host_id,
            state=state,
        )
        return False, False, f"found {state} behind vmweb's back; {NOT_RESTARTED}"

    def _asked_after_status(self, vm: VmRec) -> bool:
        """Was the VM's main part written after its status part? Versions are hybrid logical
        clock readings, so a start request made by a host that had seen the status orders after
        it, wherever it was made."""
        main = self.dom.version_of("vm", vm.id)
        status = self.dom.version_of("vm", vm.id, "status")
        return main is not None and status is not None and main > status

    @defer.inlineCallbacks
    def _power_off(self, vm: VmRec, name: str, state: str):
        """Carries out a stop (desired ``stopped`` or ``absent``) of domain ``name``, found
        ``state`` (running or paused); fires with the VM's (state, detail): ``shutoff`` once it
        is off, ``stopping`` while its guest still has time to shut down.

        The guest is asked to shut down (ACPI) and looked at every ``STOP_POLL`` seconds (a
        change pass over it alone); once ``stop_timeout_s`` (read when it was asked) has passed
        it is powered off. A forced stop, a timeout of 0 and a paused guest (it cannot hear the
        request) are powered off at once. What was asked is kept in memory: a daemon restarted
        meanwhile asks again, with a new deadline."""
        timeout = int(get_setting(self.dom, "stop_timeout_s"))
        if vm.force or timeout == 0 or state == "paused":
            self._forget_stop(vm.id)
            yield self.driver.destroy(name)
            why = "forced" if vm.force else "stop_timeout_s is 0" if timeout == 0 else "it was paused"
            log.info("VM {vm} on {host} powered off at once ({why})", vm=vm.id, host=self.host_id, why=why)
            return "shutoff", f"powered off at once ({why})"
        now = self.stop_clock.seconds()
        stop = self._stopping.get(vm.id)
        if stop is None or stop.token != vm.token:
            self._forget_stop(vm.id)
            stop = self._stopping[vm.id] = _Stopping(vm.token, timeout, now + timeout, now)
            log.info(
                "VM {vm} on {host}: guest asked to shut down, powered off after {t} s",
                vm=vm.id,
                host=self.host_id,
                t=timeout,
            )
            yield self.driver.shutdown(name)
        elif now >= stop.deadline:
            self._forget_stop(vm.id)
            yield self.driver.destroy(name)
            log.info(
                "VM {vm} on {host} did not shut down within {t} s; powered off",
                vm=vm.id,
                host=self.host_id,
                t=stop.timeout,
            )
            return "shutoff", f"did not shut down within {stop.timeout} s of being asked; powered off"
        elif now - stop.asked_at >= self.STOP_RETRY:
            stop.asked_at = now
            yield self.driver.shutdown(name)
        # A guest may be off already (at once on the test driver; a quick guest in a second).
        if (yield self.driver.state(name)).state != "running":
            self._forget_stop(vm.id)
            return "shutoff", ""
        self._look_again(vm.id, stop)
        # The same words at every look: the status is written once, not once a second.
        return "stopping", (
            f"asked its guest to shut down; powered off if still running after {stop.timeout} s"
        )

    def _look_again(self, vm_id: str, stop: _Stopping) -> None:
        if stop.call is not None and stop.call.active():
            return
        delay = max(0.0, min(self.STOP_POLL, stop.deadline - self.stop_clock.seconds()))
        stop.call = self.stop_clock.callLater(delay, self._stop_due, vm_id)

    def _stop_due(self, vm_id: str) -> None:
        stop = self._stopping.get(vm_id)
        if stop is None:
            return
        stop.call = None
        vm = self.dom.get(VmRec, vm_id)
        if vm is None or vm.host != self.host_id or vm.token != stop.token:
            self._forget_stop(vm_id)  # gone, moved or made anew: nothing to finish here
            return
        self._dirty_vms.add(vm_id)
        self._schedule()

    def _forget_stop(self, vm_id: str) -> None:
        stop = self._stopping.pop(vm_id, None)
        if stop is not None and stop.call is not None and stop.call.active():
            stop.call.cancel()

    @defer.inlineCallbacks
    def _create(self, vm: VmRec, cluster: VClusterRec | None):
        if cluster is None:
            raise VmwebError(f"VM {vm.id}: its cluster {vm.cluster!r} is not in the DOM")
        image = yield self.images.ensure(vm.image)
        disk = yield self.driver.create_overlay(
            self.storage.pool, volume_name(vm.id), image.path, image.size_mib, image.format
        )
        seed = yield self.write_seed(vm, force=False)
        yield self.driver.define(self.spec_for(vm, cluster, image, disk, seed))

    def spec_for(
        self, vm: VmRec, cluster: VClusterRec, image, disk: str, seed: str | None = None
    ) -> DomainSpec:
        """The domain of ``vm`` on this host, over overlay ``disk`` (also used by migrations)."""
        rec = image.record
        name = domain_name(vm.id)
        cmdline = None
        if rec.kernel:
            ip_arg = seeds.kernel_ip_arg(seeds.seed_for(self.dom, vm)) if vm.ip else ""
            cmdline = " ".join(
                x
                for x in (rec.cmdline, f"vmweb.name={name}", f"vmweb.token={guest_token(vm.id)}", ip_arg)
                if x
            )
        serial = None
        if self.driver.runs_guests and self.storage.console_dir:
            serial = f"{self.storage.console_dir}/{name}.log"
        return DomainSpec(
            name=name,
            vcpus=vm.vcpus,
            memory_mib=vm.memory_mib,
            disk_path=disk,
            network="",
            bridge=bridge_name(cluster.vni),
            mtu=self._mtu(cluster),
            mac=vm.mac,
            ip=vm.ip,
            kernel=rec.kernel or None,
            initrd=rec.initrd or None,
            cmdline=cmdline,
            serial_log=serial,
            seed_path=seed or None,
            metadata={"vm": vm.id, "cluster": cluster.id, "owner": cluster.owner},
        )

    @staticmethod
    def _mtu(cluster: VClusterRec) -> int:
        return cluster.mtu or addressing.guest_mtu(addressing.DEFAULT_UNDERLAY_MTU)


def _write_seed(path: str, spec) -> bool:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return seeds.write_seed(path, spec)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
