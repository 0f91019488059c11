"""The reconciler acts on what changed: a change to one VM is carried out by a pass over that VM
alone, a status write or another host's VM starts no pass, and the full pass stays for its interval.
Real libvirt test driver, one host in-process, the sweep interval set far beyond the test."""

import dataclasses

import pytest_twisted

from vmwebd.dom.records import VClusterRec, VmRec, VmStatus, status_of
from vmwebd.hv.naming import domain_name

WAIT = 30.0


def state_of(dom, vm_id):
    vm = dom.get(VmRec, vm_id)
    st = status_of(dom, vm) if vm is not None else None
    return st.state if st is not None else None


@pytest_twisted.inlineCallbacks
def test_a_change_to_one_vm_is_carried_out_without_a_full_pass(start_node):
    """Stopping one VM, moving one away and destroying the cluster each take change passes only."""
    h = yield start_node(reconcile_interval=3600)
    node, rec = h.node, h.node.reconciler
    dom = node.domsvc.dom
    yield h.call("CreateCluster", "lab1", "hpc", "alice", 4)
    yield rec.settled()
    assert all(state_of(dom, f"lab1/{n}") == "running" for n in ("head0", "compute0", "compute1"))
    full, passes = rec.full_passes, rec.passes

    vm = dom.get(VmRec, "lab1/compute0")
    yield node.domsvc.put(dataclasses.replace(vm, desired="stopped"))
    assert (yield node.domsvc.wait_for(lambda: state_of(dom, vm.id) == "shutoff", WAIT))
    assert rec.passes > passes and rec.full_passes == full

    # The VM now belongs to another host (as after an evacuation): its domain here is an orphan.
    moved = dom.get(VmRec, "lab1/compute1")
    yield node.domsvc.put(dataclasses.replace(moved, host="host9"))
    yield rec.idle()
    names = {d.name for d in (yield node.driver.list_domains())}
    assert domain_name(moved.id) not in names and domain_name("lab1/head0") in names
    assert rec.full_passes == full

    yield h.call("DestroyCluster", "lab1")
    assert (
        yield node.domsvc.wait_for(
            lambda: dom.get(VClusterRec, "lab1") is None or dom.count("vm", "cluster", "lab1") == 1, WAIT
        )
    )
    # lab1/compute1 is still assigned to host9, which is not here to remove it; the rest went.
    names = {d.name for d in (yield node.driver.list_domains())}
    assert not any(n.startswith("vmweb-lab1-") for n in names)
    assert rec.full_passes == full


@pytest_twisted.inlineCallbacks
def test_status_writes_and_other_hosts_vms_start_no_pass(start_node):
    """A status part written (by this host's own passes, or merged) and a VM assigned to another
    host ask for no pass: a grid at rest costs nothing here."""
    h = yield start_node(reconcile_interval=3600)
    node, rec = h.node, h.node.reconciler
    dom = node.domsvc.dom
    yield h.call("CreateCluster", "lab2", "hpc", "alice", 2)
    yield rec.settled()
    yield rec.idle()
    passes = rec.passes

    vm = dom.get(VmRec, "lab2/head0")
    st = status_of(dom, vm)
    yield node.domsvc.put(
        VmStatus(
            id=vm.id,
            host=node.host_id,
            state=st.state,
            detail="",
            restarts=st.restarts,
            observed_at=st.observed_at + 1,
            token=vm.token,
        )
    )
    assert not rec.pending()
    yield node.domsvc.put(VmRec(id="far/node0", cluster="far", name="node0", host="host9"))
    assert not rec.pending()
    assert rec.passes == passes
    # ... while a VM assigned here does.
    yield node.domsvc.put(dataclasses.replace(vm, desired="stopped"))
    assert rec.pending()
