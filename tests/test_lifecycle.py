"""A cluster's whole life on one host, through the real SOAP API (zeep) and the libvirt test driver."""

from pathlib import Path

import pytest
import pytest_twisted

from vmwebd.client import ApiFault
from vmwebd.dom.records import LeaseRec, VClusterRec, VmRec
from vmwebd.hv.naming import domain_name


def running(cluster):
    return [v for v in cluster["vms"] if v["state"] == "running"]


@pytest_twisted.inlineCallbacks
def test_create_scale_destroy_round_trip(start_node):
    """Create boots every VM with unique addresses; scale grows and shrinks; destroy gives all back."""
    h = yield start_node()
    node = h.node
    dom = node.domsvc.dom
    before_leases = len(dom.all(LeaseRec))
    c = yield h.call("CreateCluster", "lab1", "hpc", "alice", 4)
    assert c["name"] == "lab1" and c["count"] == 4
    assert sorted(v["name"] for v in c["vms"]) == ["compute0", "compute1", "compute2", "head0"]
    yield node.reconciler.settled()
    c = yield h.call("GetCluster", "lab1")
    assert len(running(c)) == 4, c
    ips = [v["ip"] for v in c["vms"]]
    macs = [v["mac"] for v in c["vms"]]
    assert len(set(ips)) == 4 and len(set(macs)) == 4
    domains = {d.name: d.state for d in (yield node.driver.list_domains())}
    assert all(domains[domain_name(f"lab1/{v['name']}")] == "running" for v in c["vms"])
    # its segment is planned and recorded (the test driver has no kernel devices to make)
    lab1 = dom.get(VClusterRec, "lab1")
    seg = node.net.current().segment(lab1.vni)
    assert (seg.cluster, seg.bridge, seg.peers, seg.mode) == ("lab1", f"vmbr{lab1.vni}", (), "isolated")
    assert (yield node.driver.list_networks()) == []
    seeds = sorted(p.name for p in Path(node.reconciler.storage.dir).glob("*.seed.iso"))
    assert seeds == sorted(f"{domain_name('lab1/' + v['name'])}.seed.iso" for v in c["vms"])
    vols = yield node.driver.list_volumes("vmweb")
    assert sum(1 for v in vols if v.startswith("vmweb-lab1-")) == 4

    c = yield h.call("ScaleCluster", "lab1", 6)
    yield node.reconciler.settled()
    c = yield h.call("GetCluster", "lab1")
    assert len(running(c)) == 6 and c["count"] == 6

    c = yield h.call("ScaleCluster", "lab1", 2)
    assert sorted(v["name"] for v in c["vms"]) == ["compute0", "head0"]
    kept_ips = {v["ip"] for v in c["vms"]}
    leased_ips = {l.id.split("/")[-1] for l in dom.all(LeaseRec) if l.id.startswith("ip/")}
    assert leased_ips == kept_ips
    domains = {d.name for d in (yield node.driver.list_domains())}
    assert domains == {domain_name("lab1/head0"), domain_name("lab1/compute0")}

    state = yield h.call("DestroyCluster", "lab1")
    assert state == "destroyed"
    assert (yield node.driver.list_domains()) == []
    assert node.net.current().segments == ()
    assert list(Path(node.reconciler.storage.dir).glob("*.seed.iso")) == []
    assert [v for v in (yield node.driver.list_volumes("vmweb")) if v.startswith("vmweb-")] == []
    assert len(dom.all(LeaseRec)) == before_leases == 0
    assert dom.all(VmRec) == []
    with pytest.raises(ApiFault) as e:
        yield h.call("GetCluster", "lab1")
    assert e.value.code == "Client.NoSuchCluster" and "lab1" in e.value.message


@pytest_twisted.inlineCallbacks
def test_name_is_free_again_after_destroy(start_node):
    """A destroyed cluster's name and addresses can be used again by a new cluster."""
    h = yield start_node()
    c1 = yield h.call("CreateCluster", "again", "lab", "bob", 2)
    yield h.node.reconciler.settled()
    c1 = yield h.call("GetCluster", "again")
    assert [v["state"] for v in c1["vms"]] == ["running", "running"]
    yield h.call("DestroyCluster", "again")
    c2 = yield h.call("CreateCluster", "again", "lab", "bob", 2)
    assert {v["ip"] for v in c2["vms"]} == {v["ip"] for v in c1["vms"]}
    # The new VMs are new: not "pending" with the old ones' status, nor "restarted" because
    # the old status said running (a deleted VM's status part outlives its tombstone).
    assert [v["state"] for v in c2["vms"]] == ["pending", "pending"]
    yield h.node.reconciler.settled()
    c2 = yield h.call("GetCluster", "again")
    assert [(v["state"], v["restarts"], v["detail"] or "") for v in c2["vms"]] == [("running", 0, "")] * 2
    # Same after a scale down and up again (the name pc1 comes back within one cluster).
    yield h.call("ScaleCluster", "again", 1)
    yield h.call("ScaleCluster", "again", 2)
    yield h.node.reconciler.settled()
    c2 = yield h.call("GetCluster", "again")
    assert [(v["state"], v["restarts"], v["detail"] or "") for v in c2["vms"]] == [("running", 0, "")] * 2


@pytest_twisted.inlineCallbacks
def test_vm_destroyed_behind_our_back_is_restarted_and_recorded(start_node):
    """A VM killed directly in libvirt shows up in the DOM as a restart and runs again."""
    h = yield start_node()
    node = h.node
    yield h.call("CreateCluster", "web", "webtier", "carol", 3)
    yield node.reconciler.settled()
    victim = domain_name("web/worker0")
    yield node.driver.destroy(victim)
    yield node.reconciler.settled()
    c = yield h.call("GetCluster", "web")
    vm = next(v for v in c["vms"] if v["name"] == "worker0")
    assert vm["restarts"] == 1 and "restarted" in vm["detail"]
    assert (yield node.driver.state(victim)).state == "running"


@pytest_twisted.inlineCallbacks
def test_orphan_domain_is_removed(start_node):
    """A vmweb domain the DOM does not know (left from a crash) is destroyed and undefined, and
    a libvirt network of ours (clusters had one before segments) is removed."""
    from vmwebd.hv.driver import DomainSpec

    h = yield start_node()
    node = h.node
    yield node.driver.define_network("vmweb-ghost", "vmbr9")
    yield node.driver.define(
        DomainSpec(
            name="vmweb-ghost-node0",
            vcpus=1,
            memory_mib=128,
            disk_path="/nonexistent.qcow2",
            network="vmweb-ghost",
            mac="52:54:00:00:00:01",
        )
    )
    yield node.driver.start("vmweb-ghost-node0")
    yield node.reconciler.settled()
    assert (yield node.driver.state("vmweb-ghost-node0")).state == "missing"
    assert "vmweb-ghost" not in (yield node.driver.list_networks())


@pytest_twisted.inlineCallbacks
def test_stop_and_start_vm(start_node):
    """StopVm shuts a VM off and StartVm brings it back, each reported in the VM's state."""
    h = yield start_node()
    yield h.call("CreateCluster", "pw", "lab", "dave", 2)
    yield h.node.reconciler.settled()
    vm = yield h.call("StopVm", "pw", "pc0")
    assert vm["state"] == "shutoff" and vm["desired"] == "stopped"
    assert (yield h.node.driver.state(domain_name("pw/pc0"))).state == "shutoff"
    vm = yield h.call("StartVm", "pw", "pc0")
    assert vm["state"] == "running"


@pytest_twisted.inlineCallbacks
def test_listings_settings_and_dom(start_node):
    """ListTemplates, ListHosts, ListClusters(owner), Get/SetSetting and GetDom answer consistently."""
    h = yield start_node(cpus=12, memory_mib=24576)
    ts = yield h.call("ListTemplates")
    assert {"hpc", "webtier", "lab"} <= {t["name"] for t in ts}
    hosts = yield h.call("ListHosts")
    assert [(x["id"], x["cpus"], x["memory_mib"], x["liveness"]) for x in hosts] == [
        ("host1", 12, 24576, "alive")
    ]
    yield h.call("CreateCluster", "a1", "lab", "alice", 1)
    yield h.call("CreateCluster", "b1", "lab", "bob", 1)
    assert [c["name"] for c in (yield h.call("ListClusters", "alice"))] == ["a1"]
    assert [c["name"] for c in (yield h.call("ListClusters", None))] == ["a1", "b1"]
    s = yield h.call("SetSetting", "placement", "pack")
    assert s["value"] == "pack"
    assert {x["key"]: x["value"] for x in (yield h.call("GetSettings"))}["placement"] == "pack"
    dom = yield h.call("GetDom")
    assert '<vcluster id="a1"' in dom and 'owner="bob"' in dom


BAD_CALLS = [
    (("CreateCluster", "x1", "nosuch", "alice", 2), "Client.NoSuchTemplate", "nosuch"),
    (("CreateCluster", "x1", "hpc", "alice", 0), "Client.InvalidArgument", "count"),
    (("CreateCluster", "x1", "hpc", "alice", -3), "Client.InvalidArgument", "count"),
    (("CreateCluster", "x1", "hpc", "alice", 100000), "Client.InvalidArgument", "count"),
    (("CreateCluster", "Bad Name!", "hpc", "alice", 2), "Client.InvalidArgument", "name"),
    (("CreateCluster", "x1", "hpc", "", 2), "Client.InvalidArgument", "owner"),
    (("CreateCluster", "x1", "hpc", "alice", None), "Client.InvalidArgument", "count"),
    (("ScaleCluster", "nosuch", 3), "Client.NoSuchCluster", "nosuch"),
    (("DestroyCluster", "nosuch"), "Client.NoSuchCluster", "nosuch"),
    (("StartVm", "nosuch", "node0"), "Client.NoSuchCluster", "nosuch"),
    (("SetSetting", "placement", "random"), "Client.InvalidArgument", "placement"),
    (("SetSetting", "colour", "red"), "Client.NoSuchSetting", "colour"),
]


def dom_but_audit(node) -> bytes:
    """The replica's content but its audit trail (a refused request leaves its record there) and
    the host records (the heartbeat rewrites this host's once it has written such records)."""
    import copy

    from lxml import etree

    root = copy.deepcopy(node.domsvc.dom.root)
    for box in ("audits", "hosts"):
        root.remove(root.find("{urn:vmweb:dom:1}" + box))
    return etree.tostring(root, method="c14n")


@pytest_twisted.inlineCallbacks
def test_bad_requests_get_specific_faults_and_change_nothing(start_node):
    """Each bad request gets its specific faultcode naming the field, and the DOM is unchanged."""
    h = yield start_node()
    yield h.call("CreateCluster", "taken", "lab", "alice", 1)
    yield h.node.reconciler.settled()
    before = dom_but_audit(h.node)
    for args, code, needle in BAD_CALLS + [
        (("CreateCluster", "taken", "lab", "bob", 1), "Client.NameTaken", "taken"),
        (("StopVm", "taken", "nosuch"), "Client.NoSuchVm", "nosuch"),
    ]:
        with pytest.raises(ApiFault) as e:
            yield h.call(*args)
        assert e.value.code == code, (args, e.value)
        assert needle in e.value.message, (args, e.value)
    assert dom_but_audit(h.node) == before


@pytest_twisted.inlineCallbacks
def test_pool_exhausted_leaks_nothing(start_node):
    """A cluster bigger than the address pool fails with Server.PoolExhausted and leases nothing."""
    # 6 host addresses, one of them the gateway (10.9.0.1): 5 for VMs
    h = yield start_node(pool_cidr="10.9.0.0/29", reserve="")
    yield h.call("CreateCluster", "small", "lab", "alice", 4)
    yield h.node.reconciler.settled()
    before = dom_but_audit(h.node)
    with pytest.raises(ApiFault) as e:
        yield h.call("CreateCluster", "big", "lab", "alice", 2)
    assert e.value.code == "Server.PoolExhausted" and "'lab'" in e.value.message
    assert dom_but_audit(h.node) == before
    with pytest.raises(ApiFault) as e:
        yield h.call("ScaleCluster", "small", 6)
    assert e.value.code == "Server.PoolExhausted"
    c = yield h.call("ScaleCluster", "small", 5)
    assert sorted(v["ip"] for v in c["vms"]) == [f"10.9.0.{i}" for i in range(2, 7)]


@pytest_twisted.inlineCallbacks
def test_leases_without_holder_are_released_after_grace(start_node):
    """Leases taken by a request that died before recording its cluster are given back later."""
    h = yield start_node()
    node = h.node
    yield node.allocator.allocate_cluster("ghost", "t0ken", ["ghost/pc0", "ghost/pc1"], "lab")
    assert len(node.domsvc.dom.all(LeaseRec)) == 6  # name, vni, 2 IPs, 2 MACs
    yield node.reconciler.settled()
    assert len(node.domsvc.dom.all(LeaseRec)) == 6  # still inside the grace period
    node.reconciler.lease_grace_s = 0
    yield node.reconciler.settled()
    assert node.domsvc.dom.all(LeaseRec) == []
    c = yield h.call("CreateCluster", "ghost", "lab", "alice", 2)
    assert c["name"] == "ghost"


@pytest_twisted.inlineCallbacks
def test_adding_an_unreachable_member_costs_the_quorum(start_node):
    """After AddHost of a host that never answers, leases need 2 of 2 members: NoQuorum, reads work."""
    h = yield start_node()
    assert (yield h.call("AddHost", "host2")) == ["host1", "host2"]
    hosts = yield h.call("ListHosts")
    assert [x["member"] for x in hosts] == [True]
    with pytest.raises(ApiFault) as e:
        yield h.call("CreateCluster", "nq", "lab", "alice", 1)
    assert e.value.code == "Server.NoQuorum"
    assert "1 of 2 member hosts answered, 2 needed" in e.value.message
    assert (yield h.call("ListClusters", None)) in (None, [])
    with pytest.raises(ApiFault) as e:
        yield h.call("AddHost", "host1")
    assert e.value.code == "Client.InvalidArgument" and "already" in e.value.message
    with pytest.raises(ApiFault) as e:
        yield h.call("RemoveHost", "host9")
    assert e.value.code == "Client.NoSuchHost"


@pytest_twisted.inlineCallbacks
def test_ended_migrations_are_deleted_after_the_history_period_by_their_source(start_node):
    """The source host deletes its ended migrations once older than the history period (an
    evacuation's by its destination); newer ones, other hosts' and moves under way stay."""
    from vmwebd.dom.records import MigrationRec
    from vmwebd.migrate.state import HISTORY_MS

    h = yield start_node()
    node = h.node
    now = int(node.now_ms())
    old = now - HISTORY_MS - 1000
    yield node.domsvc.put(
        MigrationRec(
            id="old",
            vm="c/pc0",
            source="host1",
            dest="host2",
            phase="done",
            mode="cold",
            started_at=old,
            finished_at=old,
        ),
        MigrationRec(
            id="oldevac",
            vm="c/pc1",
            source="host2",
            dest="host1",
            phase="done",
            mode="evacuate",
            started_at=old,
            finished_at=old,
        ),
        MigrationRec(
            id="recent",
            vm="c/pc0",
            source="host1",
            dest="host2",
            phase="failed",
            mode="cold",
            started_at=now - 1000,
            finished_at=now - 500,
        ),
        MigrationRec(
            id="others",
            vm="c/pc2",
            source="host2",
            dest="host3",
            phase="done",
            mode="cold",
            started_at=old,
            finished_at=old,
        ),
    )
    yield node.migrations.sweep()
    left = sorted(m.id for m in node.domsvc.dom.all(MigrationRec))
    assert left == ["others", "recent"]
    assert node.domsvc.dom.version_of("migration", "old") is not None  # a tombstone, for now
