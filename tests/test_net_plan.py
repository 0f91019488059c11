"""The network plan is a pure function of the DOM: checked against a brute-force reading of the
same records, and across replicas that received the same records in another order."""

import ipaddress
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmwebd.config import IpPool
from vmwebd.dom.document import Dom
from vmwebd.dom.hlc import HybridClock
from vmwebd.dom.records import HostRec, MigrationRec, VClusterRec, VmRec
from vmwebd.net import addressing
from vmwebd.net.plan import OVER, PlanCache, bridge_name, plan_grid, plan_host, underlay_of, vxlan_name

HOSTS = [f"h{i}" for i in range(5)]
PHASES = ["prepare", "ready", "migrating", "saved", "restored", "done", "failed"]


@st.composite
def grids(draw):
    hosts = []
    for i, h in enumerate(HOSTS):
        how = draw(st.sampled_from(["underlay", "peer", "none"]))
        hosts.append(
            HostRec(
                id=h,
                underlay=f"10.0.0.{i + 1}" if how == "underlay" else "",
                peer=f"10.0.1.{i + 1}:8570" if how == "peer" else "0.0.0.0:8570",
            )
        )
    clusters, vms, migrations = [], [], []
    for c in range(draw(st.integers(0, 4))):
        cid = f"c{c}"
        clusters.append(
            VClusterRec(
                id=cid,
                owner="u",
                vni=100 + c,
                mode=draw(st.sampled_from(["isolated", "nat"])),
                subnet="10.77.0.0/16",
                gateway="10.77.0.1",
                mtu=draw(st.sampled_from([0, 1450, 8950])),
            )
        )
        for n in range(draw(st.integers(0, 6))):
            vms.append(
                VmRec(
                    id=f"{cid}/n{n}",
                    cluster=cid,
                    name=f"n{n}",
                    host=draw(st.sampled_from(HOSTS)),
                    ip=f"10.77.{c + 1}.{n + 1}",
                    desired=draw(st.sampled_from(["running", "running", "stopped", "absent"])),
                )
            )
    for k in range(draw(st.integers(0, 3))):
        if not vms:
            break
        vm = draw(st.sampled_from(vms))
        migrations.append(
            MigrationRec(
                id=f"m{k}",
                vm=vm.id,
                source=vm.host,
                dest=draw(st.sampled_from(HOSTS)),
                phase=draw(st.sampled_from(PHASES)),
            )
        )
    return hosts, clusters, vms, migrations


def replica(records, order_seed=None) -> Dom:
    dom = Dom(HybridClock("w", lambda: 0))
    for rec in records:
        dom.put(rec)
    if order_seed is None:
        return dom
    # Another replica: the same entities merged in another order.
    other = Dom(HybridClock("x", lambda: 0))
    els = list(dom.entities())
    random.Random(order_seed).shuffle(els)
    for el in els:
        other.merge(el)
    return other


def brute_holders(vms, migrations, cluster) -> set[str]:
    out = {vm.host for vm in vms if vm.cluster == cluster and vm.desired != "absent"}
    for m in migrations:
        if m.vm.startswith(cluster + "/") and m.phase not in OVER:
            out |= {m.source, m.dest}
    return out


@pytest.mark.property
@settings(max_examples=200, deadline=None)
@given(grids(), st.integers(0, 2**32))
def test_plan_is_the_same_at_every_replica_and_says_what_the_records_say(grid, seed):
    hosts, clusters, vms, migrations = grid
    dom = replica([*hosts, *clusters, *vms, *migrations])
    plans = plan_grid(dom)
    assert plans == plan_grid(replica([*hosts, *clusters, *vms, *migrations], seed))
    underlays = {h.id: underlay_of(h) for h in hosts}
    for c in clusters:
        holders = brute_holders(vms, migrations, c.id)
        for h in HOSTS:
            seg = plans[h].segment(c.vni) if h in plans else None
            # a host has a cluster's devices exactly when it holds VMs of it
            assert (seg is not None) == (h in holders), (h, c.id, holders)
            if seg is None:
                continue
            assert (seg.bridge, seg.vxlan) == (bridge_name(c.vni), vxlan_name(c.vni))
            # every pair of hosts sharing the cluster list each other; nobody else is listed
            want = {underlays[o] for o in holders if o != h and underlays[o]} - {underlays[h]}
            assert set(seg.peers) == want
            assert list(seg.peers) == sorted(seg.peers)
            assert seg.mtu == (c.mtu or addressing.guest_mtu(addressing.DEFAULT_UNDERLAY_MTU))
            local = {vm.ip for vm in vms if vm.cluster == c.id and vm.host == h and vm.desired != "absent"}
            assert set(seg.local) == (local if c.mode == "nat" else set())
    for h, plan in plans.items():
        assert plan.underlay == underlays.get(h, "")
        assert [s.vni for s in plan.segments] == sorted({s.vni for s in plan.segments})
        assert plan == plan_host(dom, h)


def test_a_cluster_on_one_host_has_a_segment_without_peers_and_none_elsewhere():
    dom = replica(
        [
            HostRec(id="h0", underlay="10.0.0.1"),
            HostRec(id="h1", underlay="10.0.0.2"),
            VClusterRec(id="c", vni=101, mode="nat", subnet="10.77.0.0/16", gateway="10.77.0.1"),
            VmRec(id="c/n0", cluster="c", host="h0", ip="10.77.1.1"),
        ]
    )
    seg = plan_host(dom, "h0").segment(101)
    assert seg.peers == () and seg.routed and seg.local == ("10.77.1.1",)
    assert seg.gateway_mac == "02:76:6d:00:00:65"
    assert plan_host(dom, "h1").segments == ()


@pytest.mark.property
@settings(max_examples=200, deadline=None)
@given(st.integers(8, 30), st.integers(0, 2**32 - 1), st.booleans())
def test_pool_addresses_are_never_network_broadcast_or_gateway(prefix, base, wide_reserve):
    cidr = ipaddress.IPv4Network((base, prefix), strict=False)
    pool = IpPool("p", cidr)
    gw = pool.gateway_address
    addrs = []
    for a in pool.addresses():
        addrs.append(a)
        if len(addrs) == 600:
            break
    for a in addrs:
        assert a in cidr and a in pool
        assert a not in (cidr.network_address, cidr.broadcast_address, gw)
        if prefix < 24:
            assert int(a) & 0xFF not in (0, 255)
    assert gw not in pool and cidr.network_address not in pool and cidr.broadcast_address not in pool
    if prefix <= 29:
        assert addrs, "a pool of 4 or more addresses holds a VM"


@pytest.mark.property
@settings(max_examples=100, deadline=None)
@given(grids(), grids(), st.lists(st.integers(0, 10**6), max_size=30))
def test_the_plan_cache_answers_what_plan_host_answers(first, second, picks):
    """A host's cached plan equals a fresh one after every write, whatever they were: records of
    one grid, then records of another (hosts moving, clusters and VMs changed, migrations)."""
    dom = replica([])
    caches = {h: PlanCache() for h in HOSTS}
    writes = [r for g in (first, second) for part in g for r in part]
    order = list(range(len(writes)))
    for i, p in enumerate(picks):
        if order:
            j = p % len(order)
            order[i % len(order)], order[j] = order[j], order[i % len(order)]
    for n, i in enumerate(order):
        rec = writes[i]
        if n % 7 == 3 and isinstance(rec, VmRec):
            dom.delete("vm", rec.id)
        else:
            dom.put(rec)
        for h in HOSTS:
            assert caches[h].plan_host(dom, h) == plan_host(dom, h), (n, h)
