"""Which network devices each host should have: a pure function of the DOM.

A virtual cluster is one L2 segment across hosts. Every host that *holds* VMs of the cluster has:

* a bridge ``vmbr<VNI>`` its guests' NICs are on (MTU: the cluster's guest MTU);
* a VXLAN device ``vmvx<VNI>`` on that bridge, VNI the cluster's leased network id, UDP 4789, from
  the host's underlay address, learning off, with one all-zeros forwarding entry per *other* holder
  (head-end replication: broadcast and unknown unicast go to exactly those hosts);
* in ``nat`` mode, the segment's gateway address on the bridge, with the same MAC on every host,
  answered locally (ARP for it never crosses the VXLAN) and masqueraded out of the host; as the
  clusters of one pool share its network (see :mod:`vmwebd.net.addressing`), the address goes on
  without its prefix route, and each local guest's address is routed to its bridge.

A host *holds* a cluster while the DOM places a VM of it there that is not being removed
(``desired`` not ``absent``), or while a migration of one of its VMs from or to that host is not
over (its destination needs the segment before the guest arrives; its source keeps it until the
guest left). Nothing else enters: the plan is the same at every replica that has the same DOM, and
depends neither on time nor on what the hypervisor or the kernel reports.

Executors (:mod:`vmwebd.net.netlink` on a real host, :mod:`vmwebd.net.record` where no real host is
there) make the kernel match a :class:`HostPlan` and remove devices of ours that it does not list.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vmwebd.dom.records import HostRec, MigrationRec, VClusterRec, VmRec
from vmwebd.net import addressing

BRIDGE_PREFIX = "vmbr"
VXLAN_PREFIX = "vmvx"
#: Migration phases after which a migration no longer needs the segment at either end.
OVER = frozenset({"done", "failed"})


def bridge_name(vni: int) -> str:
    return f"{BRIDGE_PREFIX}{vni}"


def vxlan_name(vni: int) -> str:
    return f"{VXLAN_PREFIX}{vni}"


@dataclass(frozen=True, order=True)
class Segment:
    """One cluster's segment as one host should have it."""

    vni: int
    cluster: str
    mode: str  # isolated | nat
    mtu: int  # the guests' MTU (the bridge's and the VXLAN device's)
    subnet: str  # the segment's network ("" for clusters made without one)
    gateway: str  # its gateway address ("" when it has none)
    peers: tuple[str, ...]  # underlay addresses of the other holders, sorted
    #: Addresses of the cluster's guests on this host, routed segments only: clusters of one pool
    #: share its network, so the host routes each local guest's address to its own bridge.
    local: tuple[str, ...] = ()

    @property
    def bridge(self) -> str:
        return bridge_name(self.vni)

    @property
    def vxlan(self) -> str:
        return vxlan_name(self.vni)

    @property
    def gateway_mac(self) -> str:
        return addressing.gateway_mac(self.vni)

    @property
    def prefix(self) -> int:
        return addressing.prefix_of(self.subnet) if self.subnet else 0

    @property
    def routed(self) -> bool:
        """Whether this host answers the gateway and masquerades the segment out."""
        return self.mode == "nat" and bool(self.gateway) and bool(self.subnet)


@dataclass(frozen=True)
class HostPlan:
    """What one host should have: its underlay address and its segments, by network id."""

    host: str
    underlay: str
    segments: tuple[Segment, ...] = ()

    def segment(self, vni: int) -> Segment | None:
        return next((s for s in self.segments if s.vni == vni), None)

    def clusters(self) -> frozenset[str]:
        return frozenset(s.cluster for s in self.segments)


def underlay_of(rec: HostRec | None) -> str:
    """A host's underlay address: the one it published, else the address of its peer endpoint."""
    if rec is None:
        return ""
    if rec.underlay:
        return rec.underlay
    host, sep, _port = rec.peer.rpartition(":")
    host = host.strip("[]") if sep else ""
    return "" if host in ("", "0.0.0.0", "::") else host


def _open_migrations(dom) -> list[MigrationRec]:
    return [m for m in dom.all(MigrationRec) if m.phase not in OVER]


def holders(dom, cluster: str, migrations: list[MigrationRec] | None = None) -> frozenset[str]:
    """The hosts that hold VMs of ``cluster`` (see the module's docstring)."""
    out = {vm.host for vm in dom.select(VmRec, "cluster", cluster) if vm.host and vm.desired != "absent"}
    prefix = cluster + "/"
    for m in _open_migrations(dom) if migrations is None else migrations:
        if m.vm.startswith(prefix):
            out.update(h for h in (m.source, m.dest) if h)
    return frozenset(out)


def segment_of(dom, cluster: VClusterRec, host: str, hosts: frozenset[str]) -> Segment:
    """``cluster``'s segment on ``host``, given the set of its holders."""
    peers = set()
    for h in hosts:
        if h != host:
            addr = underlay_of(dom.get(HostRec, h))
            if addr:
                peers.add(addr)
    mine = underlay_of(dom.get(HostRec, host))
    peers.discard(mine)
    seg = Segment(
        vni=cluster.vni,
        cluster=cluster.id,
        mode=cluster.mode or "isolated",
        mtu=cluster.mtu or addressing.guest_mtu(addressing.DEFAULT_UNDERLAY_MTU),
        subnet=cluster.subnet,
        gateway=cluster.gateway,
        peers=tuple(sorted(peers)),
    )
    if seg.routed:
        local = sorted(
            (
                vm.ip
                for vm in dom.select(VmRec, "cluster", cluster.id)
                if vm.host == host and vm.ip and vm.desired != "absent"
            ),
            key=addressing.sort_key,
        )
        seg = dataclasses.replace(seg, local=tuple(local))
    return seg


def plan_host(dom, host: str) -> HostPlan:
    """The devices ``host`` should have. Costs the VMs of the clusters it holds, not the grid's."""
    migrations = _open_migrations(dom)
    candidates = {vm.cluster for vm in dom.select(VmRec, "host", host) if vm.desired != "absent"}
    for m in migrations:
        if host in (m.source, m.dest):
            candidates.add(m.vm.partition("/")[0])
    segments = []
    for cid in candidates:
        c = dom.get(VClusterRec, cid)
        if c is None or not c.vni:
            continue
        hs = holders(dom, cid, migrations)
        if host in hs:
            segments.append(segment_of(dom, c, host, hs))
    return HostPlan(host=host, underlay=underlay_of(dom.get(HostRec, host)), segments=tuple(sorted(segments)))


def plan_grid(dom) -> dict[str, HostPlan]:
    """Every host's plan (for views and tests; a host applies only its own)."""
    hosts = {h.id for h in dom.all(HostRec)} | {vm.host for vm in dom.all(VmRec) if vm.host}
    return {h: plan_host(dom, h) for h in sorted(hosts)}


class PlanCache:
    """:func:`plan_host` with a memory, for the host that applies its plan at every pass: a
    cluster's segment is worked out again only when one of its VMs, its record, the open
    migrations or the hosts' underlay addresses changed (the DOM's generation counters say so).
    Its answers are :func:`plan_host`'s (property-tested)."""

    def __init__(self):
        self._memo: dict[str, tuple[tuple, Segment | None]] = {}
        self._hosts_gen = -1
        self._underlays: dict[str, str] = {}
        self._migrations_gen = -1
        self._migrations: list[MigrationRec] = []

    def plan_host(self, dom, host: str) -> HostPlan:
        hosts_gen = dom.kind_generation("host")
        if hosts_gen != self._hosts_gen:
            self._hosts_gen = hosts_gen
            underlays = {h.id: underlay_of(h) for h in dom.all(HostRec)}
            if underlays != self._underlays:
                self._underlays = underlays
                self._memo.clear()
        migrations_gen = dom.kind_generation("migration")
        if migrations_gen != self._migrations_gen:
            self._migrations_gen = migrations_gen
            self._migrations = _open_migrations(dom)
        migrations = self._migrations
        candidates = {vm.cluster for vm in dom.select(VmRec, "host", host) if vm.desired != "absent"}
        for m in migrations:
            if host in (m.source, m.dest):
                candidates.add(m.vm.partition("/")[0])
        segments = []
        for cid in candidates:
            key = (
                host,
                dom.generation("vm", "cluster", cid),
                dom.version_of("vcluster", cid),
                migrations_gen,
            )
            hit = self._memo.get(cid)
            if hit is not None and hit[0] == key:
                seg = hit[1]
            else:
                seg = None
                c = dom.get(VClusterRec, cid)
                if c is not None and c.vni:
                    hs = holders(dom, cid, migrations)
                    if host in hs:
                        seg = segment_of(dom, c, host, hs)
                self._memo[cid] = (key, seg)
            if seg is not None:
                segments.append(seg)
        for cid in [c for c in self._memo if c not in candidates]:
            del self._memo[cid]
        return HostPlan(
            host=host, underlay=underlay_of(dom.get(HostRec, host)), segments=tuple(sorted(segments))
        )
