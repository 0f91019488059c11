"""The migration manager carries out the phase machine's answers, on one real node (libvirt's
test driver): a sweep's timeout, a restart in the middle of a move, a VM gone before its
destination prepares. The decisions themselves are tests/test_migration_phases.py's."""

import pytest_twisted

from vmwebd.dom.records import MigrationRec, VmRec
from vmwebd.migrate.phases import Limits


def _migration(node, mid, **kw):
    now = int(node.now_ms())
    fields = dict(
        id=mid,
        vm="lab1/pc0",
        source="host1",
        dest="host2",
        phase="prepare",
        mode="cold",
        started_at=now - 1000,
    )
    fields.update(kw)
    return MigrationRec(**fields)


@pytest_twisted.inlineCallbacks
def test_the_sweep_fails_a_move_whose_destination_stays_dead_past_its_grace(start_node):
    """host2 is not alive here: a sweep within the grace waits, one past it fails the move with
    the machine's reason, and the VM's record stays on its source."""
    h = yield start_node()
    node = h.node
    yield h.call("CreateCluster", "lab1", "lab", "alice", 1)
    yield node.reconciler.settled()
    vm = node.domsvc.dom.all(VmRec)[0]
    yield node.domsvc.put(_migration(node, "m1", vm=vm.id))
    mgr = node.migrations
    yield mgr.sweep()
    assert node.domsvc.dom.get(MigrationRec, "m1").phase == "prepare"
    mgr.limits = Limits(host_down_grace_s=0.0)
    yield mgr.sweep()
    m = yield mgr.wait("m1", 10)
    assert m.phase == "failed"
    assert m.error.startswith("phase prepare: host host2 has not been alive for "), m.error
    assert node.domsvc.dom.get(VmRec, vm.id).host == "host1"


@pytest_twisted.inlineCallbacks
def test_a_source_restarted_during_a_live_move_fails_it_and_a_destination_resumes(start_node):
    """After a restart, a move this host was the source of in ``migrating`` is failed; one it
    is only the destination of in ``ready`` is left to its source."""
    h = yield start_node()
    node = h.node
    yield h.call("CreateCluster", "lab1", "lab", "alice", 1)
    yield node.reconciler.settled()
    vm = node.domsvc.dom.all(VmRec)[0]
    yield node.domsvc.put(
        _migration(node, "m2", vm=vm.id, phase="migrating", mode="live"),
        _migration(node, "m3", vm="lab1/other", source="host2", dest="host1", phase="ready", mode="live"),
    )
    node.migrations.resume()
    m = yield node.migrations.wait("m2", 10)
    assert m.phase == "failed" and m.error == "phase migrating: host host1 restarted during phase 'migrating'"
    assert node.domsvc.dom.get(MigrationRec, "m3").phase == "ready"


@pytest_twisted.inlineCallbacks
def test_a_destination_fails_a_move_whose_vm_is_gone(start_node):
    """The destination, on ``prepare`` for a VM the DOM does not hold, fails the move naming
    itself and the VM, before touching its hypervisor."""
    h = yield start_node()
    node = h.node
    yield node.domsvc.put(_migration(node, "m4", vm="lab9/ghost", source="host2", dest="host1"))
    m = yield node.migrations.wait("m4", 10)
    assert m.phase == "failed"
    assert m.error == "phase prepare: on host host1: VM 'lab9/ghost' is gone"
