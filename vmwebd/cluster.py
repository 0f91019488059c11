"""Virtual-cluster lifecycle: what a request at any host does to the DOM.

:class:`ClusterManager` validates a request, places the VMs, leases unique things through the
allocator, and writes the desired state into the DOM (durably, before answering). The hosts'
reconcilers then make it so. Reads answer from the local replica.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.logger import Logger

from vmwebd.accounts import OWNER_RE
from vmwebd.dom.records import HostRec, TemplateRec, UserRec, VClusterRec, VmRec, status_of
from vmwebd.errors import InvalidArgument, NameTaken, NoSuchCluster, NoSuchTemplate, NoSuchVm
from vmwebd.hv.naming import network_name
from vmwebd.lease.capacity import Change
from vmwebd.net import addressing
from vmwebd.net.plan import bridge_name
from vmwebd.placement import HostLoad, place
from vmwebd.settings import drained_hosts, get_setting
from vmwebd.templates import Template, expand, from_dom_body, plan_scale
from vmwebd.wiring import HostSet, Liveness

log = Logger()
CLUSTER_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,23}$")


@dataclass(frozen=True)
class VmView:
    name: str
    role: str
    host: str
    state: str
    desired: str
    ip: str
    mac: str
    vcpus: int
    memory_mib: int
    detail: str = ""
    restarts: int = 0


@dataclass(frozen=True)
class ClusterView:
    name: str
    owner: str
    template: str
    count: int
    state: str
    vni: int
    network: str
    bridge: str
    vms: list[VmView] = field(default_factory=list)


@dataclass(frozen=True)
class HostView:
    id: str
    liveness: str
    api: str
    cpus: int
    memory_mib: int
    free_memory_mib: int
    load1: float
    vms: int
    used_vcpus: int
    used_memory_mib: int
    member: bool = False
    draining: bool = False


def host_loads(dom, live: set[str], exclude: str | None = None, placing: bool = False) -> dict[str, HostLoad]:
    """The load of every live host (``exclude`` left out; with ``placing``, the hosts being
    drained too): its capacity and the vCPUs and memory of the VMs the DOM assigns to it."""
    skip = drained_hosts(dom) if placing else set()
    loads = {}
    for h in dom.all(HostRec):
        if h.id in live and h.liveness == "alive" and h.id != exclude and h.id not in skip:
            usage = host_usage(dom, h.id)
            loads[h.id] = HostLoad(h.id, h.cpus, h.memory_mib, usage.vcpus, usage.memory_mib)
    return loads


@dataclass(frozen=True)
class HostUsage:
    vms: int  # VMs the DOM assigns to the host, those being removed included
    vcpus: int  # vCPUs and memory of those not being removed
    memory_mib: int


_USAGE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def host_usage(dom, host: str) -> HostUsage:
    """What the DOM puts on ``host``; computed from the host's VMs (a secondary index) once per
    change among them, so reading every host's usage costs nothing while they do not change."""
    cache = _USAGE.setdefault(dom, {})
    gen = dom.generation("vm", "host", host)
    hit = cache.get(host)
    if hit is not None and hit[0] == gen:
        return hit[1]
    vms = dom.select(VmRec, "host", host)
    live = [vm for vm in vms if vm.desired != "absent"]
    usage = HostUsage(len(vms), sum(vm.vcpus for vm in live), sum(vm.memory_mib for vm in live))
    cache[host] = (gen, usage)
    return usage


def reserved_loads(loads: dict[str, HostLoad], change: Change) -> dict[str, HostLoad]:
    """Raises each host's use in ``loads`` to what its capacity set holds as ``change`` sees it
    (in place; returned for convenience)."""
    for h, load in loads.items():
        u = change.usage(h)
        load.used_vcpus = max(load.used_vcpus, u.vcpus)
        load.used_memory_mib = max(load.used_memory_mib, u.memory_mib)
    return loads


def capacity_limits(dom):
    """``(capacity(host), quota(owner))`` for :meth:`~vmwebd.lease.capacity.Change.ops`: a host's
    vCPUs times ``cpu_overcommit`` and its memory; an owner's quota of VMs (None: no record)."""
    overcommit = float(get_setting(dom, "cpu_overcommit"))

    def capacity(host: str):
        rec = dom.get(HostRec, host)
        return (rec.cpus * overcommit, rec.memory_mib) if rec is not None else None

    def quota(owner: str):
        rec = dom.get(UserRec, owner)
        return rec.quota_vms if rec is not None else None

    return capacity, quota


def _check_name(name, field_="name") -> str:
    if not isinstance(name, str) or not CLUSTER_NAME_RE.match(name):
        raise InvalidArgument(
            field_, f"{name!r} is not a valid cluster name (lower-case letter, then up to 23 of a-z 0-9 -)"
        )
    return name


class ClusterManager:
    def __init__(
        self,
        host_id: str,
        domsvc,
        allocator,
        limits,
        now_ms,
        wait_timeout: float = 120.0,
        guest_mtu: int = addressing.guest_mtu(addressing.DEFAULT_UNDERLAY_MTU),
        live_hosts: HostSet | None = None,
        liveness: Liveness | None = None,
        placeable_hosts: HostSet | None = None,
        members: Callable[[], tuple[str, ...]] | None = None,
        view_generation: Callable[[], int] | None = None,
    ):
        self.host_id = host_id
        self.domsvc = domsvc
        self.dom = domsvc.dom
        self.allocator = allocator
        self.limits = limits
        self.now_ms = now_ms
        self.wait_timeout = wait_timeout
        self.guest_mtu = guest_mtu
        self.new_token = lambda: secrets.token_hex(6)
        # Which hosts take new VMs, and how a host looks from here (the failure detector's view).
        self.live_hosts = live_hosts or (lambda: {host_id})
        # New VMs go only where the failure detector says alive (not suspect: maybe frozen).
        self.placeable_hosts = placeable_hosts or self.live_hosts
        self.members = members or (lambda: (host_id,))
        self.liveness = liveness or (lambda h: "alive" if h == host_id else "unknown")
        #: Changes whenever a host's liveness changes here (views show it; caches key on it).
        self.view_generation = view_generation or (lambda: 0)

    # -- templates ------------------------------------------------------------------------
    def templates(self) -> dict[str, Template]:
        out = {}
        for rec in self.dom.all(TemplateRec):
            if rec.body:
                out[rec.id] = from_dom_body(rec.body[0], f"DOM template {rec.id!r}")
        return out

    def template(self, name: str) -> Template:
        ts = self.templates()
        if not isinstance(name, str) or name not in ts:
            raise NoSuchTemplate(str(name), ts)
        return ts[name]

    # -- reads ----------------------------------------------------------------------------
    def cluster(self, name: str) -> ClusterView:
        c = self.dom.get(VClusterRec, name) if isinstance(name, str) else None
        if c is None:
            raise NoSuchCluster(str(name))
        vms = []
        for vm in sorted(self._vms_of(name), key=lambda v: _natural(v.name)):
            st = status_of(self.dom, vm)
            vms.append(
                VmView(
                    vm.name,
                    vm.role,
                    vm.host,
                    st.state if st else "pending",
                    vm.desired,
                    vm.ip,
                    vm.mac,
                    vm.vcpus,
                    vm.memory_mib,
                    self._detail(vm, st),
                    st.restarts if st else 0,
                )
            )
        return ClusterView(
            c.id,
            c.owner,
            c.template,
            c.count,
            _cluster_state(c, vms),
            c.vni,
            network_text(c),
            bridge_name(c.vni) if c.vni else c.bridge,
            vms,
        )

    def host_state(self, host: str) -> str:
        """How ``host`` looks from here: alive, suspect, dead, left or unknown."""
        rec = self.dom.get(HostRec, host)
        if rec is not None and rec.liveness == "left":
            return "left"
        return self.liveness(host)

    def _detail(self, vm: VmRec, st) -> str:
        """What a VM's view says besides its state: its host's own words (a hypervisor error),
        and, while it is pending or its host is not alive, what it waits for and what to do."""
        own = st.detail if st else ""
        if vm.desired == "absent":
            return own
        host = vm.host
        state = self.host_state(host)
        pending = st is None or st.state == "pending"
        if state == "alive":
            return own or (f"waiting for host {host} to start it" if pending else "")
        if state == "suspect":
            why = (
                f"host {host} is suspect (not answering); if it is declared dead, a VM that "
                "never ran there is placed on a live host automatically"
            )
        else:
            why = (
                f"host {host} is {state}; a VM that never ran there is placed on a live host "
                f"automatically, else an admin can run: vmweb host evacuate {host}"
            )
        if not pending:
            why = f"last reported {st.state} by host {host}, which is {state} now"
        return f"{why} ({own})" if own else why

    def clusters(self, owner: str | None = None) -> list[ClusterView]:
        recs = self.dom.select(VClusterRec, "owner", owner) if owner else self.dom.all(VClusterRec)
        names = sorted(c.id for c in recs)
        return [self.cluster(n) for n in names]

    def hosts(self) -> list[HostView]:
        out = []
        loads = self._loads()
        drained = drained_hosts(self.dom)
        for h in sorted(self.dom.all(HostRec), key=lambda h: h.id):
            load = loads.get(h.id)
            out.append(
                HostView(
                    h.id,
                    self.liveness(h.id) if h.liveness != "left" else "left",
                    h.api,
                    h.cpus,
                    h.memory_mib,
                    h.free_memory_mib,
                    h.load1,
                    host_usage(self.dom, h.id).vms,
                    load.used_vcpus if load else 0,
                    load.used_memory_mib if load else 0,
                    h.id in self.members(),
                    h.id in drained,
                )
            )
        return out

    def _vms_of(self, cluster: str) -> list[VmRec]:
        return self.dom.select(VmRec, "cluster", cluster)

    def _loads(self) -> dict[str, HostLoad]:
        return host_loads(self.dom, self.live_hosts())

    def _place(self, vms: list[tuple[str, int, int]], change: Change | None = None) -> dict[str, str]:
        """Hosts for new VMs, among those alive here (suspect and dead hosts get none); with a
        ``change``, a host's use is what its capacity set holds as that change sees it (or what
        the DOM puts on it, if more)."""
        loads = host_loads(self.dom, self.placeable_hosts(), placing=True)
        if change is not None:
            reserved_loads(loads, change)
        return place(
            list(loads.values()),
            vms,
            get_setting(self.dom, "placement"),
            float(get_setting(self.dom, "cpu_overcommit")),
        )

    def _reserving(self, vms: list[tuple[str, int, int]], owner: str, tokens: dict, hosts: dict):
        """The ``reserve`` step of an allocation: places ``vms`` from the change's capacity sets,
        records the placement in ``hosts`` and returns the change's compare-and-set, checked
        against every host's capacity and the owner's quota. ``tokens`` are the VMs' creation
        tokens (a reservation names the creation it is for)."""

        def reserve(change: Change) -> dict:
            placed = self._place(vms, change)
            hosts.clear()
            hosts.update(placed)
            for vm_id, vcpus, mem in vms:
                change.reserve(vm_id, placed[vm_id], vcpus, mem, owner, tokens[vm_id])
            return change.ops(*capacity_limits(self.dom))

        return reserve

    # -- writes ---------------------------------------------------------------------------
    @defer.inlineCallbacks
    def create(self, name, template, owner, count) -> ClusterView:
        """Leases addresses, places VMs and records the new cluster; VMs boot in the background."""
        _check_name(name)
        if not isinstance(owner, str) or not OWNER_RE.match(owner):
            raise InvalidArgument("owner", f"{owner!r} is not a valid user name")
        t = self.template(template)
        if self.dom.get(VClusterRec, name) is not None:
            raise NameTaken("virtual cluster", name)
        if len(self.dom.ids("vcluster")) >= self.limits.max_clusters:
            raise InvalidArgument(
                "name", f"the grid already has {self.limits.max_clusters} clusters (the limit)"
            )
        planned = expand(t, count, self.limits.max_vms_per_cluster)
        vm_ids = [f"{name}/{vm}" for vm, _ in planned]
        token = self.new_token()
        pool = self.allocator.pool(t.network.pool)
        hosts: dict[str, str] = {}
        tokens = {i: secrets.token_hex(4) for i in vm_ids}
        reserve = self._reserving(
            [(f"{name}/{vm}", r.vcpus, r.memory_mib) for vm, r in planned], owner, tokens, hosts
        )
        vni, addrs = yield self.allocator.allocate_cluster(
            name, token, vm_ids, t.network.pool, reserve=reserve
        )
        cluster = VClusterRec(
            id=name,
            owner=owner,
            template=t.name,
            count=count,
            vni=vni,
            network=network_name(name),
            bridge=bridge_name(vni),
            state="active",
            created_at=int(self.now_ms()),
            token=token,
            mode=t.network.mode,
            subnet=str(pool.cidr),
            gateway=str(pool.gateway_address),
            mtu=self.guest_mtu,
            dns=" ".join(t.network.dns),
        )
        recs = [cluster] + [
            self._vm_rec(name, vm, role, hosts[f"{name}/{vm}"], addrs[f"{name}/{vm}"], tokens[f"{name}/{vm}"])
            for vm, role in planned
        ]
        yield self.domsvc.put(*recs)
        log.info(
            "cluster {name} created for {owner}: {n} VMs of {template}",
            name=name,
            owner=owner,
            n=count,
            template=t.name,
        )
        return self.cluster(name)

    def _vm_rec(self, cluster, vm, role, host, addr, token) -> VmRec:
        return VmRec(
            id=f"{cluster}/{vm}",
            cluster=cluster,
            name=vm,
            role=role.name,
            host=host,
            vcpus=role.vcpus,
            memory_mib=role.memory_mib,
            image=role.image,
            ip=addr.ip,
            mac=addr.mac,
            desired="running",
            token=token,
        )

    @defer.inlineCallbacks
    def scale(self, name, count, force: bool = False) -> ClusterView:
        """Adds VMs (new addresses) or removes surplus ones (addresses given back once gone;
        their guests asked to shut down first, within ``stop_timeout_s``, unless ``force``)."""
        _check_name(name)
        force = _check_force(force)
        c = self.dom.get(VClusterRec, name)
        if c is None:
            raise NoSuchCluster(name)
        if c.state == "destroying":
            raise InvalidArgument("name", f"cluster {name!r} is being destroyed")
        t = self.template(c.template)
        existing = [vm for vm in self._vms_of(name) if vm.desired != "absent"]
        to_add, to_remove = plan_scale(
            t, [vm.name for vm in existing], count, self.limits.max_vms_per_cluster
        )
        recs = []
        if to_add:
            vm_ids = [f"{name}/{vm}" for vm, _ in to_add]
            hosts: dict[str, str] = {}
            tokens = {i: secrets.token_hex(4) for i in vm_ids}
            reserve = self._reserving(
                [(f"{name}/{vm}", r.vcpus, r.memory_mib) for vm, r in to_add], c.owner, tokens, hosts
            )
            addrs = yield self.allocator.allocate_vms(vm_ids, t.network.pool, c.token, reserve=reserve)
            recs += [
                self._vm_rec(
                    name, vm, role, hosts[f"{name}/{vm}"], addrs[f"{name}/{vm}"], tokens[f"{name}/{vm}"]
                )
                for vm, role in to_add
            ]
        removed_ids = [f"{name}/{vm}" for vm in to_remove]
        for vm in existing:
            if vm.id in removed_ids:
                recs.append(_replace(vm, desired="absent", force=force or None))
        recs.append(_replace(c, count=count))
        yield self.domsvc.put(*recs)
        log.info(
            "cluster {name} scaled to {count} (+{a} -{r})",
            name=name,
            count=count,
            a=len(to_add),
            r=len(to_remove),
        )
        if removed_ids:
            yield self.domsvc.wait_for(lambda: self._only_on_dead_hosts(removed_ids), self.wait_timeout)
        return self.cluster(name)

    def hosts_not_alive(self, cluster: str) -> list[str]:
        """The hosts holding VMs of ``cluster`` that are not alive (what its destroy waits for)."""
        live = self.live_hosts()
        return sorted({vm.host for vm in self._vms_of(cluster) if vm.host not in live})

    def _only_on_dead_hosts(self, vm_ids) -> bool:
        """True once none of ``vm_ids`` is left on a live host: the rest (if any) wait for a host
        that cannot act now, so a request stops waiting on them (``vmweb host evacuate``)."""
        live = self.live_hosts()
        return not any(vm.host in live for vm in (self.dom.get(VmRec, i) for i in vm_ids) if vm)

    @defer.inlineCallbacks
    def destroy(self, name, force: bool = False) -> bool:
        """Marks the cluster for destruction and waits (bounded) until every host gave back
        its VMs, volumes, network and addresses; returns True if that finished in time (False at
        once when its last VMs are on hosts that are not alive: they wait for those hosts, or for
        an admin's evacuation). Guests are asked to shut down first, within ``stop_timeout_s``,
        unless ``force`` (which also hurries a destroy already waiting for its guests)."""
        _check_name(name)
        force = _check_force(force)
        c = self.dom.get(VClusterRec, name)
        if c is None:
            raise NoSuchCluster(name)
        recs = [_replace(c, state="destroying")]
        recs += [
            _replace(vm, desired="absent", force=force or None)
            for vm in self._vms_of(name)
            if vm.desired != "absent" or (force and not vm.force)
        ]
        yield self.domsvc.put(*recs)
        log.info("cluster {name} being destroyed", name=name)
        ids = [vm.id for vm in self._vms_of(name)]
        yield self.domsvc.wait_for(
            lambda: (
                self.dom.get(VClusterRec, name) is None
                or (any(self.dom.get(VmRec, i) for i in ids) and self._only_on_dead_hosts(ids))
            ),
            self.wait_timeout,
        )
        return self.dom.get(VClusterRec, name) is None

    @defer.inlineCallbacks
    def set_vm_power(self, cluster, vm, desired: str, force: bool = False) -> VmView:
        """Sets a VM's desired power state and waits (bounded) until its host reports it.

        A stop asks the guest to shut down and lets it ``stop_timeout_s`` before its host powers
        it off; ``force`` powers it off at once (also a stop already waiting for its guest). A
        forced stop of a VM that is not running, a stop of a VM already stopped and a start
        with ``force`` are refused naming the argument. A start of a VM that should run but was
        left off (found stopped, ``restart_stopped`` false) writes its record again: that is
        what tells its host to start it."""
        _check_name(cluster, "cluster")
        force = _check_force(force)
        if self.dom.get(VClusterRec, cluster) is None:
            raise NoSuchCluster(cluster)
        rec = self.dom.get(VmRec, f"{cluster}/{vm}") if isinstance(vm, str) else None
        if rec is None or rec.desired == "absent":
            raise NoSuchVm(cluster, str(vm))
        st = status_of(self.dom, rec)
        observed = st.state if st is not None else "pending"
        if desired == "running":
            if force:
                raise InvalidArgument("force", f"VM {rec.id}: only a stop can be forced")
            if rec.desired != desired or observed not in ("running", "pending", "error"):
                yield self.domsvc.put(_replace(rec, desired=desired, force=None))
        else:
            if force and observed not in ("running", "stopping", "paused"):
                raise InvalidArgument(
                    "force", f"VM {rec.id} is not running (it is {observed}): there is nothing to power off"
                )
            if not force and rec.desired == "stopped" and observed == "shutoff":
                raise InvalidArgument("vm", f"VM {rec.id} is already stopped")
            if rec.desired != desired or (force and not rec.force):
                yield self.domsvc.put(_replace(rec, desired=desired, force=force or None))
        want = "running" if desired == "running" else "shutoff"

        def reached():
            cur = self.dom.get(VmRec, rec.id)
            st = status_of(self.dom, cur) if cur is not None else None
            return st is not None and st.state in (want, "error")

        yield self.domsvc.wait_for(reached, self.wait_timeout)
        return next(v for v in self.cluster(cluster).vms if v.name == vm)


def _check_force(force) -> bool:
    """``force`` as given over SOAP (None when an older client leaves it out)."""
    if force is None:
        return False
    if not isinstance(force, bool):
        raise InvalidArgument("force", f"{force!r} is not true or false")
    return force


def network_text(c: VClusterRec) -> str:
    """How a cluster's network reads in views: its mode, addresses and way out."""
    if not c.subnet:
        return c.network  # made before segments: its libvirt network
    out = f"{c.mode} {c.subnet}"
    if c.mode == "nat" and c.gateway:
        out += f" via {c.gateway}"
    return out + f", MTU {c.mtu}" if c.mtu else out


def _replace(rec, **changes):
    return dataclasses.replace(rec, **changes)


def _natural(name: str):
    m = re.match(r"^(.*?)(\d+)$", name)
    return (m.group(1), int(m.group(2))) if m else (name, -1)


def _cluster_state(c: VClusterRec, vms: list[VmView]) -> str:
    if c.state == "destroying":
        return "destroying"
    states = [v.state for v in vms if v.desired != "absent"]
    if any(s == "error" for s in states):
        return "degraded"
    if any(s == "pending" for s in states):
        return "creating"
    if any(v.desired == "absent" for v in vms):
        return "scaling"
    return "active"
