"""The reconciler keeps a host's segments and its guests' seeds in step with the DOM: a member of a
cluster held here that comes, goes or moves anywhere in the grid changes the forwarding entries and
the hosts files, without a full pass; a segment that cannot be made shows in its VMs' status while
the others run. One host in-process on libvirt's test driver; devices planned and recorded."""

import dataclasses

import pytest_twisted

from vmwebd.dom.records import HostRec, UserRec, VClusterRec, VmRec, status_of
from vmwebd.net import seed
from vmwebd.net.devices import Applied, RecordedDevices

WAIT = 30.0
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0wmN/Cr3JXqmLW7u+g9pTh+wyqDHpSMi7ZzX2pZp1w alice@laptop"


def hosts_file(path) -> str:
    _label, files = seed.read_iso(open(path, "rb").read())
    return files["user-data"].decode()


@pytest_twisted.inlineCallbacks
def test_members_elsewhere_change_the_segment_and_the_seeds_here(start_node):
    h = yield start_node(reconcile_interval=3600)
    node, rec = h.node, h.node.reconciler
    dom = node.domsvc.dom
    yield h.call("CreateCluster", "lab1", "lab", "alice", 2)
    yield rec.settled()
    c = dom.get(VClusterRec, "lab1")
    seg = node.net.current().segment(c.vni)
    assert seg.peers == () and seg.bridge == f"vmbr{c.vni}"
    full = rec.full_passes
    pc0 = rec.seed_path("lab1/pc0")
    assert "pc1.lab1" in hosts_file(pc0) and "pc7" not in hosts_file(pc0)

    # another host, and a new member of lab1 placed there (as a scale at that host would)
    yield node.domsvc.put(HostRec(id="host9", peer="10.0.0.9:8570", underlay="192.0.2.9"))
    yield node.domsvc.put(
        VmRec(
            id="lab1/pc7",
            cluster="lab1",
            name="pc7",
            host="host9",
            ip="10.77.1.77",
            mac="52:54:00:00:07:07",
            token="t7",
        )
    )
    yield rec.idle()
    assert node.net.current().segment(c.vni).peers == ("192.0.2.9",)
    assert "10.77.1.77 pc7.lab1 pc7" in hosts_file(pc0)

    # its host publishes another underlay address: the entry follows
    yield node.domsvc.put(HostRec(id="host9", peer="10.0.0.9:8570", underlay="192.0.2.99"))
    yield rec.idle()
    assert node.net.current().segment(c.vni).peers == ("192.0.2.99",)

    # the owner adds a key: the seeds of the owner's VMs here carry it
    alice = dom.get(UserRec, "alice") or UserRec(id="alice")
    yield node.domsvc.put(dataclasses.replace(alice, ssh_keys=UserRec.encode_ssh_keys([KEY])))
    yield rec.idle()
    assert "alice@laptop" in hosts_file(pc0)

    # the member goes away: no entry left towards its host, gone from the hosts file
    yield node.domsvc.delete(("vm", "lab1/pc7"))
    yield rec.idle()
    assert node.net.current().segment(c.vni).peers == ()
    assert "pc7" not in hosts_file(pc0)
    assert rec.full_passes == full

    yield h.call("DestroyCluster", "lab1")
    assert node.net.current().segments == ()


class RefusingDevices(RecordedDevices):
    """Records like a test-driver host, but reports the segments it is told to refuse as failed
    (what a real host does when a device of that name is not vmweb's)."""

    def __init__(self, refuse: set[int]):
        super().__init__()
        self.refuse = refuse

    def apply(self, plan):
        d = super().apply(plan)
        failed = {
            s.vni: f"device vmvx{s.vni} exists and is not vmweb's"
            for s in plan.segments
            if s.vni in self.refuse
        }
        return d.addCallback(lambda a: Applied(failed=failed, removed=a.removed, changed=a.changed))


@pytest_twisted.inlineCallbacks
def test_a_segment_that_cannot_be_made_shows_in_its_vms_and_spares_the_others(start_node):
    refuse: set[int] = set()
    h = yield start_node(reconcile_interval=3600, net=RefusingDevices(refuse))
    node, rec = h.node, h.node.reconciler
    dom = node.domsvc.dom
    yield h.call("CreateCluster", "good", "lab", "alice", 1)
    refuse.add(dom.get(VClusterRec, "good").vni + 1)  # the next network id
    yield h.call("CreateCluster", "bad", "lab", "bob", 1)
    assert dom.get(VClusterRec, "bad").vni in refuse
    yield rec.settled()

    def state(vm_id):
        st = status_of(dom, dom.get(VmRec, vm_id))
        return (st.state, st.detail) if st else None

    assert state("good/pc0") == ("running", "")
    st, detail = state("bad/pc0")
    assert st == "error" and f"vmvx{dom.get(VClusterRec, 'bad').vni} exists and is not vmweb's" in detail
    c = yield h.call("GetCluster", "bad")
    assert c["state"] == "degraded"

    # the device is cleared away: the next pass makes the segment and boots the VM
    refuse.clear()
    yield rec.settled()
    assert (yield node.domsvc.wait_for(lambda: state("bad/pc0") == ("running", ""), WAIT))
