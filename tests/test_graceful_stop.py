"""Stopping and removing VMs gracefully (ACPI first, powered off after ``stop_timeout_s``, at once
with ``force``) and the ``restart_stopped`` setting, on libvirt's real test driver.

The test driver carries out a shutdown request at once (the domain is shut off with reason
"shutdown", where a destroy gives reason "destroyed"), unless the domain's ``<on_poweroff>`` says
``restart``: then the request leaves it running, as a guest that ignores ACPI would. The tests
that need such a guest redefine the domain that way through the host's own libvirt connection,
and time the graceful stop with a ``task.Clock`` given to the reconciler (``stop_clock``).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import libvirt
import pytest
import pytest_twisted
from lxml import etree
from twisted.internet import defer, task, threads

from procs import ADMIN, REPO, child_env
from vmwebd.client import ApiFault
from vmwebd.dom.records import SettingRec, VmRec, status_of
from vmwebd.hv.naming import domain_name
from vmwebd.reconcile_plan import NOT_RESTARTED

WAIT = 30.0


def libvirt_state(node, name):
    """(state, reason) of domain ``name`` as libvirt reports them on the node's own connection
    (the test driver's domains live in that connection only)."""
    return node.driver._run("get state of", name, lambda conn: tuple(conn.lookupByName(name).state()))


@defer.inlineCallbacks
def ignore_acpi(node, name):
    """Makes domain ``name`` a guest that does not power off when asked: its definition says
    ``<on_poweroff>restart</on_poweroff>``, and it is started again so that its running
    definition says so too (behind the reconciler's back, which is not looking: no pass runs)."""

    def redefine(conn):
        dom = conn.lookupByName(name)
        root = etree.fromstring(dom.XMLDesc(0))
        for old in root.findall("on_poweroff"):
            root.remove(old)
        etree.SubElement(root, "on_poweroff").text = "restart"
        conn.defineXML(etree.tostring(root, encoding="unicode"))
        dom.destroy()
        dom.create()

    yield node.driver._run("redefine", name, redefine)


def vm_status(node, vm_id):
    dom = node.domsvc.dom
    vm = dom.get(VmRec, vm_id)
    return status_of(dom, vm) if vm is not None else None


def stopping(node, vm_id):
    """Fires True once the VM's host reports it stopping (bounded)."""

    def seen():
        st = vm_status(node, vm_id)
        return st is not None and st.state == "stopping"

    return node.domsvc.wait_for(seen, WAIT)


def fault_of(d):
    def failed(f):
        f.trap(ApiFault)
        return f.value

    return d.addCallbacks(lambda r: pytest.fail(f"expected a fault, got {r!r}"), failed)


@pytest_twisted.inlineCallbacks
def test_stop_asks_the_guest_and_force_powers_off(start_node):
    """StopVm shuts the guest down (libvirt reason "shutdown"); with force it is destroyed
    (reason "destroyed") and its status says so; a start clears the force."""
    h = yield start_node(reconcile_interval=3600)
    node = h.node
    yield h.call("CreateCluster", "gs", "lab", "alice", 2)
    yield node.reconciler.settled()

    v = yield h.call("StopVm", "gs", "pc0")
    assert (v["state"], v["desired"], v["detail"] or "") == ("shutoff", "stopped", "")
    assert (yield libvirt_state(node, domain_name("gs/pc0"))) == (
        libvirt.VIR_DOMAIN_SHUTOFF,
        libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN,
    )
    assert node.domsvc.dom.get(VmRec, "gs/pc0").force is None

    v = yield h.call("StopVm", "gs", "pc1", True)
    assert (v["state"], v["detail"]) == ("shutoff", "powered off at once (forced)")
    assert (yield libvirt_state(node, domain_name("gs/pc1"))) == (
        libvirt.VIR_DOMAIN_SHUTOFF,
        libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED,
    )
    assert node.domsvc.dom.get(VmRec, "gs/pc1").force is True

    v = yield h.call("StartVm", "gs", "pc1")
    assert (v["state"], v["detail"] or "") == ("running", "")
    assert node.domsvc.dom.get(VmRec, "gs/pc1").force is None


@pytest_twisted.inlineCallbacks
def test_a_guest_that_ignores_the_request_is_powered_off_after_the_timeout(start_node):
    """A guest still running after the request stays "stopping" (asked again after 10 s) until
    stop_timeout_s has passed on the reconciler's clock, then is destroyed, saying why."""
    h = yield start_node(reconcile_interval=3600)
    node, rec = h.node, h.node.reconciler
    yield h.call("CreateCluster", "slow", "lab", "alice", 1)
    yield rec.settled()
    name = domain_name("slow/pc0")
    yield ignore_acpi(node, name)
    yield h.call("SetSetting", "stop_timeout_s", "40")
    clock = rec.stop_clock = task.Clock()

    vm = node.domsvc.dom.get(VmRec, "slow/pc0")
    yield node.domsvc.put(dataclasses.replace(vm, desired="stopped"))
    yield rec.idle()
    st = vm_status(node, vm.id)
    assert st.state == "stopping" and "after 40 s" in st.detail, st
    assert (yield node.driver.state(name)).state == "running"

    clock.advance(1)  # first look: still running, nothing done
    yield rec.idle()
    clock.advance(20)  # past the retry: asked again (it restarts again), still in time
    yield rec.idle()
    assert vm_status(node, vm.id).state == "stopping"
    assert (yield node.driver.state(name)).state == "running"

    clock.advance(19)  # 40 s after the request
    yield rec.idle()
    st = vm_status(node, vm.id)
    assert (st.state, st.detail) == (
        "shutoff",
        "did not shut down within 40 s of being asked; powered off",
    ), st
    assert (yield libvirt_state(node, name)) == (
        libvirt.VIR_DOMAIN_SHUTOFF,
        libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED,
    )
    assert not clock.getDelayedCalls() and not rec._stopping
    # A pass later leaves it off and keeps saying how it went off.
    yield rec.settled()
    assert vm_status(node, vm.id).detail.startswith("did not shut down within 40 s")


@pytest_twisted.inlineCallbacks
def test_force_hurries_a_stop_that_waits_for_its_guest(start_node):
    """A forced StopVm while the guest has time left powers it off at once."""
    h = yield start_node(reconcile_interval=3600)
    node, rec = h.node, h.node.reconciler
    yield h.call("CreateCluster", "hurry", "lab", "alice", 1)
    yield rec.settled()
    yield ignore_acpi(node, domain_name("hurry/pc0"))
    clock = rec.stop_clock = task.Clock()
    vm = node.domsvc.dom.get(VmRec, "hurry/pc0")
    yield node.domsvc.put(dataclasses.replace(vm, desired="stopped"))
    yield rec.idle()
    assert vm_status(node, vm.id).state == "stopping"

    v = yield h.call("StopVm", "hurry", "pc0", True)
    assert (v["state"], v["detail"]) == ("shutoff", "powered off at once (forced)")
    assert not clock.getDelayedCalls()


@pytest_twisted.inlineCallbacks
def test_scale_down_and_destroy_wait_for_guests_unless_forced(start_node):
    """A VM removed by a scale-down waits for its guest like a stop (then goes, addresses and
    all); a forced scale-down removes a guest that ignores the request at once; a destroy
    waiting for such a guest is finished at once by a forced destroy."""
    h = yield start_node(reconcile_interval=3600)
    node, rec = h.node, h.node.reconciler
    dom = node.domsvc.dom
    yield h.call("CreateCluster", "sd", "lab", "alice", 4)
    yield rec.settled()
    for n in ("pc1", "pc2", "pc3"):
        yield ignore_acpi(node, domain_name(f"sd/{n}"))
    clock = rec.stop_clock = task.Clock()

    scaling = node.manager.scale("sd", 3)  # removes pc3, which ignores the request
    assert (yield stopping(node, "sd/pc3"))
    assert not scaling.called
    clock.advance(60)  # the default stop_timeout_s
    yield rec.idle()
    view = yield scaling
    assert [v.name for v in view.vms] == ["pc0", "pc1", "pc2"]
    assert dom.get(VmRec, "sd/pc3") is None

    c = yield h.call("ScaleCluster", "sd", 2, True)  # pc2 ignores it too: forced, no clock needed
    assert [v["name"] for v in c["vms"]] == ["pc0", "pc1"]
    assert domain_name("sd/pc2") not in {d.name for d in (yield node.driver.list_domains())}

    destroying = node.manager.destroy("sd")  # pc0 shuts down when asked, pc1 does not
    assert (yield stopping(node, "sd/pc1")) and not destroying.called
    assert (yield h.call("DestroyCluster", "sd", True)) == "destroyed"
    assert (yield destroying) is True
    assert (yield node.driver.list_domains()) == [] and not clock.getDelayedCalls()


@pytest_twisted.inlineCallbacks
def test_restart_stopped_false_leaves_a_vm_stopped_behind_our_back_off(start_node):
    """With restart_stopped false, a VM destroyed behind vmweb's back stays off (at every later
    pass too) and its status says why; StartVm starts it; setting it true restarts such a VM."""
    h = yield start_node(reconcile_interval=3600)
    node, rec = h.node, h.node.reconciler
    yield h.call("CreateCluster", "rs", "lab", "alice", 2)
    yield rec.settled()
    yield h.call("SetSetting", "restart_stopped", "false")
    for n in ("pc0", "pc1"):
        yield node.driver.destroy(domain_name(f"rs/{n}"))
    yield rec.settled()
    yield rec.settled()
    for n in ("pc0", "pc1"):
        st = vm_status(node, f"rs/{n}")
        assert (st.state, st.restarts) == ("shutoff", 0), st
        assert st.detail == f"found shutoff behind vmweb's back; {NOT_RESTARTED}"
        assert (yield node.driver.state(domain_name(f"rs/{n}"))).state == "shutoff"
    c = yield h.call("GetCluster", "rs")
    assert all(NOT_RESTARTED in v["detail"] and v["desired"] == "running" for v in c["vms"])

    v = yield h.call("StartVm", "rs", "pc0")
    assert (v["state"], v["detail"] or "", v["restarts"]) == ("running", "", 0)

    yield h.call("SetSetting", "restart_stopped", "true")
    yield rec.settled()
    st = vm_status(node, "rs/pc1")
    assert (st.state, st.restarts, st.detail) == ("running", 1, "found shutoff behind our back; restarted")


@pytest_twisted.inlineCallbacks
def test_restart_stopped_true_restarts_only_what_the_user_did_not_stop(start_node):
    """With restart_stopped true (the default) a VM destroyed behind our back runs again, counted;
    a VM the user stopped is never started by a pass."""
    h = yield start_node(reconcile_interval=3600)
    node, rec = h.node, h.node.reconciler
    yield h.call("CreateCluster", "rt", "lab", "alice", 2)
    yield rec.settled()
    yield h.call("StopVm", "rt", "pc0")
    yield node.driver.destroy(domain_name("rt/pc1"))
    yield rec.settled()
    yield rec.settled()
    st0, st1 = vm_status(node, "rt/pc0"), vm_status(node, "rt/pc1")
    assert (st0.state, st0.restarts) == ("shutoff", 0)
    assert (yield node.driver.state(domain_name("rt/pc0"))).state == "shutoff"
    assert (st1.state, st1.restarts, st1.detail) == ("running", 1, "found shutoff behind our back; restarted")


@pytest_twisted.inlineCallbacks
def test_bad_stops_and_timeouts_are_refused_naming_the_field(start_node):
    """A forced stop of a VM not running, a stop of a VM already stopped, a forced start and an
    out-of-range or non-numeric stop_timeout_s get Client.InvalidArgument naming the field, and
    change nothing."""
    h = yield start_node(reconcile_interval=3600)
    node = h.node
    yield h.call("CreateCluster", "bad", "lab", "alice", 1)
    yield node.reconciler.settled()
    yield h.call("StopVm", "bad", "pc0")
    dom = node.domsvc.dom

    def state():
        return (
            dom.get(VmRec, "bad/pc0"),
            dom.version_of("vm", "bad/pc0"),
            vm_status(node, "bad/pc0"),
            dom.all(SettingRec),
        )

    before = state()

    f = yield fault_of(h.call("StopVm", "bad", "pc0", True))
    assert f.code == "Client.InvalidArgument" and f.message.startswith(
        "force: VM bad/pc0 is not running (it is shutoff)"
    ), f
    f = yield fault_of(h.call("StopVm", "bad", "pc0"))
    assert (f.code, f.message) == ("Client.InvalidArgument", "vm: VM bad/pc0 is already stopped")
    for value, why in (
        ("-1", "must be between 0 and 3600 seconds"),
        ("86400", "must be between 0 and 3600 seconds"),
        ("1.5", "must be a whole number of seconds"),
        ("soon", "must be a whole number of seconds"),
    ):
        f = yield fault_of(h.call("SetSetting", "stop_timeout_s", value))
        assert f.code == "Client.InvalidArgument", f
        assert f.message == f"stop_timeout_s: {value!r}: {why}", f
    with pytest.raises(Exception) as e:
        yield node.manager.set_vm_power("bad", "pc0", "running", force=True)
    assert str(e.value) == "force: VM bad/pc0: only a stop can be forced"
    assert state() == before
    settings = {s["key"]: s for s in (yield h.call("GetSettings"))}
    assert settings["stop_timeout_s"]["value"] == "60"
    assert "ACPI" in settings["stop_timeout_s"]["description"]


def vmweb(node, *args):
    """Runs the ``vmweb`` command line against the node (bounded), as the test admin."""
    return threads.deferToThread(
        subprocess.run,
        [sys.executable, "-m", "vmwebd.cli", "--host", node.api_address, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=child_env(VMWEB_USER=ADMIN[0], VMWEB_PASSWORD=ADMIN[1]),
    )


@pytest_twisted.inlineCallbacks
def test_cli_shows_the_timeout_and_takes_force(start_node):
    """`vm stop` says the guest is asked and the timeout, `--force` says at once, a forced stop of
    a stopped VM is one line naming the field (exit 1), `cluster destroy --force` says at once."""
    h = yield start_node(reconcile_interval=3600)
    yield h.call("CreateCluster", "cli", "lab", "alice", 2)
    yield h.node.reconciler.settled()

    p = yield vmweb(h.node, "vm", "stop", "cli", "pc0")
    assert p.returncode == 0, p
    assert p.stderr == (
        "cli/pc0: asking the guest to shut down; powered off if still running "
        "after 60 s (stop_timeout_s; --force: at once)\n"
    )
    assert p.stdout.splitlines()[1].split()[3] == "shutoff"

    p = yield vmweb(h.node, "vm", "stop", "--force", "cli", "pc0")
    assert p.returncode == 1, p
    assert p.stderr.splitlines()[-1].startswith(
        "vmweb: Client.InvalidArgument: force: VM cli/pc0 is not running (it is shutoff)"
    ), p.stderr

    p = yield vmweb(h.node, "vm", "stop", "cli", "pc1", "--force")
    assert p.returncode == 0 and p.stderr == "cli/pc1: powering off at once (--force)\n", p

    p = yield vmweb(h.node, "cluster", "destroy", "cli", "--force")
    assert p.returncode == 0 and p.stdout.strip() == "cluster cli destroyed", p
    assert p.stderr == "cli: destroying its VMs: powering off at once (--force)\n", p
