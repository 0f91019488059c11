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

What to do is decided by :mod:`vmwebd.reconcile_plan`, a pure function of the DOM's records, what
the driver reports and the time; this module gathers those inputs and carries out its answers.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass

from twisted.internet import defer, threads
from twisted.logger import Logger

from vmwebd import reconcile_plan as plan
from vmwebd.dom.records import (
    HostRec,
    LeaseRec,
    MigrationRec,
    VClusterRec,
    VmRec,
    status_of,
)
from vmwebd.errors import VmwebError
from vmwebd.hv.driver import DomainSpec
from vmwebd.hv.naming import PREFIX, domain_name, network_name, seed_name, volume_name
from vmwebd.lease.allocator import parse_holder
from vmwebd.lease.sweep import CapacitySweep
from vmwebd.migrate.state import in_flight
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
    STOP_POLL = plan.STOP_POLL
    #: Seconds after which a guest still running is asked again (it may have missed the first
    #: request, e.g. while booting).
    STOP_RETRY = plan.STOP_RETRY

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
        self._stopping: dict[str, plan.Stopping] = {}  # VM id -> its guest asked to shut down
        self._stop_calls: dict[str, object] = {}  # VM id -> the next look at its guest

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
        if full:
            ours = self.dom.select(VmRec, "host", self.host_id)
            for vm in ours:
                self._seen.setdefault(vm.id, self._seen_key(vm))
            mine = plan.assigned_here(ours, self.host_id, moving)
            domains = {d.name: d for d in (yield self.driver.list_domains())}
            candidates = set(domains)
            cluster_ids = {c.id for c in self.dom.all(VClusterRec)}
        else:
            vm_ids, cluster_ids = changed
            mine = plan.assigned_here(
                (self.dom.get(VmRec, id_) for id_ in sorted(vm_ids)), self.host_id, moving
            )
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
        for name in plan.orphan_domains(
            candidates & set(domains), mine, moving, domain_of=domain_name, prefix=PREFIX
        ):
            log.info("removing orphan domain {name} on {host}", name=name, host=self.host_id)
            yield self._guard(f"orphan {name}", self._remove_domain(name))
        for net in plan.stale_networks(have_nets, mine, network_of=network_name, prefix=PREFIX):
            yield self._guard(f"network {net}", self.driver.destroy_network(net))

        # 4. finished cluster destructions
        counts = {c: self.dom.count("vm", "cluster", c) for c in clusters}
        for rec in plan.finished_destroys(clusters, counts):
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
        batch, self._lease_cursor = plan.lease_batch(
            self.dom.ids("lease"), self._lease_cursor, self.LEASES_PER_PASS
        )
        leases = [lease for lease in (self.dom.get(LeaseRec, i) for i in batch) if lease is not None]
        stale = {
            lease.id: lease.holder
            for lease in leases
            if plan.lease_orphaned(
                lease, parse_holder(lease.holder), self.dom, now, self.lease_grace_s * 1000
            )
        }
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

    def _settings(self) -> plan.Settings:
        return plan.Settings(
            stop_timeout_s=int(get_setting(self.dom, "stop_timeout_s")),
            restart_stopped=get_setting(self.dom, "restart_stopped") == "true",
            stop_retry_s=self.STOP_RETRY,
        )

    @defer.inlineCallbacks
    def _reconcile_vm(self, vm: VmRec, dom_info, cluster: VClusterRec | None):
        """Carries out what :func:`vmwebd.reconcile_plan.decide_vm` says about ``vm``, whose
        domain was found as ``dom_info`` (None: missing); fires with the status part to write
        (None when there is none, or it says what is recorded)."""
        prev = status_of(self.dom, vm)
        name = domain_name(vm.id)
        action = plan.decide_vm(
            vm,
            cluster,
            dom_info.state if dom_info is not None else "missing",
            prev,
            self._stopping.get(vm.id),
            self.stop_clock.seconds(),
            self._settings(),
            host_id=self.host_id,
            segment_error=self.segment_error(cluster),
            asked_after_status=plan.asked_after(
                self.dom.version_of("vm", vm.id), self.dom.version_of("vm", vm.id, "status")
            ),
        )
        try:
            if isinstance(action, plan.GuestStop):
                action = yield self._guest_stop(vm, name, action)
            if isinstance(action, plan.Nothing):
                return None
            if isinstance(action, plan.Remove):
                self._forget_stop(vm.id)
                if action.power_off:
                    yield self.driver.destroy(name)
                    log.info("VM {vm} on {host}: {why}", vm=vm.id, host=self.host_id, why=action.power_off)
                yield self._remove_domain(name)
                yield self.allocator.release_vm(
                    vm, cluster.token if cluster else "", owner=cluster.owner if cluster else None
                )
                yield self.domsvc.delete(("vm", vm.id))
                log.info("VM {vm} removed from {host}", vm=vm.id, host=self.host_id)
                return None
            if isinstance(action, plan.PowerOff):
                self._forget_stop(vm.id)
                yield self.driver.destroy(name)
                log.info("VM {vm} on {host}: {why}", vm=vm.id, host=self.host_id, why=action.status.detail)
            elif isinstance(action, plan.Start):
                self._forget_stop(vm.id)
                if action.create:
                    yield self._create(vm, cluster)
                yield self.driver.start(name)
            elif isinstance(action, plan.AwaitStop):
                self._look_again(vm.id)
            elif isinstance(action, (plan.Keep, plan.LeaveOff)):
                self._forget_stop(vm.id)
                if isinstance(action, plan.LeaveOff) and action.notice:
                    log.info("VM {vm} on {host} {notice}", vm=vm.id, host=self.host_id, notice=action.notice)
            elif isinstance(action, plan.Fail):
                log.warn("VM {vm} on {host}: {err}", vm=vm.id, host=self.host_id, err=action.status.detail)
            status = action.status
        except VmwebError as e:
            status = plan.failed(action, prev, str(e))
            log.warn("VM {vm} on {host}: {err}", vm=vm.id, host=self.host_id, err=e)
        return plan.status_record(vm, self.host_id, prev, status, int(self.now_ms()))

    @defer.inlineCallbacks
    def _guest_stop(self, vm: VmRec, name: str, action: plan.GuestStop):
        """Carries out a graceful stop: remembers it, asks the guest (when the plan says so) and
        looks at the domain; fires with what follows (:func:`vmwebd.reconcile_plan.after_look`).
        What was asked is kept in memory: a daemon restarted meanwhile asks again, with a new
        deadline."""
        if action.fresh:
            self._forget_stop(vm.id)
            log.info(
                "VM {vm} on {host}: guest asked to shut down, powered off after {t} s",
                vm=vm.id,
                host=self.host_id,
                t=action.stop.timeout,
            )
        self._stopping[vm.id] = action.stop
        if action.ask:
            yield self.driver.shutdown(name)
        return plan.after_look(action, (yield self.driver.state(name)).state)

    def _look_again(self, vm_id: str) -> None:
        call = self._stop_calls.get(vm_id)
        if call is not None and call.active():
            return
        delay = plan.look_delay(self._stopping[vm_id], self.stop_clock.seconds(), self.STOP_POLL)
        self._stop_calls[vm_id] = self.stop_clock.callLater(delay, self._stop_due, vm_id)

    def _stop_due(self, vm_id: str) -> None:
        self._stop_calls.pop(vm_id, None)
        stop = self._stopping.get(vm_id)
        if stop is None:
            return
        if not plan.stop_still_wanted(self.dom.get(VmRec, vm_id), self.host_id, stop):
            self._forget_stop(vm_id)  # gone, moved or made anew: nothing to finish here
            return
        self._dirty_vms.add(vm_id)
        self._schedule()

    def _forget_stop(self, vm_id: str) -> None:
        self._stopping.pop(vm_id, None)
        call = self._stop_calls.pop(vm_id, None)
        if call is not None and call.active():
            call.cancel()

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
